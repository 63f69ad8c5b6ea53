"""Canonical msgpack (:func:`tisa.encoding.pack` / :func:`~tisa.encoding.unpack`) and the
schema checkers.

Every refusal must be a :class:`~tisa.errors.ProtocolError` and nothing else: the parser
faces bytes from other parties, so any other exception would be a crash of the node.
Non-canonical inputs are written out byte by byte, since :func:`pack` cannot make them.
"""

from __future__ import annotations

import functools
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.errors import ProtocolError

# --- strategies -------------------------------------------------------------------------

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT_MIN, INT_MAX),
    # Edges of every msgpack integer width, where a non-minimal form would hide.
    st.sampled_from(
        [
            *(0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, INT_MAX),
            *(-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, INT_MIN),
        ]
    ),
    st.binary(max_size=40),
    st.text(max_size=20),
)


@functools.cache
def values(depth: int) -> st.SearchStrategy[Any]:
    """Allowed values nested at most ``depth`` containers deep."""
    if depth == 0:
        return scalars
    inner = values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    )


# The top-level map counts as depth 0 and the encoder allows values down to MAX_DEPTH.
maps = st.dictionaries(st.text(max_size=8), values(3), max_size=6)
deep_maps = st.dictionaries(st.text(max_size=3), values(enc.MAX_DEPTH - 1), max_size=3)


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types (``True == 1`` and ``b"" != ""`` matter here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def decodes_or_refuses(data: bytes) -> dict[str, Any] | None:
    """Unpack ``data``; a ProtocolError gives None, any other exception fails the test."""
    try:
        value = enc.unpack(data)
    except ProtocolError:
        return None
    # Whatever is accepted is the one canonical encoding of what it decodes to.
    assert enc.pack(value) == data
    return value


# --- hand-made msgpack ------------------------------------------------------------------


def s(text: str) -> bytes:
    """A fixstr."""
    raw = text.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def fixmap(n: int) -> bytes:
    return bytes([0x80 | n])


# --- round trips ------------------------------------------------------------------------


@given(maps)
def test_round_trip(value: dict[str, Any]) -> None:
    data = enc.pack(value)
    assert same(enc.unpack(data), value)


@given(deep_maps)
@settings(max_examples=50)
def test_round_trip_nested_to_the_depth_limit(value: dict[str, Any]) -> None:
    assert same(enc.unpack(enc.pack(value)), value)


@given(maps, st.randoms(use_true_random=False))
def test_pack_ignores_insertion_order(value: dict[str, Any], rnd: Any) -> None:
    keys = list(value)
    rnd.shuffle(keys)
    assert enc.pack({k: value[k] for k in keys}) == enc.pack(value)


def test_pack_exact_bytes() -> None:
    value = {"n": None, "b": b"\x00", "t": "x", "i": -1, "l": [True, 200], "m": {}}
    assert enc.pack(value) == (
        fixmap(6)
        + s("b") + b"\xc4\x01\x00"  # bytes are bin, even when short
        + s("i") + b"\xff"
        + s("l") + b"\x92\xc3\xcc\xc8"
        + s("m") + b"\x80"
        + s("n") + b"\xc0"
        + s("t") + s("x")
    )  # fmt: skip


def test_keys_sorted_by_utf8_bytes() -> None:
    data = enc.pack({"é": 1, "aa": 2, "a": 3, "B": 4, "": 5})
    order = [k for k in msgpack.unpackb(data, raw=False)]
    assert order == ["", "B", "a", "aa", "é"]


def test_tuples_pack_as_lists() -> None:
    assert enc.pack({"x": (1, 2)}) == enc.pack({"x": [1, 2]})


def test_unpack_accepts_bytes_like() -> None:
    data = enc.pack({"a": 1})
    assert enc.unpack(bytearray(data)) == {"a": 1}
    assert enc.unpack(memoryview(data)) == {"a": 1}


# --- pack refuses what the protocol does not carry --------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"f": 1.0},
        {"f": [0.5]},
        {"s": {1, 2}},
        {"s": frozenset()},
        {"b": bytearray(b"x")},
        {"b": memoryview(b"x")},
        {"o": object()},
        {1: "int key"},
        {b"k": "bytes key"},
        {None: "nil key"},
        {"n": {2: "nested int key"}},
        {"big": 2**64},
        {"small": -(2**63) - 1},
        {"surrogate": "\ud800"},
        {"\udfff": "surrogate key"},
    ],
    ids=repr,
)
def test_pack_refuses(value: Any) -> None:
    with pytest.raises(ProtocolError):
        enc.pack(value)


