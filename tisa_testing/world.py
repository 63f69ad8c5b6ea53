"""A small arrangement to test against, and one-call helpers to seal and release in it.

The story's three parties: Seoul and Tokyo originate and receive, Washington relays.
With ``third_party=True`` a fourth member, Canberra, may receive: surreptitious
forwarding needs someone to forward to. Keys are derived from the member names unless
``fresh_keys`` is set, so ids and encodings are the same in every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tisa.arrangement import Arrangement, Member, Role, SignedArrangement
from tisa.errors import Reason, Refused
from tisa.keys import MemberSecret
from tisa.prekeys import Prekey, PrekeyKind, PrekeySecret
from tisa.report import SealedReport, seal_report
from tisa.token import Release, check_for_recipient, issue_token

__all__ = [
    "LEVEL",
    "NOW",
    "SCOPE",
    "World",
    "fixed_secret",
    "make_world",
]

SCOPE = "nk.missile"
LEVEL = "secret"
# 29 December 2014, 00:00 UTC: the day the arrangement was signed.
NOW = 1419811200

_BOTH = frozenset({Role.ORIGINATOR, Role.RECIPIENT})


def fixed_secret(name: str, salt: str = "") -> MemberSecret:
    """Keys derived from a name: reproducible, and never mistaken for a real key."""
    seed = f"tisa-testing/{salt}/{name}".encode()
    return MemberSecret(
        sign_seed=hashlib.sha256(b"sign:" + seed).digest(),
        box_secret=hashlib.sha256(b"box:" + seed).digest(),
    )


@dataclasses.dataclass
class World:
    """An effective arrangement, every member's secret keys, and a clock.

    Attributes:
        arrangement: the effective arrangement (version 1).
        signed: the same, with every member's signature (what a node loads).
        secrets: each member's secret keys by name.
        now: the time the helpers use (unix seconds); tests may move it.
        outsider: keys of a party that is not a member (an impostor).
    """

    arrangement: Arrangement
    signed: SignedArrangement
    secrets: dict[str, MemberSecret]
    outsider: MemberSecret
    now: int = NOW
    _counters: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    # Each member's prekey secrets by public key, and its current signed prekey.
    prekey_secrets: dict[str, dict[bytes, PrekeySecret]] = dataclasses.field(default_factory=dict)
    _signed: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def prekey(self, owner: str, kind: PrekeyKind = PrekeyKind.ONE_TIME) -> bytes:
        """A fresh prekey of ``owner``'s, published (signed) at :attr:`now` for a week;
        its secret is kept in :attr:`prekey_secrets`. Returns the encoded prekey."""
        secret = PrekeySecret.generate(kind, created=self.now - 60, not_after=self.now + 7 * 86400)
        self.prekey_secrets.setdefault(owner, {})[secret.public] = secret
        return secret.publish(self.secrets[owner], owner, self.arrangement)

    def signed_prekey(self, owner: str) -> bytes:
        """``owner``'s current signed prekey (made on first use)."""
        if owner not in self._signed:
            self._signed[owner] = self.prekey(owner, PrekeyKind.SIGNED)
        return self._signed[owner]

    def signed_prekey_key(self, owner: str) -> bytes:
        """The X25519 public key of ``owner``'s current signed prekey (to wrap to)."""
        return Prekey.decode(self.signed_prekey(owner)).key

    def prekey_lookup(self, owner: str) -> Callable[[PrekeyKind, bytes], bytes]:
        """The ``prekey_secret`` lookup of :func:`tisa.token.check_for_recipient` for
        ``owner``: its kept secrets; ``unknown_prekey`` for any other."""

        def lookup(kind: PrekeyKind, public: bytes) -> bytes:
            secret = self.prekey_secrets.get(owner, {}).get(public)
            if secret is None or secret.kind is not kind:
                raise Refused(Reason.UNKNOWN_PREKEY, "no such prekey")
            return secret.secret

        return lookup

    @property
    def relay(self) -> str:
        """The relay's member name in :attr:`arrangement`."""
        return self.arrangement.relay

    def seal(
        self,
        body: bytes = b"missile launch detected at 04:00",
        *,
        originator: str = "seoul",
        recipients: Iterable[str] = ("tokyo",),
        scope: str = SCOPE,
        level: str = LEVEL,
        attachments: Sequence[tuple[str, bytes]] = (),
    ) -> SealedReport:
        """Seal a report as ``originator`` at :attr:`now`."""
        return seal_report(
            self.secrets[originator],
            originator,
            self.arrangement,
            recipients=list(recipients),
            scope=scope,
            level=level,
            body=body,
            now=self.now,
            attachments=attachments,
        )

    def next_counter(self, originator: str, recipient: str) -> int:
        """The next release counter for (originator, recipient), as an originator keeps it."""
        key = (originator, recipient)
        self._counters[key] = self._counters.get(key, 0) + 1
        return self._counters[key]

    def token(
        self,
        report: SealedReport,
        recipient: str = "tokyo",
        *,
        originator: str | None = None,
        not_before: int | None = None,
        not_after: int | None = None,
        counter: int | None = None,
        **overrides: Any,
    ) -> bytes:
        """Issue a release token for ``report`` to ``recipient`` (valid for an hour).

        ``originator`` defaults to the report's; ``overrides`` go to
        :func:`tisa.token.issue_token` (e.g. ``content_key``, ``scope``). The key is
        wrapped to the recipient's signed prekey unless ``signed_prekey`` is given; pass
        ``one_time_prekey=world.prekey(recipient)`` for a one-time prekey too (a real
        relay accepts only one it handed out itself).
        """
        originator = originator or report.header.originator
        arguments: dict[str, Any] = {
            "recipient": recipient,
            "report_id": report.report_id,
            "digest": report.digest,
            "size": report.size,
            "content_key": report.content_key,
            "scope": report.header.scope,
            "level": report.header.level,
            "not_before": self.now - 10 if not_before is None else not_before,
            "not_after": self.now + 3600 if not_after is None else not_after,
            "counter": self.next_counter(originator, recipient) if counter is None else counter,
        }
        arguments.update(overrides)
        if "signed_prekey" not in arguments:
            arguments["signed_prekey"] = self.signed_prekey(recipient)

        return issue_token(self.secrets[originator], originator, self.arrangement, **arguments)

    def check(self, token: bytes, recipient: str = "tokyo") -> Release:
        """``recipient``'s check of ``token`` at :attr:`now`."""
        return check_for_recipient(
            token,
            self.arrangement,
            self.secrets[recipient],
            recipient,
            now=self.now,
            prekey_secret=self.prekey_lookup(recipient),
        )


