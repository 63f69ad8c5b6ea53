"""The client node against a scripted in-memory relay (tests/nodes/client_fake_relay.py).

These tests drive fault cases a real relay produces only under crashes: a lost answer, a
replayed delivery, a redelivery after the recipient restarted. The three-node tests with
the real relay are in test_three_nodes.py.

The last ones check that what a node announces waits for the batch that wrote it, and
only for that one: the sender, :meth:`Node.reports` and the replier send or hand over a
row only once the batch that wrote it is on disk (DESIGN.md guarantees 5-7), not for a
batch that unrelated steps (an answer, an event) opened since, and the sender skips the
queries of kinds nobody wrote since its last pass. The WAL fsync is held back there by a
gate (run in a worker thread, so the event loop goes on), and every message a node sends
is checked against the batch that wrote its rows.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Container, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from nodes.client_fake_relay import FakeRelay
from nodes.client_world import LEVEL, SCOPE, make_world

from clients import store as rows
from clients.events import (
    DeliveredReport,
    DeliveryRejected,
    Event,
    PrekeysLow,
    ReceiptEvent,
    Released,
    Stored,
)
from clients.node import DEFAULT_VALID_FOR, Backoff, Node, _Session, open_node
from clients.store import MemberStore
from tisa import messages as m
from tisa.errors import Reason, Refused, UsageError
from tisa.messages import SubmitBegin, SubmitInline
from tisa.receipt import Receipt
from tisa.token import ReleaseToken
from tisa_io import durable
from tisa_io.link import Link

m_submit = (SubmitBegin, SubmitInline)

ARRANGEMENT, SECRETS = make_world()
FAST = Backoff(initial=0.01, maximum=0.05)


@pytest.fixture
async def relay(nursery: trio.Nursery) -> AsyncIterator[tuple[FakeRelay, int]]:
    fake = FakeRelay(SECRETS["washington"], ARRANGEMENT)
    port = await nursery.start(fake.serve)
    yield fake, port


def node(name: str, port: int, path: pathlib.Path):  # type: ignore[no-untyped-def]
    return open_node(
        SECRETS[name], name, ARRANGEMENT, ("127.0.0.1", port), path / name, backoff=FAST
    )


async def published(
    fake: FakeRelay, port: int, tmp_path: pathlib.Path, name: str = "tokyo"
) -> None:
    """Run ``name``'s node until the relay holds its prekeys (as if it had connected
    earlier): an originator cannot release to a member that never published any."""
    async with node(name, port, tmp_path):
        while name not in fake.signed_prekeys or not fake.one_time_prekeys.get(name):
            await trio.sleep(0.01)


async def next_event(node: Node, kind: type[Event]) -> Event:
    async for event in node.events():
        if isinstance(event, kind):
            return event
    raise AssertionError("events ended")


async def test_submit_release_deliver_receipt(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    _fake, port = relay
    with trio.fail_after(10):
        async with node("seoul", port, tmp_path) as seoul, node("tokyo", port, tmp_path) as tokyo:
            report_id = await seoul.submit(
                b"launch detected",
                recipients=["tokyo"],
                scope=SCOPE,
                level=LEVEL,
                attachments=[("track.csv", b"1,2,3")],
                release_to=["tokyo"],
            )
            ack = await seoul.wait_stored(report_id)
            assert ack.report == report_id
            async for report in tokyo.reports():
                assert report.body == b"launch detected"
                # The id Seoul's node chose and recorded for the token is the token's own.
                [release] = seoul.store.releases_of(report_id)
                assert ReleaseToken.decode(release.encoded).id == release.token
                assert report.token_id == release.token
                assert report.attachments == {"track.csv": b"1,2,3"}
                assert report.originator == "seoul"
                break
            event = await next_event(seoul, ReceiptEvent)
            assert isinstance(event, ReceiptEvent)
            assert event.receipt.report == report_id and event.receipt.recipient == "tokyo"


async def test_the_ack_of_a_receipt_is_lazy(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It forces no commit of its own: it waits (here no background commit within the
    # test) until a commit someone waits on, a submission's, takes its batch along.
    # The receipt's event would force one when handed over: this application takes no
    # events (as in bench nodes, where the buffer fills and the hand-over stops).
    monkeypatch.setattr(durable, "BACKGROUND_COMMIT_DELAY", 3600.0)
    monkeypatch.setattr(Node, "_pump_events", lambda self: trio.sleep_forever())
    fake, port = relay
    await published(fake, port, tmp_path)

    def receipt_acks() -> list[m.Message]:
        return [r for r in fake.received if isinstance(r, m.Ack) and r.kind == "receipt"]

    with trio.fail_after(20):
        async with node("seoul", port, tmp_path) as seoul, node("tokyo", port, tmp_path) as tokyo:
            # Another step's forced commit (a stored answer, the sender) may take the
            # receipt's batch along before the replier gets to it, and then there is no
            # lazy wait to see: send reports until one receipt's ack waits on its own.
            for attempt in range(1, 6):
                report_id = await seoul.submit(
                    b"report %d" % attempt,
                    recipients=["tokyo"],
                    scope=SCOPE,
                    level=LEVEL,
                    release_to=["tokyo"],
                )
                async for report in tokyo.reports():
                    await tokyo.ack(report)
                    break

                def stored(n: int = attempt) -> bool:
                    return len(seoul.store.receipts()) == n

                await until(stored)
                session = seoul._session
                assert session is not None

                def waiting_or_sent(s: _Session = session, n: int = attempt) -> bool:
                    return s.lazy_wake is not None or len(receipt_acks()) == n

                await until(waiting_or_sent)
                if session.lazy_wake is not None:
                    break
            else:
                raise AssertionError("no receipt's ack ever waited lazily")
            commits = seoul._group_commit.commits
            await trio.sleep(0.1)
            assert len(receipt_acks()) == attempt - 1 and seoul._group_commit.commits == commits
            assert seoul.store.committed < seoul.store.barrier
            await seoul.submit(b"next", recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            await until(lambda: len(receipt_acks()) == attempt)
            receipt = Receipt.verify(seoul.store.receipts()[attempt - 1], ARRANGEMENT)
            assert receipt.report == report_id and receipt_acks()[-1].token == receipt.token


async def test_out_of_scope_refused_before_sending(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    fake, port = relay
    with trio.fail_after(5):
        async with node("seoul", port, tmp_path) as seoul:
            with pytest.raises(Refused) as info:
                await seoul.submit(b"x", recipients=["tokyo"], scope="trade", level=LEVEL)
            assert info.value.reason is Reason.OUT_OF_SCOPE
            with pytest.raises(Refused) as info:
                await seoul.submit(b"x", recipients=["pyongyang"], scope=SCOPE, level=LEVEL)
            assert info.value.reason is Reason.NOT_A_MEMBER
            await seoul.wait_connected()
            await trio.sleep(0.05)
    assert not any(isinstance(msg, m_submit) for msg in fake.received)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_outbox_goes_out_when_the_relay_comes_up(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    port = free_port()
    with trio.fail_after(10):
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"held", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            await trio.sleep(0.1)
            assert not seoul.connected
        # Restart the node too: the outbox is durable, not only in memory.
        fake = FakeRelay(SECRETS["washington"], ARRANGEMENT)
        await nursery.start(fake.serve, port)
        async with node("seoul", port, tmp_path) as seoul, node("tokyo", port, tmp_path) as tokyo:
            await seoul.wait_stored(report_id)
            async for report in tokyo.reports():
                assert report.report_id == report_id and report.body == b"held"
                break


async def collect(tokyo: Node, into: list[bytes], wait: float) -> None:
    with trio.move_on_after(wait):
        async for report in tokyo.reports():
            into.append(report.report_id)
            await tokyo.ack(report)


async def collect_next(
    tokyo: Node, into: list[bytes], timeout: float = 5, then: float = 0.2
) -> None:
    """Collect until one more report arrives (within ``timeout``: a recipient that has
    not published its prekeys yet gets its release on the originator's next retry, which
    backs off up to a second, so a fixed short window fails on a loaded machine), then
    any more within ``then`` seconds."""
    want = len(into) + 1
    with trio.fail_after(timeout):
        async for report in tokyo.reports():
            into.append(report.report_id)
            await tokyo.ack(report)
            if len(into) >= want:
                break
    await collect(tokyo, into, then)


async def test_redelivery_after_recipient_restart_is_handed_over_once(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    fake, port = relay
    fake.ignore_acks = True  # as if tokyo died between storing and acknowledging
    got: list[bytes] = []
    with trio.fail_after(10):
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"once", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            await seoul.wait_stored(report_id)
            async with node("tokyo", port, tmp_path) as tokyo:
                await collect_next(tokyo, got)
            assert got == [report_id]
            fake.ignore_acks = False
            async with node("tokyo", port, tmp_path) as tokyo:
                with trio.fail_after(5):  # until the redelivery is acknowledged
                    while fake.pending.get("tokyo"):
                        await collect(tokyo, got, 0.05)
                await collect(tokyo, got, 0.2)
            assert got == [report_id]
            assert fake.pending["tokyo"] == []  # acknowledged again on redelivery


async def test_replay_is_refused_after_restart(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    fake, port = relay
    got: list[bytes] = []
    with trio.fail_after(10):
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"once", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            async with node("tokyo", port, tmp_path) as tokyo:
                await collect_next(tokyo, got)
            assert got == [report_id]
            # Seoul releases the same report to Tokyo again: a new token, a seen report.
            # Node.release refuses a second token (duplicate); a careless originator
            # could still make one, which is what the recipient must stand up to.
            seoul._want(report_id, "tokyo", DEFAULT_VALID_FOR)
            seoul._notify()
            async with node("tokyo", port, tmp_path) as tokyo:
                # The same token replayed by a (hostile) relay: acknowledged, not handed.
                old_token, old_id, _ = fake.delivered[0]
                await tokyo.wait_connected()
                while "tokyo" not in fake.links:  # the relay's side of the handshake
                    await trio.sleep(0.01)
                await fake.deliver(fake.links["tokyo"], old_token, old_id, report_id)
                await collect(tokyo, got, 0.3)
                event = await next_event(tokyo, DeliveryRejected)
            assert isinstance(event, DeliveryRejected)
            assert isinstance(event.error, Refused) and event.error.reason is Reason.REPLAYED
            assert got == [report_id]


async def test_lost_released_answer_is_recovered(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    fake, port = relay
    fake.drop_answers = {"released"}
    with trio.fail_after(10):
        await published(fake, port, tmp_path)
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"x", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            await seoul.wait_stored(report_id)
            await trio.sleep(0.1)
        fake.drop_answers = set()
        async with node("seoul", port, tmp_path) as seoul:
            # The resent token is refused `replayed`: it was consumed, so it is released.
            event = await next_event(seoul, Released)
            assert isinstance(event, Released) and event.recipient == "tokyo"
            [release] = seoul.store.releases_of(report_id)
            assert release.state == "released"


async def test_stored_event_and_relay_refusal_of_a_release(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    fake = FakeRelay(SECRETS["washington"], ARRANGEMENT, clock=lambda: 4_000_000_000)
    port = await nursery.start(fake.serve)
    with trio.fail_after(10):
        await published(fake, port, tmp_path)
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(b"x", recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            assert isinstance(await next_event(seoul, Stored), Stored)
            with pytest.raises(Refused) as info:
                await seoul.release(report_id, "tokyo", valid_for=60)
            assert info.value.reason is Reason.EXPIRED


def test_sealing_a_large_file_into_the_outbox_keeps_memory_flat(tmp_path: pathlib.Path) -> None:
    # Regression: PADME padding of a large report (up to 2 MiB here, 32 MiB at 1 GiB)
    # was built in memory at once by ReportSealer.finish().
    import tracemalloc

    from clients.node import _seal_to_file
    from tisa.report import ReportSealer

    size = 40 * 1024 * 1024 + 12345
    source = tmp_path / "large.bin"
    with open(source, "wb") as handle:
        handle.truncate(size)
    sealer = ReportSealer(
        SECRETS["seoul"], "seoul", ARRANGEMENT, recipients=["tokyo"],
        scope=SCOPE, level=LEVEL, body_size=size, now=1_420_000_000,
    )  # fmt: skip
    tracemalloc.start()
    try:
        _seal_to_file(sealer, [source], tmp_path / "sealed.bin", None, size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "sealed.bin").stat().st_size == sealer.size
    assert peak < 1024 * 1024, peak


@pytest.fixture
async def three_sent(relay: tuple[FakeRelay, int], tmp_path: pathlib.Path) -> list[bytes]:
    """Seoul sent three reports to Tokyo, stored by the relay; their ids."""
    fake, port = relay
    with trio.fail_after(10):
        await published(fake, port, tmp_path)
        async with node("seoul", port, tmp_path) as seoul:
            ids = [
                await seoul.submit(
                    body, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
                )
                for body in (b"first", b"second", b"third")
            ]
            for report_id in ids:
                await seoul.wait_stored(report_id)
            # Each token follows its submission one prekey fetch later: until released.
            while any([r.state for r in seoul.store.releases_of(i)] != ["released"] for i in ids):
                await trio.sleep(0.01)
    return ids


async def take(tokyo: Node, count: int, *, ack: Container[int] = ()) -> list[bytes]:
    """The first ``count`` reports of a new reports() loop; acknowledges the i-th of
    them for every i in ``ack``."""
    got: list[bytes] = []
    async for report in tokyo.reports():
        if len(got) in ack:
            await tokyo.ack(report)
        got.append(report.report_id)
        if len(got) == count:
            break
    return got


async def none_comes_again(tokyo: Node) -> None:
    again: list[bytes] = []
    with trio.move_on_after(0.2):
        again = await take(tokyo, 1)
    assert again == [], "an acknowledged report came again"


def handed_on_disk(path: pathlib.Path, report_id: bytes) -> int:
    """The inbox row's acknowledgement as another process (or a restart) sees it."""
    db = sqlite3.connect(path / "tokyo" / "member.db")
    try:
        (handed,) = db.execute("SELECT handed FROM inbox WHERE report = ?", (report_id,)).fetchone()
    finally:
        db.close()
    return int(handed)


