"""Receipts, the relay's stored-acks and audit checkpoints: round trip, tamper, wrong signer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_trio
from hypothesis import given, settings
from hypothesis import strategies as st

import tisa.receipt
from tisa import encoding as enc
from tisa.arrangement import Arrangement
from tisa.audit import Checkpoint
from tisa.envelope import seal_envelope
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import Context, MemberSecret
from tisa.limits import MAX_REPORT_SIZE
from tisa.receipt import MAX_RECEIPT_SIZE, Receipt, StoredAck

ARRANGEMENT, SECRETS = make_trio()
AMENDED = ARRANGEMENT.amend(scopes=(*ARRANGEMENT.scopes, "chemical"))
NOW = 1_420_000_000
REPORT = bytes(range(16))
TOKEN_ID = bytes(range(16, 32))
DIGEST = bytes(range(32, 64))


def issue_receipt(arrangement: Arrangement = ARRANGEMENT, **changes: Any) -> Receipt:
    kwargs: dict[str, Any] = {
        "report": REPORT,
        "token": TOKEN_ID,
        "originator": "seoul",
        "recipient": "tokyo",
        "digest": DIGEST,
        "received": NOW,
    }
    kwargs.update(changes)
    secret = kwargs.pop("secret", SECRETS[kwargs["recipient"]])
    return Receipt.issue(secret, arrangement, **kwargs)


def issue_ack(arrangement: Arrangement = ARRANGEMENT, **changes: Any) -> StoredAck:
    kwargs: dict[str, Any] = {
        "report": REPORT,
        "originator": "seoul",
        "digest": DIGEST,
        "size": 1089,
        "stored": NOW,
    }
    kwargs.update(changes)
    secret = kwargs.pop("secret", SECRETS["washington"])
    return StoredAck.issue(secret, arrangement, **kwargs)


def issue_checkpoint(arrangement: Arrangement = ARRANGEMENT, **changes: Any) -> Checkpoint:
    kwargs: dict[str, Any] = {"seq": 42, "head": DIGEST, "time": NOW}
    kwargs.update(changes)
    secret = kwargs.pop("secret", SECRETS["washington"])
    return Checkpoint.issue(secret, arrangement, **kwargs)


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    context: Context
    signer: str
    issue: Callable[..., Any]
    verify: Callable[[bytes, Arrangement], Any]
    fields: dict[str, Any]

    def encoded(self, arrangement: Arrangement = ARRANGEMENT) -> bytes:
        data: bytes = self.issue(arrangement).encoded
        return data


KINDS = [
    Kind(
        "receipt",
        Context.RECEIPT,
        "tokyo",
        issue_receipt,
        Receipt.verify,
        {
            "report": REPORT,
            "token": TOKEN_ID,
            "originator": "seoul",
            "recipient": "tokyo",
            "digest": DIGEST,
            "received": NOW,
        },
    ),
    Kind(
        "ack",
        Context.ACK,
        "washington",
        issue_ack,
        StoredAck.verify,
        {"report": REPORT, "originator": "seoul", "digest": DIGEST, "size": 1089, "stored": NOW},
    ),
    Kind(
        "checkpoint",
        Context.AUDIT,
        "washington",
        issue_checkpoint,
        Checkpoint.verify,
        {"seq": 42, "head": DIGEST, "time": NOW},
    ),
]
kinds = pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])


def resign(data: bytes, signer: MemberSecret, context: Context, **changes: Any) -> bytes:
    body = enc.unpack(enc.unpack(data)["body"])
    body.update(changes)
    body_bytes = enc.pack(body)
    return enc.pack({"body": body_bytes, "sig": signer.sign(context, body_bytes)})


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except (ProtocolError, VerificationError) as exc:
        return type(exc).__name__
    return "accepted"


# --- round trips -------------------------------------------------------------------------


@kinds
def test_round_trip(kind: Kind) -> None:
    issued = kind.issue()
    for field, value in kind.fields.items():
        assert getattr(issued, field) == value
    assert issued.arrangement == ARRANGEMENT.id
    verified = kind.verify(issued.encoded, ARRANGEMENT)
    assert verified == issued
    assert verified.encoded == issued.encoded
    # Canonical: issuing the same values again gives the same bytes (Ed25519 is
    # deterministic and there is no randomness in these objects).
    assert kind.issue().encoded == issued.encoded


def test_receipt_from_seoul_for_a_report_of_tokyo() -> None:
    receipt = issue_receipt(originator="tokyo", recipient="seoul")
    assert Receipt.verify(receipt.encoded, ARRANGEMENT).recipient == "seoul"


def test_checkpoint_at_genesis() -> None:
    checkpoint = issue_checkpoint(seq=0, head=bytes(32))
    assert Checkpoint.verify(checkpoint.encoded, ARRANGEMENT).seq == 0


# --- wrong signer ------------------------------------------------------------------------


@kinds
def test_issue_needs_the_signers_key(kind: Kind) -> None:
    for name, secret in SECRETS.items():
        if name != kind.signer:
            with pytest.raises(UsageError):
                kind.issue(secret=secret)


@kinds
def test_signed_by_another_member_fails(kind: Kind) -> None:
    for name, secret in SECRETS.items():
        forged = resign(kind.encoded(), secret, kind.context)
        if name == kind.signer:
            kind.verify(forged, ARRANGEMENT)
            continue
        with pytest.raises(VerificationError):
            kind.verify(forged, ARRANGEMENT)


def test_receipt_claiming_another_recipient_fails() -> None:
    # Seoul signs a receipt that says Tokyo received the report.
    receipt = issue_receipt().encoded
    with pytest.raises(VerificationError):
        Receipt.verify(resign(receipt, SECRETS["seoul"], Context.RECEIPT), ARRANGEMENT)
    # Naming itself checks (it signed), but Seoul is the originator of that report, and
    # nobody receives its own report; naming the relay or a stranger leaves no key to
    # check with.
    forged = resign(receipt, SECRETS["seoul"], Context.RECEIPT, recipient="seoul")
    with pytest.raises(Refused) as info:
        Receipt.verify(forged, ARRANGEMENT)
    assert info.value.reason is Reason.WRONG_RECIPIENT
    for name in ("washington", "beijing"):
        forged = resign(receipt, SECRETS["washington"], Context.RECEIPT, recipient=name)
        with pytest.raises(VerificationError):
            Receipt.verify(forged, ARRANGEMENT)


@kinds
def test_signed_in_another_context_fails(kind: Kind) -> None:
    signer = SECRETS[kind.signer]
    for context in Context:
        forged = resign(kind.encoded(), signer, context)
        if context is kind.context:
            kind.verify(forged, ARRANGEMENT)
            continue
        with pytest.raises(VerificationError):
            kind.verify(forged, ARRANGEMENT)


@kinds
def test_another_arrangement_version_is_refused(kind: Kind) -> None:
    # Same keys, other version: the signature checks, the arrangement does not.
    with pytest.raises(Refused) as info:
        kind.verify(kind.encoded(), AMENDED)
    assert info.value.reason is Reason.WRONG_ARRANGEMENT
    kind.verify(kind.encoded(AMENDED), AMENDED)


@kinds
def test_another_arrangement_with_other_keys_fails(kind: Kind) -> None:
    other, _ = make_trio_with_other_keys()
    with pytest.raises(VerificationError):
        kind.verify(kind.encoded(), other)


def make_trio_with_other_keys() -> tuple[Arrangement, dict[str, MemberSecret]]:
    fresh = {name: MemberSecret.generate() for name in SECRETS}
    members = tuple(
        dataclasses.replace(m, identity=fresh[m.name].public) for m in ARRANGEMENT.members
    )
    return (
        Arrangement(
            name=ARRANGEMENT.name,
            version=1,
            members=members,
            relay=ARRANGEMENT.relay,
            scopes=ARRANGEMENT.scopes,
            levels=ARRANGEMENT.levels,
            created=ARRANGEMENT.created,
        ),
        fresh,
    )


# --- tampering ---------------------------------------------------------------------------


@kinds
def test_flip_every_byte(kind: Kind) -> None:
    data = kind.encoded()
    seen = set()
    for position in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            result = outcome(lambda p=position, m=mask: kind.verify(flip(data, p, m), ARRANGEMENT))  # type: ignore[misc]
            assert result != "accepted", (position, mask)
            seen.add(result)
    assert seen == {"ProtocolError", "VerificationError"}


@kinds
def test_every_field_altered_without_signing_fails(kind: Kind) -> None:
    data = kind.encoded()
    envelope = enc.unpack(data)
    body = enc.unpack(envelope["body"])
    for field, value in body.items():
        changed = dict(body)
        if isinstance(value, bytes):
            changed[field] = flip(value, len(value) - 1)
        elif isinstance(value, int):
            changed[field] = value + 1
        else:
            changed[field] = "tokyo" if value != "tokyo" else "seoul"
        tampered = enc.pack({"body": enc.pack(changed), "sig": envelope["sig"]})
        assert outcome(lambda t=tampered: kind.verify(t, ARRANGEMENT)) != "accepted", field  # type: ignore[misc]


@kinds
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=400))
def test_any_bytes_fail_cleanly(kind: Kind, data: bytes) -> None:
    assert outcome(lambda: kind.verify(data, ARRANGEMENT)) != "accepted"


@kinds
def test_truncated_and_extended_fail(kind: Kind) -> None:
    data = kind.encoded()
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            kind.verify(data[:cut], ARRANGEMENT)
    with pytest.raises(ProtocolError):
        kind.verify(data + b"\x00", ARRANGEMENT)


@kinds
def test_extra_and_missing_body_fields_fail(kind: Kind) -> None:
    data = kind.encoded()
    signer = SECRETS[kind.signer]
    with pytest.raises(ProtocolError):
        kind.verify(resign(data, signer, kind.context, extra=1), ARRANGEMENT)
    body = enc.unpack(enc.unpack(data)["body"])
    for field in body:
        partial = {k: v for k, v in body.items() if k != field}
        partial_bytes = enc.pack(partial)
        forged = enc.pack({"body": partial_bytes, "sig": signer.sign(kind.context, partial_bytes)})
        with pytest.raises(ProtocolError):
            kind.verify(forged, ARRANGEMENT)


def test_receipt_size_limit() -> None:
    envelope = enc.unpack(issue_receipt().encoded)
    padded = enc.pack({"body": envelope["body"] + bytes(MAX_RECEIPT_SIZE), "sig": envelope["sig"]})
    with pytest.raises(ProtocolError):
        Receipt.verify(padded, ARRANGEMENT)


def test_issued_bytes_verify_to_the_issued_value() -> None:
    # issue builds its value directly (it no longer re-verifies what it just signed):
    # the bytes it returns must verify, to the same value, under the signer's key.
    receipt = issue_receipt()
    assert Receipt.verify(receipt.encoded, ARRANGEMENT) == receipt
    assert Receipt.verify(receipt.encoded, ARRANGEMENT).encoded == receipt.encoded
    ack = issue_ack()
    assert StoredAck.verify(ack.encoded, ARRANGEMENT) == ack
    assert StoredAck.verify(ack.encoded, ARRANGEMENT).encoded == ack.encoded


class _Name(str):
    pass


class _Size(int):
    pass


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"size": 1, "stored": 0},
        {"size": MAX_REPORT_SIZE, "stored": 2**64 - 1},
        # Subclasses take the general encoding: the same bytes all the same.
        {"originator": _Name("seoul")},
        {"size": _Size(1089)},
    ],
)
def test_a_stored_ack_is_the_envelope_of_its_canonical_body(
    changes: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = all(type(value) in (int, str, bytes) for value in changes.values())
    if plain:  # the relay's case: no generic encoding of the body

        def walked(*args: object) -> bytes:
            raise AssertionError("the body went through pack's walk")

        monkeypatch.setattr(tisa.receipt, "seal_envelope", walked)
    ack = issue_ack(**changes)
    monkeypatch.undo()
    values: dict[str, Any] = {
        "report": REPORT,
        "originator": "seoul",
        "digest": DIGEST,
        "size": 1089,
        "stored": NOW,
        **changes,
    }
    body = {"v": 1, "arrangement": ARRANGEMENT.id, **values}
    # Ed25519 signatures are deterministic: the whole envelope is the same bytes.
    assert ack.encoded == seal_envelope(SECRETS["washington"], Context.ACK, body)
    assert StoredAck.verify(ack.encoded, ARRANGEMENT) == ack