def nest(depth: int, leaf: Any = 0) -> dict[str, Any]:
    """``{"x": [[...[leaf]...]]}`` with ``leaf`` sitting ``depth`` levels below the top."""
    value: Any = leaf
    for _ in range(depth - 1):
        value = [value]
    return {"x": value}


def test_depth_limit_pack_and_unpack() -> None:
    ok = nest(enc.MAX_DEPTH)
    assert enc.unpack(enc.pack(ok)) == ok
    # One level more, or an empty container where the scalar was, is refused both ways.
    for too_deep in (nest(enc.MAX_DEPTH + 1), nest(enc.MAX_DEPTH, []), nest(enc.MAX_DEPTH, {})):
        with pytest.raises(ProtocolError, match="deep"):
            enc.pack(too_deep)
    # The same over the wire, written by hand since pack refuses it.
    lists = fixmap(1) + s("x") + b"\x91" * (enc.MAX_DEPTH - 1)
    assert enc.unpack(lists + b"\x00") == ok
    for deep in (
        lists + b"\x91\x00",
        lists + b"\x90",
        lists + b"\x80",
        fixmap(1) + s("x") + b"\x81\xa1x" * (enc.MAX_DEPTH - 1) + b"\x80",
        fixmap(1) + s("x") + b"\x91" * 500 + b"\x00",
    ):
        with pytest.raises(ProtocolError, match="deep"):
            enc.unpack(deep)


def test_very_deep_input_is_a_protocol_error() -> None:
    for data in (b"\x91" * 100_000, fixmap(1) + s("a") + b"\x81\xa1a" * 50_000 + b"\xc0"):
        with pytest.raises(ProtocolError):
            enc.unpack(data)


# --- unpack refuses everything but one canonical map ------------------------------------

ONE = fixmap(1) + s("a") + b"\x01"  # {"a": 1}

