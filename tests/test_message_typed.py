"""tisa.messages.decode_message: a ``submit_inline`` decoded straight into its typed value
accepts exactly what the schema's path accepts, and refuses the rest with its error."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tisa.messages
from tisa.errors import ProtocolError
from tisa.limits import MAX_INLINE_CIPHERTEXT, MAX_INLINE_TOKENS
from tisa.messages import Message, SubmitInline, decode_message, encode_message
from tisa.token import MAX_TOKEN_SIZE

_schema = tisa.messages._decode_by_schema


def _outcome(decode: Any, data: bytes, max_size: int | None = None) -> object:
    try:
        return decode(data, max_size=max_size)
    except ProtocolError as exc:
        return ("refused", exc.detail)


def _same(data: bytes, max_size: int | None = None) -> object:
    typed = _outcome(decode_message, data, max_size)
    assert typed == _outcome(_schema, data, max_size)
    if isinstance(typed, Message):
        assert encode_message(typed) == data
    return typed


def _submit(**fields: Any) -> SubmitInline:
    values: dict[str, Any] = {
        "report": bytes(range(16)),
        "digest": bytes(range(32)),
        "expires": 1_700_000_000,
        "data": b"\xaa" * 1100,
        "tokens": [b"\x01" * 600],
    }
    values.update(fields)
    return SubmitInline(**values)


_VALID = [
    _submit(),
    _submit(data=b"d", tokens=[]),
    _submit(data=b"d" * MAX_INLINE_CIPHERTEXT, tokens=[b""] * MAX_INLINE_TOKENS),
    _submit(tokens=[b"t" * MAX_TOKEN_SIZE, b"u"]),
    _submit(expires=0),
    _submit(expires=2**64 - 1),  # beyond the typed value's int64: the schema's path
]


@pytest.mark.parametrize("message", _VALID)
def test_valid_submissions_decode_the_same_on_both_paths(message: SubmitInline) -> None:
    assert _same(encode_message(message)) == message


def test_the_typed_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_schema(data: bytes, *, max_size: int | None = None) -> Message:
        raise AssertionError("decoded by the schema's path")

    monkeypatch.setattr(tisa.messages, "_decode_by_schema", no_schema)
    for message in _VALID[:-1]:
        assert decode_message(encode_message(message)) == message


def _packed(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def _map(**changes: Any) -> dict[str, Any]:
    value = {**_submit().to_dict(), **changes}
    return {key: value[key] for key in sorted(value) if value[key] is not ...}


@pytest.mark.parametrize(
    "data",
    [
        _packed(_map(data=b"")),
        _packed(_map(data=b"d" * (MAX_INLINE_CIPHERTEXT + 1))),
        _packed(_map(digest=b"d" * 31)),
        _packed(_map(report=b"r" * 17)),
        _packed(_map(expires=-1)),
        _packed(_map(expires=True)),
        _packed(_map(tokens=[b"t"] * (MAX_INLINE_TOKENS + 1))),
        _packed(_map(tokens=[b"t" * (MAX_TOKEN_SIZE + 1)])),
        _packed(_map(tokens=["text"])),
        _packed(_map(tokens=b"t")),
        _packed(_map(data="text")),
        _packed(_map(t="submit")),
        _packed(_map(extra=1)),
        _packed(_map(tokens=...)),
        _packed({"tokens": [], **_map(tokens=...)}),  # keys out of order
        _packed(_map(expires=1.5)),
        encode_message(_submit())[:-1],
        encode_message(_submit()) + b"\x00",
    ],
)
def test_refusals_are_the_schemas(data: bytes) -> None:
    assert isinstance(_same(data), tuple)


def test_a_long_form_is_refused_as_before() -> None:
    good = encode_message(_submit(expires=5))
    # 5 as a uint 8 (0xcc 0x05) instead of a positive fixint: not canonical.
    longer = good.replace(b"\xa7expires\x05", b"\xa7expires\xcc\x05")
    assert longer != good and isinstance(_same(longer), tuple)


def test_the_size_limit_is_checked_first() -> None:
    data = encode_message(_submit())
    assert _same(data, max_size=len(data)) == _submit()
    assert _same(data, max_size=len(data) - 1) == (
        "refused",
        f"encoded value too large: {len(data)} > {len(data) - 1}",
    )


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_mutation_is_decided_the_same_on_both_paths(data: st.DataObject) -> None:
    encoded = bytearray(encode_message(_submit(data=b"\x07" * 20, tokens=[b"\x08" * 9])))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    _same(bytes(encoded))
