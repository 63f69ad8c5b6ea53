"""Where docs/protocol.md and the code once disagreed, or left implementers to guess.

Each test pins the behaviour the spec now states (issue 12, items 11 and 12); the vector
files pin the rest in a form other implementations can run (tests/test_vectors.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from nodes.client_world import make_world as make_client_world
from nodes.relay_harness import expect, running_relay
from nodes.relay_helpers import NOW, World, make_world, raw_hello, read_raw_frame

from clients.node import open_node
from relay.server import serve
from tisa import encoding as enc
from tisa.arrangement import Arrangement
from tisa.audit import (
    GENESIS,
    AuditEntry,
    AuditEvent,
    Checkpoint,
    Extract,
    chain_next,
    verify_extract,
)
from tisa.errors import LimitExceeded, ProtocolError, Reason, Refused, VerificationError
from tisa.frames import encode_frame
from tisa.handshake import MAX_HANDSHAKE_MESSAGE
from tisa.limits import Limits
from tisa.messages import AuditFetch, AuditReply, Refusal
from tisa_io.link import accept_member, connect_member

FAST = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


# --- section 13.1: a handshake frame above its limit is refused `limit` -------------------


async def _relay_answer(world: World, data: bytes) -> tuple[type[Exception], dict[str, object]]:
    """Feed ``data`` to the relay's handshake; what it raised and the error it sent."""
    client, server = trio.testing.memory_stream_pair()
    raised: list[type[Exception]] = []

    async def serve() -> None:
        try:
            await accept_member(server, world.relay_secret, world.arrangement, limits=FAST)
        except Exception as exc:
            raised.append(type(exc))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(data)
            error = enc.unpack(await read_raw_frame(client))
            assert await read_raw_frame(client) == b""  # then closed
            await client.aclose()
    return raised[0], error


@pytest.mark.parametrize("size", [MAX_HANDSHAKE_MESSAGE + 1, 2**32 - 1])
async def test_oversized_hello_is_refused_limit(world: World, size: int) -> None:
    # Only the length prefix is sent: the relay refuses from it alone, without waiting
    # for a payload that never comes.
    raised, error = await _relay_answer(world, size.to_bytes(4, "big"))
    assert raised is LimitExceeded
    assert (error["t"], error["reason"]) == ("error", "limit")


async def test_hello_at_the_limit_is_read_and_judged_on_its_content(world: World) -> None:
    # A frame of exactly MAX_HANDSHAKE_MESSAGE bytes is within the limit: read whole, then
    # refused for what it is (not a hello), not for its size.
    payload = b"\xc0" * MAX_HANDSHAKE_MESSAGE
    raised, error = await _relay_answer(world, encode_frame(payload))
    assert raised is ProtocolError and error["reason"] == "malformed"


async def test_empty_hello_frame_is_malformed(world: World) -> None:
    raised, error = await _relay_answer(world, bytes(4))
    assert raised is ProtocolError and error["reason"] == "malformed"


async def test_member_refuses_an_oversized_welcome(world: World) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def relay() -> None:
                hello = await read_raw_frame(server)
                assert enc.unpack(hello)["t"] == "hello"
                await server.send_all((MAX_HANDSHAKE_MESSAGE + 1).to_bytes(4, "big"))

            nursery.start_soon(relay)
            with pytest.raises(LimitExceeded):
                await connect_member(
                    client, world.secrets["seoul"], "seoul", world.arrangement, limits=FAST
                )


async def test_a_refused_hello_still_names_its_reason(world: World) -> None:
    # The limit check does not swallow the others: a well-sized hello from a stranger.
    raised, error = await _relay_answer(world, encode_frame(raw_hello(world.arrangement, "x")))
    assert raised is Refused and error["reason"] == "not_a_member"


# --- sections 12.3 and 15: audit_fetch past the end is a refusal; the connection goes on --


async def test_audit_fetch_past_the_end_is_refused_and_the_connection_goes_on(
    world: World, tmp_path: Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=FAST) as h:
            tokyo = await h.connect("tokyo")
            await tokyo.send(AuditFetch(since=1_000))
            refusal = await expect(tokyo, Refusal)
            assert (refusal.reason, refusal.ref) == (Reason.MALFORMED, b"")
            # Not an `error`: the same connection serves the next request.
            await tokyo.send(AuditFetch(since=0))
            reply = await expect(tokyo, AuditReply)
            entries, checkpoint = verify_extract(reply.extract, world.arrangement, "tokyo")
            # The refusal itself is in the log, naming tokyo.
            assert [(e.event, e.reason) for e in entries] == [(AuditEvent.REFUSED, "malformed")]
            assert checkpoint.seq == 1


# --- section 12.3: how an extract fails ---------------------------------------------------


