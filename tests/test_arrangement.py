"""The arrangement: validation, policy checks, separate signatures, amendment, encoding.

The members are the story's: Seoul and Tokyo originate and receive, Washington relays,
and Washington reads reports only through a separate recipient identity (its "desk").
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.arrangement import (
    MAX_ARRANGEMENT_SIZE,
    MAX_LEVELS,
    MAX_MEMBERS,
    MAX_SCOPES,
    Arrangement,
    Member,
    Role,
    SignedArrangement,
)
from tisa.errors import (
    ArrangementNotEffective,
    ProtocolError,
    Reason,
    Refused,
    UsageError,
    VerificationError,
)
from tisa.keys import Context, MemberSecret, PublicIdentity
from tisa.limits import MAX_NAME

ORIG, RECV, RELAY = Role.ORIGINATOR, Role.RECIPIENT, Role.RELAY
ROLES = {
    "seoul": {ORIG, RECV},
    "tokyo": {ORIG, RECV},
    "washington": {RELAY},
    "washington-desk": {RECV},
}
NAMES = sorted(ROLES, key=str.encode)
CREATED = 1419811200  # 2014-12-29, the day the arrangement was signed


# Fixed keys per name, so ids and signatures are the same on every run; "moscow" and "x"
# are outsiders with keys of their own.
SEEDS = {name: i for i, name in enumerate([*NAMES, "moscow", "x"], start=1)}


@functools.cache
def secret(name: str) -> MemberSecret:
    seed = SEEDS[name]
    return MemberSecret(sign_seed=bytes([seed]) * 32, box_secret=bytes([0x80 + seed]) * 32)


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


def member(name: str, roles: Any = None, identity: PublicIdentity | None = None) -> Member:
    return Member(
        name=name,
        identity=identity or secret(name).public,
        roles=frozenset(ROLES[name] if roles is None else roles),
    )


def make(**changes: Any) -> Arrangement:
    fields: dict[str, Any] = {
        "name": "trilateral-2014",
        "version": 1,
        "members": tuple(member(n) for n in NAMES),
        "relay": "washington",
        "scopes": ("nuclear", "missile"),
        "levels": ("routine", "sensitive"),
        "created": CREATED,
    }
    fields.update(changes)
    return Arrangement(**fields)


ARRANGEMENT = make()


@functools.cache
def signatures(arrangement: Arrangement = ARRANGEMENT) -> dict[str, bytes]:
    return {name: arrangement.sign(secret(name), name) for name in NAMES}


def fully_signed(arrangement: Arrangement = ARRANGEMENT) -> SignedArrangement:
    return SignedArrangement(arrangement, signatures(arrangement))


def outer(arrangement_bytes: bytes, sigs: dict[str, Any]) -> bytes:
    """A signed-arrangement encoding put together by hand."""
    return enc.pack({"arrangement": arrangement_bytes, "signatures": sigs})


# --- construction and validation --------------------------------------------------------


def test_construction_normalises_order() -> None:
    assert [m.name for m in ARRANGEMENT.members] == NAMES
    assert ARRANGEMENT.scopes == ("missile", "nuclear")  # sorted, as on the wire
    assert ARRANGEMENT.levels == ("routine", "sensitive")  # kept: lowest first
    shuffled = make(
        members=tuple(member(n) for n in reversed(NAMES)), scopes=("nuclear", "missile")
    )
    assert shuffled == ARRANGEMENT
    assert shuffled.id == ARRANGEMENT.id
    assert make(levels=("sensitive", "routine")).id != ARRANGEMENT.id


def test_id_is_stable() -> None:
    # Pinned: the id is what every member signs; a change here is a protocol change.
    assert ARRANGEMENT.id.hex() == PINNED_ID
    assert make().id == ARRANGEMENT.id
    assert len(ARRANGEMENT.id) == 32


PINNED_ID = "a9c5d66f64ef81f57c062fbdf1ac73dc2c7565bbce0e8518d04e25bf73882b38"


@pytest.mark.parametrize(
    "change",
    [
        {"name": "other"},
        {"created": CREATED + 1},
        {"scopes": ("nuclear",)},
        {"levels": ("routine",)},
        {"members": tuple(member(n) for n in NAMES if n != "washington-desk")},
        {
            "members": tuple(
                member(n, {ORIG, RECV} if n == "washington-desk" else None) for n in NAMES
            )
        },
    ],
    ids=["name", "created", "scopes", "levels", "members", "roles"],
)
def test_id_covers_every_field(change: dict[str, Any]) -> None:
    assert make(**change).id != ARRANGEMENT.id


def test_arrangement_is_frozen() -> None:
    with pytest.raises(AttributeError):
        ARRANGEMENT.version = 2  # type: ignore[misc]


def shared_key_members(which: str) -> tuple[Member, ...]:
    seoul, tokyo = secret("seoul").public, secret("tokyo").public
    identity = (
        PublicIdentity(seoul.signing, tokyo.encryption)
        if which == "signing"
        else PublicIdentity(tokyo.signing, seoul.encryption)
    )
    return tuple(member(n, identity=identity if n == "tokyo" else None) for n in NAMES)


INVALID = {
    "duplicate names": {
        "members": (*(member(n) for n in NAMES), member("seoul", identity=secret("x").public))
    },
    "same member twice": {"members": (*(member(n) for n in NAMES), member("seoul"))},
    "shared signing key": {"members": shared_key_members("signing")},
    "shared encryption key": {"members": shared_key_members("encryption")},
    "no originator": {
        "members": tuple(member(n, {RECV} if n != "washington" else None) for n in NAMES)
    },
    "no recipient": {
        "members": tuple(member(n, {ORIG} if n != "washington" else None) for n in NAMES)
    },
    "unknown relay": {"relay": "moscow"},
    "relay without the relay role": {"relay": "seoul"},
    "two relays": {
        "members": tuple(member(n, {RELAY} if n == "washington-desk" else None) for n in NAMES)
    },
    "no relay member": {"members": tuple(member(n) for n in NAMES if n != "washington")},
    "one member": {"members": (member("washington"),), "relay": "washington"},
    "no members": {"members": ()},
    "members not Member": {"members": (*(member(n) for n in NAMES), "moscow")},
    "version 0": {"version": 0},
    "version bool": {"version": True},
    "version text": {"version": "1"},
    "version above the wire limit": {"version": 2**32 + 1, "previous": bytes(32)},
    "version 2 without previous": {"version": 2},
    "version 1 with previous": {"previous": bytes(32)},
    "previous too short": {"version": 2, "previous": bytes(31)},
    "previous as bytearray": {"version": 2, "previous": bytearray(32)},
    "created negative": {"created": -1},
    "created bool": {"created": False},
    "created float": {"created": 1.5},
    "created beyond uint64": {"created": 2**64},
    "no scopes": {"scopes": ()},
    "duplicate scopes": {"scopes": ("nuclear", "nuclear")},
    "scopes as one string": {"scopes": "nuclear"},
    "levels as one string": {"levels": "routine"},
    "empty scope": {"scopes": ("",)},
    "scope not text": {"scopes": (b"nuclear",)},
    "scope with newline": {"scopes": ("nuclear\n",)},
    "no levels": {"levels": ()},
    "duplicate levels": {"levels": ("routine", "routine")},
    "level too long": {"levels": ("x" * (MAX_NAME + 1),)},
    "empty name": {"name": ""},
    "name with control character": {"name": "tri\x00lateral"},
    "name with lone surrogate": {"name": "tri\ud800"},
    "name too long": {"name": "é" * (MAX_NAME // 2) + "x"},
    "too many scopes": {"scopes": tuple(f"s{i}" for i in range(MAX_SCOPES + 1))},
    "too many levels": {"levels": tuple(f"l{i}" for i in range(MAX_LEVELS + 1))},
}


@pytest.mark.parametrize("change", list(INVALID.values()), ids=list(INVALID))
def test_invalid_arrangements_raise_usage_error(change: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        make(**change)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"roles": {RELAY, RECV}},
        {"roles": {RELAY, ORIG}},
        {"roles": {RELAY, ORIG, RECV}},
        {"roles": set()},
        {"roles": {"admin"}},
        {"roles": "relay"},
        {"roles": None},
        {"name": ""},
        {"name": "x" * (MAX_NAME + 1)},
        {"name": "a\tb"},
        {"name": 7},
        {"identity": secret("seoul").public.signing},
        {"identity": None},
    ],
    ids=repr,
)
def test_invalid_members_raise_usage_error(kwargs: dict[str, Any]) -> None:
    fields = {"name": "seoul", "identity": secret("seoul").public, "roles": {ORIG}, **kwargs}
    with pytest.raises(UsageError):
        Member(**fields)


def test_member_accepts_role_strings_and_longest_name() -> None:
    m = Member(name="x" * MAX_NAME, identity=secret("seoul").public, roles={"originator"})  # type: ignore[arg-type]
    assert m.roles == frozenset({ORIG})


def test_member_limit() -> None:
    def members(count: int) -> tuple[Member, ...]:
        relay = member("washington")
        others = tuple(
            member(
                f"m{i}",
                {ORIG, RECV},
                # hashed, since X25519 clamping would map some small secrets to one key
                MemberSecret(
                    sign_seed=hashlib.sha256(b"sign%d" % i).digest(),
                    box_secret=hashlib.sha256(b"box%d" % i).digest(),
                ).public,
            )
            for i in range(1, count)
        )
        return (relay, *others)

    largest = make(members=members(MAX_MEMBERS))
    assert len(largest.members) == MAX_MEMBERS
    assert len(largest.encoded) < MAX_ARRANGEMENT_SIZE // 2
    assert Arrangement.decode(largest.encoded) == largest
    with pytest.raises(UsageError):
        make(members=members(MAX_MEMBERS + 1))


def test_scope_and_level_limits_reached_exactly() -> None:
    scopes = tuple(f"s{i:03}" + "x" * (MAX_NAME - 4) for i in range(MAX_SCOPES))
    levels = tuple(f"l{i:03}" for i in range(MAX_LEVELS))
    largest = make(scopes=scopes, levels=levels)
    assert Arrangement.decode(largest.encoded) == largest


# --- policy -----------------------------------------------------------------------------


def refusal(call: Any, *args: Any) -> Reason:
    with pytest.raises(Refused) as info:
        call(*args)
    return info.value.reason


@pytest.mark.parametrize(
    ("originator", "recipients", "scope", "level", "reason"),
    [
        ("seoul", ["tokyo"], "economy", "routine", Reason.OUT_OF_SCOPE),
        ("seoul", ["tokyo"], "Nuclear", "routine", Reason.OUT_OF_SCOPE),
        ("seoul", ["tokyo"], "nuclear", "secret", Reason.LEVEL_NOT_ALLOWED),
        ("moscow", ["tokyo"], "nuclear", "routine", Reason.NOT_A_MEMBER),
        ("seoul", ["moscow"], "nuclear", "routine", Reason.NOT_A_MEMBER),
        ("seoul", ["tokyo", "moscow"], "nuclear", "routine", Reason.NOT_A_MEMBER),
        ("washington", ["tokyo"], "nuclear", "routine", Reason.WRONG_ROLE),
        ("washington-desk", ["tokyo"], "nuclear", "routine", Reason.WRONG_ROLE),
        ("seoul", ["washington"], "nuclear", "routine", Reason.WRONG_ROLE),
        ("seoul", [], "nuclear", "routine", Reason.WRONG_RECIPIENT),
        ("seoul", ["seoul"], "nuclear", "routine", Reason.WRONG_RECIPIENT),
        ("seoul", ["tokyo", "seoul"], "nuclear", "routine", Reason.WRONG_RECIPIENT),
        # the first reason found wins: parties before scope and level
        ("moscow", ["tokyo"], "economy", "secret", Reason.NOT_A_MEMBER),
        ("seoul", ["washington"], "economy", "secret", Reason.WRONG_ROLE),
        ("seoul", ["tokyo"], "economy", "secret", Reason.OUT_OF_SCOPE),
    ],
)
def test_check_share_reasons(
    originator: str, recipients: list[str], scope: str, level: str, reason: Reason
) -> None:
    assert refusal(ARRANGEMENT.check_share, originator, recipients, scope, level) is reason


def test_check_share_allows_the_arrangement() -> None:
    ARRANGEMENT.check_share("seoul", ["tokyo", "washington-desk"], "nuclear", "sensitive")
    ARRANGEMENT.check_share("tokyo", iter(["seoul"]), "missile", "routine")
    ARRANGEMENT.check_share("tokyo", ("washington-desk",), "missile", "routine")


def test_lookups() -> None:
    assert ARRANGEMENT.member("seoul").identity == secret("seoul").public
    assert refusal(ARRANGEMENT.member, "moscow") is Reason.NOT_A_MEMBER
    assert ARRANGEMENT.require_role("washington", RELAY).name == "washington"
    assert refusal(ARRANGEMENT.require_role, "washington", RECV) is Reason.WRONG_ROLE
    assert refusal(ARRANGEMENT.require_role, "moscow", RECV) is Reason.NOT_A_MEMBER
    # The refusal reads as English, whatever the role (seen by a user as one line).
    for role, text in ((ORIG, "an originator"), (RECV, "a recipient")):
        with pytest.raises(Refused, match=f"'washington' is not {text}$"):
            ARRANGEMENT.require_role("washington", role)
    raw = secret("tokyo").public.signing.raw
    assert ARRANGEMENT.member_by_signing_key(raw) == ARRANGEMENT.member("tokyo")
    assert ARRANGEMENT.member_by_signing_key(secret("x").public.signing.raw) is None
    ARRANGEMENT.check_scope_level("nuclear", "routine")
    assert refusal(ARRANGEMENT.check_scope_level, "x", "routine") is Reason.OUT_OF_SCOPE
    assert refusal(ARRANGEMENT.check_scope_level, "nuclear", "x") is Reason.LEVEL_NOT_ALLOWED


# --- signatures and effect --------------------------------------------------------------


@given(st.permutations(NAMES))
@settings(max_examples=30)
def test_effective_only_when_all_signed_in_any_order(order: list[str]) -> None:
    signed = SignedArrangement(ARRANGEMENT)
    for count, name in enumerate(order, start=1):
        assert not signed.is_effective
        signed = signed.with_signature(name, signatures()[name])
        assert signed.missing == [n for n in NAMES if n not in order[:count]]
    assert signed.is_effective
    assert signed.require_effective() is ARRANGEMENT
    assert signed == fully_signed()
    assert signed.encode() == fully_signed().encode()


@given(st.sets(st.sampled_from(NAMES)))
@settings(max_examples=30)
def test_not_effective_names_the_missing_members(present: set[str]) -> None:
    signed = SignedArrangement(ARRANGEMENT, {n: signatures()[n] for n in present})
    missing = [n for n in NAMES if n not in present]
    assert signed.missing == missing
    assert signed.is_effective is (not missing)
    if not missing:
        assert SignedArrangement.load_effective(signed.encode()) == ARRANGEMENT
        return
    for call in (
        signed.require_effective,
        lambda: SignedArrangement.load_effective(signed.encode()),
    ):
        with pytest.raises(ArrangementNotEffective) as info:
            call()
        assert info.value.missing == missing
        assert info.value.reason is Reason.ARRANGEMENT_NOT_EFFECTIVE
        assert all(name in str(info.value) for name in missing)


def test_signed_by_and_resigning() -> None:
    signed = SignedArrangement(ARRANGEMENT)
    for name in reversed(NAMES):
        signed = signed.signed_by(secret(name), name)
    assert signed.is_effective
    # Signing again as the same member changes nothing: Ed25519 is deterministic.
    assert signed.signed_by(secret("seoul"), "seoul") == signed


def test_sign_needs_the_members_own_key() -> None:
    with pytest.raises(UsageError):
        ARRANGEMENT.sign(secret("tokyo"), "seoul")
    with pytest.raises(Refused) as info:
        ARRANGEMENT.sign(secret("x"), "moscow")
    assert info.value.reason is Reason.NOT_A_MEMBER


def test_with_signature_checks_each_signature() -> None:
    signed = SignedArrangement(ARRANGEMENT)
    bad = {
        "another member's signature": signatures()["tokyo"],
        "flipped": flip(signatures()["seoul"], 0),
        "other context": secret("seoul").sign(Context.REPORT, ARRANGEMENT.id),
        "over the encoding, not the id": secret("seoul").sign(
            Context.ARRANGEMENT, ARRANGEMENT.encoded
        ),
        "short": signatures()["seoul"][:63],
        "zeros": bytes(64),
    }
    for signature in bad.values():
        with pytest.raises(VerificationError):
            signed.with_signature("seoul", signature)
    with pytest.raises(Refused) as info:
        signed.with_signature("moscow", signatures()["seoul"])
    assert info.value.reason is Reason.NOT_A_MEMBER


def test_signed_arrangement_needs_an_arrangement() -> None:
    with pytest.raises(UsageError):
        SignedArrangement(ARRANGEMENT.encoded)  # type: ignore[arg-type]


# --- amendment --------------------------------------------------------------------------


def test_amend_is_a_new_version_signed_anew() -> None:
    amended = ARRANGEMENT.amend(scopes=("nuclear", "missile", "cyber"))
    assert (amended.version, amended.previous) == (2, ARRANGEMENT.id)
    assert amended.scopes == ("cyber", "missile", "nuclear")
    assert amended.id != ARRANGEMENT.id
    # Old signatures do not carry over, whatever changed.
    for new in (amended, ARRANGEMENT.amend()):
        assert SignedArrangement(new).missing == NAMES
        for name, signature in signatures().items():
            with pytest.raises(VerificationError):
                SignedArrangement(new, {name: signature})
        with pytest.raises(VerificationError):
            SignedArrangement.decode(outer(new.encoded, dict(signatures())))
    assert fully_signed(amended).require_effective() is amended
    third = amended.amend(levels=("routine",))
    assert (third.version, third.previous) == (3, amended.id)


def test_amend_refuses_version_previous_and_unknown_fields() -> None:
    for change in ({"version": 5}, {"previous": bytes(32)}, {"colour": "blue"}, {"id": b""}):
        with pytest.raises(UsageError):
            ARRANGEMENT.amend(**change)


def test_amend_validates_like_construction() -> None:
    with pytest.raises(UsageError):
        ARRANGEMENT.amend(relay="seoul")


# --- encoding ---------------------------------------------------------------------------


def test_arrangement_decode_round_trip() -> None:
    decoded = Arrangement.decode(ARRANGEMENT.encoded)
    assert decoded == ARRANGEMENT
    assert decoded.id == ARRANGEMENT.id
    assert decoded.encoded == ARRANGEMENT.encoded
    amended = ARRANGEMENT.amend()
    assert Arrangement.decode(amended.encoded).previous == ARRANGEMENT.id


@given(st.sets(st.sampled_from(NAMES)))
@settings(max_examples=20)
def test_signed_arrangement_round_trip(present: set[str]) -> None:
    signed = SignedArrangement(ARRANGEMENT, {n: signatures()[n] for n in present})
    data = signed.encode()
    decoded = SignedArrangement.decode(data)
    assert decoded == signed
    assert decoded.arrangement.id == ARRANGEMENT.id
    assert decoded.encode() == data


def wire(**changes: Any) -> bytes:
    """ARRANGEMENT's wire form with fields replaced, packed canonically as msgpack."""
    return enc.pack({**ARRANGEMENT.to_dict(), **changes})


