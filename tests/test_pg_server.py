"""The throwaway PostgreSQL server of the PostgreSQL tests (tests/nodes/pg_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nodes.pg_server as pg_server_module
import psycopg
import pytest
from nodes.pg_server import DSN_ENV, PgServer, PgUnavailable, with_schema


def test_the_test_server_is_up_on_a_unix_socket_only(pg_server: PgServer) -> None:
    with psycopg.connect(pg_server.dsn) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row is not None
    if not os.environ.get(DSN_ENV):
        assert row[0] == ""  # no TCP at all: nothing outside this machine reaches it


def test_each_test_gets_an_empty_schema_of_its_own(pg_server: PgServer) -> None:
    first, second = pg_server.new_schema(), pg_server.new_schema()
    assert first != second
    with psycopg.connect(first) as conn:
        conn.execute("CREATE TABLE probe (a int)")
        conn.commit()
    with psycopg.connect(second) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    assert tables == (0,)


def test_with_schema_sets_the_search_path_and_keeps_the_rest() -> None:
    dsn = with_schema("postgresql://u@/db?host=%2Ftmp%2Fx&options=-c%20a%3Db", "s1")
    assert dsn == "postgresql://u@/db?host=%2Ftmp%2Fx&options=-c%20search_path%3Ds1"


def test_without_postgresql_and_without_root_the_reason_is_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pg_server_module, "find_bindir", lambda: None)
    monkeypatch.setattr(pg_server_module.os, "geteuid", lambda: 1000)
    monkeypatch.delenv(DSN_ENV, raising=False)
    with pytest.raises(PgUnavailable, match=f"install the postgresql package, or set {DSN_ENV}"):
        PgServer().start()


def test_a_server_that_cannot_be_brought_up_fails_the_tests_not_skips_them(
    tmp_path: Path,
) -> None:
    # A test run where PostgreSQL is out of reach: the tests that need it fail, and say why.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
         "tests/test_pg_server.py::test_the_test_server_is_up_on_a_unix_socket_only"],
        env={**os.environ, DSN_ENV: f"postgresql://nobody@/none?host={tmp_path}"},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0, done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    assert "1 error" in summary and "skipped" not in summary, summary
    assert "PostgreSQL is needed for this test and cannot be brought up" in done.stdout
