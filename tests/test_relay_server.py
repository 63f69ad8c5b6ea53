"""relay.server over memory streams: submission, release, delivery, receipts, revocation,
expiry, audit, restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
from nodes.relay_helpers import (
    NOW,
    FakeClock,
    World,
    custom_token,
    make_world,
    seal,
    token_for,
)
from nodes.store_probe import ciphertext_apart, leftover_uploads, sql, store_bytes

import tisa_io.durable
from relay.storage import open_store
from relay.store import Store
from tisa.audit import AuditEvent, verify_extract
from tisa.errors import Reason
from tisa.limits import Limits
from tisa.messages import (
    Ack,
    AuditFetch,
    AuditReply,
    Expired,
    Message,
    PrekeyStatus,
    PublishPrekeys,
    ReceiptNotice,
    Refusal,
    Release,
    Released,
    Revoke,
    Revoked,
    SendReceipt,
    Stored,
)
from tisa.receipt import Receipt, StoredAck
from tisa.report import SealedReport, open_report
from tisa.token import Release as TokenRelease
from tisa.token import ReleaseToken, check_for_recipient
from tisa_io.link import Link

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


async def stored(h: Harness, link_name: str = "seoul", **seal_args: object) -> SealedReport:
    link = await h.connect(link_name)
    report = seal(h.world, **seal_args)  # type: ignore[arg-type]
    await send_submission(link, report)
    await expect(link, Stored)
    await link.aclose()
    return report


async def release(h: Harness, token: bytes, name: str = "seoul") -> Released | Refusal:
    link = await h.connect(name)
    await link.send(Release(token=token))
    reply = await link.receive()
    await link.aclose()
    assert isinstance(reply, Released | Refusal), reply
    return reply


def tokyo_checks(world: World, token: bytes) -> TokenRelease:
    """Tokyo's check of ``token`` at NOW, with its prekey secrets."""
    return check_for_recipient(
        token,
        world.arrangement,
        world.secrets["tokyo"],
        "tokyo",
        now=NOW,
        prekey_secret=world.lookup("tokyo"),
    )


def open_delivery(world: World, token: bytes, ciphertext: bytes, name: str = "tokyo") -> bytes:
    granted = check_for_recipient(
        token,
        world.arrangement,
        world.secrets[name],
        name,
        now=NOW,
        prekey_secret=world.lookup(name),
    )
    return open_report(ciphertext, granted.opener(world.arrangement)).body


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "file"])
async def test_submit_is_stored_with_a_signed_ack(
    world: World, store_at: str | Path, inline: bool
) -> None:
    # A report of at most max_inline_report bytes lives in its row; a larger one in a file.
    size = len(seal(world).ciphertext)
    limits = Limits(
        handshake_timeout=5,
        frame_timeout=5,
        clock_skew=120,
        max_inline_report=size if inline else size - 1,
    )
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            link = await h.connect("seoul")
            report = seal(world)
            await send_submission(link, report)
            reply = await expect(link, Stored)
            ack = StoredAck.verify(reply.ack, world.arrangement)
            assert (ack.report, ack.digest, ack.size, ack.originator) == (
                report.report_id,
                report.digest,
                report.size,
                "seoul",
            )
            # The same submission again (an outbox resending after a crash): stored again.
            await send_submission(link, report)
            again = await expect(link, Stored)
            assert StoredAck.verify(again.ack, world.arrangement).report == report.report_id
            # Same id, other bytes: refused duplicate.
            other = seal(world, b"other")
            forged = SealedReport(
                report_id=report.report_id,
                ciphertext=other.ciphertext,
                digest=other.digest,
                content_key=other.content_key,
                header=other.header,
            )
            await send_submission(link, forged)
            refusal = await expect(link, Refusal)
            assert refusal.reason == Reason.DUPLICATE
            # Declared digest that the bytes do not match.
            bad = seal(world, b"third")
            await send_submission(link, bad, data=bytes(len(bad.ciphertext)))
            assert (await expect(link, Refusal)).reason == Reason.WRONG_REPORT
            assert ciphertext_apart(store_at, report.report_id) is not inline
            assert h.relay.store.inline_data(report.report_id) == (
                report.ciphertext if inline else None
            )
            assert not ciphertext_apart(store_at, bad.report_id)
            assert not leftover_uploads(store_at)


