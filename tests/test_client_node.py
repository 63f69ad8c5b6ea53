"""The client node against a scripted in-memory relay (tests/nodes/client_fake_relay.py).

These tests drive fault cases a real relay produces only under crashes: a lost answer, a
replayed delivery, a redelivery after the recipient restarted. The three-node tests with
the real relay are in test_three_nodes.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sqlite3
from collections.abc import AsyncIterator, Container

import pytest
import trio
from nodes.client_fake_relay import FakeRelay
from nodes.client_world import LEVEL, SCOPE, make_world

from clients.events import DeliveryRejected, Event, ReceiptEvent, Released, Stored
from clients.node import DEFAULT_VALID_FOR, Backoff, Node, open_node
from tisa.errors import Reason, Refused, UsageError
from tisa.messages import SubmitBegin, SubmitInline

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
            await tokyo.ack(report)


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
            again: list[bytes] = []
            with trio.move_on_after(0.2):
                again = await take(tokyo, 1)
            assert again == [], "an acknowledged report came again"


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
