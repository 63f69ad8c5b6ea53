"""Group commit over SQLite in WAL mode, shared by the relay's store and a member's.

:class:`DurableStore` is the store side: batch counters, one savepoint per step (none
for a step that checks everything before it writes), ``COMMIT`` into the WAL, the WAL
fsync, checkpoints, poisoning after a failed fsync, and files removed once the batch
that dropped their row is on disk. :class:`relay.store.Store`
and :class:`clients.store.MemberStore` build on it. :class:`GroupCommitter` is the
event-loop side, used by :class:`relay.server.Relay` and :class:`clients.node.Node`:
it decides when a batch is committed and runs the WAL fsync (in line for a small
batch, in a worker thread for a large one: :data:`INLINE_FSYNC_MAX_STEPS`).

Group commit: with ``group_commit=True`` a store does not commit each step's
transaction. The first write opens one SQLite transaction; every step then runs in a
savepoint of it (a refused step rolls back its own changes only; a step that makes every
check before its first write needs none, and should it fail after writing all the same,
the whole batch is rolled back and lost, as when its ``COMMIT`` fails), and
:meth:`DurableStore.commit` commits them all. :attr:`DurableStore.barrier` names the
batch the current state belongs to; whoever wants to announce something that depends on
that state waits until :attr:`DurableStore.committed` (the last batch *on disk*) reaches
it (:meth:`GroupCommitter.durable`), so nothing is announced before it is on disk, and a
crash loses only batches nobody was told about. A reader that announces only rows of
some kinds may wait for less: :meth:`DurableStore.batch_of` names the last batch whose
steps wrote such rows (:meth:`DurableStore.wrote`), which is the barrier at most and
earlier when unrelated steps opened a batch since. Files are removed only once the batch
that deleted their row is on disk.

Durability without an fsync on the event loop. The database runs in WAL mode with
``synchronous=NORMAL``: ``COMMIT`` appends the batch's frames to the WAL file
(:attr:`DurableStore.wal_path`, ``<database>-wal``) with plain writes (page cache) and
does not fsync. A batch counts as on disk (:meth:`DurableStore.mark_durable`) only after
an ``fdatasync`` (``fsync`` where the system has none) of the WAL file that *started
after its COMMIT returned* has completed
(:meth:`DurableStore.fsync_wal`, run by the event loop, in a worker thread for a
large batch;
:meth:`DurableStore.commit_durably` does both in line). Why that is enough:

* SQLite's unix VFS writes WAL frames with ``pwrite`` and buffers nothing in user
  space, so when ``COMMIT`` returns, every frame of the batch, its commit frame
  included, and the WAL header are in the kernel's page cache of that file. ``fsync``
  works on the file (the inode), not on the descriptor that wrote: one on a separate
  descriptor opened on the WAL file flushes them all. So does ``fdatasync``: it
  flushes the file's data and the metadata needed to read that data back (the file's
  size when it grew, the blocks allocated), leaving out only what is not (the
  modification time); recovery reads the WAL's header and frames, never its
  timestamps. SQLite itself syncs its WAL with ``fdatasync`` on Linux.
* Recovery after a power loss replays WAL frames while their salts match the header
  and their checksums chain, and stops at the first frame that fails; it keeps every
  transaction up to the last valid commit frame. Frames are appended in order, so what
  survives is a prefix of the batches, and once the fsync covering batch N returned,
  batch N and every batch before it are in that prefix (the earlier ones were written
  before it). The ``committed`` counter only moves forward, to the last batch whose
  COMMIT preceded a completed fsync.
* Checkpoints: SQLite fsyncs the WAL before copying frames into the database file and
  fsyncs that file afterwards, before it records the frames as copied. Under a
  :class:`GroupCommitter` the automatic checkpoint (which ran inside a ``COMMIT``, on
  the event loop) is off; the committer runs a PASSIVE checkpoint on a connection of
  its own in a worker thread every :data:`CHECKPOINT_STEPS` durable steps
  (:meth:`DurableStore.checkpoint`), with more passes, or one in line, when the writer
  committed during one (see :data:`CHECKPOINT_PASSES`). A checkpointed batch is on
  disk in the database file either way. Once a checkpoint has copied every frame and
  no reader needs them, the first write of a transaction that *began* after that
  restarts the WAL from its start with new salts (same file, same inode: no
  ``journal_size_limit`` is set, so it is never truncated or replaced, and it is
  deleted only when the last connection closes, which is the store's ``close``, after
  the final sync). A restart can overwrite only frames that are already in the
  fsynced database file; SQLite syncs the new header (``fdatasync``) before it writes
  the first new frame, inside that ``COMMIT`` even at ``synchronous=NORMAL`` (one sync
  on the loop per restart), stale frames with the old salts are not replayed, and our
  later flush covers the new frames as any others.
* Concurrency: while a worker thread fsyncs, the trio thread keeps using the
  connection: it opens the next batch, and may even COMMIT it. The fsync touches no
  SQLite state (only a descriptor of its own), so it cannot race with SQLite's locks;
  it flushes at least what was written before it started, and what it records as
  durable is only the batch written last *before* it started. One fsync is in flight
  at a time; the batch that accumulates meanwhile rides on the next one.
* The WAL file may be new when a store is opened: its directory entry is made durable
  once, by an fsync of the store directory when the store opens.
* A failed fsync poisons the store (:attr:`DurableStore.failed`): after ``EIO`` the
  kernel may have dropped the dirty pages and a later fsync could succeed without them,
  so no later batch may ever be announced; every further commit raises and the process
  must reopen the store (recovery then sees what really is on disk).

A SIGKILL (the crash tests) loses nothing the kernel holds, so for those tests NORMAL
and FULL behave alike; the rule above is what covers a power loss or kernel crash.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import trio

from tisa_io import trace
from tisa_io.link import LinkClosed

__all__ = [
    "CHECKPOINT_PASSES",
    "CHECKPOINT_STEPS",
    "COMMIT_SPACING",
    "BACKGROUND_COMMIT_DELAY",
    "INLINE_FSYNC_MAX_STEPS",
    "MAX_BATCH",
    "Batches",
    "DurableStore",
    "GroupCommitter",
    "bind_without_lookups",
    "sync_data",
]

# Steps in one batch before it is committed even though more work is at hand, so a
# steady flood cannot postpone everyone's answers for long.
MAX_BATCH = 1024

# After a commit that took t seconds, the next one waits until COMMIT_SPACING * t has
# passed: under load the process spends at most 1 / (1 + COMMIT_SPACING) of its time
# blocked in commits and batches grow to what arrives meanwhile; when idle the previous
# commit is long past and a step is committed at once.
COMMIT_SPACING = 1.0

# A WAL fsync covering at most this many steps runs in the event loop's thread; a
# larger one runs in a worker thread. Handing a light load's fsync to a thread
# costs more latency than the fsync: the worker, done, must win the GIL back from a
# busy event loop (up to sys.getswitchinterval(), 5 ms by default) before the loop
# hears of it, and that at each of a report's durable steps (p50 at 300 reports/s
# offered: 11 ms inline vs 30 ms threaded, bench nodes). Under heavy load batches
# are large and the loop's time is worth more than that latency: the thread lets it
# go on handling messages during the fsync (10-20% more throughput).
INLINE_FSYNC_MAX_STEPS = 32

# Seconds a step nobody waits on (a delivery marked forwarded, an event handed over)
# may stay uncommitted, unless a commit someone waits on takes it along first. A commit
# and WAL fsync of their own at once would hold up the event loop (and the answers
# that do wait) for each of them: at 50 reports/s the relay made four fsyncs per
# report, two of them for such steps. A crash before the commit loses only what
# nobody was told about (a delivery is forwarded again, an event handed over again).
BACKGROUND_COMMIT_DELAY = 0.05

# Steps made durable between two WAL checkpoints once a GroupCommitter runs them
# (SQLite's automatic checkpoint is off then). Run inside the COMMIT that crosses
# SQLite's default (1,000 WAL pages), a checkpoint cost that COMMIT several milliseconds
# (reading and fsyncing the database file); a PASSIVE pass in a worker thread, on a
# connection of its own, costs the loop nothing and never waits for the writer.
#
# The bound keeps the WAL file small and *reused*: once every frame is copied into the
# database file, the next batch's first write restarts the WAL from its start, so its
# fsyncs overwrite blocks inside the file (size unchanged) instead of appending to it,
# about half the cost on ext4 (fdatasync after 4 KiB appended 0.26 ms, overwritten
# 0.17 ms, p50). Any bound gives that once the file is reused; a smaller one only
# reaches it sooner, for more passes: each costs a worker thread some 0.75 ms of CPU
# (two fsyncs, a connection), and each restart one header sync inside a COMMIT (see
# the module docstring). Measured with a member store, one step per commit every
# 3 ms (the file stays the size one cycle writes): 100 steps, a 1.2 MB file and 27 us
# of checkpoint CPU per step; 500, 4.5 MB and 5 us; 2,000, 17 MB and 3.4 us.
#
# A pass copies the frames in the WAL when it begins; under a steady load the writer
# commits more meanwhile, and the WAL restarts only if a batch *begins* after every
# frame was copied (without this, at the old bound of 2,000 steps, the WAL never
# restarted: 50 MB after 6,000 steps, every fsync an append). See CHECKPOINT_PASSES.
CHECKPOINT_STEPS = 500

# Passes in a row that may end with the writer past them (a batch committed during
# the pass, or open at its end) before the rest is copied in line instead. Each
# further pass starts at a quiet moment (right after a WAL fsync, with no batch open)
# and copies only what was committed during the one before, so it is short and at a
# light load usually ends before the next batch begins; a pass in a worker thread
# costs the loop nothing. The in-line finish (a PASSIVE checkpoint in the trio thread
# right after a COMMIT, when no batch is open, so the next batch surely restarts the
# WAL) costs the loop an fsync of the WAL and one of the database file: fine once in a
# while, not once per CHECKPOINT_STEPS. Under a load that leaves no quiet moment the
# passes come one per CHECKPOINT_STEPS and the finish one per CHECKPOINT_PASSES of them.
CHECKPOINT_PASSES = 3

log = logging.getLogger(__name__)

# The WAL's flush: fdatasync where there is one (Linux; not macOS), else fsync. It
# flushes the data and the metadata needed to read it back (the size, the blocks),
# not the timestamps (see the module docstring). Public for the benchmarks' floor of a
# durable step (bench/floors.py), which flushes as the stores do.
sync_data: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def bind_without_lookups() -> None:
    """Bind ``bytes`` and ``None`` parameters without the ``sqlite3`` module's adapter
    search (done once, at import; process-wide, as :func:`sqlite3.register_adapter` is).

    The module binds ``int``, ``float``, ``str`` and ``bytearray`` at once, but looks
    every other parameter up: its registry, then ``__adapt__`` on the prepare protocol,
    whose ``AttributeError`` (a formatted message, raised and cleared) made each
    ``bytes`` or ``None`` parameter cost about 0.7 us, some 25 per report at the relay
    (ids, digests, ciphertexts, the audit rows). Registered here, each is found in the
    registry at once and bound as before: ``bytes`` through ``bytes`` (the same object
    back) as a BLOB, ``None`` through an empty dict's ``get`` (``None`` back, a C call)
    as NULL. The values stored do not change (``tests/test_durable.py`` checks both).
    """
    sqlite3.register_adapter(bytes, bytes)
    nothing: dict[None, None] = {}
    sqlite3.register_adapter(type(None), nothing.get)


bind_without_lookups()


class DurableStore:
    """Batch bookkeeping of a SQLite store in WAL mode (see the module docstring).

    A subclass opens :attr:`_db` (``isolation_level=None``, WAL, ``synchronous=NORMAL``)
    and defines :attr:`wal_path`; it may override :meth:`_rolled_back`.
    """

    _db: sqlite3.Connection
    group_commit: bool

    def __init__(self) -> None:
        # Batches: ``generation`` is the one open (or next), ``written`` the last one
        # COMMITted (in the WAL, perhaps only in the page cache), ``committed`` the last
        # one on disk (a WAL fsync covered it); ``ops`` counts the steps in the open one.
        self.generation = 1
        self.written = 0
        self.committed = 0
        self.ops = 0
        # Steps COMMITted but not yet covered by a WAL fsync.
        self.unsynced_ops = 0
        self._wal_file: str | None = None  # wal_path, once known
        self.failed: BaseException | None = None
        self._lost: set[int] = set()
        self._in_step = False
        # Files to remove once the open batch is committed, then (keyed by that batch)
        # once it is on disk.
        self._after_commit: list[Path] = []
        self._after_durable: list[tuple[int, list[Path]]] = []
        # Steps made durable since the last checkpoint (see CHECKPOINT_STEPS).
        self.uncheckpointed_ops = 0
        # Per kind of row a reader announces (see wrote): the batch of the last step
        # that added or changed one, and how many steps did.
        self._kind_batch: dict[str, int] = {}
        self.kind_changes: collections.Counter[str] = collections.Counter()

    @property
    def wal_path(self) -> Path:
        """The WAL file that :meth:`fsync_wal` fsyncs."""
        raise NotImplementedError

    def _rolled_back(self) -> None:
        """Called after a rollback, for state cached outside SQLite."""

    def _step_started(self) -> None:
        """Called when a step begins (a subclass marks its buffered writes)."""

    def _before_commit(self) -> None:
        """Called right before ``COMMIT``, inside the transaction: a subclass writes the
        rows it buffered (they commit with the batch that made them)."""

    def _changes(self) -> int:
        """A count that grows with every write of the open transaction (rows changed,
        plus what a subclass buffers for :meth:`_before_commit`)."""
        return self._db.total_changes

    @property
    def in_transaction(self) -> bool:
        """A batch (or a single transaction) is open. A store on another database
        (:class:`relay.pgstore.PgStore`) overrides this, :meth:`_execute`,
        :meth:`_single`, :meth:`_step` and :meth:`fsync_wal`."""
        return self._db.in_transaction

    def _execute(self, statement: str) -> None:
        # COMMIT and ROLLBACK of the open batch.
        self._db.execute(statement)

    @contextlib.contextmanager
    def _single(self) -> Iterator[sqlite3.Connection]:
        # Without group commit: one transaction, durable on return. BEGIN IMMEDIATE
        # takes the write lock up front, so the checks inside see the state the writes
        # apply to.
        self._db.execute("BEGIN IMMEDIATE")
        self._step_started()
        try:
            yield self._db
            self._before_commit()
        except BaseException:
            self._db.execute("ROLLBACK")
            self._rolled_back()
            raise
        self._db.execute("COMMIT")
        self.fsync_wal()

    @contextlib.contextmanager
    def _step(self, *, savepoint: bool = True) -> Iterator[Any]:
        # One step of the open batch, in a savepoint: a step that raises (a refusal)
        # leaves no trace, the others stay for the batch's commit.
        #
        # savepoint=False: for a step that makes every check before its first write, so
        # a refusal leaves nothing to undo; it saves two statements (SAVEPOINT,
        # RELEASE) per step. Should it raise after a write all the same (an SQLite
        # error), the whole batch is rolled back and lost, as when a COMMIT fails:
        # nothing of it was announced, and its waiters are told (LinkClosed).
        if not self.in_transaction:
            self._begin()
        session = self._session()
        if not savepoint:
            before = self._changes()
            self._in_step = True
            try:
                yield session
            except BaseException:
                if self._statement_spoiled() or self._changes() != before:
                    self._abandon_batch()
                raise
            finally:
                self._in_step = False
            self.ops += 1
            return
        session.execute("SAVEPOINT step")
        self._step_started()
        self._in_step = True
        try:
            yield session
        except BaseException:
            if self.in_transaction:  # else the connection (and the batch) is gone
                session.execute("ROLLBACK TO SAVEPOINT step")
                session.execute("RELEASE SAVEPOINT step")
                self._rolled_back()
            raise
        finally:
            self._in_step = False
        session.execute("RELEASE SAVEPOINT step")
        self.ops += 1

    def _begin(self) -> None:
        """Open a batch (or a single transaction). SQLite: take the write lock up front,
        so the checks inside see the state the writes apply to."""
        self._db.execute("BEGIN IMMEDIATE")

    def _session(self) -> Any:
        """What a step's statements run on (SQLite: the connection)."""
        return self._db

    def _statement_spoiled(self) -> bool:
        """Whether a failed statement spoiled the whole open transaction (never in
        SQLite; in PostgreSQL a failed statement does, so a savepoint-free step whose
        statement failed loses its batch)."""
        return False

    def _remove_after_commit(self, path: Path) -> None:
        # A file whose row this step drops: with a batch open the drop is not on disk
        # yet, so unlink only once it is.
        if self.group_commit and self.in_transaction:
            self._after_commit.append(path)
        else:
            path.unlink(missing_ok=True)

    @property
    def barrier(self) -> int:
        """The batch that must be on disk before the current state may be announced:
        the open one, or the last one written when nothing is open."""
        return self.generation if self.in_transaction else self.written

    def wrote(self, kind: str) -> None:
        """The running step adds rows of ``kind`` (a name the caller chooses) that a
        reader may announce, or changes them: :meth:`batch_of` then names its batch, and
        :attr:`kind_changes` counts it. Call it inside the step. A step that only
        removes rows from what such a reader reads need not call it (announcing less
        before a removal is on disk is always safe)."""
        # Without group commit each transaction is on disk when it returns: batch 0.
        self._kind_batch[kind] = self.generation if self.group_commit else 0
        self.kind_changes[kind] += 1

    def batch_of(self, *kinds: str) -> int:
        """The batch that must be on disk before rows of ``kinds`` read now may be
        announced: the last one that wrote any of them (:meth:`wrote`); every such row
        now visible was written in it or before. Never later than :attr:`barrier`, and
        earlier when unrelated steps opened a batch since: a reader that waits for this
        one does not wait for their commit and fsync."""
        return max([self._kind_batch.get(kind, 0) for kind in kinds], default=0)

    @property
    def pending(self) -> bool:
        """Steps are waiting for :meth:`commit`, or a written batch for its WAL fsync."""
        return self.in_transaction or self.written > self.committed

    def lost(self, batch: int) -> bool:
        """Batch ``batch`` will never be on disk (its commit failed, or the store is
        poisoned): nothing that depends on it may be announced."""
        return batch in self._lost or (self.failed is not None and batch > self.committed)

    def commit(self) -> None:
        """COMMIT the open batch into the WAL (no fsync: :meth:`fsync_wal` and
        :meth:`mark_durable` make it count as on disk).

        On failure the whole batch is rolled back (nothing of it was announced), never
        counts as committed, and the error is raised.

        Raises:
            OSError: the store is poisoned by a failed WAL fsync (:attr:`failed`).
        """
        if self.failed is not None:
            raise OSError("a WAL fsync failed; this store must be reopened") from self.failed
        if not self.in_transaction:
            return
        removals, self._after_commit = self._after_commit, []
        try:
            self._before_commit()
            self._execute("COMMIT")
        except BaseException:
            self._abandon_batch()
            raise
        self.written = self.generation
        self.generation += 1
        self.unsynced_ops += self.ops
        self.ops = 0
        if removals:
            self._after_durable.append((self.written, removals))

    def _abandon_batch(self) -> None:
        # Roll the open batch back whole; it never counts as committed.
        if self.in_transaction:
            self._execute("ROLLBACK")
        self._after_commit = []
        self._rolled_back()
        self._lost.add(self.generation)
        # What the lost batch wrote is gone: rows of those kinds visible now were
        # written in a batch already committed.
        for kind, batch in self._kind_batch.items():
            if batch == self.generation:
                self._kind_batch[kind] = self.written
        self.generation += 1
        self.ops = 0

    def fsync_wal(self) -> None:
        """fsync the WAL file: every batch COMMITted before this call is on disk when it
        returns (see the module docstring). Blocking; touches no SQLite state, so it may
        run in a worker thread while the trio thread goes on using the store. A failure
        poisons the store (:attr:`failed`) and is raised.
        """
        if self._wal_file is None:
            self._wal_file = str(self.wal_path)
        if trace.enabled:
            trace.span_start("fsync")
        try:
            fd = os.open(self._wal_file, os.O_RDONLY)
            try:
                sync_data(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            self.failed = exc
            raise
        if trace.enabled:
            trace.span_end("fsync")

    def manual_checkpoints(self) -> None:
        """Turn SQLite's automatic checkpoint off: :class:`GroupCommitter` runs
        :meth:`checkpoint` in a worker thread instead (see :data:`CHECKPOINT_STEPS`)."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> tuple[int, int]:
        """A PASSIVE WAL checkpoint on a connection of its own: copies what it can of
        the WAL into the database file, fsyncing both (the connection's synchronous is
        SQLite's default, FULL), without waiting for the writer. Blocking; touches no
        state of the store's own connection, so it may run in any thread.

        Returns:
            (frames in the WAL, frames copied into the database file so far).
        """
        wal = str(self.wal_path)
        db = sqlite3.connect(wal[: -len("-wal")], isolation_level=None)
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            db.close()
        return int(frames), int(copied)

    def mark_durable(self, batch: int) -> None:
        """Batch ``batch`` (and every one before it) is on disk: an :meth:`fsync_wal`
        that started after its COMMIT has returned. Removes the files whose rows those
        batches dropped."""
        if self.failed is not None or batch <= self.committed:
            return
        self.committed = batch
        while self._after_durable and self._after_durable[0][0] <= batch:
            for path in self._after_durable.pop(0)[1]:
                path.unlink(missing_ok=True)

    def commit_durably(self) -> None:
        """:meth:`commit`, then the WAL fsync in line (blocking): for start-up, shutdown
        and callers outside the event loop."""
        self.commit()
        if self.written > self.committed:
            target = self.written
            self.fsync_wal()
            self.mark_durable(target)


class Batches(Protocol):
    """What :class:`GroupCommitter` uses of a store: :class:`DurableStore`'s batch
    bookkeeping (also a store on another database, :class:`relay.storage.RelayStore`)."""

    written: int
    committed: int
    ops: int
    unsynced_ops: int
    uncheckpointed_ops: int

    @property
    def barrier(self) -> int:
        """The batch that must be durable before the current state may be announced."""

    @property
    def pending(self) -> bool:
        """Steps wait for a commit, or a written batch for its flush."""

    def lost(self, batch: int) -> bool:
        """Batch ``batch`` will never be durable."""

    def commit(self) -> None:
        """Commit the open batch (no flush)."""

    def fsync_wal(self) -> None:
        """Make every batch committed before this call durable (blocking)."""

    def mark_durable(self, batch: int) -> None:
        """Batch ``batch`` and every one before it are durable."""

    def manual_checkpoints(self) -> None:
        """Stop the database's own checkpoints: the committer runs :meth:`checkpoint`."""

    def checkpoint(self) -> tuple[int, int]:
        """One checkpoint of the write-ahead log (blocking; any thread)."""


class GroupCommitter:
    """Commits a :class:`DurableStore`'s batches from the event loop, one WAL fsync at a
    time (in line or in a worker thread, :data:`INLINE_FSYNC_MAX_STEPS`).

    Whoever handles a message bumps :attr:`activity`; :meth:`durable` commits once a pass
    of the scheduler handled none.

    Args:
        store: the store (opened with ``group_commit=True``).
        on_commit_error: called inside the ``except`` block when a commit fails; it may
            raise something else instead (if it returns, the error is raised).
        on_sync_error: the same for a failed WAL fsync.
        on_synced: called after each flush with the steps it made durable and its
            seconds (the relay's metrics).
    """

    def __init__(
        self,
        store: Batches,
        *,
        on_commit_error: Callable[[], None] | None = None,
        on_sync_error: Callable[[], None] | None = None,
        on_synced: Callable[[int, float], None] | None = None,
    ) -> None:
        self.store = store
        self._on_synced = on_synced
        store.manual_checkpoints()
        # A checkpoint pass runs in a worker thread; passes in a row that ended with
        # the writer past them (see CHECKPOINT_PASSES); passes and in-line finishes.
        self.checkpointing = False
        self.checkpoint_behind = 0
        self.checkpoints = 0
        self.checkpoint_finishes = 0
        self._on_commit_error = on_commit_error
        self._on_sync_error = on_sync_error
        # Messages handled; a batch is committed once a pass of the scheduler handles none.
        self.activity = 0
        # No commit before this trio time (see COMMIT_SPACING).
        self.next_commit = 0.0
        # A WAL fsync is running in a worker thread; _synced is set when it ends.
        self.syncing = False
        self._synced = trio.Event()
        # Set when a step nobody waits on is pending (see mark_dirty).
        self._dirty = trio.Event()
        # Held by the one run_background_commits call that works; the others wait.
        self._background = trio.Lock()
        # Wake-ups of run_background_commits (each one a delay timer and a commit).
        self.background_passes = 0
        # The events of the tasks in durable_lazily: set after each WAL fsync, failed
        # commit and background pass (then forgotten), so each waiter looks again.
        self._lazy_wakes: set[trio.Event] = set()
        # COMMITs made (durable's own, the background pass's included).
        self.commits = 0

    def mark_dirty(self) -> None:
        """A step nobody waits on (an event dropped, a notice sent) is in the open batch:
        have :meth:`run_background_commits` commit it."""
        if self.store.pending:
            self._dirty.set()

    async def run_background_commits(self) -> None:
        """Commit the steps :meth:`mark_dirty` reported, until cancelled, within
        :data:`BACKGROUND_COMMIT_DELAY`. A failed commit is left to :meth:`durable`'s
        error handling (logged by the owner); this goes on.

        Several tasks may run it (the relay starts one with each connection): one
        works, the others wait for it to end (cancelled with its connection) and the
        next takes over, so a step marked dirty costs one wake-up and one timer, not
        one per connection."""
        async with self._background:
            while True:
                await self._dirty.wait()
                self.background_passes += 1
                # Nobody waits on these steps: let them ride with the next commit
                # someone does wait on, else commit them a little later (see the
                # constant). The event is replaced only after the delay, so a task
                # cancelled during it leaves the work to the next one.
                await trio.sleep(BACKGROUND_COMMIT_DELAY)
                self._dirty = trio.Event()
                try:
                    with contextlib.suppress(LinkClosed):
                        await self.durable(self.store.barrier)
                finally:
                    # A batch lost outside a commit (a failed step) has no sync to
                    # tell its lazy waiters: this pass does, within the delay.
                    self._wake_lazy()

    def _wake_lazy(self) -> None:
        wakes, self._lazy_wakes = self._lazy_wakes, set()
        for wake in wakes:
            wake.set()

    async def durable_lazily(self, barrier: int, wake: trio.Event) -> bool:
        """Wait for batch ``barrier`` to be on disk *without committing it*: it rides
        with the next commit someone waits on (:meth:`durable`), at the latest with the
        background commit (marked dirty here: within :data:`BACKGROUND_COMMIT_DELAY`).
        For answers nobody waits on urgently; they still never go out before their
        batch is on disk.

        ``wake`` is the caller's event: the committer sets it after each WAL fsync (and
        failed commit, and background pass), and the caller sets it when something
        urgent queued behind (it then calls :meth:`durable`, which commits). Returns
        True once the batch is on disk, False when ``wake`` was set before (the caller
        looks at its queue and calls again with a fresh event, or :meth:`durable`).

        Raises:
            LinkClosed: the batch was lost, as in :meth:`durable`.
        """
        store = self.store
        if not wake.is_set():
            if store.lost(barrier):
                raise LinkClosed("the batch this depends on was not committed")
            if store.committed >= barrier:
                return True
            self.mark_dirty()
            self._lazy_wakes.add(wake)
            try:
                await wake.wait()
            finally:
                self._lazy_wakes.discard(wake)
        if store.lost(barrier):
            raise LinkClosed("the batch this depends on was not committed")
        return store.committed >= barrier

    async def durable_unless(
        self,
        barrier: int,
        urgent: trio.Event,
        waiting: Callable[[trio.Event | None], object] | None = None,
    ) -> None:
        """Return once batch ``barrier`` is on disk: lazily (:meth:`durable_lazily`,
        no commit of its own) until ``urgent`` is set, then committing
        (:meth:`durable`), e.g. when more work queued behind.

        ``waiting``, when given, is told the event of each lazy wait as it begins (and
        None as it ends); whoever sets ``urgent`` must then set that event too (the
        relay's :meth:`relay.server._Connection.poke` does), and no helper task has to
        watch ``urgent`` to cut the wait short.

        Raises:
            LinkClosed: the batch was lost, as in :meth:`durable`.
        """
        store = self.store
        if not urgent.is_set() and store.committed < barrier and not store.lost(barrier):
            if waiting is not None:
                if await self._lazily_until(barrier, urgent, waiting):
                    return
            else:
                current: list[trio.Event] = []  # the lazy wait's event, while one runs

                def track(wake: trio.Event | None) -> None:
                    current[:] = [] if wake is None else [wake]

                async def cut() -> None:
                    await urgent.wait()
                    for wake in current:
                        wake.set()

                on_disk = False
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cut)
                    try:
                        on_disk = await self._lazily_until(barrier, urgent, track)
                    except LinkClosed:
                        pass  # raised by durable below, outside the nursery (no group)
                    finally:
                        nursery.cancel_scope.cancel()
                if on_disk:
                    return
        await self.durable(barrier)

    async def _lazily_until(
        self, barrier: int, urgent: trio.Event, waiting: Callable[[trio.Event | None], object]
    ) -> bool:
        # durable_lazily, again after each wake-up, until on disk (True) or urgent
        # (False); waiting is told each wait's event (see durable_unless).
        while not urgent.is_set():
            wake = trio.Event()
            waiting(wake)
            try:
                if await self.durable_lazily(barrier, wake):
                    return True
            finally:
                waiting(None)
        return False

    async def durable(self, barrier: int) -> None:
        """Return once batch ``barrier`` is on disk (at once if it is).

        Group commit with no leader: each waiter yields to the scheduler while other
        tasks are still handling messages (so their steps join the batch), and the first
        to see a pass with nothing new, or a full batch, commits (a COMMIT into the WAL,
        no fsync). Under load commits are spaced (:data:`COMMIT_SPACING`). A written
        batch is on disk after the WAL fsync that follows it (:meth:`sync`); while one
        runs in a worker thread the loop goes on, and the batch that grows meanwhile
        waits for it, then is committed and synced in turn.

        Raises:
            LinkClosed: the batch was lost in another task's failed commit or fsync;
                nothing that depends on it may be announced.
            OSError / sqlite3.Error: the commit or the WAL fsync failed (the batch is
                rolled back, or the store poisoned), unless an error hook raised
                something else.
        """
        store = self.store
        while True:
            # Lost first: a later batch may be on disk while this one never will be.
            if store.lost(barrier):
                raise LinkClosed("the batch this depends on was not committed")
            if store.committed >= barrier:
                return
            if store.written >= barrier or self.syncing:
                # Written and waiting for the disk; or a sync is in flight, during
                # which this batch keeps growing.
                await self.sync()
                continue
            before = self.activity
            await trio.lowlevel.checkpoint()
            if store.committed >= barrier or store.written >= barrier or store.lost(barrier):
                continue
            if self.activity == before or store.ops >= MAX_BATCH:
                if store.ops < MAX_BATCH and trio.current_time() < self.next_commit:
                    # Commits are being made back to back: let more steps join this one.
                    await trio.sleep_until(self.next_commit)
                    continue
                started = time.perf_counter()
                if trace.enabled:
                    trace.span_start("commit")
                self.commits += 1
                try:
                    store.commit()
                except Exception:
                    self._wake_lazy()
                    if self._on_commit_error is not None:
                        self._on_commit_error()
                    raise
                if trace.enabled:
                    trace.span_end("commit")
                if self.checkpoint_behind >= CHECKPOINT_PASSES and not self.checkpointing:
                    self._finish_checkpoint()  # no batch is open here: see the constant
                self.next_commit = trio.current_time() + COMMIT_SPACING * (
                    time.perf_counter() - started
                )

    async def sync(self) -> None:
        """Make every written batch durable: run a WAL fsync (in line for a few steps,
        else in a worker thread: :data:`INLINE_FSYNC_MAX_STEPS`), or if one is in
        flight wait for it (the caller then looks again)."""
        if self.syncing:
            await self._synced.wait()
            return
        store = self.store
        target = store.written  # the fsync covers what was written before it starts
        steps, store.unsynced_ops = store.unsynced_ops, 0
        self.syncing = True
        started = time.perf_counter()
        try:
            if steps <= INLINE_FSYNC_MAX_STEPS:
                store.fsync_wal()  # see INLINE_FSYNC_MAX_STEPS
                await trio.lowlevel.checkpoint()
            else:
                await trio.to_thread.run_sync(store.fsync_wal)
        except Exception:
            if self._on_sync_error is not None:
                self._on_sync_error()
            raise
        finally:
            self.syncing = False
            synced, self._synced = self._synced, trio.Event()
            synced.set()
            # The waiters run after mark_durable below (no checkpoint between).
            self._wake_lazy()
        store.mark_durable(target)
        if self._on_synced is not None:
            self._on_synced(steps, time.perf_counter() - started)
        store.uncheckpointed_ops += steps
        if self.checkpointing:
            return
        if 0 < self.checkpoint_behind < CHECKPOINT_PASSES and not store.pending:
            # The last pass ended with the writer past it: another one at this quiet
            # moment (all on disk, no batch open). (The in-line finish comes after a
            # COMMIT: see durable.)
            self._start_checkpoint()
        elif store.uncheckpointed_ops >= CHECKPOINT_STEPS:
            store.uncheckpointed_ops = 0
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        self.checkpointing = True
        trio.lowlevel.spawn_system_task(self._checkpoint)

    async def _checkpoint(self) -> None:
        # A system task: it outlives the caller's connection, and must never raise.
        store = self.store
        try:
            written = store.written
            await trio.to_thread.run_sync(store.checkpoint)
            self.checkpoints += 1
            # The pass copied the frames in the WAL when it began; a batch committed
            # since, or one open now (its snapshot may predate the pass's end), keeps
            # the WAL from restarting: another pass at the next quiet moment, or the
            # in-line finish (see CHECKPOINT_PASSES). (pending: a batch is open, or
            # one written before the pass waits for its fsync: counted all the same.)
            if store.written != written or store.pending:
                self.checkpoint_behind += 1
            else:
                self.checkpoint_behind = 0  # the next batch restarts the WAL
        except sqlite3.ProgrammingError:
            pass  # the store was closed meanwhile: nothing left to finish
        except Exception:
            # Retried after CHECKPOINT_STEPS more steps; the WAL grows meanwhile.
            log.exception("WAL checkpoint failed")
            self.checkpoint_behind = 0
        finally:
            self.checkpointing = False

    def _finish_checkpoint(self) -> None:
        # In line, right after a COMMIT (no batch open): copies the frames committed
        # since the worker's last pass (fsyncing the WAL first, then the database
        # file), so the next batch's first write restarts the WAL.
        self.checkpoint_behind = 0
        if trace.enabled:
            trace.span_start("checkpoint")
        try:
            self.store.checkpoint()
        except Exception:
            log.exception("WAL checkpoint failed")
            return
        if trace.enabled:
            trace.span_end("checkpoint")
        self.checkpoint_finishes += 1