async def test_release_deliver_open_ack_receipt(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, b"launch detected")
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            token = token_for(world, report)
            await seoul.send(Release(token=token))
            released = await expect(seoul, Released)
            assert released.report == report.report_id
            # Pushed to the connected recipient at once.
            got_token, ciphertext = await receive_delivery(tokyo)
            assert got_token == token
            assert open_delivery(world, got_token, ciphertext) == b"launch detected"
            granted = tokyo_checks(world, got_token)
            await tokyo.send(Ack(kind="delivery", token=granted.token.id))
            receipt = Receipt.issue(
                world.secrets["tokyo"],
                world.arrangement,
                report=report.report_id,
                token=granted.token.id,
                originator="seoul",
                recipient="tokyo",
                digest=report.digest,
                received=NOW,
            )
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            notice = await expect(seoul, ReceiptNotice)
            assert Receipt.verify(notice.receipt, world.arrangement) == receipt
            await seoul.send(Ack(kind="receipt", token=granted.token.id))
            # Reconnecting: the receipt was acked, the delivery too: nothing comes.
            await seoul.aclose()
            await tokyo.aclose()
            for name in ("seoul", "tokyo"):
                link = await h.connect(name)
                await link.send(AuditFetch(since=0))
                await expect(link, AuditReply)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "file"])
async def test_release_right_behind_submit_end(
    world: World, store_at: str | Path, inline: bool
) -> None:
    # The originator need not wait for `stored`: a release sent right behind submit_end
    # on the same connection is checked after the report is stored (same batch), and is
    # answered after `stored`. Behind a refused submission it is refused unknown_report.
    size = len(seal(world).ciphertext)
    limits = Limits(
        handshake_timeout=5,
        frame_timeout=5,
        clock_skew=120,
        max_inline_report=size if inline else size - 1,
    )
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, b"launch detected")
            token = token_for(world, report)
            await send_submission(seoul, report)
            await seoul.send(Release(token=token))
            assert (await expect(seoul, Stored)).report == report.report_id
            assert (await expect(seoul, Released)).report == report.report_id
            got_token, ciphertext = await receive_delivery(tokyo)
            assert got_token == token
            assert open_delivery(world, got_token, ciphertext) == b"launch detected"
            # A submission refused (bytes not matching the digest), its release behind it.
            bad = seal(world, b"bad")
            bad_token = token_for(world, bad, counter=2)
            await send_submission(seoul, bad, data=bytes(len(bad.ciphertext)))
            await seoul.send(Release(token=bad_token))
            refused = await expect(seoul, Refusal)
            assert (refused.ref, refused.reason) == (bad.report_id, Reason.WRONG_REPORT)
            refused = await expect(seoul, Refusal)
            assert refused.reason == Reason.UNKNOWN_REPORT
            assert refused.ref == ReleaseToken.decode(bad_token).id
            assert h.relay.store.report(bad.report_id) is None


async def test_queued_delivery_redelivered_until_acked(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            token = token_for(world, report)
            assert isinstance(await release(h, token), Released)
            # Tokyo connects later: the delivery is waiting.
            tokyo = await h.connect("tokyo")
            first = await receive_delivery(tokyo)
            await tokyo.aclose()  # no ack
            tokyo = await h.connect("tokyo")
            second = await receive_delivery(tokyo)
            assert first == second
            token_id = tokyo_checks(world, token).token.id
            await tokyo.send(Ack(kind="delivery", token=token_id))
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)
            await tokyo.aclose()
            tokyo = await h.connect("tokyo")
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)  # nothing redelivered after the ack


