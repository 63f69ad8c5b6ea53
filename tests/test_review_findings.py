"""Regression tests for bugs found in review of the relay and the member node."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from nodes.relay_harness import (
    Harness,
    expect,
    receive_delivery,
    running_relay,
    send_submission,
)
from nodes.relay_helpers import NOW, World, make_world, seal, token_for

from tisa.errors import Reason
from tisa.limits import Limits
from tisa.messages import (
    Ack,
    AuditFetch,
    AuditReply,
    Deliver,
    DeliverInline,
    Message,
    Refusal,
    Release,
    Released,
    SendReceipt,
    Stored,
)
from tisa.receipt import Receipt
from tisa.token import ReleaseToken
from tisa_io.link import Link

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


async def _until_audit(link: Link) -> list[Message]:
    """Send audit_fetch and collect everything the relay sends before its reply."""
    await link.send(AuditFetch(since=0))
    got: list[Message] = []
    while True:
        message = await link.receive()
        if isinstance(message, AuditReply):
            return got
        got.append(message)


async def _released(h: Harness, seoul: Link, body: bytes, counter: int) -> bytes:
    report = seal(h.world, body)
    await send_submission(seoul, report)
    await expect(seoul, Stored)
    token = token_for(h.world, report, counter=counter)
    await seoul.send(Release(token=token))
    await expect(seoul, Released)
    return ReleaseToken.decode(token).id


async def test_receipt_under_another_arrangement_is_refused_not_a_crash(
    world: World, tmp_path: Path
) -> None:
    # Receipt.verify raises Refused(wrong_arrangement) after the signature checked (a
    # receipt signed under an earlier version of the arrangement, which a node keeps
    # resending until confirmed). The relay must answer `refused` and keep the
    # connection, not fail with an internal error (the handler used an unbound name).
    amended = world.arrangement.amend(levels=("confidential", "secret", "top"))
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            receipt = Receipt.issue(
                world.secrets["tokyo"],
                amended,
                report=bytes(16),
                token=bytes(16),
                originator="seoul",
                recipient="tokyo",
                digest=bytes(32),
                received=NOW,
            )
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            refusal = await expect(tokyo, Refusal)
            assert (refusal.reason, refusal.ref) == (Reason.WRONG_ARRANGEMENT, bytes(16))
            # The connection goes on.
            assert await _until_audit(tokyo) == []


def _delivered(messages: list[Message]) -> list[bytes]:
    return [
        ReleaseToken.decode(m.token).id for m in messages if isinstance(m, Deliver | DeliverInline)
    ]


async def _pushed(link: Link) -> bytes:
    """Read one whole delivery; its token id."""
    token, _ = await receive_delivery(link)
    return ReleaseToken.decode(token).id


async def test_acked_deliveries_leave_no_claims_behind(world: World, tmp_path: Path) -> None:
    # A delivery's claim (which connection of the member pushes it) is only needed while
    # the delivery is outstanding; kept until the connection closed, every delivery ever
    # made on a long-lived connection stayed in two sets (memory growing without bound).
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            for counter in (1, 2, 3):
                token_id = await _released(h, seoul, f"report {counter}".encode(), counter)
                assert await _pushed(tokyo) == token_id
                await tokyo.send(Ack(kind="delivery", token=token_id))
            assert await _until_audit(tokyo) == []
            assert h.relay._claims == {}
            assert all(not c.claims for c in h.relay._connections["tokyo"])


async def test_two_connections_of_a_member_do_not_both_push_a_delivery(
    world: World, tmp_path: Path
) -> None:
    # "When a member has several connections, a delivery is pushed on one of them at a
    # time": both pushers found the new delivery, both waited for its commit, then both
    # claimed and pushed it.
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            first = await h.connect("tokyo")
            second = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            token_id = await _released(h, seoul, b"once", 1)
            await trio.sleep(0.2)
            pushed = _delivered(await _until_audit(first)) + _delivered(await _until_audit(second))
            assert pushed == [token_id]


async def test_a_rescan_does_not_push_again_what_is_in_flight_on_the_connection(
    world: World, tmp_path: Path
) -> None:
    # When another connection of the member closes, its claims are dropped and this
    # connection scans the queue from the start again; deliveries it had pushed itself
    # and not yet seen acked were pushed a second time.
    limits = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120, delivery_window=2)
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=limits) as h:
            seoul = await h.connect("seoul")
            old = await h.connect("tokyo")
            d1 = await _released(h, seoul, b"one", 1)
            d2 = await _released(h, seoul, b"two", 2)
            assert [await _pushed(old), await _pushed(old)] == [d1, d2]  # window full
            new = await h.connect("tokyo")
            d3 = await _released(h, seoul, b"three", 3)
            assert await _pushed(new) == d3
            await old.aclose()  # d1 and d2 are free for `new` again
            assert await _pushed(new) == d1  # the window: d3 and d1
            await new.send(Ack(kind="delivery", token=d1))
            assert await _pushed(new) == d2
            await new.send(Ack(kind="delivery", token=d2))
            # d3 is still in flight on `new`: nothing more to push.
            await trio.sleep(0.3)
            assert _delivered(await _until_audit(new)) == []
