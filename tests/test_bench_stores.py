"""The benchmark's PostgreSQL probes (bench/stores.py, bench/headclock.py): what they read
is real.

Nothing here is timed: the figures are checked for what they must be (zero with no
writer; every hold of the audit chain's head clocked, and only while the row is locked;
a writing transaction and a waiter seen by the sampler; each counted only within its
window).
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from nodes.relay_helpers import NOW

from bench.headclock import TAKES, clocked, read_holds
from bench.stores import LockProbe, head_held
from relay.pgstore import PgStore
from relay.storage import StoreBusy
from tisa.errors import Reason

HEAD_FREE = "SELECT count(*) FROM (SELECT 1 FROM audit_head FOR KEY SHARE SKIP LOCKED) AS free"


def _probe_while(dsn: str, seconds: float) -> LockProbe:
    probe = LockProbe(dsn)
    probe.start()
    time.sleep(seconds)
    probe.stop()
    return probe


def _all_of(probe: LockProbe) -> tuple[float, float]:
    return probe.shares(0.0, time.monotonic())


def test_the_lock_probe_samples_writing_transactions_and_waiters(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE other (n bigint PRIMARY KEY)")
    idle = _probe_while(pg_dsn, 0.2)
    assert len(idle.looks) > 1 and _all_of(idle) == (0, 0)
    with psycopg.connect(pg_dsn) as writer:
        before = time.monotonic()
        writer.execute("INSERT INTO other VALUES (1)")  # a writing transaction
        writing = _probe_while(pg_dsn, 0.2)
        writer.rollback()
    assert _all_of(writing)[0] > 0 and _all_of(writing)[1] == 0
    # Counted within the window only: none of it before the writer began.
    assert writing.shares(0.0, before) == (0, 0)
    with psycopg.connect(pg_dsn) as holder, psycopg.connect(pg_dsn) as waiter:
        holder.execute("INSERT INTO other VALUES (2)")
        waiter.execute("SET lock_timeout = '1s'")
        busy = LockProbe(pg_dsn)
        busy.start()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            waiter.execute("INSERT INTO other VALUES (2)")  # waits for the holder's row
        waiter.rollback()
        busy.stop()
        holder.rollback()
    writing_s, waiting_s = _all_of(busy)
    assert writing_s > 0 and waiting_s > 0
    busy.stop()  # a second stop does nothing


def test_a_lock_probe_that_cannot_connect_says_so(tmp_path: Path) -> None:
    probe = LockProbe(f"postgresql://nobody@/none?host={tmp_path}")
    probe.start()
    with pytest.raises(RuntimeError, match="lock probe failed"):
        probe.stop()


def test_the_head_clock_records_every_hold_while_the_row_is_locked(
    pg_dsn: str, tmp_path: Path
) -> None:
    holds_file = tmp_path / "holds"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit_head (seq bigint)")
        conn.execute("INSERT INTO audit_head VALUES (0)")
    with (
        clocked(holds_file),
        psycopg.connect(pg_dsn, autocommit=True) as batch,
        psycopg.connect(pg_dsn, autocommit=True) as other,
    ):
        batch.execute("BEGIN")
        batch.execute("SELECT seq FROM audit_head FOR UPDATE")
        # Held: the other connection cannot take it, and the hold is not yet on file.
        assert other.execute(HEAD_FREE).fetchone() == (0,)
        batch.execute("UPDATE audit_head SET seq = 1")
        batch.execute("SELECT seq FROM audit_head FOR UPDATE")  # taken again: one hold
        assert read_holds(holds_file) == []
        batch.execute("COMMIT")
        (first,) = read_holds(holds_file)
        assert other.execute(HEAD_FREE).fetchone() == (1,)
        # Rolled back, and with the connection closed within its hold: two more.
        for end in ("ROLLBACK", "close"):
            batch.execute("BEGIN")
            batch.execute("SELECT seq FROM audit_head FOR UPDATE")
            if end == "ROLLBACK":
                batch.execute("ROLLBACK")
            else:
                batch.close()
        # Statements that neither take nor let go of the row: nothing.
        other.execute("BEGIN")
        other.execute("SELECT seq FROM audit_head")
        other.execute("COMMIT")
    holds = read_holds(holds_file)
    assert len(holds) == 3 and holds[0] == first
    for asked, taken, released in holds:
        assert asked < taken < released
    assert holds[0][2] < holds[1][0] and holds[1][2] < holds[2][0]
    # Outside the block, nothing is clocked.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT seq FROM audit_head FOR UPDATE")
        conn.execute("COMMIT")
    assert len(read_holds(holds_file)) == 3


def test_the_head_clock_sees_the_relays_own_holds(pg_dsn: str, tmp_path: Path) -> None:
    # The relay's store as it runs: its statement that takes the head ends as the clock
    # expects, and each batch that appends to the chain is one hold.
    holds_file = tmp_path / "holds"
    with clocked(holds_file):
        store = PgStore(pg_dsn, group_commit=True)
        try:
            for member in ("seoul", "tokyo"):
                store.log_refusal(member=member, reason=Reason.MALFORMED, now=NOW)
                store.commit_durably()
            assert len(read_holds(holds_file)) == 2
            store._conn.execute("SET lock_timeout = 50")  # not LOCK_TIMEOUT_MS, for speed
            with psycopg.connect(pg_dsn) as holder:
                # Not the relay's statement (NOWAIT): not clocked.
                holder.execute("SELECT seq FROM audit_head FOR UPDATE NOWAIT")
                store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
                with pytest.raises(StoreBusy):
                    store.commit()  # never took the head: no hold of its own
        finally:
            store.close()
    assert TAKES == "FROM audit_head FOR UPDATE"
    assert len(read_holds(holds_file)) == 2


def test_head_held_counts_the_holds_within_the_window() -> None:
    second = 1_000_000_000
    holds = [(0, 1 * second, 2 * second), (2 * second, 3 * second, 5 * second)]
    assert head_held(holds, 0.0, 10.0) == {
        "head_held_s": 3.0,
        "head_taking_s": 2.0,
        "head_holds": 2,
    }
    # The window cuts the second hold at 4 s; the first lies before it.
    assert head_held(holds, 2.5, 4.0) == {
        "head_held_s": 1.0,
        "head_taking_s": 0.5,
        "head_holds": 1,
    }
    assert head_held([], 0.0, 10.0) == {"head_held_s": 0, "head_taking_s": 0, "head_holds": 0}
    # Two processes' holds that overlap (one's COMMIT answer clocked after the other took
    # the row): the row's time held counts once, never more than the window.
    other = (int(1.5 * second), int(1.75 * second), int(2.5 * second))
    assert head_held([*holds, other], 0.0, 10.0)["head_held_s"] == 3.5
    assert head_held([(0, 0, 20 * second), other], 1.0, 3.0)["head_held_s"] == 2.0
