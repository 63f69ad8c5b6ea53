"""Run a :class:`relay.server.Relay` in a test and drive members against it.

Members here are ``tisa_io.link`` links plus the protocol core, without the client
node, so the relay is tested on its own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing
from nodes.relay_helpers import NOW, FakeClock, World

from relay.server import Relay
from relay.store import Store
from tisa.limits import DEFAULT_LIMITS, Limits
from tisa.messages import (
    MAX_CHUNK_DATA,
    Chunk,
    Deliver,
    DeliverEnd,
    DeliverInline,
    Message,
    SubmitBegin,
    SubmitEnd,
)
from tisa.report import SealedReport
from tisa_io.link import Link, connect_member

M = TypeVar("M", bound=Message)


class Harness:
    def __init__(
        self,
        world: World,
        path: Path,
        nursery: trio.Nursery,
        *,
        limits: Limits,
        clock: FakeClock,
        **relay_args: Any,
    ) -> None:
        self.world = world
        self.path = path
        self.limits = limits
        self.clock = clock
        self.nursery = nursery
        self.relay_args = relay_args
        self.relay = self._new_relay()
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._conn_nursery: trio.Nursery | None = None

    def _new_relay(self) -> Relay:
        return Relay(
            self.world.relay_secret,
            self.world.arrangement,
            self.path,
            limits=self.limits,
            clock=self.clock,
            **self.relay_args,
        )

    async def _run_connections(self, *, task_status: trio.TaskStatus[None]) -> None:
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._conn_nursery = nursery
                    task_status.started()
                    await trio.sleep_forever()
        finally:
            self._done.set()

    async def start(self) -> None:
        await self.nursery.start(self._run_connections)

    async def stop(self) -> None:
        self._scope.cancel()
        await self._done.wait()
        self.relay.close()

    async def restart(self) -> None:
        """Stop the relay (all connections) and start a new one on the same store."""
        await self.stop()
        self.relay = self._new_relay()
        await self.start()

    def open_stream(self, *, lockstep: bool = False, source: str | None = None) -> trio.abc.Stream:
        """A raw stream to the relay, for misbehaving peers. ``lockstep``: sends block
        until the other side reads (as a full TCP window does). ``source``: the address
        it counts as coming from (by default all memory streams share one)."""
        assert self._conn_nursery is not None
        make = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = make()
        self._conn_nursery.start_soon(
            functools.partial(self.relay.handle_stream, server, source=source)
        )
        return client

    async def connect(
        self, name: str, *, lockstep: bool = False, source: str | None = None
    ) -> Link:
        return await connect_member(
            self.open_stream(lockstep=lockstep, source=source),
            self.world.secrets[name],
            name,
            self.world.arrangement,
            limits=self.limits,
        )


@contextlib.asynccontextmanager
async def running_relay(
    world: World,
    path: Path,
    *,
    limits: Limits = DEFAULT_LIMITS,
    clock: FakeClock | None = None,
    **relay_args: Any,
) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        harness = Harness(
            world, path, nursery, limits=limits, clock=clock or FakeClock(), **relay_args
        )
        await harness.start()
        try:
            yield harness
        finally:
            await harness.stop()


async def expect(link: Link, kind: type[M]) -> M:
    message = await link.receive()
    assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
    return message


async def send_submission(
    link: Link, sealed: SealedReport, *, expires: int = NOW + 3600, data: bytes | None = None
) -> None:
    data = sealed.ciphertext if data is None else data
    async with link.sending():
        await link.send(
            SubmitBegin(
                report=sealed.report_id, size=len(data), digest=sealed.digest, expires=expires
            )
        )
        for start in range(0, len(data), MAX_CHUNK_DATA):
            await link.send(Chunk(data=data[start : start + MAX_CHUNK_DATA]))
        await link.send(SubmitEnd(report=sealed.report_id))


async def receive_delivery(link: Link) -> tuple[bytes, bytes]:
    """Read one delivery, inline (``deliver_inline``) or streamed: (encoded token,
    ciphertext)."""
    deliver = await link.receive()
    if isinstance(deliver, DeliverInline):
        return deliver.token, deliver.data
    assert isinstance(deliver, Deliver), f"expected a delivery, got {deliver!r}"
    parts = []
    while True:
        message = await link.receive()
        if isinstance(message, DeliverEnd):
            return deliver.token, b"".join(parts)
        assert isinstance(message, Chunk), message
        parts.append(message.data)


@contextlib.contextmanager
def statements(h: Harness) -> Iterator[list[str]]:
    """The statements the relay's SQLite store runs inside the block."""
    store = h.relay.store
    assert isinstance(store, Store)
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        store._db.set_trace_callback(None)
