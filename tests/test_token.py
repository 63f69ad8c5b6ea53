"""Release tokens: issue and check, every refusal, tampering, malleability, canonicity."""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import pytest
from conftest import make_trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, Role
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import Context, MemberSecret, random_id, verify
from tisa.limits import CLOCK_SKEW
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.report import key_commitment
from tisa.token import (
    MAX_TOKEN_SIZE,
    MAX_VALIDITY,
    Release,
    ReleaseToken,
    check_for_recipient,
    check_for_relay,
    issue_token,
)

F = TypeVar("F", bound=Callable[..., Any])


def slow(test: F) -> F:
    """Long runs: marked ``slow`` and skipped unless TISA_SLOW=1."""
    skip = pytest.mark.skipif(os.environ.get("TISA_SLOW") != "1", reason="set TISA_SLOW=1")
    marked: F = pytest.mark.slow(skip(test))
    return marked


ARRANGEMENT, SECRETS = make_trio()
NOW = 1_420_000_000
NOT_BEFORE, NOT_AFTER = NOW, NOW + 3600
REPORT_ID = bytes(range(16))
DIGEST = bytes(range(100, 132))
SIZE = 1089
CONTENT_KEY = bytes(range(200, 232))
# Ed25519 group order.
L = 2**252 + 27742317777372353535851937790883648493


def make_quad() -> tuple[Arrangement, dict[str, MemberSecret]]:
    """The trio plus Canberra, a recipient only."""
    arrangement, secrets = make_trio()
    canberra = MemberSecret(sign_seed=b"\x0c" * 32, box_secret=b"\x8c" * 32)
    quad = Arrangement(
        name=arrangement.name,
        version=1,
        members=(
            *arrangement.members,
            Member(name="canberra", identity=canberra.public, roles=frozenset({Role.RECIPIENT})),
        ),
        relay=arrangement.relay,
        scopes=arrangement.scopes,
        levels=arrangement.levels,
        created=arrangement.created,
    )
    return quad, {**secrets, "canberra": canberra}


# Every prekey secret made here, by owner and public key (owners are unique across the
# arrangements of this module: Canberra is only in the quad).
PREKEY_SECRETS: dict[str, dict[bytes, PrekeySecret]] = {}


def make_prekey(
    arrangement: Arrangement,
    secrets: dict[str, MemberSecret],
    owner: str,
    kind: PrekeyKind = PrekeyKind.ONE_TIME,
    *,
    not_after: int = NOW + 86400,
) -> bytes:
    secret = PrekeySecret.generate(kind, created=NOW - 60, not_after=not_after)
    PREKEY_SECRETS.setdefault(owner, {})[secret.public] = secret
    return secret.publish(secrets[owner], owner, arrangement)


def lookup(owner: str) -> Callable[[PrekeyKind, bytes], bytes]:
    def find(kind: PrekeyKind, public: bytes) -> bytes:
        secret = PREKEY_SECRETS.get(owner, {}).get(public)
        if secret is None or secret.kind is not kind:
            raise Refused(Reason.UNKNOWN_PREKEY, "not held")
        return secret.secret

    return find


def issue(
    arrangement: Arrangement = ARRANGEMENT,
    secrets: dict[str, MemberSecret] = SECRETS,
    *,
    originator: str = "seoul",
    **changes: Any,
) -> bytes:
    kwargs: dict[str, Any] = {
        "recipient": "tokyo",
        "report_id": REPORT_ID,
        "digest": DIGEST,
        "size": SIZE,
        "content_key": CONTENT_KEY,
        "scope": "missile",
        "level": "secret",
        "not_before": NOT_BEFORE,
        "not_after": NOT_AFTER,
        "counter": 1,
    }
    kwargs.update(changes)
    recipient = kwargs["recipient"]
    if "signed_prekey" not in kwargs and recipient in secrets:
        kwargs["signed_prekey"] = make_prekey(arrangement, secrets, recipient, PrekeyKind.SIGNED)
        kwargs.setdefault("one_time_prekey", make_prekey(arrangement, secrets, recipient))
    kwargs.setdefault("signed_prekey", None)
    return issue_token(secrets[originator], originator, arrangement, **kwargs)