def member_dicts(**changes: Any) -> list[dict[str, Any]]:
    return [{**m.to_dict(), **changes.get(m.name, {})} for m in ARRANGEMENT.members]


def non_minimal_created() -> bytes:
    encoded = ARRANGEMENT.encoded
    short = b"\xce" + CREATED.to_bytes(4, "big")
    assert encoded.count(short) == 1
    return encoded.replace(short, b"\xcf" + CREATED.to_bytes(8, "big"))


BAD_ARRANGEMENTS = {
    "members out of order": wire(members=member_dicts()[::-1]),
    "scopes out of order": wire(scopes=["nuclear", "missile"]),
    "roles out of order": wire(members=member_dicts(seoul={"roles": ["recipient", "originator"]})),
    "non-minimal integer": non_minimal_created(),
    "trailing byte": ARRANGEMENT.encoded + b"\x00",
    "unknown format": wire(v=2),
    "extra field": wire(colour="blue"),
    "version 0": wire(version=0),
    "version 2 without previous": wire(version=2),
    "relay with other roles": wire(
        members=member_dicts(washington={"roles": ["recipient", "relay"]})
    ),
    "unknown role": wire(members=member_dicts(seoul={"roles": ["admin"]})),
    "duplicate role": wire(members=member_dicts(seoul={"roles": ["originator", "originator"]})),
    "low-order box key": wire(
        members=member_dicts(
            seoul={"identity": {"sign": secret("seoul").public.signing.raw, "box": bytes(32)}}
        )
    ),
    "unknown relay": wire(relay="moscow"),
    "duplicate members": wire(members=[*member_dicts(), member_dicts()[-1]]),
    "duplicate scopes": wire(scopes=["missile", "missile"]),
    "one member": wire(members=member_dicts()[:1]),
    "name as bin": wire(name=b"trilateral-2014"),
    "created as text": wire(created=str(CREATED)),
    "not a map": msgpack.packb([1, 2]),
    "too large": b"\x00" * (MAX_ARRANGEMENT_SIZE + 1),
}


