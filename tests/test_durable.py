"""tisa_io.durable: when the group committer commits steps nobody waits on."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio
import trio.testing

import tisa_io.durable
from clients.events import ExpiredEvent
from clients.store import MemberStore
from tisa_io.durable import GroupCommitter
from tisa_io.link import LinkClosed


def _store(tmp_path: pathlib.Path) -> MemberStore:
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    return store


async def test_a_background_step_is_committed_within_the_delay(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(tisa_io.durable, "BACKGROUND_COMMIT_DELAY", 5.0)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run_background_commits)
            store.add_event(ExpiredEvent(report=b"r" * 16, token=None))
            barrier = store.barrier
            committer.mark_dirty()
            await trio.sleep(4.9)
            assert store.committed < barrier  # not yet: nobody waits on it
            await trio.sleep(0.2)
            assert store.committed >= barrier  # committed and on disk within the delay
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_background_step_rides_with_a_commit_someone_waits_on(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(tisa_io.durable, "BACKGROUND_COMMIT_DELAY", 5.0)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run_background_commits)
            store.add_event(ExpiredEvent(report=b"r" * 16, token=None))
            background = store.barrier
            committer.mark_dirty()
            await trio.sleep(1)
            store.add_event(ExpiredEvent(report=b"s" * 16, token=None))
            await committer.durable(store.barrier)  # someone waits: one commit for both
            assert store.committed >= background
            assert trio.current_time() < 2
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_one_background_committer_works_however_many_tasks_run_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # The relay starts one per connection: a dirty step must wake one of them, not all
    # (each woken one made a timer, and a pass through durable, of its own).
    monkeypatch.setattr(tisa_io.durable, "BACKGROUND_COMMIT_DELAY", 5.0)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    calls: list[int] = []
    durable = committer.durable

    async def counting_durable(barrier: int) -> None:
        calls.append(barrier)
        await durable(barrier)

    monkeypatch.setattr(committer, "durable", counting_durable)
    try:
        async with trio.open_nursery() as nursery:
            scopes = [trio.CancelScope() for _ in range(3)]

            async def connection(scope: trio.CancelScope) -> None:
                with scope:
                    await committer.run_background_commits()

            for scope in scopes:  # the first started is the one that works
                nursery.start_soon(connection, scope)
                await trio.testing.wait_all_tasks_blocked()
            store.add_event(ExpiredEvent(report=b"r" * 16, token=None))
            barrier = store.barrier
            committer.mark_dirty()
            await trio.sleep(6)
            assert store.committed >= barrier
            assert len(calls) == 1 and committer.background_passes == 1
            # The working one ends with its connection in the middle of its delay: the
            # next takes over and commits the step, a delay after it took over.
            store.add_event(ExpiredEvent(report=b"s" * 16, token=None))
            barrier = store.barrier
            committer.mark_dirty()
            await trio.sleep(1)
            scopes[0].cancel()
            await trio.sleep(4.9)
            assert store.committed < barrier
            await trio.sleep(0.2)
            assert store.committed >= barrier
            assert len(calls) == 2
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_checkpoints_run_in_a_worker_thread_not_in_a_commit(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(tisa_io.durable, "CHECKPOINT_STEPS", 3)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    # SQLite's automatic checkpoint (inside a COMMIT, on the event loop) is off.
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    threads: list[threading.Thread] = []
    results: list[tuple[int, int]] = []
    real = store.checkpoint

    def checkpoint() -> tuple[int, int]:
        threads.append(threading.current_thread())
        results.append(real())
        return results[-1]

    store.checkpoint = checkpoint  # type: ignore[method-assign]
    try:
        for number in range(2):
            store.add_event(ExpiredEvent(report=bytes([number]) * 16, token=None))
            await committer.durable(store.barrier)
        assert threads == []  # not yet: 2 steps of 3
        store.add_event(ExpiredEvent(report=b"c" * 16, token=None))
        await committer.durable(store.barrier)
        with trio.fail_after(10):
            while committer.checkpointing or not threads:
                await trio.sleep(0.01)
        assert len(threads) == 1 and threads[0] is not threading.current_thread()
        # Everything in the WAL was copied into the database file.
        [(frames, copied)] = results
        assert frames > 0 and frames == copied
    finally:
        store.close()


class Lazy:
    """A store with one step in its open batch, its committer running background
    commits (delay 5 s), and lazy waits on that step's batch recorded as they end."""

    def __init__(self, store: MemberStore, committer: GroupCommitter) -> None:
        self.store = store
        self.committer = committer
        store.add_event(ExpiredEvent(report=b"r" * 16, token=None))
        self.barrier = store.barrier
        # (returned, trio time, store.committed then), or the exception raised.
        self.ended: list[tuple[bool, float, int] | BaseException] = []

    async def wait(self, wake: trio.Event | None = None) -> None:
        try:
            on_disk = await self.committer.durable_lazily(
                self.barrier, trio.Event() if wake is None else wake
            )
        except LinkClosed as exc:
            self.ended.append(exc)
            return
        self.ended.append((on_disk, trio.current_time(), self.store.committed))