TOKEN = issue()


def body_of(token: bytes) -> dict[str, Any]:
    return enc.unpack(enc.unpack(token)["body"])


def sign_body(
    body_bytes: bytes, signer: MemberSecret = SECRETS["seoul"], context: Context = Context.TOKEN
) -> bytes:
    return enc.pack({"body": body_bytes, "sig": signer.sign(context, body_bytes)})


def resign(
    token: bytes = TOKEN,
    signer: MemberSecret = SECRETS["seoul"],
    context: Context = Context.TOKEN,
    **changes: Any,
) -> bytes:
    """``token`` with fields changed and signed again: authentic, but saying something else."""
    body = body_of(token)
    body.update(changes)
    return sign_body(enc.pack(body), signer, context)


def relay_check(token: bytes | ReleaseToken, **changes: Any) -> ReleaseToken:
    kwargs: dict[str, Any] = {
        "arrangement": ARRANGEMENT,
        "report_id": REPORT_ID,
        "digest": DIGEST,
        "size": SIZE,
        "originator": "seoul",
        "now": NOW,
    }
    kwargs.update(changes)
    arrangement = kwargs.pop("arrangement")
    return check_for_relay(token, arrangement, **kwargs)


def recipient_check(token: bytes | ReleaseToken, name: str = "tokyo", **changes: Any) -> Release:
    kwargs: dict[str, Any] = {
        "arrangement": ARRANGEMENT,
        "secret": SECRETS[name],
        "now": NOW,
        "prekey_secret": lookup(name),
    }
    kwargs.update(changes)
    return check_for_recipient(
        token, kwargs.pop("arrangement"), kwargs.pop("secret"), name, **kwargs
    )


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


# --- round trips -------------------------------------------------------------------------


def test_relay_check_round_trip() -> None:
    token = relay_check(TOKEN)
    assert token.arrangement == ARRANGEMENT.id
    assert token.version == ARRANGEMENT.version
    assert (token.originator, token.relay, token.recipient) == ("seoul", "washington", "tokyo")
    assert (token.report, token.digest, token.size) == (REPORT_ID, DIGEST, SIZE)
    assert (token.scope, token.level) == ("missile", "secret")
    assert (token.not_before, token.not_after, token.counter) == (NOT_BEFORE, NOT_AFTER, 1)
    assert token.key_commit == key_commitment(CONTENT_KEY, REPORT_ID)
    assert len(token.id) == 16
    assert token.encoded == TOKEN
    # The relay sees the key only wrapped to the recipient's prekeys.
    assert CONTENT_KEY not in TOKEN
    assert token.wrap.mode == "one_time"


def test_recipient_check_round_trip() -> None:
    release = recipient_check(TOKEN)
    assert release.content_key == CONTENT_KEY
    assert release.token == relay_check(TOKEN)
    assert repr(CONTENT_KEY) not in repr(release)


def test_checks_accept_a_decoded_token() -> None:
    decoded = ReleaseToken.decode(TOKEN)
    assert relay_check(decoded) == decoded
    assert recipient_check(decoded).content_key == CONTENT_KEY


def test_tokyo_can_originate_too() -> None:
    token = issue(originator="tokyo", recipient="seoul", counter=7)
    assert recipient_check(token, "seoul").token.counter == 7
    assert relay_check(token, originator="tokyo").originator == "tokyo"


def test_every_token_has_its_own_id_and_ephemeral_key() -> None:
    tokens = [ReleaseToken.decode(issue()) for _ in range(100)]
    assert len({t.id for t in tokens}) == 100
    assert len({t.wrap.eph for t in tokens}) == 100
    assert len({t.wrap.sealed for t in tokens}) == 100


def test_a_token_id_chosen_by_the_caller_is_the_tokens_id() -> None:
    # The node picks the id and passes it in, so it need not decode the token it got.
    for _ in range(3):
        chosen = random_id()
        assert ReleaseToken.decode(issue(token_id=chosen)).id == chosen


@pytest.mark.parametrize("bad", [b"", b"\x07" * 15, b"\x07" * 17, bytearray(16), "x" * 16])
def test_a_token_id_of_the_wrong_size_or_type_is_refused(bad: Any) -> None:
    with pytest.raises(UsageError, match="a token id is 16 bytes"):
        issue(token_id=bad)