async def test_a_report_comes_again_until_the_application_acknowledges_it(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, three_sent: list[bytes]
) -> None:
    # Asking for the next report, or leaving the loop, does not count as taking one
    # (it did before Node.ack): only ack() does, and it is on disk when it returns.
    _fake, port = relay
    ids = three_sent
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo:
            assert await take(tokyo, 3, ack={1}) == ids
            assert handed_on_disk(tmp_path, ids[1]) == 1
            assert handed_on_disk(tmp_path, ids[0]) == 0
            # A new loop in the same run: the unacknowledged ones, oldest first.
            assert await take(tokyo, 2, ack={0}) == [ids[0], ids[2]]
        async with node("tokyo", port, tmp_path) as tokyo:
            # After a restart too: only the one never acknowledged.
            assert await take(tokyo, 1, ack={0}) == [ids[2]]
            await none_comes_again(tokyo)


async def test_ack_refuses_a_report_not_in_the_inbox_and_a_closed_node(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, three_sent: list[bytes]
) -> None:
    _fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo:
            first = await anext(aiter(tokyo.reports()))
            await tokyo.ack(first)
            await tokyo.ack(first)  # again: nothing happens
            stranger = dataclasses.replace(first, token_id=bytes(16))
            with pytest.raises(UsageError, match="not in this node's inbox"):
                await tokyo.ack(stranger)
            second = await anext(aiter(tokyo.reports()))
        with pytest.raises(UsageError, match="closed"):
            await tokyo.ack(second)
        async with node("tokyo", port, tmp_path) as tokyo:
            assert await take(tokyo, 2, ack={0, 1}) == three_sent[1:]