REFUSED = {
    # duplicate keys, which msgpack-python would silently collapse
    "duplicate key": fixmap(2) + s("a") + b"\x01" + s("a") + b"\x02",
    "duplicate key, same value": fixmap(2) + s("a") + b"\x01" + s("a") + b"\x01",
    "duplicate key, nested": fixmap(1) + s("m") + fixmap(2) + s("k") + b"\xc0" + s("k") + b"\xc0",
    "duplicate key, in a list": fixmap(1) + s("l") + b"\x91" + fixmap(2) + (s("k") + b"\x00") * 2,
    # keys that are not text
    "int key": fixmap(1) + b"\x01\x01",
    "bin key": fixmap(1) + b"\xc4\x01a\x01",
    "nil key": fixmap(1) + b"\xc0\x01",
    "bool key": fixmap(1) + b"\xc3\x01",
    "array key": fixmap(1) + b"\x91\x01\x01",
    "map key": fixmap(1) + fixmap(0) + b"\x01",
    "nested bin key": fixmap(1) + s("m") + fixmap(1) + b"\xc4\x01k\x01",
    # extension types, the timestamp (-1) included
    "fixext1": fixmap(1) + s("a") + b"\xd4\x01\x00",
    "fixext16": fixmap(1) + s("a") + b"\xd8\x05" + bytes(16),
    "ext8": fixmap(1) + s("a") + b"\xc7\x02\x07ab",
    "ext8 empty": fixmap(1) + s("a") + b"\xc7\x00\x07",
    "timestamp32": fixmap(1) + s("a") + b"\xd6\xff\x00\x00\x00\x01",
    "timestamp bad length": fixmap(1) + s("a") + b"\xd5\xff\x00\x00",
    "timestamp in a list": fixmap(1) + s("a") + b"\x92\x01\xd6\xff\x00\x00\x00\x01",
    "timestamp64": fixmap(1) + s("a") + b"\xd7\xff" + bytes(8),
    # floats, even integral ones
    "float32": fixmap(1) + s("a") + b"\xca\x3f\x80\x00\x00",
    "float64": fixmap(1) + s("a") + b"\xcb" + bytes(8),
    "float in list": fixmap(1) + s("a") + b"\x91\xca" + bytes(4),
    "float nan": fixmap(1) + s("a") + b"\xcb\x7f\xf8" + bytes(6),
    # float64 re-encodes to the same bytes, so only a look at every value finds it
    "float64 two lists down": fixmap(1) + s("a") + b"\x91\x91\xcb" + bytes(8),
    "float64 in a map in a list": fixmap(1)
    + s("a")
    + b"\x91"
    + fixmap(1)
    + s("f")
    + b"\xcb"
    + bytes(8),
    "float64 deep": fixmap(1) + s("a") + b"\x91" * 6 + b"\xcb" + bytes(8),
    # trailing bytes
    "trailing zero": ONE + b"\x00",
    "two maps": ONE + ONE,
    "trailing nil": ONE + b"\xc0",
    # integers not in their shortest form
    "uint8 for fixint": fixmap(1) + s("a") + b"\xcc\x01",
    "uint16 for fixint": fixmap(1) + s("a") + b"\xcd\x00\x01",
    "uint32 for fixint": fixmap(1) + s("a") + b"\xce\x00\x00\x00\x01",
    "uint64 for fixint": fixmap(1) + s("a") + b"\xcf" + bytes(7) + b"\x01",
    "uint16 for uint8": fixmap(1) + s("a") + b"\xcd\x00\xc8",
    "uint64 for uint32": fixmap(1) + s("a") + b"\xcf\x00\x00\x00\x00\xff\xff\xff\xff",
    "int8 for positive fixint": fixmap(1) + s("a") + b"\xd0\x05",
    "int8 for negative fixint": fixmap(1) + s("a") + b"\xd0\xff",
    "int16 for int8": fixmap(1) + s("a") + b"\xd1\xff\x80",
    "int64 for negative fixint": fixmap(1) + s("a") + b"\xd3" + b"\xff" * 8,
    "int16 for positive": fixmap(1) + s("a") + b"\xd1\x01\x00",
    # lengths not in their shortest form
    "str8 for fixstr": fixmap(1) + s("a") + b"\xd9\x01x",
    "str16 for fixstr": fixmap(1) + s("a") + b"\xda\x00\x01x",
    "str32 key": fixmap(1) + b"\xdb\x00\x00\x00\x01a" + b"\x01",
    "bin16 for bin8": fixmap(1) + s("a") + b"\xc5\x00\x01x",
    "bin32 for bin8": fixmap(1) + s("a") + b"\xc6\x00\x00\x00\x01x",
    "array16 for fixarray": fixmap(1) + s("a") + b"\xdc\x00\x01\x01",
    "array32 for fixarray": fixmap(1) + s("a") + b"\xdd\x00\x00\x00\x00",
    "map16 for fixmap": b"\xde\x00\x01" + s("a") + b"\x01",
    "map32 for fixmap": b"\xdf\x00\x00\x00\x00",
    # keys out of order
    "unsorted keys": fixmap(2) + s("b") + b"\x01" + s("a") + b"\x02",
    "unsorted nested keys": fixmap(1) + s("m") + fixmap(2) + s("y") + b"\x01" + s("x") + b"\x02",
    "sorted by length, not bytes": fixmap(2) + s("b") + b"\x01" + s("aa") + b"\x02",
    "sorted by code point of a folded case": fixmap(2) + s("a") + b"\x01" + s("B") + b"\x02",
    # text that is not UTF-8
    "str with invalid utf-8": fixmap(1) + s("a") + b"\xa1\xff",
    "str with utf-8 surrogate": fixmap(1) + s("a") + b"\xa3\xed\xa0\x80",
    "str with overlong utf-8": fixmap(1) + s("a") + b"\xa2\xc0\x80",
    "key with invalid utf-8": fixmap(1) + b"\xa1\xfe\x01",
    # not a map at all
    "empty": b"",
    "nil": b"\xc0",
    "int": b"\x01",
    "array": b"\x91\x01",
    "empty array": b"\x90",
    "str": s("a"),
    "bin": b"\xc4\x01a",
    "reserved 0xc1": b"\xc1",
    "map holding 0xc1": fixmap(1) + s("a") + b"\xc1",
    # truncated
    "map header only": fixmap(1),
    "key only": fixmap(1) + s("a"),
    "short str": fixmap(1) + s("a") + b"\xa3xy",
    "short bin": fixmap(1) + s("a") + b"\xc4\x05abc",
    "short uint32": fixmap(1) + s("a") + b"\xce\x00\x00",
    "short map16 header": b"\xde\x00",
    "huge declared length": fixmap(1) + s("a") + b"\xc6\xff\xff\xff\xff",
    "huge declared array": fixmap(1) + s("a") + b"\xdd\xff\xff\xff\xff",
}