def test_only_the_recipients_keys_unwrap_the_key() -> None:
    # Another member's long-term key in place of Tokyo's opens nothing, even holding
    # Tokyo's prekey secrets; Tokyo's long-term key without them opens nothing either.
    for name in ("washington", "seoul"):
        with pytest.raises((VerificationError, UsageError)):
            check_for_recipient(
                TOKEN, ARRANGEMENT, SECRETS[name], "tokyo", now=NOW, prekey_secret=lookup("tokyo")
            )
    with pytest.raises(Refused) as info:
        check_for_recipient(TOKEN, ARRANGEMENT, SECRETS["tokyo"], "tokyo", now=NOW)
    assert info.value.reason is Reason.UNKNOWN_PREKEY
    assert recipient_check(TOKEN).content_key == CONTENT_KEY


# --- issuing refuses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"scope": "chemical"}, Reason.OUT_OF_SCOPE),
        ({"level": "cosmic"}, Reason.LEVEL_NOT_ALLOWED),
        ({"recipient": "beijing"}, Reason.NOT_A_MEMBER),
        ({"recipient": "washington"}, Reason.WRONG_ROLE),
        ({"recipient": "seoul"}, Reason.WRONG_RECIPIENT),
    ],
)
def test_issue_refuses_what_the_arrangement_forbids(
    changes: dict[str, Any], reason: Reason
) -> None:
    with pytest.raises(Refused) as info:
        issue(**changes)
    assert info.value.reason is reason


