"""Token reuse at the real relay: one token, 100 concurrent redemptions, a relay restart
(a crash, cancelled at a chosen moment) in the middle, and exactly one release.

tests/test_relay_server.py::test_concurrent_redemptions_one_success covers 100 at once
on a running relay and ::test_replay_refused_also_after_restart a replay after a clean
restart; here the relay dies while redemptions are in flight and the members retry on
the restarted relay, as a real node does.
"""

from __future__ import annotations

import pathlib
from collections.abc import Awaitable, Callable

import pytest
import trio

from relay.server import serve
from relay.storage import is_postgresql
from tisa.errors import ProtocolError, Reason, TisaError
from tisa.limits import Limits
from tisa.messages import (
    MAX_CHUNK_DATA,
    Ack,
    AuditFetch,
    AuditReply,
    Chunk,
    DeliverInline,
    Message,
    Refusal,
    Release,
    Released,
    Stored,
    SubmitBegin,
    SubmitEnd,
)
from tisa.token import ReleaseToken
from tisa_io.link import Link, LinkClosed, connect_member
from tisa_testing.world import World, make_world

LIMITS = Limits(handshake_timeout=30, frame_timeout=30, max_connections_per_member=256)


class RelayProcess:
    """A relay on one store that can be killed (cancelled) and started again."""

    def __init__(self, nursery: trio.Nursery, world: World, store: str | pathlib.Path) -> None:
        self.nursery, self.world, self.store = nursery, world, store
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    async def start(self) -> None:
        world = self.world
        self._done = trio.Event()

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with trio.CancelScope() as self._scope:
                    await serve(
                        world.secrets["washington"],
                        world.arrangement,
                        self.store,
                        port=self.port,
                        limits=LIMITS,
                        clock=lambda: float(world.now),
                        task_status=task_status,
                    )
            finally:
                self._done.set()

        self.port = await self.nursery.start(run)

    async def kill(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self._done.wait()

    async def connect(self, name: str) -> Link:
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        w = self.world
        return await connect_member(stream, w.secrets[name], name, w.arrangement, limits=LIMITS)


async def expect(link: Link, kind: type[Message]) -> Message:
    while True:
        message = await link.receive()
        if isinstance(message, kind | Refusal):
            return message


async def redeem(relay: RelayProcess, token: bytes) -> str:
    """One member connection redeeming ``token``: released, replayed, or lost (the
    relay died before answering)."""
    try:
        async with await relay.connect("seoul") as link:
            await link.send(Release(token=token))
            reply = await expect(link, Released)
    except (LinkClosed, ProtocolError, OSError, TisaError):
        return "lost"
    if isinstance(reply, Released):
        return "released"
    assert isinstance(reply, Refusal)
    assert reply.reason == Reason.REPLAYED, reply
    return "replayed"


async def gather(count: int, job: Callable[[], Awaitable[str]]) -> list[str]:
    results: list[str] = []

    async def one() -> None:
        results.append(await job())

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


@pytest.mark.parametrize("kill_after", [0.0, 0.02, 0.05, 0.15])
async def test_one_token_100_redemptions_across_a_relay_crash(
    nursery: trio.Nursery,
    tmp_path: pathlib.Path,
    kill_after: float,
    store_at: str | pathlib.Path,
) -> None:
    world = make_world()
    store = store_at if is_postgresql(store_at) else tmp_path / "relay"
    relay = RelayProcess(nursery, world, store)
    report = world.seal(b"released exactly once")
    token = world.token(report, "tokyo")
    token_id = ReleaseToken.decode(token).id
    with trio.fail_after(30):
        await relay.start()
        async with await relay.connect("seoul") as seoul:
            async with seoul.sending():
                await seoul.send(
                    SubmitBegin(
                        report=report.report_id,
                        size=report.size,
                        digest=report.digest,
                        expires=world.now + 3600,
                    )
                )
                for i in range(0, report.size, MAX_CHUNK_DATA):
                    await seoul.send(Chunk(data=report.ciphertext[i : i + MAX_CHUNK_DATA]))
                await seoul.send(SubmitEnd(report=report.report_id))
            assert isinstance(await expect(seoul, Stored), Stored)

        # 50 redemptions race each other; the relay dies while they are in flight.
        first: list[str] = []

        async def first_round() -> None:
            first.extend(await gather(50, lambda: redeem(relay, token)))

        async with trio.open_nursery() as inner:
            inner.start_soon(first_round)
            await trio.sleep(kill_after)
            await relay.kill()
        # Restarted on the same store: every lost redemption retries, with 50 more.
        await relay.start()
        lost = first.count("lost")
        second = await gather(50 + lost, lambda: redeem(relay, token))
        results = [r for r in first if r != "lost"] + second
        assert len(results) == 100
        # At most one "released" answer: none if the relay consumed the token and died
        # before answering (the node then takes "replayed" for its own token as done).
        assert results.count("released") <= 1
        assert results.count("replayed") == 100 - results.count("released")

        # And the token was consumed exactly once: Tokyo gets exactly one delivery.
        async with await relay.connect("tokyo") as tokyo:
            message = await tokyo.receive()
            assert isinstance(message, DeliverInline) and message.token == token
            await tokyo.send(Ack(kind="delivery", token=token_id))
            await tokyo.send(AuditFetch(since=0))
            assert isinstance(await tokyo.receive(), AuditReply)  # no second delivery first
