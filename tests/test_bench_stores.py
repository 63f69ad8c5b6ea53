"""The benchmark's PostgreSQL probes (bench/stores.py): what they read is real.

Nothing here is timed: the probe's figures are checked for what they must be (zero with
no writer; the head row counted as held only while a transaction holds its lock, not for
any writing transaction; a waiter seen).
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from bench.stores import LockProbe


def _probe_while(dsn: str, seconds: float) -> LockProbe:
    probe = LockProbe(dsn)
    probe.start()
    time.sleep(seconds)
    probe.stop()
    return probe


def test_the_lock_probe_tells_the_head_row_held_from_a_writing_transaction(
    pg_dsn: str,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit_head (seq bigint)")
        conn.execute("INSERT INTO audit_head VALUES (0)")
        conn.execute("CREATE TABLE other (n bigint)")
    idle = _probe_while(pg_dsn, 0.2)
    assert idle.looks > 1 and idle.held_s == idle.writing_s == idle.waiting_s == 0
    with psycopg.connect(pg_dsn) as writer:
        # A writing transaction that does not hold the head row.
        writer.execute("INSERT INTO other VALUES (1)")
        writing = _probe_while(pg_dsn, 0.2)
        writer.rollback()
    assert writing.writing_s > 0 and writing.held_s == 0
    with psycopg.connect(pg_dsn) as holder, psycopg.connect(pg_dsn) as waiter:
        holder.execute("SELECT seq FROM audit_head FOR UPDATE")  # a batch appending
        waiter.execute("SET lock_timeout = '1s'")
        busy = LockProbe(pg_dsn)
        busy.start()
        try:
            waiter.execute("SELECT seq FROM audit_head FOR UPDATE")
        except psycopg.errors.LockNotAvailable:
            waiter.rollback()
        busy.stop()
        holder.rollback()
    assert busy.held_s > 0 and busy.writing_s > 0 and busy.waiting_s > 0
    busy.stop()  # a second stop does nothing
    with psycopg.connect(pg_dsn) as holder:
        # Locked, then updated in a savepoint (the row's xmax is a multixact then).
        holder.execute("SELECT seq FROM audit_head FOR UPDATE")
        holder.execute("SAVEPOINT step")
        holder.execute("UPDATE audit_head SET seq = 1")
        holder.execute("RELEASE SAVEPOINT step")
        updated = _probe_while(pg_dsn, 0.2)
        holder.rollback()
    assert updated.held_s > 0
    # Released (rolled back): its id is still the row's xmax, but no longer running.
    after = _probe_while(pg_dsn, 0.2)
    assert after.looks > 1 and after.held_s == 0


def test_a_lock_probe_that_cannot_connect_says_so(tmp_path: Path) -> None:
    probe = LockProbe(f"postgresql://nobody@/none?host={tmp_path}")
    probe.start()
    with pytest.raises(RuntimeError, match="lock probe failed"):
        probe.stop()
