"""Fixtures for the relay's tests: a three-member arrangement and ways to drive a relay.

Seoul and Tokyo originate and receive, Washington relays; Beijing holds a key but is
not a member.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import trio

from relay.storage import RelayStore
from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, Role
from tisa.consent import Announcement, Answer, Request
from tisa.handshake import PROTOCOL_VERSION
from tisa.keys import MemberSecret
from tisa.report import SealedReport, seal_report
from tisa.token import issue_token

SCOPE = "nk.missile"
LEVEL = "secret"
NOW = 1_700_000_000


@dataclasses.dataclass
class World:
    arrangement: Arrangement
    secrets: dict[str, MemberSecret]

    @property
    def relay_secret(self) -> MemberSecret:
        return self.secrets["washington"]


def make_world() -> World:
    secrets = {name: MemberSecret.generate() for name in ("seoul", "tokyo", "washington")}
    secrets["beijing"] = MemberSecret.generate()
    both = frozenset({Role.ORIGINATOR, Role.RECIPIENT})
    arrangement = Arrangement(
        name="trisa",
        version=1,
        members=(
            Member(name="seoul", identity=secrets["seoul"].public, roles=both),
            Member(name="tokyo", identity=secrets["tokyo"].public, roles=both),
            Member(
                name="washington",
                identity=secrets["washington"].public,
                roles=frozenset({Role.RELAY}),
            ),
        ),
        relay="washington",
        scopes=(SCOPE, "nk.nuclear"),
        levels=("confidential", LEVEL),
        created=NOW - 1000,
    )
    return World(arrangement=arrangement, secrets=secrets)


def seal(
    world: World,
    body: bytes = b"missile launch at 04:00",
    *,
    recipients: Any = ("tokyo",),
    originator: str = "seoul",
    now: int = NOW,
) -> SealedReport:
    return seal_report(
        world.secrets[originator],
        originator,
        world.arrangement,
        recipients=list(recipients),
        scope=SCOPE,
        level=LEVEL,
        body=body,
        now=now,
    )


def token_for(
    world: World,
    report: SealedReport,
    *,
    recipient: str = "tokyo",
    originator: str = "seoul",
    not_before: int = NOW - 10,
    not_after: int = NOW + 3600,
    counter: int = 1,
    **overrides: Any,
) -> bytes:
    arguments: dict[str, Any] = {
        "recipient": recipient,
        "report_id": report.report_id,
        "digest": report.digest,
        "size": report.size,
        "content_key": report.content_key,
        "scope": SCOPE,
        "level": LEVEL,
        "not_before": not_before,
        "not_after": not_after,
        "counter": counter,
    }
    arguments.update(overrides)
    return issue_token(world.secrets[originator], originator, world.arrangement, **arguments)


def raw_hello(arrangement: Arrangement, member: str) -> bytes:
    """A hello payload for any name, as a stranger would send it."""
    return enc.pack(
        {
            "t": "hello",
            "v": PROTOCOL_VERSION,
            "arrangement": arrangement.id,
            "version": arrangement.version,
            "member": member,
            "eph": bytes(32),
            "nonce": bytes(32),
        }
    )


async def read_raw_frame(stream: trio.abc.Stream) -> bytes:
    """Read one plaintext frame (length prefix, payload) from ``stream``; b"" at EOF."""
    buffer = b""
    while len(buffer) < 4:
        data = await stream.receive_some(4 - len(buffer))
        if not data:
            return b""
        buffer += data
    size = int.from_bytes(buffer, "big")
    payload = b""
    while len(payload) < size:
        data = await stream.receive_some(size - len(payload))
        if not data:
            return b""
        payload += data
    return payload


# --- driving a relay ---------------------------------------------------------------------


class FakeClock:
    """A settable unix clock for the relay's ``clock`` argument."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def custom_token(
    world: World, report: SealedReport, /, *, signer: str = "seoul", **fields: Any
) -> bytes:
    """A token with any body fields, signed by ``signer``; for tokens issue_token refuses."""
    import nacl.bindings as sodium

    from tisa.envelope import seal_envelope
    from tisa.keys import Context, random_id
    from tisa.report import key_commitment

    body: dict[str, Any] = {
        "v": 1,
        "id": random_id(),
        "arrangement": world.arrangement.id,
        "version": world.arrangement.version,
        "originator": "seoul",
        "relay": world.arrangement.relay,
        "recipient": "tokyo",
        "report": report.report_id,
        "digest": report.digest,
        "size": report.size,
        "scope": SCOPE,
        "level": LEVEL,
        "not_before": NOW - 10,
        "not_after": NOW + 3600,
        "counter": 1,
        "key_commit": key_commitment(report.content_key, report.report_id),
        "sealed_key": bytes(
            sodium.crypto_box_seal(
                report.content_key, world.arrangement.member("tokyo").identity.encryption.raw
            )
        ),
    }
    body.update(fields)
    return seal_envelope(world.secrets[signer], Context.TOKEN, body)


def ask(world: World, report: bytes, *, now: int = NOW, valid_for: int = 3600) -> Request:
    """Tokyo's request to Seoul for ``report``."""
    return Request.issue(
        world.secrets["tokyo"],
        "tokyo",
        world.arrangement,
        originator="seoul",
        report=report,
        purpose="Tokyo assesses the same launch",
        now=now,
        valid_for=valid_for,
    )


def deny(world: World, request: Request, reason: str = "denied") -> Answer:
    """Seoul's denial of ``request``."""
    return Answer.deny(
        world.secrets["seoul"], "seoul", world.arrangement, request, reason=reason, now=NOW
    )


def announce(
    world: World, report: SealedReport, *, by: str = "seoul", to: str = "tokyo", title: str = ""
) -> Announcement:
    """``by``'s announcement of ``report`` to ``to``."""
    return Announcement.issue(
        world.secrets[by],
        by,
        world.arrangement,
        report=report.report_id,
        to=[to],
        scope=SCOPE,
        level=LEVEL,
        size=report.size,
        title=title,
        now=NOW,
    )


def add_inline_report(
    store: RelayStore, report: SealedReport, *, originator: str = "seoul"
) -> None:
    """Store ``report`` (its ciphertext in its row) in a relay store, held until NOW + 1 h."""
    store.add_report(
        report.report_id,
        originator=originator,
        size=report.size,
        digest=report.digest,
        expires=NOW + 3600,
        now=NOW,
        data=report.ciphertext,
    )