async def test_pending_delivery_survives_restart(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            token = token_for(world, report)
            assert isinstance(await release(h, token), Released)
            await h.restart()
            tokyo = await h.connect("tokyo")
            got, ciphertext = await receive_delivery(tokyo)
            assert got == token
            assert open_delivery(world, got, ciphertext) == b"missile launch at 04:00"


def _refusal_reason(reply: Released | Refusal) -> str:
    assert isinstance(reply, Refusal), reply
    return reply.reason


async def test_bad_tokens_refused_with_reason(world: World, store_at: str | Path) -> None:
    with trio.fail_after(20):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            other = await stored(h, body=b"another report")
            good = token_for(world, report)
            forged = bytearray(good)
            forged[-1] ^= 1
            cases = {
                Reason.BAD_SIGNATURE: bytes(forged),
                Reason.EXPIRED: token_for(
                    world, report, not_before=NOW - 7200, not_after=NOW - 600
                ),
                Reason.NOT_YET_VALID: token_for(
                    world, report, not_before=NOW + 600, not_after=NOW + 7200
                ),
                Reason.WRONG_RECIPIENT: custom_token(world, report, recipient="seoul"),
                Reason.NOT_A_MEMBER: custom_token(world, report, recipient="beijing"),
                Reason.OUT_OF_SCOPE: custom_token(world, report, scope="nk.chemical"),
                Reason.LEVEL_NOT_ALLOWED: custom_token(world, report, level="top"),
                Reason.WRONG_REPORT: custom_token(world, report, digest=other.digest),
                Reason.WRONG_RELAY: custom_token(world, report, relay="tokyo"),
                Reason.WRONG_ARRANGEMENT: custom_token(world, report, version=2),
                Reason.UNKNOWN_REPORT: custom_token(world, report, report=bytes(16)),
                # Signed by Tokyo, which did not submit the report.
                Reason.WRONG_ORIGINATOR: custom_token(
                    world, report, signer="tokyo", originator="tokyo", recipient="seoul"
                ),
                Reason.MALFORMED: b"\x81\xa1x\x01",
            }
            for reason, token in cases.items():
                assert _refusal_reason(await release(h, token)) == reason, reason
            # Only the originator may hand in its report's tokens.
            assert _refusal_reason(await release(h, good, "tokyo")) == Reason.WRONG_ORIGINATOR
            assert isinstance(await release(h, good), Released)
            # Every refusal is in the audit log, and Seoul sees its own.
            seoul = await h.connect("seoul")
            await seoul.send(AuditFetch(since=0))
            extract = await expect(seoul, AuditReply)
            entries, _ = verify_extract(extract.extract, world.arrangement, "seoul")
            refused = [e.reason for e in entries if e.event is AuditEvent.REFUSED]
            assert set(cases) <= {Reason(r) for r in refused}


async def test_clock_skew_is_tolerated_and_bounded(world: World, store_at: str | Path) -> None:
    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS, clock=clock) as h:
            report = await stored(h)
            inside = token_for(world, report, not_before=NOW + 100, not_after=NOW + 7200)
            beyond = token_for(world, report, not_before=NOW + 121, not_after=NOW + 7200)
            assert _refusal_reason(await release(h, beyond)) == Reason.NOT_YET_VALID
            assert isinstance(await release(h, inside), Released)


