"""The relay node: stores sealed reports, checks and consumes release tokens, forwards.

:class:`Relay` holds the state (store, connections, caps) and serves one stream per
call of :meth:`Relay.handle_stream`, so tests can drive it over memory streams;
:func:`serve` runs it on TCP. The session protocol is ``docs/node-protocol.md``.

Per connection: the handshake comes first (:func:`tisa_io.link.accept_member`, with
the connection caps checked once ``finish`` authenticated the member), then two tasks
share the link: a reader that handles what the member sends, and a pusher that sends the
member what the store holds for it (deliveries, receipts, consent, notices) and waits
to be woken when more is queued. The pusher reads a kind of row only when it may hold
something new: the store counts, per member and kind, the steps that queue such rows
(:meth:`relay.consentstore.ConsentTables.changes`), and a kind whose count did not move
since the pusher last read all there was is not queried, so a wake-up for another kind
or a change that queued nothing runs no statement (see :meth:`Relay._push_loop` for
when it reads everything again: a rescan, a rolled-back batch, another relay process's
notification). A delivery made pending by an inline submission is handed to the
pushers of its recipient's connections in this process (SQLite: a store of this process
alone) with its row and ciphertext (:class:`_Handed`): the pusher takes the hand-offs in
place of its queries when they are exactly what the queries would find (the store's
count of the member's deliveries moved by them alone since it last read all there was;
a release not handed over or a batch rolled back makes it query as before), still sends
each only once its batch is on disk, and reads a delivery's state again if an ack, a
revocation or an expiry came since its hand-off. Anything that goes wrong on one
connection ends that connection only: the connection task catches every exception at
its boundary, logs it and closes.

Availability: connections in their handshake are counted per source address
(:class:`_HandshakePool`); when a source or the whole pool is full, the oldest
handshake of that source (or of the busiest source) is shed, so a flood from a few
addresses cannot keep members out, and authenticated members never compete with
handshakes for room. A delivery pushed on a connection is claimed by it (no other
connection of the member pushes it) only until ``Limits.claim_timeout`` passes without
the link taking its frames or the member acking it (:meth:`Relay._claim_watch`); new
deliveries go to the member's newest connection that has no lapsed claim, so a stale
connection left by a network drop holds nothing for long.

Group commit: the store runs every step in one open transaction (see
:mod:`relay.store`). The reader does not wait for the disk: it handles the next message
at once and queues its answer, tagged with the batch it depends on; a third task per
connection, the replier, sends each answer once its batch is committed, and the pusher
waits the same way before each thing it sends. Whoever waits first commits, after
letting every task with work at hand add its steps (:meth:`Relay._durable`), so a burst
of submissions, releases and acks from any number of connections costs one fsync, and
no answer ever precedes the commit of what it announces. Under load commits are spaced
(:data:`tisa_io.durable.COMMIT_SPACING`) so that batches grow instead of the fsyncs multiplying.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import trio

from relay.consentstore import CONSENT, DELIVERIES, NOTICES, RECEIPTS
from relay.metrics import MetricsLimits, RelayMetrics, serve_metrics
from relay.prekeystore import PREKEY_RATE_WINDOW
from relay.storage import RelayStore, SharedStore, StoreUnavailable, Upload, open_store
from relay.store import InlineBlob, NoticeRow, ReportRow, TokenRow
from tisa.arrangement import Arrangement, Role
from tisa.audit import MAX_EXTRACT_ENTRIES, Checkpoint, Extract
from tisa.consent import Announcement, Answer, Request, consent_ref
from tisa.envelope import open_envelope
from tisa.errors import (
    LimitExceeded,
    LocalError,
    ProtocolError,
    Reason,
    Refused,
    TisaError,
    UsageError,
    VerificationError,
)
from tisa.handshake import STREAM_OVERHEAD
from tisa.keys import MemberSecret
from tisa.limits import DEFAULT_LIMITS, MAX_INLINE_CIPHERTEXT, Limits
from tisa.messages import (
    INLINE_OVERHEAD,
    INLINE_TOKEN_OVERHEAD,
    MAX_CHUNK_DATA,
    Ack,
    AckReceipts,
    AuditFetch,
    AuditReply,
    Chunk,
    ConsentNotice,
    Deliver,
    DeliverEnd,
    DeliverInline,
    ErrorMessage,
    Expired,
    FetchPrekeys,
    Message,
    Prekeys,
    PrekeyStatus,
    PublishPrekeys,
    ReceiptNotice,
    Refusal,
    Release,
    Released,
    Revoke,
    Revoked,
    SendConsent,
    SendReceipt,
    Stored,
    SubmitBegin,
    SubmitEnd,
    SubmitInline,
    chunks_of,
)
from tisa.prekeys import Prekey, PrekeyKind
from tisa.receipt import MAX_RECEIPT_SIZE, Receipt, StoredAck
from tisa.token import ReleaseToken, check_for_relay
from tisa_io import trace
from tisa_io.durable import GroupCommitter
from tisa_io.link import (
    ERROR_GRACE,
    Link,
    LinkClosed,
    LinkTimeout,
    accept_member,
)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):,.1f} MiB"


def _peer(stream: trio.abc.Stream) -> str:
    """``host:port`` of a TCP stream's remote end, or ``?`` (a memory stream in tests)."""
    try:
        host, port = stream.socket.getpeername()[:2]  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, TypeError):
        return "?"
    return f"{host}:{port}"


__all__ = [
    "MAX_HOLD",
    "EXPIRY_INTERVAL",
    "UNKNOWN_SOURCE",
    "Relay",
    "serve",
    "source_key",
    "source_of",
]

log = logging.getLogger("relay")
# The remote address of the connection a task serves, for its log lines.
_peer_address: contextvars.ContextVar[str] = contextvars.ContextVar("peer", default="?")

# Longest time the relay holds a report no one has released: a week covers a weekend
# of consultations between capitals; an originator wanting longer resubmits.
MAX_HOLD = 7 * 24 * 3600

# Seconds between expiry sweeps. Expiry is a bound, not a precise moment; a few
# seconds late is harmless and the sweep is one indexed query.
EXPIRY_INTERVAL = 5.0

# Source of streams with no peer address (memory streams in tests, unix sockets): all
# one source, for the per-source handshake limit.
UNKNOWN_SOURCE = "?"

# Bytes of entries in one audit extract, under the AuditReply field limit (200,000)
# with room for the checkpoint and msgpack overhead.
MAX_EXTRACT_BYTES = 150_000

# Deliveries read from the store per query, so a long queue is not loaded whole.
DELIVERY_BATCH = 64

# Refusal detail text, in UTF-8 bytes (the message field allows 512).
MAX_DETAIL = 400

# Answers queued on one connection, waiting for their batch to commit, before its
# reader stops reading: a member that floods the relay is slowed to the disk's pace.
MAX_QUEUED_REPLIES = 1024
# Audit extracts waiting to be sent on one connection. Each can be ~128 KiB while other
# replies are a few hundred bytes, so they get a cap of their own: a member fetches
# again when it has read the extract it asked for.
MAX_QUEUED_AUDIT_REPLIES = 2
# Receipts or notices read from the store per query when pushing them to a member.
NOTICE_PAGE = 256
# Deliveries a reader hands to one connection's pusher in memory (see _Handed) before
# its pusher takes them: past this many the hand-off is dropped, and none is made until
# the pusher took what there was; it reads the store as without one. The lone report
# gains from it (relay alone, one report at a time: -3.4 % instructions per report);
# in a burst the pusher reads by the page, one query for many, and every hand-off past
# the first costs the reader for nothing (the burst: +1.5 % with 8 here, +0.5 % with 1).
MAX_HANDED = 1


def _detail(text: str) -> str:
    return text.encode("utf-8")[:MAX_DETAIL].decode("utf-8", "ignore")


def source_of(stream: trio.abc.Stream) -> str:
    """The source a connection counts against for ``max_handshakes_per_source``: the
    peer's IPv4 address, or the /64 prefix of its IPv6 address (one subscriber usually
    holds a whole /64, so counting single IPv6 addresses would not bound anyone); an
    IPv4-mapped IPv6 address counts as the IPv4 address. :data:`UNKNOWN_SOURCE` for a
    stream that is not a TCP socket, or whose peer is already gone."""
    if not isinstance(stream, trio.SocketStream):
        return UNKNOWN_SOURCE
    try:
        host = stream.socket.getpeername()[0]
    except OSError:
        return UNKNOWN_SOURCE
    return source_key(host, stream.socket.family)


def source_key(host: str, family: int = socket.AF_INET) -> str:
    """The source key of a peer address (see :func:`source_of`)."""
    if family != socket.AF_INET6:
        return host
    address = ipaddress.IPv6Address(host.partition("%")[0])
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


@dataclasses.dataclass(eq=False)
class _Handshake:
    """One connection in its handshake: shed by cancelling ``scope``."""

    source: str
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)


