"""The relay store's interface, and the store address that picks a backend.

:class:`RelayStore` is what :class:`relay.server.Relay` and
:class:`tisa_io.durable.GroupCommitter` use of a store; two backends implement it:

* :class:`relay.store.Store`: SQLite plus ciphertext files in a directory, the
  embedded default (a store address that is a path);
* :class:`relay.pgstore.PgStore`: PostgreSQL, ciphertexts in the database in chunks
  (a store address ``postgresql://...``), which several relay processes can share.

Both keep the same rules (see :mod:`relay.store`): every method is one step of the open
batch (group commit), a refused step leaves no trace, every audit entry commits with the
change it records, and nothing is announced before its batch is durable
(:attr:`RelayStore.barrier`, :attr:`RelayStore.committed`).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO, Protocol, runtime_checkable

from relay.store import (
    ConsentRow,
    NoticeRow,
    ReceiptRow,
    ReportRow,
    Store,
    StoreBusy,
    StoreUnavailable,
    TokenRow,
)
from tisa.audit import AuditEntry
from tisa.consent import Announcement, Answer, Request
from tisa.errors import Reason
from tisa.prekeys import Prekey
from tisa.receipt import Receipt
from tisa.token import ReleaseToken
from tisa_io.durable import Batches

__all__ = [
    "POSTGRESQL_SCHEMES",
    "RelayStore",
    "SharedStore",
    "StoreBusy",
    "StoreUnavailable",
    "Upload",
    "is_postgresql",
    "open_store",
]

# Store addresses with these prefixes name a PostgreSQL database (libpq's URI schemes).
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


class Upload(Protocol):
    """One ciphertext being received (:meth:`RelayStore.begin_upload`)."""

    written: int

    def write(self, data: bytes) -> None:
        """Add ``data`` (cheap: no I/O that waits on a disk or the network)."""

    def digest(self) -> bytes:
        """The ciphertext digest of everything written (call once, at the end)."""

    def place(self) -> None:
        """Make the ciphertext durable where :meth:`RelayStore.add_report` finds it.
        Blocking (run it in a worker thread) unless :attr:`data` is not None."""

    def abort(self) -> None:
        """Drop what was written; safe at any point, also after :meth:`place`."""

    @property
    def data(self) -> bytes | None:
        """The ciphertext, for a small one kept in its row; None otherwise."""


class RelayStore(Batches, Protocol):
    """The relay's durable state, as the relay uses it (see the module docstring)."""

    # Group commit (tisa_io.durable.Batches): batches open, written, durable; a failed
    # WAL flush poisons the store.
    group_commit: bool
    generation: int
    failed: BaseException | None

    def commit_durably(self) -> None:
        """Commit the open batch and flush it, in line (start-up, shutdown)."""

    def close(self) -> None:
        """Commit what is pending (unless poisoned) and close."""

    # Reports and their ciphertext.
    def report(self, report_id: bytes) -> ReportRow | None:
        """The report's row, or None."""

    def begin_upload(self, report_id: bytes, *, inline: bool = False) -> Upload:
        """A writer for a new ciphertext of ``report_id`` (``inline``: kept in its row)."""

    @typing.overload
    def add_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes | None = None,
        if_new: typing.Literal[False] = False,
    ) -> ReportRow:
        """Without ``if_new``: the new row, always (see the implementation below)."""

    @typing.overload
    def add_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes | None = None,
        if_new: bool,
    ) -> ReportRow | None:
        """With ``if_new``: the new row, or None if a report is stored under the id."""

    def add_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes | None = None,
        if_new: bool = False,
    ) -> ReportRow | None:
        """Record a placed upload (or, with ``data``, an inline ciphertext) as a held
        report and log ``stored``, in one step. ``if_new``: a report already stored
        under this id is left as it is, nothing is written and None is returned."""

    def add_released_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes,
        token: ReleaseToken,
        max_queue: int,
    ) -> tuple[ReportRow, TokenRow] | None:
        """An inline ciphertext stored and released by ``token`` (checked) in one step,
        as :meth:`add_report` then :meth:`release`; None, with nothing written, when
        anything stands in the way (or the store does not do it in one step)."""

    def inline_data(self, report_id: bytes) -> bytes | None:
        """The ciphertext of a report kept in its row, or None."""

    def open_ciphertext(self, report_id: bytes) -> BinaryIO:
        """A readable stream of a report's ciphertext (constant memory). Raises:
        FileNotFoundError when there is none."""

    # Tokens and deliveries.
    def token(self, token_id: bytes) -> TokenRow | None:
        """The token row of ``token_id`` (also a consumed one), or None."""

    def ping(self) -> None:
        """A trivial read; raises when the database cannot answer."""

    def queue_length(self, recipient: str) -> int:
        """Deliveries still owed to ``recipient``."""

    def changes(self, member: str, kind: str) -> int:
        """A count that moves when this process may have queued rows of ``kind`` for
        ``member`` (see :meth:`relay.consentstore.ConsentTables.changes`)."""

    def release(
        self,
        token: ReleaseToken,
        *,
        now: int,
        max_queue: int,
        clock_skew: int = 0,
        fresh: ReportRow | None = None,
    ) -> TokenRow:
        """Consume ``token`` and make its delivery pending, atomically; a token that names
        a request (``token.request``) closes that request as approved in the same step
        (``clock_skew``: the grace past the request's expiry). ``fresh``: the row of the
        token's report, inserted by this batch and unchanged since (a store may skip
        reading the report's state then). Raises: Refused."""

    def outstanding(self, recipient: str, *, after: int = 0, limit: int = -1) -> list[TokenRow]:
        """Deliveries owed to ``recipient`` with ``seq > after``, oldest first."""

    def delivery_source(self, token_id: bytes) -> tuple[bool, bytes | None]:
        """Whether a delivery is still owed, and its inline ciphertext if any."""

    def delivery_sources(
        self, token_ids: Sequence[bytes]
    ) -> dict[bytes, tuple[bool, bytes | None]]:
        """:meth:`delivery_source` of each (an id not found left out), in one query."""

    def is_outstanding(self, token_id: bytes) -> bool:
        """Whether the delivery of ``token_id`` is still owed."""

    def mark_forwarded(self, token_id: bytes, *, now: int) -> None:
        """A delivery went out in full; the first time, log ``forwarded``."""

    def mark_forwarded_many(self, rows: Sequence[TokenRow], *, now: int) -> None:
        """Deliveries (their rows in hand) that went out in full together: each as
        :meth:`mark_forwarded`, in one step."""

    def ack_delivery(self, token_id: bytes, *, recipient: str, now: int) -> bool:
        """The recipient holds the report; False for an unknown or foreign token."""

    def revoke(self, report_id: bytes, token_id: bytes | None, *, by: str, now: int) -> None:
        """Withdraw one token, or (``token_id`` None) the whole report. Raises: Refused."""

    # Receipts and notices.
    def add_receipt(self, receipt: Receipt, *, now: int, ack: bool = False) -> bool:
        """Queue a verified receipt for its originator (with ``ack``, and acknowledge its
        delivery, in the same step); False if queued before."""

    def queued_receipts(
        self, originator: str, *, after: int = 0, limit: int = -1
    ) -> list[ReceiptRow]:
        """Receipts not yet confirmed by ``originator``, ``seq > after``, oldest first."""

    def ack_receipt(self, token_id: bytes, *, originator: str) -> bool:
        """The originator holds the receipt; False if there is no such receipt."""

    def notices(self, member: str, *, after: int = 0, limit: int = -1) -> list[NoticeRow]:
        """Notices queued for ``member`` with ``seq > after``, oldest first."""

    def drop_notice(self, seq: int) -> None:
        """Drop a notice that was sent."""

    # Release requests (relay.consentstore): announcements, requests, denials.
    def add_announcement(self, announcement: Announcement, *, now: int) -> bool:
        """Queue a verified announcement for every member it names, and log it; False for
        a resend. Raises: Refused (DUPLICATE, UNKNOWN_REPORT)."""

    def add_request(self, request: Request, *, now: int, max_per_hour: int) -> bool:
        """Record a verified request, queue it for its originator, and log it; False for a
        resend. Raises: Refused (DUPLICATE, UNKNOWN_REPORT, RATE_LIMITED)."""

    def add_denial(self, answer: Answer, *, now: int) -> bool:
        """Close a request as denied, queue the answer for the requester, and log it;
        False for a resend. Raises: Refused (UNSOLICITED, ANSWERED)."""

    def queued_consent(self, member: str, *, after: int = 0, limit: int = -1) -> list[ConsentRow]:
        """Consent objects queued for ``member`` with ``seq > after``, oldest first."""

    def ack_consent(self, member: str, kind: str, ref: bytes) -> bool:
        """``member`` holds the queued object of ``kind`` with id ``ref``: drop it; False
        if none was queued."""

    def request_state(self, request_id: bytes) -> str | None:
        """``open``, ``approved`` or ``denied``; None for an unknown (or pruned) request."""

    # Expiry and the audit log.
    def expire(self, *, now: int, clock_skew: int) -> set[str]:
        """Expire what ran out; returns the members that got a notice."""

    def log_refusal(
        self,
        *,
        member: str,
        reason: Reason,
        now: int,
        report: bytes | None = None,
        token: bytes | None = None,
        others: tuple[str, ...] = (),
    ) -> None:
        """Log a refusal of something ``member`` sent (its own step)."""

    @property
    def audit_seq(self) -> int:
        """Sequence number of the last audit entry (0 when empty)."""

    @property
    def audit_head(self) -> bytes:
        """The audit chain's head after its last entry."""

    def audit_point(self, seq: int) -> bytes | None:
        """The chain head after entry ``seq`` (GENESIS for 0), or None past the end."""

    def audit_entries(self, after: int, *, limit: int) -> list[tuple[AuditEntry, bytes, bytes]]:
        """Up to ``limit`` entries after ``after``: (entry, content hash, head after it)."""

    def audit_entry_sizes(self, after: int, *, limit: int) -> list[int]:
        """The encoded sizes of up to ``limit`` entries after ``after``."""

    def publish_prekeys(
        self, owner: str, signed: Prekey | None, one_time: list[Prekey], *, max_one_time: int
    ) -> None:
        """Store a member's verified prekeys (its own step); Refused(LIMIT) past
        ``max_one_time`` one-time prekeys, storing nothing."""

    def prekey_status(self, owner: str, *, now: int) -> tuple[int, int]:
        """(newest valid signed prekey's ``not_after`` or 0, one-time prekeys left)."""

    def take_prekeys(
        self,
        owner: str,
        *,
        taker: str,
        now: int,
        max_per_hour: int | None = None,
        count_to: int | None = None,
    ) -> tuple[bytes | None, bytes | None, int]:
        """Hand out ``owner``'s newest valid signed prekey and one one-time prekey, taken
        by ``taker`` in the same step (so once), unless ``taker`` had ``max_per_hour`` of
        them in the last hour; with the one-time prekeys left, counted up to
        ``count_to`` (:meth:`relay.prekeystore.PrekeyTables.take_prekeys`)."""

    def take_prekey_bundles(
        self,
        owner: str,
        *,
        taker: str,
        now: int,
        count: int,
        max_per_hour: int | None = None,
        count_to: int | None = None,
    ) -> tuple[bytes | None, list[bytes], int]:
        """As :meth:`take_prekeys` for up to ``count`` one-time prekeys, as many as are
        left and ``taker``'s allowance gives, in one step
        (:meth:`relay.prekeystore.PrekeyTables.take_prekey_bundles`)."""