async def test_replay_refused_also_after_restart(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            token = token_for(world, report)
            assert isinstance(await release(h, token), Released)
            assert _refusal_reason(await release(h, token)) == Reason.REPLAYED
            await h.restart()
            assert _refusal_reason(await release(h, token)) == Reason.REPLAYED


async def test_concurrent_redemptions_one_success(world: World, store_at: str | Path) -> None:
    limits = Limits(handshake_timeout=30, frame_timeout=30, max_connections_per_member=128)
    with trio.fail_after(30):
        async with running_relay(world, store_at, limits=limits) as h:
            report = await stored(h)
            token = token_for(world, report)
            links = [await h.connect("seoul") for _ in range(100)]
            replies: list[object] = []

            async def redeem(link: object) -> None:
                from tisa_io.link import Link

                assert isinstance(link, Link)
                await link.send(Release(token=token))
                replies.append(await link.receive())

            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(redeem, link)
            assert sum(isinstance(r, Released) for r in replies) == 1
            assert (
                sum(isinstance(r, Refusal) and r.reason == Reason.REPLAYED for r in replies) == 99
            )


async def test_revocation_before_delivery(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            token = token_for(world, report)
            assert isinstance(await release(h, token), Released)
            token_id = tokyo_checks(world, token).token.id
            seoul = await h.connect("seoul")
            await seoul.send(Revoke(report=report.report_id, token=token_id))
            assert await expect(seoul, Revoked) == Revoked(report=report.report_id, token=token_id)
            tokyo = await h.connect("tokyo")
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)  # no delivery came first
            # A revoked token cannot be released again.
            assert _refusal_reason(await release(h, token)) == Reason.REVOKED
            # Revoking a token not yet released bars it too.
            later = token_for(world, report, counter=2)
            later_id = tokyo_checks(world, later).token.id
            await seoul.send(Revoke(report=report.report_id, token=later_id))
            await expect(seoul, Revoked)
            assert _refusal_reason(await release(h, later)) == Reason.REVOKED
            # Revoking the whole report deletes the ciphertext; later releases refused.
            await seoul.send(Revoke(report=report.report_id, token=None))
            await expect(seoul, Revoked)
            assert not ciphertext_apart(store_at, report.report_id)
            third = token_for(world, report, counter=3)
            assert _refusal_reason(await release(h, third)) == Reason.REVOKED
            # Tokyo cannot revoke Seoul's report.
            await tokyo.send(Revoke(report=report.report_id, token=None))
            assert (await expect(tokyo, Refusal)).reason == Reason.UNKNOWN_REPORT


async def test_revoke_after_ack_is_refused(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            token = token_for(world, report)
            tokyo = await h.connect("tokyo")
            assert isinstance(await release(h, token), Released)
            await receive_delivery(tokyo)
            token_id = tokyo_checks(world, token).token.id
            await tokyo.send(Ack(kind="delivery", token=token_id))
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)
            seoul = await h.connect("seoul")
            await seoul.send(Revoke(report=report.report_id, token=token_id))
            assert (await expect(seoul, Refusal)).reason == Reason.REPLAYED
            # The whole report, every token of it acked: nothing left to withdraw, on
            # either store (refused the same way, and the report stays as it was).
            await seoul.send(Revoke(report=report.report_id, token=None))
            refusal = await expect(seoul, Refusal)
            assert refusal.reason == Reason.REPLAYED and "already delivered" in refusal.detail
            row = h.relay.store.report(report.report_id)
            assert row is not None and row.state != "deleted"


async def test_expiry_of_held_reports_and_tokens(world: World, store_at: str | Path) -> None:
    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS, clock=clock) as h:
            seoul = await h.connect("seoul")
            held = seal(world, b"held")
            await send_submission(seoul, held, expires=NOW + 100)
            await expect(seoul, Stored)
            released = seal(world, b"released")
            await send_submission(seoul, released, expires=NOW + 100_000)
            await expect(seoul, Stored)
            token = token_for(world, released, not_after=NOW + 300)
            await seoul.send(Release(token=token))
            await expect(seoul, Released)
            token_id = tokyo_checks(world, token).token.id
            clock.now = NOW + 150
            h.relay.expire_now()
            assert await expect(seoul, Expired) == Expired(report=held.report_id, token=None)
            assert not ciphertext_apart(store_at, held.report_id)
            late = token_for(world, held, counter=2)
            await seoul.send(Release(token=late))
            assert (await expect(seoul, Refusal)).reason == Reason.EXPIRED
            # The token expires after not_after + clock skew; Seoul is told even if offline.
            await seoul.aclose()
            clock.now = NOW + 300 + 120
            h.relay.expire_now()
            seoul = await h.connect("seoul")
            assert await expect(seoul, Expired) == Expired(
                report=released.report_id, token=token_id
            )
            tokyo = await h.connect("tokyo")
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)  # nothing delivered


async def test_a_notice_goes_to_one_connection_of_a_member_only(
    world: World, store_at: str | Path
) -> None:
    # Notices have no ack: with two connections of the same member, both pushers read
    # the queued notice; only one may send it.
    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS, clock=clock) as h:
            first = await h.connect("seoul")
            second = await h.connect("seoul")
            held = seal(world, b"held")
            await send_submission(first, held, expires=NOW + 100)
            await expect(first, Stored)
            clock.now = NOW + 150
            h.relay.expire_now()
            got: list[Message] = []
            for link in (first, second):
                await link.send(AuditFetch(since=0))
                while not isinstance(message := await link.receive(), AuditReply):
                    got.append(message)
            assert got == [Expired(report=held.report_id, token=None)]


async def test_notices_a_failed_connection_claimed_go_out_on_the_other(
    world: World, store_at: str | Path
) -> None:
    # Connection A claims the notice and fails while sending it; connection B, which
    # skipped the claimed notice meanwhile, must read the notices again and send it.
    from tisa_io.link import LinkClosed

    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS, clock=clock) as h:
            relay = h.relay

            async def connection_of(link_count: int) -> Any:
                while len(relay._connections.get("seoul", ())) < link_count:
                    await trio.sleep(0.01)
                return relay._connections["seoul"]

            a = await h.connect("seoul")
            (conn_a,) = await connection_of(1)
            b = await h.connect("seoul")
            (conn_b,) = set(await connection_of(2)) - {conn_a}
            held = seal(world, b"held")
            await send_submission(a, held, expires=NOW + 100)
            await expect(a, Stored)

            gate = trio.Event()

            class FailingNotices:
                """A's link, but sending notices waits for the gate, then fails."""

                def __init__(self, inner: Any) -> None:
                    self.inner = inner

                def __getattr__(self, name: str) -> Any:
                    return getattr(self.inner, name)

                async def send_many(self, messages: Any) -> None:
                    messages = list(messages)
                    if any(isinstance(message, Expired) for message in messages):
                        await gate.wait()
                        raise LinkClosed("test: the link died while sending notices")
                    await self.inner.send_many(messages)

            conn_a.link = FailingNotices(conn_a.link)
            clock.now = NOW + 150
            relay.store.expire(now=relay.now(), clock_skew=LIMITS.clock_skew)
            relay.store.commit()
            conn_a.wake.set()  # A claims the notice and blocks sending it
            await trio.testing.wait_all_tasks_blocked()
            assert relay._notice_claims
            conn_b.wake.set()  # B reads it, sees the claim, skips it
            await trio.testing.wait_all_tasks_blocked()
            gate.set()  # A fails: B must look again
            assert await expect(b, Expired) == Expired(report=held.report_id, token=None)
            assert not relay._notice_claims