@pytest.mark.parametrize(
    "changes",
    [
        {"not_after": NOT_BEFORE},
        {"not_after": NOT_BEFORE - 1},
        {"not_after": NOT_BEFORE + MAX_VALIDITY + 1},
        {"not_before": -1},
        {"counter": 0},
        {"content_key": b"short"},
        {"report_id": b"short"},
        {"digest": b"short"},
        {"size": 0},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))!r}",
)
def test_issue_refuses_bad_arguments(changes: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        issue(**changes)


def test_issue_needs_the_originators_key() -> None:
    with pytest.raises(UsageError):
        issue_token(
            SECRETS["tokyo"],
            "seoul",
            ARRANGEMENT,
            recipient="tokyo",
            report_id=REPORT_ID,
            digest=DIGEST,
            size=SIZE,
            content_key=CONTENT_KEY,
            scope="missile",
            level="secret",
            not_before=NOT_BEFORE,
            not_after=NOT_AFTER,
            counter=1,
            signed_prekey=make_prekey(ARRANGEMENT, SECRETS, "tokyo", PrekeyKind.SIGNED),
        )


def test_longest_window_is_allowed() -> None:
    relay_check(issue(not_after=NOT_BEFORE + MAX_VALIDITY))


# --- validity window ---------------------------------------------------------------------


def reason_of(call: Callable[[], object]) -> Reason | None:
    try:
        call()
    except Refused as exc:
        return exc.reason
    return None


@pytest.mark.parametrize("skew", [CLOCK_SKEW, 0, 5])
def test_window_edges_with_clock_skew(skew: int) -> None:
    cases = {
        NOT_BEFORE - skew - 1: Reason.NOT_YET_VALID,
        NOT_BEFORE - skew: None,
        NOT_BEFORE: None,
        NOT_AFTER - 1: None,
        NOT_AFTER + skew - 1: None,
        NOT_AFTER + skew: Reason.EXPIRED,
        NOT_AFTER + 10 * skew + 100: Reason.EXPIRED,
    }
    for now, expected in cases.items():
        assert reason_of(lambda n=now: relay_check(TOKEN, now=n, clock_skew=skew)) is expected
        assert reason_of(lambda n=now: recipient_check(TOKEN, now=n, clock_skew=skew)) is expected


def test_default_skew_is_the_named_limit() -> None:
    assert reason_of(lambda: relay_check(TOKEN, now=NOT_AFTER + CLOCK_SKEW - 1)) is None
    assert reason_of(lambda: relay_check(TOKEN, now=NOT_AFTER + CLOCK_SKEW)) is Reason.EXPIRED
    assert reason_of(lambda: relay_check(TOKEN, now=NOT_BEFORE - CLOCK_SKEW)) is None
    late = NOT_BEFORE - CLOCK_SKEW - 1
    assert reason_of(lambda: relay_check(TOKEN, now=late)) is Reason.NOT_YET_VALID


def test_empty_window_does_not_decode() -> None:
    for not_after in (NOT_BEFORE, NOT_BEFORE - 1):
        with pytest.raises(ProtocolError):
            relay_check(resign(not_after=not_after))


# --- every policy refusal ----------------------------------------------------------------


AMENDED = ARRANGEMENT.amend(levels=(*ARRANGEMENT.levels, "top-secret"))

RELAY_REFUSALS: list[tuple[str, Callable[[], object], Reason]] = [
    ("expired", lambda: relay_check(TOKEN, now=NOT_AFTER + CLOCK_SKEW), Reason.EXPIRED),
    ("not-yet-valid", lambda: relay_check(TOKEN, now=0), Reason.NOT_YET_VALID),
    ("wrong-relay", lambda: relay_check(resign(relay="tokyo")), Reason.WRONG_RELAY),
    ("out-of-scope", lambda: relay_check(resign(scope="chemical")), Reason.OUT_OF_SCOPE),
    ("level", lambda: relay_check(resign(level="cosmic")), Reason.LEVEL_NOT_ALLOWED),
    ("recipient-not-member", lambda: relay_check(resign(recipient="beijing")), Reason.NOT_A_MEMBER),
    ("recipient-is-relay", lambda: relay_check(resign(recipient="washington")), Reason.WRONG_ROLE),
    ("recipient-is-self", lambda: relay_check(resign(recipient="seoul")), Reason.WRONG_RECIPIENT),
    ("other-version", lambda: relay_check(TOKEN, arrangement=AMENDED), Reason.WRONG_ARRANGEMENT),
    ("version-field", lambda: relay_check(resign(version=2)), Reason.WRONG_ARRANGEMENT),
    (
        "arrangement-field",
        lambda: relay_check(resign(arrangement=AMENDED.id)),
        Reason.WRONG_ARRANGEMENT,
    ),
    ("report-id", lambda: relay_check(TOKEN, report_id=bytes(16)), Reason.WRONG_REPORT),
    ("digest", lambda: relay_check(TOKEN, digest=bytes(32)), Reason.WRONG_REPORT),
    ("size", lambda: relay_check(TOKEN, size=SIZE + 1), Reason.WRONG_REPORT),
    ("originator", lambda: relay_check(TOKEN, originator="tokyo"), Reason.WRONG_ORIGINATOR),
]


@pytest.mark.parametrize(
    ("check", "reason"),
    [(c, r) for _, c, r in RELAY_REFUSALS],
    ids=[i for i, _, _ in RELAY_REFUSALS],
)
def test_relay_refusals(check: Callable[[], object], reason: Reason) -> None:
    with pytest.raises(Refused) as info:
        check()
    assert info.value.reason is reason
    assert str(reason) in str(info.value)


def test_recipient_refusals() -> None:
    recipient_refusals: list[tuple[Callable[[], object], Reason]] = [
        (lambda: recipient_check(TOKEN, now=NOT_AFTER + CLOCK_SKEW), Reason.EXPIRED),
        (lambda: recipient_check(TOKEN, now=0), Reason.NOT_YET_VALID),
        (lambda: recipient_check(resign(relay="tokyo")), Reason.WRONG_RELAY),
        (lambda: recipient_check(resign(scope="chemical")), Reason.OUT_OF_SCOPE),
        (lambda: recipient_check(resign(level="cosmic")), Reason.LEVEL_NOT_ALLOWED),
        (lambda: recipient_check(TOKEN, arrangement=AMENDED), Reason.WRONG_ARRANGEMENT),
        # Seoul is a recipient in general, but this token is Tokyo's.
        (lambda: recipient_check(TOKEN, "seoul"), Reason.WRONG_RECIPIENT),
    ]
    for check, reason in recipient_refusals:
        with pytest.raises(Refused) as info:
            check()
        assert info.value.reason is reason


def test_token_from_an_unlisted_originator_fails_opaquely() -> None:
    # No key to check against: the same opaque failure as a bad signature.
    forged = resign(originator="beijing")
    with pytest.raises(VerificationError):
        relay_check(forged, originator="beijing")
    with pytest.raises(VerificationError):
        recipient_check(forged)
    with pytest.raises(VerificationError):
        relay_check(resign(originator="washington"), originator="washington")


def test_token_signed_by_another_member_fails() -> None:
    for signer in ("tokyo", "washington"):
        with pytest.raises(VerificationError):
            relay_check(resign(signer=SECRETS[signer]))
        with pytest.raises(VerificationError):
            recipient_check(resign(signer=SECRETS[signer]))


def test_recipient_check_needs_the_recipients_key() -> None:
    with pytest.raises(UsageError):
        recipient_check(TOKEN, secret=SECRETS["seoul"])


# --- sealed to another -------------------------------------------------------------------


def test_token_sealed_to_another_recipient_cannot_be_unsealed() -> None:
    quad, secrets = make_quad()
    token = issue(quad, secrets)  # to Tokyo
    # Canberra cannot use Tokyo's token, under its own name or by claiming Tokyo's.
    with pytest.raises(Refused) as info:
        check_for_recipient(token, quad, secrets["canberra"], "canberra", now=NOW)
    assert info.value.reason is Reason.WRONG_RECIPIENT
    with pytest.raises(UsageError):
        check_for_recipient(token, quad, secrets["canberra"], "tokyo", now=NOW)
    # Seoul re-addresses the token to Canberra but the key inside stays wrapped to
    # Tokyo's keys: even with Tokyo's prekey secrets Canberra's identity opens nothing,
    # and the changed recipient breaks the associated data besides.
    readdressed = resign(token, recipient="canberra")
    with pytest.raises(VerificationError):
        check_for_recipient(
            readdressed,
            quad,
            secrets["canberra"],
            "canberra",
            now=NOW,
            prekey_secret=lookup("tokyo"),
        )


def test_key_commitment_mismatch_is_opaque() -> None:
    forged = resign(key_commit=key_commitment(bytes(32), REPORT_ID))
    relay_check(forged)  # the relay cannot tell
    with pytest.raises(VerificationError):
        recipient_check(forged)
    # A wrap authenticated under other associated data (any other field) fails the same.
    body = body_of(TOKEN)
    wrap = body["wrap"]
    with pytest.raises(VerificationError):
        recipient_check(resign(counter=2, wrap=wrap))


# --- tampering ---------------------------------------------------------------------------


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except (ProtocolError, VerificationError) as exc:
        return type(exc).__name__
    return "accepted"


def test_flip_every_byte() -> None:
    seen: set[str] = set()
    for position in range(len(TOKEN)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = flip(TOKEN, position, mask)
            for check in (relay_check, recipient_check):
                result = outcome(lambda c=check, t=tampered: c(t))  # type: ignore[misc]
                assert result != "accepted", (position, mask)
                seen.add(result)
    assert seen == {"ProtocolError", "VerificationError"}


def field_positions(token: bytes) -> list[int]:
    """The first byte of each field's key and value inside the body, plus the ends."""
    envelope = enc.unpack(token)
    body = envelope["body"]
    start = token.index(body)
    positions = {0, len(token) - 1, start, start + len(body) - 1}
    for key in body_of(token):
        positions.add(start + body.index(msgpack.packb(key)))
        positions.add(start + body.index(msgpack.packb(key)) + len(msgpack.packb(key)))
    return sorted(positions)


def test_tamper_at_every_field_boundary() -> None:
    for position in field_positions(TOKEN):
        for mask in range(1, 256):
            tampered = flip(TOKEN, position, mask)
            assert outcome(lambda t=tampered: recipient_check(t)) != "accepted"  # type: ignore[misc]


@pytest.mark.parametrize("field", sorted(body_of(TOKEN)))
def test_every_field_altered_without_signing_fails(field: str) -> None:
    # Each field changed to another value that still fits the schema.
    body = body_of(TOKEN)
    value = body[field]
    replacements: dict[str, Any] = {
        "originator": "tokyo",
        "relay": "tokyo",
        "recipient": "seoul",
        "scope": "nuclear",
        "level": "restricted",
        "version": 2,
        "v": 3,
        "wrap": {**body["wrap"], "eph": flip(body["wrap"]["eph"], 0)},
    }
    if field in replacements:
        body[field] = replacements[field]
    elif isinstance(value, bytes):
        body[field] = flip(value, 0)
    else:
        body[field] = value + 1
    tampered = enc.pack({"body": enc.pack(body), "sig": enc.unpack(TOKEN)["sig"]})
    for check in (relay_check, recipient_check):
        result = outcome(lambda c=check: c(tampered))  # type: ignore[misc]
        assert result in ("VerificationError", "ProtocolError"), field
    if field != "v":
        assert outcome(lambda: recipient_check(tampered)) == "VerificationError"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    assert outcome(lambda: relay_check(data)) != "accepted"
    assert outcome(lambda: recipient_check(data)) != "accepted"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, MAX_TOKEN_SIZE), st.sampled_from(["flip", "insert", "delete"])),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 255),
)
def test_random_edits_fail_cleanly(edits: list[tuple[int, str]], mask: int) -> None:
    data = bytearray(TOKEN)
    for position, kind in edits:
        position %= len(data)
        if kind == "flip":
            data[position] ^= mask
        elif kind == "insert":
            data.insert(position, mask)
        else:
            del data[position]
    if bytes(data) == TOKEN:
        return
    assert outcome(lambda: recipient_check(bytes(data))) != "accepted"


