"""pytest fixtures for testing a client against tisa: an arrangement, a relay, a hostile one.

Installed as the pytest plugin ``tisa`` (entry point ``pytest11``), so any test suite in
an environment with ``tisa-relay`` installed has these fixtures. The async ones need
pytest-trio (``trio_mode = true``, or mark the tests ``@pytest.mark.trio``)::

    async def test_my_client_refuses_a_swapped_recipient(tisa_world, hostile_relay):
        port = await hostile_relay(SwapRecipients({"tokyo": "seoul"}))
        ...  # connect your client as "seoul" to 127.0.0.1:port, expect a refusal

    async def test_three_nodes(tisa_relay, tisa_node):
        async with tisa_node("seoul") as seoul, tisa_node("tokyo") as tokyo:
            await seoul.submit(b"...", recipients=["tokyo"], scope="nk.missile",
                               level="secret", release_to=["tokyo"])
            async for report in tokyo.reports():
                ...
                await tokyo.ack(report)

Fixtures:

* ``tisa_world``: a :class:`tisa_testing.world.World` (Seoul, Tokyo, Washington as the
  relay, Canberra as a recipient; fixed keys; ``world.now`` is the clock every node and
  relay started here uses).
* ``tisa_trio``: ``(arrangement, secrets)`` of that world, for clients that bring their
  own plumbing.
* ``tisa_relay``: an honest relay (:func:`relay.server.serve`) on 127.0.0.1, port 0;
  returns its port.
* ``hostile_relay``: a factory; ``await hostile_relay(behaviour)`` starts a
  :class:`tisa_testing.relay.HostileRelay` and returns its port (the relay itself is
  ``hostile_relay.relay``).
* ``tisa_node``: a factory; ``tisa_node(name)`` is an async context manager running the
  reference member node connected to the last relay started.

Only this module and :mod:`tisa_testing.relay` import trio among ``tisa`` modules; the
relay and node modules are imported when a fixture is first used.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest

from tisa.arrangement import Arrangement
from tisa.keys import MemberSecret
from tisa_testing.world import World, make_world

if TYPE_CHECKING:
    import trio

    from clients.node import Node
    from tisa_testing.relay import Behaviour, HostileRelay

__all__ = ["HostileRelayFactory", "NodeFactory", "RelayHandle"]


class RelayHandle:
    """Where the relay of a test runs; shared by ``tisa_relay``, ``hostile_relay`` and
    ``tisa_node`` (nodes connect to the last relay started)."""

    def __init__(self, world: World, nursery: trio.Nursery, tmp: pathlib.Path) -> None:
        self.world = world
        self.nursery = nursery
        self.tmp = tmp
        self.port = 0
        self.relay: HostileRelay | None = None
        self._count = 0

    def _store(self) -> pathlib.Path:
        self._count += 1
        return self.tmp / f"relay-{self._count}"

    async def start_honest(self) -> int:
        """Start an honest relay (:func:`relay.server.serve`) for the world in the test's nursery.

        It listens on 127.0.0.1, port 0, keeps a fresh store under the test's temporary
        folder and reads ``world.now`` as its clock; nodes started afterwards connect to it.

        Returns:
            Its port (also kept in :attr:`port`).

        Raises:
            As :func:`relay.server.serve` before it listens (OSError: the port cannot be bound).

        Cancellation: before the relay listens, no relay is left running and :attr:`port` is
        unchanged.
        """
        import trio

        from relay.server import serve

        world = self.world

        async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(
                world.secrets[world.relay],
                world.arrangement,
                self._store(),
                clock=lambda: float(world.now),
                expiry_interval=0.05,
                task_status=task_status,
            )

        self.port = await self.nursery.start(run)
        return self.port

    async def start_hostile(self, behaviour: Behaviour | None = None, **kwargs: Any) -> int:
        """Start a :class:`tisa_testing.relay.HostileRelay` for the world in the test's nursery.

        Args:
            behaviour: its misbehaviour (None: honest hooks).
            **kwargs: passed to :func:`tisa_testing.relay.start_hostile_relay`.

        Returns:
            Its port (also kept in :attr:`port`; the relay is kept in :attr:`relay`). Nodes
            started afterwards connect to it.

        Raises:
            As :func:`relay.server.serve` before it listens (OSError: the port cannot be
            bound).

        Cancellation: before the relay listens, no relay is left running and :attr:`port` and
        :attr:`relay` are unchanged.
        """
        from tisa_testing.relay import start_hostile_relay

        self.relay, self.port = await start_hostile_relay(
            self.nursery, self.world, self._store(), behaviour, **kwargs
        )
        return self.port


class HostileRelayFactory:
    """``await hostile_relay(behaviour)`` starts a hostile relay and returns its port."""

    def __init__(self, handle: RelayHandle) -> None:
        self._handle = handle

    async def __call__(self, behaviour: Behaviour | None = None, **kwargs: Any) -> int:
        return await self._handle.start_hostile(behaviour, **kwargs)

    @property
    def relay(self) -> HostileRelay:
        """The hostile relay started last (its ``log``, ``store``, ``behaviour``)."""
        if self._handle.relay is None:
            raise RuntimeError("no hostile relay started yet")
        return self._handle.relay


NodeFactory = Callable[..., contextlib.AbstractAsyncContextManager["Node"]]


@pytest.fixture
def tisa_world() -> World:
    """The story's arrangement with Canberra as a fourth member (recipient only)."""
    return make_world(third_party=True)


@pytest.fixture
def tisa_trio(tisa_world: World) -> tuple[Arrangement, dict[str, MemberSecret]]:
    """``(arrangement, secrets by member name)`` of ``tisa_world``."""
    return tisa_world.arrangement, tisa_world.secrets


@pytest.fixture
def _tisa_handle(tisa_world: World, nursery: trio.Nursery, tmp_path: pathlib.Path) -> RelayHandle:
    return RelayHandle(tisa_world, nursery, tmp_path)


@pytest.fixture
async def tisa_relay(_tisa_handle: RelayHandle) -> int:
    """An honest relay for ``tisa_world`` on 127.0.0.1; the value is its port."""
    return await _tisa_handle.start_honest()


@pytest.fixture
def hostile_relay(_tisa_handle: RelayHandle) -> HostileRelayFactory:
    """A factory: ``port = await hostile_relay(behaviour)``."""
    return HostileRelayFactory(_tisa_handle)


@pytest.fixture
def tisa_node(_tisa_handle: RelayHandle, tmp_path: pathlib.Path) -> NodeFactory:
    """A factory: ``async with tisa_node("tokyo") as node:`` runs the reference node
    for that member against the last relay started (``port=`` to choose another)."""

    @contextlib.asynccontextmanager
    async def node(name: str, *, port: int | None = None, **kwargs: Any) -> AsyncIterator[Node]:
        from tisa_testing.relay import open_member

        if not (port or _tisa_handle.port):
            raise RuntimeError("start tisa_relay or hostile_relay before a node")
        async with open_member(
            _tisa_handle.world,
            name,
            port or _tisa_handle.port,
            tmp_path / f"node-{name}",
            **kwargs,
        ) as running:
            yield running

    return node
