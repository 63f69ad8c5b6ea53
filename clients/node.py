"""The member node: a trio client of the relay with a durable outbox, inbox and seen-set.

::

    async with open_node(secret, "seoul", arrangement, ("127.0.0.1", port), path) as node:
        report_id = await node.submit(b"...", recipients=["tokyo"], scope="nk.missile",
                                      level="secret", release_to=["tokyo"])
        await node.wait_stored(report_id)
        async for event in node.events():
            ...

The node keeps one connection to the relay in a background task and reconnects with
capped exponential backoff and jitter. Every call that changes state writes to the store
(:mod:`clients.store`) first and then wakes the connection's sender, so what the
application asked for goes out on the next connection even after a crash: queued
submissions are resent (the relay answers a resubmission with the same digest
``stored`` again), pending releases and revocations are resent, receipts not yet sent
are sent. Incoming messages are handled by the connection's receiver; see
``docs/node-protocol.md`` for the session protocol.

A submission the relay has not stored can be taken back (:meth:`Node.withdraw`): it
stays in the outbox, sealed, and nothing of it or its releases is sent until
:meth:`Node.resume` (or it is deleted, :meth:`Node.drop`); ``tisa send`` does this when
it is interrupted, so an aborted send never reaches the relay behind the user's back.

Delivery is at-least-once on the wire and deduplicated at the node: a delivered report
is verified, stored in the inbox together with its token and report id in the seen-set
(one transaction), acknowledged to the relay only after that commit, and handed to
:meth:`Node.reports` from the inbox. A redelivery of a stored report (lost ack, relay
restart) is acknowledged again and never stored twice. The application acknowledges
each report it has taken with :meth:`Node.ack`; a report it has not acknowledged is
handed over again by the next ``reports()`` loop, also after a crash::

    async for report in node.reports():
        record(report)           # the application's own effect
        await node.ack(report)   # durable: this report never comes again

Group commit: the store runs each change as a step of one open transaction (see
:mod:`clients.store`) and nothing that depends on a change leaves the node before the
commit that holds it: the connection's replier sends acks only then, the sender waits
before each submission, release, revocation or receipt, the feeds before handing
anything to the application, and calls that change state before returning. Whoever
waits first commits once no task has more work at hand (:meth:`Node._durable`), so a
burst of deliveries or answers costs one fsync.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pathlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import IO, Any, BinaryIO, cast

import trio

from clients import store as rows
from clients.events import (
    AnnouncementEvent,
    ApprovedEvent,
    ConsentRejected,
    DeliveredReport,
    DeliveryRejected,
    DeniedEvent,
    Event,
    ExpiredEvent,
    PrekeysLow,
    ReceiptEvent,
    RefusedEvent,
    Released,
    ReleaseGap,
    RequestEvent,
    RevokedEvent,
    Stored,
    WeakerWrap,
    decode_event,
)
from clients.prekeypool import PrekeyPool, bundles_of
from clients.store import (
    InboxEntry,
    MemberStore,
    RequestRecord,
    Submission,
    WantedRelease,
    fsync_dir,
)
from tisa import messages as m
from tisa.arrangement import Arrangement, Role
from tisa.audit import GENESIS, AuditEntry, Checkpoint, Extract, chain_next, verify_extract
from tisa.consent import (
    MAX_REQUEST_VALIDITY,
    Announcement,
    Answer,
    Request,
    check_answer,
    check_approval,
    check_incoming_request,
    consent_ref,
)
from tisa.errors import (
    ProtocolError,
    Reason,
    Refused,
    RemoteError,
    TisaError,
    UsageError,
    VerificationError,
)
from tisa.handshake import STREAM_OVERHEAD
from tisa.keys import MemberSecret, random_id
from tisa.limits import (
    CHUNK_SIZE,
    DEFAULT_LIMITS,
    MAX_INLINE_CIPHERTEXT,
    MAX_INLINE_TOKENS,
    Limits,
)
from tisa.messages import MAX_CHUNK_DATA
from tisa.prekeys import PrekeyKind, PrekeySecret, WrapMode
from tisa.receipt import Receipt, StoredAck
from tisa.report import ReportOpener, ReportSealer
from tisa.token import MAX_VALIDITY, ReleaseToken, check_for_recipient, issue_token
from tisa_io import trace
from tisa_io.durable import GroupCommitter
from tisa_io.link import Link, LinkClosed, connect_member

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_HOLD_FOR",
    "DEFAULT_REQUEST_VALID_FOR",
    "DEFAULT_VALID_FOR",
    "Backoff",
    "Node",
    "open_node",
]

# How long the relay may hold a report nobody has been released to yet: a week, long
# enough for a "hold, then approve" decision over a weekend; the relay caps it anyway.
DEFAULT_HOLD_FOR = 7 * 24 * 3600.0
# How long a release token is valid: a day covers a recipient that is offline overnight;
# the relay expires the pending delivery (and tells the originator) after that.
DEFAULT_VALID_FOR = 24 * 3600.0
# How long a release request stays open: a week, like a held report, for an originator
# whose decision takes a round of consultations.
DEFAULT_REQUEST_VALID_FOR = 7 * 24 * 3600.0
# Bodies and attachments up to this size are handed to the application as bytes; larger
# ones as the path of their inbox file, so a report of any size needs constant memory.
INLINE_MAX = 1024 * 1024
# Events buffered in memory for the application; beyond this the pump waits (the store
# keeps the rest; see Node.events).
EVENT_BUFFER = 64
# Inbox rows Node.reports reads per query: a few bodies of at most INLINE_MAX each in
# memory at a time, and one query (and one wait for the disk) per 16 reports.
REPORT_BUFFER = 16
# Refusals (with an empty ref) the relay answers an audit_fetch with: past the end of
# its log, or too many extracts queued (docs/protocol.md sections 12.3 and 14.2).
_AUDIT_REFUSALS = frozenset({Reason.MALFORMED.value, Reason.BUSY.value})
# Extracts fetched by one fetch_audit call. A relay cuts each extract at ~2,000 entries,
# so this covers 100,000 new entries; a member further behind calls again.
MAX_AUDIT_ROUNDS = 50
# How long Node.withdraw waits for the relay's answer to a submission whose last byte
# already went out: one round trip and a commit at the relay, with room for a slow link.
WITHDRAW_GRACE = 5.0
# Seconds between two looks at the node's prekeys (rotate the signed prekey, delete
# secrets past their grace) while connected; rotation is counted in days, so an hour
# late is harmless.
PREKEY_CHECK_INTERVAL = 3600.0
# First pause before asking the relay again for a recipient's prekeys it has not got
# (doubling up to a second, within Limits.prekey_wait).
PREKEY_RETRY = 0.05


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Reconnection delays: ``initial`` seconds, times ``factor`` per failure, at most
    ``maximum``; each delay is scaled by a random factor in ``[1 - jitter, 1]`` so that
    members cut off together do not all return in the same instant."""

    initial: float = 0.05
    factor: float = 2.0
    maximum: float = 10.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum and self.factor >= 1 and 0 <= self.jitter < 1):
            raise UsageError("backoff: 0 < initial <= maximum, factor >= 1, 0 <= jitter < 1")


# Start fast (a relay restart is over in well under a second), cap at ten seconds so a
# relay that is down for long is not hammered, and never waits long once it is back.
DEFAULT_BACKOFF = Backoff()

# What one connection may fail with; all of them mean "reconnect".
_LINK_FAILURES = (LinkClosed, ProtocolError, VerificationError, OSError, trio.BrokenResourceError)


class _SessionOver(Exception):
    """The connection a request was sent on ended before the answer came."""


@dataclasses.dataclass(slots=True)
class _Session:
    link: Link
    over: trio.Event
    # The extract (or the relay's refusal) for the audit_fetch in flight, if any.
    audit_replies: trio.MemorySendChannel[bytes | Refused]
    audit_waiting: bool = False
    # Acks waiting for the commit of what they confirm: (batch, message, lazy); a lazy
    # one does not force a commit of its own (see Node._reply).
    replies: collections.deque[tuple[int, m.Message, bool]] = dataclasses.field(
        default_factory=collections.deque
    )
    replies_changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    # Acks in ``replies`` that are not lazy, and the replier's event while it waits
    # lazily (set when one of those is queued).
    urgent_replies: int = 0
    lazy_wake: trio.Event | None = None
    # Token ids of the deliveries whose receipt this connection queued as their ack
    # (protocol version 4) before the sender's once-per-connection resend of the
    # receipts not yet confirmed, which leaves these out (None once it ran: a receipt
    # stored later goes out only as its delivery's ack, so nothing more is kept).
    receipts_sent: set[bytes] | None = dataclasses.field(default_factory=set)
    # Prekey fetches waiting for their answer (a Prekeys or a Refusal), by ref.
    prekey_waiters: dict[bytes, _PrekeyAnswers] = dataclasses.field(default_factory=dict)
    # The relay's latest word on this member's own prekeys, and a wake-up for the keeper.
    prekey_status: m.PrekeyStatus | None = None
    prekey_changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    # One-time prekeys published on this connection and not yet seen stored: the size
    # of each publish message not yet accounted for, oldest first (see _PrekeysInFlight).
    prekeys_in_flight: _PrekeysInFlight = dataclasses.field(
        default_factory=lambda: _PrekeysInFlight()
    )
    # Messages read from the link ahead of the one being handled, or the error that
    # ended reading, each with the bytes it holds (see _reader): at most
    # Limits.read_ahead of them, and reading stops at Limits.read_ahead_bytes in all.
    ahead: collections.deque[tuple[m.Message | Exception, int]] = dataclasses.field(
        default_factory=collections.deque
    )
    ahead_bytes: int = 0
    # The handler pauses for the reader when it takes a message after this trio time;
    # read counts the messages the reader read (the pause lasts while it grows).
    pause_at: float = 0.0
    read: int = 0
    ahead_changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    # The session's nursery scope: cancelling it closes the connection.
    scope: trio.CancelScope | None = None

    def changed(self) -> None:
        self.replies_changed.set()
        self.replies_changed = trio.Event()

    def ahead_moved(self) -> None:
        self.ahead_changed.set()
        self.ahead_changed = trio.Event()


class _PrekeyAnswers:
    """The answers to one write of prekey fetches, by the index of each bundle asked
    for (see Node._ask_prekeys; a fetch asks for the bundles of one or more indexes):
    ``done`` is set once every one came, or the session ended. A plain object and one
    event, not a channel and a nursery of two tasks per fetch."""

    __slots__ = ("answers", "done", "purpose", "refs")

    def __init__(
        self, refs: dict[bytes, list[int]], answers: dict[int, m.Message], purpose: str
    ) -> None:
        self.refs = refs
        self.answers = answers
        self.purpose = purpose  # counted in Node.prekey_counts
        self.done = trio.Event()

    def put(self, ref: bytes, answer: m.Message) -> None:
        entries = self.refs[ref]
        for n, bundle in zip(entries, bundles_of(answer, len(entries)), strict=True):
            self.answers[n] = bundle
        if all(n in self.answers for entries in self.refs.values() for n in entries):
            self.done.set()


def _fetch_groups(entries: list[int], recipients: list[str], grouped: bool) -> list[list[int]]:
    """The fetches that ask for ``entries`` (indexes into ``recipients``), each a list of
    the entries it answers: one each, or (``grouped``) those of one recipient together,
    at most MAX_PREKEY_BUNDLES a fetch."""
    if not grouped:
        return [[n] for n in entries]
    by_recipient: dict[str, list[list[int]]] = {}
    for n in entries:
        groups = by_recipient.setdefault(recipients[n], [[]])
        if len(groups[-1]) == m.MAX_PREKEY_BUNDLES:
            groups.append([])
        groups[-1].append(n)
    return [group for groups in by_recipient.values() for group in groups]


@dataclasses.dataclass(slots=True)
class _PrekeysInFlight:
    """The one-time prekeys a node published on one connection that the relay's
    statuses have not yet shown stored, so that a top-up counts what is already on its
    way (several statuses arrive while a top-up of several messages travels, each
    counting only part of it).

    The relay stores each publish message whole, in the order sent, and only a store
    raises its count (handouts and expiry lower it). So a status counting more than the
    status before it proves that the oldest message not yet accounted for was stored,
    and with it as many of the following ones as the rise needs (a rise of 150 proves
    two messages of 100). A status counting no more proves nothing: the sizes stay, and
    the node's estimate of its supply (:meth:`supply`) never counts a message twice, so
    a top-up never takes the supply past ``Limits.one_time_prekeys``. A refused publish
    (a refusal with no ``ref``) takes the oldest message off; the keeper's hourly look
    with no status in between, and a new connection, start afresh.
    """

    sizes: collections.deque[int] = dataclasses.field(default_factory=collections.deque)
    # The count of the last status seen (None: none yet on this connection).
    last: int | None = None

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def sent(self, sizes: Iterable[int]) -> None:
        self.sizes.extend(size for size in sizes if size)

    def status(self, one_time: int) -> None:
        """Account for a status counting ``one_time`` (in the order they arrive)."""
        rise = one_time - self.last if self.last is not None else 0
        self.last = one_time
        proven = 0
        while self.sizes and rise > proven:
            proven += self.sizes.popleft()

    def refused(self) -> None:
        if self.sizes:
            self.sizes.popleft()

    def clear(self) -> None:
        self.sizes.clear()

    def supply(self, one_time: int) -> int:
        """The relay's count ``one_time`` plus what is on its way to it."""
        return one_time + self.total


# Seconds of handling after which the receiver pauses for the reader (see _next_message):
# about what handling one 64 KiB read of small deliveries took before the reader was
# separate (so tasks woken by handled messages still work in batches), and short
# beside a top-up's round trip.
READ_AHEAD_PAUSE = 0.025

# Acks queued on one connection before the receiver waits for the replier.
MAX_QUEUED_REPLIES = 1024

# Kinds of rows the sender never sends (clients.store): a write of only these does not
# wake it (see Node._wait_change). The inbox's (a report stored, its receipt) it reads
# only at a connection's start, in its first pass: a report stored while the connection
# is up sends its receipt as its delivery's ack (Node._on_deliver).
_NOT_SENT = (rows.EVENTS, rows.WANTED, rows.WAITING, rows.INBOX)


