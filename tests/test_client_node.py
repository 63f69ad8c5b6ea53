"""The client node against a scripted in-memory relay (tests/nodes/client_fake_relay.py).

These tests drive fault cases a real relay produces only under crashes: a lost answer, a
replayed delivery, a redelivery after the recipient restarted. The three-node tests with
the real relay are in test_three_nodes.py.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
from nodes.client_fake_relay import FakeRelay
from nodes.client_world import LEVEL, SCOPE, make_world

from clients.events import DeliveryRejected, Event, ReceiptEvent, Released, Stored
from clients.node import Backoff, Node, open_node
from tisa.errors import Reason, Refused
from tisa.messages import SubmitBegin as m_submit

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
                assert report.attachments == {"track.csv": b"1,2,3"}
                assert report.originator == "seoul"
                break
            event = await next_event(seoul, ReceiptEvent)
            assert isinstance(event, ReceiptEvent)
            assert event.receipt.report == report_id and event.receipt.recipient == "tokyo"


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
                await collect(tokyo, got, 0.3)
            assert got == [report_id]
            fake.ignore_acks = False
            async with node("tokyo", port, tmp_path) as tokyo:
                await collect(tokyo, got, 0.3)
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
                await collect(tokyo, got, 0.3)
            assert got == [report_id]
            # Seoul releases the same report to Tokyo again: a new token, a seen report.
            await seoul.release(report_id, "tokyo")
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


async def test_a_report_is_marked_handed_durably_before_the_next_is_handed_over(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    # reports() records the hand-over of a report when the consumer asks for the next
    # one; the mark must be committed before the next report reaches the application,
    # or a node killed right after logging the next one hands over both again.
    import sqlite3

    _fake, port = relay
    with trio.fail_after(10):
        async with node("seoul", port, tmp_path) as seoul, node("tokyo", port, tmp_path) as tokyo:
            ids = [
                await seoul.submit(
                    body, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
                )
                for body in (b"first", b"second", b"third")
            ]
            for report_id in ids:
                await seoul.wait_stored(report_id)
            got: list[bytes] = []
            async for report in tokyo.reports():
                if got:
                    # What another process (or a restart) would see of the previous one.
                    db = sqlite3.connect(tmp_path / "tokyo" / "member.db")
                    try:
                        (handed,) = db.execute(
                            "SELECT handed FROM inbox WHERE report = ?", (got[-1],)
                        ).fetchone()
                    finally:
                        db.close()
                    assert handed == 1, "the previous report's hand-over is not committed"
                got.append(report.report_id)
                if len(got) == len(ids):
                    break
            assert got == ids


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
