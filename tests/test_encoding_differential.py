"""The msgspec codec of :mod:`tisa.encoding` against the msgpack-python one it replaced.

``encoding_reference`` is the codec as it was (msgpack-python, an ``object_pairs_hook``
per map, a type walk, a re-encoding check). For every input here, :func:`unpack` must
accept exactly when the reference accepts and return an equal value (types compared
too), and :func:`pack` / :func:`pack_checked` must give the same bytes or refuse with the
same reason. Inputs: generated values (with the edge cases of each encoding), random
bytes and bytes drawn from msgpack's type markers, byte mutations of generated
encodings, of every vector in ``tests/vectors`` and of the seeds of every fuzz target,
and the non-canonical variants of :mod:`tisa_testing.hostile`.

``TISA_SLOW=1`` runs twenty times as many examples.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import pathlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import encoding_reference as ref
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.errors import ProtocolError, Reason
from tisa_testing import fuzzing, hostile

SLOW = os.environ.get("TISA_SLOW") == "1"
EXAMPLES = 6000 if SLOW else 300
VECTORS = pathlib.Path(__file__).parent / "vectors"

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
EDGE_INTS = [
    *(0, 1, 31, 32, 127, 128, 255, 256, 65535, 65536, 2**31, 2**32 - 1, 2**32),
    *(2**63 - 1, 2**63, INT_MAX),
    *(-1, -31, -32, -33, -127, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, INT_MIN),
]


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 300


class Name(str):
    """A str subclass that is not an enum."""


# --- values -----------------------------------------------------------------------------

# Keys across the whole of Unicode: the canonical order is by UTF-8 bytes, which is code
# point order and not UTF-16 order (U+FF61 < U+10000 although a surrogate < U+FF61).
keys = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["", "a", "aa", "b", "B", "é", "z", "\uff61", "\U00010000", "t"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT_MIN, INT_MAX),
    st.sampled_from(EDGE_INTS),
    st.binary(max_size=40),
    # Lengths at the edges of fixstr/str8/str16 and bin8/bin16.
    st.sampled_from([31, 32, 255, 256, 65535, 65536]).map(lambda n: "x" * n),
    st.sampled_from([255, 256, 65535, 65536]).map(lambda n: b"\x00" * n),
    st.text(max_size=20),
)


@functools.cache
def plain_values(depth: int) -> st.SearchStrategy[Any]:
    """Values the protocol carries, ``depth`` containers deep at most."""
    if depth == 0:
        return scalars
    inner = plain_values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=4),
        # Long enough for array16/map16 headers.
        st.lists(st.none(), min_size=15, max_size=17),
        st.dictionaries(st.text(min_size=1, max_size=3), st.none(), min_size=15, max_size=17),
    )


plain_maps = st.dictionaries(keys, plain_values(3), max_size=6)
# Up to two levels more than the limit, so both sides of it are generated.
deep_maps = st.dictionaries(keys, plain_values(enc.MAX_DEPTH + 1), max_size=3)

# What pack must make plain first or refuse: subclasses, other mappings, tuples, and
# every kind of refusal (types, keys, ranges, lone surrogates).
odd_scalars = st.one_of(
    st.sampled_from([Colour.RED, Level.HIGH, Reason.EXPIRED, Name("n"), True, False]),
    st.sampled_from([1.0, 0.5, float("nan"), {1, 2}, frozenset(), bytearray(b"x")]),
    st.sampled_from([memoryview(b"x"), object(), 2**64, INT_MIN - 1, "\ud800", "a\udfff"]),
)


def _odd_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    odd_keys = st.one_of(keys, st.sampled_from([1, b"k", None, True, Colour.RED, "\ud800"]))
    return st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(keys, inner, max_size=3),
        st.dictionaries(keys, inner, max_size=3).map(types.MappingProxyType),
        st.dictionaries(odd_keys, inner, max_size=2),
    )


odd_values = st.recursive(st.one_of(scalars, odd_scalars), _odd_containers, max_leaves=12)
odd_maps = st.one_of(
    st.dictionaries(keys, odd_values, max_size=4),
    st.dictionaries(keys, odd_values, max_size=3).map(types.MappingProxyType),
    odd_values,
)


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types (``True == 1`` and ``b"" != ""`` matter here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", result) or ("refused", detail); any other exception fails the test."""
    try:
        return "ok", call()
    except ProtocolError as exc:
        return "refused", exc.detail


