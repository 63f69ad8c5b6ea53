"""Fixtures for the client node tests: the story's parties plus Canberra.

Seoul and Tokyo originate and receive, Washington relays, Canberra only receives (so a
report can name two recipients and be released to one). Keys are derived from names,
so every run builds the same arrangement.
"""

from __future__ import annotations

import hashlib

from tisa.arrangement import Arrangement, Member, Role
from tisa.keys import MemberSecret

SCOPE = "missile"
LEVEL = "secret"
CREATED = 1419811200


def secret_for(name: str) -> MemberSecret:
    return MemberSecret(
        sign_seed=hashlib.sha256(b"tisa-client-test-sign/" + name.encode()).digest(),
        box_secret=hashlib.sha256(b"tisa-client-test-box/" + name.encode()).digest(),
    )


def make_world() -> tuple[Arrangement, dict[str, MemberSecret]]:
    both = frozenset({Role.ORIGINATOR, Role.RECIPIENT})
    roles = {
        "seoul": both,
        "tokyo": both,
        "washington": frozenset({Role.RELAY}),
        "canberra": frozenset({Role.RECIPIENT}),
    }
    secrets = {name: secret_for(name) for name in [*roles, "pyongyang"]}
    arrangement = Arrangement(
        name="tisa-2014",
        version=1,
        members=tuple(
            Member(name=name, identity=secrets[name].public, roles=r) for name, r in roles.items()
        ),
        relay="washington",
        scopes=("missile", "nuclear"),
        levels=("restricted", "confidential", "secret"),
        created=CREATED,
    )
    return arrangement, secrets