def make_world(
    *,
    third_party: bool = False,
    fresh_keys: bool = False,
    salt: str = "",
    identity_fallback: bool = False,
) -> World:
    """The arrangement of the story, signed by every member.

    Args:
        third_party: add Canberra, a recipient only.
        identity_fallback: the arrangement allows the last-resort key wrap to the
            long-term key (see :attr:`tisa.arrangement.Arrangement.identity_fallback`).
        fresh_keys: random keys instead of keys derived from the names.
        salt: derive different fixed keys (two worlds side by side).
    """
    roles = {
        "seoul": _BOTH,
        "tokyo": _BOTH,
        "washington": frozenset({Role.RELAY}),
    }
    if third_party:
        roles["canberra"] = frozenset({Role.RECIPIENT})
    secrets = {
        name: MemberSecret.generate() if fresh_keys else fixed_secret(name, salt) for name in roles
    }
    arrangement = Arrangement(
        name="tisa-2014",
        version=1,
        members=tuple(
            Member(name=name, identity=secrets[name].public, roles=member_roles)
            for name, member_roles in roles.items()
        ),
        relay="washington",
        scopes=(SCOPE, "nk.nuclear"),
        levels=("confidential", LEVEL),
        created=NOW - 86400,
        identity_fallback=identity_fallback,
    )
    signed = SignedArrangement(arrangement)
    for name, secret in secrets.items():
        signed = signed.signed_by(secret, name)
    outsider = MemberSecret.generate() if fresh_keys else fixed_secret("beijing", salt)
    return World(arrangement=arrangement, signed=signed, secrets=secrets, outsider=outsider)