@runtime_checkable
class SharedStore(Protocol):
    """What a store that several relay processes share (:class:`relay.pgstore.PgStore`)
    adds: claims on deliveries across processes, and word of what other processes
    queued. A relay with a store that is not shared (SQLite) needs neither."""

    def claim(self, token_id: bytes) -> bool:
        """Claim a delivery before pushing it; False: another process pushes it."""

    def unclaim(self, token_ids: Iterable[bytes]) -> None:
        """Give up claims (the connection that pushed them ended)."""

    async def watch(self, wake: Callable[[str | None], None]) -> None:
        """Until cancelled: ``wake(member)`` when another process queued something for
        ``member``, ``wake(None)`` now and then to look at everything."""


def is_postgresql(address: str | os.PathLike[str]) -> bool:
    """Whether a store address names a PostgreSQL database (else it is a directory)."""
    return isinstance(address, str) and address.startswith(POSTGRESQL_SCHEMES)


def open_store(address: str | os.PathLike[str], *, group_commit: bool = True) -> RelayStore:
    """Open the relay store at ``address``: a ``postgresql://`` address
    (:class:`relay.pgstore.PgStore`) or a directory (:class:`relay.store.Store`).

    Raises:
        UsageError: the store is of another schema version.
        StoreUnavailable: the PostgreSQL server cannot be reached (one clear line).
    """
    if is_postgresql(address):
        from relay.pgstore import PgStore  # psycopg is loaded only when used

        return PgStore(str(address), group_commit=group_commit)
    return Store(address, group_commit=group_commit)


def _sqlite_store_is_a_relay_store(store: Store) -> RelayStore:
    # mypy checks here that the SQLite store implements the interface.
    return store