class Node:
    """A member's node. Made by :func:`open_node`; not constructed directly.

    Attributes:
        name: this member's name in the arrangement.
        store: the durable state (:class:`clients.store.MemberStore`).
    """

    def __init__(
        self,
        *,
        secret: MemberSecret,
        name: str,
        arrangement: Arrangement,
        relay_addr: tuple[str, int] | Sequence[tuple[str, int]],
        store: MemberStore,
        limits: Limits,
        clock: Callable[[], float],
        backoff: Backoff,
    ) -> None:
        self._secret = secret
        self.name = name
        self._arrangement = arrangement
        # Relay processes serving the arrangement, tried in turn (see _run).
        self._relay_addrs = relay_addresses(relay_addr)
        self.store = store
        self._limits = limits
        self._clock = clock
        self._backoff = backoff
        self._changed = trio.Event()
        # Tasks that act only on some kinds of rows (see _wait_change), each with its
        # count of their changes when it last looked: woken by the _notify after such a
        # change, not by every other one.
        self._change_waiters: dict[trio.Event, tuple[Callable[[], int], int]] = {}
        # Calls waiting for releases to be issued (see _wait_issued), by wanted release
        # id: the issuer wakes the one whose release it ended, _notify all of them when
        # the connection ends or a report's final state ended some (the store's
        # wanted_ended moved) -- not every call on every message, each with a query.
        self._wanted_waiters: dict[int, trio.Event] = {}
        self._wanted_seen = store.wanted_ended
        self._session: _Session | None = None
        self._connected = trio.Event()
        self._audit_lock = trio.Lock()
        self._prekey_lock = trio.Lock()  # one maintain_prekeys at a time
        self._event_send, self._event_recv = trio.open_memory_channel[tuple[int, Event]](
            EVENT_BUFFER
        )
        # Commits the store's batches; every message handled counts as activity.
        self._group_commit = GroupCommitter(store)
        # Reports whose submission is going out on the current connection, and those
        # whose last byte went out on some connection of this process (see withdraw).
        self._uploading: set[bytes] = set()
        self._uploaded: set[bytes] = set()
        self._withdrawals = 0  # counts withdraw() calls; the sender checks on a change
        self._upload_changed = trio.Event()  # set when _uploading or _uploaded change
        # Deliveries being received: token id -> (bytes received, size, originator);
        # see wait_receiving.
        self.receiving: dict[bytes, tuple[int, int, str]] = {}
        self._receiving_changed = trio.Event()
        # Why the last connection attempt failed (None once connected); attempts counts
        # failed attempts, so a caller can wait for the next one.
        self.connect_error: BaseException | None = None
        self._attempted = trio.Event()
        # Prekey bundles fetched ahead for connected submits (see clients.prekeypool),
        # refilled by the session's _pool_keeper, woken by _pool_changed.
        self.prekey_pool = PrekeyPool(
            size=int(limits.prekey_pool),
            recipients=int(limits.prekey_pool_recipients),
            margin=int(limits.clock_skew),
        )
        self._pool_changed = trio.Event()
        # What became of the prekey fetches this node sent and the one-time prekeys the
        # relay handed it (docs/node-protocol.md, "Where the one-time prekeys go"), per
        # path (submit: a connected submit's direct fetch; pool: the pool keeper's
        # refills; issuer: the issuer's batches; issue, retry: one release's fetch and
        # its retries while the recipient has published nothing): fetch_<path> fetches
        # sent, asked_<path> the bundles they asked for (a pool refill asks for several
        # in one fetch), received_<path> one-time prekeys they brought; used: tokens issued with
        # one; returned: ones not used for the token they were fetched or taken for
        # (its submission not recorded, its release ended during the fetch) and put
        # back into the pool; dropped_unused: such ones the pool did not take (none for
        # the recipient, full, or stale); lost_unanswered, lost_late: ones whose fetch
        # gave up when the connection ended (answered before, or after). Handed out =
        # used + held in the pool + the pool's drops (stale bundles, prekey_pool.dropped)
        # + dropped_unused + lost.
        self.prekey_counts: collections.Counter[str] = collections.Counter()

    # --- small helpers ---------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _notify(self) -> None:
        """Wake everyone waiting on a state change (sender, pumps, awaited calls)."""
        self._changed.set()
        self._changed = trio.Event()
        if self._change_waiters:
            for event, (count, seen) in list(self._change_waiters.items()):
                if count() != seen:
                    del self._change_waiters[event]
                    event.set()
        if self._wanted_waiters and (
            self.store.wanted_ended != self._wanted_seen or self._session is None
        ):
            self._wanted_seen = self.store.wanted_ended
            for event in self._wanted_waiters.values():
                event.set()

    async def _wait_change(self, count: Callable[[], int], seen: int) -> None:
        """Return once ``count()`` (a count of writes of some kinds of rows, from the
        store's ``kind_changes``) is no longer ``seen``: at once, or at the first
        :meth:`_notify` after such a write. A task that acts only on some kinds of rows
        waits here instead of on every state change (each one a task switch and a pass
        that finds nothing to do: several per report)."""
        if count() != seen:
            return
        event = trio.Event()
        self._change_waiters[event] = (count, seen)
        try:
            await event.wait()
        finally:
            self._change_waiters.pop(event, None)

    async def _durable(self, barrier: int | None = None) -> None:
        """Return once batch ``barrier`` (default: the current state) is committed and
        on disk; see :meth:`tisa_io.durable.GroupCommitter.durable`.

        Raises:
            OSError / sqlite3.Error: the commit or the WAL fsync failed (the batch is
                rolled back, or the store poisoned).
            LinkClosed: the batch was lost in another task's failed commit.
        """
        await self._group_commit.durable(self.store.barrier if barrier is None else barrier)

    def _reply(self, session: _Session, message: m.Message, *, lazy: bool = False) -> None:
        """Queue an ack, sent once the batch it confirms is on disk. ``lazy``: nobody
        waits on it urgently (the ack of a receipt): it forces no commit of its own and
        goes out with the next one, within BACKGROUND_COMMIT_DELAY; one not lazy queued
        behind has the replier commit at once (acks go out in order)."""
        session.replies.append((self.store.barrier, message, lazy))
        if not lazy:
            session.urgent_replies += 1
            if session.lazy_wake is not None:
                session.lazy_wake.set()
        session.changed()

    async def _replier(self, session: _Session) -> None:
        while True:
            while not session.replies:
                await session.replies_changed.wait()
            barrier = session.replies[0][0]
            if session.urgent_replies or len(session.replies) >= MAX_QUEUED_REPLIES:
                await self._durable(barrier)
            else:
                session.lazy_wake = trio.Event()
                try:
                    if not await self._group_commit.durable_lazily(barrier, session.lazy_wake):
                        continue  # woken: look again
                finally:
                    session.lazy_wake = None
            ready: list[m.Message] = []
            while session.replies and session.replies[0][0] <= self.store.committed:
                _, message, lazy = session.replies.popleft()
                session.urgent_replies -= not lazy
                ready.append(message)
            await session.link.send_many(_receipt_acks_merged(ready))
            session.changed()

    @property
    def connected(self) -> bool:
        """True while a connection to the relay is up (handshake done)."""
        return self._session is not None

    async def wait_connected(self) -> None:
        """Wait until a connection to the relay is up."""
        while self._session is None:
            await self._connected.wait()

    async def wait_receiving(self) -> None:
        """Wait until :attr:`receiving` changes (a delivery starts, progresses by a
        chunk, or ends): for a progress display."""
        await self._receiving_changed.wait()

    def _set_receiving(self, token: ReleaseToken, received: int | None) -> None:
        if received is None:
            self.receiving.pop(token.id, None)
        else:
            self.receiving[token.id] = (received, token.size, token.originator)
        self._receiving_changed.set()
        self._receiving_changed = trio.Event()

    async def wait_connect_attempt(self) -> BaseException | None:
        """Wait until a connection is up (returns None) or the next attempt failed
        (returns its error: an :class:`OSError` such as a refused connection, a
        :class:`~tisa.errors.Refused` from the relay's handshake, ...). The node keeps
        trying in the background either way."""
        if self._session is not None:
            return None
        if self.connect_error is not None:  # the last attempt failed already
            return self.connect_error
        attempted = self._attempted
        async with trio.open_nursery() as nursery:

            async def connected() -> None:
                await self.wait_connected()
                nursery.cancel_scope.cancel()

            async def failed() -> None:
                await attempted.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(connected)
            nursery.start_soon(failed)
        return None if self._session is not None else self.connect_error

    # --- originator: submit, release, revoke -----------------------------------------

    async def submit(
        self,
        body: bytes | os.PathLike[str],
        *,
        recipients: Iterable[str],
        scope: str,
        level: str,
        attachments: Sequence[tuple[str, bytes | os.PathLike[str]]] = (),
        release_to: Iterable[str] = (),
        hold_for: float = DEFAULT_HOLD_FOR,
        valid_for: float = DEFAULT_VALID_FOR,
        progress: Callable[[int, int], None] | None = None,
    ) -> bytes:
        """Seal a report into the outbox; it goes to the relay now or on reconnection.

        The arrangement is checked before anything is written. The report is sealed in a
        worker thread, streaming from ``body`` (bytes or a file path) and the attachments
        to a ciphertext file in the outbox in constant memory; the file is fsynced and
        the submission recorded before this returns. A small report (at most
        ``limits.max_inline_report`` bytes sealed) given as bytes is sealed in the trio
        thread and kept in its outbox row. A release is recorded for every name in
        ``release_to`` (the others wait for :meth:`release`); its token is issued once
        the relay hands out that recipient's prekeys: before this returns when connected
        (a refusal, e.g. ``no_prekey``, comes as a :class:`~clients.events.RefusedEvent`),
        else on the next connection. When connected, the prekeys are taken from the
        prekey pool (``limits.prekey_pool`` bundles per recipient fetched ahead, see
        :mod:`clients.prekeypool`) or else fetched before the submission is recorded, so
        that a small report and its tokens leave in one ``submit_inline`` message.

        Args:
            body: the report body, as bytes or the path of a file to stream.
            recipients: every member the report is sealed for (signed into it).
            scope, level: as listed in the arrangement.
            attachments: ``(name, bytes or path)`` pairs, in order.
            release_to: recipients to release to at once (a subset of ``recipients``).
            hold_for: seconds the relay may hold the report before it expires unreleased.
            valid_for: validity of the tokens issued for ``release_to``, in seconds.
            progress: called in the trio thread as ``progress(done, total)`` content
                bytes while sealing.

        Returns:
            The report id.

        Raises:
            Refused: the arrangement does not allow this share (``not_a_member``,
                ``wrong_role``, ``wrong_recipient``, ``out_of_scope``,
                ``level_not_allowed``); nothing was written or sent.
            UsageError: bad arguments (a ``release_to`` name not among the recipients,
                a file that changed size while being read, sizes, names).
            LimitExceeded: the sealed report would exceed ``limits.max_report_size``.
            OSError: a file could not be read or the outbox written.

        Cancellation: sealing runs to its end in its thread; a submission cancelled
        before it was recorded leaves no trace (its partial file is removed on restart).
        """
        if trace.enabled:
            trace.begin("S0")
        recipients = tuple(sorted(set(recipients), key=str.encode))
        self._arrangement.check_share(self.name, recipients, scope, level)
        release_to = tuple(dict.fromkeys(release_to))
        for recipient in release_to:
            if recipient not in recipients:
                raise UsageError(f"release_to names {recipient!r}, who is not a recipient")
        _check_window(hold_for, "hold_for", None)
        _check_window(valid_for, "valid_for", MAX_VALIDITY)
        parts: list[bytes | pathlib.Path] = [_part(body)]
        names: list[str] = []
        for attachment_name, data in attachments:
            names.append(attachment_name)
            parts.append(_part(data))
        sizes = [len(p) if isinstance(p, bytes) else p.stat().st_size for p in parts]
        now = self._now()
        sealer = ReportSealer(
            self._secret,
            self.name,
            self._arrangement,
            recipients=recipients,
            scope=scope,
            level=level,
            body_size=sizes[0],
            attachments=list(zip(names, sizes[1:], strict=True)),
            now=now,
            max_report_size=self._limits.max_report_size,
        )
        inline: bytes | None = None
        if sealer.size <= self._limits.max_inline_report:
            # Small: sealed in memory, kept in the outbox row (no file, no fsync but the
            # commit's).
            buffer = io.BytesIO()
            if all(isinstance(part, bytes) for part in parts):
                # At most one chunk of bytes in memory: sealed here, without the round
                # trip to a worker thread (which costs more than the sealing).
                _seal_to(sealer, parts, buffer, progress, sum(sizes), False, in_trio=True)
            else:
                await trio.to_thread.run_sync(
                    _seal_to, sealer, parts, buffer, progress, sum(sizes), False
                )
            inline, file_name = buffer.getvalue(), ""
        else:
            file_name = sealer.report_id.hex() + ".sealed"
            staged = self.store.tmp_dir / file_name
            await trio.to_thread.run_sync(
                _seal_to_file, sealer, parts, staged, progress, sum(sizes)
            )
            os.replace(staged, self.store.outbox_dir / file_name)
            fsync_dir(self.store.outbox_dir)
        # Connected: the recipients' prekeys first (from the pool, else fetched), so the
        # tokens are issued in the same batch as the submission and travel with it (one
        # message for a small report).
        if trace.enabled:
            trace.mark("S_sealed", sealer.report_id)
        prekeys = await self._prefetch_prekeys(release_to) if self.connected else {}
        if trace.enabled:
            trace.mark("S_pre", sealer.report_id)
        try:
            submission = self.store.record_submission(
                data=inline,
                report=sealer.report_id,
                file=file_name,
                size=sealer.size,
                digest=sealer.digest,
                content_key=sealer.content_key,
                scope=scope,
                level=level,
                recipients=recipients,
                expires=now + int(hold_for),
                created=now,
            )
        except BaseException:
            # Nothing recorded: the bundles fetched or taken for its tokens back to the
            # pool, so their one-time prekeys are not handed out for nothing.
            for recipient, answer in prekeys.items():
                self._put_back(recipient, answer)
            raise
        # The submission and the releases asked for are known here: neither is read back.
        wanted = [
            self.store.want_release(submission.report, r, int(valid_for), issued_here=r in prekeys)
            for r in release_to
        ]
        waiting: list[int] = []
        for wanted_id, recipient in zip(wanted, release_to, strict=True):
            if recipient in prekeys:
                # No checkpoint from want_release to here: the issuer cannot take it
                # meanwhile, and _issue ends it (issued or refused) before it returns;
                # so the issuer is not told of it (unless _issue is cut short).
                wanted_release = WantedRelease(
                    id=wanted_id,
                    report=submission.report,
                    recipient=recipient,
                    valid_for=int(valid_for),
                    state="waiting",
                    token=None,
                    reason=None,
                    detail=None,
                )
                try:
                    await self._issue(wanted_release, prekeys[recipient], submission)
                except BaseException:
                    self.store.waiting_added()
                    self._notify()
                    raise
            else:
                waiting.append(wanted_id)
        if trace.enabled:
            trace.mark("S_issued", sealer.report_id)
        # The sender is told first: it waits for the same commit, then sends at once.
        self._notify()
        await self._durable()
        if trace.enabled:
            trace.mark("S_durable", sealer.report_id)
        # While connected, the tokens are issued at once (one prekey fetch each) and go
        # out right behind the submission; offline, on the next connection.
        await self._wait_issued(waiting)
        if wanted:
            # Their ends (issued, refused) on disk: the last batch that ended a release
            # request, not one opened since by unrelated steps.
            await self._durable(self.store.batch_of(rows.WANTED))
        if trace.enabled:
            trace.mark("S_ret", sealer.report_id)
        return sealer.report_id

    async def _wait_issued(self, wanted: list[int]) -> None:
        """Return once none of the releases ``wanted`` waits for its token any more
        (issued or refused), or no connection is up (the next one issues them)."""
        while self.connected:
            waiting = [
                i
                for i in wanted
                if (w := self.store.wanted_release(i)) is not None and w.state == "waiting"
            ]
            if not waiting:
                return
            event = trio.Event()
            for i in waiting:
                self._wanted_waiters[i] = event
            try:
                await event.wait()
            finally:
                for i in waiting:
                    if self._wanted_waiters.get(i) is event:
                        del self._wanted_waiters[i]

    async def wait_stored(self, report_id: bytes) -> StoredAck:
        """Wait until the relay has acknowledged storing ``report_id``.

        Returns:
            The relay's signed, verified acknowledgement.

        Raises:
            Refused: the relay refused the submission (its reason), or the report was
                revoked (``revoked``) or expired (``expired``) before it was stored.
            UsageError: this node never submitted ``report_id``.
        """
        while True:
            changed = self._changed
            submission = self._submission(report_id)
            if submission.ack is not None:  # stored (and perhaps expired or revoked since)
                # The batch that recorded it (or a later state of any submission).
                await self._durable(self.store.batch_of(rows.OUTBOX_STATE, rows.STORED))
                return StoredAck.verify(submission.ack, self._arrangement)
            if submission.state != "queued":
                raise _final_refusal(submission.state, submission.reason, submission.detail)
            await changed.wait()

    async def release(
        self, report_id: bytes, recipient: str, *, valid_for: float = DEFAULT_VALID_FOR
    ) -> bytes:
        """Issue a release token for ``recipient`` and wait until the relay accepts it.

        The token's counter is taken and the token recorded durably before it is sent;
        it is sent right behind the report's submission (or at once if the relay has
        stored the report already), on this connection or the next.

        Args:
            report_id: a report this node submitted.
            recipient: one of the report's recipients.
            valid_for: seconds the token stays valid (at most 30 days).

        Returns:
            The token id.

        Raises:
            Refused: refused here (``wrong_recipient``, ``duplicate`` when a token for
                this recipient is pending or was accepted already, or what the
                arrangement says) or
                by the relay (``expired``, ``unknown_report``, ``queue_full``, ...), or
                the report was refused, revoked or expired first.
            UsageError: an unknown report or a bad ``valid_for``.

        Cancellation: the token stays queued and is still sent; use :meth:`revoke` to
        withdraw it.
        """
        _check_window(valid_for, "valid_for", MAX_VALIDITY)
        for earlier in self.store.releases_of(report_id):
            if earlier.recipient == recipient and earlier.state in ("pending", "released"):
                # A second token would only make the relay forward it again, and the
                # recipient refuse it (replayed): refused here, with nothing sent.
                raise Refused(
                    Reason.DUPLICATE,
                    f"already released to {recipient} (token {earlier.token.hex()}, "
                    f"{earlier.state})",
                )
        for waiting in self.store.waiting_releases():
            if (waiting.report, waiting.recipient) == (report_id, recipient):
                raise Refused(
                    Reason.DUPLICATE, f"a release to {recipient} is already waiting for its token"
                )
        wanted_id = self._want(report_id, recipient, valid_for)
        return await self._await_release(wanted_id)

    async def _await_release(self, wanted_id: int) -> bytes:
        """Wait until the release ``wanted_id`` is issued and the relay accepts its token
        (returns the token id), or raise the refusal that ended it."""
        # The issuer is told first: it fetches the recipient's prekeys, issues the
        # token (its counter and the token commit together), and the sender sends it.
        self._notify()
        await self._durable()
        while True:
            changed = self._changed
            wanted = self.store.wanted_release(wanted_id)
            assert wanted is not None
            if wanted.state == "refused":
                raise Refused(Reason(wanted.reason or "internal"), wanted.detail or "")
            if wanted.token is not None:
                token_id = wanted.token
                break
            await changed.wait()
        await self._durable()
        while True:
            changed = self._changed
            pending = self.store.release(token_id)
            assert pending is not None
            if pending.state == "released":
                await self._durable()
                return token_id
            if pending.state != "pending":
                raise _final_refusal(pending.state, pending.reason, pending.detail)
            await changed.wait()

    def _want(
        self,
        report_id: bytes,
        recipient: str,
        valid_for: float,
        *,
        approves: bytes | None = None,
    ) -> int:
        """Check a release and record it, to be issued once ``recipient``'s prekeys are
        in (:meth:`_issuer`); returns the request's id. ``approves``: the id of the
        incoming release request the token is to approve (:meth:`approve`)."""
        submission = self._submission(report_id)
        if submission.state not in ("queued", "stored"):
            raise _final_refusal(submission.state, submission.reason, submission.detail)
        if recipient not in submission.recipients:
            raise Refused(Reason.WRONG_RECIPIENT, f"{recipient!r} is not a recipient of it")
        return self.store.want_release(report_id, recipient, int(valid_for), approves=approves)

    async def _issuer(self, session: _Session) -> None:
        """Issue the releases asked for, in order, each once its recipient's prekeys
        came from the relay (on this connection; the next one resumes what is left).

        The prekeys for up to ``limits.max_prekey_fetches`` releases are asked for in
        one write (the relay answers them from one commit), then those tokens are
        issued in order: one round trip per batch instead of one per token.
        """
        changes = self.store.kind_changes

        def waiting_added() -> int:
            return changes[rows.WAITING]

        looked = -1  # the count of release requests added when last found none waiting
        while True:
            if changes[rows.WAITING] != looked:
                added = changes[rows.WAITING]
                while batch := self.store.waiting_releases(self._limits.max_prekey_fetches):
                    await self._issue_batch(batch)
                    self._group_commit.mark_dirty()
                    self._notify()
                    added = changes[rows.WAITING]
                # None waiting now, and none added since `added` was counted.
                looked = added
            # Woken only by the _notify after a release request was added (or a lost
            # batch moved every count), not by every state change.
            await self._wait_change(waiting_added, looked)

    async def _prefetch_prekeys(self, recipients: Sequence[str]) -> dict[str, m.Prekeys]:
        """The prekeys of ``recipients``: a bundle from the pool for each that has one
        (no round trip), the others fetched at once (one write, one round trip for all);
        returns the answers that came with a signed prekey. The others (none published
        yet, a refusal, a connection lost first) are left to the issuer, which asks
        again. A direct fetch starts the recipient's pool (or ends its dry spell), and
        the pool keeper tops up what fell below half."""
        pool = self.prekey_pool
        now = self._now()
        prekeys: dict[str, m.Prekeys] = {}
        missing: list[str] = []
        for recipient in recipients:
            pooled = pool.take(recipient, now=now)
            if pooled is None:
                missing.append(recipient)
            else:
                prekeys[recipient] = pooled
        if missing:
            answers = await self._ask_prekeys(missing, wait=False, purpose="submit")
            now = self._now()
            for n, recipient in enumerate(missing):
                answer = None if answers is None else answers[n]
                pool.fetched(recipient, answer, now=now)
                if (
                    isinstance(answer, m.Prekeys)
                    and answer.member == recipient
                    and answer.signed is not None
                ):
                    prekeys[recipient] = answer
        if pool.wants():
            self._pool_changed.set()
        return prekeys

    async def _pool_keeper(self, session: _Session) -> None:
        """Top up the prekey pools that fell below half (see :mod:`clients.prekeypool`):
        one write of at most ``limits.max_prekey_fetches`` fetches at a time, on this
        connection."""
        pool = self.prekey_pool
        while True:
            changed = self._pool_changed = trio.Event()
            asks = pool.asks(self._limits.max_prekey_fetches)
            if not asks:
                await changed.wait()
                continue
            answers = None
            try:
                # One fetch per recipient, of as many bundles as it lacks.
                answers = await self._ask_prekeys(asks, wait=False, purpose="pool", grouped=True)
            finally:
                pool.answered(asks, answers, now=self._now())
            if answers is None:
                # Only when the session ends, which cancels this task: the next
                # session's keeper asks again.
                await trio.sleep_forever()

    async def _issue_batch(self, batch: list[WantedRelease]) -> None:
        """Fetch the prekeys of the releases of ``batch`` whose report is still held, in
        one round trip, then issue (or refuse) each release in order."""
        live = [
            wanted
            for wanted in batch
            if self._submission(wanted.report).state in ("queued", "stored")
        ]
        answers = await self._fetch_prekeys([wanted.recipient for wanted in live], purpose="issuer")
        fetched = {wanted.id: answer for wanted, answer in zip(live, answers, strict=True)}
        for wanted in batch:
            await self._issue(wanted, fetched.get(wanted.id))
            waiter = self._wanted_waiters.get(wanted.id)
            if waiter is not None:
                waiter.set()

    async def _issue(
        self,
        wanted: WantedRelease,
        fetched: m.Message | None = None,
        submission: Submission | None = None,
    ) -> None:
        """Issue the token of ``wanted`` with the relay's answer ``fetched`` to the fetch
        of its recipient's prekeys (None: fetch them now), or record why not.
        ``submission``: its report's row, when the caller has it in hand (just recorded)."""
        report_id, recipient = wanted.report, wanted.recipient
        if submission is None:
            submission = self._submission(report_id)
        one_time: bytes | None = None
        try:
            if submission.state not in ("queued", "stored"):
                raise _final_refusal(submission.state, submission.reason, submission.detail)
            if fetched is None:
                (fetched,) = await self._fetch_prekeys([recipient], purpose="issue")
            signed, one_time = _handed_out(fetched, recipient)
            if signed is None:
                # A recipient that has not published yet (never connected, or its prekey
                # ran out while it was away): ask again, for at most limits.prekey_wait.
                deadline = trio.current_time() + self._limits.prekey_wait
                delay = PREKEY_RETRY
                while signed is None and trio.current_time() < deadline:
                    await trio.sleep(min(delay, max(deadline - trio.current_time(), 0)))
                    delay = min(delay * 2, 1.0)
                    (fetched,) = await self._fetch_prekeys([recipient], purpose="retry")
                    signed, one_time = _handed_out(fetched, recipient)
            now = self._now()
            # Chosen here, so the store need not read it back from the token.
            token_id = random_id()

            def make_token(counter: int) -> bytes:
                return issue_token(
                    self._secret,
                    self.name,
                    self._arrangement,
                    recipient=recipient,
                    report_id=report_id,
                    digest=submission.digest,
                    size=submission.size,
                    content_key=submission.content_key,
                    scope=submission.scope,
                    level=submission.level,
                    not_before=now,
                    not_after=now + wanted.valid_for,
                    counter=counter,
                    signed_prekey=signed,
                    one_time_prekey=one_time,
                    request=wanted.approves,
                    token_id=token_id,
                )

            try:
                self.store.issue_release(
                    report_id,
                    recipient,
                    make_token,
                    now,
                    wanted=wanted.id,
                    approves=wanted.approves,
                    token_id=token_id,
                )
            except (VerificationError, ProtocolError):
                # The relay handed out a prekey that is not the recipient's (a forged
                # signature) or not a prekey at all: a substitution. Issue nothing.
                raise Refused(
                    Reason.BAD_PREKEY, f"the relay handed out a prekey not signed by {recipient!r}"
                ) from None
        except Refused as exc:
            if one_time is not None and exc.reason is not Reason.BAD_PREKEY:
                # Ended before its token (its report refused, revoked or expired during
                # the fetch): the bundle is good, for the next token.
                assert fetched is not None
                self._put_back(recipient, fetched)
            current = self.store.wanted_release(wanted.id)
            if current is None or current.state != "waiting":
                return  # ended meanwhile, with its report: reported there
            self.store.refuse_wanted(
                wanted.id,
                exc.reason.value,
                exc.detail,
                RefusedEvent(ref=report_id, reason=exc.reason, detail=exc.detail),
            )
            return
        # The mode issue_token chose (see there), known without decoding the token again.
        if one_time is not None:
            self.prekey_counts["used"] += 1
        else:
            mode = WrapMode.IDENTITY if signed is None else WrapMode.SIGNED
            self.store.add_event(WeakerWrap(token=token_id, recipient=recipient, mode=mode.value))

    def _put_back(self, recipient: str, answer: m.Message) -> None:
        """A bundle handed out for a token not issued: back to the pool if it takes it
        (see :meth:`clients.prekeypool.PrekeyPool.put_back`), else counted dropped."""
        if self.prekey_pool.put_back(recipient, answer, now=self._now()):
            self.prekey_counts["returned"] += 1
        elif isinstance(answer, m.Prekeys) and answer.one_time:
            self.prekey_counts["dropped_unused"] += 1

    async def _fetch_prekeys(self, recipients: list[str], *, purpose: str) -> list[m.Message]:
        """:meth:`_ask_prekeys`, waiting for a connection as long as it takes."""
        answers = await self._ask_prekeys(recipients, wait=True, purpose=purpose)
        assert answers is not None
        return answers

    async def _ask_prekeys(
        self, recipients: list[str], *, wait: bool, purpose: str, grouped: bool = False
    ) -> list[m.Message] | None:
        """Ask the relay, in one write, for a bundle of prekeys (signed prekey and a
        one-time prekey) per entry of ``recipients``; waits for a connection, and asks
        again on the next one for what this one left unanswered (with ``wait`` False:
        returns None when no connection is up or it ends before every answer came).
        ``grouped``: the entries of one recipient are asked for in one fetch of that
        many bundles (protocol version 4; at most MAX_PREKEY_BUNDLES each), else one
        fetch per entry.

        Returns:
            The relay's answer for each entry, in order: a :class:`~tisa.messages.Prekeys`
            of one bundle (its one-time prekey, or none when the relay handed out fewer
            than asked) or a :class:`~tisa.messages.Refusal` (see :func:`_handed_out`).
        """
        answers: dict[int, m.Message] = {}
        while len(answers) < len(recipients):
            if not wait and self._session is None:
                # Handed out but given up with the rest (the connection ended first).
                self.prekey_counts["lost_unanswered"] += sum(
                    isinstance(a, m.Prekeys) and bool(a.one_time) for a in answers.values()
                )
                return None
            await self.wait_connected()
            session = self._session
            assert session is not None
            refs = {
                random_id(): entries
                for entries in _fetch_groups(
                    [n for n in range(len(recipients)) if n not in answers], recipients, grouped
                )
            }
            waiter = _PrekeyAnswers(refs, answers, purpose)
            for ref in refs:
                session.prekey_waiters[ref] = waiter
            try:
                fetches = [
                    m.FetchPrekeys(ref=r, member=recipients[entries[0]], count=len(entries))
                    for r, entries in refs.items()
                ]
                self.prekey_counts["fetch_" + purpose] += len(fetches)
                self.prekey_counts["asked_" + purpose] += sum(f.count for f in fetches)
                try:
                    await session.link.send_many(fetches)
                except LinkClosed:
                    # The session ends: asked again on the next one.
                    await session.over.wait()
                else:
                    # Every answer, or the end of the session (which sets ``done``).
                    await waiter.done.wait()
            finally:
                for ref in refs:
                    session.prekey_waiters.pop(ref, None)
        return [answers[n] for n in range(len(recipients))]

    # --- recipient: prekeys ------------------------------------------------------------

    async def maintain_prekeys(self, status: m.PrekeyStatus | None = None) -> None:
        """Rotate the signed prekey when due, delete secrets past their grace window,
        and publish what the relay lacks (a new signed prekey; one-time prekeys up to
        ``limits.one_time_prekeys`` when fewer than ``limits.prekey_low_water`` are
        left). New secrets are on disk before their public halves leave the node.

        Args:
            status: the relay's latest :class:`~tisa.messages.PrekeyStatus`; None: use
                the connection's latest, if any (counted with the one-time prekeys
                published on it that no status has shown stored yet).

        Does nothing for a member without the recipient role. Sends only while
        connected (the next connection's status brings the rest).
        """
        if Role.RECIPIENT not in self._arrangement.member(self.name).roles:
            return
        # One at a time: a second call counts what the first one sent as on its way.
        async with self._prekey_lock:
            await self._maintain_prekeys(status)

    async def _maintain_prekeys(self, status: m.PrekeyStatus | None) -> None:
        session = self._session
        if status is None and session is not None:
            status = session.prekey_status
        limits = self._limits
        now = self._now()
        self.store.delete_old_prekeys(now=now, grace=limits.signed_prekey_grace)
        current = self.store.signed_prekey()
        fresh: list[PrekeySecret] = []
        if current is None or current.created + limits.signed_prekey_rotation <= now:
            # Each signed prekey is valid for two periods, so one missed rotation does
            # not leave the member without a usable prekey.
            current = PrekeySecret.generate(
                PrekeyKind.SIGNED,
                created=now,
                not_after=now + 2 * limits.signed_prekey_rotation,
            )
            fresh.append(current)
        one_time: list[PrekeySecret] = []
        # The relay's count plus the top-ups on their way to it (not yet seen stored).
        supply = None
        if status is not None:
            supply = status.one_time
            if session is not None:
                supply = session.prekeys_in_flight.supply(supply)
        if supply is not None and supply < limits.prekey_low_water:
            one_time = [
                PrekeySecret.generate(
                    PrekeyKind.ONE_TIME,
                    created=now,
                    not_after=now + limits.one_time_prekey_lifetime,
                )
                for _ in range(limits.one_time_prekeys - supply)
            ]
        if fresh or one_time:
            self.store.add_prekeys(fresh + one_time)
        if status is None or session is None:
            await self._durable()
            return
        signed = None if status.signed_not_after == current.not_after else current
        if signed is None and not one_time:
            await self._durable()
            return
        await self._durable()
        publish = [p.publish(self._secret, self.name, self._arrangement) for p in one_time]
        messages: list[m.PublishPrekeys] = []
        first = True
        while first or publish:
            batch, publish = (
                publish[: m.MAX_PREKEYS_PER_MESSAGE],
                publish[m.MAX_PREKEYS_PER_MESSAGE :],
            )
            messages.append(
                m.PublishPrekeys(
                    signed=signed.publish(self._secret, self.name, self._arrangement)
                    if signed is not None and first
                    else None,
                    one_time=batch,
                )
            )
            first = False
        # On its way from here (no checkpoint before the write is queued): a status
        # counting it can only come after.
        session.prekeys_in_flight.sent(len(message.one_time) for message in messages)
        with contextlib.suppress(LinkClosed):
            await session.link.send_many(messages)

    async def _prekey_keeper(self, session: _Session) -> None:
        """Keep this member's prekeys: on every status from the relay, and every
        :data:`PREKEY_CHECK_INTERVAL` seconds."""
        if Role.RECIPIENT in self._arrangement.member(self.name).roles:
            # Ask what the relay holds of our prekeys (an empty publish); the answer
            # drives the first publish or top-up.
            await session.link.send(m.PublishPrekeys(signed=None, one_time=[]))
        while True:
            changed = session.prekey_changed
            # The latest status when its turn comes (not one read before waiting for
            # another call: the prekeys on their way are counted against the latest).
            await self.maintain_prekeys()
            with trio.move_on_after(PREKEY_CHECK_INTERVAL) as idle:
                await changed.wait()
            if idle.cancelled_caught:
                # No status in all that time: whatever was sent is stored or lost; the
                # latest status counts alone again.
                session.prekeys_in_flight.clear()

    async def revoke(self, report_id: bytes, token_id: bytes | None = None) -> bool:
        """Withdraw one token, or with ``token_id`` None the whole report.

        Releases not yet sent are withdrawn locally at once; the revocation is sent to
        the relay (once it has the report) and this waits for its answer. Revoking what
        is already revoked changes nothing and returns False. A withdrawn submission
        (see :meth:`withdraw`) that the relay turns out not to have is dropped.

        Returns:
            True if this call revoked it, False if it was revoked already.

        Raises:
            Refused: the relay refused: ``replayed`` when the token, or every token of
                the report, was already delivered (a revocation cannot take a report
                back from its recipient), ``expired``, ``unknown_report``.
            UsageError: an unknown report, or a token not of this report.

        Cancellation: the revocation stays queued and is still sent.
        """
        submission = self._submission(report_id)
        if submission.state in ("revoked", "dropped"):
            return False
        if token_id is not None:
            pending = self.store.release(token_id)
            if pending is None or pending.report != report_id:
                raise UsageError("no such token for this report")
            if (
                pending.state == "revoked"
                and self.store.pending_revocation(report_id, token_id) is None
            ):
                return False
        rev_id = self.store.record_revocation(report_id, token_id)
        # The sender is told first: it waits for the same commit, then sends at once.
        self._notify()
        await self._durable()
        while True:
            changed = self._changed
            revocation = self.store.revocation(rev_id)
            assert revocation is not None
            if revocation.state == "revoked":
                await self._durable()
                return True
            if revocation.state == "refused":
                reason = Reason(revocation.reason or "internal")
                if (
                    reason is Reason.UNKNOWN_REPORT
                    and token_id is None
                    and self._submission(report_id).state == "withdrawn"
                ):
                    # Withdrawn before the relay stored it, and it never did: nothing
                    # to revoke there; the local copy goes.
                    await self.drop(report_id)
                    return True
                raise Refused(reason, revocation.detail or "")
            await changed.wait()

    async def withdraw(self, report_id: bytes, *, grace: float = WITHDRAW_GRACE) -> str:
        """Take back a submission the relay has not stored: it stays in the outbox,
        sealed, but nothing of it (nor of its releases) is sent until :meth:`resume`.

        A submission whose last byte already went out (the relay may store it any
        moment) is not called back: this waits up to ``grace`` seconds for the relay's
        answer. One still streaming is cut off by closing the connection (the relay
        discards an unfinished upload; the node reconnects).

        Returns:
            ``"withdrawn"`` (the relay does not have it), ``"stored"`` (the relay stored
            it first: revoke it to take it back), ``"uncertain"`` (its last byte went out
            and no answer came within ``grace``: the relay may have it), or the
            submission's final state if it had one already (``"refused"``,
            ``"expired"``, ``"revoked"``, ``"dropped"``; ``"withdrawn"`` again).

        Raises:
            UsageError: this node never submitted ``report_id``.
        """
        submission = self._submission(report_id)
        if submission.state != "queued":
            return submission.state
        self.store.withdraw_submission(report_id)
        self._withdrawals += 1
        self._notify()
        await self._durable()
        if report_id in self._uploading or report_id in self._uploaded:
            with trio.move_on_after(grace):
                while report_id in self._uploading:
                    await self._upload_changed.wait()
                if report_id in self._uploaded:
                    while (state := self._submission(report_id).state) == "withdrawn":
                        changed = self._changed
                        await changed.wait()
                    return state
        if report_id in self._uploaded:
            return "uncertain"
        return self._submission(report_id).state

    async def resume(self, report_id: bytes) -> None:
        """Queue a withdrawn submission (and its pending releases) again.

        The connection in use is closed and made anew, so that the submission goes out
        first in order on the next one (the sender reads the outbox in order).

        Raises:
            UsageError: this node never submitted ``report_id``, or it is not withdrawn.
        """
        if self._submission(report_id).state != "withdrawn":
            raise UsageError("that report is not withdrawn (see the outbox)")
        self.store.requeue_submission(report_id)
        await self._durable()
        session = self._session
        if session is not None and session.scope is not None:
            session.scope.cancel()
        self._notify()

    async def drop(self, report_id: bytes) -> None:
        """Delete a withdrawn submission: its ciphertext and pending releases are gone.

        Raises:
            UsageError: this node never submitted ``report_id``, or it is not withdrawn.
        """
        if self._submission(report_id).state != "withdrawn":
            raise UsageError("that report is not withdrawn (see the outbox)")
        self.store.set_submission_state(report_id, "dropped", None, reason="dropped")
        self._notify()
        await self._durable()

    # --- consent: announce, request, approve, deny -----------------------------------

    async def announce(self, report_id: bytes, to: Iterable[str], *, title: str = "") -> bytes:
        """Tell ``to`` that this node holds ``report_id``, and wait until the relay has it.

        The announcement reveals the report id, its scope and level, a size bucket
        (``2**k`` bytes) and ``title``, and nothing else; only the members named get it.

        Returns:
            The announcement id.

        Raises:
            Refused: by the arrangement here (``to`` not all recipients) or by the relay
                (``unknown_report`` once the report is gone).
            UsageError: an unknown report, or a title longer than 200 bytes.
        """
        submission = self._submission(report_id)
        announcement = Announcement.issue(
            self._secret,
            self.name,
            self._arrangement,
            report=report_id,
            to=to,
            scope=submission.scope,
            level=submission.level,
            size=submission.size,
            title=title,
            now=self._now(),
        )
        self.store.queue_consent("announce", announcement.id, announcement.encoded)
        await self._await_consent("announce", announcement.id)
        return announcement.id

    async def request(
        self,
        report_id: bytes,
        originator: str,
        purpose: str,
        *,
        valid_for: float = DEFAULT_REQUEST_VALID_FOR,
    ) -> bytes:
        """Ask ``originator`` to release ``report_id`` to this member, and wait until the
        relay holds the request (the answer comes later, as an event).

        Returns:
            The request id. Its answer arrives as :class:`~clients.events.ApprovedEvent`
            (with the report in :meth:`reports`) or :class:`~clients.events.DeniedEvent`.

        Raises:
            Refused: here (``wrong_role``, ``wrong_recipient``) or by the relay
                (``unknown_report``, ``rate_limited``, ``expired``).
            UsageError: a bad purpose (1..1000 bytes) or ``valid_for``.
        """
        _check_window(valid_for, "valid_for", MAX_REQUEST_VALIDITY)
        request = Request.issue(
            self._secret,
            self.name,
            self._arrangement,
            originator=originator,
            report=report_id,
            purpose=purpose,
            now=self._now(),
            valid_for=int(valid_for),
        )
        self.store.queue_consent("request", request.id, request.encoded, request=request)
        await self._await_consent("request", request.id)
        return request.id

    async def approve(self, request_id: bytes, *, valid_for: float = DEFAULT_VALID_FOR) -> bytes:
        """Approve a request made to this member: release the report to the requester
        with a token that names the request, and wait until the relay accepts it.

        Returns:
            The token id.

        Raises:
            Refused: ``answered`` (approved or denied before, or an approval waiting for
                the requester's prekeys), ``expired`` (deny it instead),
                ``no_prekey`` (the requester published none), ``wrong_recipient`` (the
                requester is not among the report's recipients, so it could not open
                it: deny it), or the relay's refusal.
            UsageError: no such request to this member.
        """
        record = self._incoming(request_id)
        _check_window(valid_for, "valid_for", MAX_VALIDITY)
        Request.verify(record.encoded, self._arrangement).check_open(
            now=self._now(), clock_skew=self._limits.clock_skew
        )
        # The token is issued once the requester's prekeys are in (as for release); the
        # request is marked approved in the transaction that records it.
        wanted_id = self._want(record.report, record.requester, valid_for, approves=request_id)
        return await self._await_release(wanted_id)

    async def deny(self, request_id: bytes, reason: Reason | str, note: str = "") -> None:
        """Deny a request made to this member, with a reason code from
        :data:`tisa.consent.DENIAL_REASONS` and an optional note; wait until the relay
        holds the denial. A denial is final for that request.

        Raises:
            Refused: ``answered`` (approved or denied before), or the relay's refusal.
            UsageError: no such request, a reason that is no denial code, a note over
                500 bytes.
        """
        record = self._incoming(request_id)
        answer = Answer.deny(
            self._secret,
            self.name,
            self._arrangement,
            Request.verify(record.encoded, self._arrangement),
            reason=reason,
            note=note,
            now=self._now(),
        )
        self.store.queue_consent("answer", request_id, answer.encoded, denial=answer)
        await self._await_consent("answer", request_id)

    def requests(self, direction: str | None = None) -> list[RequestRecord]:
        """Requests this member made (``direction`` "out"), received ("in"), or both."""
        if direction not in (None, "in", "out"):
            raise UsageError('direction is "in", "out" or None')
        return self.store.requests(direction)

    def announcements(self) -> list[Announcement]:
        """Announcements this member received (verified), oldest first."""
        return [Announcement.verify(data, self._arrangement) for data in self.store.announcements()]

    def _incoming(self, request_id: bytes) -> RequestRecord:
        record = self.store.request(request_id, "in")
        if record is None:
            raise UsageError("no request with this id was made to this member")
        if record.answered:
            raise Refused(Reason.ANSWERED, f"the request was {record.state} before")
        if any(w.approves == request_id for w in self.store.waiting_releases()):
            raise Refused(Reason.ANSWERED, "an approval of the request waits for its token")
        return record

    async def _await_consent(self, kind: str, ref: bytes) -> None:
        # The sender is told first: it waits for the same commit, then sends at once.
        self._notify()
        await self._durable()
        while True:
            changed = self._changed
            sent = self.store.consent_out(kind, ref)
            assert sent is not None
            if sent.state == "held":
                await self._durable()
                return
            if sent.state == "refused":
                raise Refused(Reason(sent.reason or "internal"), sent.detail or "")
            await changed.wait()

    def _submission(self, report_id: bytes) -> Submission:
        submission = self.store.submission(report_id)
        if submission is None:
            raise UsageError("this node has not submitted that report")
        return submission

    # --- application feeds -----------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Events in the order they happened, each handed over once.

        Every event is written to the store with the change that caused it, and
        forgotten only when this iterator hands it over, so events survive a restart.
        A bounded memory channel of :data:`EVENT_BUFFER` events sits between the store
        and this iterator: an application that does not consume events slows nothing
        down and loses nothing (they wait in the store, up to
        :data:`clients.store.MAX_STORED_EVENTS`, beyond which the oldest notifications
        are dropped; the state they announced stays in the store). Use one consumer.
        """
        async for seq, event in self._event_recv:
            self.store.drop_event(seq)
            self._group_commit.mark_dirty()
            yield event

    async def reports(self) -> AsyncIterator[DeliveredReport]:
        """Verified reports the application has not acknowledged yet, oldest first, then
        new ones as they arrive; each once per loop.

        A report counts as handed over when the application acknowledges it with
        :meth:`ack`, as a consumer commits an offset; until then it stays in the inbox
        and the next ``reports()`` loop (in this run, or after a restart or a crash)
        yields it again. So an application that takes one report at a time, records it
        and then acknowledges it sees a report a second time only if it is stopped
        between the two; one that records ``token_id`` together with its effect (one
        transaction) can skip that one too, and acts on each report exactly once. A
        loop that never acknowledges gets every report again on each start: nothing is
        lost, but nothing counts as taken. A report reaches this loop only once it is
        on disk. Use one consumer.
        """
        last = 0
        changes = self.store.kind_changes

        def inbox_changes() -> int:
            return changes[rows.INBOX]

        read_all = -1  # the inbox's change count when a read last got every row after `last`
        while True:
            count = changes[rows.INBOX]
            if count == read_all:
                await self._wait_change(inbox_changes, count)
                continue
            entries = self.store.inbox_after(last, limit=REPORT_BUFFER)
            if len(entries) < REPORT_BUFFER:
                read_all = count
            if not entries:
                await self._wait_change(inbox_changes, count)
                continue
            # A report reaches the application once on disk: the batch that stored the
            # last one read, not one opened since (by an ack, say).
            await self._durable(self.store.batch_of(rows.INBOX))
            for entry in entries:
                last = entry.seq
                yield self._delivered(entry)

    async def ack(self, report: DeliveredReport) -> None:
        """Acknowledge that the application has taken ``report`` from :meth:`reports`:
        it is never handed over again, even after a crash.

        Returns once the acknowledgement is on disk. Acknowledging a report again does
        nothing; reports may be acknowledged in any order. Acks made at once by several
        tasks share one commit and WAL fsync; one task that has several reports in hand
        acknowledges them together with :meth:`ack_many`.

        Raises:
            UsageError: ``report`` is not in this node's inbox, or the node is closed
                (the report is then handed over again on the next start).

        Cancellation: the acknowledgement may or may not be on disk; if it is not, the
        report is handed over again on the next start.
        """
        await self.ack_many([report])

    async def ack_many(self, reports: Iterable[DeliveredReport]) -> None:
        """Acknowledge several reports taken from :meth:`reports` at once: :meth:`ack`
        for each, with one commit and one WAL fsync for all of them instead of one per
        report (each ``ack`` returns only once on disk).

        Returns once every acknowledgement is on disk; from then on none of these
        reports is handed over again, even after a crash. All or nothing: when one of
        them is not in the inbox, none is acknowledged. Reports already acknowledged,
        and one given twice, are accepted (nothing more happens to them); an empty
        ``reports`` returns at once.

        Raises:
            UsageError: a report is not in this node's inbox (none of ``reports`` is
                acknowledged then), or the node is closed (they are then handed over
                again on the next start).

        Cancellation, or a crash before it returns: all of the acknowledgements are on
        disk or none is (they are one step of one batch); if none is, every one of
        these reports is handed over again, by the next ``reports()`` loop or on the
        next start.
        """
        tokens = [report.token_id for report in reports]
        if not tokens:
            return
        if self.store.closed:
            raise UsageError("the node is closed; the reports come again on the next start")
        missing = self.store.mark_handed_many(tokens)
        if missing:
            what = "that report is" if len(tokens) == 1 else f"{len(missing)} of the reports are"
            raise UsageError(
                f"{what} not in this node's inbox (token {missing[0].hex()}); none acknowledged"
            )
        await self._durable()

    def _delivered(self, entry: InboxEntry) -> DeliveredReport:
        header = entry.header
        parts: list[bytes | pathlib.Path]
        if entry.parts is not None:
            parts = list(entry.parts)
        else:
            parts = [
                _inline(entry.dir / "body", header.body_size),
                *(
                    _inline(entry.dir / f"a{i}", size)
                    for i, (_, size) in enumerate(header.attachments)
                ),
            ]
        return DeliveredReport(
            header=header,
            body=parts[0],
            attachments={
                name: part for (name, _), part in zip(header.attachments, parts[1:], strict=True)
            },
            token_id=entry.token,
            originator=header.originator,
        )

    async def _pump_events(self) -> None:
        last = 0
        changes = self.store.kind_changes

        def event_changes() -> int:
            return changes[rows.EVENTS]

        read_all = -1  # the events' change count when a read last got every one after `last`
        while True:
            count = changes[rows.EVENTS]
            if count == read_all:
                await self._wait_change(event_changes, count)
                continue
            events = self.store.events_after(last, limit=EVENT_BUFFER)
            if len(events) < EVENT_BUFFER:
                read_all = count
            if events:
                # Never announce what is not on disk: the batch that wrote the last
                # event read.
                await self._durable(self.store.batch_of(rows.EVENTS))
            for seq, kind, data in events:
                # As recorded (its signed part verified then), or decoded and verified.
                event = self.store.fresh_event(seq)
                if event is None:
                    event = decode_event(kind, data, arrangement=self._arrangement)
                await self._event_send.send((seq, event))
                last = seq
            if not events:
                await self._wait_change(event_changes, count)

    # --- audit -----------------------------------------------------------------------

    async def fetch_audit(self, *, from_start: bool = False) -> list[AuditEntry]:
        """Fetch the relay's audit entries that concern this member, and verify them.

        The extract must continue the chain from the last checkpoint this node verified
        (kept in the store) up to a checkpoint signed by the relay; the new checkpoint is
        stored. With ``from_start``, every entry since the log began is fetched and the
        chain verified from its start; it must pass through the stored checkpoint (the
        relay cannot show this member another history than before). Waits for a
        connection.

        Returns:
            This member's entries since the previous fetch (with ``from_start``: all of
            them), in order.

        Raises:
            VerificationError: the relay's extract does not check out (chain, signature,
                or it does not continue from, or pass through, the stored checkpoint).
            ProtocolError: the extract is malformed.
            Refused: the relay refused the fetch: ``malformed`` when its log ends before
                the checkpoint this node verified (the relay lost or rolled back entries
                it had signed: keep :meth:`audit_checkpoint` as the evidence), ``busy``
                when it has extracts for this connection still unsent.
        """
        out: list[AuditEntry] = []
        async with self._audit_lock:
            stored = self.store.audit_checkpoint()
            known = (0, GENESIS) if from_start or stored is None else stored
            # The relay may cut an extract short (entries or bytes); fetch again from
            # the new checkpoint until an extract brings nothing new.
            for _ in range(MAX_AUDIT_ROUNDS):
                try:
                    data = await self._audit_request(known[0])
                except _SessionOver:
                    continue
                extract = Extract.decode(data)
                entries, checkpoint = verify_extract(
                    extract, self._arrangement, self.name, known=known
                )
                if (
                    stored is not None
                    and known[0] < stored[0] <= checkpoint.seq
                    and _head_at(extract, stored[0]) != stored[1]
                ):
                    raise VerificationError()
                if not extract.items:
                    break
                known = (checkpoint.seq, checkpoint.head)
                if stored is None or checkpoint.seq >= stored[0]:
                    self.store.set_audit_checkpoint(
                        checkpoint.seq, checkpoint.head, checkpoint.encoded
                    )
                out.extend(entries)
            if stored is not None and known[0] < stored[0]:
                raise VerificationError()  # the log now ends before what was verified
        return out

    def audit_checkpoint(self) -> Checkpoint | None:
        """The relay's signed checkpoint this node last verified, or None before any.

        Members who compare their checkpoints catch a relay that shows them different
        histories: see :func:`tisa.audit.checkpoints_conflict`.
        """
        data = self.store.audit_checkpoint_bytes()
        return None if data is None else Checkpoint.verify(data, self._arrangement)

    def missing_releases(self, originator: str, *, limit: int = 1000) -> list[int]:
        """Release counters of ``originator`` to this member that never arrived, below
        the highest that did (lowest first, at most ``limit``).

        Each originator numbers its releases to each recipient 1, 2, 3, ...; a number
        missing here is a release the relay dropped or still holds, or one the originator
        revoked before it was delivered: ask the originator which. A late delivery
        removes its number from the list.
        """
        return self.store.missing_counters(originator, limit=limit)

    async def _audit_request(self, since: int) -> bytes:
        await self.wait_connected()
        session = self._session
        assert session is not None
        send, receive = trio.open_memory_channel[bytes | Refused](1)
        session.audit_replies = send
        result: list[bytes | Refused] = []
        session.audit_waiting = True
        try:
            async with trio.open_nursery() as nursery:

                async def get() -> None:
                    result.append(await receive.receive())
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    await session.over.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(get)
                nursery.start_soon(watch)
                try:
                    await session.link.send(m.AuditFetch(since=since))
                except LinkClosed:
                    nursery.cancel_scope.cancel()
        finally:
            session.audit_waiting = False
        if not result:
            raise _SessionOver()
        if isinstance(result[0], Refused):
            raise result[0]
        return result[0]

    # --- connection ------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, serve the session, reconnect with backoff; forever."""
        delay = self._backoff.initial
        # The address tried next: after a failed connection attempt the next one in the
        # list (failover between relay processes); after a session that ended, the same.
        current = 0
        while True:
            link: Link | None = None
            try:
                stream = await trio.open_tcp_stream(*self._relay_addrs[current])
                link = await connect_member(
                    stream, self._secret, self.name, self._arrangement, limits=self._limits
                )
            except Refused as exc:
                # The relay refused this member (busy, wrong arrangement, ...): tell the
                # application, then keep trying (the relay may be updated or less busy).
                self.store.add_event(RefusedEvent(ref=b"", reason=exc.reason, detail=exc.detail))
                self._notify()
                error: BaseException = exc
            except _LINK_FAILURES as exc:
                error = exc
            if link is None:
                current = (current + 1) % len(self._relay_addrs)
                if current != 0:
                    continue  # the next relay process at once; back off after a round
                # Every address failed this round: tell whoever waits for an attempt.
                self._attempt_failed(error)
            else:
                self.connect_error = None
                delay = self._backoff.initial
                async with link:
                    await self._serve(link)
            jitter = 1 - self._backoff.jitter * random.random()
            await trio.sleep(delay * jitter)
            delay = min(delay * self._backoff.factor, self._backoff.maximum)

    def _attempt_failed(self, error: BaseException) -> None:
        self.connect_error = error
        self._attempted.set()
        self._attempted = trio.Event()

    async def _serve(self, link: Link) -> None:
        over = trio.Event()
        discard, _ = trio.open_memory_channel[bytes | Refused](1)
        session = _Session(link=link, over=over, audit_replies=discard)
        try:
            async with trio.open_nursery() as nursery:
                session.scope = nursery.cancel_scope
                nursery.start_soon(self._guard, self._sender, session, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._reader, session, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._receiver, session, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._replier, session, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._prekey_keeper, session, nursery.cancel_scope)
                nursery.start_soon(self._guard, self._issuer, session, nursery.cancel_scope)
                if self.prekey_pool.size:
                    nursery.start_soon(
                        self._guard, self._pool_keeper, session, nursery.cancel_scope
                    )
                self._session = session
                self._connected.set()
                self._connected = trio.Event()
        finally:
            self._session = None
            over.set()
            for waiter in session.prekey_waiters.values():
                waiter.done.set()  # asked again on the next connection
            self._notify()

    @staticmethod
    async def _guard(
        task: Callable[[_Session], Any], session: _Session, scope: trio.CancelScope
    ) -> None:
        # Either half ending ends the session; the run loop then reconnects.
        try:
            await task(session)
        except _LINK_FAILURES:
            pass
        finally:
            scope.cancel()

    async def _sender(self, session: _Session) -> None:
        """Send whatever the store says is outstanding; wait for changes; repeat.

        Each kind of row is read after the last one sent on this connection (a new
        connection starts from the beginning, so everything still outstanding is sent
        again). A release goes out right behind its report's submission, without waiting
        for ``stored``: the relay handles a connection's messages in order.

        Nothing goes out before the batch that wrote it is on disk, and only that batch
        is waited for: each query notes the last batch that wrote its kind of row
        (:meth:`clients.store.MemberStore.batch_of`; every row it returns was written in
        that batch or before), and a write waits for the latest such batch of its pass,
        not for one that unrelated steps (an answer, an event) opened since. A query
        whose kinds nobody wrote since it last ran on this connection is skipped
        (:attr:`~clients.store.MemberStore.kind_changes`), and a change that wrote no
        kind the sender reads does not wake it at all (:meth:`_wait_change`): anything
        it is to send must be written to the store as a kind of row it reads.
        """
        link = session.link
        store = self.store
        changes = store.kind_changes
        submitted: set[bytes] = set()  # reports whose submission went out on this link
        # Tokens that went out inside a submit_inline on this link.
        inline_tokens: set[bytes] = set()
        # Data and tokens a submit_inline may carry within the frame limit.
        inline_room = self._limits.max_frame - STREAM_OVERHEAD - m.INLINE_OVERHEAD
        sent_revocations: set[int] = set()
        after_submission = after_release = after_consent = 0
        # The change counts each query last ran at (none yet: a new connection reads all).
        seen: dict[tuple[str, ...], tuple[int, ...]] = {}

        def changed_since(*kinds: str) -> bool:
            # Whether a write of ``kinds`` came since this query last ran (and note now).
            now = tuple(changes[kind] for kind in kinds)
            if seen.get(kinds) == now:
                return False
            seen[kinds] = now
            return True

        def sendable_changes() -> int:
            # Writes of every kind but those the sender never reads (a kind added later
            # counts, so a new query gated on it is woken for), and but a queued
            # submission stored (rows.STORED) while no revocation may be pending: that
            # makes nothing else sendable (its releases go out behind its submission).
            total = changes.total() - sum(changes[kind] for kind in _NOT_SENT)
            return total if store.revocations_known else total - changes[rows.STORED]

        while True:
            # Looked at again once a write of a kind it reads came since this pass began.
            start = sendable_changes()
            # The batch holding every row this pass sends (rows it reads and leaves are
            # not waited for): the write waits for it.
            need = 0
            # Everything of one pass goes out in one write where it can (small
            # submissions, releases, revocations, receipts); a large submission streams.
            # Each message is kept with the report it belongs to (or None), so that one
            # withdrawn before the write is left out (see withdraw).
            pending: list[tuple[bytes | None, m.Message]] = []
            withdrawals = self._withdrawals
            submissions: list[Submission] = []
            if changed_since(rows.SUBMISSIONS):
                submissions = store.queued_submissions(after=after_submission)
                if submissions:
                    need = max(need, store.batch_of(rows.SUBMISSIONS))
            for submission in submissions:
                after_submission = max(after_submission, submission.seq)
                submitted.add(submission.report)
                room = inline_room - submission.size
                if submission.size <= MAX_INLINE_CIPHERTEXT and room >= 0:
                    # One message: the report and the tokens already issued for it (as
                    # many as fit; the others follow as `release` messages).
                    tokens: list[bytes] = []
                    need = max(need, store.batch_of(rows.RELEASES))
                    # Its pending tokens: those this store issued since it opened, in
                    # memory (none read back), else read from the rows.
                    issued = store.fresh_tokens(submission.report)
                    if issued is None:
                        issued = [
                            (release.token, release.encoded)
                            for release in store.releases_of(submission.report)
                            if release.state == "pending"
                        ]
                    for token_id, encoded in issued:
                        if token_id in inline_tokens:
                            continue
                        room -= len(encoded) + m.INLINE_TOKEN_OVERHEAD
                        if len(tokens) == MAX_INLINE_TOKENS or room < 0:
                            break
                        inline_tokens.add(token_id)
                        tokens.append(encoded)
                    pending.append((submission.report, _submit_inline(submission, tokens)))
                elif submission.data is not None:
                    pending.extend(
                        (submission.report, message)
                        for message in _submission_messages(submission, submission.data)
                    )
                else:
                    await self._durable(need)
                    await self._send_pending(link, pending, withdrawals)
                    pending.clear()
                    await self._send_file_submission(link, submission)
            # Releases wait for a token (a release issued), for their report's state
            # (stored), or for their submission to go out on this link (this pass).
            if changed_since(rows.RELEASES, rows.OUTBOX_STATE) or submissions:
                releases = store.releases_to_send(after=after_release, submitted=submitted)
                # A release of a report the relay stored (not submitted on this link)
                # goes out on the strength of that state too. (A queued submission
                # stored, rows.STORED, was submitted on this link: that alone makes no
                # release sendable, so it is not looked for; its batch is waited for.)
                stored = any(release.report not in submitted for release in releases)
                kinds = (
                    (rows.RELEASES, rows.OUTBOX_STATE, rows.STORED) if stored else (rows.RELEASES,)
                )
                if releases:
                    need = max(need, store.batch_of(*kinds))
                for release in releases:
                    after_release = release.seq
                    if release.token not in inline_tokens:
                        pending.append((release.report, m.Release(token=release.encoded)))
            # Revocations wait for their report to leave the queue (none to look for
            # while no revocation was pending at open or recorded since).
            if (
                changed_since(rows.REVOCATIONS, rows.OUTBOX_STATE, rows.STORED)
                and store.revocations_known
            ):
                batch = store.batch_of(rows.REVOCATIONS, rows.OUTBOX_STATE, rows.STORED)
                for revocation in store.revocations_to_send():
                    if revocation.id not in sent_revocations:
                        need = max(need, batch)
                        sent_revocations.add(revocation.id)
                        pending.append(
                            (None, m.Revoke(report=revocation.report, token=revocation.token))
                        )
            # Once per connection until the relay confirms it (ack kind "receipt"): a
            # receipt lost with a connection is sent again on the next one. Read at the
            # connection's start only: a report stored while it is up sends its receipt
            # as its delivery's ack (_on_deliver; those are left out here).
            if session.receipts_sent is not None:
                batch = store.batch_of(rows.INBOX)
                for _seq, token_id, receipt in store.receipts_to_send():
                    if token_id not in session.receipts_sent:
                        need = max(need, batch)
                        pending.append((None, m.SendReceipt(receipt=receipt)))
                session.receipts_sent = None
            # Announcements, requests and denials, until the relay acks each (resent on
            # the next connection otherwise; the relay takes a resend as one).
            if changed_since(rows.CONSENT):
                batch = store.batch_of(rows.CONSENT)
                for row in store.consent_to_send(after=after_consent):
                    need = max(need, batch)
                    after_consent = row.seq
                    pending.append((None, m.SendConsent(kind=row.kind, data=row.data)))
            if pending:
                await self._durable(need)
                await self._send_pending(link, pending, withdrawals)
            await self._wait_change(sendable_changes, start)

    def _withdrawn(self, report: bytes) -> bool:
        submission = self.store.submission(report)
        return submission is not None and submission.state == "withdrawn"

    async def _send_pending(
        self, link: Link, pending: list[tuple[bytes | None, m.Message]], withdrawals: int
    ) -> None:
        """Send ``pending`` in one write, less what belongs to a report withdrawn since
        the pass began (checked only if a withdrawal happened: no query otherwise)."""
        if self._withdrawals != withdrawals:
            gone = {r for r, _ in pending if r is not None and self._withdrawn(r)}
            pending = [(r, message) for r, message in pending if r not in gone]
        reports = {
            message.report
            for _, message in pending
            if isinstance(message, m.SubmitEnd | m.SubmitInline)
        }
        # From here on the relay may get these submissions whole: withdraw() waits for
        # its answer instead of assuming it has nothing.
        self._uploading |= reports
        try:
            await link.send_many([message for _, message in pending])
            if trace.enabled:
                trace.mark_all("S_sent", reports)
            self._uploaded |= reports
        finally:
            self._uploading -= reports
            if reports:
                self._uploads_changed()

    def _uploads_changed(self) -> None:
        self._upload_changed.set()
        self._upload_changed = trio.Event()

    async def _send_file_submission(self, link: Link, submission: Submission) -> None:
        assert submission.path is not None
        report = submission.report
        withdrawals = self._withdrawals
        if self._withdrawn(report):
            return
        self._uploading.add(report)
        try:
            with open(submission.path, "rb") as source:
                async with link.sending():
                    await link.send(_submit_begin(submission))
                    while data := source.read(MAX_CHUNK_DATA):
                        if self._withdrawals != withdrawals and self._withdrawn(report):
                            # Withdrawn mid-upload: only closing the connection stops
                            # it (the relay discards an upload that never ended).
                            raise LinkClosed("submission withdrawn during its upload")
                        await link.send(m.Chunk(data=data))
                    await link.send(m.SubmitEnd(report=report))
            self._uploaded.add(report)
        finally:
            self._uploading.discard(report)
            self._uploads_changed()

    async def _reader(self, session: _Session) -> None:
        """Read the link ahead of the handler (:meth:`_receiver`), at most
        ``limits.read_ahead`` messages, so that a ``prekey_status`` is acted on as soon
        as it arrives rather than after the deliveries written before it (each takes the
        handler an unwrap, a decryption, a signature check and a store step); reading
        also stops while ``limits.read_ahead_bytes`` are held (so at most that plus one
        frame). Everything else is handed to the handler in the order it came; so is a
        status inside a streamed delivery (a protocol error the handler reports as
        before). An error ending the link is queued behind what was read, so the handler
        handles that first (an ``error`` message from the relay included)."""
        link = session.link
        ahead = session.ahead
        limit, limit_bytes = self._limits.read_ahead, self._limits.read_ahead_bytes
        streaming = False  # inside a delivery's chunks
        try:
            while True:
                while len(ahead) >= limit or session.ahead_bytes >= limit_bytes:
                    await session.ahead_changed.wait()
                message = await link.receive()
                session.read += 1
                if isinstance(message, m.PrekeyStatus) and not streaming:
                    self._on_prekey_status(session, message)
                    self._group_commit.mark_dirty()
                    self._notify()
                    continue
                if isinstance(message, m.Refusal) and not message.ref:
                    # Perhaps a refused publish (no ref either): it was not stored. In
                    # the order of the statuses, which are handled here; the refusal
                    # itself is handled in order with the rest.
                    self._publish_refused(session, message)
                if isinstance(message, m.Deliver):
                    streaming = True
                elif isinstance(message, m.DeliverEnd):
                    streaming = False
                size = _held_bytes(message)
                ahead.append((message, size))
                session.ahead_bytes += size
                session.ahead_moved()
        except Exception as exc:  # handed to the handler, raised there in order
            ahead.append((exc, 0))
            session.ahead_moved()
        await trio.sleep_forever()

    async def _next_message(self, session: _Session) -> m.Message:
        """The next message the reader queued (waiting for one); raises the error
        that ended reading once everything read before it is handled."""
        ahead = session.ahead
        if ahead and trio.current_time() >= session.pause_at:
            # A delivery's handling does not otherwise pause, so without this the reader
            # (and the prekey keeper a status wakes) would wait until everything read
            # ahead is handled. Not after every message: each pause wakes the other
            # tasks (the sender's store queries, the replier, each with a write), which
            # would then work one message at a time instead of one batch.
            await self._pause_for_reader(session)
        while not ahead:
            await session.ahead_changed.wait()  # a pause too
            session.pause_at = trio.current_time() + READ_AHEAD_PAUSE
        message, size = ahead.popleft()
        session.ahead_bytes -= size
        session.ahead_moved()
        if isinstance(message, Exception):
            raise message
        return message

    @staticmethod
    async def _pause_for_reader(session: _Session) -> None:
        """Let the reader catch up with all that has arrived: a pass of the scheduler
        lets it make one socket read, so pause until two passes in a row (it may run
        before or after this task in a pass) read nothing."""
        quiet = 0
        while quiet < 2:
            read = session.read
            await trio.lowlevel.checkpoint()
            quiet = quiet + 1 if session.read == read else 0
        session.pause_at = trio.current_time() + READ_AHEAD_PAUSE

    async def _receiver(self, session: _Session) -> None:
        while True:
            message = await self._next_message(session)
            self._group_commit.activity += 1
            while len(session.replies) >= MAX_QUEUED_REPLIES:
                if session.lazy_wake is not None:
                    session.lazy_wake.set()  # a full queue is urgent
                await session.replies_changed.wait()
            if isinstance(message, m.Prekeys | m.Refusal) and message.ref in session.prekey_waiters:
                # The answer to a prekey fetch (or its refusal): to the task waiting.
                waiter = session.prekey_waiters.pop(message.ref)
                if isinstance(message, m.Prekeys):
                    self.prekey_counts["received_" + waiter.purpose] += len(message.one_time)
                waiter.put(message.ref, message)
                continue
            if isinstance(message, m.Prekeys) and message.one_time:
                # Its fetch gave up waiting (the connection was ending): dropped.
                self.prekey_counts["lost_late"] += len(message.one_time)
                continue
            if isinstance(message, m.PrekeyStatus):
                # Inside a streamed delivery (the reader handles the others itself).
                raise ProtocolError("'prekey_status' inside a delivery")
            if isinstance(message, m.DeliverInline | m.Deliver):
                await self._on_deliver(session, message)
            elif isinstance(message, m.Stored):
                self._on_stored(message)
            elif isinstance(message, m.Released):
                self._on_released(message)
            elif isinstance(message, m.Refusal):
                if session.audit_waiting and not message.ref and message.reason in _AUDIT_REFUSALS:
                    # The relay answers an audit_fetch it cannot serve with a refusal
                    # (ref empty) and goes on: hand it to the fetch that waits for it.
                    refusal = Refused(Reason(message.reason), message.detail)
                    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                        session.audit_replies.send_nowait(refusal)
                self._on_refusal(session, message)
            elif isinstance(message, m.ReceiptNotice):
                self._on_receipt(session, message)
            elif isinstance(message, m.Ack) and message.kind == "receipt":
                # The relay holds our receipt of that delivery: stop resending it.
                self.store.mark_receipt_sent(message.token)
            elif isinstance(message, m.Ack) and message.kind in m.CONSENT_KINDS:
                self.store.consent_held(message.kind, message.token)
            elif isinstance(message, m.ConsentNotice):
                self._on_consent(session, message)
            elif isinstance(message, m.Expired):
                self._on_expired(message)
            elif isinstance(message, m.Revoked):
                self._on_revoked(message)
            elif isinstance(message, m.AuditReply):
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    session.audit_replies.send_nowait(message.extract)
            elif isinstance(message, m.ErrorMessage):
                # The relay is closing on us for something we sent: say so, never silently.
                self.store.add_event(
                    RefusedEvent(ref=b"", reason=Reason(message.reason), detail=message.detail)
                )
                self._notify()
                raise LinkClosed(f"relay closed the link: {message.reason}")
            else:
                raise ProtocolError(f"unexpected {message.TYPE!r} from the relay")
            self._group_commit.mark_dirty()
            self._notify()

    def _on_prekey_status(self, session: _Session, message: m.PrekeyStatus) -> None:
        in_flight = session.prekeys_in_flight
        in_flight.status(message.one_time)
        # A member that never published (no signed prekey at the relay) is not running
        # low: it is about to publish its first supply; nor is one whose top-up is on
        # its way.
        if (
            message.signed_not_after
            and message.one_time < self._limits.prekey_low_water
            and not in_flight.total
        ):
            self.store.add_event(
                PrekeysLow(one_time=message.one_time, signed_not_after=message.signed_not_after)
            )
        session.prekey_status = message
        self._prekeys_moved(session)

    def _publish_refused(self, session: _Session, message: m.Refusal) -> None:
        if session.audit_waiting and message.reason in _AUDIT_REFUSALS:
            return  # the answer to the audit_fetch in flight
        session.prekeys_in_flight.refused()
        self._prekeys_moved(session)

    @staticmethod
    def _prekeys_moved(session: _Session) -> None:
        session.prekey_changed.set()
        session.prekey_changed = trio.Event()

    # --- originator side of incoming messages ----------------------------------------

    def _on_stored(self, message: m.Stored) -> None:
        ack = StoredAck.verify(message.ack, self._arrangement)
        if ack.report != message.report or ack.originator != self.name:
            raise VerificationError()
        # The digest and size the ack signs are checked against the row by the write
        # itself; the row is read only when that writes nothing (a copy of an earlier
        # ack, or an ack for a ciphertext this node never submitted). The tokens accepted
        # with the submission (submit_inline), as a `released` would say, are marked in
        # the same step, their events and the ack's in one statement.
        if not self.store.mark_stored(
            message.report,
            message.ack,
            Stored(report=message.report, ack=ack),
            digest=ack.digest,
            size=ack.size,
            released=message.released,
        ):
            submission = self.store.submission(message.report)
            if submission is None or ack.digest != submission.digest or ack.size != submission.size:
                raise VerificationError()
            for token in message.released:
                self._on_released(m.Released(report=message.report, token=token))

    def _on_released(self, message: m.Released) -> None:
        self.store.mark_released(message.token, message.report)

    def _on_refusal(self, session: _Session, message: m.Refusal) -> None:
        reason = Reason(message.reason)
        ref, detail = message.ref, message.detail
        event = RefusedEvent(ref=ref, reason=reason, detail=detail)
        if ref and self.store.consent_refused(ref, reason.value, detail, event):
            return
        entry = self.store.inbox_entry(ref) if ref else None
        if entry is not None and not entry.receipt_sent:
            # The relay will not take this receipt: stop resending it. It stood for the
            # delivery's ack (protocol version 4), and a refused receipt acknowledges
            # nothing, so ack the delivery itself: the report is stored (the receipt
            # went out only after that commit), and a delivery no longer outstanding
            # (the relay gone on since) is acked silently.
            self.store.mark_receipt_sent(ref)
            self.store.add_event(event)
            self._reply(session, m.Ack(kind="delivery", token=ref))
            return
        release = self.store.release(ref)
        if release is not None and release.state != "pending":
            submission = self.store.submission(release.report)
            if submission is not None and submission.state in ("refused", "expired", "revoked"):
                # A release sent right behind a submission the relay refused (or that
                # ended first): settled with the submission, whose refusal came first.
                return
        if release is not None and release.state == "pending":
            submission = self.store.submission(release.report)
            if (
                reason is Reason.UNKNOWN_REPORT
                and submission is not None
                and submission.state == "queued"
            ):
                # Sent right behind a submission the relay did not store (yet): the
                # release goes out again after the submission, on a later connection.
                self.store.add_event(event)
                return
            if reason is Reason.REPLAYED:
                # Only this node holds the key that signs its tokens, so the relay can
                # have seen this id only from us: it consumed the token on an earlier
                # connection whose answer we lost. That is a release, not a refusal.
                self.store.set_release_state(
                    ref,
                    "released",
                    Released(report=release.report, token=ref, recipient=release.recipient),
                )
            else:
                self.store.set_release_state(
                    ref, "refused", event, reason=reason.value, detail=detail
                )
            return
        for token in (ref, None):
            report = self._report_of(ref) if token is not None else ref
            revocation = self.store.pending_revocation(report, token) if report else None
            if revocation is not None:
                self.store.set_revocation_state(
                    revocation.id, "refused", event, reason=reason.value, detail=detail
                )
                return
        submission = self.store.submission(ref)
        if submission is not None and submission.state in ("queued", "withdrawn"):
            if reason is Reason.BUSY:
                # Transient: the relay still holds an upload of this report from one of
                # our earlier connections. Keep it queued (never drop the ciphertext) and
                # reconnect with backoff; the outbox resends it on the next connection.
                self.store.add_event(event)
                raise LinkClosed(f"relay busy with report {ref.hex()}: {detail}")
            self.store.set_submission_state(
                ref, "refused", event, reason=reason.value, detail=detail
            )
            return
        if submission is not None:
            # A release refused by report id (its token did not decode at the relay).
            for candidate in self.store.releases_of(ref):
                if candidate.state == "pending":
                    self.store.set_release_state(
                        candidate.token, "refused", event, reason=reason.value, detail=detail
                    )
                    return
        self.store.add_event(event)

    def _issued(self, token_id: bytes, report: bytes, recipient: str) -> bool:
        """Whether this node issued release ``token_id`` for ``report`` to ``recipient``."""
        release = self.store.release(token_id)
        return release is not None and (release.report, release.recipient) == (report, recipient)

    def _report_of(self, token_id: bytes) -> bytes | None:
        release = self.store.release(token_id)
        return release.report if release else None

    def _on_expired(self, message: m.Expired) -> None:
        event = ExpiredEvent(report=message.report, token=message.token)
        if message.token is not None:
            self.store.force_release_state(message.token, "expired", event)
        elif self.store.submission(message.report) is not None:
            self.store.set_submission_state(message.report, "expired", event, reason="expired")
        else:
            self.store.add_event(event)

    def _on_revoked(self, message: m.Revoked) -> None:
        event = RevokedEvent(report=message.report, token=message.token)
        revocation = self.store.pending_revocation(message.report, message.token)
        if revocation is not None:
            self.store.set_revocation_state(revocation.id, "revoked", event)
        elif message.token is not None:
            self.store.force_release_state(message.token, "revoked", event)
        else:
            self.store.add_event(event)

    def _on_receipt(self, session: _Session, message: m.ReceiptNotice) -> None:
        receipt = Receipt.verify(message.receipt, self._arrangement)
        # The release it names is checked by the insert itself; read only when that
        # adds nothing (a copy of a receipt recorded, or one for no release of ours).
        ours = receipt.originator == self.name and (
            self.store.add_receipt(
                token=receipt.token,
                report=receipt.report,
                recipient=receipt.recipient,
                encoded=receipt.encoded,
                now=self._now(),
                event=ReceiptEvent(receipt=receipt),
                of_release=True,
            )
            or self._issued(receipt.token, receipt.report, receipt.recipient)
        )
        if not ours:
            self.store.add_event(
                RefusedEvent(
                    ref=receipt.token,
                    reason=Reason.WRONG_REPORT,
                    detail="receipt for a release this node did not make",
                )
            )
        self._notify()
        # Lazy: the relay only stops pushing the receipt once it has this.
        self._reply(session, m.Ack(kind="receipt", token=receipt.token), lazy=True)

    # --- consent forwarded by the relay -----------------------------------------------

    def _on_consent(self, session: _Session, message: m.ConsentNotice) -> None:
        """Check an announcement, request or answer, record it with its event (or a
        :class:`ConsentRejected`), and ack it to the relay once that is on disk. A copy
        of one already recorded (the relay resends until acked) is acked again and
        handed over once."""
        ref = b""
        try:
            if message.kind == "announce":
                ref = self._on_announcement(message.data)
            elif message.kind == "request":
                ref = self._on_request(message.data)
            else:
                ref = self._on_answer(message.data)
        except (Refused, VerificationError, ProtocolError) as exc:
            ref = ref or consent_ref(message.kind, message.data)
            self.store.add_event(ConsentRejected(kind=message.kind, ref=ref, error=exc))
        if ref:
            self._reply(session, m.Ack(kind=message.kind, token=ref))

    def _on_announcement(self, data: bytes) -> bytes:
        announcement = Announcement.verify(data, self._arrangement)
        if self.store.announcement_bytes(announcement.id) == data:
            return announcement.id
        if self.name not in announcement.to:
            if announcement.originator == self.name:
                raise Refused(Reason.REFLECTED, "this member's own announcement came back")
            raise Refused(Reason.WRONG_RECIPIENT, "announcement to other members")
        if self.store.announcement_bytes(announcement.id) is not None:
            raise Refused(Reason.REPLAYED, "another announcement had this id")
        self.store.add_announcement(
            announcement, self._now(), AnnouncementEvent(announcement=announcement)
        )
        return announcement.id

    def _on_request(self, data: bytes) -> bytes:
        request = Request.verify(data, self._arrangement)
        held = self.store.request(request.id, "in")
        if held is not None and held.encoded == data:
            return request.id
        submission = self.store.submission(request.report)
        check_incoming_request(
            request,
            self.name,
            seen=held is not None or self.store.seen("request", request.id),
            holds_report=submission is not None,
            now=self._now(),
            clock_skew=self._limits.clock_skew,
        )
        self.store.add_incoming_request(request, RequestEvent(request=request))
        return request.id

    def _on_answer(self, data: bytes) -> bytes:
        answer = Answer.verify(data, self._arrangement)
        made = self.store.request(answer.request, "out") if answer.requester == self.name else None
        if made is not None and made.state == "denied" and self.store.denial_of(made.id) == data:
            return answer.request
        check_answer(
            answer,
            self.name,
            None if made is None else Request.verify(made.encoded, self._arrangement),
            answered=made is not None and made.answered,
        )
        self.store.add_denial(answer, DeniedEvent(answer=answer))
        return answer.request

    # --- recipient side --------------------------------------------------------------

    async def _on_deliver(self, session: _Session, message: m.Deliver | m.DeliverInline) -> None:
        token = ReleaseToken.decode(message.token)
        if trace.enabled:
            trace.mark("T_recv", token.report)
        # The whole ciphertext when it came in the message (deliver_inline), else None:
        # it follows in chunks.
        inline = message.data if isinstance(message, m.DeliverInline) else None
        if inline is not None and len(inline) != token.size:
            raise ProtocolError("inline delivery of another size than its token says")
        # Both seen-set look-ups in one query; nothing below changes the set before
        # the report's is used (no checkpoint in between).
        token_seen, report_seen = self.store.seen_delivery(token.id, token.report)
        if token_seen:
            # A redelivery (our ack was lost, or the relay restarted): already stored or
            # rejected. Acknowledge again (once that is on disk); never hand it over twice.
            if inline is None:
                await self._drain_delivery(session, token)
            self._reply(session, m.Ack(kind="delivery", token=token.id))
            return
        now = self._now()
        error: TisaError | None = None
        opener: ReportOpener | None = None
        unwrapped = False  # the content key came out: a one-time prekey is spent
        try:
            release = check_for_recipient(
                token,
                self._arrangement,
                self._secret,
                self.name,
                now=now,
                clock_skew=self._limits.clock_skew,
                prekey_secret=self.store.prekey_secret,
            )
            unwrapped = True
            if report_seen:
                raise Refused(Reason.REPLAYED, "report delivered before under another token")
            if token.request is not None:
                # Accepted only as the answer to an open request of this member's, to
                # the originator that signed the token, for this report.
                made = self.store.request(token.request, "out")
                check_approval(
                    token,
                    self.name,
                    None if made is None else Request.verify(made.encoded, self._arrangement),
                    answered=made is not None and made.answered,
                )
            opener = release.opener(self._arrangement, max_header=self._limits.max_header)
        except (Refused, VerificationError, ProtocolError) as exc:
            error = exc
        # A small report is opened in memory and kept in its inbox row; a larger one is
        # streamed into files under tmp/.
        staged: pathlib.Path | None = None
        if token.size > self._limits.max_inline_report:
            staged = self.store.tmp_dir / token.id.hex()
        parts: list[bytes] | None = None
        if opener is not None:
            try:
                header, parts = await self._open_delivery(session, token, opener, staged, inline)
            except (Refused, VerificationError) as exc:
                error = exc
        elif inline is None:
            await self._drain_delivery(session, token)
        if error is not None:
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    for child in staged.iterdir():
                        child.unlink()
                    staged.rmdir()
            reason = error.reason.value if isinstance(error, Refused) else "verification"
            self.store.reject_delivery(
                token_id=token.id,
                token=token if not isinstance(error, VerificationError) else None,
                reason=reason,
                detail=str(error),
                now=now,
                events=[DeliveryRejected(token_id=token.id, error=error)],
                consumed=token if unwrapped else None,
            )
        else:
            events: list[Event] = []
            last = self.store.last_counter(token.originator)
            if token.counter > last + 1:
                events.append(
                    ReleaseGap(originator=token.originator, expected=last + 1, got=token.counter)
                )
            if token.request is not None:
                events.append(
                    ApprovedEvent(request=token.request, report=token.report, token=token.id)
                )
            receipt = Receipt.issue(
                self._secret,
                self._arrangement,
                report=token.report,
                token=token.id,
                originator=token.originator,
                recipient=self.name,
                digest=token.digest,
                received=now,
            )
            self.store.store_delivery(
                token=token,
                header=header,
                staged=staged,
                receipt=receipt.encoded,
                now=now,
                events=events,
                parts=parts,
            )
            if trace.enabled:
                trace.mark("T_stored", token.report)
        self._notify()
        # Sent by the replier once the inbox row and the seen-set are committed. A report
        # stored is acknowledged by its signed receipt (protocol version 4: the relay
        # takes an accepted receipt as the delivery's ack), one message instead of two;
        # a rejected delivery has no receipt and is acked as such.
        if error is None:
            if session.receipts_sent is not None:
                session.receipts_sent.add(token.id)
            self._reply(session, m.SendReceipt(receipt=receipt.encoded))
        else:
            self._reply(session, m.Ack(kind="delivery", token=token.id))

    async def _open_delivery(
        self,
        session: _Session,
        token: ReleaseToken,
        opener: ReportOpener,
        staged: pathlib.Path | None,
        inline: bytes | None = None,
    ) -> tuple[Any, list[bytes] | None]:
        """Stream the ciphertext through ``opener`` into files under ``staged`` (or,
        with ``staged`` None, into memory). ``inline``: the whole ciphertext, come in
        a ``deliver_inline`` (of the token's size); else it is read from the link.

        Returns the verified header and, in memory, the parts (body, attachments); the
        files are fsynced. Raises Refused or VerificationError for a bad report (the
        stream is read to its end first), and ProtocolError when the relay breaks the
        stream rules.
        """
        if staged is not None:
            if staged.exists():
                for child in staged.iterdir():
                    child.unlink()
            else:
                staged.mkdir()
        files: dict[int, BinaryIO] = {}
        failure: TisaError | None = None
        self._set_receiving(token, 0)
        try:
            received = 0
            async for chunk in self._ciphertext(session, token, inline):
                received += len(chunk)
                self._set_receiving(token, received)
                if failure is not None:
                    continue
                try:
                    pieces = opener.feed(chunk)
                except (Refused, VerificationError) as exc:
                    failure = exc
                    continue
                for part, data in pieces:
                    out = files.get(part)
                    if out is None:
                        name = "body" if part == 0 else f"a{part - 1}"
                        out = files[part] = (
                            io.BytesIO() if staged is None else open(staged / name, "wb")  # noqa: SIM115
                        )
                    out.write(data)
            if failure is not None:
                raise failure
            header = opener.finish()
            count = 1 + len(header.attachments)
            if staged is None:
                return header, [
                    files[part].getvalue() if part in files else b""  # type: ignore[attr-defined]
                    for part in range(count)
                ]
            # Parts with no bytes still get a file, so the inbox layout is uniform.
            for part in range(count):
                if part not in files:
                    name = "body" if part == 0 else f"a{part - 1}"
                    files[part] = open(staged / name, "wb")  # noqa: SIM115
            for out in files.values():
                out.flush()
                os.fsync(out.fileno())
            return header, None
        finally:
            self._set_receiving(token, None)
            for out in files.values():
                out.close()

    async def _drain_delivery(self, session: _Session, token: ReleaseToken) -> None:
        async for _ in self._ciphertext(session, token, None):
            pass

    async def _ciphertext(
        self, session: _Session, token: ReleaseToken, inline: bytes | None
    ) -> AsyncIterator[bytes]:
        """The ciphertext of a delivery: ``inline`` (a ``deliver_inline``'s, checked
        against the token's size by the caller), else the ``chunk`` messages read from
        the link (through the reader) up to its ``deliver_end``.

        Raises:
            ProtocolError: the relay broke the stream rules (more or fewer bytes than
                the token's size, another message inside, an end under another token).
        """
        if inline is not None:
            yield inline
            return
        received = 0
        while True:
            message = await self._next_message(session)
            if isinstance(message, m.Chunk):
                received += len(message.data)
                if received > token.size:
                    raise ProtocolError("delivery longer than its token says")
                yield message.data
            elif isinstance(message, m.DeliverEnd):
                if message.token != token.id or received != token.size:
                    raise ProtocolError("delivery ended early or under another token")
                return
            else:
                raise ProtocolError(f"{message.TYPE!r} inside a delivery")


