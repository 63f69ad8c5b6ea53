"""Crash safety: SIGKILL the relay or the recipient at chosen and at random moments.

The relay runs as its own process (``tests/nodes/client_crash_relay.py``, which calls
``relay.server.serve``) and is killed at exact points (``TISA_CRASH_AT``) or at random
times, then restarted on the same store and port. The recipient, Tokyo, runs as its own
process too (``tests/nodes/client_crash_member.py``), a tiny application that records
every report its node hands it, then acknowledges it (``Node.ack``). Every test checks
that each report the relay acknowledged reaches the recipient's application, and that
it reaches it again only in the one documented case: the application was stopped
after recording it and before its acknowledgement was on disk.

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

    async def died(self, timeout: float = 30) -> int:
        assert self.process is not None
        with trio.fail_after(timeout):
            return await self.process.wait()


class RelayProcess(Child):
    def __init__(self, tmp: pathlib.Path, port: int) -> None:
        self.port = port
        self.port_file = tmp / "relay.port"
        super().__init__(
            [
                str(NODES / "client_crash_relay.py"),
                str(tmp / "washington"),
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


class MemberProcess(Child):
    def __init__(self, tmp: pathlib.Path, port: int) -> None:
        self.log = tmp / "tokyo.log"
        super().__init__(
            [str(NODES / "client_crash_member.py"), str(tmp / "tokyo"), str(port), str(self.log)]
        )

    def lines(self) -> list[str]:
        """The application's log so far; fails at once if the process died on its own
        (a crash of the application must not read as a slow test)."""
        assert self.process is None or self.process.returncode is None, "Tokyo's process died"
        return self.log.read_text().splitlines() if self.log.exists() else []


def node(name: str, port: int, tmp: pathlib.Path) -> contextlib.AbstractAsyncContextManager[Node]:
    return open_node(
        SECRETS[name], name, ARRANGEMENT, ("127.0.0.1", port), tmp / name, backoff=FAST
    )


async def submit(seoul: Node, text: str) -> bytes:
    return await seoul.submit(
        text.encode(), recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
    )


async def receive_all(tokyo: Node, expected: set[bytes], timeout: float = 15) -> list[bytes]:
    """Everything Tokyo's application is handed (and acknowledges) until ``expected`` is
    in, plus a moment more so a duplicate would show."""
    got: list[bytes] = []
    with trio.fail_after(timeout):
        async for report in tokyo.reports():
            got.append(report.report_id)
            await tokyo.ack(report)
            if expected <= set(got):
                break
    with trio.move_on_after(0.3):
        async for report in tokyo.reports():
            got.append(report.report_id)
            await tokyo.ack(report)
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
    point: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    relay = RelayProcess(tmp_path, free_port())
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
    point: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    """Several submissions and releases in one batch: killed before its commit (all of
    it lost, none of it answered) or after it (all on disk, none answered); either way
    every report arrives exactly once."""
    relay = RelayProcess(tmp_path, free_port())
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


async def test_relay_killed_at_random_times(tmp_path: pathlib.Path, children: list[Child]) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    relay = RelayProcess(tmp_path, free_port())
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
                    await tokyo.ack(report)

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
    """Each report recorded, and recorded again only in the one documented case: the
    application recorded it and was killed before its acknowledgement returned, so the
    report comes again first after the restart (``X start ... X``, with no ``ack X``
    between). A report whose ``ack`` line was written is never recorded again."""
    records = [line for line in lines if line != "start" and not line.startswith("ack ")]
    assert set(records) == {r.hex() for r in expected}, note
    acked: set[str] = set()
    seen: set[str] = set()
    previous: str | None = None
    restarted = False
    for line in lines:
        if line == "start":
            restarted = True
            continue
        if line.startswith("ack "):
            acked.add(line[4:])
        elif line in seen:
            assert line not in acked, f"{line} handed over after its ack ({note}): {lines}"
            assert restarted and previous == line, f"{line} handed over twice ({note}): {lines}"
        seen.add(line)
        previous, restarted = line, False


async def run_recipient_crash(
    port: int, tmp_path: pathlib.Path, children: list[Child], point: str, count: int
) -> tuple[list[bytes], list[str]]:
    """Seoul sends ``count`` reports to Tokyo's process, which kills itself at ``point``
    and is restarted; returns the report ids and Tokyo's log once all are recorded and
    the last one acknowledged."""
    tokyo = MemberProcess(tmp_path, port)
    children.append(tokyo)
    # Generous: a safety net on a shared machine, not a speed check.
    with trio.fail_after(90):
        await tokyo.start(crash_at=point)
        async with node("seoul", port, tmp_path) as seoul:
            ids = [await submit(seoul, f"report {i}") for i in range(count)]
            assert await tokyo.died() == -signal.SIGKILL
            await tokyo.start()
            expected = {r.hex() for r in ids} | {f"ack {ids[-1].hex()}"}
            while not expected <= set(tokyo.lines()):
                await trio.sleep(0.02)
            await trio.sleep(0.3)  # so a report handed over again would show
    return ids, tokyo.lines()


async def test_recipient_killed_after_store_before_ack(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    [report_id], lines = await run_recipient_crash(port, tmp_path, children, "stored_before_ack", 1)
    assert lines == ["start", "start", report_id.hex(), f"ack {report_id.hex()}"]


async def test_a_report_acknowledged_is_not_handed_over_again_after_a_kill(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    """The application recorded and acknowledged the first report and was killed before
    it asked for the next: the first one never comes again (before Node.ack, a report
    counted as handed over only when the next was asked for, and came twice)."""
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    ids, lines = await run_recipient_crash(port, tmp_path, children, "after_ack", 2)
    first, second = (r.hex() for r in ids)
    assert lines == ["start", first, "start", second, f"ack {second}"]


async def test_a_report_recorded_but_not_acknowledged_comes_again_after_a_kill(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    """The documented window: killed between its record and its acknowledgement, the
    application is handed the report again, first, after the restart (never lost)."""
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    ids, lines = await run_recipient_crash(port, tmp_path, children, "after_record", 2)
    first, second = (r.hex() for r in ids)
    assert lines == ["start", first, "start", first, f"ack {first}", second, f"ack {second}"]
    assert_log_exactly_once(lines, set(ids))


async def test_recipient_killed_at_random_times(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    """Seoul sends all along; Tokyo's process is killed at a random moment once its
    application is at work (Python's start-up alone can outlast a short random delay,
    which would kill it before it took anything), so kills land between its records,
    its acks and its requests for the next report."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    tokyo = MemberProcess(tmp_path, port)
    children.append(tokyo)
    ids: list[bytes] = []
    stop = trio.Event()
    with trio.fail_after(60 + 5 * ITERATIONS):
        async with node("seoul", port, tmp_path) as seoul:

            async def produce() -> None:
                # Stopped between submissions, never in one: every report sent is in ids.
                while not stop.is_set():
                    ids.append(await submit(seoul, f"report {len(ids)}"))
                    await trio.sleep(rng.uniform(0.005, 0.03))

            async with trio.open_nursery() as producers:
                producers.start_soon(produce)
                for starts in range(1, ITERATIONS + 1):
                    await tokyo.start()
                    while (lines := tokyo.lines()).count("start") < starts or lines[-1] == "start":
                        await trio.sleep(0.01)
                    await trio.sleep(rng.uniform(0, 0.1))
                    await tokyo.kill()
                stop.set()
            await tokyo.start()
            # Every report recorded and the last record acknowledged. (A kill may come
            # after an ack returned and before its line was written: that report is
            # taken, rightly not handed over again, and has no ``ack`` line.)
            expected = {r.hex() for r in ids}
            while not (expected <= set(lines := tokyo.lines()) and lines[-1].startswith("ack ")):
                await trio.sleep(0.05)
            await trio.sleep(0.3)
    assert_log_exactly_once(tokyo.lines(), set(ids), f"seed {seed}")
