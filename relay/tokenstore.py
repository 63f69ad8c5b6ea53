"""Releases, deliveries, revocations, receipts, notices and expiry in the relay's store:
the rules both backends share.

:class:`TokenTables` holds those methods of :class:`relay.store.Store` (SQLite) and
:class:`relay.pgstore.PgStore` (PostgreSQL), as :class:`relay.consentstore.ConsentTables`
does for release requests: the same checks, refusals, reason codes, audit entries and
notices whichever database keeps them. Statements are written with ``?`` placeholders
(:meth:`relay.consentstore.ConsentTables._sql` runs them) and the same SQL in both
dialects (an empty blob is a parameter, ``b""``). A backend supplies what differs:

* row locks: :attr:`TokenTables._FOR_UPDATE` (PostgreSQL: another relay process's open
  batch may be changing the row; SQLite has one writer) and
  :attr:`TokenTables._SKIP_LOCKED` (an expiry leaves rows another batch holds);
* how a ciphertext goes (:meth:`TokenTables._delete_ciphertext` inside the step, and
  :meth:`TokenTables._ciphertexts_deleted` once the step is over: SQLite removes the
  files once the batch is on disk);
* cached queue lengths (SQLite: :meth:`TokenTables._queues_changed`,
  :meth:`TokenTables._acked`; PostgreSQL gives up the delivery's claim on an ack).

A release's statements differ (SQLite keeps queue lengths in memory; PostgreSQL locks
the report's row and inserts the token and pins the key in one statement); its checks
are :func:`release_refusal`, shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from relay.consentstore import DELIVERIES, NOTICES, RECEIPTS, ConsentTables
from tisa.audit import GENESIS, AuditEntry, AuditEvent
from tisa.errors import LocalError, Reason, Refused
from tisa.receipt import Receipt
from tisa.token import MAX_VALIDITY, ReleaseToken

__all__ = [
    "FORWARDED_KEPT",
    "ID_LIST_SIZES",
    "OUTSTANDING",
    "OWED",
    "PENDING_COLUMNS",
    "TOKEN_COLUMNS",
    "NoticeRow",
    "ReceiptRow",
    "ReportRow",
    "StoreBusy",
    "StoreUnavailable",
    "TokenRow",
    "TokenTables",
    "pending_values",
    "release_refusal",
]

# Token states in which a delivery is still owed to the recipient.
OUTSTANDING = ("pending", "delivered")
# The same as an SQL condition, written out in every query that should use SQLite's
# partial indexes (SQLite uses one only when the query states its condition literally).
OWED = "state IN ('pending', 'delivered')"

TOKEN_COLUMNS = "seq, id, report, recipient, originator, token, counter, state, not_after"

# The id lists TokenTables.mark_forwarded_many and delivery_sources take in one
# statement (_id_lists): a list is padded (its last id repeated) to the next of these
# sizes, so only these few statements enter the prepared-statement cache; a longer list
# takes one statement per the largest.
ID_LIST_SIZES = (1, 4, 16, 64)
_REPORT_COLUMNS = "id, originator, size, digest, state, ended, expires, stored_at"

# Deliveries this process marked forwarded whose originator and report it keeps in
# memory (TokenTables._forwarded), so that their ack, nearly every one, is an UPDATE
# without RETURNING: SQLite gathers a RETURNING's rows in a temporary table, which cost
# about as much again as the update itself. Beyond this many the oldest is dropped; the
# ack of a delivery not kept (or forwarded by another relay process) returns its row as
# before.
FORWARDED_KEPT = 4096


class StoreUnavailable(LocalError):
    """The relay's store cannot be reached (its PostgreSQL server is down or refuses the
    connection). At start the relay stops with this one line; while it runs, the
    connection that met it is closed with ``busy`` and the store is tried again."""


class StoreBusy(StoreUnavailable):
    """Another relay process holds what this step needs (the audit chain head, the
    ordering lock or a row past the lock timeout, a row both wait for, or a report id
    or token id it used a moment ago): the connection is closed with ``busy`` and the
    member tries again."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReportRow:
    """A report's row: ``ended`` says why a ``deleted`` one went (expired, revoked, done)."""

    id: bytes
    originator: str
    size: int
    digest: bytes
    state: str  # held, released, deleted
    ended: str | None  # why it was deleted: "expired", "revoked", "done"
    expires: int
    stored_at: int


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRow:
    """A token's row: a delivery (pending, delivered, acked, revoked or expired)."""

    seq: int
    id: bytes
    report: bytes
    recipient: str
    originator: str
    token: bytes
    counter: int
    state: str
    not_after: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReceiptRow:
    """A receipt queued for its originator."""

    seq: int
    originator: str
    token: bytes
    receipt: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class NoticeRow:
    """A notice (``expired`` or ``revoked``) queued for a member."""

    seq: int
    member: str
    kind: str
    report: bytes
    token: bytes | None


