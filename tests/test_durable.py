"""tisa_io.durable: when the group committer commits steps nobody waits on."""

from __future__ import annotations

import pathlib

import pytest
import trio
import trio.testing

import tisa_io.durable
from clients.events import ExpiredEvent
from clients.store import MemberStore
from tisa_io.durable import GroupCommitter


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
