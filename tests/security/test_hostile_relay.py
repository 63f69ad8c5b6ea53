"""The real client node against a hostile relay: every misbehaviour fails closed.

Seoul (originator and recipient), Tokyo (recipient and originator) and the hostile
Washington over 127.0.0.1, with :mod:`tisa_testing.relay`. Each test picks one
misbehaviour and checks what the node shows its application: a rejected delivery with
the right error, a release gap, a refusal, a verification failure, and never a report
that was not released, altered, or already handed over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from clients.events import DeliveredReport, DeliveryRejected, Event, RefusedEvent, ReleaseGap
from clients.node import Node
from tisa.audit import AuditEntry, AuditEvent, checkpoints_conflict
from tisa.errors import Reason, Refused, VerificationError
from tisa.messages import Release
from tisa_testing import relay as hr
from tisa_testing.world import LEVEL, SCOPE, World, make_world

TIMEOUT = 10


@dataclasses.dataclass
class Net:
    world: World
    nursery: trio.Nursery
    tmp: pathlib.Path
    relay: hr.HostileRelay | None = None
    port: int = 0
    # The relay's store address; None: a SQLite store in tmp/washington.
    store: str | None = None

    async def start(self, behaviour: hr.Behaviour, world: World | None = None) -> hr.HostileRelay:
        self.relay, self.port = await hr.start_hostile_relay(
            self.nursery, world or self.world, self.store or self.tmp / "washington", behaviour
        )
        return self.relay

    def node(
        self, name: str, world: World | None = None
    ) -> contextlib.AbstractAsyncContextManager[Node]:
        return hr.open_member(world or self.world, name, self.port, self.tmp / name)


@pytest.fixture
async def net(nursery: trio.Nursery, tmp_path: pathlib.Path) -> AsyncIterator[Net]:
    yield Net(make_world(), nursery, tmp_path)


async def published(net: Net, name: str = "tokyo") -> None:
    """Run ``name``'s node until the relay holds its prekeys: a release to a member that
    never connected waits for them (see Limits.prekey_wait)."""
    assert net.relay is not None
    async with net.node(name):
        while net.relay.store.prekey_status(name, now=net.relay.now())[1] == 0:
            await trio.sleep(0.02)


async def submit(node: Node, body: bytes, to: str = "tokyo") -> bytes:
    return await node.submit(body, recipients=[to], scope=SCOPE, level=LEVEL, release_to=[to])


async def next_event(node: Node, kind: type[Event], timeout: float = TIMEOUT) -> Any:
    with trio.fail_after(timeout):
        async for event in node.events():
            if isinstance(event, kind):
                return event
    raise AssertionError("unreachable")


async def reports_within(node: Node, seconds: float) -> list[DeliveredReport]:
    got: list[DeliveredReport] = []
    with trio.move_on_after(seconds):
        async for report in node.reports():
            got.append(report)
            await node.ack(report)
    return got


async def rejected(node: Node) -> DeliveryRejected:
    event = await next_event(node, DeliveryRejected)
    assert isinstance(event, DeliveryRejected)
    return event


def _refused(event: DeliveryRejected, reason: Reason) -> None:
    assert isinstance(event.error, Refused), event.error
    assert event.error.reason is reason


# --- alteration ------------------------------------------------------------------------


@pytest.mark.parametrize("where,bit", [("ciphertext", 8 * 30), ("ciphertext", -1), ("token", -9)])
async def test_flipped_bit_is_rejected_opaquely(net: Net, where: str, bit: int) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.FlipBit(bit, where))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"altered on the way")
            event = await rejected(tokyo)
            assert type(event.error) is VerificationError
            assert await reports_within(tokyo, 0.2) == []


async def test_truncated_chunked_ciphertext_is_never_delivered(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await net.start(hr.Truncate(keep_chunks=1))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, os.urandom(70_000))  # two chunks
            # The delivery ends short of the token's size: Tokyo drops the connection
            # (a protocol error) and reconnects; it never hands anything over.
            assert await reports_within(tokyo, 1.0) == []
            connects = [e for e in relay.log if e[0] == "sent" and e[1] == "tokyo"]
            assert len(connects) >= 2  # redelivered after each disconnect, cut each time
            assert tokyo.store.inbox_after(0, limit=10) == []


class _CutOneByte(hr.Behaviour):
    async def on_delivery(self, member: str, delivery: hr.Delivery) -> list[hr.Outgoing]:
        return [(member, dataclasses.replace(delivery, ciphertext=delivery.ciphertext[:-1]))]


async def test_an_inline_delivery_of_another_size_is_never_delivered(net: Net) -> None:
    # A small report travels as one deliver_inline; one whose data is not the token's
    # size is a protocol error, as a short stream is: Tokyo drops the connection.
    with trio.fail_after(TIMEOUT):
        relay = await net.start(_CutOneByte())
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"one byte short on the way")
            assert await reports_within(tokyo, 1.0) == []
            sent = [e for e in relay.log if e[0] == "sent" and e[1] == "tokyo"]
            assert len(sent) >= 2  # redelivered after each disconnect, cut each time
            assert tokyo.store.inbox_after(0, limit=10) == []


async def test_truncated_and_refilled_ciphertext_is_rejected(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.Truncate(keep_chunks=1, refill=os.urandom(80_000)))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, os.urandom(70_000))
            event = await rejected(tokyo)
            assert type(event.error) is VerificationError


# --- wrong token, no token, wrong member ----------------------------------------------------


async def test_forward_without_a_token_of_the_originator(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.ForwardWithoutToken())
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"the relay has no key for this")
            event = await rejected(tokyo)
            assert type(event.error) is VerificationError


async def test_forward_with_another_reports_token(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.SwapTokens())
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"first report")
            await submit(seoul, b"second report")  # same bucket: same size
            for _ in range(2):
                assert type((await rejected(tokyo)).error) is VerificationError
            assert await reports_within(tokyo, 0.2) == []


async def test_swapped_recipient(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.SwapRecipients({"tokyo": "seoul"}))
        async with net.node("seoul") as seoul, net.node("tokyo"):
            await submit(seoul, b"for tokyo only")
            _refused(await rejected(seoul), Reason.WRONG_RECIPIENT)


async def test_reflected_delivery_to_its_originator(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await net.start(hr.ReflectDelivery())
        await published(net)
        async with net.node("seoul") as seoul:
            await submit(seoul, b"reflected")
            _refused(await rejected(seoul), Reason.WRONG_RECIPIENT)
            assert isinstance(relay.behaviour, hr.ReflectDelivery)
            assert relay.behaviour.reflected >= 1


async def test_reflected_message_closes_the_link(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await net.start(hr.Reflect((Release,)))
        await published(net)
        async with net.node("seoul") as seoul:
            await submit(seoul, b"reflected release")
            # Seoul gets its own release back: not a message a relay sends, so it closes
            # the link (and reconnects); nothing is acted on.
            with trio.fail_after(5):
                while sum(1 for e in relay.log if e[2:] and isinstance(e[2], Release)) < 2:
                    await trio.sleep(0.05)
            assert seoul.store.inbox_after(0, limit=10) == []


# --- drop, delay, reorder, replay -------------------------------------------------------------


async def test_dropped_release_is_noticed_through_the_counter(net: Net) -> None:
    dropped_counter = 1
    with trio.fail_after(TIMEOUT):
        await net.start(hr.DropDeliveries(lambda m, d: d.decoded.counter == dropped_counter))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"dropped by the relay")
            await submit(seoul, b"forwarded")
            gap = await next_event(tokyo, ReleaseGap)
            assert (gap.originator, gap.expected, gap.got) == ("seoul", 1, 2)
            got = await reports_within(tokyo, 0.5)
            assert [r.read_body() for r in got] == [b"forwarded"]
            # The node keeps the account: release 1 of Seoul never arrived.
            assert tokyo.missing_releases("seoul") == [1]


async def test_delayed_past_the_tokens_validity(net: Net) -> None:
    world = net.world

    def later() -> None:
        world.now += 3 * 3600  # past the node's default token validity and clock skew

    with trio.fail_after(TIMEOUT):
        await net.start(hr.Delay(0.1, before=later))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await seoul.submit(
                b"late",
                recipients=["tokyo"],
                scope=SCOPE,
                level=LEVEL,
                release_to=["tokyo"],
                valid_for=3600,
            )
            _refused(await rejected(tokyo), Reason.EXPIRED)


async def test_reordered_deliveries_arrive_once_each(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.Reorder(batch=2))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"one")
            await submit(seoul, b"two")
            got = await reports_within(tokyo, 1.0)
            assert sorted(r.read_body() for r in got) == [b"one", b"two"]


async def test_replay_after_ack_and_after_recipient_restart(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await net.start(hr.Replay())
        behaviour = relay.behaviour
        assert isinstance(behaviour, hr.Replay)

        def acks() -> int:
            # Delivery acks, and the receipts that stand for them (protocol version 4).
            return sum(
                1
                for e in relay.log
                if e[0] == "received" and e[1] == "tokyo" and hr.acked_delivery(e[2]) is not None
            )

        async with net.node("seoul") as seoul:
            async with net.node("tokyo") as tokyo:
                await submit(seoul, b"exactly once")
                got = await reports_within(tokyo, 0.5)
                while acks() < 2:  # the replay was processed and acknowledged again
                    await trio.sleep(0.05)
                got += await reports_within(tokyo, 0.3)
            before = acks()
            async with net.node("tokyo") as tokyo:  # restarted on the same store
                while acks() <= before:
                    await trio.sleep(0.05)
                got += await reports_within(tokyo, 0.3)
            assert [r.read_body() for r in got] == [b"exactly once"]
            assert behaviour.replayed >= 2


# --- old arrangement, equivocation ------------------------------------------------------------


async def test_delivery_under_an_old_arrangement_version(net: Net) -> None:
    old = net.world
    new_arrangement = old.arrangement.amend(levels=("confidential", LEVEL, "top-secret"))
    new = dataclasses.replace(old, arrangement=new_arrangement)
    report = old.seal(b"sealed under version 1")
    stale = hr.Delivery.of(old.token(report, "tokyo"), report.ciphertext)
    with trio.fail_after(TIMEOUT):
        await net.start(hr.Inject({"tokyo": [stale]}), world=new)
        async with net.node("tokyo", world=new) as tokyo:
            _refused(await rejected(tokyo), Reason.WRONG_ARRANGEMENT)


async def test_relay_serving_an_old_arrangement_is_refused(net: Net) -> None:
    old = net.world
    new = dataclasses.replace(old, arrangement=old.arrangement.amend(scopes=(SCOPE,)))
    with trio.fail_after(TIMEOUT):
        await net.start(hr.Behaviour(), world=old)
        async with net.node("tokyo", world=new) as tokyo:
            event = await next_event(tokyo, RefusedEvent)
            assert event.reason is Reason.WRONG_ARRANGEMENT


async def test_equivocating_audit_histories_are_caught(net: Net) -> None:
    fake: list[AuditEntry] = []
    behaviour = hr.Equivocate({"tokyo": fake})
    with trio.fail_after(TIMEOUT):
        relay = await net.start(behaviour)
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            await submit(seoul, b"audited")
            got = await reports_within(tokyo, 0.5)
            assert len(got) == 1
            # Wait until the ack is in the log, then freeze the history.
            while len(relay.store.audit_entries(0, limit=100)) < 4:
                await trio.sleep(0.05)
            real = [entry for entry, _, _ in relay.store.audit_entries(0, limit=100)]
            # Tokyo is shown the same number of entries, one of them rewritten (the
            # relay hides that it forwarded late): each history checks out alone.
            fake.extend(real)
            index = next(i for i, e in enumerate(real) if e.event is AuditEvent.FORWARDED)
            fake[index] = dataclasses.replace(real[index], time=real[index].time - 60)
            await seoul.fetch_audit()
            await tokyo.fetch_audit()
            seoul_cp, tokyo_cp = _checkpoint(seoul), _checkpoint(tokyo)
            if _seq(seoul_cp, net) != _seq(tokyo_cp, net):
                pytest.skip("the log grew between the two fetches")
            # Comparing the signed checkpoints proves the equivocation.
            assert checkpoints_conflict(seoul_cp, tokyo_cp, net.world.arrangement)
            # And once Tokyo is shown the real history, its node refuses the fork.
            behaviour.enabled = False
            await submit(seoul, b"more history")
            await reports_within(tokyo, 0.3)
            with pytest.raises(VerificationError):
                await tokyo.fetch_audit()


def _checkpoint(node: Node) -> bytes:
    # The node keeps the last checkpoint it verified; comparing it with another
    # member's is how equivocation is caught (see docs/security.md).
    checkpoint = node.audit_checkpoint()
    assert checkpoint is not None
    return checkpoint.encoded


def _seq(checkpoint: bytes, net: Net) -> int:
    from tisa.audit import Checkpoint

    return Checkpoint.verify(checkpoint, net.world.arrangement).seq