async def test_max_hold_caps_expiry(world: World, store_at: str | Path) -> None:
    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS, clock=clock, max_hold=60) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            await send_submission(seoul, report, expires=NOW + 10**6)
            await expect(seoul, Stored)
            clock.now = NOW + 61
            h.relay.expire_now()
            assert await expect(seoul, Expired) == Expired(report=report.report_id, token=None)


async def test_audit_extract_verifies_for_each_member(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            report = await stored(h)
            token = token_for(world, report)
            assert isinstance(await release(h, token), Released)
            got, _ = await receive_delivery(tokyo)
            token_id = tokyo_checks(world, got).token.id
            await tokyo.send(Ack(kind="delivery", token=token_id))
            events = {}
            checkpoints = {}
            for name in ("seoul", "tokyo"):
                link = tokyo if name == "tokyo" else await h.connect(name)
                await link.send(AuditFetch(since=0))
                reply = await expect(link, AuditReply)
                entries, checkpoint = verify_extract(reply.extract, world.arrangement, name)
                events[name] = [e.event for e in entries]
                checkpoints[name] = checkpoint
                # Fetching on from the checkpoint gives an empty, verifying extract.
                await link.send(AuditFetch(since=checkpoint.seq))
                more = await expect(link, AuditReply)
                rest, _ = verify_extract(
                    more.extract, world.arrangement, name, known=(checkpoint.seq, checkpoint.head)
                )
                assert rest == []
            assert events["seoul"] == [
                AuditEvent.STORED,
                AuditEvent.RELEASED,
                AuditEvent.FORWARDED,
                AuditEvent.ACKNOWLEDGED,
            ]
            assert events["tokyo"] == events["seoul"][1:]
            assert checkpoints["seoul"].head == checkpoints["tokyo"].head
            # A fetch from past the end is refused, not a crash.
            await tokyo.send(AuditFetch(since=10**6))
            assert (await expect(tokyo, Refusal)).reason == Reason.MALFORMED


async def test_store_never_holds_plaintext_or_key(world: World, store_at: str | Path) -> None:
    plaintext = b"PLAINTEXT-MARKER: the second launch site is at 39.0N 125.7E"
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, plaintext)
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            token = token_for(world, report)
            await seoul.send(Release(token=token))
            await expect(seoul, Released)
            got, ciphertext = await receive_delivery(tokyo)
            assert open_delivery(world, got, ciphertext) == plaintext
    blobs = store_bytes(store_at)
    assert report.ciphertext in blobs  # the scan does see the store's content
    for secret in (plaintext, plaintext[:16], report.content_key, report.content_key[:16]):
        assert secret not in blobs


async def test_large_report_streams_through(world: World, store_at: str | Path) -> None:
    body = os.urandom(3 * 1024 * 1024)
    with trio.fail_after(20):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, body)
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)
            got, ciphertext = await receive_delivery(tokyo)
            assert ciphertext == report.ciphertext
            assert open_delivery(world, got, ciphertext) == body


def test_store_sweeps_leftovers_and_is_durable(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # NORMAL: COMMIT does not fsync; the WAL is fsynced by hand (next tests).
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1
    writer = store.begin_upload(bytes(16))
    writer.write(b"partial upload")  # a crash here leaves a temporary file
    assert writer._file is not None
    writer._file.close()
    orphan = store.blob_path(b"\x01" * 16)
    orphan.write_bytes(b"renamed but never committed")
    store.close()
    store = Store(tmp_path)
    assert not list((tmp_path / "tmp").iterdir())
    assert not orphan.exists()
    store.close()


def test_a_batch_is_durable_only_after_a_wal_fsync_that_followed_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path, group_commit=True)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    # The WAL is flushed with fdatasync where there is one (tisa_io.durable).
    monkeypatch.setattr(tisa_io.durable, "sync_data", fsync)
    store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
    batch = store.barrier
    store.commit()
    assert synced == []  # COMMIT alone does not fsync (synchronous=NORMAL) ...
    assert store.written == batch and store.committed < batch and store.pending
    store.fsync_wal()  # ... the WAL file itself is fsynced by hand
    assert synced == [os.stat(tmp_path / "relay.db-wal").st_ino]
    assert store.committed < batch  # and only mark_durable makes it count
    store.mark_durable(batch)
    assert store.committed == batch and not store.pending
    store.close()


