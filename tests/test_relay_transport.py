"""tisa_io.link: handshake with deadlines, framing, locks, error mapping."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from nodes.relay_helpers import World, make_world, raw_hello, read_raw_frame

from tisa import encoding as enc
from tisa.errors import LimitExceeded, ProtocolError, Reason, Refused, UsageError
from tisa.frames import encode_frame
from tisa.limits import Limits
from tisa.messages import AuditFetch, Chunk, Deliver, DeliverEnd, ErrorMessage, Message
from tisa_io.link import Link, LinkClosed, LinkTimeout, accept_member, connect_member

FAST = Limits(handshake_timeout=5, frame_timeout=5)


@pytest.fixture
def world() -> World:
    return make_world()


async def pair(world: World, limits: Limits = FAST) -> tuple[Link, Link]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    links: dict[str, Link] = {}

    async def server() -> None:
        links["relay"] = await accept_member(
            server_stream, world.relay_secret, world.arrangement, limits=limits
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        links["member"] = await connect_member(
            client_stream, world.secrets["seoul"], "seoul", world.arrangement, limits=limits
        )
    return links["member"], links["relay"]


async def test_handshake_and_messages_both_ways(world: World) -> None:
    with trio.fail_after(5):
        member, relay = await pair(world)
        assert relay.peer == "seoul" and member.peer == "washington"
        await member.send(AuditFetch(since=3))
        assert await relay.receive() == AuditFetch(since=3)
        await relay.send(Chunk(data=b"x" * 65_553))
        assert await member.receive() == Chunk(data=b"x" * 65_553)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.aclose)
            with pytest.raises(LinkClosed):
                await relay.receive()
            await relay.aclose()
        await relay.aclose()  # idempotent


async def test_sending_keeps_a_stream_whole(world: World) -> None:
    with trio.fail_after(5):
        member, relay = await pair(world)
        token_id = bytes(16)

        async def streamer() -> None:
            async with relay.sending():
                await relay.send(Deliver(token=b"t" * 10))
                for _ in range(20):
                    await relay.send(Chunk(data=b"c" * 100))
                    await trio.sleep(0)
                await relay.send(DeliverEnd(token=token_id))

        async def interloper() -> None:
            await trio.sleep(0)
            await relay.send(AuditFetch(since=0))

        received: list[Message] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(streamer)
            nursery.start_soon(interloper)
            for _ in range(23):
                received.append(await member.receive())
        kinds = [type(m).__name__ for m in received]
        start = kinds.index("Deliver")
        assert kinds[start : start + 22] == ["Deliver"] + ["Chunk"] * 20 + ["DeliverEnd"]


class _CountingStream(trio.abc.Stream):
    """Wraps a stream and counts the writes (send_all calls) made on it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def counting_pair(world: World) -> tuple[Link, Link, _CountingStream]:
    member, relay = await pair(world)
    counting = _CountingStream(relay._stream)
    relay._stream = counting
    return member, relay, counting


async def test_concurrent_sends_share_writes_and_keep_their_order(world: World) -> None:
    with trio.fail_after(5):
        member, relay, counting = await counting_pair(world)
        order: list[int] = []

        async def sender(i: int) -> None:
            order.append(i)  # queued in this order: no checkpoint before the seal
            await relay.send(AuditFetch(since=i))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(sender, i)
        received = [await member.receive() for _ in range(50)]
        assert received == [AuditFetch(since=i) for i in order]
        # All 50 queued within one pass of the scheduler: the first sender, before
        # writing, lets the other 49 queue, and all go out in one write.
        assert counting.writes == 1
        assert (relay.writes, relay.frames_sent) == (1, 50)


async def test_sends_of_different_tasks_in_one_pass_share_a_write(world: World) -> None:
    # As the relay's replier (an answer) and pusher (a delivery) do when the same batch
    # is committed: each task's send, begun in the same pass, goes in the same write.
    with trio.fail_after(5):
        member, relay, counting = await counting_pair(world)
        ready = trio.Event()

        async def sender(message: Message) -> None:
            await ready.wait()
            await relay.send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, AuditFetch(since=1))
            nursery.start_soon(relay.send_many, [])  # nothing to send: no write
            nursery.start_soon(sender, Chunk(data=b"c" * 100))
            await trio.testing.wait_all_tasks_blocked()
            ready.set()
        received = [await member.receive() for _ in range(2)]  # in either order
        assert AuditFetch(since=1) in received and Chunk(data=b"c" * 100) in received
        assert counting.writes == 1
        # A send on its own still goes out at once, in a write of its own.
        await relay.send(AuditFetch(since=2))
        assert await member.receive() == AuditFetch(since=2)
        assert (relay.writes, relay.frames_sent) == (2, 3)


