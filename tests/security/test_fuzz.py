"""Every decoder either decodes or raises the toolkit's typed error, nothing else.

The targets are those of :mod:`tisa_testing.fuzzing` (the atheris targets in ``fuzz/``
use the same registry). Inputs are random bytes, byte-level mutations of valid seeds,
and structure-aware mutations (a field of a valid map replaced by any msgpack value,
removed, or added; also inside an envelope's signed body), so that the schema checks
behind the msgpack layer are reached too.

``TISA_SLOW=1`` runs twenty times as many examples per target.
"""

from __future__ import annotations

import os
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from tisa import encoding as enc
from tisa.errors import ProtocolError
from tisa_testing import fuzzing

SLOW = os.environ.get("TISA_SLOW") == "1"
EXAMPLES = 5000 if SLOW else 150

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=80),
    st.text(max_size=40),
    st.sampled_from(["seoul", "tokyo", "washington", "nk.missile", "secret", "hello", "x"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def byte_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def _mutate_map(draw: st.DrawFn, value: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    value = dict(value)
    body = value.get("body")
    if depth == 0 and isinstance(body, bytes) and draw(st.booleans()):
        try:
            inner = enc.unpack(body)
        except ProtocolError:
            pass
        else:
            value["body"] = enc.pack(_mutate_map(draw, inner, depth + 1))
            return value
    op = draw(st.sampled_from(["replace", "remove", "add"]))
    keys = sorted(value)
    if op == "add" or not keys:
        value[draw(st.text(max_size=12))] = draw(_values)
    elif op == "remove":
        del value[draw(st.sampled_from(keys))]
    else:
        value[draw(st.sampled_from(keys))] = draw(_values)
    return value


@st.composite
def field_mutation(draw: st.DrawFn, seed: bytes) -> bytes:
    try:
        value = enc.unpack(seed)
    except ProtocolError:
        return draw(byte_mutation(seed))
    try:
        return enc.pack(_mutate_map(draw, value))
    except ProtocolError:
        return seed


def inputs(target: fuzzing.Target) -> st.SearchStrategy[bytes]:
    seeds = target.seeds()
    return st.one_of(
        st.binary(max_size=512),
        st.sampled_from(seeds).flatmap(byte_mutation),
        st.sampled_from(seeds).flatmap(field_mutation),
    )


@pytest.mark.parametrize("name", sorted(fuzzing.TARGETS))
def test_decoder_refuses_only_with_typed_errors(name: str) -> None:
    target = fuzzing.TARGETS[name]

    @settings(
        max_examples=EXAMPLES // 4 if name == "keyfile" else EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=inputs(target))
    def check(data: bytes) -> None:
        fuzzing.run(target, data)

    check()


@pytest.mark.parametrize("name", sorted(fuzzing.TARGETS))
def test_seeds_exercise_the_decoder(name: str) -> None:
    # Valid seeds decode (except where a seed cannot be valid twice: the handshake's
    # finish and channel frames are bound to fresh randomness), so mutations start from
    # inputs that reach deep into each decoder.
    target = fuzzing.TARGETS[name]
    for seed in target.seeds():
        if name in {"finish", "channel"}:
            fuzzing.run(target, seed)
        else:
            target.call(seed)


def test_every_decoder_has_a_target() -> None:
    expected = {
        "frames",
        "message",
        "report_header",
        "report_ciphertext",
        "report_plaintext",
        "token",
        "prekey",
        "key_wrap",
        "token_relay",
        "token_recipient",
        "receipt",
        "ack",
        "checkpoint",
        "audit_entry",
        "extract",
        "hello",
        "welcome",
        "finish",
        "channel",
        "arrangement",
        "signed_arrangement",
        "keyfile",
        "announcement",
        "request",
        "answer",
    }
    assert set(fuzzing.TARGETS) == expected
