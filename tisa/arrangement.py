"""The arrangement: who shares what, through which relay, signed by every member.

An :class:`Arrangement` lists the members (name, public identity, roles), the relay, the
scopes that may be shared and the ordered levels. Its id is the BLAKE2b hash of its
canonical encoding. Each member signs the id separately, in any order; a
:class:`SignedArrangement` is *effective* only when every member has signed. An amendment
is a new version whose ``previous`` names the old id, and it needs every signature again.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from typing import Any

from tisa import encoding as enc
from tisa.errors import (
    ArrangementNotEffective,
    ProtocolError,
    Reason,
    Refused,
    UsageError,
)
from tisa.keys import (
    DIGEST_SIZE,
    SIGNATURE_SIZE,
    Context,
    Hash,
    MemberSecret,
    PublicIdentity,
    digest,
    verify,
)
from tisa.limits import MAX_NAME

__all__ = ["Arrangement", "Member", "Role", "SignedArrangement"]

# Members per arrangement. The story has three; a few hundred is still one small file
# that every node loads whole, and bounds the signature checks when it is loaded.
MAX_MEMBERS = 256
# Scopes and levels per arrangement.
MAX_SCOPES = 256
MAX_LEVELS = 64
# An arrangement file, signatures included.
MAX_ARRANGEMENT_SIZE = 256 * 1024
# Highest version number; one amendment a second would take over a century to reach it.
MAX_VERSION = 2**32


class Role(enum.StrEnum):
    """What a member may do: originate reports, receive them, or be the relay."""

    ORIGINATOR = "originator"
    RECIPIENT = "recipient"
    RELAY = "relay"


_name = enc.text(MAX_NAME)


def check_name(value: str, what: str = "name") -> str:
    """Validate a member, scope or level name as the wire schema does."""
    try:
        return str(_name(value, what))
    except ProtocolError as exc:
        raise UsageError(str(exc)) from None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One member of an arrangement: name, public identity and roles. Checked when constructed.

    Raises (constructor):
        UsageError: a bad name, an identity that is not a :class:`PublicIdentity`, roles that
            are not :class:`Role` values or are empty, or the relay role with another role.
    """

    name: str
    identity: PublicIdentity
    roles: frozenset[Role]

    def __post_init__(self) -> None:
        check_name(self.name, "member name")
        if not isinstance(self.identity, PublicIdentity):
            raise UsageError("identity must be a PublicIdentity")
        if isinstance(self.roles, str):
            raise UsageError("roles is a set of Role values, not one string")
        try:
            roles = frozenset(Role(r) for r in self.roles)
        except (TypeError, ValueError):
            raise UsageError(f"member {self.name!r}: roles must be Role values") from None
        if not roles:
            raise UsageError(f"member {self.name!r} has no role")
        if Role.RELAY in roles and len(roles) > 1:
            # A relay that could also receive would hold content keys; a party that is
            # also the relay joins under a separate recipient identity instead.
            raise UsageError("the relay holds no other role; use a separate identity")
        object.__setattr__(self, "roles", roles)

    def to_dict(self) -> dict[str, Any]:
        """The member as its wire map (roles sorted)."""
        return {
            "name": self.name,
            "identity": self.identity.to_dict(),
            "roles": sorted(r.value for r in self.roles),
        }

    @classmethod
    def from_dict(cls, value: Any, path: str) -> Member:
        """Check a member map from an arrangement; ``path`` names it in errors.

        Raises:
            ProtocolError: malformed, or a member the constructor refuses.
        """
        fields = enc.check_map(
            value,
            {
                "name": _name,
                "identity": PublicIdentity.from_dict,
                "roles": enc.list_of(
                    enc.one_of(*(r.value for r in Role)),
                    min_items=1,
                    max_items=3,
                    unique=True,
                    sorted_=True,
                ),
            },
            path,
        )
        try:
            return cls(
                name=fields["name"],
                identity=fields["identity"],
                roles=frozenset(Role(r) for r in fields["roles"]),
            )
        except UsageError as exc:
            raise ProtocolError(f"{path}: {exc}") from None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Arrangement:
    """One version of an arrangement (unsigned). Validates itself when constructed."""

    name: str
    version: int
    members: tuple[Member, ...]
    relay: str
    scopes: tuple[str, ...]
    levels: tuple[str, ...]
    created: int
    previous: bytes | None = None
    # Whether an originator may, as a last resort, wrap a token's content key to the
    # recipient's long-term key when the relay has no signed prekey of it (no forward
    # secrecy for that report). Encoded only when true, so every arrangement made before
    # the option existed keeps its encoding and id.
    identity_fallback: bool = False
    encoded: bytes = dataclasses.field(init=False, repr=False, compare=False)
    id: bytes = dataclasses.field(init=False, repr=False, compare=False)
    _by_name: Mapping[str, Member] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_name(self.name, "arrangement name")
        # Bounds as in decode(), so every arrangement built here can be loaded again.
        if (
            isinstance(self.version, bool)
            or not isinstance(self.version, int)
            or not 1 <= self.version <= MAX_VERSION
        ):
            raise UsageError(f"version must be an integer in 1..{MAX_VERSION}")
        if (
            isinstance(self.created, bool)
            or not isinstance(self.created, int)
            or not 0 <= self.created < 2**64
        ):
            raise UsageError("created must be a unix time in whole seconds")
        if self.previous is not None and (
            type(self.previous) is not bytes or len(self.previous) != DIGEST_SIZE
        ):
            raise UsageError("previous must be the 32-byte id of the previous version")
        if (self.version == 1) != (self.previous is None):
            raise UsageError("version 1 has no previous; every later version names one")
        if type(self.identity_fallback) is not bool:
            raise UsageError("identity_fallback is a boolean")
        members = tuple(self.members)
        if not all(isinstance(member, Member) for member in members):
            raise UsageError("members must be Member values")
        members = tuple(sorted(members, key=lambda m: m.name.encode("utf-8")))
        if not 2 <= len(members) <= MAX_MEMBERS:
            raise UsageError(f"an arrangement has 2..{MAX_MEMBERS} members")
        by_name: dict[str, Member] = {}
        seen_keys: set[bytes] = set()
        for member in members:
            if member.name in by_name:
                raise UsageError(f"member {member.name!r} listed twice")
            for raw in (member.identity.signing.raw, member.identity.encryption.raw):
                # Two members sharing a key would let one act as the other.
                if raw in seen_keys:
                    raise UsageError(f"member {member.name!r} reuses another member's key")
                seen_keys.add(raw)
            by_name[member.name] = member
        relay = by_name.get(self.relay)
        if relay is None or Role.RELAY not in relay.roles:
            raise UsageError(f"relay {self.relay!r} must be a member with the relay role")
        if sum(Role.RELAY in m.roles for m in members) != 1:
            raise UsageError("exactly one member has the relay role")
        if not any(Role.ORIGINATOR in m.roles for m in members):
            raise UsageError("no member may originate reports")
        if not any(Role.RECIPIENT in m.roles for m in members):
            raise UsageError("no member may receive reports")
        if isinstance(self.scopes, str) or isinstance(self.levels, str):
            # A lone string would be taken apart into one-letter names.
            raise UsageError("scopes and levels are sequences of names, not one string")
        scopes = tuple(sorted({check_name(s, "scope") for s in self.scopes}, key=str.encode))
        if not 1 <= len(scopes) <= MAX_SCOPES or len(scopes) != len(self.scopes):
            raise UsageError(f"1..{MAX_SCOPES} distinct scopes")
        levels = tuple(check_name(level, "level") for level in self.levels)
        if not 1 <= len(levels) <= MAX_LEVELS or len(set(levels)) != len(levels):
            raise UsageError(f"1..{MAX_LEVELS} distinct levels, lowest first")
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "scopes", scopes)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "_by_name", by_name)
        encoded = enc.pack(self.to_dict())
        if len(encoded) > MAX_ARRANGEMENT_SIZE // 2:
            raise UsageError("arrangement too large")
        object.__setattr__(self, "encoded", encoded)
        object.__setattr__(self, "id", digest(Hash.ARRANGEMENT, encoded))

    def to_dict(self) -> dict[str, Any]:
        """The arrangement as its wire map (``encoded`` is its canonical encoding)."""
        optional: dict[str, Any] = {"identity_fallback": True} if self.identity_fallback else {}
        return {
            **optional,
            "v": 1,
            "name": self.name,
            "version": self.version,
            "previous": self.previous,
            "members": [m.to_dict() for m in self.members],
            "relay": self.relay,
            "scopes": list(self.scopes),
            "levels": list(self.levels),
            "created": self.created,
        }

    @classmethod
    def decode(cls, data: bytes) -> Arrangement:
        """Decode an unsigned arrangement from its canonical encoding.

        Raises:
            ProtocolError: not a canonical, valid arrangement.
        """
        value = enc.unpack(data, max_size=MAX_ARRANGEMENT_SIZE)
        # Optional, present only when true: absent is the one encoding of false.
        identity_fallback = value.pop("identity_fallback", None)
        if identity_fallback is not None and identity_fallback is not True:
            raise ProtocolError("arrangement.identity_fallback: present only as true")
        fields = enc.check_map(
            value,
            {
                "v": enc.uint(1, 1),
                "name": _name,
                "version": enc.uint(MAX_VERSION, 1),
                "previous": enc.optional(enc.bin_exact(DIGEST_SIZE)),
                "members": enc.list_of(lambda v, p: v, max_items=MAX_MEMBERS, min_items=2),
                "relay": _name,
                "scopes": enc.list_of(_name, max_items=MAX_SCOPES, min_items=1, sorted_=True),
                "levels": enc.list_of(_name, max_items=MAX_LEVELS, min_items=1),
                "created": enc.uint(),
            },
            "arrangement",
        )
        members = tuple(
            Member.from_dict(m, f"arrangement.members[{i}]")
            for i, m in enumerate(fields["members"])
        )
        try:
            arrangement = cls(
                name=fields["name"],
                version=fields["version"],
                previous=fields["previous"],
                members=members,
                relay=fields["relay"],
                scopes=tuple(fields["scopes"]),
                levels=tuple(fields["levels"]),
                created=fields["created"],
                identity_fallback=identity_fallback is True,
            )
        except UsageError as exc:
            raise ProtocolError(f"arrangement: {exc}") from None
        if arrangement.encoded != data:
            raise ProtocolError("arrangement: not canonical")
        return arrangement

    # --- lookups and policy ----------------------------------------------------------

    def member(self, name: str) -> Member:
        """The member called ``name``. Raises Refused(NOT_A_MEMBER)."""
        member = self._by_name.get(name)
        if member is None:
            raise Refused(Reason.NOT_A_MEMBER, f"{name!r} is not a member")
        return member

    def require_role(self, name: str, role: Role) -> Member:
        """The member called ``name``, which must hold ``role``."""
        member = self.member(name)
        if role not in member.roles:
            article = "an" if role.value[0] in "aeiou" else "a"
            raise Refused(Reason.WRONG_ROLE, f"{name!r} is not {article} {role.value}")
        return member

    def member_by_signing_key(self, raw: bytes) -> Member | None:
        """The member whose Ed25519 public key is ``raw``, or None."""
        for member in self.members:
            if member.identity.signing.raw == raw:
                return member
        return None

    def check_scope_level(self, scope: str, level: str) -> None:
        """Raises Refused(OUT_OF_SCOPE or LEVEL_NOT_ALLOWED)."""
        if scope not in self.scopes:
            raise Refused(Reason.OUT_OF_SCOPE, f"scope {scope!r} is not in the arrangement")
        if level not in self.levels:
            raise Refused(Reason.LEVEL_NOT_ALLOWED, f"level {level!r} is not in the arrangement")

    def check_share(
        self, originator: str, recipients: Iterable[str], scope: str, level: str
    ) -> None:
        """Check that ``originator`` may share at ``scope``/``level`` with ``recipients``.

        Raises:
            Refused: with the first reason found (not a member, wrong role, scope, level).
        """
        self.require_role(originator, Role.ORIGINATOR)
        self.check_recipients(originator, recipients, scope, level)

    def check_recipients(
        self, originator: str, recipients: Iterable[str], scope: str, level: str
    ) -> None:
        """:meth:`check_share` after its first check, for a caller that has just found
        ``originator`` to be a member with the originator role (a token's check, which
        needs the originator's key first)."""
        recipients = list(recipients)
        if not recipients:
            raise Refused(Reason.WRONG_RECIPIENT, "no recipient")
        for recipient in recipients:
            self.require_role(recipient, Role.RECIPIENT)
            if recipient == originator:
                raise Refused(Reason.WRONG_RECIPIENT, "an originator does not send to itself")
        self.check_scope_level(scope, level)

    # --- signing and amending --------------------------------------------------------

    def sign(self, secret: MemberSecret, name: str) -> bytes:
        """Sign this version as member ``name``; the key must be that member's."""
        member = self.member(name)
        if secret.public != member.identity:
            raise UsageError(f"this key is not {name!r}'s key in the arrangement")
        return secret.sign(Context.ARRANGEMENT, self.id)

    def amend(self, **changes: Any) -> Arrangement:
        """A new version with ``changes`` applied, ``previous`` set to this id."""
        if "version" in changes or "previous" in changes:
            raise UsageError("amend sets version and previous itself")
        fields: dict[str, Any] = {
            "name": self.name,
            "members": self.members,
            "relay": self.relay,
            "scopes": self.scopes,
            "levels": self.levels,
            "created": self.created,
            "identity_fallback": self.identity_fallback,
        }
        if unknown := changes.keys() - fields.keys():
            raise UsageError(f"amend cannot change {sorted(unknown)}")
        fields.update(changes)
        return Arrangement(version=self.version + 1, previous=self.id, **fields)