async def test_send_many_is_one_write_and_nothing_comes_between(world: World) -> None:
    with trio.fail_after(5):
        member, relay, counting = await counting_pair(world)
        stream = [Deliver(token=b"t" * 10), Chunk(data=b"c" * 100), DeliverEnd(token=bytes(16))]

        async def interloper() -> None:
            await relay.send(AuditFetch(since=1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.send_many, stream)
            nursery.start_soon(interloper)
        received = [await member.receive() for _ in range(4)]
        kinds = [type(m).__name__ for m in received]
        start = kinds.index("Deliver")
        assert kinds[start : start + 3] == ["Deliver", "Chunk", "DeliverEnd"]
        assert counting.writes <= 2


async def test_send_many_with_an_oversized_message_sends_none(world: World) -> None:
    limits = Limits(handshake_timeout=5, frame_timeout=5, max_frame=70_000)
    with trio.fail_after(5):
        member, relay = await pair(world, limits)
        with pytest.raises(UsageError):
            await relay.send_many([AuditFetch(since=1), Chunk(data=b"x" * 69_990)])
        # Nothing was sealed: the channel stays in step and the next message arrives.
        await relay.send(AuditFetch(since=2))
        assert await member.receive() == AuditFetch(since=2)


async def test_a_cancelled_waiter_still_goes_out_in_order(world: World) -> None:
    with trio.fail_after(5):
        member, relay = await pair(world)
        gate = trio.Event()

        class _Slow(_CountingStream):
            async def send_all(self, data: bytes | bytearray | memoryview) -> None:
                await gate.wait()
                await self.inner.send_all(data)

        relay._stream = _Slow(relay._stream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.send, AuditFetch(since=1))  # becomes the writer
            await trio.testing.wait_all_tasks_blocked()
            waiter = trio.CancelScope()

            async def cancelled_waiter() -> None:
                with waiter:
                    await relay.send(AuditFetch(since=2))

            nursery.start_soon(cancelled_waiter)
            await trio.testing.wait_all_tasks_blocked()
            waiter.cancel()  # parked behind the writer: its frame is queued already
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        # Nobody was parked after the first write, so the writer wrote the rest too.
        assert await member.receive() == AuditFetch(since=1)
        assert await member.receive() == AuditFetch(since=2)
        await relay.send(AuditFetch(since=3))
        assert await member.receive() == AuditFetch(since=3)


@pytest.mark.parametrize(
    ("name", "reason"), [("beijing", Reason.NOT_A_MEMBER), ("washington", Reason.WRONG_ROLE)]
)
async def test_relay_refuses_with_plaintext_error(world: World, name: str, reason: Reason) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises(Refused) as info:
                    await accept_member(server, world.relay_secret, world.arrangement, limits=FAST)
                assert info.value.reason is reason

            nursery.start_soon(serve)
            await client.send_all(encode_frame(raw_hello(world.arrangement, name)))
            error = enc.unpack(await read_raw_frame(client))
            assert error["t"] == "error" and error["reason"] == reason.value
            assert await read_raw_frame(client) == b""  # closed
            await client.aclose()


async def test_member_sees_refusal_from_admit(world: World) -> None:
    client, server = trio.testing.memory_stream_pair()

    def admit(name: str) -> None:
        assert name == "seoul"
        raise Refused(Reason.BUSY, "too many connections")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises(Refused):
                    await accept_member(
                        server, world.relay_secret, world.arrangement, limits=FAST, admit=admit
                    )

            nursery.start_soon(serve)
            # admit runs once the member is authenticated, so the refusal is the first
            # message on the new channel, and then the link closes.
            link = await connect_member(
                client, world.secrets["seoul"], "seoul", world.arrangement, limits=FAST
            )
            refusal = await link.receive()
            assert isinstance(refusal, ErrorMessage) and refusal.reason == Reason.BUSY
            with pytest.raises(LinkClosed):
                await link.receive()


async def test_wrong_arrangement_refused(world: World) -> None:
    other = world.arrangement.amend(scopes=("nk.missile",))
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises(Refused):
                    await accept_member(server, world.relay_secret, world.arrangement, limits=FAST)

            nursery.start_soon(serve)
            with pytest.raises(Refused) as info:
                await connect_member(client, world.secrets["seoul"], "seoul", other, limits=FAST)
            assert info.value.reason is Reason.WRONG_ARRANGEMENT


async def test_stalled_handshake_times_out(world: World, autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(100):
        with pytest.raises(LinkTimeout):
            await accept_member(server, world.relay_secret, world.arrangement, limits=FAST)
        client, _server = trio.testing.memory_stream_pair()
        with pytest.raises(LinkTimeout):
            await connect_member(
                client, world.secrets["seoul"], "seoul", world.arrangement, limits=FAST
            )


async def test_oversized_handshake_frame(world: World) -> None:
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        await client.send_all((10_000).to_bytes(4, "big"))
        await client.send_eof()
        with pytest.raises(ProtocolError):
            await accept_member(server, world.relay_secret, world.arrangement, limits=FAST)


async def test_stalled_frame_times_out(world: World, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        member, relay = await pair(world)
        # Reach under the link: half a frame, then nothing.
        await member.stream.send_all(b"\x00\x00\x01\x00abc")
        with pytest.raises(LinkTimeout):
            await relay.receive()


async def test_idle_link_has_no_deadline(world: World, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10_000):
        member, relay = await pair(world)
        with trio.move_on_after(1000) as scope:
            await relay.receive()
        assert scope.cancelled_caught
        await member.send(AuditFetch(since=0))  # nothing was lost by the cancellation
        assert await relay.receive() == AuditFetch(since=0)


async def test_oversized_length_prefix(world: World) -> None:
    with trio.fail_after(5):
        member, relay = await pair(world)
        await member.stream.send_all((FAST.max_frame + 1).to_bytes(4, "big"))
        with pytest.raises(LimitExceeded):
            await relay.receive()


async def test_garbage_frame_fails_verification(world: World) -> None:
    from tisa.errors import VerificationError

    with trio.fail_after(5):
        member, relay = await pair(world)
        await member.stream.send_all(encode_frame(b"garbage" * 10))
        with pytest.raises(VerificationError):
            await relay.receive()


async def test_send_after_peer_gone(world: World) -> None:
    with trio.fail_after(5):
        member, relay = await pair(world)
        await relay.stream.aclose()
        with pytest.raises(LinkClosed):
            for _ in range(100):
                await member.send(AuditFetch(since=0))


async def test_both_ends_turn_on_tcp_keepalive_as_the_limits_say(world: World) -> None:
    """A peer that vanished (no FIN, no RST) is found by the kernel's keepalive probes;
    both sides of a TCP link set them from Limits (seconds rounded up)."""
    import functools
    import socket

    limits = Limits(
        handshake_timeout=5, keepalive_idle=7, keepalive_interval=2.5, keepalive_probes=4
    )
    links: list[Link] = []

    async def serve_one(stream: trio.SocketStream) -> None:
        links.append(
            await accept_member(stream, world.relay_secret, world.arrangement, limits=limits)
        )
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            member = await connect_member(
                stream, world.secrets["seoul"], "seoul", world.arrangement, limits=limits
            )
            while not links:
                await trio.sleep(0.01)
            for link in (member, links[0]):
                tcp = link.stream
                assert isinstance(tcp, trio.SocketStream)
                assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
                    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
                    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
                    assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
                    user_timeout = tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                    assert user_timeout == (7 + 3 * 4) * 1000
            await member.aclose()
            nursery.cancel_scope.cancel()


async def test_keep_alive_leaves_other_streams_alone() -> None:
    from tisa_io.link import keep_alive

    client, _ = trio.testing.memory_stream_pair()
    assert keep_alive(client) is False