def test_oversized_token_refused_before_parsing() -> None:
    envelope = enc.unpack(TOKEN)
    huge = enc.pack({"body": envelope["body"] + bytes(MAX_TOKEN_SIZE), "sig": envelope["sig"]})
    with pytest.raises(ProtocolError):
        relay_check(huge)


# --- signatures: malleability and context ------------------------------------------------


def malleate(signature: bytes) -> bytes:
    """The same signature with S replaced by S + L: valid under a lax verifier."""
    s = int.from_bytes(signature[32:], "little")
    return signature[:32] + (s + L).to_bytes(32, "little")


def test_malleated_signature_refused() -> None:
    envelope = enc.unpack(TOKEN)
    signature = malleate(envelope["sig"])
    assert signature != envelope["sig"]
    malleated = enc.pack({"body": envelope["body"], "sig": signature})
    with pytest.raises(VerificationError):
        relay_check(malleated)
    with pytest.raises(VerificationError):
        recipient_check(malleated)
    public = SECRETS["seoul"].public.signing
    with pytest.raises(VerificationError):
        verify(public, Context.TOKEN, envelope["body"], signature)
    verify(public, Context.TOKEN, envelope["body"], envelope["sig"])


@pytest.mark.parametrize("context", [c for c in Context if c is not Context.TOKEN])
def test_token_signed_in_another_context_fails(context: Context) -> None:
    with pytest.raises(VerificationError):
        relay_check(resign(context=context))