class _HandshakePool:
    """The connections in their handshake, by source, oldest first.

    Never refuses: a connection over ``max_handshakes_per_source`` sheds its source's
    oldest handshake, and one over ``max_handshakes`` the oldest of the source holding
    the most (the first to have come among equals). An honest member's handshake is
    short and its source holds few, so a flood from a few addresses sheds only its own
    connections; shedding instead of refusing means a flood cannot keep newcomers out
    just by being there first.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        # source -> its handshakes in arrival order (a dict used as an ordered set).
        self._by_source: dict[str, dict[_Handshake, None]] = {}
        self.count = 0
        self.shed_total = 0

    def enter(self, source: str) -> _Handshake:
        """Register a new handshake from ``source``, shedding one if a limit is full."""
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self._limits.max_handshakes_per_source:
            self._shed(next(iter(mine)))
        elif self.count >= self._limits.max_handshakes:
            busiest = max(self._by_source.values(), key=len)
            self._shed(next(iter(busiest)))
        entry = _Handshake(source)
        self._by_source.setdefault(source, {})[entry] = None
        self.count += 1
        return entry

    def leave(self, entry: _Handshake) -> None:
        """Unregister ``entry`` (idempotent: a shed entry has left already)."""
        mine = self._by_source.get(entry.source)
        if mine is None or entry not in mine:
            return
        del mine[entry]
        if not mine:
            del self._by_source[entry.source]
        self.count -= 1

    def _shed(self, entry: _Handshake) -> None:
        self.leave(entry)
        entry.scope.cancel()
        self.shed_total += 1


class StoreFailed(LocalError):
    """The relay's store cannot make anything durable any more (a WAL fsync failed);
    :meth:`Relay.serve_tcp` and :func:`serve` stop with it."""


@dataclasses.dataclass(eq=False)
class _Upload:
    report: bytes
    size: int
    digest: bytes
    expires: int
    writer: Upload | None = None
    refused: Refused | None = None
    received: int = 0
    # An inline submission whose id was not looked up: a report already stored under it
    # is found when its row is inserted (Store.add_report(if_new=True)).
    unchecked: bool = False

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


@dataclasses.dataclass(eq=False)
class _Feed:
    """How far a connection's pusher has read one kind of rows queued for its member."""

    kind: str
    # The seq of the last row read.
    after: int = 0
    # The store's count of changes of this kind for the member (RelayStore.changes)
    # taken before the last query that read all there was; -1: read again.
    seen: int = -1


@dataclasses.dataclass(eq=False)
class _Feeds:
    """A pusher's :class:`_Feed` of each kind."""

    deliveries: _Feed = dataclasses.field(default_factory=lambda: _Feed(DELIVERIES))
    receipts: _Feed = dataclasses.field(default_factory=lambda: _Feed(RECEIPTS))
    consent: _Feed = dataclasses.field(default_factory=lambda: _Feed(CONSENT))
    notices: _Feed = dataclasses.field(default_factory=lambda: _Feed(NOTICES))


@dataclasses.dataclass(slots=True, eq=False)
class _Handed:
    """A delivery the reader made pending for a member with a connection here, handed
    to that connection's pusher in memory, so it finds the row and its ciphertext
    without a query (:meth:`Relay._take_handed`). Good only while the store's count of
    the member's deliveries (``changes``) moved by exactly the hand-offs since the
    pusher last read them all: a release not handed over, or a batch rolled back,
    moves it too, and the pusher reads the store as before."""

    row: TokenRow
    data: bytes  # the report's ciphertext (stored in its row)
    batch: int  # the batch of the release's step: on disk before the delivery goes out
    count: int  # store.changes(member, DELIVERIES) right after the release's step
    # Relay._owed_epoch at the release: a delivery may have stopped being owed since
    # (an ack, a revocation, an expiry) only if it moved.
    epoch: int


class _Paged(Protocol):
    # A row a pusher reads a page of (ReceiptRow, ConsentRow, NoticeRow).
    @property
    def seq(self) -> int: ...


_Row = TypeVar("_Row", bound=_Paged)


@dataclasses.dataclass(eq=False)
class _Connection:
    link: Link
    member: str
    cancel: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    # Set (poke) when something for the member may have changed: the pusher looks.
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)
    # The pusher's event while it waits lazily for a receipt's batch: poke sets it too.
    push_lazy: trio.Event | None = None
    # The pusher reads the member's deliveries from the start again.
    rescan: bool = False
    # Deliveries handed over by readers since the pusher last took them (_Handed);
    # handed_full: more came than MAX_HANDED, none is handed over until it takes them.
    handed: list[_Handed] = dataclasses.field(default_factory=list)
    handed_full: bool = False
    # Set when another connection of the member failed while sending notices it had
    # claimed: this one reads the member's notices from the start again.
    rescan_notices: bool = False
    # Another relay process may have queued anything for the member: the pusher reads
    # every kind again, whatever this process's counts say (Relay._store_changed).
    stale: bool = False
    # The pusher stopped reading deliveries with delivery_window of them in flight: an
    # ack that makes room wakes it (only then: an ack otherwise changes nothing to push).
    window_full: bool = False
    upload: _Upload | None = None
    error: tuple[Reason, str] | None = None
    claims: set[bytes] = dataclasses.field(default_factory=set)
    # Deliveries pushed on this connection and not acked yet (at most delivery_window).
    in_flight: set[bytes] = dataclasses.field(default_factory=set)
    # Claims of this connection -> the trio time at which each lapses (claim_timeout
    # after the last frame of it the link took), earliest first: a refreshed claim
    # moves to the end, and deadlines only grow.
    deadlines: dict[bytes, float] = dataclasses.field(default_factory=dict)
    deadlines_added: trio.Event = dataclasses.field(default_factory=trio.Event)
    # A claim of this connection lapsed and it has acked no delivery since: while the
    # member has a connection that is not overdue, this one is passed over.
    overdue: bool = False
    # Order of arrival among all connections: new deliveries go to the member's newest
    # connection that is not overdue (after a network drop, the one it reconnected on).
    serial: int = 0
    # Answers waiting for their batch to commit: (batch, message, lazy); a lazy one
    # does not force a commit of its own (see Relay._reply).
    replies: collections.deque[tuple[int, Message, bool]] = dataclasses.field(
        default_factory=collections.deque
    )
    replies_changed: trio.Event = dataclasses.field(default_factory=trio.Event)
    # Answers in ``replies`` that are not lazy.
    urgent_replies: int = 0
    # The replier's event while it waits lazily (GroupCommitter.durable_lazily): set
    # when an answer that is not lazy, or a full queue, needs a commit now.
    lazy_wake: trio.Event | None = None
    # Audit extracts queued in ``replies`` (up to ~128 KiB each): at most
    # MAX_QUEUED_AUDIT_REPLIES, so a member that asks and never reads holds little.
    audit_queued: int = 0
    # A prekey_status is due to this member (a handout left its one-time supply below
    # prekey_low_water): the batch of the latest such handout, else None. The pusher
    # sends it, counted afresh, ahead of the next deliveries it writes.
    prekey_status_due: int | None = None

    def poke(self) -> None:
        """Wake the pusher: something for the member may have changed."""
        self.wake.set()
        if self.push_lazy is not None:
            self.push_lazy.set()

    def changed(self) -> None:
        self.replies_changed.set()
        self.replies_changed = trio.Event()

    def fail(self, reason: Reason | None, detail: str = "") -> None:
        """End the connection; with a reason, tell the member first."""
        if self.error is None and reason is not None:
            self.error = (reason, _detail(detail))
        self.cancel.cancel()