def token_row(row: Any) -> TokenRow:
    """A ``tokens`` row (:data:`TOKEN_COLUMNS`) as a :class:`TokenRow`."""
    seq, id_, report, recipient, originator, token, counter, state, not_after = row
    return TokenRow(
        int(seq),
        bytes(id_),
        bytes(report),
        str(recipient),
        str(originator),
        bytes(token),
        int(counter),
        str(state),
        int(not_after),
    )


def report_row(row: Any) -> ReportRow:
    """A ``reports`` row (id, originator, size, digest, state, ended, expires, stored_at)."""
    id_, originator, size, digest, state, ended, expires, stored_at = row
    return ReportRow(
        bytes(id_),
        str(originator),
        int(size),
        bytes(digest),
        str(state),
        None if ended is None else str(ended),
        int(expires),
        int(stored_at),
    )


# A released token's row, as pending_values gives it (state: 'pending').
PENDING_COLUMNS = "id, report, recipient, originator, token, counter, state, not_after, keep_until"


def pending_values(token: ReleaseToken) -> tuple[bytes, bytes, str, str, bytes, int, int, int]:
    """The values of :data:`PENDING_COLUMNS` but ``state`` for a released token: its id
    is kept until no token with it could still be valid (``not_after`` plus the longest
    validity), so a replay is caught."""
    return (
        token.id,
        token.report,
        token.recipient,
        token.originator,
        token.encoded,
        token.counter,
        token.not_after,
        token.not_after + MAX_VALIDITY,
    )


def _id_lists(ids: Sequence[bytes]) -> Iterator[tuple[str, tuple[bytes, ...]]]:
    """``ids`` a statement at a time: the placeholders of an ``IN (...)`` list and its
    parameters, at most the largest of :data:`ID_LIST_SIZES` each, padded (the last
    id repeated) to one of those sizes."""
    largest = ID_LIST_SIZES[-1]
    for start in range(0, len(ids), largest):
        chunk = list(ids[start : start + largest])
        size = next(size for size in ID_LIST_SIZES if size >= len(chunk))
        yield ", ".join("?" * size), tuple(chunk + [chunk[-1]] * (size - len(chunk)))


def release_refusal(
    token: ReleaseToken,
    found: Any,
    *,
    now: int,
    queued: Callable[[], int],
    max_queue: int,
) -> Refused | None:
    """Why ``token`` may not be released, from what the store holds (``found``): the
    token id's state (None if unused), whether its report's row is there, and that
    row's state, why it ended, its hold time and its pinned key commitment; and the
    recipient's deliveries outstanding (``queued``, asked only once the rest passed).
    None: it may.

    The order is the protocol's: a used or revoked token id first, then the report.
    """
    seen, present, state, ended, expires, pinned = found
    if seen is not None:
        if seen == "revoked":
            return Refused(Reason.REVOKED, "this token was revoked")
        return Refused(Reason.REPLAYED, "this token was used before")
    if not present:
        return Refused(Reason.UNKNOWN_REPORT, "no such report")
    if state == "deleted":
        if ended == "revoked":
            return Refused(Reason.REVOKED, "the report was revoked")
        return Refused(Reason.EXPIRED, "the report is no longer held")
    assert expires is not None
    if expires <= now:
        return Refused(Reason.EXPIRED, "the report's hold time is over")
    if queued() >= max_queue:
        return Refused(Reason.QUEUE_FULL, f"{token.recipient} has {max_queue} queued")
    # XChaCha20-Poly1305 does not commit to its key, so an originator could craft one
    # ciphertext that opens differently under two keys. The first release pins the key
    # commitment; every later token for the report must carry the same.
    if pinned is not None and bytes(pinned) != token.key_commit:
        return Refused(Reason.WRONG_REPORT, "token commits to another content key than the first")
    return None


