"""Shared fixtures: the three-party arrangement of the story, with fixed keys."""

from __future__ import annotations

import hashlib

import pytest

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
