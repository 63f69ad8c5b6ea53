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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import pytest
import trio
from nodes.client_world import LEVEL, SCOPE, make_world
from test_three_nodes import next_event

from clients.events import AnnouncementEvent, ApprovedEvent, DeniedEvent, RequestEvent
from clients.node import Backoff, Node, open_node
from relay.server import serve
from relay.storage import is_postgresql, open_store
from tisa.limits import MAX_INLINE_CIPHERTEXT
from tisa_testing.pg_server import PgServer

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
        """The application's log so far; fails at once if the process died on its own
        (a crash of the application must not read as a slow test)."""
        assert self.process is None or self.process.returncode is None, "Tokyo's process died"
        return self.log.read_text().splitlines() if self.log.exists() else []


def node(
    name: str, port: int | list[int], tmp: pathlib.Path
) -> contextlib.AbstractAsyncContextManager[Node]:
    """A member's node on the relay at ``port``, or on relay processes at ``port``s."""
    ports = port if isinstance(port, list) else [port]
    addresses = [("127.0.0.1", each) for each in ports]
    return open_node(SECRETS[name], name, ARRANGEMENT, addresses, tmp / name, backoff=FAST)


async def submit(seoul: Node, text: str, size: int = 0) -> bytes:
    """Submit ``text`` (padded to ``size`` bytes) released to Tokyo at once."""
    return await seoul.submit(
        text.encode().ljust(size, b"."),
        recipients=["tokyo"],
        scope=SCOPE,
        level=LEVEL,
        release_to=["tokyo"],
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
    [
        "after_store_before_ack",
        "after_consume_before_forward",
        "during_forward",
        "after_forward",
        "receipt_before_commit",
        "receipt_after_commit",
    ],
)
async def test_relay_killed_at_a_chosen_point(
    point: str, tmp_path: pathlib.Path, children: list[Child], store_at: str | pathlib.Path
) -> None:
    """Every report is handed over once, its receipt reaches the originator, and the
    relay ends with every delivery acked. At the receipt points (protocol version 4: the
    recipient's receipt is also its delivery's ack, a step of the relay's open batch like
    the receipt) the relay is killed before that batch's commit (the ack lost with it:
    the delivery comes again, and the unconfirmed receipt is resent) or just after it."""
    relay = RelayProcess(tmp_path, free_port(), relay_store(store_at, tmp_path))
    children.append(relay)
    with trio.fail_after(30):
        await relay.start(crash_at=point)
        async with (
            node("seoul", relay.port, tmp_path) as seoul,
            node("tokyo", relay.port, tmp_path) as tokyo,
        ):
            await tokyo.wait_connected()
            # Killed during a delivery: one that streams (over MAX_INLINE_CIPHERTEXT);
            # at the other points small reports, which travel inline.
            size = MAX_INLINE_CIPHERTEXT + 1 if point == "during_forward" else 0
            ids = {await submit(seoul, f"report {i}", size) for i in range(3)}
            assert await relay.died() == -signal.SIGKILL
            await relay.start()
            for report_id in ids:
                await seoul.wait_stored(report_id)
            assert_exactly_once(await receive_all(tokyo, ids), ids)
            while len(seoul.store.receipts()) < len(ids):
                await trio.sleep(0.05)
            while tokyo.store.receipts_to_send():
                await trio.sleep(0.05)  # every receipt confirmed by the relay
            token_ids = [r.token for i in ids for r in seoul.store.releases_of(i)]
    await relay.kill()
    store = open_store(relay_store(store_at, tmp_path), group_commit=False)
    try:
        states = [getattr(store.token(token_id), "state", None) for token_id in token_ids]
    finally:
        store.close()
    assert states == ["acked"] * len(ids)


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


async def flow(
    port: int | list[int],
    tmp: pathlib.Path,
    count: int,
    pause: Callable[[], float],
    disturb: Callable[[list[bytes]], Awaitable[None]],
) -> tuple[list[bytes], list[bytes]]:
    """Seoul submits ``count`` reports to Tokyo through the relay at ``port`` (``pause()``
    seconds apart) while ``disturb(got)`` runs, until every report arrived; what was
    submitted, and what Tokyo's application was handed."""
    submitted: list[bytes] = []
    got: list[bytes] = []
    async with (
        node("seoul", port, tmp) as seoul,
        # Several relay processes: Tokyo lists them the other way round, so the two
        # members start on different ones.
        node("tokyo", port[::-1] if isinstance(port, list) else port, tmp) as tokyo,
        trio.open_nursery() as nursery,
    ):

        async def produce() -> None:
            for i in range(count):
                submitted.append(await submit(seoul, f"report {i}"))
                await trio.sleep(pause())

        async def consume() -> None:
            async for report in tokyo.reports():
                got.append(report.report_id)
                await tokyo.ack(report)

        nursery.start_soon(produce)
        nursery.start_soon(consume)
        await disturb(got)
        while len(submitted) < count or not set(submitted) <= set(got):
            await trio.sleep(0.05)
        await trio.sleep(0.3)  # so that a duplicate would show
        nursery.cancel_scope.cancel()
        for report_id in submitted:
            await seoul.wait_stored(report_id)
    return submitted, got