async def held_reports(tokyo: Node, count: int) -> list[DeliveredReport]:
    """The first ``count`` reports of a reports() loop, none acknowledged, once the node
    is idle (everything it stored committed and on disk, its receipts sent)."""
    held: list[DeliveredReport] = []
    async for report in tokyo.reports():
        held.append(report)
        if len(held) == count:
            break
    # (The fake relay confirms no receipt: those are sent once per connection.)
    await until(lambda: not tokyo.store.pending)
    await trio.sleep(0.05)
    await until(lambda: not tokyo.store.pending)
    return held


class Commits:
    """Counts a store's COMMIT statements and WAL fsyncs."""

    def __init__(self, store: MemberStore) -> None:
        self.commits = self.fsyncs = 0
        real = store.fsync_wal

        def counted() -> None:
            self.fsyncs += 1
            real()

        def statement(sql: str) -> None:
            self.commits += sql == "COMMIT"

        store.fsync_wal = counted  # type: ignore[method-assign]
        store._db.set_trace_callback(statement)


async def test_ack_many_acknowledges_several_reports_with_one_commit(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, three_sent: list[bytes]
) -> None:
    _fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo:
            first, second, third = await held_reports(tokyo, 3)
            counted = Commits(tokyo.store)
            await tokyo.ack_many([first, second, first])  # one given twice counts once
            assert (counted.commits, counted.fsyncs) == (1, 1)
            assert [handed_on_disk(tmp_path, i) for i in three_sent] == [1, 1, 0]
            # One at a time, each ack is a commit and an fsync of its own.
            await tokyo.ack(third)
            assert (counted.commits, counted.fsyncs) == (2, 2)
            await tokyo.ack_many([])  # nothing to do: no commit
            await tokyo.ack_many([first, second])  # acknowledged already: accepted
            assert handed_on_disk(tmp_path, three_sent[2]) == 1
        async with node("tokyo", port, tmp_path) as tokyo:
            await none_comes_again(tokyo)


