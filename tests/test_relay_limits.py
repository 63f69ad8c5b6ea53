"""The relay under bad peers and at its limits, over TCP (real sockets) and memory
streams (mock clock): every named limit is crossed once, and honest members go on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from nodes.relay_harness import Harness, expect, receive_delivery, running_relay, send_submission
from nodes.relay_helpers import (
    NOW,
    FakeClock,
    World,
    make_world,
    raw_hello,
    read_raw_frame,
    seal,
    token_for,
)
from nodes.store_probe import ciphertext_apart, leftover_uploads

from relay.server import serve
from tisa import encoding as enc
from tisa.arrangement import SignedArrangement
from tisa.errors import Reason, Refused
from tisa.frames import encode_frame
from tisa.handshake import MemberHandshake
from tisa.limits import Limits
from tisa.messages import (
    AuditFetch,
    AuditReply,
    Chunk,
    ErrorMessage,
    Expired,
    Refusal,
    Release,
    Released,
    Revoked,
    Stored,
)
from tisa_io.link import Link, LinkClosed, connect_member

FAST = Limits(handshake_timeout=1.0, frame_timeout=1.0, idle_timeout=60)


@pytest.fixture
def world() -> World:
    return make_world()


async def start_relay(
    nursery: trio.Nursery, world: World, path: str | Path, limits: Limits = FAST, **kwargs: object
) -> int:
    port: int = await nursery.start(
        lambda task_status: serve(
            world.relay_secret,
            world.arrangement,
            path,
            limits=limits,
            clock=FakeClock(),
            task_status=task_status,
            **kwargs,  # type: ignore[arg-type]
        )
    )
    return port


# Every stream a test opens, closed when the test ends (also when it fails).
_OPEN: list[trio.abc.Stream] = []


@pytest.fixture(autouse=True)
async def _close_streams() -> AsyncIterator[None]:
    yield
    while _OPEN:
        await trio.aclose_forcefully(_OPEN.pop())


async def raw_tcp(port: int) -> trio.abc.Stream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    _OPEN.append(stream)
    return stream


async def tcp_member(world: World, port: int, name: str, limits: Limits = FAST) -> Link:
    stream = await raw_tcp(port)
    return await connect_member(stream, world.secrets[name], name, world.arrangement, limits=limits)


async def honest_round_trip(world: World, port: int) -> None:
    """Seoul submits and releases, Tokyo receives: the relay still works."""
    seoul = await tcp_member(world, port, "seoul")
    tokyo = await tcp_member(world, port, "tokyo")
    report = seal(world, b"still working")
    await send_submission(seoul, report)
    await expect(seoul, Stored)
    token = token_for(world, report)
    await seoul.send(Release(token=token))
    await expect(seoul, Released)
    got, _ = await receive_delivery(tokyo)
    assert got == token
    await seoul.aclose()
    await tokyo.aclose()


async def test_non_member_and_wrong_arrangement_refused_over_tcp(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_relay(nursery, world, store_at)
            stream = await raw_tcp(port)
            await stream.send_all(encode_frame(raw_hello(world.arrangement, "beijing")))
            error = enc.unpack(await read_raw_frame(stream))
            assert (error["t"], error["reason"]) == ("error", "not_a_member")
            assert await read_raw_frame(stream) == b""
            amended = world.arrangement.amend(levels=("secret",))
            stream = await raw_tcp(port)
            with pytest.raises(Refused) as info:
                await connect_member(stream, world.secrets["seoul"], "seoul", amended)
            assert info.value.reason is Reason.WRONG_ARRANGEMENT
            await honest_round_trip(world, port)
            nursery.cancel_scope.cancel()


async def test_bad_peers_do_not_disturb_honest_ones(world: World, store_at: str | Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await start_relay(nursery, world, store_at)
            honest = await tcp_member(world, port, "tokyo")

            # Garbage before the handshake: answered malformed, closed.
            stream = await raw_tcp(port)
            await stream.send_all(encode_frame(os.urandom(200)))
            error = enc.unpack(await read_raw_frame(stream))
            assert error["reason"] == "malformed"
            # An oversized length prefix instead of a hello: a limit, as on the channel.
            stream = await raw_tcp(port)
            await stream.send_all(b"\xff\xff\xff\xff" + os.urandom(100))
            assert enc.unpack(await read_raw_frame(stream))["reason"] == "limit"

            # Garbage on an established channel: the relay closes (the channel failed).
            member = await tcp_member(world, port, "seoul")
            await member.stream.send_all(encode_frame(os.urandom(300)))
            with pytest.raises(LinkClosed):
                await member.receive()

            # An oversized length prefix on the channel: error "limit", then closed.
            member = await tcp_member(world, port, "seoul")
            await member.stream.send_all((FAST.max_frame + 1).to_bytes(4, "big"))
            assert (await expect(member, ErrorMessage)).reason == Reason.LIMIT
            with pytest.raises(LinkClosed):
                await member.receive()

            # A well-formed message out of order (a chunk outside a submission).
            member = await tcp_member(world, port, "seoul")
            await member.send(Chunk(data=b"x"))
            assert (await expect(member, ErrorMessage)).reason == Reason.MALFORMED

            # A message only the relay sends.
            member = await tcp_member(world, port, "seoul")
            await member.send(AuditReply(extract=b""))
            assert (await expect(member, ErrorMessage)).reason == Reason.MALFORMED

            # The connection made first still works, and so does a new round trip.
            await honest.send(AuditFetch(since=0))
            await expect(honest, AuditReply)
            await honest.aclose()
            await honest_round_trip(world, port)
            nursery.cancel_scope.cancel()


async def test_stalled_handshake_and_flood(world: World, store_at: str | Path) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await start_relay(nursery, world, store_at)
            # The relay's side of the handshake is bounded by limits.handshake_timeout.
            stalled = await raw_tcp(port)
            started = trio.current_time()
            assert await read_raw_frame(stalled) == b""
            assert trio.current_time() - started < FAST.handshake_timeout + 1

            # A flood of connections that never finish their handshake.
            flood = [await raw_tcp(port) for _ in range(200)]
            await honest_round_trip(world, port)
            for stream in flood:
                await stream.aclose()
            nursery.cancel_scope.cancel()


async def _stalled(h: Harness, source: str) -> trio.abc.Stream:
    """A connection from ``source`` that says nothing, once the relay registered it (so
    the order of arrival is the order of the calls)."""
    stream = h.open_stream(source=source)
    await trio.testing.wait_all_tasks_blocked()
    return stream


async def _served(link: Link) -> None:
    """The relay answers this member."""
    await link.send(AuditFetch(since=0))
    await expect(link, AuditReply)


async def _three_and_one(h: Harness) -> tuple[list[trio.abc.Stream], trio.abc.Stream]:
    """Stalled handshakes: three from 192.0.2.1, then one from 192.0.2.2."""
    three = [await _stalled(h, "192.0.2.1") for _ in range(3)]
    one = await _stalled(h, "192.0.2.2")
    assert h.relay.handshake_count == 4
    return three, one


async def _handshake_alive(world: World, stream: trio.abc.Stream) -> bool:
    """Whether the relay still serves this stalled handshake: a hello gets a welcome."""
    hello = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
    try:
        await stream.send_all(encode_frame(hello.start()))
    except trio.BrokenResourceError:
        return False
    frame = await read_raw_frame(stream)
    return bool(frame) and enc.unpack(frame)["t"] == "welcome"


async def test_handshakes_over_the_per_source_limit_shed_that_sources_oldest(
    world: World, tmp_path: Path
) -> None:
    limits = Limits(handshake_timeout=30, max_handshakes=100, max_handshakes_per_source=3)
    with trio.fail_after(20):
        async with running_relay(world, tmp_path, limits=limits) as h:
            flood, other = await _three_and_one(h)
            # One more from the same source: its own oldest goes, nobody is refused.
            flood.append(await _stalled(h, "192.0.2.1"))
            assert await read_raw_frame(flood[0]) == b""
            assert h.relay.handshake_count == 4 and h.relay.handshakes_shed == 1
            for stream in (*flood[1:], other):
                assert await _handshake_alive(world, stream)
            # A member from that source still gets in (shedding a stalled one).
            await _served(await h.connect("tokyo", source="192.0.2.1"))


async def test_a_full_handshake_pool_sheds_the_busiest_sources_oldest(
    world: World, tmp_path: Path
) -> None:
    limits = Limits(handshake_timeout=30, max_handshakes=4, max_handshakes_per_source=3)
    with trio.fail_after(20):
        async with running_relay(world, tmp_path, limits=limits) as h:
            busy, quiet = await _three_and_one(h)
            # The pool is full: a newcomer is let in, the busiest source's oldest goes.
            newcomer = await _stalled(h, "192.0.2.3")
            assert await read_raw_frame(busy[0]) == b""
            assert h.relay.handshake_count == 4
            # A member's handshake in a full pool completes (the busiest source pays again).
            await _served(await h.connect("seoul", source="192.0.2.4"))
            assert await read_raw_frame(busy[1]) == b""
            assert h.relay.handshakes_shed == 2
            for stream in (busy[2], quiet, newcomer):
                assert await _handshake_alive(world, stream)


@pytest.mark.parametrize(
    "idle",
    [
        1100,
        pytest.param(
            5000,
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(os.environ.get("TISA_SLOW") != "1", reason="TISA_SLOW=1"),
            ],
        ),
    ],
)
async def test_one_address_holding_many_connections_does_not_lock_members_out(
    world: World, tmp_path: Path, idle: int
) -> None:
    # Issue 12 item 8: 1,100 idle connections from one address filled the 1,024
    # handshake slots and members were refused busy. Default pool sizes; the flood comes
    # from 127.0.0.2, the members from 127.0.0.1. (The time of the round trip under
    # 5,000 is measured by python -m bench availability, not here.)
    limits = Limits(handshake_timeout=60, frame_timeout=5, idle_timeout=60)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await start_relay(nursery, world, tmp_path, limits)
            for _ in range(idle):
                flood = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
                _OPEN.append(flood)
            await honest_round_trip(world, port)
            nursery.cancel_scope.cancel()


async def test_connection_caps(world: World, store_at: str | Path) -> None:
    limits = Limits(handshake_timeout=5, max_connections=3, max_connections_per_member=2)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            first = await h.connect("seoul")
            second = await h.connect("seoul")
            # Caps count authenticated members only, so the refusal comes on the channel.
            busy = await expect(await h.connect("seoul"), ErrorMessage)
            assert busy.reason == Reason.BUSY  # per member
            tokyo = await h.connect("tokyo")
            busy = await expect(await h.connect("tokyo"), ErrorMessage)
            assert busy.reason == Reason.BUSY  # in all
            await first.aclose()
            await trio.sleep(0.05)
            again = await h.connect("tokyo")
            for link in (second, tokyo, again):
                await link.send(AuditFetch(since=0))
                await expect(link, AuditReply)


async def test_half_open_handshakes_cannot_hold_a_members_slots(
    world: World, store_at: str | Path
) -> None:
    # Anyone can send a hello naming "seoul"; only a finished handshake takes a slot.
    limits = Limits(handshake_timeout=5, max_connections_per_member=2)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            squatters = []
            for _ in range(4):
                stream = h.open_stream()
                hello = MemberHandshake(world.secrets["seoul"], "seoul", world.arrangement)
                await stream.send_all(encode_frame(hello.start()))
                squatters.append(stream)
            await trio.sleep(0.05)
            link = await h.connect("seoul")
            await link.send(AuditFetch(since=0))
            await expect(link, AuditReply)
            for stream in squatters:
                await stream.aclose()


async def test_deadlines(
    world: World, store_at: str | Path, autojump_clock: trio.abc.Clock
) -> None:
    limits = Limits(handshake_timeout=5, frame_timeout=7, idle_timeout=50)
    with trio.fail_after(1000):
        async with running_relay(world, store_at, limits=limits) as h:
            # frame_timeout: half a frame, then silence.
            link = await h.connect("seoul")
            await link.stream.send_all(b"\x00\x00\x01\x00" + b"x" * 10)
            started = trio.current_time()
            assert (await expect(link, ErrorMessage)).reason == Reason.TIMEOUT
            assert 7 <= trio.current_time() - started < 8
            # idle_timeout: nothing at all.
            link = await h.connect("seoul")
            started = trio.current_time()
            assert (await expect(link, ErrorMessage)).reason == Reason.TIMEOUT
            assert 50 <= trio.current_time() - started < 51
            # handshake_timeout: a peer that connects and says nothing.
            stream = h.open_stream()
            started = trio.current_time()
            assert await read_raw_frame(stream) == b""
            assert 5 <= trio.current_time() - started < 6


async def test_peer_that_stops_reading_is_cut_off(world: World, store_at: str | Path) -> None:
    # Real clock: the relay fsyncs in a worker thread, which a mock clock would skip past.
    limits = Limits(handshake_timeout=5, frame_timeout=0.5, idle_timeout=60)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            tokyo = await h.connect("tokyo", lockstep=True)  # and never reads again
            seoul = await h.connect("seoul")
            report = seal(world, b"y" * 300_000)
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)
            while h.relay.connection_count > 1:
                await trio.sleep(0.05)
            # Seoul is unaffected.
            await seoul.send(AuditFetch(since=0))
            await expect(seoul, AuditReply)
            del tokyo


async def test_report_size_and_queue_limits(world: World, store_at: str | Path) -> None:
    limits = Limits(handshake_timeout=5, max_report_size=3000, max_queue_per_recipient=2)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=FakeClock()) as h:
            seoul = await h.connect("seoul")
            big = seal(world, b"x" * 5000)
            assert big.size > 3000
            await send_submission(seoul, big)
            refusal = await expect(seoul, Refusal)
            assert (refusal.reason, refusal.ref) == (Reason.LIMIT, big.report_id)
            assert not ciphertext_apart(store_at, big.report_id)
            assert not leftover_uploads(store_at)
            reports = []
            for i in range(3):
                report = seal(world, b"r%d" % i)
                await send_submission(seoul, report)
                await expect(seoul, Stored)
                reports.append(report)
            for i, report in enumerate(reports):
                await seoul.send(Release(token=token_for(world, report, counter=i + 1)))
            assert isinstance(await seoul.receive(), Released)
            assert isinstance(await seoul.receive(), Released)
            assert (await expect(seoul, Refusal)).reason == Reason.QUEUE_FULL
            # The queue drains when Tokyo acks; then the third release goes through.
            from tisa.messages import Ack
            from tisa.token import ReleaseToken

            tokyo = await h.connect("tokyo")
            for _ in range(2):
                token, _ = await receive_delivery(tokyo)
                await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(token).id))
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)
            await seoul.send(Release(token=token_for(world, reports[2], counter=3)))
            await expect(seoul, Released)


async def test_queue_length_stays_exact_across_release_ack_revoke_and_expiry(
    world: World, store_at: str | Path
) -> None:
    # The relay keeps each recipient's queue length instead of counting it on every
    # release; after every kind of change it must equal a fresh count.
    from tisa.messages import Ack, Revoke
    from tisa.token import ReleaseToken

    clock = FakeClock()
    limits = Limits(handshake_timeout=5, max_queue_per_recipient=3)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=clock) as h:
            store = h.relay.store

            def counted() -> int:
                # A fresh query of the deliveries owed, whichever backend.
                return len(store.outstanding("tokyo"))

            def check(expected: int) -> None:
                assert store.queue_length("tokyo") == counted() == expected

            seoul = await h.connect("seoul")
            reports = []
            for i in range(5):
                report = seal(world, b"q%d" % i)
                await send_submission(seoul, report)
                await expect(seoul, Stored)
                reports.append(report)
            tokens = [
                token_for(world, report, counter=i + 1, not_after=NOW + 100 + 1000 * (i == 0))
                for i, report in enumerate(reports)
            ]
            for token in tokens[:3]:
                await seoul.send(Release(token=token))
                await expect(seoul, Released)
            check(3)
            await seoul.send(Release(token=tokens[3]))
            assert (await expect(seoul, Refusal)).reason == Reason.QUEUE_FULL
            check(3)  # a refused release changes nothing
            tokyo = await h.connect("tokyo")
            first, _ = await receive_delivery(tokyo)
            await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(first).id))
            await tokyo.send(AuditFetch(since=0))
            while not isinstance(await tokyo.receive(), AuditReply):
                pass  # the other deliveries (not acked)
            check(2)  # acked
            await tokyo.aclose()
            second = ReleaseToken.decode(tokens[1])
            await seoul.send(Revoke(report=second.report, token=second.id))
            await expect(seoul, Revoked)
            check(1)  # revoked
            clock.now = NOW + 100 + limits.clock_skew + 1
            h.relay.expire_now()
            check(0)  # the third token expired
            await seoul.send(Release(token=token_for(world, reports[3], counter=4,
                                                     not_after=NOW + 10_000)))  # fmt: skip
            await expect(seoul, Expired)
            await expect(seoul, Released)
            check(1)


async def test_python_m_relay(world: World, tmp_path: Path) -> None:
    import nacl.pwhash

    key = tmp_path / "washington.key"
    world.relay_secret.save(
        key,
        "pass",
        name="washington",
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
    )
    signed = SignedArrangement(world.arrangement)
    for name in ("seoul", "tokyo", "washington"):
        signed = signed.signed_by(world.secrets[name], name)
    arrangement_file = tmp_path / "arrangement.tisa"
    arrangement_file.write_bytes(signed.encode())
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "--key",
            str(key),
            "--passphrase-env",
            "RELAY_PASS",
            "--arrangement",
            str(arrangement_file),
            "--store",
            str(tmp_path / "store"),
            "--port",
            "0",  # not the default 7420: other test runs share the machine
            "--port-file",
            str(port_file),
            "--limit",
            "idle_timeout=30",
        ],
        env={**os.environ, "RELAY_PASS": "pass"},
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with trio.fail_after(20):
            while not port_file.exists():
                assert process.poll() is None, process.communicate()
                await trio.sleep(0.05)
            port = int(port_file.read_text())
            link = await tcp_member(world, port, "seoul")
            await link.send(AuditFetch(since=0))
            await expect(link, AuditReply)
            await link.aclose()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert NOW  # the relay ran on the real clock; nothing here depends on it


async def test_delivery_window(world: World, store_at: str | Path) -> None:
    """At most delivery_window deliveries are pushed un-acked on a connection; each ack
    lets one more out."""
    from tisa.messages import Ack
    from tisa.token import ReleaseToken

    limits = Limits(handshake_timeout=5, delivery_window=2)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=FakeClock()) as h:
            seoul = await h.connect("seoul")
            reports = [seal(world, b"w%d" % i) for i in range(4)]
            for i, report in enumerate(reports):
                await send_submission(seoul, report)
                await expect(seoul, Stored)
                await seoul.send(Release(token=token_for(world, report, counter=i + 1)))
                await expect(seoul, Released)
            tokyo = await h.connect("tokyo")
            first, _ = await receive_delivery(tokyo)
            second, _ = await receive_delivery(tokyo)
            # The window is full: nothing more comes until an ack.
            with trio.move_on_after(0.3) as waited:
                await tokyo.receive()
            assert waited.cancelled_caught
            await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(first).id))
            third, _ = await receive_delivery(tokyo)
            with trio.move_on_after(0.3) as waited:
                await tokyo.receive()
            assert waited.cancelled_caught
            for token in (second, third):
                await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(token).id))
            fourth, _ = await receive_delivery(tokyo)
            assert len({first, second, third, fourth}) == 4


async def test_python_m_relay_start_failures_are_one_line(world: World, tmp_path: Path) -> None:
    import socket

    import nacl.pwhash

    signed = SignedArrangement(world.arrangement)
    for name in ("seoul", "tokyo", "washington"):
        signed = signed.signed_by(world.secrets[name], name)
    arrangement_file = tmp_path / "arrangement.tisa"
    arrangement_file.write_bytes(signed.encode())
    for name in ("seoul", "washington"):
        secret = world.secrets[name] if name != "washington" else world.relay_secret
        secret.save(
            tmp_path / f"{name}.key",
            "pass",
            name=name,
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
        )

    def start(
        key: str, *extra: str, store: str = str(tmp_path / "store")
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relay", "--key", str(tmp_path / key),
             "--passphrase-env", "RELAY_PASS", "--arrangement", str(arrangement_file),
             "--store", store, "--port", "0", *extra],
            env={**os.environ, "RELAY_PASS": "pass"},
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    # Not the relay's key: refused when the relay starts, as one line and status 1.
    wrong_key = start("seoul.key")
    assert wrong_key.returncode == 1, wrong_key.stderr
    assert wrong_key.stderr.strip().startswith("Error:")
    assert "Traceback" not in wrong_key.stderr
    # An address already in use: the same.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = start("washington.key", "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1, busy.stderr
    assert "Traceback" not in busy.stderr
    assert busy.stderr.strip().splitlines()[-1].startswith("Error:")
    # A PostgreSQL store that cannot be reached: one line that says so.
    unreachable = start("washington.key", store=f"postgresql://nobody@/none?host={tmp_path}")
    assert unreachable.returncode == 1, unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    last = unreachable.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot reach the relay's PostgreSQL store:"), last


async def test_audit_extracts_queued_per_connection_are_capped(
    world: World, store_at: str | Path
) -> None:
    # Each extract can be ~128 KiB: a member that asks again and again without reading
    # gets `busy` past MAX_QUEUED_AUDIT_REPLIES instead of making the relay hold them all.
    from relay.server import MAX_QUEUED_AUDIT_REPLIES

    with trio.fail_after(10):
        async with running_relay(world, store_at) as h:
            link = await h.connect("seoul", lockstep=True)
            asks = MAX_QUEUED_AUDIT_REPLIES + 4
            for _ in range(asks):
                await link.send(AuditFetch(since=0))
            answers = [await link.receive() for _ in range(asks)]
            extracts = [a for a in answers if isinstance(a, AuditReply)]
            refusals = [a for a in answers if isinstance(a, Refusal)]
            assert len(extracts) + len(refusals) == asks
            # At most one on the wire plus the queued ones; the rest were refused busy.
            assert 1 <= len(extracts) <= MAX_QUEUED_AUDIT_REPLIES + 1
            assert refusals and all(r.reason == Reason.BUSY for r in refusals)


async def test_logged_refusals_per_member_are_rate_limited(
    world: World, store_at: str | Path
) -> None:
    # Every refusal is answered, but a member cannot grow the audit log at will: past
    # max_logged_refusals_per_minute one entry with reason "limit" stands for the rest.
    from tisa.audit import AuditEvent, verify_extract

    cap = 3
    clock = FakeClock()
    limits = Limits(max_logged_refusals_per_minute=cap)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=clock) as h:
            seoul = await h.connect("seoul")
            report = seal(world)  # never submitted: every release is unknown_report

            async def refused_releases(count: int) -> None:
                for i in range(count):
                    await seoul.send(Release(token=token_for(world, report, counter=i + 1)))
                for _ in range(count):
                    refusal = await expect(seoul, Refusal)
                    assert refusal.reason == Reason.UNKNOWN_REPORT

            async def logged_reasons() -> list[str | None]:
                await seoul.send(AuditFetch(since=0))
                reply = await expect(seoul, AuditReply)
                entries, _ = verify_extract(reply.extract, world.arrangement, "seoul")
                return [e.reason for e in entries if e.event is AuditEvent.REFUSED]

            await refused_releases(cap + 4)
            assert await logged_reasons() == ["unknown_report"] * cap + ["limit"]
            clock.now += 60  # a new minute: logged again
            await refused_releases(1)
            assert await logged_reasons() == ["unknown_report"] * cap + ["limit", "unknown_report"]


async def _submit_and_release(world: World, seoul: Link, body: bytes, counter: int) -> bytes:
    report = seal(world, body)
    await send_submission(seoul, report)
    await expect(seoul, Stored)
    token = token_for(world, report, counter=counter)
    await seoul.send(Release(token=token))
    await expect(seoul, Released)
    return token


async def _take(link: Link, token: bytes) -> None:
    """Receive the delivery of ``token`` on ``link`` and ack it."""
    from tisa.messages import Ack
    from tisa.token import ReleaseToken

    assert (await receive_delivery(link))[0] == token
    await link.send(Ack(kind="delivery", token=ReleaseToken.decode(token).id))


async def _nothing_comes(link: Link, seconds: float) -> None:
    with trio.move_on_after(seconds) as waited:
        await link.receive()
    assert waited.cancelled_caught


async def test_a_stale_connection_loses_its_claim(world: World, tmp_path: Path) -> None:
    """Issue 12 item 9: a delivery pushed on a connection that never acks it is pushed
    on the member's live connection after claim_timeout, not after idle_timeout; and
    while the stale one is overdue, new deliveries go to the live one at once."""
    from tisa.messages import Ack
    from tisa.token import ReleaseToken

    limits = Limits(handshake_timeout=5, idle_timeout=60, claim_timeout=0.3)
    with trio.fail_after(10):  # the old relay held the delivery for idle_timeout (60 s)
        async with running_relay(world, tmp_path, limits=limits, clock=FakeClock()) as h:
            seoul = await h.connect("seoul")
            stale = await h.connect("tokyo")
            first = await _submit_and_release(world, seoul, b"first", 1)
            # Pushed on the only connection Tokyo has; it is read but never acked (the
            # relay cannot tell that from a peer that vanished).
            assert (await receive_delivery(stale))[0] == first
            live = await h.connect("tokyo")
            await _take(live, first)
            await _take(live, await _submit_and_release(world, seoul, b"second", 2))
            # The overdue connection was passed over: nothing reached it.
            await _nothing_comes(stale, 3 * limits.claim_timeout)
            # Once it acks what it holds, it takes deliveries again.
            await live.aclose()
            await stale.send(Ack(kind="delivery", token=ReleaseToken.decode(first).id))
            third = await _submit_and_release(world, seoul, b"third", 3)
            assert (await receive_delivery(stale))[0] == third


async def test_a_claim_lapses_while_a_stream_is_not_taken(world: World, tmp_path: Path) -> None:
    """A large delivery stuck on a connection that stopped reading lapses after
    claim_timeout without progress, long before frame_timeout breaks that link."""
    limits = Limits(handshake_timeout=5, idle_timeout=60, frame_timeout=30, claim_timeout=0.3)
    with trio.fail_after(10):  # the old relay waited for frame_timeout (30 s)
        async with running_relay(world, tmp_path, limits=limits, clock=FakeClock()) as h:
            seoul = await h.connect("seoul")
            stale = await h.connect("tokyo", lockstep=True)
            token = await _submit_and_release(world, seoul, b"z" * 300_000, 1)
            # The push started (a stream: the report is over max_inline_report)...
            assert await stale.stream.receive_some(4)
            # ...and stalls: this end reads no more.
            live = await h.connect("tokyo")
            got, ciphertext = await receive_delivery(live)
            assert got == token and len(ciphertext) > 300_000


async def test_sources_are_ipv4_addresses_and_ipv6_prefixes() -> None:
    import socket

    from relay.server import source_key

    assert source_key("192.0.2.7") == "192.0.2.7"
    # One subscriber holds a /64: all of it is one source.
    first = source_key("2001:db8:1:2::1", socket.AF_INET6)
    assert first == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:ffff:1:2:3", socket.AF_INET6) == first
    assert source_key("2001:db8:1:3::1", socket.AF_INET6) != first
    assert source_key("fe80::1%eth0", socket.AF_INET6) == "fe80::/64"
    # An IPv4 peer on a dual-stack socket counts as its IPv4 address.
    assert source_key("::ffff:192.0.2.7", socket.AF_INET6) == "192.0.2.7"


async def test_deliveries_go_to_the_members_newest_connection(world: World, tmp_path: Path) -> None:
    """A member that reconnected after a network drop gets new deliveries on the new
    connection at once, though the old one is still open (and will never ack)."""
    limits = Limits(handshake_timeout=5, idle_timeout=60, claim_timeout=30)
    with trio.fail_after(10):  # far below claim_timeout: no lapse is involved
        async with running_relay(world, tmp_path, limits=limits, clock=FakeClock()) as h:
            seoul = await h.connect("seoul")
            old = await h.connect("tokyo")
            new = await h.connect("tokyo")
            token = await _submit_and_release(world, seoul, b"after the drop", 1)
            assert (await receive_delivery(new))[0] == token
            await _nothing_comes(old, 0.3)


async def test_a_newer_stale_connection_is_passed_over_once_its_claim_lapsed(
    world: World, tmp_path: Path
) -> None:
    """The newest connection is tried first; once a claim of it lapsed, the older live
    one gets the deliveries, until the newer one acks again."""
    from tisa.messages import Ack
    from tisa.token import ReleaseToken

    limits = Limits(handshake_timeout=5, idle_timeout=60, claim_timeout=0.3)
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=limits, clock=FakeClock()) as h:
            seoul = await h.connect("seoul")
            live = await h.connect("tokyo")
            stale = await h.connect("tokyo")  # newer: pushed to first
            first = await _submit_and_release(world, seoul, b"first", 1)
            assert (await receive_delivery(stale))[0] == first  # and not acked
            await _take(live, first)  # after the lapse
            await _take(live, await _submit_and_release(world, seoul, b"second", 2))
            # The newer connection acks late: it is the best connection again.
            await stale.send(Ack(kind="delivery", token=ReleaseToken.decode(first).id))
            await _take(stale, await _submit_and_release(world, seoul, b"third", 3))
            await _nothing_comes(live, 3 * limits.claim_timeout)