@pytest.mark.parametrize("data", list(REFUSED.values()), ids=list(REFUSED))
def test_unpack_refuses(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        enc.unpack(data)


def test_canonical_forms_of_the_refused_values_are_accepted() -> None:
    # Guards the table above: each refusal is about the form, not the value.
    assert enc.unpack(fixmap(1) + s("a") + b"\xcc\xc8") == {"a": 200}
    assert enc.unpack(fixmap(1) + s("a") + b"\xd0\xdf") == {"a": -33}
    assert enc.unpack(fixmap(1) + s("a") + b"\xc4\x01x") == {"a": b"x"}
    assert enc.unpack(fixmap(2) + s("B") + b"\x02" + s("a") + b"\x01") == {"a": 1, "B": 2}
    assert enc.unpack(fixmap(2) + s("aa") + b"\x02" + s("b") + b"\x01") == {"aa": 2, "b": 1}


@pytest.mark.parametrize("data", ["text", 1, None, [1], {"a": 1}], ids=repr)
def test_unpack_refuses_non_bytes(data: Any) -> None:
    with pytest.raises(ProtocolError):
        enc.unpack(data)


def test_unpack_max_size() -> None:
    data = enc.pack({"a": b"x" * 100})
    assert enc.unpack(data, max_size=len(data)) == {"a": b"x" * 100}
    with pytest.raises(ProtocolError, match="too large"):
        enc.unpack(data, max_size=len(data) - 1)


# Parsers are fed every way: whole, every prefix, and with something after.


@given(maps)
@settings(max_examples=50)
def test_every_strict_prefix_is_refused(value: dict[str, Any]) -> None:
    data = enc.pack(value)
    for end in range(len(data)):
        with pytest.raises(ProtocolError):
            enc.unpack(data[:end])


@given(maps, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(value: dict[str, Any], extra: bytes) -> None:
    with pytest.raises(ProtocolError):
        enc.unpack(enc.pack(value) + extra)


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_random_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    decodes_or_refuses(data)


@given(st.lists(st.sampled_from(sorted(set(range(0x80, 0x100)) | {0, 1, 0x7F})), max_size=24))
@settings(max_examples=500)
def test_random_type_bytes_decode_or_raise_protocol_error(data: list[int]) -> None:
    # Bytes drawn from msgpack's type markers reach far more parser states than uniform noise.
    decodes_or_refuses(bytes([0x81, 0xA1, 0x61, *data]))


@given(maps, st.data())
@settings(max_examples=300)
def test_mutated_encodings_decode_or_raise_protocol_error(value: dict[str, Any], data: Any) -> None:
    encoded = bytearray(enc.pack(value))
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, len(encoded)))
        action = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "insert":
            encoded[position:position] = bytes([data.draw(st.integers(0, 255))])
        elif position < len(encoded):
            if action == "flip":
                encoded[position] ^= data.draw(st.integers(1, 255))
            else:
                del encoded[position]
    decodes_or_refuses(bytes(encoded))


# --- schema checkers --------------------------------------------------------------------


