"""Channel messages: every type round trip, strict schemas, and any input decodes or fails."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.errors import ProtocolError, Reason, UsageError
from tisa.limits import MAX_INLINE_CIPHERTEXT, MAX_INLINE_TOKENS, Limits
from tisa.messages import (
    MAX_CHUNK_DATA,
    MESSAGE_TYPES,
    Ack,
    AckReceipts,
    AuditFetch,
    AuditReply,
    Chunk,
    ConsentNotice,
    Deliver,
    DeliverEnd,
    DeliverInline,
    ErrorMessage,
    Expired,
    FetchPrekeys,
    Message,
    Prekeys,
    PrekeyStatus,
    PublishPrekeys,
    ReceiptNotice,
    Refusal,
    Release,
    Released,
    Revoke,
    Revoked,
    SendConsent,
    SendReceipt,
    Stored,
    SubmitBegin,
    SubmitEnd,
    SubmitInline,
    decode_message,
    encode_message,
)

RID = bytes(range(16))
TID = bytes(range(16, 32))
DIGEST = bytes(range(32, 64))

SAMPLES: list[Message] = [
    SubmitBegin(report=RID, size=1089, digest=DIGEST, expires=1_420_086_400),
    Chunk(data=b"\x00" * 100),
    Chunk(data=b""),
    Chunk(data=b"\xff" * MAX_CHUNK_DATA),
    SubmitEnd(report=RID),
    Release(token=b"t" * 486),
    Revoke(report=RID),
    Revoke(report=RID, token=TID),
    Ack(kind="delivery", token=TID),
    Ack(kind="receipt", token=TID),
    SendReceipt(receipt=b"r" * 300),
    AuditFetch(),
    AuditFetch(since=2**63),
    Stored(report=RID, ack=b"a" * 250),
    Stored(report=RID, ack=b"a" * 250, released=[TID, RID]),
    SubmitInline(report=RID, digest=DIGEST, expires=1_420_086_400, data=b"c" * 1089),
    SubmitInline(
        report=RID,
        digest=DIGEST,
        expires=1_420_086_400,
        data=b"c" * 1089,
        tokens=[b"t" * 486, b"u" * 600],
    ),
    DeliverInline(token=b"t" * 486, data=b"c" * 1089),
    Released(report=RID, token=TID),
    Deliver(token=b"t" * 486),
    DeliverEnd(token=TID),
    ReceiptNotice(receipt=b"r" * 300),
    Refusal(ref=TID, reason=Reason.EXPIRED.value),
    Refusal(ref=b"", reason=Reason.MALFORMED.value, detail="bad frame: ünïcode ok"),
    Expired(report=RID),
    Expired(report=RID, token=TID),
    Revoked(report=RID),
    Revoked(report=RID, token=TID),
    AuditReply(extract=b"e" * 5000),
    ErrorMessage(reason=Reason.BUSY.value),
    ErrorMessage(reason=Reason.LIMIT.value, detail="frame too large"),
    SendConsent(kind="announce", data=b"n" * 400),
    SendConsent(kind="request", data=b"q" * 600),
    SendConsent(kind="answer", data=b"a" * 700),
    ConsentNotice(kind="request", data=b"q" * 600),
    Ack(kind="announce", token=RID),
    Ack(kind="request", token=TID),
    Ack(kind="answer", token=TID),
    AckReceipts(tokens=[TID, RID]),
    PublishPrekeys(signed=b"p" * 218, one_time=[b"o" * 218] * 3),
    PublishPrekeys(signed=None, one_time=[]),
    FetchPrekeys(ref=TID, member="tokyo"),
    FetchPrekeys(ref=TID, member="tokyo", count=16),
    Prekeys(ref=TID, member="tokyo", signed=b"p" * 218, one_time=[b"o" * 218]),
    Prekeys(ref=TID, member="tokyo", signed=b"p" * 218, one_time=[b"o" * 218] * 3),
    Prekeys(ref=TID, member="tokyo", signed=None, one_time=[]),
    PrekeyStatus(signed_not_after=1_420_600_000, one_time=99),
    PrekeyStatus(signed_not_after=0, one_time=0),
]


def sample_id(message: Message) -> str:
    return f"{message.TYPE}-{SAMPLES.index(message)}"


samples = pytest.mark.parametrize("message", SAMPLES, ids=[sample_id(m) for m in SAMPLES])


def test_every_type_has_a_sample() -> None:
    assert {m.TYPE for m in SAMPLES} == set(MESSAGE_TYPES)
    assert all(name == MESSAGE_TYPES[name].TYPE for name in MESSAGE_TYPES)


@samples
def test_round_trip(message: Message) -> None:
    data = encode_message(message)
    decoded = decode_message(data)
    assert type(decoded) is type(message)
    assert decoded == message
    assert encode_message(decoded) == data
    assert enc.unpack(data)["t"] == message.TYPE
    assert set(enc.unpack(data)) == {"t"} | {f.name for f in dataclasses.fields(message)}


@samples
def test_fed_with_trailing_data_fails(message: Message) -> None:
    data = encode_message(message)
    for extra in (b"\x00", b"\xc0", data):
        with pytest.raises(ProtocolError):
            decode_message(data + extra)


@samples
def test_every_truncation_fails(message: Message) -> None:
    data = encode_message(message)
    step = max(1, len(data) // 200)
    for cut in range(0, len(data), step):
        with pytest.raises(ProtocolError):
            decode_message(data[:cut])


@samples
def test_extra_key_fails(message: Message) -> None:
    value = enc.unpack(encode_message(message))
    for key in ("extra", "T", "zz", ""):
        with pytest.raises(ProtocolError):
            decode_message(enc.pack({**value, key: 0}))


@samples
def test_missing_key_fails(message: Message) -> None:
    value = enc.unpack(encode_message(message))
    for key in value:
        with pytest.raises(ProtocolError):
            decode_message(enc.pack({k: v for k, v in value.items() if k != key}))


@samples
def test_wrong_value_types_fail(message: Message) -> None:
    value = enc.unpack(encode_message(message))
    for key, current in value.items():
        if key == "t":
            continue
        wrongs: list[Any] = [True, [current], {"x": current}, -1, "text", b"\x00" * 40]
        for wrong in wrongs:
            if type(wrong) is type(current) or (current is None and wrong is None):
                continue
            try:
                decoded = decode_message(enc.pack({**value, key: wrong}))
            except ProtocolError:
                continue
            # Optional fields may take a value of the right shape; nothing else gets in.
            assert getattr(decoded, key) == wrong
            assert type(wrong) is bytes


def test_unknown_or_missing_type() -> None:
    for t in ("nope", "", "Submit", "SUBMIT", 1, None, b"submit", ["submit"]):
        with pytest.raises(ProtocolError):
            decode_message(enc.pack({"t": t, "report": RID}))
    with pytest.raises(ProtocolError):
        decode_message(enc.pack({"report": RID}))


def test_type_of_one_message_with_fields_of_another_fails() -> None:
    submit_end = enc.unpack(encode_message(SubmitEnd(report=RID)))
    with pytest.raises(ProtocolError):
        decode_message(enc.pack({**submit_end, "t": "released"}))
    with pytest.raises(ProtocolError):
        decode_message(enc.pack({**submit_end, "t": "chunk"}))


def test_non_canonical_encodings_fail() -> None:
    message = SubmitBegin(report=RID, size=1089, digest=DIGEST, expires=5)
    value = enc.unpack(encode_message(message))
    reordered = msgpack.packb(dict(reversed(list(value.items()))), use_bin_type=True)
    assert reordered != encode_message(message)
    non_canonical = [
        reordered,
        encode_message(message).replace(b"\xa7expires\x05", b"\xa7expires\xcc\x05"),
        msgpack.packb({**value, "report": value["report"].decode("latin-1")}),
        msgpack.packb({**value, "size": 1089.0}, use_bin_type=True),
        msgpack.packb([value], use_bin_type=True),
    ]
    for data in non_canonical:
        with pytest.raises(ProtocolError):
            decode_message(data)


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (SubmitBegin, {"report": b"short", "size": 1, "digest": DIGEST, "expires": 0}),
        (SubmitBegin, {"report": RID, "size": 0, "digest": DIGEST, "expires": 0}),
        (SubmitBegin, {"report": RID, "size": 1, "digest": DIGEST, "expires": -1}),
        (SubmitBegin, {"report": RID, "size": True, "digest": DIGEST, "expires": 0}),
        (Chunk, {"data": b"x" * (MAX_CHUNK_DATA + 1)}),
        (Chunk, {"data": "text"}),
        (Ack, {"kind": "other", "token": TID}),
        (Refusal, {"ref": b"x" * 17, "reason": "expired"}),
        (Refusal, {"ref": TID, "reason": "no such reason"}),
        (ErrorMessage, {"reason": "busy", "detail": "x" * 513}),
        (ErrorMessage, {"reason": "busy", "detail": "line\nbreak"}),
        (Revoke, {"report": RID, "token": b"short"}),
        (AuditFetch, {"since": -1}),
        (Release, {"token": b"t" * 2049}),
        (DeliverInline, {"token": b"t" * 486, "data": b""}),
        (DeliverInline, {"token": b"t" * 486, "data": b"c" * (MAX_INLINE_CIPHERTEXT + 1)}),
        (
            SubmitInline,
            {
                "report": RID,
                "digest": DIGEST,
                "expires": 1,
                "data": b"c" * (MAX_INLINE_CIPHERTEXT + 1),
                "tokens": [],
            },
        ),
        (
            SubmitInline,
            {
                "report": RID,
                "digest": DIGEST,
                "expires": 1,
                "data": b"c",
                "tokens": [b"t"] * (MAX_INLINE_TOKENS + 1),
            },
        ),
        (Stored, {"report": RID, "ack": b"a", "released": [TID] * (MAX_INLINE_TOKENS + 1)}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_constructors_validate(cls: type[Message], fields: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        cls(**fields)
    # And the same values on the wire are a protocol error, not a UsageError.
    with pytest.raises(ProtocolError):
        decode_message(enc.pack({"t": cls.TYPE, **fields}))


def test_inline_messages_carry_up_to_the_inline_limit() -> None:
    # At the limit, with the most tokens: one message, and it fits the default frame.
    full = SubmitInline(
        report=RID,
        digest=DIGEST,
        expires=1,
        data=b"c" * MAX_INLINE_CIPHERTEXT,
        tokens=[b"t" * 2048] * MAX_INLINE_TOKENS,
    )
    data = encode_message(full)
    assert decode_message(data) == full
    assert len(data) + 17 <= Limits().max_frame
    delivery = DeliverInline(token=b"t" * 2048, data=b"c" * MAX_INLINE_CIPHERTEXT)
    assert decode_message(encode_message(delivery)) == delivery
    # One byte over: not an inline message (a sender streams it instead).
    for over in (
        {"t": "deliver_inline", "token": b"t", "data": b"c" * (MAX_INLINE_CIPHERTEXT + 1)},
        {
            "t": "submit_inline",
            "report": RID,
            "digest": DIGEST,
            "expires": 1,
            "data": b"c" * (MAX_INLINE_CIPHERTEXT + 1),
            "tokens": [],
        },
    ):
        with pytest.raises(ProtocolError):
            decode_message(enc.pack(over))


def test_messages_are_frozen_and_keyword_only() -> None:
    message = SubmitEnd(report=RID)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.report = TID  # type: ignore[misc]
    with pytest.raises(TypeError):
        SubmitEnd(RID)  # type: ignore[misc]


def test_max_size() -> None:
    data = encode_message(AuditReply(extract=b"e" * 5000))
    decode_message(data, max_size=len(data))
    with pytest.raises(ProtocolError):
        decode_message(data, max_size=len(data) - 1)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_fail(data: bytes) -> None:
    try:
        message = decode_message(data)
    except ProtocolError:
        return
    assert encode_message(message) == data


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    sorted({"t", "x"} | {name for cls in MESSAGE_TYPES.values() for name in cls.SCHEMA})
)


@settings(max_examples=250, deadline=None)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.dictionaries(field_names, msgpack_values | st.binary(min_size=16, max_size=16), max_size=5),
)
def test_any_map_decodes_or_fails(kind: str, fields: dict[str, Any]) -> None:
    data = msgpack.packb({"t": kind, **fields}, use_bin_type=True)
    try:
        message = decode_message(data)
    except ProtocolError:
        return
    assert type(message) is MESSAGE_TYPES[kind]
    assert decode_message(encode_message(message)) == message


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SAMPLES), st.integers(0, 10_000), st.integers(1, 255))
def test_any_flipped_byte_decodes_or_fails(message: Message, position: int, mask: int) -> None:
    data = bytearray(encode_message(message))
    data[position % len(data)] ^= mask
    try:
        decoded = decode_message(bytes(data))
    except ProtocolError:
        return
    # A flip inside a payload can give another valid message; it must be canonical.
    assert encode_message(decoded) == bytes(data)


@samples
def test_fast_encoding_is_the_canonical_encoding(message: Message) -> None:
    # encode_message skips the generic canonical walk; it must give the same bytes, and
    # decode_message (which skips the second schema check) the same value.
    assert encode_message(message) == enc.pack(message.to_dict())
    decoded = decode_message(encode_message(message))
    assert decoded == message and type(decoded) is type(message)
    field = dataclasses.fields(decoded)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(decoded, field, getattr(decoded, field))


@pytest.mark.parametrize("cls", sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE))
def test_each_schema_names_exactly_its_messages_fields(cls: type[Message]) -> None:
    # Construction checks the fields the schema names: a field it missed would go
    # unchecked, a name it has and the class lacks would fail every construction.
    assert set(cls.SCHEMA) == {field.name for field in dataclasses.fields(cls)}


def test_consent_size_limit() -> None:
    from tisa.consent import MAX_CONSENT_SIZE

    for cls in (SendConsent, ConsentNotice):
        whole = cls(kind="announce", data=b"n" * MAX_CONSENT_SIZE)
        assert decode_message(encode_message(whole)) == whole
        with pytest.raises(UsageError):
            cls(kind="announce", data=b"n" * (MAX_CONSENT_SIZE + 1))
        with pytest.raises(UsageError):
            cls(kind="approve", data=b"n")


# The messages the relay builds with Message.trusted (relay/server.py), at their limits.
_TRUSTED_CASES: list[tuple[type[Message], dict[str, Any]]] = [
    (Stored, {"report": RID, "ack": b"\x01" * 8192, "released": []}),
    (Stored, {"report": RID, "ack": b"a", "released": [bytes([n]) * 16 for n in range(4)]}),
    (DeliverInline, {"token": b"t" * 700, "data": b"\x00" * MAX_INLINE_CIPHERTEXT}),
    (DeliverInline, {"token": b"t", "data": b"d"}),
    (Chunk, {"data": b"\xff" * MAX_CHUNK_DATA}),
    (Chunk, {"data": b"c"}),
]


@pytest.mark.parametrize(("cls", "fields"), _TRUSTED_CASES)
def test_trusted_construction_encodes_the_same_bytes(
    cls: type[Message], fields: dict[str, Any]
) -> None:
    checked = cls(**fields)
    trusted = cls.trusted(**fields)
    assert type(trusted) is cls
    assert trusted == checked
    assert encode_message(trusted) == encode_message(checked)
    assert decode_message(encode_message(trusted)) == checked


def test_trusted_construction_checks_the_field_names_only() -> None:
    with pytest.raises(UsageError, match="stored: fields"):
        Stored.trusted(report=RID, ack=b"a")  # no default filled in: every field named
    with pytest.raises(UsageError, match="deliver_inline: fields"):
        DeliverInline.trusted(token=b"t", data=b"d", extra=1)


@pytest.mark.parametrize(
    ("cls", "fields"),
    [
        (Stored, {"report": RID[:15], "ack": b"a", "released": []}),
        (Stored, {"report": RID, "ack": b"a", "released": [RID] * (MAX_INLINE_TOKENS + 1)}),
        (DeliverInline, {"token": b"t", "data": b""}),
        (DeliverInline, {"token": b"t", "data": b"d" * (MAX_INLINE_CIPHERTEXT + 1)}),
        (Chunk, {"data": b"c" * (MAX_CHUNK_DATA + 1)}),
        (Chunk, {"data": "text"}),
    ],
)
def test_untrusted_construction_still_checks(cls: type[Message], fields: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        cls(**fields)