class TokenTables(ConsentTables):
    """The delivery methods of a relay store (see the module docstring), beside the
    consent methods, whose backend hooks (``_sql``, ``_transaction``, ``_audit``,
    ``_tell``, ``_exclusive``, ``_seen``) they use too."""

    if TYPE_CHECKING:
        # relay.prekeystore.PrekeyTables, beside this in both stores.
        def _prune_prekey_rate(self, *, now: int) -> None: ...

    # Appended to a SELECT of one row a step goes on to change: a row lock where other
    # writers run at the same time (PostgreSQL), nothing with one writer (SQLite).
    _FOR_UPDATE = ""

    def __init__(self) -> None:
        super().__init__()
        # Token id -> (originator, report) of deliveries marked forwarded (FORWARDED_KEPT).
        # A delivery goes out only once its release is on disk, and a token row's
        # originator and report never change: an entry stays true whatever batch is
        # rolled back later (a row since deleted is simply not found by the ack).
        self._forwarded: dict[bytes, tuple[str, bytes]] = {}

    def _keep_forwarded(self, token_id: bytes, originator: str, report: bytes) -> None:
        if len(self._forwarded) >= FORWARDED_KEPT:
            del self._forwarded[next(iter(self._forwarded))]  # the oldest
        self._forwarded[token_id] = (originator, report)

    # Appended to the SELECT of rows an expiry changes: skip those another batch holds.
    _SKIP_LOCKED = ""

    def _delete_ciphertext(self, report_id: bytes, ended: str) -> None:
        """Inside a step: the report is ``deleted`` (``ended`` says why) and its
        ciphertext goes (PostgreSQL: its chunks, in the same transaction)."""
        raise NotImplementedError

    def _ciphertexts_deleted(self, report_ids: list[bytes]) -> None:
        """After a step that deleted these reports' ciphertexts (SQLite: remove their
        files once the batch is on disk)."""

    def _queues_changed(self) -> None:
        """Deliveries outstanding changed in a way a cached count cannot follow."""

    def _acked(self, token_id: bytes, recipient: str) -> None:
        """After a step that acked an outstanding delivery."""

    def _released(self, token: ReleaseToken, seq: int, *, now: int) -> TokenRow:
        """Inside a release's step, once its row (``seq``) is in: tell, log, and the
        row, built rather than read back."""
        self._tell(token.recipient, DELIVERIES)
        self._audit(
            AuditEvent.RELEASED,
            now=now,
            parties=(token.originator, token.recipient),
            report=token.report,
            token=token.id,
        )
        return TokenRow(seq, *pending_values(token)[:6], "pending", token.not_after)

    def _audit_read(self) -> None:
        """Before the audit log is read: the open batch's buffered entries are written
        first, so a read sees them."""
        raise NotImplementedError

    # --- reads -------------------------------------------------------------------------

    def report(self, report_id: bytes) -> ReportRow | None:
        """The report's row, or None."""
        row = self._seen(
            self._sql(
                f"SELECT {_REPORT_COLUMNS} FROM reports WHERE id = ?", (report_id,)
            ).fetchone()
        )
        return None if row is None else report_row(row)

    def token(self, token_id: bytes) -> TokenRow | None:
        """The token row of ``token_id`` (also a consumed one), or None."""
        row = self._seen(
            self._sql(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)).fetchone()
        )
        return None if row is None else token_row(row)

    def outstanding(self, recipient: str, *, after: int = 0, limit: int = -1) -> list[TokenRow]:
        """Deliveries owed to ``recipient`` with ``seq > after``, oldest first
        (at most ``limit``; -1 for all)."""
        rows = self._seen(
            self._sql(
                f"SELECT {TOKEN_COLUMNS} FROM tokens"
                f" WHERE recipient = ? AND {OWED} AND seq > ? ORDER BY seq LIMIT ?",
                (recipient, after, self._sql_limit(limit)),
            ).fetchall()
        )
        return [token_row(row) for row in rows]

    def delivery_source(self, token_id: bytes) -> tuple[bool, bytes | None]:
        """For a delivery about to be pushed, in one query: whether it is still
        outstanding, and its report's ciphertext if stored inline (else None: a file or
        chunks, or gone)."""
        row = self._sql(
            "SELECT t.state, r.data FROM tokens t LEFT JOIN reports r ON r.id = t.report"
            " WHERE t.id = ?",
            (token_id,),
        ).fetchone()
        if row is None:
            return False, None
        return row[0] in OUTSTANDING, None if row[1] is None else bytes(row[1])

    def delivery_sources(
        self, token_ids: Sequence[bytes]
    ) -> dict[bytes, tuple[bool, bytes | None]]:
        """:meth:`delivery_source` of each of ``token_ids`` (of deliveries about to be
        pushed together), in one query for up to the largest of
        :data:`ID_LIST_SIZES`; an id not found is left out."""
        sources: dict[bytes, tuple[bool, bytes | None]] = {}
        for placeholders, ids in _id_lists(token_ids):
            for token_id, state, data in self._sql(
                "SELECT t.id, t.state, r.data FROM tokens t LEFT JOIN reports r"
                f" ON r.id = t.report WHERE t.id IN ({placeholders})",
                ids,
            ).fetchall():
                sources[bytes(token_id)] = (
                    state in OUTSTANDING,
                    None if data is None else bytes(data),
                )
        return sources

    def is_outstanding(self, token_id: bytes) -> bool:
        """Whether the delivery of ``token_id`` is still owed."""
        row = self._sql("SELECT state FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return row is not None and row[0] in OUTSTANDING

    # --- deliveries --------------------------------------------------------------------

    def mark_forwarded(self, token_id: bytes, *, now: int) -> None:
        """A delivery went out in full; the first time, log ``forwarded``."""
        with self._transaction(savepoint=False):
            row = self._sql(
                "UPDATE tokens SET state = 'delivered' WHERE id = ? AND state = 'pending'"
                " RETURNING originator, recipient, report",
                (token_id,),
            ).fetchone()
            if row is None:
                return
            originator, report = str(row[0]), bytes(row[2])
            self._audit(
                AuditEvent.FORWARDED,
                now=now,
                parties=(originator, str(row[1])),
                report=report,
                token=token_id,
            )
            self._keep_forwarded(token_id, originator, report)

    def mark_forwarded_many(self, rows: Sequence[TokenRow], *, now: int) -> None:
        """Deliveries that went out in full, together (the small ones of one write), as
        :meth:`mark_forwarded` each, in one step: one statement for up to the largest
        of :data:`ID_LIST_SIZES`, not one per delivery. Each still pending is logged
        ``forwarded``, in the order given, from its row in hand (``rows``, as
        :meth:`outstanding` found them: who and which report do not change)."""
        if not rows:
            return
        with self._transaction(savepoint=False):
            marked: set[bytes] = set()
            for placeholders, ids in _id_lists([row.id for row in rows]):
                marked.update(
                    bytes(found[0])
                    for found in self._sql(
                        "UPDATE tokens SET state = 'delivered' WHERE state = 'pending'"
                        f" AND id IN ({placeholders}) RETURNING id",
                        ids,
                    ).fetchall()
                )
            for row in rows:
                if row.id in marked:
                    marked.discard(row.id)  # once, should a row be given twice
                    self._audit(
                        AuditEvent.FORWARDED,
                        now=now,
                        parties=(row.originator, row.recipient),
                        report=row.report,
                        token=row.id,
                    )
                    self._keep_forwarded(row.id, row.originator, row.report)

    def ack_delivery(self, token_id: bytes, *, recipient: str, now: int) -> bool:
        """The recipient holds the report. Returns False for an unknown or foreign token;
        an ack for a delivery no longer outstanding (acked, revoked, expired) is True."""
        with self._transaction(savepoint=False):
            known = self._ack(token_id, recipient, now=now)
        if known:
            self._acked(token_id, recipient)
        return known is not None

    def _ack(self, token_id: bytes, recipient: str, *, now: int) -> bool | None:
        """Inside a step: :meth:`ack_delivery`'s statements and entries. True when this
        ack took the delivery out of the owed ones, False for one no longer outstanding,
        None for an unknown or foreign token (nothing written)."""
        # Only the id is needed from now on (to refuse a replay): drop the token and
        # with it the sealed content key, which the relay has no reason to keep.
        # One statement checks and writes in the usual case (the delivery was
        # marked forwarded); RETURNING gives only the new values, so each state the
        # ack may find gets a statement of its own. A delivery this process marked
        # forwarded needs no RETURNING: its originator and report are kept.
        kept = self._forwarded.get(token_id)
        befores: tuple[str, ...] = ("delivered", "pending")
        row: Any = None
        if kept is not None:
            if self._ack_delivered(token_id, recipient):
                row, before = kept, "delivered"
            else:
                befores = ("pending",)
        if row is None:
            for before in befores:
                row = self._sql(
                    "UPDATE tokens SET state = 'acked', token = ? WHERE id = ?"
                    " AND recipient = ? AND state = ? RETURNING originator, report",
                    (b"", token_id, recipient, before),
                ).fetchone()
                if row is not None:
                    break
            else:
                known = self.token(token_id)
                return False if known is not None and known.recipient == recipient else None
        self._acked_entries(token_id, recipient, str(row[0]), bytes(row[1]), before, now=now)
        return True

    def _ack_delivered(self, token_id: bytes, recipient: str) -> bool:
        """Inside a step: ack the delivery of ``token_id`` to ``recipient`` if it was
        marked forwarded (one UPDATE, no RETURNING); whether it was."""
        return (
            self._sql(
                "UPDATE tokens SET state = 'acked', token = ?"
                " WHERE id = ? AND recipient = ? AND state = 'delivered'",
                (b"", token_id, recipient),
            ).rowcount
            == 1
        )

    def _acked_entries(
        self,
        token_id: bytes,
        recipient: str,
        originator: str,
        report: bytes,
        before: str,
        *,
        now: int,
    ) -> None:
        """Inside a step, once a delivery found ``before`` is acked: its audit entries."""
        self._forwarded.pop(token_id, None)
        if before == "pending":
            # The ack overtook mark_forwarded: the delivery did go out in full.
            self._audit(
                AuditEvent.FORWARDED,
                now=now,
                parties=(originator, recipient),
                report=report,
                token=token_id,
            )
        self._audit(
            AuditEvent.ACKNOWLEDGED,
            now=now,
            parties=(originator, recipient),
            report=report,
            token=token_id,
        )

    # --- revocation --------------------------------------------------------------------

    def revoke(self, report_id: bytes, token_id: bytes | None, *, by: str, now: int) -> None:
        """Withdraw one token (also one not released yet) or, with ``token_id`` None, the
        whole report and its ciphertext.

        Raises:
            Refused: UNKNOWN_REPORT (no such report of ``by``), REPLAYED (the token was
                already acked: it was used; or, for the whole report, every token of it
                was, so there is nothing left to withdraw), EXPIRED (the token expired
                first), WRONG_REPORT (the token belongs to another report).
            StoreBusy: the token was released through another relay process meanwhile.
        """
        self._queues_changed()
        deleted: list[bytes] = []
        with self._transaction():
            # The report's row and the token's are locked until the batch ends (see
            # _FOR_UPDATE): a release or an ack in another relay process's open batch
            # is waited for, and seen.
            found = self._sql(
                f"SELECT {_REPORT_COLUMNS} FROM reports WHERE id = ?{self._FOR_UPDATE}",
                (report_id,),
            ).fetchone()
            report = None if found is None else report_row(found)
            if report is None or report.originator != by:
                raise Refused(Reason.UNKNOWN_REPORT, "no such report of yours")
            if token_id is not None:
                self._revoke_token(report_id, token_id, by=by, now=now)
                return
            if report.state == "deleted" and report.ended == "revoked":
                return
            owed = self._sql(
                f"SELECT 1 FROM tokens WHERE report = ? AND {OWED} LIMIT 1", (report_id,)
            ).fetchone()
            if owed is None:
                delivered = sorted(
                    str(r[0])
                    for r in self._sql(
                        "SELECT recipient FROM tokens WHERE report = ? AND state = 'acked'",
                        (report_id,),
                    ).fetchall()
                )
                if delivered:
                    # Nothing left to withdraw: a revocation cannot take a report back
                    # from its recipients. Refused, and nothing changes.
                    raise Refused(
                        Reason.REPLAYED,
                        f"already delivered to {', '.join(delivered)}; nothing to withdraw",
                    )
            recipients = [
                str(r[0])
                for r in self._sql(
                    f"UPDATE tokens SET state = 'revoked', token = ? WHERE report = ? AND {OWED}"
                    " RETURNING recipient",
                    (b"", report_id),
                ).fetchall()
            ]
            self._delete_ciphertext(report_id, "revoked")
            deleted.append(report_id)
            self._audit(AuditEvent.REVOKED, now=now, parties=(by, *recipients), report=report_id)
        self._ciphertexts_deleted(deleted)

    def _revoke_token(self, report_id: bytes, token_id: bytes, *, by: str, now: int) -> None:
        # Inside revoke's step.
        found = self._sql(
            f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE id = ?{self._FOR_UPDATE}", (token_id,)
        ).fetchone()
        if found is None:
            # Revoked before release: the id is recorded so a later release is refused.
            # recipient is unknown; '' matches no member.
            inserted = self._sql(
                "INSERT INTO tokens (id, report, recipient, originator, token, counter,"
                " state, not_after, keep_until) VALUES (?, ?, '', ?, ?, 0, 'revoked', ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                (token_id, report_id, by, b"", now, now + 2 * MAX_VALIDITY),
            )
            if inserted.rowcount == 0:
                # Released meanwhile through another relay process (for another report):
                # sent again, the revocation finds its row.
                raise StoreBusy("another relay process used this token just now")
            parties: tuple[str, ...] = (by,)
        else:
            row = token_row(found)
            if row.report != report_id:
                raise Refused(Reason.WRONG_REPORT, "the token names another report")
            if row.state == "acked":
                raise Refused(Reason.REPLAYED, "the token was already used")
            if row.state == "expired":
                raise Refused(Reason.EXPIRED, "the token expired")
            if row.state == "revoked":
                return
            self._sql(
                "UPDATE tokens SET state = 'revoked', token = ? WHERE id = ?", (b"", token_id)
            )
            parties = (by, row.recipient)
        self._audit(AuditEvent.REVOKED, now=now, parties=parties, report=report_id, token=token_id)

    # --- receipts and notices ----------------------------------------------------------

    def add_receipt(self, receipt: Receipt, *, now: int, ack: bool = False) -> bool:
        """Queue a verified receipt for its originator. Returns False if it was queued
        before (a resend).

        ``ack``: the receipt also acknowledges its delivery (protocol version 4), in the
        same step, as :meth:`ack_delivery` would after it (entries ``receipt`` then, for
        a delivery still owed, ``acknowledged``). In the usual case, a delivery this
        process marked forwarded (:data:`FORWARDED_KEPT`), that is two statements: the
        ack's UPDATE, whose condition checks the recipient, and the receipt's insert
        (the originator and report are checked against the kept ones first); where a
        receipt, then its ack, took a read, an insert and an update in two steps.

        Raises:
            Refused: WRONG_REPORT when no delivery of that token to that recipient from
                that originator exists (nothing written).
        """
        acked = False
        with self._transaction(savepoint=False):
            kept = self._forwarded.get(receipt.token) if ack else None
            if kept is not None and kept != (receipt.originator, receipt.report):
                # A token row's originator and report never change.
                raise Refused(Reason.WRONG_REPORT, "no such delivery")
            if kept is not None and self._ack_delivered(receipt.token, receipt.recipient):
                acked = True  # the delivery checked by the update: no read
            else:
                row = self._sql(
                    "SELECT recipient, originator, report FROM tokens WHERE id = ?",
                    (receipt.token,),
                ).fetchone()
                if (
                    row is None
                    or row[0] != receipt.recipient
                    or row[1] != receipt.originator
                    or bytes(row[2]) != receipt.report
                ):
                    raise Refused(Reason.WRONG_REPORT, "no such delivery")
            new = self._queue_receipt(receipt, now=now)
            if acked:
                self._acked_entries(
                    receipt.token, receipt.recipient, receipt.originator, receipt.report,
                    "delivered", now=now,
                )  # fmt: skip
            elif ack:
                acked = self._ack(receipt.token, receipt.recipient, now=now) is True
        if acked:
            self._acked(receipt.token, receipt.recipient)
        return new

    def _queue_receipt(self, receipt: Receipt, *, now: int) -> bool:
        """Inside a step, the delivery checked: queue ``receipt`` (False: queued before)."""
        # Originators read receipts on from the last seq they were sent: drawn in
        # commit order (see relay.consentstore.ConsentTables._exclusive).
        self._exclusive()
        # A receipt queued before (a resend) inserts nothing.
        cursor = self._sql(
            "INSERT INTO receipts (originator, token, receipt, state)"
            " VALUES (?, ?, ?, 'queued') ON CONFLICT (token) DO NOTHING",
            (receipt.originator, receipt.token, receipt.encoded),
        )
        if cursor.rowcount == 0:
            return False
        self._tell(receipt.originator, RECEIPTS)
        self._audit(
            AuditEvent.RECEIPT,
            now=now,
            parties=(receipt.originator, receipt.recipient),
            report=receipt.report,
            token=receipt.token,
        )
        return True

    def queued_receipts(
        self, originator: str, *, after: int = 0, limit: int = -1
    ) -> list[ReceiptRow]:
        """Receipts not yet confirmed by ``originator``, with ``seq > after``, oldest
        first (at most ``limit``; -1 for all)."""
        rows = self._seen(
            self._sql(
                "SELECT seq, originator, token, receipt FROM receipts"
                " WHERE originator = ? AND state = 'queued' AND seq > ? ORDER BY seq LIMIT ?",
                (originator, after, self._sql_limit(limit)),
            ).fetchall()
        )
        return [ReceiptRow(int(r[0]), str(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]

    def ack_receipt(self, token_id: bytes, *, originator: str) -> bool:
        """The originator holds the receipt; False if there is no such receipt of
        ``originator``."""
        with self._transaction(savepoint=False):
            # The row stays (its token id makes a resent receipt a duplicate), the
            # receipt itself is no longer needed.
            cursor = self._sql(
                "UPDATE receipts SET state = 'acked', receipt = ?"
                " WHERE token = ? AND originator = ?",
                (b"", token_id, originator),
            )
            return cursor.rowcount > 0

    def notices(self, member: str, *, after: int = 0, limit: int = -1) -> list[NoticeRow]:
        """Notices queued for ``member`` with ``seq > after``, oldest first (at most
        ``limit``; -1 for all)."""
        rows = self._seen(
            self._sql(
                "SELECT seq, member, kind, report, token FROM notices"
                " WHERE member = ? AND seq > ? ORDER BY seq LIMIT ?",
                (member, after, self._sql_limit(limit)),
            ).fetchall()
        )
        return [
            NoticeRow(
                int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), None if r[4] is None else bytes(r[4])
            )
            for r in rows
        ]

    def drop_notice(self, seq: int) -> None:
        """Drop a notice that was sent (notices have no ack)."""
        with self._transaction(savepoint=False):
            self._sql("DELETE FROM notices WHERE seq = ?", (seq,))

    def _notice(self, member: str, kind: str, report: bytes, token: bytes | None) -> None:
        self._tell(member, NOTICES)
        self._sql(
            "INSERT INTO notices (member, kind, report, token) VALUES (?, ?, ?, ?)",
            (member, kind, report, token),
        )

    # --- the audit log -----------------------------------------------------------------

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
        """Log a refusal of something ``member`` sent (its own step; on PostgreSQL its
        sequence number is given when its batch commits)."""
        with self._transaction(savepoint=False):
            self._audit(
                AuditEvent.REFUSED,
                now=now,
                parties=(member, *others),
                report=report,
                token=token,
                reason=reason.value,
            )

    def audit_point(self, seq: int) -> bytes | None:
        """The chain head after entry ``seq`` (GENESIS for 0), or None past the end."""
        if seq == 0:
            return GENESIS
        self._audit_read()
        row = self._seen(self._sql("SELECT head FROM audit WHERE seq = ?", (seq,)).fetchone())
        return None if row is None else bytes(row[0])

    def audit_entries(self, after: int, *, limit: int) -> list[tuple[AuditEntry, bytes, bytes]]:
        """Up to ``limit`` entries after ``after``: (entry, content hash, head after it)."""
        self._audit_read()
        rows = self._seen(
            self._sql(
                "SELECT entry, content, head FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, self._sql_limit(limit)),
            ).fetchall()
        )
        return [(AuditEntry.decode(bytes(r[0])), bytes(r[1]), bytes(r[2])) for r in rows]

    def audit_entry_sizes(self, after: int, *, limit: int) -> list[int]:
        """The encoded sizes of up to ``limit`` entries after ``after``."""
        self._audit_read()
        rows = self._sql(
            "SELECT length(entry) FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, self._sql_limit(limit)),
        ).fetchall()
        return [int(r[0]) for r in rows]

    # --- expiry ------------------------------------------------------------------------

    def expire(self, *, now: int, clock_skew: int) -> set[str]:
        """Expire deliveries whose token ran out and held reports past their time;
        delete ciphertexts no delivery needs any more. Each expiry is logged and
        queued as a notice to the originator (in the order the tokens were released,
        then the reports stored).

        Returns:
            The members that got a notice (to wake their connections).
        """
        self._queues_changed()
        notified: set[str] = set()
        deleted: list[bytes] = []
        with self._transaction():
            expired_tokens = [
                token_row(row)
                for row in self._sql(
                    "UPDATE tokens SET state = 'expired', token = ?"
                    f" WHERE id IN (SELECT id FROM tokens WHERE {OWED} AND not_after <= ?"
                    f"{self._SKIP_LOCKED}) RETURNING {TOKEN_COLUMNS}",
                    (b"", now - clock_skew),
                ).fetchall()
            ]
            for token in sorted(expired_tokens, key=lambda t: t.seq):
                self._notice(token.originator, "expired", token.report, token.id)
                notified.add(token.originator)
                self._audit(
                    AuditEvent.EXPIRED,
                    now=now,
                    parties=(token.originator, token.recipient),
                    report=token.report,
                    token=token.id,
                )
            for row in self._sql(
                "SELECT id, originator, state FROM reports"
                " WHERE state IN ('held', 'released') AND expires <= ? ORDER BY stored_at, id"
                f"{self._SKIP_LOCKED}",
                (now,),
            ).fetchall():
                report_id, originator, state = bytes(row[0]), str(row[1]), str(row[2])
                if state == "released":
                    busy = self._sql(
                        f"SELECT 1 FROM tokens WHERE report = ? AND {OWED} LIMIT 1", (report_id,)
                    ).fetchone()
                    if busy is None:
                        self._delete_ciphertext(report_id, "done")
                        deleted.append(report_id)
                    continue
                self._delete_ciphertext(report_id, "expired")
                deleted.append(report_id)
                self._notice(originator, "expired", report_id, None)
                notified.add(originator)
                self._audit(AuditEvent.EXPIRED, now=now, parties=(originator,), report=report_id)
            # Consumed token ids are kept until no token with that id could still be
            # valid (not_after + the longest validity), so a replay is always caught.
            # The newest row stays whatever its state: a new token's seq is then past
            # every seq given before (SQLite: the largest rowid plus one), so a pusher
            # reading on from the last seq it sent misses none.
            self._sql(
                "DELETE FROM tokens WHERE keep_until < ? AND state NOT IN (?, ?)"
                " AND seq < (SELECT max(seq) FROM tokens)",
                (now, *OUTSTANDING),
            )
            self._prune_consent(now=now, clock_skew=clock_skew)
            # A prekey is kept while a token naming it could still arrive (it is used
            # before its not_after, by a token valid at most MAX_VALIDITY), so a replayed
            # one-time prekey is caught as long as it matters.
            self._sql("DELETE FROM prekeys WHERE not_after + ? < ?", (MAX_VALIDITY, now))
            self._prune_prekey_rate(now=now)
        self._ciphertexts_deleted(deleted)
        return notified