async def test_acks_made_at_once_by_several_tasks_share_one_commit(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, three_sent: list[bytes]
) -> None:
    _fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo:
            reports = await held_reports(tokyo, 3)
            counted = Commits(tokyo.store)
            async with trio.open_nursery() as acks:
                for report in reports:
                    acks.start_soon(tokyo.ack, report)
            assert (counted.commits, counted.fsyncs) == (1, 1)
            assert [handed_on_disk(tmp_path, i) for i in three_sent] == [1, 1, 1]


async def test_ack_many_acknowledges_none_when_one_is_not_in_the_inbox(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, three_sent: list[bytes]
) -> None:
    _fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo:
            first, second, _ = await held_reports(tokyo, 3)
            stranger = dataclasses.replace(first, token_id=bytes(16))
            with pytest.raises(UsageError, match="1 of the reports are not in this node's inbox"):
                await tokyo.ack_many([first, stranger, second])
            await tokyo.ack_many([])  # even now: nothing to acknowledge
            # Nothing was marked, in memory or on disk: all three come again.
            assert await take(tokyo, 3) == three_sent
        assert [handed_on_disk(tmp_path, i) for i in three_sent] == [0, 0, 0]
        with pytest.raises(UsageError, match="closed"):
            await tokyo.ack_many([first, second])
        async with node("tokyo", port, tmp_path) as tokyo:
            assert await take(tokyo, 3, ack={0, 1, 2}) == three_sent


