"""Crash safety: SIGKILL the relay or the recipient at chosen and at random moments.

The relay runs as its own process (``tests/nodes/client_crash_relay.py``, which calls
``relay.server.serve``) and is killed at exact points (``TISA_CRASH_AT``) or at random
times, then restarted on the same store and port. The recipient, Tokyo, runs as its own
process too (``tests/nodes/client_crash_member.py``), a tiny application that logs every
report its node hands it. Every test checks that each report the relay acknowledged
reaches the recipient's application exactly once.

TISA_SLOW=1 runs the random loops longer.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterable

import pytest
import trio
from nodes.client_world import LEVEL, SCOPE, make_world

from clients.node import Backoff, Node, open_node
from relay.server import serve
from relay.storage import is_postgresql

ARRANGEMENT, SECRETS = make_world()
FAST = Backoff(initial=0.01, maximum=0.1)
NODES = pathlib.Path(__file__).parent / "nodes"
SLOW = os.environ.get("TISA_SLOW") == "1"
ITERATIONS = 50 if SLOW else 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Child:
    """A helper process started by a test, always killed by the test that started it."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.process: trio.Process | None = None

    async def start(self, crash_at: str = "") -> None:
        env = {**os.environ, "TISA_CRASH_AT": crash_at}
        self.process = await trio.lowlevel.open_process(
            [sys.executable, *self.args], env=env, cwd=NODES
        )

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def died(self, timeout: float = 5) -> int:
        assert self.process is not None
        with trio.fail_after(timeout):
            return await self.process.wait()


class RelayProcess(Child):
    def __init__(self, tmp: pathlib.Path, port: int, store: str | pathlib.Path = "") -> None:
        self.port = port
        self.port_file = tmp / "relay.port"
        super().__init__(
            [
                str(NODES / "client_crash_relay.py"),
                str(store or tmp / "washington"),
                str(self.port_file),
                str(port),
            ]
        )

    async def start(self, crash_at: str = "") -> None:
        self.port_file.unlink(missing_ok=True)
        await super().start(crash_at)
        with trio.fail_after(5):
            while not self.port_file.exists():
                assert self.process is not None and self.process.returncode is None
                await trio.sleep(0.01)


def relay_store(store_at: str | pathlib.Path, tmp: pathlib.Path) -> str | pathlib.Path:
    """The relay's store: the test's PostgreSQL schema, or a directory beside the nodes'."""
    return store_at if is_postgresql(store_at) else tmp / "washington"


class MemberProcess(Child):
    def __init__(self, tmp: pathlib.Path, port: int) -> None:
        self.log = tmp / "tokyo.log"
        super().__init__(
            [str(NODES / "client_crash_member.py"), str(tmp / "tokyo"), str(port), str(self.log)]
        )

    def lines(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []


def node(name: str, port: int, tmp: pathlib.Path) -> contextlib.AbstractAsyncContextManager[Node]:
    return open_node(
        SECRETS[name], name, ARRANGEMENT, ("127.0.0.1", port), tmp / name, backoff=FAST
    )


async def submit(seoul: Node, text: str) -> bytes:
    return await seoul.submit(
        text.encode(), recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
    )


async def receive_all(tokyo: Node, expected: set[bytes], timeout: float = 15) -> list[bytes]:
    """Everything Tokyo's application is handed until ``expected`` is in, plus a moment
    more so a duplicate would show."""
    got: list[bytes] = []
    with trio.fail_after(timeout):
        async for report in tokyo.reports():
            got.append(report.report_id)
            if expected <= set(got):
                break
    with trio.move_on_after(0.3):
        async for report in tokyo.reports():
            got.append(report.report_id)
    return got


def assert_exactly_once(got: Iterable[bytes], expected: set[bytes]) -> None:
    got = list(got)
    assert len(got) == len(set(got)), "a report was handed over twice"
    assert set(got) == expected


@pytest.fixture
async def children() -> AsyncIterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for child in started:
                await child.kill()


# --- the relay killed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    ["after_store_before_ack", "after_consume_before_forward", "during_forward", "after_forward"],
)
async def test_relay_killed_at_a_chosen_point(
    point: str, tmp_path: pathlib.Path, children: list[Child], store_at: str | pathlib.Path
) -> None:
    relay = RelayProcess(tmp_path, free_port(), relay_store(store_at, tmp_path))
    children.append(relay)
    with trio.fail_after(30):
        await relay.start(crash_at=point)
        async with (
            node("seoul", relay.port, tmp_path) as seoul,
            node("tokyo", relay.port, tmp_path) as tokyo,
        ):
            await tokyo.wait_connected()
            ids = {await submit(seoul, f"report {i}") for i in range(3)}
            assert await relay.died() == -signal.SIGKILL
            await relay.start()
            for report_id in ids:
                await seoul.wait_stored(report_id)
            assert_exactly_once(await receive_all(tokyo, ids), ids)


