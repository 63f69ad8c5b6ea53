"""The benchmark's PostgreSQL probes (bench/stores.py): what they read is real.

Nothing here is timed: the probe's figures are checked for what they must be (zero with
no writer; more than zero while a transaction holds a row lock; a waiter seen).
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from bench.stores import LockProbe
from tisa_testing.pg_server import PgServer


def _probe_while(dsn: str, seconds: float) -> LockProbe:
    probe = LockProbe(dsn)
    probe.start()
    time.sleep(seconds)
    probe.stop()
    return probe


def test_the_lock_probe_sees_a_writing_transaction_and_a_waiter(
    pg_server: PgServer, pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE head (seq bigint)")
        conn.execute("INSERT INTO head VALUES (0)")
    idle = _probe_while(pg_server.dsn, 0.2)
    assert idle.looks > 1 and idle.held_s == 0 and idle.waiting_s == 0
    with psycopg.connect(pg_dsn) as holder, psycopg.connect(pg_dsn) as waiter:
        holder.execute("SELECT seq FROM head FOR UPDATE")  # as a relay's batch begins
        waiter.execute("SET lock_timeout = '1s'")
        busy = LockProbe(pg_server.dsn)
        busy.start()
        try:
            waiter.execute("SELECT seq FROM head FOR UPDATE")
        except psycopg.errors.LockNotAvailable:
            waiter.rollback()
        busy.stop()
        holder.rollback()
    assert busy.held_s > 0 and busy.waiting_s > 0
    busy.stop()  # a second stop does nothing


def test_a_lock_probe_that_cannot_connect_says_so(tmp_path: Path) -> None:
    probe = LockProbe(f"postgresql://nobody@/none?host={tmp_path}")
    probe.start()
    with pytest.raises(RuntimeError, match="lock probe failed"):
        probe.stop()