# --- module helpers ------------------------------------------------------------------

# Bytes counted for a message read ahead besides its byte strings (the object itself).
READ_AHEAD_OVERHEAD = 256


def _held_bytes(message: m.Message) -> int:
    """About the memory ``message`` holds while read ahead: its byte strings (a
    delivery's data, a token, an audit extract; those in lists too) plus
    :data:`READ_AHEAD_OVERHEAD`."""
    size = READ_AHEAD_OVERHEAD
    for name in message.SCHEMA:
        value = getattr(message, name)
        if isinstance(value, bytes):
            size += len(value)
        elif isinstance(value, list | tuple):
            size += sum(len(item) for item in value if isinstance(item, bytes))
    return size


def _head_at(extract: Extract, seq: int) -> bytes | None:
    """The chain head after entry ``seq`` of an extract (verified before)."""
    head, at = extract.start_head, extract.start_seq
    for item in extract.items:
        at += 1
        head = chain_next(head, item.content_hash if isinstance(item, AuditEntry) else item)
        if at == seq:
            return head
    return None


def _check_window(value: float, what: str, maximum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
        raise UsageError(f"{what} must be at least one second")
    if maximum is not None and value > maximum:
        raise UsageError(f"{what} must be at most {maximum} seconds")


def _part(value: bytes | os.PathLike[str]) -> bytes | pathlib.Path:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, os.PathLike):
        return pathlib.Path(value)
    raise UsageError("content is bytes or a path")


