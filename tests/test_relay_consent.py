"""The relay's part in consent: it forwards announcements, requests and denials only
first-hand and between the right roles, queues them durably for offline members, rate-limits
requests per requester, closes a request once (approved by a token, or denied), and logs
every step in the audit chain. Each runs on both relay stores (SQLite and PostgreSQL: the
store_at fixture); tests/test_pgstore.py has what only PostgreSQL has (schema migration,
several relay processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from nodes.relay_harness import Harness, expect, receive_delivery, running_relay, send_submission
from nodes.relay_helpers import (
    NOW,
    FakeClock,
    World,
    add_inline_report,
    announce,
    ask,
    deny,
    make_world,
    seal,
    token_for,
)

from relay.storage import open_store
from tisa.audit import GENESIS, AuditEvent, Extract, verify_extract
from tisa.consent import Answer, Request
from tisa.errors import Reason, Refused
from tisa.limits import Limits
from tisa.messages import (
    Ack,
    AuditFetch,
    AuditReply,
    ConsentNotice,
    Refusal,
    Release,
    Released,
    SendConsent,
    Stored,
)
from tisa.report import SealedReport
from tisa.token import ReleaseToken
from tisa_io.link import Link

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


async def held(h: Harness, seoul: Link) -> SealedReport:
    report = seal(h.world, b"held until asked")
    await send_submission(seoul, report, expires=NOW + 24 * 3600)
    await expect(seoul, Stored)
    return report


async def send(link: Link, kind: str, data: bytes) -> Ack | Refusal:
    await link.send(SendConsent(kind=kind, data=data))
    reply = await link.receive()
    assert isinstance(reply, Ack | Refusal), reply
    return reply


async def refused(link: Link, kind: str, data: bytes) -> Reason:
    reply = await send(link, kind, data)
    assert isinstance(reply, Refusal), reply
    return Reason(reply.reason)


async def test_request_denied_then_final(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            report = await held(h, seoul)
            request = ask(world, report.report_id)
            assert await send(tokyo, "request", request.encoded) == Ack(
                kind="request", token=request.id
            )
            notice = await expect(seoul, ConsentNotice)
            assert (notice.kind, notice.data) == ("request", request.encoded)
            await seoul.send(Ack(kind="request", token=request.id))
            answer = deny(world, request, "level_not_allowed")
            assert await send(seoul, "answer", answer.encoded) == Ack(
                kind="answer", token=request.id
            )
            notice = await expect(tokyo, ConsentNotice)
            assert (notice.kind, notice.data) == ("answer", answer.encoded)
            # A denial is final: another denial, or an approval, is refused.
            assert await refused(seoul, "answer", deny(world, request).encoded) is Reason.ANSWERED
            approval = token_for(world, report, request=request.id)
            await seoul.send(Release(token=approval))
            assert Reason((await expect(seoul, Refusal)).reason) is Reason.ANSWERED
            # The same denial sent again (its ack lost) is acked again, not forwarded again.
            assert isinstance(await send(seoul, "answer", answer.encoded), Ack)
            # A new request may follow.
            again = ask(world, report.report_id)
            assert isinstance(await send(tokyo, "request", again.encoded), Ack)


async def test_request_approved_by_a_token_that_names_it(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            report = await held(h, seoul)
            request = ask(world, report.report_id)
            await send(tokyo, "request", request.encoded)
            await expect(seoul, ConsentNotice)
            approval = token_for(world, report, request=request.id)
            await seoul.send(Release(token=approval))
            await expect(seoul, Released)
            got, _ = await receive_delivery(tokyo)
            assert ReleaseToken.decode(got).request == request.id
            # A second approval of the same request, and a denial after it, are refused.
            second = token_for(world, report, request=request.id, counter=2)
            await seoul.send(Release(token=second))
            assert Reason((await expect(seoul, Refusal)).reason) is Reason.ANSWERED
            assert await refused(seoul, "answer", deny(world, request).encoded) is Reason.ANSWERED
            # Every step is in the audit chain, and each party's extract verifies.
            await tokyo.send(AuditFetch(since=0))
            reply = await expect(tokyo, AuditReply)
            entries, _ = verify_extract(
                Extract.decode(reply.extract), world.arrangement, "tokyo", known=(0, GENESIS)
            )
            events = [(e.event, e.token) for e in entries]
            assert (AuditEvent.REQUESTED, request.id) in events
            assert (AuditEvent.APPROVED, request.id) in events
            refusals = [e.reason for e in entries if e.event is AuditEvent.REFUSED]
            assert refusals == []  # Seoul's refused sends concern Seoul alone


async def test_approval_for_no_such_request_is_refused(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = await held(h, seoul)
            await seoul.send(Release(token=token_for(world, report, request=bytes(16))))
            assert Reason((await expect(seoul, Refusal)).reason) is Reason.UNSOLICITED


async def test_forwarding_is_first_hand_and_between_the_right_parties(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            report = await held(h, seoul)
            request = ask(world, report.report_id)
            # Seoul sends on a request Tokyo signed: not first-hand.
            assert await refused(seoul, "request", request.encoded) is Reason.WRONG_SENDER
            # Tokyo sends a denial of a request nobody made to it.
            forged = Answer.deny(
                world.secrets["tokyo"],
                "tokyo",
                world.arrangement,
                Request.issue(
                    world.secrets["seoul"],
                    "seoul",
                    world.arrangement,
                    originator="tokyo",
                    report=report.report_id,
                    purpose="p",
                    now=NOW,
                    valid_for=60,
                ),
                reason="denied",
                now=NOW,
            )
            assert await refused(tokyo, "answer", forged.encoded) is Reason.UNSOLICITED
            # A request for a report the originator does not hold, or to the wrong one.
            assert await refused(tokyo, "request", ask(world, bytes(16)).encoded) is (
                Reason.UNKNOWN_REPORT
            )
            # A request in another kind's slot, and garbage.
            assert await refused(tokyo, "answer", request.encoded) is Reason.MALFORMED
            assert await refused(tokyo, "request", b"\x80") is Reason.MALFORMED
            # An announcement by someone who does not hold the report.
            tokyo_says = announce(world, report, by="tokyo", to="seoul")
            assert await refused(tokyo, "announce", tokyo_says.encoded) is Reason.UNKNOWN_REPORT
            # An expired request.
            old = ask(world, report.report_id, now=NOW - 4000)
            assert await refused(tokyo, "request", old.encoded) is Reason.EXPIRED


async def test_requests_are_rate_limited_per_requester(world: World, store_at: str | Path) -> None:
    clock = FakeClock()
    limits = Limits(handshake_timeout=5, frame_timeout=5, max_requests_per_hour=2)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=clock) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            report = await held(h, seoul)
            first, second = ask(world, report.report_id), ask(world, report.report_id)
            assert isinstance(await send(tokyo, "request", first.encoded), Ack)
            assert isinstance(await send(tokyo, "request", second.encoded), Ack)
            # A resend is no new request: acked, not counted.
            assert isinstance(await send(tokyo, "request", first.encoded), Ack)
            third = ask(world, report.report_id)
            assert await refused(tokyo, "request", third.encoded) is Reason.RATE_LIMITED
            # An hour later the window has room again (also after the expiry sweep).
            clock.now = NOW + 3601
            h.relay.expire_now()
            fourth = ask(world, report.report_id, now=NOW + 3601)
            assert isinstance(await send(tokyo, "request", fourth.encoded), Ack)


async def test_queued_for_an_offline_member_across_a_restart(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = await held(h, seoul)
            announcement = announce(world, report, title="Musudan")
            assert await send(seoul, "announce", announcement.encoded) == Ack(
                kind="announce", token=announcement.id
            )
            await seoul.aclose()
            await h.restart()
            tokyo = await h.connect("tokyo")
            notice = await expect(tokyo, ConsentNotice)
            assert (notice.kind, notice.data) == ("announce", announcement.encoded)
            request = ask(world, report.report_id)
            await send(tokyo, "request", request.encoded)
            # Not acked: it comes again on the next connection; acked: never again.
            await tokyo.send(Ack(kind="announce", token=announcement.id))
            seoul = await h.connect("seoul")
            assert (await expect(seoul, ConsentNotice)).data == request.encoded
            await seoul.aclose()
            await h.restart()
            seoul = await h.connect("seoul")
            assert (await expect(seoul, ConsentNotice)).data == request.encoded
            await seoul.send(Ack(kind="request", token=request.id))
            await trio.testing.wait_all_tasks_blocked()
            assert h.relay.store.queued_consent("seoul") == []
            assert h.relay.store.queued_consent("tokyo") == []


@pytest.mark.parametrize("version", [3, 4, 5])  # 5: a store with the prekey table
def test_version_3_to_5_store_gains_the_consent_tables(tmp_path: Path, version: int) -> None:
    import sqlite3

    from relay.store import SCHEMA_VERSION, Store

    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "relay.db")
    for table in ("requests", "announcements", "consent_queue"):
        db.execute(f"DROP TABLE {table}")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.queued_consent("seoul") == [] and store.request_state(bytes(16)) is None
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "relay.db")
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    db.close()


def test_an_approval_closes_its_request_in_the_step_of_its_release(
    world: World, store_at: str | Path
) -> None:
    store = open_store(store_at, group_commit=True)
    try:
        report = seal(world)
        add_inline_report(store, report)
        request = ask(world, report.report_id)
        assert store.add_request(request, now=NOW, max_per_hour=5)
        approval = ReleaseToken.decode(token_for(world, report, request=request.id))
        # The release is refused after the approval was written: both are undone, and
        # neither is in the audit chain.
        before = store.audit_seq
        with pytest.raises(Refused) as refused:
            store.release(approval, now=NOW, max_queue=0, clock_skew=0)
        assert refused.value.reason is Reason.QUEUE_FULL
        assert store.request_state(request.id) == "open" and store.audit_seq == before
        # Past the request's expiry (and the clock skew) it can no longer be approved.
        with pytest.raises(Refused) as refused:
            store.release(approval, now=request.expires + 5, max_queue=10, clock_skew=5)
        assert refused.value.reason is Reason.EXPIRED
        assert store.request_state(request.id) == "open" and store.audit_seq == before
        store.release(approval, now=NOW, max_queue=10, clock_skew=0)
        assert store.request_state(request.id) == "approved"
        events = [entry.event for entry, _, _ in store.audit_entries(before, limit=10)]
        assert events == [AuditEvent.APPROVED, AuditEvent.RELEASED]
        again = ReleaseToken.decode(token_for(world, report, request=request.id, counter=2))
        with pytest.raises(Refused) as refused:
            store.release(again, now=NOW, max_queue=10, clock_skew=0)
        assert refused.value.reason is Reason.ANSWERED
        store.commit_durably()
    finally:
        store.close()