def test_signature_of_another_token_fails() -> None:
    other = enc.unpack(issue(counter=2))["sig"]
    swapped = enc.pack({"body": enc.unpack(TOKEN)["body"], "sig": other})
    with pytest.raises(VerificationError):
        relay_check(swapped)


# --- canonical encodings -----------------------------------------------------------------


def map_in_order(value: dict[str, Any], keys: list[str]) -> bytes:
    """A msgpack map with ``keys`` in the order given (not sorted: not canonical)."""
    if len(keys) < 16:
        out = bytearray([0x80 | len(keys)])
    else:
        out = bytearray(b"\xde" + struct.pack(">H", len(keys)))
    for key in keys:
        out += msgpack.packb(key) + msgpack.packb(value[key], use_bin_type=True)
    return bytes(out)


def noncanonical_variants() -> dict[str, bytes]:
    envelope = enc.unpack(TOKEN)
    body_bytes = envelope["body"]
    body = enc.unpack(body_bytes)
    keys = sorted(body, key=str.encode)
    assert map_in_order(body, keys) == body_bytes  # the helper builds canonical when sorted
    counter_at = body_bytes.index(msgpack.packb("counter")) + len(msgpack.packb("counter"))
    assert body_bytes[counter_at] == 0x01  # fixint 1
    # The body's signature is recomputed in every signed variant: the originator signs
    # exactly these bytes, and the decoder must still refuse them.
    signed = {
        "body-map-order": map_in_order(body, list(reversed(keys))),
        "body-long-int": body_bytes[:counter_at]
        + b"\xcf"
        + struct.pack(">Q", 1)
        + body_bytes[counter_at + 1 :],
        "body-trailing-byte": body_bytes + b"\x00",
        "body-str-for-bin": map_in_order(
            {**body, "report": body["report"].decode("latin-1")}, keys
        ),
        "body-duplicate-key": bytes([body_bytes[0] + 1])
        + body_bytes[1:]
        + msgpack.packb("v")
        + msgpack.packb(1),
        "body-float": map_in_order({**body, "counter": 1.0}, keys),
    }
    variants = {name: sign_body(data) for name, data in signed.items()}
    sig = envelope["sig"]
    variants.update(
        {
            "envelope-map-order": map_in_order(envelope, ["sig", "body"]),
            "envelope-trailing-byte": TOKEN + b"\xc0",
            "envelope-bin32-length": b"\x82\xa4body\xc6"
            + struct.pack(">I", len(body_bytes))
            + body_bytes
            + b"\xa3sig\xc4\x40"
            + sig,
            "envelope-extra-key": enc.pack({"body": body_bytes, "sig": sig, "x": 1}),
            "envelope-missing-sig": enc.pack({"body": body_bytes}),
            "envelope-ext-type": msgpack.packb(
                {"body": body_bytes, "sig": msgpack.ExtType(1, sig)}, use_bin_type=True
            ),
            "envelope-array": msgpack.packb([body_bytes, sig], use_bin_type=True),
        }
    )
    return variants