def sorted_maps(value: Any) -> Any:
    """``value`` with every map's keys in canonical order, at any depth."""
    if type(value) is dict:
        return {k: sorted_maps(value[k]) for k in sorted(value)}
    if type(value) is list:
        return [sorted_maps(item) for item in value]
    return value


def assert_same_pack(value: Any) -> None:
    new = outcome(lambda: enc.pack(value))
    old = outcome(lambda: ref.pack(value))
    # pack refuses with the reference's reason, word for word.
    assert new == old, (value, new, old)


def assert_same_unpack(data: bytes) -> bool:
    """unpack and the reference agree on ``data``; True when both accepted it."""
    new = outcome(lambda: enc.unpack(data))
    old = outcome(lambda: ref.unpack(data))
    assert new[0] == old[0], (data.hex(), new, old)
    if new[0] == "ok":
        assert same(new[1], old[1]), (data.hex(), new[1], old[1])
        assert enc.pack(new[1]) == data
    return new[0] == "ok"


# --- pack and pack_checked --------------------------------------------------------------


@given(plain_maps)
@settings(max_examples=EXAMPLES)
def test_pack_gives_the_reference_bytes(value: dict[str, Any]) -> None:
    assert_same_pack(value)
    assert_same_unpack(ref.pack(value))


@given(deep_maps)
@settings(max_examples=EXAMPLES // 2)
def test_pack_and_unpack_agree_on_both_sides_of_the_depth_limit(value: dict[str, Any]) -> None:
    assert_same_pack(value)
    try:
        data = ref.pack(value)
    except ProtocolError:  # too deep: the canonical bytes, written without the check
        data = msgpack.packb(sorted_maps(value), use_bin_type=True)
    assert_same_unpack(data)


@given(odd_maps)
@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
def test_pack_makes_plain_or_refuses_as_the_reference(value: Any) -> None:
    assert_same_pack(value)


def shuffled(item: Any, rnd: Any, levels: int) -> Any:
    """``item`` with the keys of its maps in a random order, ``levels`` containers deep."""
    if levels <= 0:
        return item
    if type(item) is dict:
        order = list(item)
        rnd.shuffle(order)
        return {k: shuffled(item[k], rnd, levels - 1) for k in order}
    if type(item) is list:
        return [shuffled(i, rnd, levels - 1) for i in item]
    return item


@given(plain_maps, st.randoms(use_true_random=False))
@settings(max_examples=EXAMPLES // 2)
def test_pack_checked_gives_the_reference_bytes(value: dict[str, Any], rnd: Any) -> None:
    canonical = enc.unpack(enc.pack(value))  # every map's keys in order
    # The reference sorts the top map, the maps in it and the maps in its lists: out of
    # order there, both give pack's bytes.
    top = shuffled(canonical, rnd, 1)
    shallow = {k: shuffled(v, rnd, 2 if type(v) is list else 1) for k, v in top.items()}
    assert enc.pack_checked(shallow) == ref.pack_checked(shallow) == enc.pack(value)
    # Out of order at any depth, pack_checked still gives pack's bytes.
    assert enc.pack_checked(shuffled(value, rnd, 99)) == enc.pack(value)


def test_pack_checked_encodes_subclasses_as_plain_values() -> None:
    value = {"a": Name("x"), "b": Colour.RED, "c": Level.HIGH, "d": [Reason.EXPIRED]}
    assert enc.pack_checked(value) == ref.pack_checked(value)
    assert enc.pack_checked(value) == enc.pack({"a": "x", "b": "red", "c": 300, "d": ["expired"]})


def test_keys_sort_by_code_point_not_utf16() -> None:
    value = {"\U00010000": 1, "\uff61": 2, "z": 3, "é": 4}
    assert enc.pack(value) == ref.pack(value) == enc.pack_checked(value)
    assert list(enc.unpack(enc.pack(value))) == ["z", "é", "\uff61", "\U00010000"]


# --- unpack -----------------------------------------------------------------------------


@given(st.binary(max_size=64))
@settings(max_examples=EXAMPLES)
def test_unpack_agrees_on_random_bytes(data: bytes) -> None:
    assert_same_unpack(data)


MARKERS = sorted(set(range(0x80, 0x100)) | {0x00, 0x01, 0x61, 0x7F})


@given(st.lists(st.sampled_from(MARKERS), max_size=24))
@settings(max_examples=EXAMPLES)
def test_unpack_agrees_on_type_markers(data: list[int]) -> None:
    assert_same_unpack(bytes([0x81, 0xA1, 0x61, *data]))
    assert_same_unpack(bytes([0x82, 0xA1, 0x61, 0x00, *data]))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with 1 to 4 edits: a bit flipped, a byte set, msgpack headers spliced in,
    a span deleted, duplicated or moved, the end cut."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "set", "splice", "delete", "repeat", "cut"]))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from(MARKERS))
        elif op == "splice":
            data[at:at] = bytes(draw(st.lists(st.sampled_from(MARKERS), min_size=1, max_size=3)))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
    return bytes(data)


@given(plain_maps.map(ref.pack).flatmap(mutated))
@settings(max_examples=EXAMPLES)
def test_unpack_agrees_on_mutated_encodings(data: bytes) -> None:
    assert_same_unpack(data)


def _encoded_in(node: Any) -> Iterator[bytes]:
    if isinstance(node, dict):
        for key, item in node.items():
            if isinstance(item, str) and key in {"encoded", "input", "data"}:
                try:
                    yield bytes.fromhex(item)
                except ValueError:
                    continue
            else:
                yield from _encoded_in(item)
    elif isinstance(node, list):
        for item in node:
            yield from _encoded_in(item)


def _corpus() -> list[bytes]:
    """Every encoding in tests/vectors and every seed of every fuzz target."""
    found: set[bytes] = set()
    for path in sorted(VECTORS.glob("*.json")):
        found.update(_encoded_in(json.loads(path.read_text())))
    for target in fuzzing.TARGETS.values():
        found.update(target.seeds())
    return sorted(found, key=lambda b: (len(b), b))


CORPUS = _corpus()


def test_the_corpus_is_there() -> None:
    # The vectors and seeds hold canonical maps (accepted) and refusals of every kind.
    accepted = sum(assert_same_unpack(data) for data in CORPUS)
    assert accepted >= 50
    assert len(CORPUS) - accepted >= 20


@given(st.sampled_from(CORPUS).flatmap(mutated))
@settings(max_examples=EXAMPLES * 2, suppress_health_check=[HealthCheck.too_slow])
def test_unpack_agrees_on_mutated_vectors_and_seeds(data: bytes) -> None:
    assert_same_unpack(data)


def test_unpack_agrees_on_the_hostile_variants_of_the_corpus() -> None:
    variants = 0
    for data in CORPUS:
        if not assert_same_unpack(data) or data == b"\x80":  # the empty map has no variants
            continue
        for _label, variant in hostile.noncanonical_variants(data):
            assert not assert_same_unpack(variant)
            variants += 1
    assert variants >= 200


@given(plain_maps, st.sampled_from(["int", "str", "bin", "array", "map"]), st.booleans())
@settings(max_examples=EXAMPLES // 2)
def test_unpack_agrees_on_loose_encodings(value: dict[str, Any], kind: str, reverse: bool) -> None:
    loose = hostile.loose_pack(value, widen=frozenset({kind}), reverse_keys=reverse)
    assert assert_same_unpack(loose) == (loose == ref.pack(value))


@pytest.mark.parametrize("depth", [enc.MAX_DEPTH, enc.MAX_DEPTH + 1, 500, 5000, 200_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1a"])
def test_unpack_agrees_on_deep_nesting(depth: int, opener: bytes) -> None:
    data = b"\x81\xa1x" + opener * (depth - 1) + b"\x00"
    assert assert_same_unpack(data) == (depth <= enc.MAX_DEPTH)
    with pytest.raises(ProtocolError, match="deep"):
        enc.unpack(b"\x81\xa1x" + opener * depth + b"\x00")


@pytest.mark.parametrize(
    "value",
    [
        {"": 2**64, "\ud800": None},  # found by hypothesis: msgspec met the key's fault first
        {"\ud800": 2**64},
        {"a": [-(2**63) - 1, "\udfff"]},
        {"b": "\ud800", "a": {"z": 2**64}},
    ],
)
def test_pack_names_the_first_fault_in_encoding_order(value: Any) -> None:
    assert_same_pack(value)