@contextlib.asynccontextmanager
async def lazy_step(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Lazy, trio.Nursery]]:
    monkeypatch.setattr(tisa_io.durable, "BACKGROUND_COMMIT_DELAY", 5.0)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer.run_background_commits)
            yield Lazy(store, committer), nursery
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_lazy_wait_commits_nothing_itself_the_background_commit_bounds_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with lazy_step(tmp_path, monkeypatch) as (lazy, nursery):
        nursery.start_soon(lazy.wait)
        await trio.sleep(4.9)
        assert lazy.ended == [] and lazy.committer.commits == 0
        assert lazy.store.committed < lazy.barrier
        await trio.sleep(0.2)
        # The background commit (marked dirty by the wait) took it: one commit.
        assert len(lazy.ended) == 1
        on_disk, _, committed = lazy.ended[0]  # type: ignore[misc]
        assert on_disk and committed >= lazy.barrier
        assert lazy.committer.commits == 1 and lazy.committer.background_passes == 1


async def test_a_lazy_wait_rides_with_a_commit_someone_waits_on(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with lazy_step(tmp_path, monkeypatch) as (lazy, nursery):
        nursery.start_soon(lazy.wait)
        await trio.sleep(1)
        lazy.store.add_event(ExpiredEvent(report=b"s" * 16, token=None))
        await lazy.committer.durable(lazy.store.barrier)
        await trio.testing.wait_all_tasks_blocked()
        assert [end[0] for end in lazy.ended] == [True]  # type: ignore[index]
        assert lazy.committer.commits == 1 and trio.current_time() < 2


async def test_a_lazy_wait_cut_short_by_the_caller_then_commits_at_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with lazy_step(tmp_path, monkeypatch) as (lazy, nursery):
        # The caller's event cuts the wait short: False, nothing committed.
        wake = trio.Event()
        nursery.start_soon(lazy.wait, wake)
        await trio.sleep(1)
        wake.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [end[0] for end in lazy.ended] == [False]  # type: ignore[index]
        assert lazy.committer.commits == 0
        # durable_unless: lazy until its event is set, then it commits at once.
        urgent = trio.Event()
        returned: list[float] = []

        async def unless() -> None:
            await lazy.committer.durable_unless(lazy.barrier, urgent)
            returned.append(trio.current_time())

        nursery.start_soon(unless)
        await trio.sleep(1)
        assert returned == [] and lazy.committer.commits == 0
        urgent.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(returned) == 1 and returned[0] < 3
        assert lazy.store.committed >= lazy.barrier
        assert lazy.committer.commits == 1  # its own, before the background delay


async def test_a_lazy_wait_returns_only_once_the_fsync_is_done(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tisa_io.durable, "INLINE_FSYNC_MAX_STEPS", -1)  # fsyncs in a thread
    gate = threading.Event()
    with trio.fail_after(10):
        async with lazy_step(tmp_path, monkeypatch) as (lazy, nursery):
            real = lazy.store.fsync_wal

            def gated() -> None:
                gate.wait(10)
                real()

            lazy.store.fsync_wal = gated  # type: ignore[method-assign]
            nursery.start_soon(lazy.wait)
            nursery.start_soon(lazy.committer.durable, lazy.barrier)  # commits; fsync waits
            while not lazy.committer.syncing:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert lazy.store.written >= lazy.barrier and lazy.ended == []  # not on disk
            gate.set()
            while not lazy.ended:
                await trio.sleep(0.01)
            on_disk, _, committed = lazy.ended[0]  # type: ignore[misc]
            assert on_disk and committed >= lazy.barrier


async def test_a_lazy_wait_on_a_lost_batch_raises(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async with lazy_step(tmp_path, monkeypatch) as (lazy, nursery):
        nursery.start_soon(lazy.wait)
        await trio.testing.wait_all_tasks_blocked()

        def failing() -> None:
            raise sqlite3.OperationalError("disk full")

        lazy.store._before_commit = failing  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError):
            await lazy.committer.durable(lazy.barrier)
        await trio.testing.wait_all_tasks_blocked()
        assert len(lazy.ended) == 1 and isinstance(lazy.ended[0], LinkClosed)
        assert lazy.store.lost(lazy.barrier)
        await lazy.wait()  # already lost: at once
        assert isinstance(lazy.ended[1], LinkClosed)
        # durable_unless raises it as such (not in an exception group), whether the
        # batch is lost before or during its wait.
        with pytest.raises(LinkClosed):
            await lazy.committer.durable_unless(lazy.barrier, trio.Event())
        lazy.store.add_event(ExpiredEvent(report=b"s" * 16, token=None))
        later = lazy.store.barrier
        failures: list[BaseException] = []

        async def unless() -> None:
            try:
                await lazy.committer.durable_unless(later, trio.Event())
            except LinkClosed as exc:
                failures.append(exc)

        nursery.start_soon(unless)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(sqlite3.OperationalError):
            await lazy.committer.durable(later)
        await trio.testing.wait_all_tasks_blocked()
        assert len(failures) == 1 and lazy.store.lost(later)


def test_bytes_and_none_are_bound_without_the_adapter_search(tmp_path: pathlib.Path) -> None:
    # Registered at import (bind_without_lookups): found in the registry at once, not
    # searched for through __adapt__ (whose AttributeError cost ~0.7 us a parameter).
    assert sqlite3.adapters[(bytes, sqlite3.PrepareProtocol)] is bytes
    assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters
    db = sqlite3.connect(tmp_path / "bind.db")
    db.execute("CREATE TABLE t (a, b, c, d)")
    blob = bytes(range(256)) * 4
    db.execute("INSERT INTO t VALUES (?, ?, ?, ?)", (blob, None, b"", bytearray(b"x")))
    # Stored as before: BLOBs and a NULL.
    row = db.execute("SELECT a, typeof(a), b, typeof(b), c, typeof(c), d FROM t").fetchone()
    assert row == (blob, "blob", None, "null", b"", "blob", b"x")
    assert db.execute("SELECT count(*) FROM t WHERE a = ?", (blob,)).fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM t WHERE b IS ?", (None,)).fetchone() == (1,)
    db.close()


class GatedCheckpoints:
    """A store's checkpoint wrapped: a pass in a worker thread starts copying only once
    the test let it, and tells when it is done, so the test can open a batch before
    the pass and commit it after (what a steady load does); one in the trio thread
    (the in-line finish) runs at once. Records (in a worker thread, result)."""

    def __init__(self, store: MemberStore, fail: int = 0, gated: bool = True) -> None:
        self.real = store.checkpoint
        self.trio_thread = threading.current_thread()
        self.calls: list[tuple[bool, tuple[int, int] | None]] = []
        self.started = threading.Event()
        self.go_on = threading.Event()
        self.done = threading.Event()
        self.fail = fail  # the first `fail` calls raise
        self.gated = gated
        store.checkpoint = self  # type: ignore[method-assign]

    def __call__(self) -> tuple[int, int]:
        in_worker = threading.current_thread() is not self.trio_thread
        if self.fail > 0:
            self.fail -= 1
            self.calls.append((in_worker, None))
            raise OSError("checkpoint failed")
        gated = in_worker and self.gated
        if gated:
            self.started.set()
            self.go_on.wait(10)
            self.go_on.clear()
        result = self.real()
        self.calls.append((in_worker, result))
        if gated:
            self.done.set()
        return result


async def _durable_step(store: MemberStore, committer: GroupCommitter, number: int) -> None:
    store.add_event(ExpiredEvent(report=number.to_bytes(16, "big"), token=None))
    await committer.durable(store.barrier)


async def _steps_under_load(
    store: MemberStore,
    committer: GroupCommitter,
    gate: GatedCheckpoints,
    count: int,
    busy: Callable[[], bool] = lambda: True,
) -> None:
    # Durable steps one after the other. Whenever a pass starts and busy() says so, a
    # batch is opened before it copies and committed after, as under a steady load;
    # else the pass runs with no batch open.
    with trio.fail_after(60):
        for number in range(count):
            await _durable_step(store, committer, number)
            while committer.checkpointing:
                if not gate.started.is_set():
                    await trio.sleep(0.001)
                    continue
                gate.started.clear()
                if not busy():
                    gate.go_on.set()
                    continue
                store.add_event(ExpiredEvent(report=b"x" * 16, token=None))
                gate.go_on.set()
                await trio.to_thread.run_sync(gate.done.wait, 10)
                gate.done.clear()
                await committer.durable(store.barrier)


@contextlib.contextmanager
def gated_store(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[MemberStore, GroupCommitter, GatedCheckpoints]]:
    """A store with a checkpoint every 5 steps, its passes gated (GatedCheckpoints)."""
    monkeypatch.setattr(tisa_io.durable, "CHECKPOINT_STEPS", 5)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    try:
        yield store, committer, GatedCheckpoints(store)
    finally:
        store.close()


async def test_the_wal_restarts_and_stays_small_though_the_writer_commits_during_a_pass(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gated_store(tmp_path, monkeypatch) as (store, committer, gate):
        await _steps_under_load(store, committer, gate, 40)
        size = store.wal_path.stat().st_size
        await _steps_under_load(store, committer, gate, 110)
        # Reused from its start after each checkpoint, the WAL file stops growing
        # (before, a pass never saw the batch committed during it, the WAL never
        # restarted, and the file grew by every step's frames: 2x here).
        assert store.wal_path.stat().st_size <= size * 1.5
        # Passes in the worker thread (each with a batch committed during it: the
        # first, then CHECKPOINT_PASSES - 1 more at quiet moments), then the in-line
        # finish (trio thread, after a COMMIT) copies the rest; the WAL's length seen
        # by each pass stays that of a few steps.
        passes = [result for in_worker, result in gate.calls if in_worker]
        finishes = [result for in_worker, result in gate.calls if not in_worker]
        assert len(finishes) >= 5
        assert len(passes) >= tisa_io.durable.CHECKPOINT_PASSES * len(finishes)
        assert committer.checkpoints == len(passes)
        assert committer.checkpoint_finishes == len(finishes)
        lengths = [frames for frames, _ in filter(None, passes)]
        assert max(lengths[5:]) <= 2 * max(lengths[:5])
        assert all(result is not None and result[0] == result[1] for result in finishes)


async def test_a_second_pass_at_a_quiet_moment_restarts_the_wal_without_a_finish(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gated_store(tmp_path, monkeypatch) as (store, committer, gate):
        # Each first pass has a batch committed during it; the next one, started
        # right after a fsync with no batch open, has none.
        def first() -> bool:
            return committer.checkpoint_behind == 0

        await _steps_under_load(store, committer, gate, 50, first)
        size = store.wal_path.stat().st_size
        await _steps_under_load(store, committer, gate, 100, first)
        passes = [in_worker for in_worker, _ in gate.calls]
        assert len(passes) >= 25 and all(passes)  # no in-line finish
        assert committer.checkpoint_finishes == 0
        assert store.wal_path.stat().st_size <= size * 1.5  # reused, not grown


async def test_a_checkpoint_starts_at_the_configured_bound_not_before(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tisa_io.durable, "CHECKPOINT_STEPS", 7)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    gate = GatedCheckpoints(store, gated=False)
    try:
        for number in range(6):
            await _durable_step(store, committer, number)
        assert gate.calls == [] and not committer.checkpointing
        await _durable_step(store, committer, 6)
        assert committer.checkpointing
        with trio.fail_after(10):
            while committer.checkpointing:
                await trio.sleep(0.001)
        assert [in_worker for in_worker, _ in gate.calls] == [True]
    finally:
        store.close()


async def test_a_failed_checkpoint_is_logged_and_retried_after_the_bound(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tisa_io.durable, "CHECKPOINT_STEPS", 5)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    gate = GatedCheckpoints(store, fail=2, gated=False)  # the first two passes fail
    try:
        with trio.fail_after(10):
            for number in range(20):
                await _durable_step(store, committer, number)
                while committer.checkpointing:
                    await trio.sleep(0.001)
                if number == 4:
                    assert gate.calls == [(True, None)]
                    assert "WAL checkpoint failed" in caplog.text
                    assert committer.checkpoints == 0
        # Retried every 5 steps: failed twice, then passes that copy everything.
        outcomes = [result is not None for _, result in gate.calls]
        assert outcomes[:2] == [False, False] and all(outcomes[2:]) and len(outcomes) >= 3
        assert committer.checkpoints == len(outcomes) - 2 - committer.checkpoint_finishes
        assert store.committed == store.written  # the steps went on being made durable
    finally:
        store.close()


async def test_a_failed_in_line_finish_is_logged_and_the_step_still_durable(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    gate = GatedCheckpoints(store, fail=1, gated=False)
    # As after passes that all ended with a batch committed during them:
    committer.checkpoint_behind = tisa_io.durable.CHECKPOINT_PASSES
    try:
        await _durable_step(store, committer, 1)  # its COMMIT, then the finish: fails
        assert gate.calls == [(False, None)] and "WAL checkpoint failed" in caplog.text
        assert store.committed == store.written and committer.checkpoint_behind == 0
        assert committer.checkpoint_finishes == 0
    finally:
        store.close()


async def test_the_wal_is_flushed_with_fdatasync_where_there_is_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fdatasync flushes the data and the size needed to read it back (module docstring);
    # SQLite uses it for its own WAL syncs on Linux.
    assert tisa_io.durable.sync_data is getattr(os, "fdatasync", os.fsync)
    flushed: list[int] = []

    def record(fd: int) -> None:
        flushed.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(tisa_io.durable, "sync_data", record)
    store = _store(tmp_path)
    committer = GroupCommitter(store)
    try:
        before = len(flushed)  # opening the store may flush too
        await _durable_step(store, committer, 1)
        assert len(flushed) == before + 1
        assert set(flushed) == {store.wal_path.stat().st_ino}
    finally:
        store.close()


async def test_durable_unless_with_the_callers_event_needs_no_helper_task(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # The relay's pusher: poke sets its urgent event and the lazy wait's event, which
    # durable_unless hands it through `waiting`; nothing else watches the urgent event.
    async with lazy_step(tmp_path, monkeypatch) as (lazy, nursery):
        urgent = trio.Event()
        slot: list[trio.Event | None] = []
        returned: list[float] = []

        def poke() -> None:
            urgent.set()
            if slot and slot[-1] is not None:
                slot[-1].set()

        async def unless() -> None:
            await lazy.committer.durable_unless(lazy.barrier, urgent, slot.append)
            returned.append(trio.current_time())

        nursery.start_soon(unless)
        await trio.sleep(1)
        [task] = [t for t in nursery.child_tasks if t.name.endswith("unless")]
        assert task.child_nurseries == []  # no helper task
        assert isinstance(slot[-1], trio.Event) and not slot[-1].is_set()
        assert returned == [] and lazy.committer.commits == 0  # lazy: no commit yet
        poke()
        await trio.testing.wait_all_tasks_blocked()
        assert len(returned) == 1 and returned[0] < 2 and slot[-1] is None
        assert lazy.store.committed >= lazy.barrier
        assert lazy.committer.commits == 1  # its own, before the background delay