@pytest.mark.parametrize("data", list(BAD_ARRANGEMENTS.values()), ids=list(BAD_ARRANGEMENTS))
def test_arrangement_decode_refuses(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Arrangement.decode(data)
    # The same arrangement inside a signed one: refused before any signature is checked.
    with pytest.raises(ProtocolError):
        SignedArrangement.decode(outer(data, dict(signatures())))


def test_non_minimal_created_decodes_with_plain_msgpack() -> None:
    # Guards the table: the bytes differ in form only.
    assert msgpack.unpackb(non_minimal_created()) == msgpack.unpackb(ARRANGEMENT.encoded)


def test_signed_decode_refuses_bad_signature() -> None:
    for name in NAMES:
        sigs = dict(signatures())
        sigs[name] = flip(sigs[name], 10, 0x40)
        with pytest.raises(VerificationError):
            SignedArrangement.decode(outer(ARRANGEMENT.encoded, sigs))
    swapped = {**signatures(), "seoul": signatures()["tokyo"], "tokyo": signatures()["seoul"]}
    with pytest.raises(VerificationError):
        SignedArrangement.decode(outer(ARRANGEMENT.encoded, swapped))


def test_signed_decode_refuses_non_member_signature() -> None:
    moscow = secret("moscow").sign(Context.ARRANGEMENT, ARRANGEMENT.id)
    for sigs in ({"moscow": moscow}, {**signatures(), "moscow": moscow}):
        with pytest.raises(Refused) as info:
            SignedArrangement.decode(outer(ARRANGEMENT.encoded, sigs))
        assert info.value.reason is Reason.NOT_A_MEMBER


def test_signed_decode_refuses_a_signature_for_another_version() -> None:
    amended = ARRANGEMENT.amend()
    with pytest.raises(VerificationError):
        SignedArrangement.decode(outer(amended.encoded, {"seoul": signatures()["seoul"]}))
    # and back: a signature on version 2 is no signature on version 1
    with pytest.raises(VerificationError):
        SignedArrangement.decode(
            outer(ARRANGEMENT.encoded, {"seoul": signatures(amended)["seoul"]})
        )


def outer_by_hand(*items: tuple[str, Any]) -> bytes:
    """A map with items in the given order (pack would sort them)."""
    body = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in items)
    return bytes([0x80 | len(items)]) + body