def refused(check: enc.Field, value: Any, match: str | None = None) -> None:
    with pytest.raises(ProtocolError, match=match):
        check(value, "f")


SCHEMA = {"a": enc.uint(), "b": enc.text(8)}


def test_check_map_accepts_exact_keys_and_returns_a_new_dict() -> None:
    value = {"a": 1, "b": "x"}
    checked = enc.check_map(value, SCHEMA)
    assert checked == value
    assert checked is not value


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"a": 1}, r"missing \['b'\]"),
        ({"a": 1, "b": "x", "c": 0}, r"unexpected \['c'\]"),
        ({}, "missing"),
        ([("a", 1), ("b", "x")], "expected a map"),
        (None, "expected a map"),
        (b"map", "expected a map"),
        ({"a": "1", "b": "x"}, "a: expected an integer"),
        ({"a": 1, "b": b"x"}, "b: expected text"),
    ],
)
def test_check_map_refuses(value: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        enc.check_map(value, SCHEMA)


def test_check_map_names_the_path_of_nested_failures() -> None:
    fields = {"outer": lambda v, p: enc.check_map(v, {"n": enc.uint(3)}, p)}
    with pytest.raises(ProtocolError, match=r"outer\.n: 4 outside 0\.\.3"):
        enc.check_map({"outer": {"n": 4}}, fields)
    with pytest.raises(ProtocolError, match=r"top\.outer: missing"):
        enc.check_map({"outer": {}}, fields, "top")


def test_uint() -> None:
    check = enc.uint(10, 2)
    assert check(2, "f") == 2
    assert check(10, "f") == 10
    for value in (1, 11, -1, True, False, "5", 5.0, None, b"\x05"):
        refused(check, value)
    assert enc.uint()(2**64 - 1, "f") == 2**64 - 1
    refused(enc.uint(), 2**64)
    refused(enc.uint(), -1)


def test_bool_is_never_an_integer() -> None:
    refused(enc.uint(), True, "expected an integer")
    refused(enc.uint(1, 0), False, "expected an integer")
    refused(enc.boolean, 1, "expected a boolean")
    refused(enc.boolean, 0, "expected a boolean")
    refused(enc.boolean, None)
    assert enc.boolean(True, "f") is True
    assert enc.boolean(False, "f") is False


def test_text_length_is_counted_in_utf8_bytes() -> None:
    check = enc.text(8)
    assert check("é" * 4, "f") == "é" * 4  # 8 bytes
    refused(check, "é" * 4 + "a", "length 9")  # 5 characters, 9 bytes
    assert check("a" * 8, "f") == "a" * 8
    refused(check, "a" * 9)
    refused(check, "😀😀a")  # 9 bytes in 3 characters


def test_text_empty_and_control_characters() -> None:
    refused(enc.text(8), "")
    assert enc.text(8, allow_empty=True)("", "f") == ""
    for bad in ("a\x00", "\n", "tab\t", "\x1f", "del\x7f", "\r"):
        refused(enc.text(8), bad, "control character")
    assert enc.text(8)("ok é", "f") == "ok é"


def test_text_refuses_bin_and_lone_surrogates() -> None:
    refused(enc.text(8), b"abc", "expected text")
    refused(enc.text(8), None, "expected text")
    refused(enc.text(8), "\ud800", "not valid Unicode")


def test_bin_exact_and_bin_max() -> None:
    assert enc.bin_exact(4)(b"abcd", "f") == b"abcd"
    for bad in (b"abc", b"abcde", "abcd", bytearray(b"abcd"), None):
        refused(enc.bin_exact(4), bad, "expected 4 bytes")
    assert enc.bin_max(4)(b"", "f") == b""
    assert enc.bin_max(4)(b"abcd", "f") == b"abcd"
    for bad in (b"abcde", "ab", None, 4):
        refused(enc.bin_max(4), bad, "at most 4 bytes")


def test_optional() -> None:
    check = enc.optional(enc.uint(3))
    assert check(None, "f") is None
    assert check(3, "f") == 3
    refused(check, 4)
    refused(check, False)


def test_one_of() -> None:
    check = enc.one_of("x", "y")
    assert check("x", "f") == "x"
    for bad in (b"x", "z", "", None, ["x"], {"x": 1}, 0):
        refused(check, bad, "expected one of")


def test_list_of_limits() -> None:
    check = enc.list_of(enc.uint(), min_items=1, max_items=3)
    assert check([1, 2, 3], "f") == [1, 2, 3]
    refused(check, [], "0 items outside 1..3")
    refused(check, [1, 2, 3, 4], "4 items outside 1..3")
    refused(check, (1, 2), "expected a list")
    refused(check, {"a": 1}, "expected a list")
    refused(check, b"\x01", "expected a list")
    with pytest.raises(ProtocolError, match=r"f\[1\]: expected an integer"):
        check([1, "2"], "f")


def test_list_of_names_the_first_bad_item_without_building_paths_for_good_ones() -> None:
    paths: list[str] = []

    def item(value: Any, path: str) -> Any:
        paths.append(path)
        if value < 0:
            raise ProtocolError(f"{path}: negative")
        return value

    check = enc.list_of(item, max_items=8)
    assert check([1, 2, 3], "f") == [1, 2, 3]
    assert paths == ["f", "f", "f"]  # no "f[i]" built while every item passes
    with pytest.raises(ProtocolError, match=r"^f\[2\]: negative$"):
        check([1, 2, -3, -4], "f")
    # In a map, the message's path is prefixed as before.
    fields: dict[str, enc.Field] = {"l": enc.list_of(enc.uint(9), max_items=4)}
    with pytest.raises(ProtocolError, match=r"^m\.l\[1\]: 10 outside 0\.\.9$"):
        enc.check_map({"l": [1, 10, 11]}, fields, "m")


def test_list_of_unique_and_sorted() -> None:
    unique = enc.list_of(enc.text(8), max_items=8, unique=True)
    assert unique(["b", "a"], "f") == ["b", "a"]
    refused(unique, ["a", "b", "a"], "duplicate")
    maps_unique = enc.list_of(lambda v, p: v, max_items=8, unique=True)
    refused(maps_unique, [{"a": [1]}, {"a": [1]}], "duplicate")
    assert maps_unique([{"a": [1]}, {"a": [2]}], "f") == [{"a": [1]}, {"a": [2]}]
    ordered = enc.list_of(enc.text(8), max_items=8, sorted_=True)
    assert ordered(["B", "a", "aa", "é"], "f") == ["B", "a", "aa", "é"]
    refused(ordered, ["b", "a"], "canonical order")
    refused(ordered, ["é", "z"], "canonical order")  # by UTF-8 bytes: z < é


def test_pack_encodes_str_and_int_subclasses_as_plain_values() -> None:
    from tisa.errors import Reason

    assert enc.pack({"r": Reason.EXPIRED}) == enc.pack({"r": "expired"})
    assert enc.unpack(enc.pack({"r": Reason.EXPIRED})) == {"r": "expired"}


REASONS = {
    "fixext1": "extension types",
    "timestamp32": "extension types",
    "timestamp in a list": "extension types",
    "float32": "floats",
    "float64 deep": "floats",
    "int key": "not a string",
    "nested bin key": "not a string",
    "bool key": "not a string",
    "unsorted keys": "canonical order",
    "unsorted nested keys": "canonical order",
    "duplicate key": "duplicate key",
    "duplicate key, in a list": "duplicate key",
    "uint16 for fixint": "longer form",
    "trailing zero": "trailing",
    "str with invalid utf-8": "UTF-8",
    "array": "not a map",
}


@pytest.mark.parametrize(("name", "reason"), list(REASONS.items()), ids=list(REASONS))
def test_unpack_names_the_reason(name: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        enc.unpack(REFUSED[name])


def test_pack_checked_sorts_maps_at_every_depth() -> None:
    # pack_checked once sorted only two levels; msgspec's encoder sorts every map.
    value = {"b": [{"y": {"q": 1, "p": {"z": 0, "a": 1}}, "x": 0}], "a": {"d": {"c": 1, "b": 0}}}
    assert enc.pack_checked(value) == enc.pack(value)