class Relay:
    """The relay's state and per-connection logic.

    Args:
        secret: the relay's keys (the arrangement's relay member).
        arrangement: the effective arrangement served.
        store_path: the durable store: a directory (SQLite, created if missing) or a
            ``postgresql://`` address (:mod:`relay.pgstore`); see :func:`relay.storage.open_store`.
        limits: frame, report, deadline, connection and queue limits.
        clock: unix time in seconds; injected by tests.
        max_hold: longest time a submitted report is held unreleased, in seconds.
        expiry_interval: seconds between expiry sweeps in :meth:`run_expiry`.

    Raises:
        UsageError: ``secret`` is not the relay's key in ``arrangement``.
    """

    def __init__(
        self,
        secret: MemberSecret,
        arrangement: Arrangement,
        store_path: str | os.PathLike[str],
        *,
        limits: Limits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        max_hold: int = MAX_HOLD,
        expiry_interval: float = EXPIRY_INTERVAL,
    ) -> None:
        if secret.public != arrangement.member(arrangement.relay).identity:
            raise UsageError("this key is not the relay's key in the arrangement")
        self.secret = secret
        self.arrangement = arrangement
        self.limits = limits
        self.clock = clock
        self.max_hold = max_hold
        self.expiry_interval = expiry_interval
        self.store: RelayStore = open_store(store_path, group_commit=True)
        # A store other relay processes share (PostgreSQL): claims across processes, and
        # word of what they queued (see _store_changed).
        self._shared = self.store if isinstance(self.store, SharedStore) else None
        self._connections: dict[str, set[_Connection]] = {}
        self._admitted: dict[str, int] = {}
        self._admitted_total = 0
        self._handshakes = _HandshakePool(limits)
        self._uploading: set[bytes] = set()
        self._claims: dict[bytes, _Connection] = {}
        self._serial = 0
        # Moves whenever a delivery may stop being owed otherwise than by being pushed
        # (an ack, a revocation, an expiry sweep): a hand-off (_Handed) made before it
        # is checked against the store again before it goes out.
        self._owed_epoch = 0
        # Notices (by seq) one connection is sending: notices have no ack, so another
        # connection of the same member must not send them too.
        self._notice_claims: set[int] = set()
        # Set when a step is pending; each connection's committer commits it soon even
        # if no answer waits on it (an ack, a forwarded mark).
        # Set when a WAL fsync failed: the store is poisoned and serve_tcp stops.
        self._store_failed = trio.Event()
        # member -> (minute, refusals logged in it), for max_logged_refusals_per_minute.
        self._refusals_logged: dict[str, tuple[int, int]] = {}
        # (originator, recipient) -> the PREKEY_RATE_WINDOW in which the originator's
        # one-time prekey allowance running out was last logged (_prekeys_limited).
        self._prekeys_limited_logged: dict[tuple[str, str], int] = {}
        # Commits the store's batches; every message a reader handles counts as activity.
        # This process's figures (relay.metrics), served only if asked (serve_tcp).
        self.metrics = RelayMetrics(arrangement)
        self.metrics_port: int | None = None
        self._group_commit = GroupCommitter(
            self.store,
            on_commit_error=self._commit_failed,
            on_sync_error=self._sync_failed,
            on_synced=self.metrics.flushed,
        )

    def now(self) -> int:
        return int(self.clock())

    def close(self) -> None:
        """Close the store. Call once no connection task is running."""
        self.store.close()

    @property
    def connection_count(self) -> int:
        """Authenticated connections open now."""
        return self._admitted_total

    @property
    def handshake_count(self) -> int:
        """Connections in their handshake now."""
        return self._handshakes.count

    @property
    def handshakes_shed(self) -> int:
        """Handshakes shed since the start to make room for newer connections."""
        return self._handshakes.shed_total

    # --- serving -----------------------------------------------------------------------

    def metrics_text(self) -> bytes:
        """This process's metrics in the Prometheus text format (:mod:`relay.metrics`)."""
        return self.metrics.render(
            queue_length=self.store.queue_length,
            connections={"handshake": self.handshake_count, "open": self.connection_count},
        )

    def health(self) -> str | None:
        """None when this process can reach its store, else why not (one line)."""
        if self.store.failed is not None:
            return "the store failed (a WAL fsync); restart the relay"
        try:
            self.store.ping()
        except Exception as exc:
            self.metrics.store_error()
            return f"the store is unreachable: {exc}"
        return None

    async def serve_tcp(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        metrics: tuple[str, int] | None = None,
        metrics_limits: MetricsLimits | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled; reports the bound port.

        With ``metrics=(host, port)`` the metrics and the health check are served there
        too (:func:`relay.metrics.serve_metrics`; its bound port in :attr:`metrics_port`).
        """
        if trace.enabled:
            trace.instrument()
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            if metrics is not None:
                self.metrics_port = await nursery.start(
                    functools.partial(
                        serve_metrics,
                        self.metrics,
                        scrape=self.metrics_text,
                        health=self.health,
                        host=metrics[0],
                        port=metrics[1],
                        limits=metrics_limits,
                    )
                )
            nursery.start_soon(self.run_expiry)
            nursery.start_soon(self._stop_when_store_fails)
            if self._shared is not None:
                nursery.start_soon(self._shared.watch, self._store_changed)
            await nursery.start(trio.serve_listeners, self.handle_stream, listeners)
            log.info("relay %s listening on %s:%d", self.arrangement.relay, host, bound)
            task_status.started(bound)

    async def _stop_when_store_fails(self) -> None:
        # After a failed WAL fsync nothing may ever be announced again (the kernel may
        # have dropped the dirty pages), so serving on would only close every connection
        # without a reason: stop, and let the operator restart on what is really on disk.
        await self._store_failed.wait()
        raise StoreFailed("a WAL fsync of the relay's store failed; restart the relay")

    async def run_expiry(self) -> None:
        """Sweep expired reports and tokens every ``expiry_interval`` until cancelled."""
        while True:
            try:
                self.expire_now()
            except StoreUnavailable as exc:
                self.metrics.store_error()
                log.warning("expiry sweep skipped: %s", exc)
            except Exception:
                log.exception("expiry sweep failed")
            await trio.sleep(self.expiry_interval)

    def expire_now(self) -> None:
        """One expiry sweep: expire, log, queue notices, wake the originators (the
        notices go out once the sweep's batch is on disk; the committer syncs it)."""
        self._owed_epoch += 1
        for member in self.store.expire(now=self.now(), clock_skew=self.limits.clock_skew):
            self._wake(member)
        self.store.commit()
        self._group_commit.mark_dirty()

    async def _durable(self, barrier: int) -> None:
        """Return once batch ``barrier`` is committed and on disk (at once if it is);
        see :meth:`tisa_io.durable.GroupCommitter.durable`.

        Raises:
            LinkClosed: the batch was lost (its commit or a WAL fsync failed); its
                answers must never be sent.
        """
        await self._group_commit.durable(barrier)

    @property
    def _next_commit(self) -> float:
        # No commit before this trio time (see tisa_io.durable.COMMIT_SPACING).
        return self._group_commit.next_commit

    @_next_commit.setter
    def _next_commit(self, when: float) -> None:
        self._group_commit.next_commit = when

    def _commit_failed(self) -> None:
        self.metrics.store_error()
        log.exception("commit failed; closing the connections waiting on it")
        raise LinkClosed("commit failed") from None

    def _sync_failed(self) -> None:
        self.metrics.store_error()
        if self.store.failed is None:
            # A store that recovers (PostgreSQL): the batches not flushed are lost, the
            # connections waiting on them close, the store connects again.
            log.warning("WAL flush failed; the batches it was to cover are lost")
            raise LinkClosed("WAL flush failed") from None
        log.exception("WAL fsync failed; nothing more will be announced")
        self._store_failed.set()
        raise LinkClosed("WAL fsync failed") from None

    async def _reply(self, conn: _Connection, message: Message, *, lazy: bool = False) -> None:
        """Queue ``message`` for ``conn``, to be sent once what it announces is committed.

        ``lazy``: nobody waits on this answer urgently (a background prekey fetch, the
        ack of a receipt): it does not force a commit of its own but goes out with the
        next one, at the latest the background commit
        (:data:`tisa_io.durable.BACKGROUND_COMMIT_DELAY`), still never before its batch
        is on disk. Answers go out in order: one that is not lazy, queued behind, has
        the replier commit at once."""
        while len(conn.replies) >= MAX_QUEUED_REPLIES:
            if conn.lazy_wake is not None:
                conn.lazy_wake.set()  # a full queue is urgent
            await conn.replies_changed.wait()
        conn.replies.append((self.store.barrier, message, lazy))
        if not lazy:
            conn.urgent_replies += 1
            if conn.lazy_wake is not None:
                conn.lazy_wake.set()
        conn.changed()

    async def _replier(self, conn: _Connection) -> None:
        try:
            while True:
                while not conn.replies:
                    await conn.replies_changed.wait()
                barrier = conn.replies[0][0]
                if not conn.urgent_replies and len(conn.replies) < MAX_QUEUED_REPLIES:
                    # Every answer queued is lazy: wait for its batch without committing
                    # it; look again when woken (an urgent answer queued, a sync).
                    conn.lazy_wake = trio.Event()
                    try:
                        if not await self._group_commit.durable_lazily(barrier, conn.lazy_wake):
                            continue
                    finally:
                        conn.lazy_wake = None
                else:
                    await self._durable(barrier)
                # Everything up to the commit point goes out in order, in one write.
                ready: list[Message] = []
                while conn.replies and conn.replies[0][0] <= self.store.committed:
                    _, message, lazy = conn.replies.popleft()
                    if not lazy:
                        conn.urgent_replies -= 1
                    if isinstance(message, AuditReply):
                        conn.audit_queued -= 1
                    ready.append(message)
                await conn.link.send_many(ready)
                conn.changed()
        except (LinkClosed, LinkTimeout):
            conn.fail(None)
        except Exception:
            log.exception("replier of %s failed", conn.member)
            conn.fail(Reason.INTERNAL, "internal error")

    async def handle_stream(self, stream: trio.abc.Stream, *, source: str | None = None) -> None:
        """Serve one connection to its end. Never raises (but trio.Cancelled).

        ``source`` is what the connection counts against for
        ``limits.max_handshakes_per_source`` (default: :func:`source_of` the stream).
        """
        admitted: list[str] = []
        _peer_address.set(_peer(stream))
        log.debug("connection from %s", _peer_address.get())
        try:
            handshake = self._handshakes.enter(source_of(stream) if source is None else source)
            try:
                with handshake.scope:
                    link = await accept_member(
                        stream,
                        self.secret,
                        self.arrangement,
                        limits=self.limits,
                        admit=lambda name: self._admit(name, admitted),
                    )
            except TisaError as exc:
                log.info(
                    "connection from %s: handshake failed: %s: %s",
                    _peer_address.get(),
                    type(exc).__name__,
                    exc,
                )
                return
            finally:
                self._handshakes.leave(handshake)
            if handshake.scope.cancelled_caught:
                # Shed for a newer connection (accept_member closed the stream).
                log.debug("connection from %s: shed in its handshake", _peer_address.get())
                return
            await self.serve_link(link)
        except Exception:
            log.exception("connection task failed")
            await trio.aclose_forcefully(stream)
        finally:
            for name in admitted:
                self._admitted_total -= 1
                self._admitted[name] -= 1

    def _admit(self, name: str, admitted: list[str]) -> None:
        if self._admitted_total >= self.limits.max_connections:
            raise Refused(Reason.BUSY, "the relay is at its connection limit")
        if self._admitted.get(name, 0) >= self.limits.max_connections_per_member:
            raise Refused(Reason.BUSY, "too many connections for this member")
        self._admitted_total += 1
        self._admitted[name] = self._admitted.get(name, 0) + 1
        admitted.append(name)

    async def serve_link(self, link: Link) -> None:
        """Serve one authenticated member link until it ends (the extension point).

        :meth:`handle_stream` calls it after the handshake. A subclass may override it to
        wrap the link, as :class:`tisa_testing.relay.HostileRelay` does to misbehave on
        purpose, and call ``super().serve_link(wrapped)``. Never raises but
        ``trio.Cancelled``; the link is closed on return.
        """
        self._serial += 1
        conn = _Connection(link=link, member=link.peer, serial=self._serial)
        self._connections.setdefault(conn.member, set()).add(conn)
        opened = trio.current_time()
        try:
            with conn.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, conn)
                    nursery.start_soon(self._replier, conn)
                    nursery.start_soon(self._group_commit.run_background_commits)
                    nursery.start_soon(self._pusher, conn)
                    nursery.start_soon(self._claim_watch, conn)
        finally:
            self._connections[conn.member].discard(conn)
            self._drop_claims(conn)
            if conn.upload is not None and conn.upload.writer is not None:
                # Only the connection writing a report's blob owns its _uploading entry.
                self._uploading.discard(conn.upload.report)
                conn.upload.abort()
            # One line per connection, when it ends: who, from where, how long, why.
            why = f"{conn.error[0].value}: {conn.error[1]}" if conn.error else "closed"
            log.info(
                "%s from %s: connection ended after %.1f s (%s); %d frames sent in %d writes",
                conn.member,
                _peer_address.get(),
                trio.current_time() - opened,
                why,
                link.frames_sent,
                link.writes,
            )
            try:
                if conn.error is not None:
                    reason, detail = conn.error
                    with trio.move_on_after(ERROR_GRACE), contextlib.suppress(LinkClosed):
                        await link.send(ErrorMessage(reason=reason.value, detail=detail))
            finally:
                await link.aclose()

    # --- the reader ----------------------------------------------------------------------

    async def _reader(self, conn: _Connection) -> None:
        try:
            while True:
                message: Message | None = None
                try:
                    message = conn.link.receive_nowait()
                except trio.WouldBlock:
                    with trio.move_on_after(self.limits.idle_timeout):
                        message = await conn.link.receive()
                if message is None:
                    conn.fail(Reason.TIMEOUT, "idle timeout")
                    return
                self._group_commit.activity += 1
                await self._dispatch(conn, message)
                self._group_commit.mark_dirty()
        except LinkClosed:
            conn.fail(None)
        except LinkTimeout as exc:
            conn.fail(Reason.TIMEOUT, exc.detail)
        except LimitExceeded as exc:
            self._log_close(conn, Reason.LIMIT)
            conn.fail(Reason.LIMIT, exc.detail)
        except ProtocolError as exc:
            self._log_close(conn, Reason.MALFORMED)
            conn.fail(Reason.MALFORMED, exc.detail)
        except VerificationError:
            # The channel failed: nothing more can be sealed to this peer.
            self._log_close(conn, Reason.MALFORMED)
            conn.fail(None)
        except StoreUnavailable as exc:
            self.metrics.store_error()
            log.warning("closing the connection of %s: %s", conn.member, exc)
            conn.fail(Reason.BUSY, "the relay's store is unavailable; try again later")
        except Exception:
            log.exception("reader of %s failed", conn.member)
            conn.fail(Reason.INTERNAL, "internal error")

    def _log_close(self, conn: _Connection, reason: Reason) -> None:
        self.metrics.refusal(reason)
        try:
            self.store.log_refusal(member=conn.member, reason=reason, now=self.now())
            self._group_commit.mark_dirty()
        except Exception:
            log.exception("could not log a refusal")

    async def _dispatch(self, conn: _Connection, message: Message) -> None:
        if log.isEnabledFor(logging.DEBUG) and not isinstance(message, Chunk):
            log.debug("%s: %s", conn.member, message.TYPE)
        if conn.upload is not None:
            if isinstance(message, Chunk):
                self._upload_chunk(conn.upload, message)
            elif isinstance(message, SubmitEnd):
                await self._upload_end(conn, message)
            else:
                raise ProtocolError(f"{message.TYPE} inside a submission")
        elif isinstance(message, SubmitInline):
            await self._submit_inline(conn, message)
        elif isinstance(message, SubmitBegin):
            self._upload_begin(conn, message)
        elif isinstance(message, Release):
            await self._release(conn, message)
        elif isinstance(message, Revoke):
            await self._revoke(conn, message)
        elif isinstance(message, Ack):
            await self._ack(conn, message)
        elif isinstance(message, AckReceipts):
            for token_id in message.tokens:
                await self._ack(conn, Ack(kind="receipt", token=token_id))
        elif isinstance(message, SendReceipt):
            await self._receipt(conn, message)
        elif isinstance(message, AuditFetch):
            await self._audit_fetch(conn, message)
        elif isinstance(message, SendConsent):
            await self._consent(conn, message)
        elif isinstance(message, PublishPrekeys):
            await self._publish_prekeys(conn, message)
        elif isinstance(message, FetchPrekeys):
            await self._fetch_prekeys(conn, message)
        elif isinstance(message, Chunk | SubmitEnd):
            raise ProtocolError(f"{message.TYPE} outside a submission")
        else:
            raise ProtocolError(f"{message.TYPE} is not a message to the relay")

    async def _refuse(
        self,
        conn: _Connection,
        ref: bytes,
        reason: Reason,
        detail: str = "",
        *,
        report: bytes | None = None,
        token: bytes | None = None,
    ) -> None:
        """Log a refusal in the audit log and tell the member; the connection goes on.

        At most ``limits.max_logged_refusals_per_minute`` refusals of one member are
        logged per minute; the first one past that is logged with reason ``limit`` in
        place of its own, the rest of the minute is answered but not logged.
        """
        await self._reply(
            conn, self._refusal(conn, ref, reason, detail, report=report, token=token)
        )

    def _refusal(
        self,
        conn: _Connection,
        ref: bytes,
        reason: Reason,
        detail: str = "",
        *,
        report: bytes | None = None,
        token: bytes | None = None,
    ) -> Refusal:
        """Log a refusal (as :meth:`_refuse` does) and return its answer, unsent."""
        self.metrics.refusal(reason)
        now = self.now()
        minute = now // 60
        logged_minute, logged = self._refusals_logged.get(conn.member, (minute, 0))
        if logged_minute != minute:
            logged = 0
        cap = self.limits.max_logged_refusals_per_minute
        if logged <= cap:
            self.store.log_refusal(
                member=conn.member,
                reason=reason if logged < cap else Reason.LIMIT,
                now=now,
                report=report if logged < cap else None,
                token=token if logged < cap else None,
            )
            self._refusals_logged[conn.member] = (minute, logged + 1)
        return Refusal(ref=ref, reason=reason.value, detail=_detail(detail))

    # --- submission ----------------------------------------------------------------------

    def _upload_begin(self, conn: _Connection, message: SubmitBegin) -> None:
        conn.upload = self._new_upload(conn, message)

    def _new_upload(self, conn: _Connection, message: SubmitBegin | SubmitInline) -> _Upload:
        """Check a submission's start (the refusal, if any, is kept for its end) and
        open the writer its bytes go to (none for a resend of a stored report)."""
        now = self.now()
        size = message.size if isinstance(message, SubmitBegin) else len(message.data)
        upload = _Upload(
            report=message.report,
            size=size,
            digest=message.digest,
            expires=min(message.expires, now + self.max_hold),
        )
        try:
            self.arrangement.require_role(conn.member, Role.ORIGINATOR)
            if size > self.limits.max_report_size:
                raise Refused(
                    Reason.LIMIT,
                    f"the report is {_mib(size)} sealed, over the relay's limit of "
                    f"{_mib(self.limits.max_report_size)}",
                )
            if message.report in self._uploading:
                # Most likely the member's previous connection died mid-upload and the
                # relay has not noticed yet: a transient refusal, the member retries.
                raise Refused(Reason.BUSY, "this report is being uploaded on another connection")
            inline = size <= self.limits.max_inline_report
            if inline and isinstance(message, SubmitInline) and message.expires > now:
                # No look-up: its row's insert finds a report stored under this id
                # (_store_upload), which is then answered as below. (A file is placed
                # under the report's id before its row goes in, so it must not be; a
                # streamed submission's bytes come later, and so might a change of
                # the stored row: it is looked up here as before.)
                upload.unchecked = True
            else:
                existing = self.store.report(message.report)
                if existing is not None:
                    self._check_resend(conn, upload, existing)
                    # A resend of a stored report: discard the bytes, answer stored again.
                    return upload
            if message.expires <= now:
                raise Refused(Reason.EXPIRED, "the report expires before it is stored")
            upload.writer = self.store.begin_upload(message.report, inline=inline)
            self._uploading.add(message.report)
        except Refused as exc:
            upload.refused = exc
        return upload

    @staticmethod
    def _check_resend(conn: _Connection, upload: _Upload, existing: ReportRow) -> None:
        """A submission whose id is stored already must be a resend of that report.

        Raises:
            Refused: DUPLICATE, it is not.
        """
        same = (
            existing.originator == conn.member
            and existing.digest == upload.digest
            and existing.size == upload.size
            and existing.state != "deleted"
        )
        if not same:
            raise Refused(Reason.DUPLICATE, "a different report has this id")

    def _upload_chunk(self, upload: _Upload, message: Chunk) -> None:
        upload.received += len(message.data)
        if upload.received > upload.size:
            raise ProtocolError("submission longer than its declared size")
        if upload.writer is not None:
            upload.writer.write(message.data)

    async def _upload_end(self, conn: _Connection, message: SubmitEnd) -> None:
        upload = conn.upload
        assert upload is not None
        if message.report != upload.report:
            raise ProtocolError("submit_end names another report")
        if upload.received != upload.size:
            raise ProtocolError("submission shorter than its declared size")
        conn.upload = None
        result = await self._store_upload(conn, upload)
        if result is not None:
            await self._reply(
                conn, Stored.trusted(report=upload.report, ack=result[0], released=[])
            )

    async def _submit_inline(self, conn: _Connection, message: SubmitInline) -> None:
        """A small report and its tokens in one step: the report is stored and the
        tokens consumed in the open batch, and one ``stored`` names the tokens accepted
        (each refused one gets its ``refused`` behind it). A refused submission gets one
        ``refused`` and its tokens are not looked at (none is consumed)."""
        if trace.enabled:
            trace.mark("R_recv", message.report)
        upload = self._new_upload(conn, message)
        try:
            upload.received = upload.size
            if upload.writer is not None:
                upload.writer.write(message.data)
        except BaseException:
            if upload.writer is not None:
                upload.abort()
                self._uploading.discard(upload.report)
            raise
        result = await self._store_upload(conn, upload, message.tokens[:1])
        if result is None:
            return
        ack, row, fresh, first = result
        # This step stored the submission's bytes (a resend's are not what is stored).
        handing = fresh and self._shared is None
        refusals: list[Refusal] = []
        released: list[bytes] = []
        recipients: set[str] = set()
        handed: list[TokenRow] = []
        if first is not None:
            # Released with the report's row, in its step (Store.add_released_report).
            released.append(first.id)
            recipients.add(first.recipient)
            if handing:
                handed.append(first)
        for data in message.tokens[len(released) :]:
            outcome = self._release_token(conn, data, stored=row, fresh=fresh)
            if isinstance(outcome, Refusal):
                refusals.append(outcome)
            else:
                # The report's row is released now: no longer as inserted.
                fresh = False
                released.append(outcome.id)
                recipients.add(outcome.recipient)
                if handing:
                    handed.append(outcome)
        # Before any wait: the store's counts are still those of these steps.
        self._hand_over(handed, message.data)
        # Built from what this step checked and made (trusted: no schema check again).
        await self._reply(conn, Stored.trusted(report=row.id, ack=ack, released=released))
        for refusal in refusals:
            await self._reply(conn, refusal)
        if trace.enabled:
            trace.mark("R_handled", message.report)
        for recipient in recipients:
            self._wake(recipient)

    async def _store_upload(
        self, conn: _Connection, upload: _Upload, first: list[bytes] | None = None
    ) -> tuple[bytes, ReportRow, bool, TokenRow | None] | None:
        """Store a submission whose bytes are all in; returns the signed acknowledgement
        of its ``stored`` answer, the report's row, whether this step inserted that row
        (False: a resend of a stored report) and, if the token in ``first`` (the first
        of an inline submission) was released with it in the same step, that token; or
        None once its refusal is queued."""
        if upload.refused is not None:
            await self._refuse(
                conn,
                upload.report,
                upload.refused.reason,
                upload.refused.detail,
                report=upload.report,
            )
            return None
        writer = upload.writer
        fresh = writer is not None
        released: TokenRow | None = None
        if writer is None:
            row = self.store.report(upload.report)
            if row is None or row.state == "deleted":  # expired or revoked meanwhile
                await self._refuse(conn, upload.report, Reason.EXPIRED, report=upload.report)
                return None
        else:
            try:
                if writer.digest() != upload.digest and not (
                    upload.unchecked and self.store.report(upload.report) is not None
                ):
                    writer.abort()
                    await self._refuse(
                        conn,
                        upload.report,
                        Reason.WRONG_REPORT,
                        "ciphertext digest differs from the declared one",
                        report=upload.report,
                    )
                    return None
                # A file: fsync, rename, fsync the directory; then the row (inline: the
                # row only); the answer waits for the batch's commit.
                if not isinstance(writer, InlineBlob):
                    await trio.to_thread.run_sync(writer.place)
                added = None
                if first and upload.unchecked and writer.data is not None:
                    released_with = self._store_released(conn, upload, writer.data, first[0])
                    if released_with is not None:
                        added, released = released_with
                if added is None:
                    added = self.store.add_report(
                        upload.report,
                        originator=conn.member,
                        size=upload.size,
                        digest=upload.digest,
                        expires=upload.expires,
                        now=self.now(),
                        data=writer.data,
                        if_new=upload.unchecked,
                    )
                if added is None:
                    # Stored before under this id (not looked up, see _new_upload).
                    fresh = False
                    existing = self.store.report(upload.report)
                    assert existing is not None
                    try:
                        self._check_resend(conn, upload, existing)
                    except Refused as exc:
                        await self._refuse(
                            conn, upload.report, exc.reason, exc.detail, report=upload.report
                        )
                        return None
                    # A resend of a stored report: answer stored again.
                    added = existing
                row = added
            finally:
                writer.abort()
                self._uploading.discard(upload.report)
        ack = StoredAck.issue(
            self.secret,
            self.arrangement,
            report=row.id,
            originator=row.originator,
            digest=row.digest,
            size=row.size,
            stored=row.stored_at,
        )
        self.metrics.event("stored")
        if released is not None:
            self.metrics.event("released")
        return ack.encoded, row, fresh, released

    def _store_released(
        self, conn: _Connection, upload: _Upload, data: bytes, encoded: bytes
    ) -> tuple[ReportRow, TokenRow] | None:
        """The usual inline submission, a new report with its first token good: the
        token checked against the submission's own values (as :meth:`_release_token`
        checks it against the stored row), then the report stored and released in one
        step (:meth:`relay.store.Store.add_released_report`). None, with nothing written
        or logged, for anything else: the report is then stored and the token released
        as usual, which refuses what fails here, with its reason."""
        now = self.now()
        try:
            token = ReleaseToken.decode(encoded)
            if token.report != upload.report or token.request is not None:
                return None
            self._check_token(token, upload.report, upload.digest, upload.size, conn.member, now)
        except (ProtocolError, VerificationError, Refused):
            return None
        rows = self.store.add_released_report(
            upload.report,
            originator=conn.member,
            size=upload.size,
            digest=upload.digest,
            expires=upload.expires,
            now=now,
            data=data,
            token=token,
            max_queue=self.limits.max_queue_per_recipient,
        )
        return rows

    def _hand_over(self, handed: list[TokenRow], data: bytes) -> None:
        """Hand the deliveries just made pending, whose report's ciphertext is ``data``,
        to the pushers of their recipients' connections here (:class:`_Handed`), with
        the store's count of each recipient's deliveries, taken now: call it right after
        their steps, with no wait between. (Two of them for one recipient get the same
        count, which no pusher takes: it queries the store.) Only on a store of this
        process alone (SQLite): another relay process's releases and revocations are
        not counted here."""
        batch = self.store.barrier
        for row in handed:
            conns = self._connections.get(row.recipient)
            if not conns or not self._inline_fits(len(data), len(row.token)):
                continue  # nobody here to take it, or streamed: read from the store
            count = self.store.changes(row.recipient, DELIVERIES)
            for conn in conns:
                if conn.handed_full:
                    continue
                if len(conn.handed) >= MAX_HANDED:
                    # Its pusher reads the store; nothing more is handed to it (a burst
                    # would only pile up hand-offs it cannot take) until it did.
                    conn.handed.clear()
                    conn.handed_full = True
                else:
                    conn.handed.append(_Handed(row, data, batch, count, self._owed_epoch))

    # --- release, revocation, acknowledgement, receipts ----------------------------------

    async def _release(self, conn: _Connection, message: Release) -> None:
        outcome = self._release_token(conn, message.token)
        if isinstance(outcome, Refusal):
            await self._reply(conn, outcome)
            return
        await self._reply(conn, Released(report=outcome.report, token=outcome.id))
        self._wake(outcome.recipient)

    def _release_token(
        self,
        conn: _Connection,
        data: bytes,
        *,
        stored: ReportRow | None = None,
        fresh: bool = False,
    ) -> TokenRow | Refusal:
        """Check a release token against its stored report and consume it (a step of
        the open batch); returns its delivery's row, or the logged refusal to answer with.
        ``stored``: the row of the report just stored with the token (an inline
        submission), so a token naming it needs no read of it; ``fresh``: that row was
        inserted by this submission and not changed since, so the release needs no read
        of the report's state either (:meth:`relay.store.Store.release`)."""
        now = self.now()
        try:
            token = ReleaseToken.decode(data)
        except ProtocolError as exc:
            return self._refusal(conn, b"", Reason.MALFORMED, exc.detail)
        try:
            if stored is not None and stored.id == token.report:
                report: ReportRow | None = stored
            else:
                report = self.store.report(token.report)
                fresh = False
            if report is None:
                raise Refused(Reason.UNKNOWN_REPORT, "no such report stored")
            if report.originator != conn.member:
                raise Refused(Reason.WRONG_ORIGINATOR, "only the report's originator releases it")
            self._check_token(token, report.id, report.digest, report.size, report.originator, now)
            row = self.store.release(
                token,
                now=now,
                max_queue=self.limits.max_queue_per_recipient,
                clock_skew=self.limits.clock_skew,
                fresh=stored if fresh else None,
            )
        except VerificationError:
            return self._refusal(
                conn, token.id, Reason.BAD_SIGNATURE, report=token.report, token=token.id
            )
        except Refused as exc:
            return self._refusal(
                conn, token.id, exc.reason, exc.detail, report=token.report, token=token.id
            )
        self.metrics.event("released")
        return row

    def _check_token(
        self,
        token: ReleaseToken,
        report: bytes,
        digest: bytes,
        size: int,
        originator: str,
        now: int,
    ) -> None:
        """:func:`tisa.token.check_for_relay` against a report's values.

        Raises:
            VerificationError, Refused: as it does.
        """
        check_for_relay(
            token,
            self.arrangement,
            report_id=report,
            digest=digest,
            size=size,
            originator=originator,
            now=now,
            clock_skew=self.limits.clock_skew,
        )

    async def _revoke(self, conn: _Connection, message: Revoke) -> None:
        try:
            self.store.revoke(message.report, message.token, by=conn.member, now=self.now())
        except Refused as exc:
            await self._refuse(
                conn,
                message.token or message.report,
                exc.reason,
                exc.detail,
                report=message.report,
                token=message.token,
            )
            return
        self.metrics.event("revoked")
        self._owed_epoch += 1
        await self._reply(conn, Revoked(report=message.report, token=message.token))

    def _ack_delivery(self, conn: _Connection, token_id: bytes) -> bool:
        """The recipient on ``conn`` holds the delivery of ``token_id`` (an ``ack`` of
        kind delivery, or the receipt that stands for it): a step of the open batch, so
        the delivery counts as acked at the relay only with that batch (lost with it, it
        is pushed again). False for a token never delivered to this member."""
        known = self.store.ack_delivery(token_id, recipient=conn.member, now=self.now())
        self._delivery_acked(conn, token_id, known)
        return known

    def _delivery_acked(self, conn: _Connection, token_id: bytes, known: bool) -> None:
        """After the step that acked the delivery of ``token_id`` on ``conn`` (``known``:
        the token was delivered to this member): claims, windows and overdue marks."""
        if known:
            self._owed_epoch += 1
            self.metrics.event("acknowledged")
            # No longer outstanding: its claim is not needed (nor kept, which grew
            # with every delivery a long-lived connection made).
            holder = self._claims.pop(token_id, None)
            if holder is not None:
                holder.claims.discard(token_id)
        if conn.overdue:
            # It reads what it is sent after all (an ack, even a late one of a
            # delivery another connection completed, comes only from a reader): it
            # may be the one to push to again, so it looks at what it passed over.
            conn.overdue, conn.rescan = False, True
            conn.poke()
        for other in self._connections.get(conn.member, ()):
            other.deadlines.pop(token_id, None)
            if token_id in other.in_flight:
                other.in_flight.discard(token_id)
                if other.window_full:
                    other.poke()  # the window has room again

    async def _ack(self, conn: _Connection, message: Ack) -> None:
        if message.kind == "delivery":
            known = self._ack_delivery(conn, message.token)
        elif message.kind == "receipt":
            known = self.store.ack_receipt(message.token, originator=conn.member)
        else:
            # An ack of a consent object no longer queued is a second ack of a copy
            # (pushed on two connections, or replayed): nothing to do and nothing to
            # refuse. A refusal would carry the object's id, which is also the id of
            # the member's own answer to a request, and could be taken for its refusal.
            self.store.ack_consent(conn.member, message.kind, message.token)
            return
        if not known:
            await self._refuse(
                conn,
                message.token,
                Reason.UNKNOWN_REPORT,
                f"no {message.kind} with this token for you",
                token=message.token,
            )

    async def _receipt(self, conn: _Connection, message: SendReceipt) -> None:
        receipt: Receipt | None = None
        try:
            receipt = Receipt.verify(message.receipt, self.arrangement)
            if receipt.recipient != conn.member:
                raise Refused(Reason.WRONG_RECIPIENT, "a receipt is sent by its recipient")
            # Protocol version 4: an accepted receipt also acknowledges its delivery
            # (the recipient sends it in place of the ack, once the report is stored),
            # in the receipt's step; for a delivery acked before (a receipt resent) this
            # changes nothing. A refused receipt acknowledges nothing: the recipient then
            # acks the delivery itself (docs/node-protocol.md, "Receipt").
            new = self.store.add_receipt(receipt, now=self.now(), ack=True)
        except ProtocolError as exc:
            await self._refuse(conn, b"", Reason.MALFORMED, exc.detail)
            return
        except VerificationError:
            await self._refuse(conn, b"", Reason.BAD_SIGNATURE)
            return
        except Refused as exc:
            if receipt is None:
                # verify raised it (wrong_arrangement) once the envelope decoded and its
                # signature checked: answer under the receipt's token id, so that the
                # recipient's node stops resending it.
                _, fields, _ = open_envelope(
                    message.receipt, max_size=MAX_RECEIPT_SIZE, what="receipt"
                )
                token = bytes(fields["token"])
            else:
                token = receipt.token
            await self._refuse(conn, token, exc.reason, exc.detail)
            return
        self._delivery_acked(conn, receipt.token, True)
        # Confirm (also a receipt sent again), so the recipient stops resending it.
        # Lazy: the recipient only stops resending the receipt once it has this.
        await self._reply(conn, Ack(kind="receipt", token=receipt.token), lazy=True)
        if new:
            self._wake(receipt.originator)

    async def _consent(self, conn: _Connection, message: SendConsent) -> None:
        """Forward an announcement, a request or a denial: only when signed by the member
        who sent it, in the role its kind needs (the verifiers check roles), and about a
        report the originator holds here; then queued durably for whom it is for, logged,
        and acked to the sender under its id (the request id for an answer)."""
        now = self.now()
        ref = b""
        try:
            if message.kind == "announce":
                announcement = Announcement.verify(message.data, self.arrangement)
                ref, signer = announcement.id, announcement.originator
                self._check_sender(conn, signer)
                new = self.store.add_announcement(announcement, now=now)
                woken: tuple[str, ...] = announcement.to
                report = announcement.report
            elif message.kind == "request":
                request = Request.verify(message.data, self.arrangement)
                ref, signer = request.id, request.requester
                self._check_sender(conn, signer)
                request.check_open(now=now, clock_skew=self.limits.clock_skew)
                new = self.store.add_request(
                    request, now=now, max_per_hour=self.limits.max_requests_per_hour
                )
                woken, report = (request.originator,), request.report
            else:
                answer = Answer.verify(message.data, self.arrangement)
                ref, signer = answer.request, answer.originator
                self._check_sender(conn, signer)
                new = self.store.add_denial(answer, now=now)
                woken, report = (answer.requester,), answer.report
        except ProtocolError as exc:
            await self._refuse(conn, b"", Reason.MALFORMED, exc.detail)
            return
        except VerificationError:
            await self._refuse(conn, b"", Reason.BAD_SIGNATURE)
            return
        except Refused as exc:
            if not ref:
                # Refused by the verifier after the signature checked (another
                # arrangement, a share it does not allow): name it by its id.
                ref = consent_ref(message.kind, message.data)
            await self._refuse(conn, ref, exc.reason, exc.detail)
            return
        log.debug("%s %s on %s", message.kind, ref.hex(), report.hex())
        await self._reply(conn, Ack(kind=message.kind, token=ref))
        if new:
            for member in woken:
                self._wake(member)

    @staticmethod
    def _check_sender(conn: _Connection, signer: str) -> None:
        if signer != conn.member:
            # Someone else's signed object, sent on by this member (a replay, or a
            # forwarding the signer never asked for): the relay forwards only first-hand.
            raise Refused(Reason.WRONG_SENDER, f"signed by {signer!r}, sent by {conn.member!r}")

    async def _audit_fetch(self, conn: _Connection, message: AuditFetch) -> None:
        if conn.audit_queued >= MAX_QUEUED_AUDIT_REPLIES:
            await self._refuse(
                conn, b"", Reason.BUSY, "earlier audit extracts not read yet; fetch again later"
            )
            return
        since = message.since
        start_head = self.store.audit_point(since)
        if start_head is None:
            await self._refuse(conn, b"", Reason.MALFORMED, "since is past the end of the log")
            return
        items: list[Any] = []
        seq, head, budget = since, start_head, min(MAX_EXTRACT_BYTES, self.limits.max_frame // 2)
        for entry, content, head_after in self.store.audit_entries(
            since, limit=MAX_EXTRACT_ENTRIES
        ):
            mine = conn.member in entry.parties
            cost = len(entry.encode()) + 8 if mine else len(content) + 8
            if cost > budget:
                break
            budget -= cost
            items.append(entry if mine else content)
            seq, head = entry.seq, head_after
        checkpoint = Checkpoint.issue(
            self.secret, self.arrangement, seq=seq, head=head, time=max(self.now(), 0)
        )
        extract = Extract(
            start_seq=since,
            start_head=start_head,
            items=tuple(items),
            checkpoint=checkpoint.encoded,
        )
        # Queued like every answer: the checkpoint signs entries that must be on disk.
        conn.audit_queued += 1
        await self._reply(conn, AuditReply(extract=extract.encode()))

    # --- prekeys -------------------------------------------------------------------------

    def _prekey_status(self, member: str) -> PrekeyStatus:
        signed_not_after, left = self.store.prekey_status(member, now=self.now())
        return PrekeyStatus(signed_not_after=signed_not_after, one_time=left)

    async def _publish_prekeys(self, conn: _Connection, message: PublishPrekeys) -> None:
        """Check and store a recipient's own prekeys; answer with its prekey status."""
        now = self.now()
        try:
            self.arrangement.require_role(conn.member, Role.RECIPIENT)
            signed = (
                None
                if message.signed is None
                else Prekey.verify(
                    message.signed,
                    self.arrangement,
                    owner=conn.member,
                    kind=PrekeyKind.SIGNED,
                    now=now,
                    clock_skew=self.limits.clock_skew,
                )
            )
            one_time = [
                Prekey.verify(
                    data,
                    self.arrangement,
                    owner=conn.member,
                    kind=PrekeyKind.ONE_TIME,
                    now=now,
                    clock_skew=self.limits.clock_skew,
                )
                for data in message.one_time
            ]
            self.store.publish_prekeys(
                conn.member, signed, one_time, max_one_time=self.limits.max_one_time_prekeys
            )
        except ProtocolError as exc:
            await self._refuse(conn, b"", Reason.MALFORMED, exc.detail)
            return
        except VerificationError:
            await self._refuse(conn, b"", Reason.BAD_PREKEY, "a prekey's signature is not yours")
            return
        except Refused as exc:
            await self._refuse(conn, b"", exc.reason, exc.detail)
            return
        await self._reply(conn, self._prekey_status(conn.member))

    async def _fetch_prekeys(self, conn: _Connection, message: FetchPrekeys) -> None:
        """Hand an originator a recipient's signed prekey and up to ``message.count``
        one-time prekeys (taken durably before the answer goes out); tell the recipient
        when its supply runs low."""
        now = self.now()
        try:
            self.arrangement.require_role(conn.member, Role.ORIGINATOR)
            self.arrangement.require_role(message.member, Role.RECIPIENT)
            if message.member == conn.member:
                # An originator never releases to itself: its own one-time prekeys are
                # not for it to use up.
                raise Refused(Reason.WRONG_RECIPIENT, "a member does not fetch its own prekeys")
        except Refused as exc:
            await self._refuse(conn, message.ref, exc.reason, exc.detail)
            return
        signed, one_time, left = self.store.take_prekey_bundles(
            message.member,
            taker=conn.member,
            now=now,
            count=message.count,
            max_per_hour=self.limits.max_one_time_prekeys_per_hour,
            count_to=self.limits.prekey_low_water,
        )
        if len(one_time) < message.count and left:
            # Fewer than asked while some are left: the asker's allowance ran out.
            self._prekeys_limited(conn.member, message.member, now=now)
        # Lazy: an originator fetches ahead, for its prekey pool (one that waits on the
        # answer, its pool empty, waits at most BACKGROUND_COMMIT_DELAY more, less
        # when an answer it does wait on, a stored, follows).
        await self._reply(
            conn,
            Prekeys(ref=message.ref, member=message.member, signed=signed, one_time=one_time),
            lazy=True,
        )
        if one_time and left < self.limits.prekey_low_water:
            # Not queued behind the recipient's other answers: its pusher sends one
            # status, counted when it goes out, ahead of the next deliveries.
            for other in self._connections.get(message.member, ()):
                other.prekey_status_due = self.store.barrier
                other.poke()

    async def _due_status(self, conn: _Connection) -> list[Message]:
        """The prekey_status due to ``conn`` (none, or one), counted now: after the
        handouts that made it due are committed. The caller writes it before anything
        else, with no checkpoint between (so statuses go out in the order counted)."""
        if conn.prekey_status_due is None:
            return []
        await self._durable(conn.prekey_status_due)
        conn.prekey_status_due = None
        return [self._prekey_status(conn.member)]

    def _prekeys_limited(self, originator: str, recipient: str, *, now: int) -> None:
        """``originator`` was handed its hourly allowance of ``recipient``'s one-time
        prekeys (Limits.max_one_time_prekeys_per_hour): the fetch is answered with the
        signed prekey only. Logged (refused, rate_limited; both parties, so either can
        fetch it) once per pair and window in this process, so the fetches past the
        limit do not grow the log."""
        window = now // PREKEY_RATE_WINDOW
        if self._prekeys_limited_logged.get((originator, recipient)) == window:
            return
        self._prekeys_limited_logged[(originator, recipient)] = window
        try:
            self.store.log_refusal(
                member=originator, reason=Reason.RATE_LIMITED, now=now, others=(recipient,)
            )
            self._group_commit.mark_dirty()
        except Exception:
            log.exception("could not log a prekey allowance used up")

    # --- the pusher ----------------------------------------------------------------------

    def _wake(self, member: str) -> None:
        for conn in self._connections.get(member, ()):
            conn.poke()

    def _store_changed(self, member: str | None) -> None:
        # Another relay process queued something for ``member`` (None: for anyone, as
        # far as we know): its connections look again from the start.
        if member is None:
            conns = [conn for conns in self._connections.values() for conn in conns]
        else:
            conns = list(self._connections.get(member, ()))
        for conn in conns:
            conn.rescan = conn.rescan_notices = conn.stale = True
            conn.poke()

    def _drop_claims(self, conn: _Connection) -> None:
        if self._shared is not None and conn.claims:
            self._shared.unclaim(conn.claims)
        for token_id in conn.claims:
            if self._claims.get(token_id) is conn:
                del self._claims[token_id]
        conn.claims.clear()
        conn.deadlines.clear()
        # Another connection of the same member may now take over those deliveries (and
        # an overdue one those it passed over while this one was there).
        for other in self._connections.get(conn.member, ()):
            other.rescan = True
            other.poke()

    def _refresh_claim(self, conn: _Connection, token_id: bytes) -> None:
        """The link took a frame of delivery ``token_id`` (or is about to send its
        first): its claim lapses ``claim_timeout`` from now unless acked."""
        if token_id not in conn.claims:
            return  # lapsed or acked meanwhile
        if not conn.deadlines:
            conn.deadlines_added.set()
        conn.deadlines.pop(token_id, None)
        conn.deadlines[token_id] = trio.current_time() + self.limits.claim_timeout

    async def _claim_watch(self, conn: _Connection) -> None:
        """Lapse the claims of ``conn`` that passed their deadline (see
        :meth:`_lapse_claim`), until the connection ends."""
        try:
            while True:
                if not conn.deadlines:
                    conn.deadlines_added = trio.Event()
                    await conn.deadlines_added.wait()
                    continue
                token_id, deadline = next(iter(conn.deadlines.items()))
                if deadline <= trio.current_time():
                    self._lapse_claim(conn, token_id)
                    continue
                await trio.sleep_until(deadline)
        except Exception:
            log.exception("claim watch of %s failed", conn.member)
            conn.fail(Reason.INTERNAL, "internal error")

    def _lapse_claim(self, conn: _Connection, token_id: bytes) -> None:
        """``conn`` did not ack delivery ``token_id`` within ``claim_timeout``: the
        member's other connections may push it. It stays in this connection's window
        (and is not pushed on it again); an ack from any connection settles it."""
        del conn.deadlines[token_id]
        if self._claims.get(token_id) is conn:
            del self._claims[token_id]
        conn.claims.discard(token_id)
        if self._shared is not None:
            # The member's live connection may be on another relay process.
            self._shared.unclaim([token_id])
        conn.overdue = True
        for other in self._connections.get(conn.member, ()):
            if other is not conn:
                other.rescan = True
                other.poke()

    def _passed_over(self, conn: _Connection) -> bool:
        """Whether the member has a better connection to push deliveries on: one that
        is not overdue when this one is, else a newer one. Exactly one connection of a
        member is the best; whenever that changes, the new best rescans (a new
        connection scans from the start; a close, a lapse or an ack that ends an
        overdue sets ``rescan``), so no delivery is left unpushed."""
        rank = (not conn.overdue, conn.serial)
        return any(
            (not other.overdue, other.serial) > rank
            for other in self._connections.get(conn.member, ())
        )

    async def _pusher(self, conn: _Connection) -> None:
        try:
            await self._push_loop(conn)
        except (LinkClosed, LinkTimeout):
            conn.fail(None)
        except StoreUnavailable as exc:
            self.metrics.store_error()
            log.warning("closing the connection of %s: %s", conn.member, exc)
            conn.fail(Reason.BUSY, "the relay's store is unavailable; try again later")
        except Exception:
            log.exception("pusher of %s failed", conn.member)
            conn.fail(Reason.INTERNAL, "internal error")

    async def _push_loop(self, conn: _Connection) -> None:
        """Push what the store holds for the member, then wait to be woken, until the
        connection ends.

        Each kind of row (:data:`relay.consentstore.QUEUED_KINDS`) is read on from the
        last ``seq`` sent, and only when it may hold something new: the store counts
        the steps that queue rows of each kind per member
        (:meth:`relay.consentstore.ConsentTables.changes`), and a kind whose count has
        not moved since a query that read all there was is not queried (a wake-up for
        another kind, or for another member's change, runs no statement of it). The
        count is taken before the query, so a row queued during the pass (while it
        waits for a commit or the link) moves it, and the poke that follows wakes the
        next pass. Read again whatever the counts say: deliveries after a rescan and
        when an ack made room in a full window, notices after a rescan of them, every
        kind when another relay process may have queued something (``stale``) or when a
        batch was rolled back (the counts move then).
        """
        feeds = _Feeds()
        while True:
            # A fresh event before looking, so a wake-up during the pass is not lost.
            conn.wake = trio.Event()
            if conn.stale:
                conn.stale = False
                feeds.deliveries.seen = feeds.receipts.seen = feeds.consent.seen = -1
                feeds.notices.seen = -1
            if conn.rescan:
                conn.rescan = False
                feeds.deliveries.after, feeds.deliveries.seen = 0, -1
            if conn.rescan_notices:
                conn.rescan_notices = False
                feeds.notices.after, feeds.notices.seen = 0, -1
            if conn.window_full or self._unread(conn, feeds.deliveries):
                await self._push_deliveries(conn, feeds.deliveries)
            # Receipts and notices pile up while a member is offline: read them a page
            # at a time, never all at once.
            while self._unread(conn, feeds.receipts):
                receipts = self._read(conn, feeds.receipts, self.store.queued_receipts, NOTICE_PAGE)
                if receipts:
                    # Lazy: nobody waits on a receipt urgently; a commit of its own
                    # only when more work for this member arrives meanwhile.
                    # conn.poke sets the lazy wait's event (push_lazy) with conn.wake.
                    await self._group_commit.durable_unless(
                        self.store.barrier, conn.wake, functools.partial(setattr, conn, "push_lazy")
                    )
                    await conn.link.send_many(
                        ReceiptNotice(receipt=receipt.receipt) for receipt in receipts
                    )
            while self._unread(conn, feeds.consent):
                consent = self._read(conn, feeds.consent, self.store.queued_consent, NOTICE_PAGE)
                if consent:
                    await self._durable(self.store.barrier)
                    await conn.link.send_many(
                        ConsentNotice(kind=row.kind, data=row.data) for row in consent
                    )
            while self._unread(conn, feeds.notices):
                notices = self._read(conn, feeds.notices, self.store.notices, NOTICE_PAGE)
                if notices:
                    await self._send_notices(conn, notices)
            if conn.prekey_status_due is not None and (status := await self._due_status(conn)):
                await conn.link.send_many(status)
            await conn.wake.wait()

    def _unread(self, conn: _Connection, feed: _Feed) -> bool:
        """Whether rows of ``feed``'s kind may have been queued for ``conn``'s member
        since the pusher last read them all."""
        return feed.seen != self.store.changes(conn.member, feed.kind)

    def _read(
        self,
        conn: _Connection,
        feed: _Feed,
        query: Callable[..., list[_Row]],
        page: int,
    ) -> list[_Row]:
        """The next page of ``feed``'s rows for ``conn``'s member, read on from the last
        one (``feed.after`` moves past them); a page that is not full read all there
        was: ``feed.seen`` is then the count taken before the query."""
        count = self.store.changes(conn.member, feed.kind)
        rows = query(conn.member, after=feed.after, limit=page)
        if rows:
            feed.after = rows[-1].seq
        if len(rows) < page:
            feed.seen = count
        return rows

    async def _push_deliveries(self, conn: _Connection, feed: _Feed) -> None:
        """Push the member's deliveries owed with ``seq > feed.after``, a batch at a
        time, while the window has room; with it full, set ``conn.window_full`` (an ack
        that makes room wakes the pusher) and leave the rest for then."""
        window = self.limits.delivery_window
        limit = min(DELIVERY_BATCH, window)
        conn.window_full = False
        while len(conn.in_flight) < window:
            count = self.store.changes(conn.member, feed.kind)
            handed = self._take_handed(conn, feed, count, limit)
            if handed:
                # Exactly what a query would find (see _take_handed), without it.
                batch = [hand.row for hand in handed]
                barrier = handed[-1].batch
                sources = await self._handed_sources(conn, handed)
            else:
                batch = self.store.outstanding(conn.member, after=feed.after, limit=limit)
                if not batch:
                    feed.seen = count
                    return
                # The releases that made these deliveries pending are in this batch at
                # the latest (perhaps still open): one wait covers them all.
                barrier = self.store.barrier
                sources = await self._delivery_sources(conn, batch, barrier)
            # Small reports go out together, in one write; a large one streams.
            pending: list[Message] = []
            sent: list[TokenRow] = []
            for row in batch:
                if len(conn.in_flight) >= window:
                    break  # the rest when acks make room
                feed.after = row.seq
                await self._deliver(conn, row, barrier, pending, sent, sources)
            await self._send_deliveries(conn, pending, sent)
            if len(batch) < limit and feed.after == batch[-1].seq:
                # Read all there was, and every row of it handled; more released while
                # this batch went out is read on at once, without a pass of its own.
                feed.seen = count
                if not self._unread(conn, feed):
                    return
        conn.window_full = True

    def _take_handed(
        self, conn: _Connection, feed: _Feed, count: int, limit: int
    ) -> list[_Handed] | None:
        """The deliveries handed to ``conn`` (:meth:`_hand_over`) since its pusher last
        took them, if they are all the member's deliveries a query of ``feed`` would
        find now (``count``: the store's count of the member's deliveries, taken now):
        the pusher had read all there was when the count was one below the first
        hand-off's, and every step since that queued a delivery for the member is one
        of them, in order (a release not handed over, a batch rolled back, another
        relay process's notification or a rescan leave the counts apart). Else None,
        and the hand-offs are dropped: the pusher queries the store as without them."""
        handed, conn.handed, conn.handed_full = conn.handed, [], False
        if (
            not handed
            or len(handed) > limit
            or feed.seen < 0
            or count != feed.seen + len(handed)
            or handed[0].row.seq <= feed.after
        ):
            return None
        for number, hand in enumerate(handed, start=feed.seen + 1):
            if hand.count != number:
                return None
        return handed

    async def _handed_sources(
        self, conn: _Connection, handed: list[_Handed]
    ) -> dict[bytes, tuple[bool, bytes | None]]:
        """:meth:`_delivery_sources` of deliveries handed over: once the last one's
        batch is on disk, each still owed (unless a delivery may have stopped being
        owed since the first was handed over: then read as there) with its ciphertext."""
        mine = [hand for hand in handed if self._to_push(conn, hand.row)]
        if not mine:
            return {}
        await self._durable(handed[-1].batch)
        if self._owed_epoch != handed[0].epoch:
            return self.store.delivery_sources([hand.row.id for hand in mine])
        return {hand.row.id: (True, hand.data) for hand in mine}

    async def _send_notices(self, conn: _Connection, notices: list[NoticeRow]) -> None:
        """Send the notices no other connection is sending, then drop them (notices have
        no ack: sent once on a live link). If this link fails first, the member's other
        connections look again."""
        mine = [notice for notice in notices if notice.seq not in self._notice_claims]
        if not mine:
            return
        claimed = {notice.seq for notice in mine}
        self._notice_claims |= claimed
        sent = False
        try:
            await self._durable(self.store.barrier)
            await conn.link.send_many(
                (Expired if notice.kind == "expired" else Revoked)(
                    report=notice.report, token=notice.token
                )
                for notice in mine
            )
            sent = True
            for notice in mine:
                self.store.drop_notice(notice.seq)
            self._group_commit.mark_dirty()
        finally:
            self._notice_claims -= claimed
            if not sent:
                for other in self._connections.get(conn.member, ()):
                    if other is not conn:
                        other.rescan_notices = True
                        other.poke()

    def _to_push(self, conn: _Connection, row: TokenRow) -> bool:
        """Whether ``conn`` pushes ``row`` now: not in flight on it already, not claimed
        by another connection of the member, and ``conn`` is the member's best."""
        if row.id in conn.in_flight:
            return False  # pushed on this connection already (a rescan found it)
        holder = self._claims.get(row.id)
        if holder is not None and holder is not conn:
            return False  # another connection of this member is delivering it
        return not self._passed_over(conn)  # else the best connection takes it

    async def _delivery_sources(
        self, conn: _Connection, batch: list[TokenRow], barrier: int
    ) -> dict[bytes, tuple[bool, bytes | None]]:
        """Once ``barrier`` (the batch of the query that found ``batch``) is on disk:
        whether each delivery of ``batch`` this connection is to push is still owed,
        and its ciphertext if kept in its row, in one query (see
        :meth:`relay.tokenstore.TokenTables.delivery_sources`). Read after the wait, as
        :meth:`_deliver` would read each; good until the pusher next waits (:meth:`_deliver`
        empties it then, and reads for itself)."""
        ids = [row.id for row in batch if self._to_push(conn, row)]
        if not ids:
            return {}
        await self._durable(barrier)
        return self.store.delivery_sources(ids)

    async def _deliver(
        self,
        conn: _Connection,
        row: TokenRow,
        barrier: int,
        pending: list[Message],
        sent: list[TokenRow],
        sources: dict[bytes, tuple[bool, bytes | None]],
    ) -> None:
        """Push one delivery; ``barrier`` is the batch of the query that found ``row``,
        ``sources`` what :meth:`_delivery_sources` read for its batch (a delivery not
        in it is read here).

        A small report's messages are added to ``pending`` (and its token id to
        ``sent``), for :meth:`_send_deliveries`; a large one flushes ``pending`` and
        streams from its file.
        """
        if not self._to_push(conn, row):
            return  # ack awaited on this connection, or another one delivers it
        # The release that made this delivery pending may still be in the open batch
        # (not a later one: the row was read in batch ``barrier``). Not the current
        # barrier, which moves on with every message handled meanwhile: waiting for it
        # let out one delivery per commit. (_delivery_sources waited already, unless
        # nothing was to be pushed then.)
        waited = self.store.committed < barrier
        await self._durable(barrier)
        if trace.enabled:
            trace.mark("R_deliver", row.report, alias=row.id)
        holder = self._claims.get(row.id)
        if holder is not None and holder is not conn:
            return  # another connection claimed it while this one waited for the commit
        if waited:
            sources.clear()  # read before the wait
        source = sources.pop(row.id, None)
        outstanding, inline = self.store.delivery_source(row.id) if source is None else source
        if not outstanding:
            return  # acked, revoked or expired since the query
        if self._shared is not None and not self._shared.claim(row.id):
            return  # another relay process is delivering it
        if inline is None and self._inline_fits(self._report_size(row.report), len(row.token)):
            # Kept in a file (a lowered max_inline_report) but small enough for the wire.
            try:
                with self.store.open_ciphertext(row.report) as small:
                    inline = small.read()
            except FileNotFoundError:
                log.error("ciphertext of a pending delivery is missing")
                return
        if inline is not None:
            self._claim(conn, row.id)
            if self._inline_fits(len(inline), len(row.token)):
                # A token released and a ciphertext stored after their checks, and
                # within MAX_INLINE_CIPHERTEXT (_inline_fits): no schema check again.
                pending.append(DeliverInline.trusted(token=row.token, data=inline))
            else:  # kept in its row (a raised max_inline_report), streamed on the wire
                pending.append(Deliver(token=row.token))
                pending.extend(chunks_of(inline))
                pending.append(DeliverEnd(token=row.id))
            sent.append(row)
            return
        try:
            blob = self.store.open_ciphertext(row.report)
        except FileNotFoundError:
            log.error("ciphertext of a pending delivery is missing")
            return
        # What the rest of the batch was read as may change while this one streams.
        sources.clear()
        await self._send_deliveries(conn, pending, sent)
        self._claim(conn, row.id)
        with blob:
            async with conn.link.sending():
                await conn.link.send(Deliver(token=row.token))
                # Reads of one chunk each: a report of any size passes in constant memory.
                while data := blob.read(MAX_CHUNK_DATA):
                    await conn.link.send(Chunk.trusted(data=data))
                    self._refresh_claim(conn, row.id)  # the peer is taking it
                await conn.link.send(DeliverEnd(token=row.id))
        self._refresh_claim(conn, row.id)
        self.store.mark_forwarded(row.id, now=self.now())
        self.metrics.event("forwarded")
        self._group_commit.mark_dirty()

    def _inline_fits(self, size: int, token_size: int) -> bool:
        """Whether a delivery of ``size`` ciphertext bytes goes in one message: at most
        MAX_INLINE_CIPHERTEXT, and the message within this relay's max_frame."""
        frame = size + token_size + INLINE_OVERHEAD + INLINE_TOKEN_OVERHEAD + STREAM_OVERHEAD
        return size <= MAX_INLINE_CIPHERTEXT and frame <= self.limits.max_frame

    def _report_size(self, report_id: bytes) -> int:
        report = self.store.report(report_id)
        return report.size if report is not None else MAX_INLINE_CIPHERTEXT + 1

    def _claim(self, conn: _Connection, token_id: bytes) -> None:
        self._claims[token_id] = conn
        conn.claims.add(token_id)
        conn.in_flight.add(token_id)
        # From now: a write the peer does not take lapses the claim too.
        self._refresh_claim(conn, token_id)

    async def _send_deliveries(
        self, conn: _Connection, pending: list[Message], sent: list[TokenRow]
    ) -> None:
        """Send the small deliveries gathered by :meth:`_deliver` in one write, then
        record them as forwarded (one step, one statement for them all); a
        prekey_status due goes first (also when ``pending`` is empty: a large delivery
        is about to stream)."""
        status = await self._due_status(conn)
        if not pending:
            if status:
                await conn.link.send_many(status)
            return
        await conn.link.send_many(status + pending)
        for row in sent:
            if trace.enabled:
                trace.mark("R_sent", row.id)
            self._refresh_claim(conn, row.id)
        self.store.mark_forwarded_many(sent, now=self.now())
        for _ in sent:
            self.metrics.event("forwarded")
        pending.clear()
        sent.clear()
        self._group_commit.mark_dirty()


async def serve(
    secret: MemberSecret,
    arrangement: Arrangement,
    store_path: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits = DEFAULT_LIMITS,
    clock: Callable[[], float] = time.time,
    max_hold: int = MAX_HOLD,
    expiry_interval: float = EXPIRY_INTERVAL,
    metrics: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a relay on TCP until cancelled.

    Usage::

        port = await nursery.start(serve, secret, arrangement, "store/")

    Args:
        secret, arrangement, store_path, limits, clock, max_hold, expiry_interval: as
            for :class:`Relay`.
        host, port: where to listen; port 0 picks a free port.
        metrics: where to serve the metrics and health check (off when None).
        task_status: receives the bound port once the relay accepts connections.

    Raises:
        UsageError: ``secret`` is not the relay's key, or the store is of another
            version. OSError: the address cannot be bound.
    """
    relay = Relay(
        secret,
        arrangement,
        store_path,
        limits=limits,
        clock=clock,
        max_hold=max_hold,
        expiry_interval=expiry_interval,
    )
    try:
        await relay.serve_tcp(host=host, port=port, metrics=metrics, task_status=task_status)
    finally:
        relay.close()