@pytest.mark.parametrize("point", ["mid_batch", "after_batch"])
async def test_relay_killed_around_a_group_commit(
    point: str, tmp_path: pathlib.Path, children: list[Child], store_at: str | pathlib.Path
) -> None:
    """Several submissions and releases in one batch: killed before its commit (all of
    it lost, none of it answered) or after it (all on disk, none answered); either way
    every report arrives exactly once."""
    relay = RelayProcess(tmp_path, free_port(), relay_store(store_at, tmp_path))
    children.append(relay)
    with trio.fail_after(30):
        async with (
            node("seoul", relay.port, tmp_path) as seoul,
            node("tokyo", relay.port, tmp_path) as tokyo,
        ):
            # Queued while the relay is down, so they go out back to back on connect.
            ids = {await submit(seoul, f"report {i}") for i in range(8)}
            await relay.start(crash_at=point)
            assert await relay.died() == -signal.SIGKILL
            await relay.start()
            for report_id in ids:
                await seoul.wait_stored(report_id)
            assert_exactly_once(await receive_all(tokyo, ids), ids)


async def test_relay_killed_at_random_times(
    tmp_path: pathlib.Path, children: list[Child], store_at: str | pathlib.Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    relay = RelayProcess(tmp_path, free_port(), relay_store(store_at, tmp_path))
    children.append(relay)
    submitted: list[bytes] = []
    got: list[bytes] = []
    with trio.fail_after(30 + 3 * ITERATIONS):
        await relay.start()
        async with (
            node("seoul", relay.port, tmp_path) as seoul,
            node("tokyo", relay.port, tmp_path) as tokyo,
            trio.open_nursery() as nursery,
        ):

            async def produce() -> None:
                for i in range(4 * ITERATIONS):
                    submitted.append(await submit(seoul, f"report {i}"))
                    await trio.sleep(rng.uniform(0, 0.03))

            async def consume() -> None:
                async for report in tokyo.reports():
                    got.append(report.report_id)

            nursery.start_soon(produce)
            nursery.start_soon(consume)
            for _ in range(ITERATIONS):
                await trio.sleep(rng.uniform(0.02, 0.25))
                await relay.kill()
                await relay.start()
            while len(submitted) < 4 * ITERATIONS or not set(submitted) <= set(got):
                await trio.sleep(0.05)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
            for report_id in submitted:
                await seoul.wait_stored(report_id)
    assert len(got) == len(set(got)), f"duplicate delivery (seed {seed})"
    assert set(got) == set(submitted), f"seed {seed}"


# --- the recipient killed --------------------------------------------------------------


def assert_log_exactly_once(lines: list[str], expected: set[bytes], note: str = "") -> None:
    """Each report once, except the one documented case: the application logged a report
    and was killed before asking for the next, so the node had not yet recorded the
    hand-over; that report comes again first after the restart (``X start... X``)."""
    assert {line for line in lines if line != "start"} == {r.hex() for r in expected}, note
    previous: str | None = None
    restarted = False
    seen: set[str] = set()
    for line in lines:
        if line == "start":
            restarted = True
            continue
        if line in seen:
            assert restarted and previous == line, f"{line} handed over twice ({note}): {lines}"
        seen.add(line)
        previous, restarted = line, False


async def test_recipient_killed_after_store_before_ack(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    tokyo = MemberProcess(tmp_path, port)
    children.append(tokyo)
    with trio.fail_after(20):
        await tokyo.start(crash_at="stored_before_ack")
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await submit(seoul, "stored, then the lights went out")
            assert await tokyo.died() == -signal.SIGKILL
            await tokyo.start()
            while report_id.hex() not in tokyo.lines():
                await trio.sleep(0.02)
            await trio.sleep(0.3)
    assert tokyo.lines() == ["start", "start", report_id.hex()]


async def test_recipient_killed_at_random_times(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    tokyo = MemberProcess(tmp_path, port)
    children.append(tokyo)
    with trio.fail_after(30 + 3 * ITERATIONS):
        async with node("seoul", port, tmp_path) as seoul:
            ids: set[bytes] = set()
            await tokyo.start()
            for _ in range(ITERATIONS):
                for i in range(3):
                    ids.add(await submit(seoul, f"report {len(ids)} {i}"))
                await trio.sleep(rng.uniform(0.05, 0.4))
                await tokyo.kill()
                await tokyo.start()
            expected = {r.hex() for r in ids}
            while not expected <= set(tokyo.lines()):
                await trio.sleep(0.05)
            await trio.sleep(0.3)
    assert_log_exactly_once(tokyo.lines(), ids, f"seed {seed}")
