"""Shared fixtures: the three-party arrangement of the story, with fixed keys."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodes.pg_server import PgServer, PgUnavailable

from tisa.arrangement import Arrangement, Member, Role
from tisa.keys import MemberSecret

# 29 December 2014, the day the arrangement was signed.
TRIO_CREATED = 1419811200


def _test_secret(name: str) -> MemberSecret:
    # Keys derived from the name: tests and vectors are reproducible, and no test key
    # can be mistaken for a real one.
    return MemberSecret(
        sign_seed=hashlib.sha256(b"tisa-test-sign/" + name.encode()).digest(),
        box_secret=hashlib.sha256(b"tisa-test-box/" + name.encode()).digest(),
    )


def make_trio() -> tuple[Arrangement, dict[str, MemberSecret]]:
    """Seoul and Tokyo (originator and recipient each) with Washington as the relay.

    Returns:
        The arrangement (version 1) and each member's secret keys by name. Keys are
        fixed, so the same call always gives the same arrangement id.
    """
    roles = {
        "seoul": frozenset({Role.ORIGINATOR, Role.RECIPIENT}),
        "tokyo": frozenset({Role.ORIGINATOR, Role.RECIPIENT}),
        "washington": frozenset({Role.RELAY}),
    }
    secrets = {name: _test_secret(name) for name in roles}
    arrangement = Arrangement(
        name="tisa-2014",
        version=1,
        members=tuple(
            Member(name=name, identity=secrets[name].public, roles=member_roles)
            for name, member_roles in roles.items()
        ),
        relay="washington",
        scopes=("missile", "nuclear"),
        levels=("restricted", "confidential", "secret"),
        created=TRIO_CREATED,
    )
    return arrangement, secrets


@pytest.fixture
def trio_arrangement() -> tuple[Arrangement, dict[str, MemberSecret]]:
    """:func:`make_trio` as a fixture."""
    return make_trio()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A throwaway PostgreSQL server for the session (see tests/nodes/pg_server.py).
    If none can be brought up the tests that need it fail, saying why: never skipped."""
    server = PgServer()
    try:
        server.start()
    except PgUnavailable as exc:
        server.stop()
        pytest.fail(f"PostgreSQL is needed for this test and cannot be brought up: {exc}")
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """The store address of an empty schema of this test's own."""
    return pg_server.new_schema()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """A fresh relay store address, once per backend: a directory (SQLite) and a
    ``postgresql://`` address (PostgreSQL)."""
    if request.param == "sqlite":
        return tmp_path
    return str(request.getfixturevalue("pg_dsn"))