BAD_OUTER = {
    "keys out of order": outer_by_hand(
        ("signatures", dict(sorted(signatures().items()))), ("arrangement", ARRANGEMENT.encoded)
    ),
    "signatures out of order": outer_by_hand(
        ("arrangement", ARRANGEMENT.encoded),
        ("signatures", dict(sorted(signatures().items(), reverse=True))),
    ),
    "trailing byte": fully_signed().encode() + b"\x00",
    "missing signatures": enc.pack({"arrangement": ARRANGEMENT.encoded}),
    "extra field": enc.pack({"arrangement": ARRANGEMENT.encoded, "signatures": {}, "x": 1}),
    "arrangement as a map": enc.pack({"arrangement": ARRANGEMENT.to_dict(), "signatures": {}}),
    "signature too short": outer(ARRANGEMENT.encoded, {"seoul": signatures()["seoul"][:-1]}),
    "signature as text": outer(ARRANGEMENT.encoded, {"seoul": "x" * 64}),
    "signatures as a list": outer(ARRANGEMENT.encoded, list(signatures().values())),  # type: ignore[arg-type]
    "signer name empty": outer(ARRANGEMENT.encoded, {"": bytes(64)}),
    "too many signatures": outer(
        ARRANGEMENT.encoded, {f"m{i}": bytes(64) for i in range(MAX_MEMBERS + 1)}
    ),
    "too large": outer(b"\x00" * MAX_ARRANGEMENT_SIZE, {}),
}


@pytest.mark.parametrize("data", list(BAD_OUTER.values()), ids=list(BAD_OUTER))
def test_signed_decode_refuses_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        SignedArrangement.decode(data)


def test_every_flipped_byte_of_a_signed_arrangement_is_refused() -> None:
    data = fully_signed().encode()
    for position in range(len(data)):
        with pytest.raises((ProtocolError, VerificationError, Refused)):
            SignedArrangement.load_effective(flip(data, position))


@given(st.binary(max_size=200))
def test_random_bytes_are_refused_with_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        SignedArrangement.decode(data)
    with pytest.raises(ProtocolError):
        Arrangement.decode(data)
