"""The typed fast path of token and report-header decoding agrees with the schema.

``ReleaseToken.decode`` and ``ReportHeader.decode`` first try one msgspec decode into
typed fields (tisa.encoding.typed_decoder) and hand anything it does not accept to the
schema path (``enc.unpack`` + ``enc.check_map``). Here both paths meet valid encodings
(the fast path must take them and give the same value), every field set to a bad value,
non-canonical forms, and byte-level mutations: the decoder as a whole must accept or
refuse exactly as the schema does, with the same ProtocolError detail, and the fast path
alone must never accept what the schema refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
from conftest import make_trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.envelope import split_envelope
from tisa.errors import ProtocolError
from tisa.limits import MAX_HEADER, MAX_NAME
from tisa.prekeys import MAX_PREKEY_SIZE, Prekey, PrekeyKind, PrekeySecret
from tisa.report import MAX_RECIPIENTS, ReportHeader, seal_report
from tisa.token import MAX_TOKEN_SIZE, ReleaseToken, issue_token

ARRANGEMENT, SECRETS = make_trio()
NOW = 1_420_000_000


def _prekey(kind: PrekeyKind) -> bytes:
    secret = PrekeySecret.generate(kind, created=NOW - 60, not_after=NOW + 86400)
    return secret.publish(SECRETS["tokyo"], "tokyo", ARRANGEMENT)


def _token_arguments(**changes: Any) -> dict[str, Any]:
    return {
        "recipient": "tokyo",
        "report_id": bytes(range(16)),
        "digest": bytes(range(32)),
        "size": 1089,
        "content_key": bytes(range(32, 64)),
        "scope": "missile",
        "level": "secret",
        "not_before": NOW,
        "not_after": NOW + 3600,
        "counter": 7,
        "signed_prekey": _prekey(PrekeyKind.SIGNED),
        "one_time_prekey": _prekey(PrekeyKind.ONE_TIME),
        **changes,
    }


def _token(**changes: Any) -> bytes:
    return issue_token(SECRETS["seoul"], "seoul", ARRANGEMENT, **_token_arguments(**changes))


TOKENS = {
    "one_time": _token(),
    "signed": _token(one_time_prekey=None),
    "request": _token(request=bytes(range(100, 116))),
}
BODY = enc.unpack(enc.unpack(TOKENS["one_time"])["body"])
BODY_WITH_REQUEST = enc.unpack(enc.unpack(TOKENS["request"])["body"])
HEADER = seal_report(
    SECRETS["seoul"], "seoul", ARRANGEMENT, recipients=["tokyo"], scope="missile",
    level="secret", body=b"x" * 100, now=NOW,
).header.to_dict()  # fmt: skip

# Values that every field of one type or another refuses (and a few it accepts).
BAD_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 2**32, 2**32 + 1, 2**63, 2**63 + 1, 2**64 - 1, 1.5,
    "", "x", "x" * MAX_NAME, "x" * (MAX_NAME + 1), "한" * (MAX_NAME // 3 + 1), "a\x00",
    "a\x1f", "a\x7f", "one_time", "signed", "identity", "other",
    b"", bytes(15), bytes(16), bytes(17), bytes(31), bytes(32), bytes(33), bytes(48),
    [], ["tokyo"], {}, {"a": 1},
]  # fmt: skip


def _envelope(body: bytes) -> bytes:
    return enc.pack({"body": body, "sig": bytes(64)})


def _packb(value: Any) -> bytes:
    # msgpack keeps the map order it is given and encodes floats: for non-canonical input.
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _outcome(decode: Callable[[bytes], Any], data: bytes) -> tuple[str, Any]:
    try:
        value = decode(data)
    except ProtocolError as exc:
        return "refused", exc.detail
    return "ok", value


def _mutations(data: bytes) -> Iterator[bytes]:
    # At every byte: two bit flips (low and high), the byte deleted, the byte doubled.
    for i in range(len(data)):
        yield data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        yield data[:i] + bytes([data[i] ^ 0x80]) + data[i + 1 :]
        yield data[:i] + data[i + 1 :]
        yield data[:i] + data[i : i + 1] + data[i:]


def _token_state(token: ReleaseToken) -> tuple[Any, ...]:
    return (
        dataclasses.astuple(token),
        token.encoded,
        token.body,
        token.signature,
        token.associated_data,
    )


def _check_envelope(
    kind: Any, max_size: int, state: Callable[[Any], tuple[Any, ...]], data: bytes
) -> None:
    """``kind.decode`` agrees with ``kind._decode_schema`` on ``data``, and its typed
    path alone never accepts what the schema refuses."""
    got = _outcome(kind.decode, data)
    expected = _outcome(kind._decode_schema, data)
    assert got[0] == expected[0], (got, expected)
    if got[0] == "ok":
        assert state(got[1]) == state(expected[1])
    else:
        assert got[1] == expected[1]
    split = split_envelope(data, max_size=max_size)
    if split is not None:
        fast = kind._decode_typed(data, *split)
        if fast is not None:
            assert expected[0] == "ok" and state(fast) == state(expected[1])


def _check_token(data: bytes) -> None:
    _check_envelope(ReleaseToken, MAX_TOKEN_SIZE, _token_state, data)


def _header_schema(data: bytes) -> ReportHeader:
    return ReportHeader.from_dict(enc.unpack(data, max_size=MAX_HEADER))


def _check_header(data: bytes) -> None:
    got = _outcome(ReportHeader.decode, data)
    expected = _outcome(_header_schema, data)
    assert got == expected
    fast = ReportHeader._decode_typed(data)
    if fast is not None:
        assert expected == ("ok", fast)


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_a_valid_token_takes_the_typed_path_and_decodes_the_same(name: str) -> None:
    data = TOKENS[name]
    split = split_envelope(data, max_size=MAX_TOKEN_SIZE)
    assert split is not None
    fast = ReleaseToken._decode_typed(data, *split)
    assert fast is not None and fast._from_encoding
    assert _token_state(fast) == _token_state(ReleaseToken._decode_schema(data))
    assert _token_state(ReleaseToken.decode(data)) == _token_state(fast)


def test_a_valid_header_takes_the_typed_path_and_decodes_the_same() -> None:
    for header in (
        HEADER,
        {**HEADER, "recipients": ["a", "tokyo", "é"], "attachments": [
            {"name": "map.png", "size": 10}, {"name": "é", "size": 0}]},
    ):  # fmt: skip
        data = enc.pack(header)
        fast = ReportHeader._decode_typed(data)
        assert fast is not None
        assert fast == _header_schema(data) == ReportHeader.decode(data)


TOKEN_FIELDS = sorted(BODY_WITH_REQUEST)


@pytest.mark.parametrize("field", TOKEN_FIELDS)
def test_every_bad_token_field_is_refused_as_the_schema_refuses_it(field: str) -> None:
    for base in (BODY, BODY_WITH_REQUEST):
        for value in BAD_VALUES:
            _check_token(_envelope(_packb({**base, field: value})))
        missing = {k: v for k, v in base.items() if k != field}
        _check_token(_envelope(_packb(missing)))


@pytest.mark.parametrize("field", ["eph", "mode", "opk", "sealed", "spk"])
def test_every_bad_wrap_field_is_refused_as_the_schema_refuses_it(field: str) -> None:
    wraps = [BODY["wrap"], enc.unpack(enc.unpack(TOKENS["signed"])["body"])["wrap"]]
    for wrap in wraps:
        for value in BAD_VALUES:
            _check_token(_envelope(_packb({**BODY, "wrap": {**wrap, field: value}})))
        missing = {k: v for k, v in wrap.items() if k != field}
        _check_token(_envelope(_packb({**BODY, "wrap": missing})))
        _check_token(_envelope(_packb({**BODY, "wrap": {**wrap, "zz": 1}})))


def test_token_rules_across_fields_and_non_canonical_forms() -> None:
    cases = [
        {**BODY, "not_after": BODY["not_before"]},
        {**BODY, "not_after": BODY["not_before"] - 1},
        {**BODY, "counter": 2**63},
        {**BODY, "counter": 2**63 + 1},
        {**BODY, "request": None},
        {**BODY, "extra": 1},
        {**BODY, "wrap": {**BODY["wrap"], "mode": "signed"}},
        {**BODY, "wrap": {**BODY["wrap"], "mode": "identity"}},
        {**BODY, "wrap": {**BODY["wrap"], "opk": None}},
        {**BODY, "wrap": {**BODY["wrap"], "spk": None, "opk": None, "mode": "identity"}},
        {**BODY, "wrap": [1, 2]},
        dict(reversed(BODY.items())),
        {**BODY, "wrap": dict(reversed(BODY["wrap"].items()))},
    ]
    for body in cases:
        _check_token(_envelope(_packb(body)))
    # A long form of an integer, and str where bin belongs: not canonical.
    canonical = enc.pack(BODY)
    _check_token(_envelope(canonical.replace(b"\xa7counter\x07", b"\xa7counter\xcc\x07")))
    _check_token(_envelope(canonical.replace(b"\xa2id\xc4\x10", b"\xa2id\xb0")))
    # Nothing that is not a map, nesting, trailing bytes.
    for body in (b"", b"\xc0", _packb([1]), canonical + b"\x00", canonical[:-1]):
        _check_token(_envelope(body))


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_byte_mutations_of_a_token_decode_as_the_schema_decodes_them(name: str) -> None:
    data = TOKENS[name]
    for mutated in _mutations(enc.unpack(data)["body"]):
        _check_token(_envelope(mutated))
    for i in range(0, len(data), 7):
        _check_token(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])


@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(TOKEN_FIELDS), st.sampled_from(BAD_VALUES)), max_size=3
    ),
    with_request=st.booleans(),
)
def test_random_token_fields_decode_as_the_schema_decodes_them(
    changes: list[tuple[str, Any]], with_request: bool
) -> None:
    body = dict(BODY_WITH_REQUEST if with_request else BODY)
    body.update(changes)
    _check_token(_envelope(_packb(dict(sorted(body.items())))))


HEADER_VALUES: list[Any] = [
    *BAD_VALUES,
    ["b", "a"], ["a", "a"], ["a", "b"], ["a"] * (MAX_RECIPIENTS + 1),
    [f"r{i:03}" for i in range(MAX_RECIPIENTS)], ["a\x00"], [""], [1],
    [{"name": "a", "size": 1}, {"name": "a", "size": 2}], [{"name": "a"}],
    [{"name": "a", "size": 1, "x": 1}], [{"name": "a", "size": -1}],
    [{"name": "a", "size": 2**32 * 4 + 1}], [{"name": "", "size": 1}],
    [{"name": f"a{i}", "size": 1} for i in range(65)], [{"size": 1, "name": "a"}],
]  # fmt: skip


@pytest.mark.parametrize("field", sorted(HEADER))
def test_every_bad_header_field_is_refused_as_the_schema_refuses_it(field: str) -> None:
    for value in HEADER_VALUES:
        _check_header(_packb({**HEADER, field: value}))
    _check_header(_packb({k: v for k, v in HEADER.items() if k != field}))
    _check_header(_packb({**HEADER, "zz": 1}))
    _check_header(_packb(dict(reversed(HEADER.items()))))


def test_byte_mutations_of_a_header_decode_as_the_schema_decodes_them() -> None:
    data = enc.pack(
        {**HEADER, "recipients": ["a", "tokyo"], "attachments": [{"name": "m", "size": 3}]}
    )
    for mutated in _mutations(data):
        _check_header(mutated)


@settings(max_examples=300, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(sorted(HEADER)), st.sampled_from(HEADER_VALUES)), max_size=3
    )
)
def test_random_header_fields_decode_as_the_schema_decodes_them(
    changes: list[tuple[str, Any]],
) -> None:
    header = dict(HEADER)
    header.update(changes)
    _check_header(_packb(dict(sorted(header.items()))))


@pytest.mark.parametrize(
    "value",
    ["a", "x" * MAX_NAME, "x" * (MAX_NAME + 1), "한" * 42, "한" * 43, "", "a\x00", "\x1f",
     "a\x7f", "\ud800", "tab\there", "é"],
)  # fmt: skip
def test_is_text_agrees_with_the_text_checker(value: str) -> None:
    try:
        enc.text(MAX_NAME)(value, "name")
        accepted = True
    except ProtocolError:
        accepted = False
    assert enc.is_text(value, MAX_NAME) is accepted
    assert enc.are_texts([value], MAX_NAME) is accepted
    assert enc.are_texts(["tokyo", value, "é"], MAX_NAME) is accepted
    assert enc.are_texts([value, "x" * (MAX_NAME + 1)], MAX_NAME) is False


def test_are_texts_on_ascii_is_the_text_checker_for_every_character() -> None:
    # The ASCII shortcut (isprintable) stands for the control-character search.
    for code in range(128):
        value = "a" + chr(code) + "b"
        assert enc.are_texts([value, "tokyo"], MAX_NAME) is enc.is_text(value, MAX_NAME)
    assert enc.are_texts(["tokyo", ""], MAX_NAME) is False
    assert enc.are_texts(["x" * 64, "y" * 64], MAX_NAME) is True
    assert enc.are_texts(["x" * 65, "y" * 64], MAX_NAME) is True  # each within the limit
    assert enc.are_texts(["x" * (MAX_NAME + 1)], MAX_NAME) is False


def test_slot_builder_makes_what_init_makes_and_refuses_a_class_it_cannot_build() -> None:
    token = ReleaseToken.decode(TOKENS["request"])
    values = [getattr(token, name) for name in ReleaseToken.__slots__]
    rebuilt = enc.slot_builder(ReleaseToken, ReleaseToken.__slots__)(*values)
    assert _token_state(rebuilt) == _token_state(token)
    with pytest.raises(TypeError, match="slots"):
        enc.slot_builder(ReleaseToken, ("id", "arrangement"))
    with pytest.raises(TypeError):
        enc.slot_builder(ReleaseToken, ReleaseToken.__slots__)(*values[:-1])

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            raise AssertionError

    with pytest.raises(TypeError, match="__post_init__"):
        enc.slot_builder(Checked, ("value",))


PREKEY = _prekey(PrekeyKind.SIGNED)
PREKEY_BODY = enc.unpack(enc.unpack(PREKEY)["body"])
# X25519 keys of low order (tisa._sodium's list): the prekey's own check after decoding.
LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"), (2**255 - 20).to_bytes(32, "little")]


def _prekey_state(prekey: Prekey) -> tuple[Any, ...]:
    return dataclasses.astuple(prekey), prekey.encoded, prekey.body, prekey.signature


def _check_prekey(data: bytes) -> None:
    _check_envelope(Prekey, MAX_PREKEY_SIZE, _prekey_state, data)


def test_a_valid_prekey_takes_the_typed_path_and_decodes_the_same() -> None:
    for data in (PREKEY, _prekey(PrekeyKind.ONE_TIME)):
        split = split_envelope(data, max_size=MAX_PREKEY_SIZE)
        assert split is not None
        fast = Prekey._decode_typed(data, *split)
        assert fast is not None
        assert _prekey_state(fast) == _prekey_state(Prekey._decode_schema(data))


@pytest.mark.parametrize("field", sorted(PREKEY_BODY))
def test_every_bad_prekey_field_is_refused_as_the_schema_refuses_it(field: str) -> None:
    for value in [*BAD_VALUES, *LOW_ORDER]:
        _check_prekey(_envelope(_packb({**PREKEY_BODY, field: value})))
    _check_prekey(_envelope(_packb({k: v for k, v in PREKEY_BODY.items() if k != field})))
    _check_prekey(_envelope(_packb({**PREKEY_BODY, "zz": 1})))
    _check_prekey(_envelope(_packb(dict(reversed(PREKEY_BODY.items())))))
    _check_prekey(_envelope(_packb({**PREKEY_BODY, "not_after": PREKEY_BODY["created"]})))


def test_byte_mutations_of_a_prekey_decode_as_the_schema_decodes_them() -> None:
    for mutated in _mutations(enc.unpack(PREKEY)["body"]):
        _check_prekey(_envelope(mutated))
    for mutated in _mutations(PREKEY):
        _check_prekey(mutated)


def _both_ways(monkeypatch: pytest.MonkeyPatch, make: Callable[[], bytes]) -> None:
    """``make`` gives the same bytes, or the same error, with and without the typed path
    of the builders (issue_token's body, the sealer's header)."""
    from tisa import token

    def outcome() -> tuple[str, Any]:
        try:
            return "ok", make()
        except Exception as exc:  # the type and detail are compared
            return type(exc).__name__, str(exc)

    typed = outcome()
    with monkeypatch.context() as patch:
        patch.setattr(token, "_encode_body_typed", lambda *args: None)
        patch.setattr(enc, "is_plain", lambda value: False)
        schema = outcome()
    assert typed == schema


class _Text(str):
    pass


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"request": bytes(16)},
        {"one_time_prekey": None},
        {"report_id": bytes(15)},
        {"report_id": bytearray(16)},
        {"digest": bytes(33)},
        {"digest": memoryview(bytes(32))},
        {"size": 0},
        {"size": True},
        {"size": 2**40},
        {"counter": 2**63},
        {"counter": 2**63 + 1},
        {"counter": 2**70},
        {"request": bytes(15)},
        {"request": b""},
        {"scope": _Text("missile")},
        {"not_after": NOW + 3600 + 0.5},
    ],
    ids=repr,
)
def test_issue_token_typed_path_gives_the_schema_paths_bytes_or_error(
    monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any]
) -> None:
    kwargs = _token_arguments(
        token_id=bytes(range(50, 66)), _ephemeral=bytes(range(70, 102)), **changes
    )
    _both_ways(monkeypatch, lambda: issue_token(SECRETS["seoul"], "seoul", ARRANGEMENT, **kwargs))


def test_a_valid_token_body_takes_the_typed_path() -> None:
    from tisa import token

    body = {k: v for k, v in BODY.items() if k != "wrap"}
    made = token._encode_body_typed(
        body, bytes(32), SECRETS["tokyo"].public.encryption.raw, [None, None], None
    )
    assert made is not None and token._typed_body(made) is not None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"attachments": [("map.png", 10), ("é", 0)]},
        {"attachments": [("a", 1), ("a", 2)]},
        {"attachments": [("a\x00", 1)]},
        {"attachments": [("", 1)]},
        {"attachments": [("x" * (MAX_NAME + 1), 1)]},
        {"attachments": [("a", 2**40)]},
        {"body_size": 2**40},
        {"now": -1},
        {"now": True},
        {"now": 2**64},
        {"_report_id": bytes(15)},
        {"_report_id": bytearray(16)},
        {"recipients": ["tokyo", _Text("seoul")]},
    ],
    ids=repr,
)
def test_sealer_typed_header_gives_the_schema_paths_bytes_or_error(
    monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any]
) -> None:
    from tisa.report import ReportSealer

    kwargs: dict[str, Any] = {
        "recipients": ["tokyo"],
        "scope": "missile",
        "level": "secret",
        "body_size": 100,
        "now": NOW,
        "_report_id": bytes(range(16)),
        "_content_key": bytes(range(32, 64)),
        **changes,
    }

    def header() -> bytes:
        sealer = ReportSealer(SECRETS["seoul"], "seoul", ARRANGEMENT, **kwargs)
        return sealer._header_bytes

    _both_ways(monkeypatch, header)


def test_a_valid_header_is_encoded_by_the_typed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from tisa import report

    def refuse(value: Any) -> ReportHeader:
        raise AssertionError("the schema path was taken")

    monkeypatch.setattr(ReportHeader, "from_dict", refuse)
    assert report._encode_header(HEADER) == enc.pack(HEADER)