async def test_relay_killed_at_random_times(
    tmp_path: pathlib.Path, children: list[Child], store_at: str | pathlib.Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    relay = RelayProcess(tmp_path, free_port(), relay_store(store_at, tmp_path))
    children.append(relay)
    with trio.fail_after(30 + 3 * ITERATIONS):
        await relay.start()

        async def kill_and_restart(got: list[bytes]) -> None:
            for _ in range(ITERATIONS):
                await trio.sleep(rng.uniform(0.02, 0.25))
                await relay.kill()
                await relay.start()

        submitted, got = await flow(
            relay.port, tmp_path, 4 * ITERATIONS, lambda: rng.uniform(0, 0.03), kill_and_restart
        )
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


async def test_reports_acknowledged_together_come_again_after_a_kill_inside_ack_many(
    nursery: trio.Nursery, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    """Killed inside ``ack_many`` before it returned (both marked in the open batch, not
    committed): both reports are handed over again after the restart, none lost."""
    port = await nursery.start(serve, SECRETS["washington"], ARRANGEMENT, tmp_path / "washington")
    ids, lines = await run_recipient_crash(port, tmp_path, children, "in_ack_many", 2)
    first, second = (r.hex() for r in ids)
    again = ["start", first, f"ack {first}", second, f"ack {second}"]
    assert lines == ["start", first, second, *again]


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


# --- several relay processes on one database ---------------------------------------------


async def two_relays(store: str, tmp: pathlib.Path, children: list[Child]) -> list[RelayProcess]:
    """Two relay processes of the arrangement on one store, started."""
    relays = []
    for name in ("a", "b"):
        (tmp / name).mkdir()
        relays.append(RelayProcess(tmp / name, free_port(), store))
    children.extend(relays)
    for relay in relays:
        await relay.start()
    return relays


@contextlib.asynccontextmanager
async def members_apart(
    store: str, tmp: pathlib.Path, children: list[Child], *, fail_over: bool = False
) -> AsyncIterator[tuple[list[RelayProcess], Node, Node]]:
    """Two relay processes on ``store``; Seoul's node on the first, Tokyo's on the second
    (``fail_over``: then on the first), connected."""
    relays = await two_relays(store, tmp, children)
    tokyo_ports = [relays[1].port, relays[0].port] if fail_over else [relays[1].port]
    async with (
        node("seoul", relays[0].port, tmp) as seoul,
        node("tokyo", tokyo_ports, tmp) as tokyo,
    ):
        await tokyo.wait_connected()
        yield relays, seoul, tokyo


async def test_two_relay_processes_on_one_database(
    pg_dsn: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    # Seoul on one relay process, Tokyo on the other: what Seoul releases reaches Tokyo
    # through the other process (a NOTIFY wakes it), exactly once; then the process
    # serving Tokyo dies and Tokyo's node moves to the other one, which delivers the rest.
    with trio.fail_after(60):
        async with members_apart(pg_dsn, tmp_path, children, fail_over=True) as (
            relays,
            seoul,
            tokyo,
        ):
            first = {await submit(seoul, f"report {i}") for i in range(5)}
            assert_exactly_once(await receive_all(tokyo, first), first)
            await relays[1].kill()
            second = {await submit(seoul, f"later {i}") for i in range(5)}
            assert_exactly_once(await receive_all(tokyo, second), second)
            for report_id in first | second:
                await seoul.wait_stored(report_id)


async def test_consent_between_two_relay_processes(
    pg_dsn: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    # Seoul on one relay process, Tokyo on the other: the announcement, the request, the
    # approval with the report it releases, and a denial each reach the other member
    # through the other process (queued in the shared database, a NOTIFY wakes it).
    with trio.fail_after(60):
        async with members_apart(pg_dsn, tmp_path, children) as (_, seoul, tokyo):
            report_id = await seoul.submit(
                b"held until asked", recipients=["tokyo"], scope=SCOPE, level=LEVEL
            )
            await seoul.wait_stored(report_id)
            await seoul.announce(report_id, ["tokyo"], title="Musudan")
            announced = await next_event(tokyo, AnnouncementEvent, timeout=10)
            assert announced.announcement.report == report_id
            request_id = await tokyo.request(report_id, "seoul", "to assess it")
            asked = await next_event(seoul, RequestEvent, timeout=10)
            assert asked.request.id == request_id
            await seoul.approve(request_id)
            assert_exactly_once(await receive_all(tokyo, {report_id}), {report_id})
            approved = await next_event(tokyo, ApprovedEvent, timeout=10)
            assert approved.request == request_id
            again = await tokyo.request(report_id, "seoul", "once more")
            await next_event(seoul, RequestEvent, timeout=10)
            await seoul.deny(again, "denied")
            denied = await next_event(tokyo, DeniedEvent, timeout=10)
            assert denied.answer.request == again


async def test_a_token_redeemed_100_times_over_two_processes_is_released_once(
    pg_dsn: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    import time

    from nodes.relay_harness import expect, send_submission

    from relay.pgstore import PgStore
    from tisa.audit import GENESIS, chain_next
    from tisa.errors import Reason
    from tisa.keys import Hash, digest
    from tisa.messages import Refusal, Release, Released, Stored
    from tisa.prekeys import PrekeyKind, PrekeySecret
    from tisa.report import seal_report
    from tisa.token import issue_token
    from tisa_io.link import connect_member

    now = int(time.time())
    report = seal_report(
        SECRETS["seoul"], "seoul", ARRANGEMENT, recipients=["tokyo"], scope=SCOPE,
        level=LEVEL, body=b"one release only", now=now,
    )  # fmt: skip
    token = issue_token(
        SECRETS["seoul"], "seoul", ARRANGEMENT, recipient="tokyo", report_id=report.report_id,
        digest=report.digest, size=report.size, content_key=report.content_key, scope=SCOPE,
        level=LEVEL, not_before=now - 10, not_after=now + 3600, counter=1,
        signed_prekey=PrekeySecret.generate(
            PrekeyKind.SIGNED, created=now - 60, not_after=now + 3600
        ).publish(SECRETS["tokyo"], "tokyo", ARRANGEMENT),
    )  # fmt: skip
    replies: list[object] = []
    with trio.fail_after(60):
        relays = await two_relays(pg_dsn, tmp_path, children)
        links = [
            await connect_member(
                await trio.open_tcp_stream("127.0.0.1", relay.port),
                SECRETS["seoul"],
                "seoul",
                ARRANGEMENT,
            )
            for relay in relays
        ]
        await send_submission(links[0], report, expires=now + 3600)
        await expect(links[0], Stored)

        async def redeem(link: object) -> None:
            for _ in range(50):
                await link.send(Release(token=token))  # type: ignore[attr-defined]
            for _ in range(50):
                replies.append(await link.receive())  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(redeem, link)
    assert len(replies) == 100
    assert sum(isinstance(reply, Released) for reply in replies) == 1
    refusals = [reply for reply in replies if isinstance(reply, Refusal)]
    assert len(refusals) == 99 and {r.reason for r in refusals} == {Reason.REPLAYED}
    # Both processes appended to one audit chain, in commit order, without a gap.
    store = PgStore(pg_dsn)
    try:
        entries = store.audit_entries(0, limit=1000)
        head = GENESIS
        for seq, (entry, content, after) in enumerate(entries, start=1):
            assert entry.seq == seq and content == digest(Hash.AUDIT, entry.encode())
            head = chain_next(head, content)
            assert after == head
        assert store.audit_head == head
        assert sum(entry.event == "released" for entry, _, _ in entries) == 1
    finally:
        store.close()


async def test_postgresql_crashed_and_down_for_a_while_during_a_run(
    pg_server: PgServer, pg_dsn: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    # PostgreSQL is stopped hard (no shutdown checkpoint) while reports flow, stays down
    # for a moment (the relay closes connections with `busy`, members retry), and comes
    # back: the relay process goes on by itself, and every report arrives exactly once.
    if not pg_server.restartable:
        pytest.skip("TISA_PG_DSN names a server this test must not stop")
    relay = RelayProcess(tmp_path, free_port(), pg_dsn)
    children.append(relay)
    with trio.fail_after(90):
        await relay.start()

        async def crash_the_database(got: list[bytes]) -> None:
            while len(got) < 5:
                await trio.sleep(0.01)
            await trio.to_thread.run_sync(pg_server.crash)
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(pg_server.restart)

        submitted, got = await flow(relay.port, tmp_path, 30, lambda: 0.02, crash_the_database)
    assert relay.process is not None and relay.process.returncode is None  # it went on
    assert len(got) == len(set(got)), "a report was handed over twice"
    assert set(got) == set(submitted)


async def test_relay_processes_killed_at_random_times(
    pg_dsn: str, tmp_path: pathlib.Path, children: list[Child]
) -> None:
    # Two relay processes on one database; members list both (Seoul the first first,
    # Tokyo the second); one or the other is killed at random and started again while
    # reports flow. Every report arrives once, whichever processes carried it.
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    with trio.fail_after(30 + 3 * ITERATIONS):
        relays = await two_relays(pg_dsn, tmp_path, children)

        async def kill_and_restart(got: list[bytes]) -> None:
            for _ in range(ITERATIONS):
                await trio.sleep(rng.uniform(0.02, 0.25))
                relay = rng.choice(relays)
                await relay.kill()
                await relay.start()

        ports = [relay.port for relay in relays]
        submitted, got = await flow(
            ports, tmp_path, 4 * ITERATIONS, lambda: rng.uniform(0, 0.03), kill_and_restart
        )
    assert len(got) == len(set(got)), f"duplicate delivery (seed {seed})"
    assert set(got) == set(submitted), f"seed {seed}"