def _seal_to_file(
    sealer: ReportSealer,
    parts: list[bytes | pathlib.Path],
    target: pathlib.Path,
    progress: Callable[[int, int], None] | None,
    total: int,
) -> None:
    with open(target, "wb") as out:
        _seal_to(sealer, parts, out, progress, total, True)


def _seal_to(
    sealer: ReportSealer,
    parts: list[bytes | pathlib.Path],
    out: BinaryIO,
    progress: Callable[[int, int], None] | None,
    total: int,
    sync: bool,
    *,
    in_trio: bool = False,
) -> None:
    # Runs in a worker thread (file I/O and encryption, never the store), or with
    # in_trio in the trio thread for a small report given as bytes.
    done = 0

    def report(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            if in_trio:
                progress(done, total)
            else:
                trio.from_thread.run_sync(progress, done, total)

    out.write(sealer.start())
    for part in parts:
        if isinstance(part, bytes):
            for start in range(0, len(part), CHUNK_SIZE):
                piece = part[start : start + CHUNK_SIZE]
                out.write(sealer.write(piece))
                report(len(piece))
        else:
            source: IO[bytes]
            with open(part, "rb") as source:
                while piece := source.read(CHUNK_SIZE):
                    out.write(sealer.write(piece))
                    report(len(piece))
    # finish_iter pads a chunk at a time: PADME padding of a 1 GiB report is up to
    # 32 MiB, which finish() would build in memory at once.
    for piece in sealer.finish_iter():
        out.write(piece)
    if sync:
        out.flush()
        os.fsync(out.fileno())


def _inline(path: pathlib.Path, size: int) -> bytes | pathlib.Path:
    return path.read_bytes() if size <= INLINE_MAX else path


def _final_refusal(state: str, reason: str | None, detail: str | None) -> Refused:
    if state == "refused":
        return Refused(Reason(reason or "internal"), detail or "")
    if state == "revoked":
        return Refused(Reason.REVOKED, detail or "revoked")
    if state == "expired":
        return Refused(Reason.EXPIRED, detail or "expired at the relay")
    if state in ("withdrawn", "dropped"):
        # Taken back by this node (Node.withdraw, Node.drop) before the relay stored it.
        return Refused(Reason.REVOKED, f"{state} by this node before the relay stored it")
    return Refused(Reason(reason or "internal"), detail or state)


def relay_addresses(
    relay_addr: tuple[str, int] | Sequence[tuple[str, int]],
) -> list[tuple[str, int]]:
    """One relay address, or a list of them, as a list.

    Raises:
        UsageError: the list is empty.
    """
    if len(relay_addr) == 2 and isinstance(relay_addr[0], str):
        return [cast(tuple[str, int], relay_addr)]
    addresses = list(cast(Sequence[tuple[str, int]], relay_addr))
    if not addresses:
        raise UsageError("no relay address")
    return addresses


@contextlib.asynccontextmanager
async def open_node(
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    relay_addr: tuple[str, int] | Sequence[tuple[str, int]],
    store_path: str | os.PathLike[str],
    *,
    limits: Limits = DEFAULT_LIMITS,
    clock: Callable[[], float] = time.time,
    backoff: Backoff = DEFAULT_BACKOFF,
) -> AsyncIterator[Node]:
    """Run a member node for the duration of the ``async with`` block.

    Args:
        secret: this member's keys.
        name: this member's name in ``arrangement``.
        arrangement: the effective arrangement.
        relay_addr: ``(host, port)`` of the relay, or a list of them: relay processes
            serving the arrangement from one store (docs/deployment.md), tried in turn
            when a connection fails.
        store_path: the node's store directory (created if missing; one node at a time).
        limits: limits applied to the link and to reports.
        clock: unix time in seconds (injected in tests).
        backoff: reconnection delays.

    Yields:
        The running :class:`Node`; it connects in the background.

    Raises:
        Refused: ``name`` is not a member of ``arrangement`` (``not_a_member``).
        UsageError: ``secret`` is not ``name``'s key, or the store belongs to another
            member.
    """
    member = arrangement.member(name)
    if secret.public != member.identity:
        raise UsageError(f"this key is not {name!r}'s key in the arrangement")
    store = MemberStore(store_path, name, group_commit=True)
    try:
        async with trio.open_nursery() as nursery:
            node = Node(
                secret=secret,
                name=name,
                arrangement=arrangement,
                relay_addr=relay_addr,
                store=store,
                limits=limits,
                clock=clock,
                backoff=backoff,
            )
            if trace.enabled:
                trace.instrument()
            nursery.start_soon(node._run)
            nursery.start_soon(node._pump_events)
            nursery.start_soon(node._group_commit.run_background_commits)
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    finally:
        store.close()


# Re-exported for callers that want every error the node may raise in one clause.
NODE_ERRORS = (RemoteError, UsageError)


def _submit_begin(submission: Submission) -> m.SubmitBegin:
    return m.SubmitBegin(
        report=submission.report,
        size=submission.size,
        digest=submission.digest,
        expires=submission.expires,
    )


def _submit_inline(submission: Submission, tokens: list[bytes]) -> m.SubmitInline:
    """A small submission (at most MAX_INLINE_CIPHERTEXT bytes) whole in one message,
    with the ``tokens`` issued for it so far."""
    data = submission.data
    if data is None:  # kept in a file (a lowered max_inline_report)
        assert submission.path is not None
        data = submission.path.read_bytes()
    return m.SubmitInline(
        report=submission.report,
        digest=submission.digest,
        expires=submission.expires,
        data=data,
        tokens=tokens,
    )


def _receipt_acks_merged(ready: list[m.Message]) -> list[m.Message]:
    """``ready`` (acks whose batches are on disk, in order) with its acks of receipts
    sent as one ``ack_receipts`` where there are several (protocol version 4: one
    message for the receipts a burst brought), in the place of the first; the relay
    takes each as the ``ack`` it stands for. Sending an ack earlier than its place is
    safe: everything in ``ready`` is on disk."""
    receipts = [
        message.token
        for message in ready
        if isinstance(message, m.Ack) and message.kind == "receipt"
    ]
    if len(receipts) < 2:
        return ready
    merged: list[m.Message] = []
    for message in ready:
        if not (isinstance(message, m.Ack) and message.kind == "receipt"):
            merged.append(message)
        elif receipts:
            for start in range(0, len(receipts), m.MAX_RECEIPT_ACKS):
                merged.append(m.AckReceipts(tokens=receipts[start : start + m.MAX_RECEIPT_ACKS]))
            receipts = []
    return merged


def _handed_out(answer: m.Message, recipient: str) -> tuple[bytes | None, bytes | None]:
    """(signed prekey, one-time prekey) of the relay's ``answer`` to a fetch of
    ``recipient``'s prekeys, encoded as handed out (None: none given);
    :func:`tisa.token.issue_token` checks them.

    Raises:
        Refused: the relay refused the fetch (``wrong_role``, ...), or answered with
            another member's prekeys (``bad_prekey``).
    """
    if isinstance(answer, m.Refusal):
        raise Refused(Reason(answer.reason), answer.detail)
    assert isinstance(answer, m.Prekeys)
    if answer.member != recipient:
        raise Refused(Reason.BAD_PREKEY, "the relay answered with another member's prekeys")
    return answer.signed, answer.one_time[0] if answer.one_time else None


def _submission_messages(submission: Submission, data: bytes) -> list[m.Message]:
    """A small submission whole: begin, its chunks, end (sent in one write)."""
    messages: list[m.Message] = [_submit_begin(submission)]
    messages.extend(m.chunks_of(data))
    messages.append(m.SubmitEnd(report=submission.report))
    return messages