def _extract(world: World, *, checkpoint_for: Arrangement | None = None) -> bytes:
    """An extract of one entry naming Seoul, the checkpoint signed for ``checkpoint_for``."""
    entry = AuditEntry(
        seq=1,
        time=NOW,
        event=AuditEvent.STORED,
        report=bytes(16),
        token=None,
        parties=("seoul",),
    )
    checkpoint = Checkpoint.issue(
        world.relay_secret,
        checkpoint_for or world.arrangement,
        seq=1,
        head=chain_next(GENESIS, entry.content_hash),
        time=NOW,
    )
    return Extract.build(
        [(entry, entry.content_hash)],
        "seoul",
        start_seq=0,
        start_head=GENESIS,
        checkpoint=checkpoint.encoded,
    ).encode()


def test_extract_failures_are_malformed_then_checkpoint_then_opaque(world: World) -> None:
    good = _extract(world)
    entries, _ = verify_extract(good, world.arrangement, "seoul")
    assert [e.seq for e in entries] == [1]
    # Does not decode: malformed, as every object that does not decode.
    with pytest.raises(ProtocolError):
        verify_extract(good + b"\x00", world.arrangement, "seoul")
    # A checkpoint the relay signed for another arrangement (same keys, version 2):
    # signature good, arrangement not, as section 12.2 says of any checkpoint.
    amended = world.arrangement.amend(levels=("secret",))
    other = _extract(world, checkpoint_for=amended)
    with pytest.raises(Refused) as info:
        verify_extract(other, world.arrangement, "seoul")
    assert info.value.reason is Reason.WRONG_ARRANGEMENT
    # Everything about the chain itself: the one opaque failure.
    with pytest.raises(VerificationError):
        verify_extract(good, world.arrangement, "seoul", known=(1, GENESIS))
    with pytest.raises(VerificationError):
        verify_extract(good, world.arrangement, "tokyo")  # an entry naming someone else


# --- Appendices A and B of docs/protocol.md run as written --------------------------------

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _appendix_script(title: str) -> str:
    text = PROTOCOL.read_text()
    start = text.index(f"## Appendix {title}")
    block = text.index("```python\n", start) + len("```python\n")
    return text[block : text.index("```", block)]


def test_appendix_b_checks_the_example_appendix_a_makes(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text(_appendix_script("A"))
    (tmp_path / "b.py").write_text(_appendix_script("B"))
    root = PROTOCOL.parent.parent
    example = subprocess.run(
        [sys.executable, str(tmp_path / "a.py")], cwd=root, capture_output=True, check=True
    ).stdout
    (tmp_path / "example.json").write_bytes(example)
    checked = subprocess.run(
        [sys.executable, str(tmp_path / "b.py"), str(tmp_path / "example.json")],
        cwd=root,
        capture_output=True,
        check=True,
        text=True,
    )
    assert checked.stdout.strip() == "independent check: all good"


def test_appendix_b_canon_gives_every_encoding_vector_its_verdict() -> None:
    # Appendix B's canon() checks canonical form with msgpack alone; it must agree with
    # tisa.encoding.unpack on every encoding vector, keys out of order in a nested map
    # among them (which decoding and re-encoding alone cannot see).
    script = _appendix_script("B")
    source = script[script.index("def canon(b):") : script.index("\nkeys = ")]
    namespace: dict[str, Any] = {"msgpack": msgpack}
    exec(source, namespace)
    canon = namespace["canon"]
    vectors = json.loads((PROTOCOL.parent.parent / "tests/vectors/encoding.json").read_text())
    for vector in vectors["vectors"]:
        data = bytes.fromhex(vector["encoded"])
        if vector["expect"]["result"] == "ok":
            assert canon(data) == enc.unpack(data), vector["id"]
        else:
            with pytest.raises(Exception):  # noqa: B017 - a sketch: any refusal will do
                canon(data)


async def test_member_node_raises_the_refusal_of_a_fetch_past_the_end(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A relay whose log is shorter than the checkpoint a member verified (restored from
    # an old backup, say) refuses the fetch; the node says so instead of waiting forever,
    # and its connection, and its next fetch, go on.
    arrangement, secrets = make_client_world()
    with trio.fail_after(10):
        port = await nursery.start(
            functools.partial(serve, secrets["washington"], arrangement, tmp_path / "relay", port=0)
        )
        async with open_node(
            secrets["tokyo"], "tokyo", arrangement, ("127.0.0.1", port), tmp_path / "tokyo"
        ) as tokyo:
            tokyo.store.set_audit_checkpoint(1_000, bytes(32), b"")
            with pytest.raises(Refused) as info:
                await tokyo.fetch_audit()
            assert info.value.reason is Reason.MALFORMED
            tokyo.store.set_audit_checkpoint(0, GENESIS, b"")
            assert [e.reason for e in await tokyo.fetch_audit()] == ["malformed"]


# --- section 3.1 rule 7: the encoder counts levels as the decoder does ---------------------


def test_encoder_and_decoder_count_nesting_alike() -> None:
    def nested(levels: int) -> dict[str, Any]:
        value: Any = []
        for _ in range(levels - 2):
            value = [value]
        return {"a": value}

    assert enc.unpack(enc.pack(nested(8))) == nested(8)
    with pytest.raises(ProtocolError):
        enc.pack(nested(9))
    with pytest.raises(ProtocolError):
        enc.unpack(msgpack.packb(nested(9)))
