"""Regression tests for bugs found in review of the relay and the member node."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from nodes.relay_harness import Harness, expect, running_relay, send_submission
from nodes.relay_helpers import NOW, World, make_world, seal, token_for

from tisa.errors import Reason
from tisa.limits import Limits
from tisa.messages import (
    Ack,
    AuditFetch,
    AuditReply,
    Deliver,
    DeliverEnd,
    Message,
    Refusal,
    Release,
    Released,
    SendReceipt,
    Stored,
)
from tisa.receipt import Receipt
from tisa.token import ReleaseToken

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


async def _until_audit(link: object) -> list[Message]:
    """Send audit_fetch and collect everything the relay sends before its reply."""
    from relay.transport import Link

    assert isinstance(link, Link)
    await link.send(AuditFetch(since=0))
    got: list[Message] = []
    while True:
        message = await link.receive()
        if isinstance(message, AuditReply):
            return got
        got.append(message)


async def _released(h: Harness, seoul: object, body: bytes, counter: int) -> bytes:
    from relay.transport import Link

    assert isinstance(seoul, Link)
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
    return [ReleaseToken.decode(m.token).id for m in messages if isinstance(m, Deliver)]


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
                got = [await tokyo.receive() for _ in range(3)]
                assert isinstance(got[0], Deliver) and isinstance(got[-1], DeliverEnd)
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