@dataclasses.dataclass(frozen=True, slots=True)
class SignedArrangement:
    """An arrangement with the signatures gathered so far (each one checked)."""

    arrangement: Arrangement
    signatures: Mapping[str, bytes] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.arrangement, Arrangement):
            raise UsageError("arrangement must be an Arrangement")
        # Checked in a fixed order (docs/protocol.md section 8.2), so that the verdict on
        # a set of signatures does not depend on how their names sort: every name must be
        # a member before any signature is verified, and effectiveness comes last.
        signatures = sorted(self.signatures.items(), key=lambda item: item[0].encode("utf-8"))
        members = [(self.arrangement.member(name), signature) for name, signature in signatures]
        for member, signature in members:
            verify(member.identity.signing, Context.ARRANGEMENT, self.arrangement.id, signature)
        object.__setattr__(self, "signatures", dict(signatures))

    def with_signature(self, name: str, signature: bytes) -> SignedArrangement:
        """A copy with ``name``'s signature added (checked). Any order works."""
        return SignedArrangement(self.arrangement, {**self.signatures, name: signature})

    def signed_by(self, secret: MemberSecret, name: str) -> SignedArrangement:
        """A copy with ``name``'s signature, made with ``secret``, added.

        Raises:
            Refused: NOT_A_MEMBER, ``name`` is not a member.
            UsageError: ``secret`` is not ``name``'s key in the arrangement.
        """
        return self.with_signature(name, self.arrangement.sign(secret, name))

    @property
    def missing(self) -> list[str]:
        """Members who have not signed yet, by name."""
        return [m.name for m in self.arrangement.members if m.name not in self.signatures]

    @property
    def is_effective(self) -> bool:
        """True when every member has signed."""
        return not self.missing

    def require_effective(self) -> Arrangement:
        """The arrangement, if every member signed. Raises ArrangementNotEffective."""
        missing = self.missing
        if missing:
            raise ArrangementNotEffective(missing)
        return self.arrangement

    def encode(self) -> bytes:
        """The arrangement's encoding with the signatures so far: what :meth:`decode` reads."""
        return enc.pack(
            {"arrangement": self.arrangement.encoded, "signatures": dict(self.signatures)}
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedArrangement:
        """Decode and check every signature present (not that all are present).

        The checks run in this order, and the first failure is raised (docs/protocol.md
        section 8.2): the outer map and the arrangement decode and the arrangement is
        valid (anything else is malformed, whatever the signatures); every signature's
        name is a member; every signature verifies.

        Raises:
            ProtocolError: malformed, or an arrangement that breaks a rule of section 8.1
                (an invalid arrangement is malformed input, never a refusal);
            Refused(NOT_A_MEMBER): a signature under a name that is not a member (even
                if another signature is also bad);
            VerificationError: a signature does not verify.
        """
        outer = enc.check_map(
            enc.unpack(data, max_size=MAX_ARRANGEMENT_SIZE),
            {"arrangement": enc.bin_max(MAX_ARRANGEMENT_SIZE), "signatures": _signature_map},
            "signed arrangement",
        )
        return cls(Arrangement.decode(outer["arrangement"]), outer["signatures"])

    @classmethod
    def load_effective(cls, data: bytes) -> Arrangement:
        """Decode, check, and require every signature. The usual way to load one.

        Raises:
            ProtocolError, Refused(NOT_A_MEMBER), VerificationError: as :meth:`decode`,
                which runs first.
            ArrangementNotEffective: every signature present is good, but a member has
                not signed (``missing`` names who, in member order).
        """
        return cls.decode(data).require_effective()


def _signature_map(value: Any, path: str) -> dict[str, bytes]:
    if not isinstance(value, dict) or len(value) > MAX_MEMBERS:
        raise ProtocolError(f"{path}: expected a map of signatures")
    sig = enc.bin_exact(SIGNATURE_SIZE)
    return {_name(k, path): sig(v, f"{path}.{k}") for k, v in value.items()}