async def test_no_answer_before_the_wal_fsync_after_its_commit(
    world: World, store_at: str | Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The relay COMMITs without an fsync and fsyncs the WAL in a worker thread (every
    # batch here: see INLINE_FSYNC_MAX_STEPS); `stored` waits for that fsync, not just
    # the COMMIT.
    import threading

    import tisa_io.durable

    monkeypatch.setattr(tisa_io.durable, "INLINE_FSYNC_MAX_STEPS", -1)
    gate = threading.Event()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            store = h.relay.store
            real = store.fsync_wal

            def slow_fsync() -> None:
                gate.wait(10)
                real()

            store.fsync_wal = slow_fsync  # type: ignore[method-assign]
            seoul = await h.connect("seoul")
            report = seal(world)
            await send_submission(seoul, report)
            with trio.move_on_after(0.3):
                await seoul.receive()
                raise AssertionError("an answer went out before its batch's WAL fsync")
            assert store.written > store.committed  # committed to the WAL, not on disk
            # The event loop is not blocked meanwhile: a second member is served.
            tokyo = await h.connect("tokyo")
            await tokyo.send(AuditFetch(since=0))
            gate.set()
            await expect(seoul, Stored)
            await expect(tokyo, AuditReply)


async def test_a_small_batch_is_fsynced_in_line_before_its_answer(
    world: World, store_at: str | Path
) -> None:
    # Under light load the WAL fsync runs in the event loop's thread (a worker thread
    # would add a GIL hand-over per durable step); the answer still waits for it.
    import threading

    calls: list[tuple[str, int]] = []
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            store = h.relay.store
            real = store.fsync_wal

            def recording_fsync() -> None:
                calls.append((threading.current_thread().name, store.written))
                real()

            store.fsync_wal = recording_fsync  # type: ignore[method-assign]
            seoul = await h.connect("seoul")
            await send_submission(seoul, seal(world))
            await expect(seoul, Stored)
            assert calls, "stored was answered with no WAL fsync"
            assert calls[-1][0] == threading.main_thread().name
            assert store.committed >= calls[-1][1]


async def test_concurrent_uploads_of_one_id(world: World, store_at: str | Path) -> None:
    from tisa.messages import Chunk, SubmitBegin, SubmitEnd

    report = seal(world)
    begin = SubmitBegin(
        report=report.report_id, size=report.size, digest=report.digest, expires=NOW + 3600
    )
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            first = await h.connect("seoul")
            await first.send(begin)
            await first.send(Chunk(data=report.ciphertext[:100]))
            # A second upload of the same id starts, then its connection drops mid-way.
            second = await h.connect("seoul")
            await second.send(begin)
            await second.aclose()
            # A third one is still refused: the first upload is in progress. The refusal
            # is transient (busy: retry), not final like a duplicate id.
            third = await h.connect("seoul")
            await send_submission(third, report)
            assert (await expect(third, Refusal)).reason == Reason.BUSY
            await first.send(Chunk(data=report.ciphertext[100:]))
            await first.send(SubmitEnd(report=report.report_id))
            await expect(first, Stored)
            # Now a resend is answered stored (idempotent).
            await send_submission(third, report)
            await expect(third, Stored)


async def test_every_token_of_a_report_must_commit_to_the_same_key(
    world: World, store_at: str | Path
) -> None:
    # One ciphertext must not open to two plaintexts under two tokens: the first
    # release pins the key commitment, a token with another key is refused.
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            first = await release(h, token_for(world, report))
            assert isinstance(first, Released)
            other_key = token_for(world, report, counter=2, content_key=os.urandom(32))
            second = await release(h, other_key)
            assert isinstance(second, Refusal) and second.reason == Reason.WRONG_REPORT
            same_key = await release(h, token_for(world, report, counter=3))
            assert isinstance(same_key, Released)


async def test_sealed_key_is_dropped_once_the_delivery_is_acked(
    world: World, store_at: str | Path
) -> None:
    from tisa.token import ReleaseToken

    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            report = await stored(h)
            token = token_for(world, report)
            assert isinstance(await release(h, token), Released)
            tokyo = await h.connect("tokyo")
            got, _ = await receive_delivery(tokyo)
            sealed_key = ReleaseToken.decode(got).wrap.sealed
            files = store_bytes(store_at)
            assert sealed_key in files  # held while the delivery is owed
            await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(got).id))
            await tokyo.send(AuditFetch(since=0))
            await expect(tokyo, AuditReply)
            await tokyo.aclose()
            # A replay of the used token is still refused: the id is kept.
            replay = await release(h, token)
            assert isinstance(replay, Refusal) and replay.reason == Reason.REPLAYED
    open_store(store_at).close()
    files = store_bytes(store_at)
    assert sealed_key not in files


