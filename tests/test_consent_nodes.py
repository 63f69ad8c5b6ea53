"""Consent end to end: Seoul holds a report and announces it, Tokyo requests it, Seoul
approves (the report arrives under a token naming the request) or denies (with a reason
code), over the real relay on 127.0.0.1 and two client nodes with their own stores."""

from __future__ import annotations

import pytest
import test_three_nodes
import trio
from nodes.client_world import LEVEL, SCOPE
from test_three_nodes import World, first_report, next_event

from clients.events import (
    AnnouncementEvent,
    ApprovedEvent,
    DeniedEvent,
    RequestEvent,
)
from clients.node import Node
from tisa.errors import Reason, Refused, UsageError

# The relay-and-two-nodes fixture of the three-node tests.
world = test_three_nodes.world


async def held_and_announced(seoul: Node, title: str = "Musudan, 2014-06-26") -> bytes:
    report_id = await seoul.submit(
        b"two launches at 05:51 and 05:58", recipients=["tokyo"], scope=SCOPE, level=LEVEL
    )
    await seoul.wait_stored(report_id)
    await seoul.announce(report_id, ["tokyo"], title=title)
    return report_id


async def test_announce_request_approve(world: World) -> None:
    with trio.fail_after(15):
        async with world.node("seoul") as seoul, world.node("tokyo") as tokyo:
            report_id = await held_and_announced(seoul)
            announced = await next_event(tokyo, AnnouncementEvent)
            assert announced.announcement.report == report_id
            assert announced.announcement.title == "Musudan, 2014-06-26"
            assert (announced.announcement.scope, announced.announcement.level) == (SCOPE, LEVEL)
            assert tokyo.announcements() == [announced.announcement]

            request_id = await tokyo.request(report_id, "seoul", "to assess the same launch")
            asked = await next_event(seoul, RequestEvent)
            assert asked.request.id == request_id
            assert asked.request.purpose == "to assess the same launch"
            [incoming] = seoul.requests("in")
            assert (incoming.state, incoming.requester) == ("open", "tokyo")

            token_id = await seoul.approve(request_id)
            report = await first_report(tokyo)
            assert report.read_body() == b"two launches at 05:51 and 05:58"
            approved = await next_event(tokyo, ApprovedEvent)
            assert (approved.request, approved.report, approved.token) == (
                request_id,
                report_id,
                token_id,
            )
            [mine] = tokyo.requests("out")
            assert (mine.state, mine.token) == ("approved", token_id)
            assert seoul.requests("in")[0].state == "approved"
            # Answered once: no second answer of either kind.
            with pytest.raises(Refused) as exc:
                await seoul.approve(request_id)
            assert exc.value.reason is Reason.ANSWERED
            with pytest.raises(Refused) as exc:
                await seoul.deny(request_id, "denied")
            assert exc.value.reason is Reason.ANSWERED


async def test_request_denied_with_reason_then_asked_again(world: World) -> None:
    with trio.fail_after(15):
        async with world.node("seoul") as seoul, world.node("tokyo") as tokyo:
            report_id = await held_and_announced(seoul)
            first = await tokyo.request(report_id, "seoul", "routine")
            await next_event(seoul, RequestEvent)
            await seoul.deny(first, "level_not_allowed", "not at this level yet")
            denied = await next_event(tokyo, DeniedEvent)
            assert denied.answer.request == first
            assert denied.answer.reason is Reason.LEVEL_NOT_ALLOWED
            assert denied.answer.note == "not at this level yet"
            [mine] = tokyo.requests("out")
            assert (mine.state, mine.reason, mine.note) == (
                "denied",
                "level_not_allowed",
                "not at this level yet",
            )
            # A denial is final for that request; a new request may follow.
            second = await tokyo.request(report_id, "seoul", "after consultations")
            assert second != first
            assert (await next_event(seoul, RequestEvent)).request.id == second
            await seoul.approve(second)
            assert (await first_report(tokyo)).report_id == report_id


async def test_relay_refusals_reach_the_caller(world: World) -> None:
    with trio.fail_after(15):
        async with world.node("seoul") as seoul, world.node("tokyo") as tokyo:
            with pytest.raises(Refused) as exc:
                await tokyo.request(bytes(16), "seoul", "a guess")
            assert exc.value.reason is Reason.UNKNOWN_REPORT
            assert tokyo.requests("out")[0].state == "refused"
            report_id = await held_and_announced(seoul)
            request_id = await tokyo.request(report_id, "seoul", "p")
            await next_event(seoul, RequestEvent)
            with pytest.raises(UsageError):
                await seoul.deny(request_id, "approved")  # no denial code
            # Tokyo cannot answer a request made to Seoul.
            with pytest.raises(UsageError):
                await tokyo.deny(request_id, "denied")


async def test_request_waits_for_an_offline_originator(world: World) -> None:
    # Seoul is offline while Tokyo asks; the relay queues the request durably.
    with trio.fail_after(15):
        async with world.node("seoul") as seoul:
            report_id = await held_and_announced(seoul)
        async with world.node("tokyo") as tokyo:
            await next_event(tokyo, AnnouncementEvent)
            request_id = await tokyo.request(report_id, "seoul", "while Seoul sleeps")
        async with world.node("seoul") as seoul:
            assert (await next_event(seoul, RequestEvent)).request.id == request_id


async def test_an_expired_request_is_denied_not_approved(world: World) -> None:
    seoul_clock = test_three_nodes.Clock()
    with trio.fail_after(15):
        async with world.node("seoul", clock=seoul_clock) as seoul, world.node("tokyo") as tokyo:
            report_id = await held_and_announced(seoul)
            request_id = await tokyo.request(report_id, "seoul", "soon", valid_for=60)
            await next_event(seoul, RequestEvent)
            seoul_clock.offset = 60 + 120  # past expires, and past the clock skew
            with pytest.raises(Refused) as exc:
                await seoul.approve(request_id)
            assert exc.value.reason is Reason.EXPIRED
            await seoul.deny(request_id, "expired", "ask again")
            denied = await next_event(tokyo, DeniedEvent)
            assert (denied.answer.reason, denied.answer.note) == (Reason.EXPIRED, "ask again")


async def test_two_approvals_at_once_issue_one_token(world: World) -> None:
    # An approval waits for the requester's prekeys like any release; a second approval
    # of the same request meanwhile (or after) is refused "answered", and only one token
    # is issued.
    with trio.fail_after(15):
        async with world.node("seoul") as seoul, world.node("tokyo") as tokyo:
            report_id = await held_and_announced(seoul)
            request_id = await tokyo.request(report_id, "seoul", "twice")
            await next_event(seoul, RequestEvent)
            outcomes: list[bytes | Reason] = []

            async def approve() -> None:
                try:
                    outcomes.append(await seoul.approve(request_id))
                except Refused as exc:
                    outcomes.append(exc.reason)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(approve)
                nursery.start_soon(approve)
            assert sorted(outcomes, key=lambda o: isinstance(o, Reason)) == [
                seoul.requests("in")[0].token,
                Reason.ANSWERED,
            ]
            assert [r.state for r in seoul.store.releases_of(report_id)] == ["released"]
            assert (await first_report(tokyo)).report_id == report_id
