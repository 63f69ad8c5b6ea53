"""Fixtures for the relay's tests: a three-member arrangement and ways to drive a relay.

Seoul and Tokyo originate and receive, Washington relays; Beijing holds a key but is
not a member.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import trio

from relay.storage import RelayStore
from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, Role
from tisa.consent import Announcement, Answer, Request
from tisa.errors import Reason, Refused
from tisa.handshake import PROTOCOL_VERSION
from tisa.keys import MemberSecret
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.receipt import Receipt
from tisa.report import SealedReport, seal_report
from tisa.token import ReleaseToken, issue_token

SCOPE = "nk.missile"
LEVEL = "secret"
NOW = 1_700_000_000


@dataclasses.dataclass
class World:
    arrangement: Arrangement
    secrets: dict[str, MemberSecret]
    # Each member's prekey secrets by public key; its signed prekey, once made.
    prekey_secrets: dict[str, dict[bytes, PrekeySecret]] = dataclasses.field(default_factory=dict)
    signed: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def relay_secret(self) -> MemberSecret:
        return self.secrets["washington"]

    def prekey(self, owner: str, kind: PrekeyKind = PrekeyKind.ONE_TIME) -> bytes:
        """A fresh published prekey of ``owner``'s (valid a day); its secret is kept."""
        secret = PrekeySecret.generate(kind, created=NOW - 60, not_after=NOW + 86400)
        self.prekey_secrets.setdefault(owner, {})[secret.public] = secret
        return secret.publish(self.secrets[owner], owner, self.arrangement)

    def signed_prekey(self, owner: str) -> bytes:
        if owner not in self.signed:
            self.signed[owner] = self.prekey(owner, PrekeyKind.SIGNED)
        return self.signed[owner]

    def lookup(self, owner: str) -> Callable[[PrekeyKind, bytes], bytes]:
        def find(kind: PrekeyKind, public: bytes) -> bytes:
            secret = self.prekey_secrets.get(owner, {}).get(public)
            if secret is None:
                raise Refused(Reason.UNKNOWN_PREKEY, "not held")
            return secret.secret

        return find


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


def same_id_other_bytes(world: World, report: SealedReport) -> SealedReport:
    """Another report sealed under ``report``'s id (a different report with this id)."""
    other = seal(world, b"other bytes")
    return SealedReport(
        report_id=report.report_id,
        ciphertext=other.ciphertext,
        digest=other.digest,
        content_key=other.content_key,
        header=other.header,
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
        # Signed prekey only: a one-time prekey is one the relay must have handed out.
        "signed_prekey": world.signed_prekey(recipient) if recipient in world.secrets else None,
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
    from tisa import encoding as enc
    from tisa.envelope import seal_envelope
    from tisa.keys import Context, random_id

    # A valid token (key wrapped to Tokyo's prekey), its fields then changed.
    body: dict[str, Any] = enc.unpack(enc.unpack(token_for(world, report))["body"])
    body.update(id=random_id(), counter=1)
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


def released(store: RelayStore, world: World, count: int = 1) -> list[ReleaseToken]:
    """``count`` reports of Seoul's stored (:func:`add_inline_report`) and released to
    Tokyo in a relay store, one token each."""
    tokens = []
    for _ in range(count):
        report = seal(world)
        add_inline_report(store, report)
        token = ReleaseToken.decode(token_for(world, report))
        store.release(token, now=NOW, max_queue=100)
        tokens.append(token)
    return tokens


def receipt_for(world: World, token: ReleaseToken, **changes: Any) -> Receipt:
    """Tokyo's receipt of the delivery of ``token`` (``changes``: fields made wrong)."""
    fields: dict[str, Any] = {
        "report": token.report,
        "token": token.id,
        "originator": token.originator,
        "recipient": "tokyo",
        "digest": token.digest,
        "received": NOW,
    }
    fields.update(changes)
    return Receipt.issue(world.secrets["tokyo"], world.arrangement, **fields)