async def test_tasks_that_read_some_kinds_of_rows_wake_only_for_those(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    # Issue 11: the sender, a reports() loop and the event pump each act only on some
    # kinds of rows; a state change that wrote none of them (most messages a node
    # handles) wakes none of them, where each used to wake for every change.
    from tisa_io import trace

    _fake, port = relay
    steps: collections.Counter[str] = collections.Counter()

    class Steps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps[trace._task_name(task)] += 1

    async def woken_by(change: Callable[[], None]) -> set[str]:
        steps.clear()
        change()
        tokyo._notify()
        await trio.sleep(0.05)
        return {name for name in ("Node._sender", "Node._pump_events", "app") if steps[name]}

    async def app() -> None:
        async for _ in tokyo.reports():
            raise AssertionError("no report was sent")

    def write(kind: str) -> Callable[[], None]:
        def step() -> None:
            with tokyo.store.transaction():
                tokyo.store.wrote(kind)

        return step

    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo, trio.open_nursery() as nursery:
            await tokyo.wait_connected()
            nursery.start_soon(app, name="app")
            await until(lambda: not tokyo.store.pending)
            await trio.sleep(0.1)
            instrument = Steps()
            trio.lowlevel.add_instrument(instrument)
            try:
                assert await woken_by(lambda: None) == set()
                assert await woken_by(write(rows.WANTED)) == set()
                # The sender reads the inbox (receipts to send) only at a connection's
                # start; it takes a queued submission stored (STORED) only while a
                # revocation may be pending (none here).
                assert await woken_by(write(rows.INBOX)) == {"app"}
                assert not tokyo.store.revocations_known
                assert await woken_by(write(rows.STORED)) == set()
                tokyo.store.revocations_known = True
                assert await woken_by(write(rows.STORED)) == {"Node._sender"}
                tokyo.store.revocations_known = False
                assert await woken_by(write(rows.SUBMISSIONS)) == {"Node._sender"}
                event = PrekeysLow(one_time=0, signed_not_after=1)
                assert await woken_by(lambda: tokyo.store.add_event(event)) == {"Node._pump_events"}
                # A rollback may bring any kind of row back: every one of them looks.
                assert await woken_by(tokyo.store._abandon_batch) == {
                    "Node._sender", "Node._pump_events", "app"
                }  # fmt: skip
            finally:
                trio.lowlevel.remove_instrument(instrument)
            nursery.cancel_scope.cancel()


async def test_a_reports_loop_left_after_the_node_closed_hands_the_report_over_again(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    # The application still holds the generator (and a report) when the node closes;
    # finishing the loop then must not touch the closed store (it raised
    # sqlite3.ProgrammingError), and the report comes again on the next start.
    fake, port = relay
    with trio.fail_after(10):
        await published(fake, port, tmp_path)
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"held", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            await seoul.wait_stored(report_id)
            # The token follows the submission after a prekey fetch: wait until it is in.
            await next_event(seoul, Released)
        async with node("tokyo", port, tmp_path) as tokyo:
            loop = tokyo.reports()
            first = await loop.__anext__()
            assert first.report_id == report_id
        await loop.aclose()  # after the node closed: nothing recorded, nothing raised
        async with node("tokyo", port, tmp_path) as tokyo:
            async for report in tokyo.reports():
                assert report.report_id == report_id
                break


async def test_busy_submission_stays_queued_and_goes_out_on_a_later_connection(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    # The relay still holds an upload of the report from a connection of ours that died:
    # it answers `busy`. The node must keep the ciphertext and the release, reconnect,
    # and send both again, never mark them refused.
    fake, port = relay
    fake.busy_submissions = 2
    with trio.fail_after(15):
        await published(fake, port, tmp_path)
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"kept", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            await seoul.wait_stored(report_id)
            event = await next_event(seoul, Released)
            assert isinstance(event, Released) and event.recipient == "tokyo"
            assert seoul.store.submission(report_id).state == "stored"  # type: ignore[union-attr]
    assert fake.busy_submissions == 0


def test_a_node_takes_one_relay_address_or_several() -> None:
    from clients.node import relay_addresses
    from tisa.errors import UsageError

    assert relay_addresses(("relay.example", 7000)) == [("relay.example", 7000)]
    several = [("a.example", 7000), ("b.example", 7001)]
    assert relay_addresses(several) == several
    with pytest.raises(UsageError):
        relay_addresses([])


# Seconds a held fsync waits at most: on code that wrongly waits for a held batch, a
# test fails (its deadline, HELD_FOR - 5) instead of hanging in a thread trio cannot
# cancel.
HELD_FOR = 15.0


class Gate:
    """Holds a store's WAL fsyncs back while closed (each runs in a worker thread, so
    the event loop goes on; at most HELD_FOR seconds)."""

    def __init__(self, store: MemberStore) -> None:
        self.store = store
        self._open = threading.Event()
        self._open.set()
        real = store.fsync_wal

        def gated() -> None:
            self._open.wait(HELD_FOR)
            real()

        store.fsync_wal = gated  # type: ignore[method-assign]

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def threaded_fsyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every WAL fsync in a worker thread (a gated one would block the event loop).
    monkeypatch.setattr(durable, "INLINE_FSYNC_MAX_STEPS", -1)


class Announced:
    """Checks every message a node writes to its link: the batch that wrote each row it
    carries (a submission, a token, a stored report, a receipt) is on disk by then."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.nodes: list[Node] = []
        # Row key (report id, token id) -> the store and batch that wrote it.
        self.batch: dict[bytes, tuple[MemberStore, int]] = {}
        self.checked: list[tuple[str, int, int]] = []  # (message type, batch, committed)
        real = Link.send_many
        announced = self

        async def send_many(link: Link, messages: Any) -> None:
            messages = list(messages)
            for node in announced.nodes:
                session = node._session
                if session is not None and session.link is link:
                    for message in messages:
                        announced._check(message)
            await real(link, messages)

        monkeypatch.setattr(Link, "send_many", send_many)

    def watch(self, node: Node) -> None:
        self.nodes.append(node)
        store = node.store
        record = self._recorder(store)
        record("record_submission", lambda kw, _: kw["report"])
        record("issue_release", lambda _, result: result)
        record("store_delivery", lambda kw, _: kw["token"].id)
        record("add_receipt", lambda kw, _: kw["token"])

    def _recorder(self, store: MemberStore) -> Callable[[str, Callable[[Any, Any], bytes]], None]:
        def record(name: str, key: Callable[[Any, Any], bytes]) -> None:
            real = getattr(store, name)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                result = real(*args, **kwargs)
                # The step ran in the open batch (group commit): that one holds it.
                self.batch.setdefault(key(kwargs, result), (store, store.barrier))
                return result

            setattr(store, name, wrapper)

        return record

    def _keys(self, message: m.Message) -> Iterator[bytes]:
        if isinstance(message, m.SubmitInline | m.SubmitBegin):
            yield message.report
        if isinstance(message, m.SubmitInline):
            yield from (ReleaseToken.decode(token).id for token in message.tokens)
        elif isinstance(message, m.Release):
            yield ReleaseToken.decode(message.token).id
        elif isinstance(message, m.SendReceipt):
            yield Receipt.verify(message.receipt, ARRANGEMENT).token
        elif isinstance(message, m.Ack) and message.kind in ("delivery", "receipt"):
            yield message.token
        elif isinstance(message, m.AckReceipts):
            yield from message.tokens

    def _check(self, message: m.Message) -> None:
        for key in self._keys(message):
            assert key in self.batch, f"{message.TYPE} carries a row nobody recorded"
            store, batch = self.batch[key]
            assert store.committed >= batch, f"{message.TYPE} sent before batch {batch} is on disk"
            self.checked.append((message.TYPE, batch, store.committed))


@pytest.fixture
def announced(monkeypatch: pytest.MonkeyPatch) -> Announced:
    return Announced(monkeypatch)


async def blocked() -> None:
    """Until every task waits (for the network, for a held fsync)."""
    await trio.testing.wait_all_tasks_blocked(0.05)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


def submitted(fake: FakeRelay) -> list[bytes]:
    return [r.report for r in fake.received if isinstance(r, m.SubmitInline | m.SubmitBegin)]


async def test_nothing_goes_out_before_its_batch_is_on_disk(
    relay: tuple[FakeRelay, int],
    tmp_path: pathlib.Path,
    threaded_fsyncs: None,
    announced: Announced,
) -> None:
    fake, port = relay
    with trio.fail_after(HELD_FOR - 5):
        async with node("tokyo", port, tmp_path) as tokyo:
            await until(lambda: bool(fake.one_time_prekeys.get("tokyo")))
            async with node("seoul", port, tmp_path) as seoul, trio.open_nursery() as nursery:
                await seoul.wait_connected()
                announced.watch(seoul)
                announced.watch(tokyo)
                seoul_gate, tokyo_gate = Gate(seoul.store), Gate(tokyo.store)
                # The submission's batch is committed, its fsync held back: it stays.
                seoul_gate.close()
                ids: list[bytes] = []

                async def submit(body: bytes) -> None:
                    ids.append(
                        await seoul.submit(
                            body,
                            recipients=["tokyo"],
                            scope=SCOPE,
                            level=LEVEL,
                            release_to=["tokyo"],
                        )
                    )

                nursery.start_soon(submit, b"first")
                await until(lambda: seoul.store.written > seoul.store.committed)
                await blocked()
                assert submitted(fake) == [] and ids == []
                # On disk: it goes out, with its token; the delivery is stored at Tokyo,
                # whose ack and receipt wait for Tokyo's fsync in turn.
                tokyo_gate.close()
                seoul_gate.open()
                await until(lambda: len(submitted(fake)) == 1)
                await until(lambda: tokyo.store.written > tokyo.store.committed)
                await blocked()
                acks = [r for r in fake.received if isinstance(r, m.Ack | m.SendReceipt)]
                assert acks == [] and fake.pending.get("tokyo")
                tokyo_gate.open()
                await until(lambda: not fake.pending.get("tokyo"))
                # More reports, acked by the application, while fsyncs come and go: each
                # message is checked against its rows' batches as it is written.
                got: list[bytes] = []

                async def consume() -> None:
                    async for report in tokyo.reports():
                        got.append(report.report_id)
                        await tokyo.ack(report)

                nursery.start_soon(consume)
                for i in range(4):
                    await submit(b"more %d" % i)
                await until(lambda: len(got) == 5)
                await until(lambda: len(seoul.store.receipts()) == 5)
                nursery.cancel_scope.cancel()
    types = {t for t, _, _ in announced.checked}
    assert {"submit_inline", "send_receipt", "ack"} <= types, types


async def test_the_sender_does_not_wait_for_an_unrelated_open_batch(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, threaded_fsyncs: None
) -> None:
    fake, port = relay
    fake.accept = False  # offline until the unrelated batch is open
    with trio.fail_after(HELD_FOR - 5):
        async with node("seoul", port, tmp_path) as seoul:
            report_id = await seoul.submit(
                b"queued", recipients=["tokyo"], scope=SCOPE, level=LEVEL
            )
            written = seoul.store.batch_of(rows.SUBMISSIONS)
            assert seoul.store.committed >= written  # submit returned: on disk
            gate = Gate(seoul.store)
            gate.close()
            # An unrelated step (an event) opens a new batch, whose fsync would hang.
            seoul.store.add_event(PrekeysLow(one_time=0, signed_not_after=1))
            assert seoul.store.barrier > written
            fake.accept = True
            try:
                await until(lambda: submitted(fake) == [report_id])
                # Sent while the unrelated batch is still not on disk.
                assert seoul.store.committed < seoul.store.barrier
            finally:
                gate.open()


async def test_reports_hands_over_without_waiting_for_an_unrelated_open_batch(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, threaded_fsyncs: None
) -> None:
    fake, port = relay
    with trio.fail_after(HELD_FOR - 5):
        async with node("tokyo", port, tmp_path) as tokyo:
            await until(lambda: bool(fake.one_time_prekeys.get("tokyo")))
            async with node("seoul", port, tmp_path) as seoul:
                report_id = await seoul.submit(
                    b"in", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
                )
                await until(
                    lambda: (
                        tokyo.store.inbox_entry(fake.delivered[0][1]) is not None
                        if fake.delivered
                        else False
                    )
                )
                await until(lambda: tokyo.store.committed >= tokyo.store.batch_of(rows.INBOX))
                gate = Gate(tokyo.store)
                gate.close()
                tokyo.store.add_event(PrekeysLow(one_time=0, signed_not_after=1))
                assert tokyo.store.barrier > tokyo.store.batch_of(rows.INBOX)
                try:
                    async for report in tokyo.reports():
                        assert report.report_id == report_id
                        assert tokyo.store.committed < tokyo.store.barrier
                        break
                finally:
                    gate.open()


async def test_an_idle_wake_up_runs_no_sender_query(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    _fake, port = relay
    queries = (
        "queued_submissions",
        "releases_of",
        "releases_to_send",
        "revocations_to_send",
        "receipts_to_send",
        "consent_to_send",
    )
    with trio.fail_after(HELD_FOR - 5):
        async with node("seoul", port, tmp_path) as seoul:
            await seoul.wait_connected()
            store = seoul.store
            calls: list[str] = []
            for name in queries:
                real = getattr(store, name)

                def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                    calls.append(_name)
                    return _real(*args, **kwargs)

                setattr(store, name, counted)
            await blocked()
            calls.clear()
            # Wake-ups for changes the sender does not read (an event): no query.
            for _ in range(3):
                store.add_event(PrekeysLow(one_time=0, signed_not_after=1))
                seoul._notify()
                await blocked()
            assert calls == []
            # A submission: its kinds are read again.
            await seoul.submit(b"x", recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            await blocked()
            assert "queued_submissions" in calls and "releases_to_send" in calls


async def test_an_idle_wake_up_runs_no_statement_at_all(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    # Issue 11: every reader that wakes on a state change (the issuer's search for
    # release requests to take up, reports(), the event pump, the sender) skips its
    # query when its kind of row did not change; a release request still reaches the
    # issuer, a report reports(), an event the application.
    fake, port = relay
    with trio.fail_after(HELD_FOR - 5):
        async with node("tokyo", port, tmp_path) as tokyo, node("seoul", port, tmp_path) as seoul:
            await until(lambda: "tokyo" in fake.signed_prekeys)
            statements: list[str] = []
            for member in (seoul, tokyo):
                member.store._db.set_trace_callback(statements.append)
            got: list[bytes] = []

            async def application() -> None:
                async for report in tokyo.reports():
                    got.append(report.report_id)
                    await tokyo.ack(report)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(application)
                await blocked()
                statements.clear()
                for _ in range(3):
                    seoul._notify()
                    tokyo._notify()
                    await blocked()
                assert statements == []
                report_id = await seoul.submit(b"x", recipients=["tokyo"], scope=SCOPE, level=LEVEL)
                await seoul.release(report_id, "tokyo")
                await until(lambda: got == [report_id])
                async for event in seoul.events():
                    if isinstance(event, Released):
                        break
                nursery.cancel_scope.cancel()