@pytest.mark.parametrize(
    ("name", "data"), sorted(noncanonical_variants().items()), ids=sorted(noncanonical_variants())
)
def test_noncanonical_encodings_refused(name: str, data: bytes) -> None:
    assert data != TOKEN
    with pytest.raises(ProtocolError):
        relay_check(data)
    with pytest.raises(ProtocolError):
        ReleaseToken.decode(data)


def test_canonical_resign_is_accepted() -> None:
    # The resign helper itself produces valid tokens when nothing changes.
    same = resign()
    assert relay_check(same).id == relay_check(TOKEN).id


@slow
@settings(max_examples=5000, deadline=None)
@given(st.binary(max_size=MAX_TOKEN_SIZE + 10))
def test_any_bytes_long_run(data: bytes) -> None:
    assert outcome(lambda: recipient_check(data)) != "accepted"


def test_hand_built_token_fields_cannot_differ_from_the_signed_body() -> None:
    token = ReleaseToken.decode(TOKEN)
    forged = dataclasses.replace(token, recipient="seoul", level="routine")
    checked = check_for_relay(
        forged, ARRANGEMENT, report_id=REPORT_ID, digest=DIGEST, size=SIZE,
        originator="seoul", now=NOW,
    )  # fmt: skip
    assert (checked.recipient, checked.level) == ("tokyo", "secret")


def test_a_decoded_token_is_not_decoded_again_by_the_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The relay and the recipient decode a token once and hand the typed value to the
    # check; only a token not made by decode (built by hand, copied) is decoded again.
    token = ReleaseToken.decode(TOKEN)
    calls: list[bytes] = []
    original = ReleaseToken.decode.__func__  # type: ignore[attr-defined]

    def counting(cls: type[ReleaseToken], data: bytes) -> ReleaseToken:
        calls.append(data)
        result: ReleaseToken = original(cls, data)
        return result

    monkeypatch.setattr(ReleaseToken, "decode", classmethod(counting))
    checked = check_for_relay(
        token, ARRANGEMENT, report_id=REPORT_ID, digest=DIGEST, size=SIZE,
        originator="seoul", now=NOW,
    )  # fmt: skip
    assert checked is token and calls == []
    check_for_relay(
        dataclasses.replace(token), ARRANGEMENT, report_id=REPORT_ID, digest=DIGEST,
        size=SIZE, originator="seoul", now=NOW,
    )  # fmt: skip
    assert calls == [TOKEN]