async def test_commits_are_spaced_under_load(
    world: World, store_at: str | Path, mock_clock: trio.testing.MockClock
) -> None:
    # An idle relay commits a step at once; right after a commit, the next one waits
    # COMMIT_SPACING times the last commit's duration, so the steps arriving meanwhile
    # share it. Nothing waiting on a batch is released before that batch's commit.
    from relay.server import Relay

    relay = Relay(world.relay_secret, world.arrangement, store_at)
    store = relay.store
    try:
        store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
        await relay._durable(store.barrier)
        assert store.committed == 1 and not store.pending
        assert relay._next_commit > trio.current_time()  # the mock clock stands still
        done: list[int] = []
        async with trio.open_nursery() as nursery:
            store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
            barrier = store.barrier

            async def wait() -> None:
                await relay._durable(barrier)
                done.append(store.committed)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [] and store.committed == 1  # waiting, not committed
            store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
            mock_clock.jump(1)
        assert done == [2] and not store.pending  # both steps in one commit
        assert store.audit_seq == 3
    finally:
        relay.close()


async def test_deliveries_found_together_wait_for_one_commit(
    world: World, store_at: str | Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The pusher waits for the batch in which it found pending deliveries, once, not
    # for every later batch: with commits held back (spacing pushed an hour ahead; the
    # clock jumps to the first deadline only when every task is stuck), all three
    # deliveries still go out. The WAL fsync runs in a worker thread, during which
    # every task is blocked: the clock jumps only after 0.2 real seconds of that.
    autojump_clock.autojump_threshold = 0.2
    async with running_relay(world, store_at, limits=LIMITS) as h:
        seoul = await h.connect("seoul")
        tokens = []
        for counter in (1, 2, 3):
            report = seal(world, f"report {counter}".encode())
            await send_submission(seoul, report)
            token = token_for(world, report, counter=counter)
            await seoul.send(Release(token=token))
            tokens.append(token)
        for _ in tokens:
            await expect(seoul, Stored)
            await expect(seoul, Released)
        assert not h.relay.store.pending
        h.relay._next_commit = trio.current_time() + 3600  # no commit from now on
        tokyo = await h.connect("tokyo")
        with trio.move_on_after(1) as timer:
            got = [(await receive_delivery(tokyo))[0] for _ in tokens]
        assert not timer.cancelled_caught
        assert got == tokens
        # Each delivery's `forwarded` mark opened a batch that is still waiting.
        assert h.relay.store.pending


async def test_relay_stops_when_a_wal_fsync_fails(world: World, store_at: str | Path) -> None:
    # After a failed fsync nothing may be announced again; serving on would only close
    # every connection without a reason, so serve_tcp stops with StoreFailed.
    from relay.server import Relay, StoreFailed
    from tisa_io.link import connect_member

    relay = Relay(world.relay_secret, world.arrangement, store_at, limits=LIMITS)

    def broken_fsync() -> None:
        # As Store.fsync_wal does on an I/O error: poison the store, then raise.
        relay.store.failed = OSError(5, "Input/output error")
        raise relay.store.failed

    relay.store.fsync_wal = broken_fsync  # type: ignore[method-assign]
    with trio.fail_after(10):
        with pytest.raises(BaseExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(relay.serve_tcp)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                seoul = await connect_member(
                    stream, world.secrets["seoul"], "seoul", world.arrangement, limits=LIMITS
                )
                await send_submission(seoul, seal(world))
                await trio.sleep_forever()
    assert info.group_contains(StoreFailed)
    relay.close()


async def test_many_queued_receipts_go_out_a_page_at_a_time(
    world: World, store_at: str | Path
) -> None:
    # Receipts pile up while the originator is offline; all of them arrive, read from the
    # store a page at a time, and a confirmed receipt keeps only its id.
    from relay.server import NOTICE_PAGE

    count = NOTICE_PAGE + 5
    store = open_store(store_at, group_commit=False)
    for i in range(count):
        report = seal(world, f"r{i}".encode())
        token = token_for(world, report)
        granted = tokyo_checks(world, token)
        receipt = Receipt.issue(
            world.secrets["tokyo"], world.arrangement, report=report.report_id,
            token=granted.token.id, originator="seoul", recipient="tokyo",
            digest=report.digest, received=NOW,
        )  # fmt: skip
        # Straight into the queue (as if each delivery had been made and acked).
        with store._transaction() as db:
            db.execute(
                sql(
                    store_at,
                    "INSERT INTO receipts (originator, token, receipt, state)"
                    " VALUES ('seoul', ?, ?, 'queued')",
                ),
                (receipt.token, receipt.encoded),
            )
    store.close()
    with trio.fail_after(20):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            notices = [await expect(seoul, ReceiptNotice) for _ in range(count)]
            assert (
                len({Receipt.verify(n.receipt, world.arrangement).token for n in notices}) == count
            )
            first = Receipt.verify(notices[0].receipt, world.arrangement)
            await seoul.send(Ack(kind="receipt", token=first.token))
            await seoul.send(AuditFetch(since=0))  # answered after the ack is handled
            await expect(seoul, AuditReply)
            assert len(h.relay.store.queued_receipts("seoul")) == count - 1


async def _delivered(h: Harness) -> tuple[Link, Link, Receipt]:
    """Seoul's report delivered to Tokyo and acked, that batch on disk: the links
    (Seoul, Tokyo) and Tokyo's receipt, not sent yet."""
    world = h.world
    tokyo = await h.connect("tokyo")
    seoul = await h.connect("seoul")
    report = seal(world, b"launch detected")
    await send_submission(seoul, report)
    await expect(seoul, Stored)
    await seoul.send(Release(token=token_for(world, report)))
    await expect(seoul, Released)
    got_token, _ = await receive_delivery(tokyo)
    granted = tokyo_checks(world, got_token)
    await tokyo.send(Ack(kind="delivery", token=granted.token.id))
    receipt = Receipt.issue(
        world.secrets["tokyo"],
        world.arrangement,
        report=report.report_id,
        token=granted.token.id,
        originator="seoul",
        recipient="tokyo",
        digest=report.digest,
        received=NOW,
    )
    return seoul, tokyo, receipt


async def test_a_receipt_is_acked_and_pushed_lazily_an_answer_behind_commits(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ack of a receipt and its push to the originator force no commit of their own;
    # an answer that does (a prekey status) queued behind the ack is not held back by
    # it: one commit for all three, long before the background commit (an hour here).
    monkeypatch.setattr(tisa_io.durable, "BACKGROUND_COMMIT_DELAY", 3600.0)
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            seoul, tokyo, receipt = await _delivered(h)
            committer = h.relay._group_commit
            await committer.durable(h.relay.store.barrier)  # the delivery's ack
            commits = committer.commits
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            (conn,) = h.relay._connections["tokyo"]
            while conn.lazy_wake is None:  # the replier waits without a commit
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert committer.commits == commits
            assert h.relay.store.committed < h.relay.store.barrier
            await tokyo.send(PublishPrekeys(signed=None, one_time=[]))
            ack = await expect(tokyo, Ack)
            assert (ack.kind, ack.token) == ("receipt", receipt.token)
            await expect(tokyo, PrekeyStatus)
            notice = await expect(seoul, ReceiptNotice)
            assert Receipt.verify(notice.receipt, world.arrangement) == receipt
            assert committer.commits == commits + 1


async def test_a_lone_receipt_ack_goes_out_with_the_background_commit(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            seoul, tokyo, receipt = await _delivered(h)
            committer = h.relay._group_commit
            await committer.durable(h.relay.store.barrier)  # the delivery's ack
            durable = committer.durable
            waiters: list[str] = []

            async def recording(barrier: int) -> None:
                waiters.append(trio.lowlevel.current_task().name)
                await durable(barrier)

            monkeypatch.setattr(committer, "durable", recording)
            commits = committer.commits
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            ack = await expect(tokyo, Ack)
            assert (ack.kind, ack.token) == ("receipt", receipt.token)
            await expect(seoul, ReceiptNotice)
            # On disk when they went out, committed by the background pass, the only
            # one that waited on a commit: one commit for both.
            assert waiters and all("run_background_commits" in name for name in waiters)
            assert committer.commits == commits + 1
            assert h.relay.store.committed == h.relay.store.written
