"""The throwaway PostgreSQL server of the PostgreSQL tests (tests/nodes/pg_server.py)."""

from __future__ import annotations

import os

import psycopg
from nodes.pg_server import DSN_ENV, PgServer, with_schema


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
