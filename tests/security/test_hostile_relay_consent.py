"""Release requests and their answers through a hostile relay: a reflected, re-targeted,
replayed or forged request or answer, and an approval nobody asked for, each fail closed
at the member with a reason code (or the opaque verification failure for a forgery),
and never reach the application as genuine. Each runs on both relay stores (SQLite and
PostgreSQL: the store_at fixture).

Prior art: the attacks on Matrix's key-request flow (keys forwarded without a request and
accepted, answers taken from a party other than the one asked).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from clients.events import (
    ApprovedEvent,
    ConsentRejected,
    DeniedEvent,
    Event,
    RequestEvent,
)
from clients.node import Node
from clients.store import MemberStore
from security.test_hostile_relay import TIMEOUT, Net, next_event, rejected
from tisa import encoding as enc
from tisa.consent import Request
from tisa.errors import Reason, Refused, VerificationError
from tisa.keys import Context, random_id
from tisa.messages import ConsentNotice
from tisa_testing import hostile
from tisa_testing import relay as hr
from tisa_testing.world import LEVEL, SCOPE, World, make_world


def _store(store_at: str | pathlib.Path) -> str | None:
    # The relay's part runs on both stores: a SQLite store where Net puts it, or the
    # PostgreSQL schema of this test.
    return store_at if isinstance(store_at, str) else None


@pytest.fixture
async def net(
    nursery: trio.Nursery, tmp_path: pathlib.Path, store_at: str | pathlib.Path
) -> AsyncIterator[Net]:
    """As :func:`security.test_hostile_relay.net`, once per store backend."""
    yield Net(make_world(), nursery, tmp_path, store=_store(store_at))


@pytest.fixture
async def net3(
    nursery: trio.Nursery, tmp_path: pathlib.Path, store_at: str | pathlib.Path
) -> AsyncIterator[Net]:
    """As ``net``, with Canberra (a recipient only) to re-target things to."""
    yield Net(make_world(third_party=True), nursery, tmp_path, store=_store(store_at))


async def held(seoul: Node) -> bytes:
    report_id = await seoul.submit(
        b"held until Tokyo asks", recipients=["tokyo"], scope=SCOPE, level=LEVEL
    )
    await seoul.wait_stored(report_id)
    return report_id


async def consent_rejected(node: Node) -> ConsentRejected:
    event = await next_event(node, ConsentRejected)
    assert isinstance(event, ConsentRejected)
    return event


def reason(event: ConsentRejected) -> Reason:
    assert isinstance(event.error, Refused), event.error
    return event.error.reason


async def events_within(node: Node, seconds: float) -> list[Event]:
    got: list[Event] = []
    with trio.move_on_after(seconds):
        async for event in node.events():
            got.append(event)
    return got


async def test_reflected_request_is_refused(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await net.start(hr.ReflectConsent(("request",)))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            report_id = await held(seoul)
            request_id = await tokyo.request(report_id, "seoul", "p")
            event = await consent_rejected(tokyo)
            assert (event.kind, event.ref, reason(event)) == (
                "request",
                request_id,
                Reason.REFLECTED,
            )
            assert relay.behaviour.reflected == 1  # type: ignore[attr-defined]
            # The honest half still happened: Seoul got the request.
            assert (await next_event(seoul, RequestEvent)).request.id == request_id
            assert tokyo.requests("in") == []


async def test_reflected_answer_is_refused(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        await net.start(hr.ReflectConsent(("answer",)))
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            report_id = await held(seoul)
            request_id = await tokyo.request(report_id, "seoul", "p")
            await next_event(seoul, RequestEvent)
            await seoul.deny(request_id, "denied")
            event = await consent_rejected(seoul)
            assert (event.kind, reason(event)) == ("answer", Reason.REFLECTED)
            assert (await next_event(tokyo, DeniedEvent)).answer.request == request_id


@contextlib.asynccontextmanager
async def retargeting(
    net: Net, mapping: dict[str, str]
) -> AsyncIterator[tuple[Node, Node, Node, bytes]]:
    """Seoul, Tokyo and Canberra through a relay that re-targets consent by ``mapping``,
    once Tokyo has asked Seoul for a held report (the request's id last)."""
    with trio.fail_after(TIMEOUT):
        await net.start(hr.RetargetConsent(mapping))
        async with (
            net.node("seoul") as seoul,
            net.node("tokyo") as tokyo,
            net.node("canberra") as canberra,
        ):
            report_id = await held(seoul)
            request_id = await tokyo.request(report_id, "seoul", "p")
            yield seoul, tokyo, canberra, request_id


async def test_retargeted_request_is_refused(net3: Net) -> None:
    async with retargeting(net3, {"seoul": "canberra"}) as (seoul, _tokyo, canberra, request_id):
        event = await consent_rejected(canberra)
        assert (event.ref, reason(event)) == (request_id, Reason.WRONG_ORIGINATOR)
        assert canberra.requests() == []
        assert not [e for e in await events_within(seoul, 0.2) if isinstance(e, RequestEvent)]


async def test_retargeted_answer_is_refused(net3: Net) -> None:
    async with retargeting(net3, {"tokyo": "canberra"}) as (seoul, tokyo, canberra, request_id):
        await next_event(seoul, RequestEvent)
        await seoul.deny(request_id, "out_of_scope")
        event = await consent_rejected(canberra)
        assert (event.kind, event.ref, reason(event)) == (
            "answer",
            request_id,
            Reason.WRONG_RECIPIENT,
        )
        assert tokyo.requests("out")[0].state == "open"


async def test_replayed_requests_and_answers_change_nothing(net: Net) -> None:
    with trio.fail_after(TIMEOUT):
        relay = await net.start(hr.ReplayConsent())
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            report_id = await held(seoul)
            first = await tokyo.request(report_id, "seoul", "first")
            await next_event(seoul, RequestEvent)
            await seoul.deny(first, "denied")
            await next_event(tokyo, DeniedEvent)
            # A new request for the same report; the old denial comes again (after the
            # ack, and on reconnection): it answers only the request it names.
            second = await tokyo.request(report_id, "seoul", "second")
            assert (await next_event(seoul, RequestEvent)).request.id == second
            await seoul.approve(second)
            approved = await next_event(tokyo, ApprovedEvent)
            assert approved.request == second
        async with net.node("seoul") as seoul, net.node("tokyo") as tokyo:
            later = await events_within(tokyo, 0.3) + await events_within(seoul, 0.3)
            states = {r.id: r.state for r in tokyo.requests("out")}
        behaviour = relay.behaviour
        assert isinstance(behaviour, hr.ReplayConsent) and behaviour.replayed >= 4
        # Nothing replayed reached an application a second time, nor was rejected.
        assert [
            e for e in later if isinstance(e, DeniedEvent | RequestEvent | ConsentRejected)
        ] == []
        assert states == {first: "denied", second: "approved"}


async def test_forged_and_altered_requests_fail_opaquely(net: Net) -> None:
    world = net.world
    report = world.seal(b"x")
    genuine = tokyo_request(world, report.report_id)
    # The relay signs a request in Tokyo's name with its own key; then it takes Tokyo's
    # genuine request and re-targets it to another report, keeping the signature.
    forged = hostile.resign_envelope(genuine.encoded, world.secrets["washington"], Context.REQUEST)
    body, signature = hostile.envelope_parts(genuine.encoded)
    fields = enc.unpack(body)
    fields["report"] = random_id()
    altered = enc.pack({"body": enc.pack(fields), "sig": signature})
    items: dict[str, list[Any]] = {
        "seoul": [
            ConsentNotice(kind="request", data=forged),
            ConsentNotice(kind="request", data=altered),
        ]
    }
    with trio.fail_after(TIMEOUT):
        await net.start(hr.Inject(items))
        async with net.node("seoul") as seoul:
            for _ in range(2):
                event = await consent_rejected(seoul)
                assert type(event.error) is VerificationError
            assert seoul.requests() == []


async def test_approval_without_a_request_is_rejected(net: Net) -> None:
    # A release token that claims to answer a request Tokyo never made: a forwarded key
    # nobody asked for. The report is genuine, but Tokyo refuses it as unsolicited.
    world = net.world
    report = world.seal(b"released as if asked")
    token = world.token(report, request=random_id())
    # Tokyo holds the signed prekey the token is wrapped to (as if it had published it),
    # so the key unwraps and the request is what the check stops at.
    store = MemberStore(net.tmp / "tokyo", "tokyo")
    store.add_prekeys(list(world.prekey_secrets["tokyo"].values()))
    store.close()
    items: dict[str, list[Any]] = {"tokyo": [hr.Delivery.of(token, report.ciphertext)]}
    with trio.fail_after(TIMEOUT):
        await net.start(hr.Inject(items))
        async with net.node("tokyo") as tokyo:
            event = await rejected(tokyo)
            assert isinstance(event.error, Refused)
            assert event.error.reason is Reason.UNSOLICITED
            assert tokyo.store.inbox_after(0, limit=10) == []


def tokyo_request(world: World, report_id: bytes) -> Request:
    return Request.issue(
        world.secrets["tokyo"],
        "tokyo",
        world.arrangement,
        originator="seoul",
        report=report_id,
        purpose="p",
        now=world.now,
        valid_for=3600,
    )
