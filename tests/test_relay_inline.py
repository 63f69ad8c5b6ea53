"""Protocol version 3 at the relay: a small report and its tokens in one message
(``submit_inline``), one ``stored`` naming the tokens accepted, and a small delivery in
one ``deliver_inline``; the streamed forms stay for larger reports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from nodes.relay_harness import expect, receive_delivery, running_relay, send_submission
from nodes.relay_helpers import NOW, World, make_world, same_id_other_bytes, seal, token_for

import relay.server
from tisa.audit import AuditEvent, verify_extract
from tisa.errors import Reason
from tisa.limits import MAX_INLINE_CIPHERTEXT, Limits
from tisa.messages import (
    Ack,
    AuditFetch,
    AuditReply,
    Deliver,
    DeliverEnd,
    DeliverInline,
    ErrorMessage,
    Refusal,
    Release,
    Released,
    Stored,
    SubmitInline,
)
from tisa.receipt import StoredAck
from tisa.report import SealedReport
from tisa.token import ReleaseToken
from tisa_io.link import Link

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


def inline(report: SealedReport, *tokens: bytes, data: bytes | None = None) -> SubmitInline:
    return SubmitInline(
        report=report.report_id,
        digest=report.digest,
        expires=NOW + 3600,
        data=report.ciphertext if data is None else data,
        tokens=list(tokens),
    )


def token_id(token: bytes) -> bytes:
    return ReleaseToken.decode(token).id


async def test_one_message_in_one_answer_out_one_delivery(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, b"launch detected")
            token = token_for(world, report)
            await seoul.send(inline(report, token))
            stored = await expect(seoul, Stored)
            assert stored.report == report.report_id
            assert stored.released == [token_id(token)]
            ack = StoredAck.verify(stored.ack, world.arrangement)
            assert (ack.report, ack.digest, ack.size) == (
                report.report_id,
                report.digest,
                report.size,
            )
            # The delivery is one message too: the token and the whole ciphertext.
            delivery = await expect(tokyo, DeliverInline)
            assert (delivery.token, delivery.data) == (token, report.ciphertext)
            await tokyo.send(Ack(kind="delivery", token=token_id(token)))
            # The audit log records the same steps as for the streamed form.
            await seoul.send(AuditFetch(since=0))
            reply = await expect(seoul, AuditReply)
            entries, _ = verify_extract(reply.extract, world.arrangement, "seoul")
            assert [e.event for e in entries][:3] == [
                AuditEvent.STORED,
                AuditEvent.RELEASED,
                AuditEvent.FORWARDED,
            ]


async def test_an_inline_submissions_tokens_are_checked_against_the_row_just_stored(
    world: World, store_at: str | Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Decode once: the relay built the report's row as it stored it, and checks the
    # tokens that came with it against that row instead of reading it back.
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            reads: list[bytes] = []
            read = h.relay.store.report

            def counting_read(report_id: bytes) -> object:
                reads.append(report_id)
                return read(report_id)

            monkeypatch.setattr(h.relay.store, "report", counting_read)
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, b"launch detected")
            other = seal(world, b"another report")
            token = token_for(world, report)
            await seoul.send(inline(report, token, token_for(world, other)))
            stored = await expect(seoul, Stored)
            assert stored.released == [token_id(token)]
            # A token for another report is still checked against that report's row.
            refusal = await expect(seoul, Refusal)
            assert refusal.reason == Reason.UNKNOWN_REPORT.value
            # Never read: not before storing (a resend is found by the row's insert,
            # Store.add_report(if_new=True)), nor for its token.
            assert reads == [other.report_id]
            delivery = await expect(tokyo, DeliverInline)
            assert delivery.token == token


async def test_each_token_gets_its_own_verdict(world: World, store_at: str | Path) -> None:
    # The submission is stored; of its tokens the good one is released (named in
    # `stored`) and each bad one is refused behind `stored`, with the reason a `release`
    # of it would get.
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world, b"one")
            other = seal(world, b"another report")
            good = token_for(world, report)
            expired = token_for(world, report, not_before=NOW - 7200, not_after=NOW - 3600)
            elsewhere = token_for(world, other)
            await seoul.send(inline(report, good, expired, b"not a token", elsewhere))
            stored = await expect(seoul, Stored)
            assert stored.released == [token_id(good)]
            refusals = [await expect(seoul, Refusal) for _ in range(3)]
            assert [(r.ref, r.reason) for r in refusals] == [
                (token_id(expired), Reason.EXPIRED.value),
                (b"", Reason.MALFORMED.value),
                (token_id(elsewhere), Reason.UNKNOWN_REPORT.value),
            ]
            # The connection goes on.
            await seoul.send(AuditFetch(since=0))
            await expect(seoul, AuditReply)


async def test_a_refused_submission_consumes_none_of_its_tokens(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world, b"launch detected")
            token = token_for(world, report)
            tampered = bytes([report.ciphertext[0] ^ 1]) + report.ciphertext[1:]
            await seoul.send(inline(report, token, data=tampered))
            refusal = await expect(seoul, Refusal)
            assert (refusal.ref, refusal.reason) == (report.report_id, Reason.WRONG_REPORT.value)
            # Neither the report nor the token was taken: the right bytes and the same
            # token are accepted afterwards.
            await seoul.send(inline(report, token))
            assert (await expect(seoul, Stored)).released == [token_id(token)]


async def test_a_resend_is_stored_again_and_its_token_replayed(
    world: World, store_at: str | Path
) -> None:
    # An outbox resends after a lost answer: the report is answered `stored` again, the
    # token already consumed `replayed` (which the originator's node takes as released).
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            token = token_for(world, report)
            await seoul.send(inline(report, token))
            assert (await expect(seoul, Stored)).released == [token_id(token)]
            await seoul.send(inline(report, token))
            assert (await expect(seoul, Stored)).released == []
            refusal = await expect(seoul, Refusal)
            assert (refusal.ref, refusal.reason) == (token_id(token), Reason.REPLAYED.value)


async def test_inline_and_streamed_forms_mix(world: World, store_at: str | Path) -> None:
    # A report submitted inline can be released later with `release`; one streamed can
    # be submitted again inline (the same report: stored again).
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            await seoul.send(inline(report))
            assert (await expect(seoul, Stored)).released == []
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)
            streamed = seal(world, b"streamed first")
            await send_submission(seoul, streamed)
            await expect(seoul, Stored)
            await seoul.send(inline(streamed))
            await expect(seoul, Stored)


async def test_an_inline_message_over_the_limit_closes_malformed(
    world: World, store_at: str | Path
) -> None:
    # A peer that does not build its message with the checked constructor: one byte
    # past MAX_INLINE_CIPHERTEXT is no inline message (the sender must stream it).
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            oversized = object.__new__(SubmitInline)
            fields = {
                "report": report.report_id,
                "digest": report.digest,
                "expires": NOW + 3600,
                "data": b"\x00" * (MAX_INLINE_CIPHERTEXT + 1),
                "tokens": [],
            }
            for key, value in fields.items():
                object.__setattr__(oversized, key, value)
            await seoul.send(oversized)
            assert (await expect(seoul, ErrorMessage)).reason == Reason.MALFORMED
            assert h.relay.store.report(report.report_id) is None


async def test_an_inline_message_inside_a_stream_closes_malformed(
    world: World, store_at: str | Path
) -> None:
    from tisa.messages import SubmitBegin

    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            await seoul.send(
                SubmitBegin(
                    report=report.report_id,
                    size=report.size,
                    digest=report.digest,
                    expires=NOW + 3600,
                )
            )
            await seoul.send(inline(report))
            assert (await expect(seoul, ErrorMessage)).reason == Reason.MALFORMED


@pytest.mark.parametrize("over", [0, 1], ids=["at-the-limit", "one-byte-over"])
async def test_a_delivery_one_byte_over_the_inline_limit_streams(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: int
) -> None:
    # The limit is a protocol constant; lowered here to this report's size so that the
    # boundary falls on a real sealed report.
    report = seal(world, b"launch detected")
    monkeypatch.setattr(relay.server, "MAX_INLINE_CIPHERTEXT", report.size - over)
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            token = token_for(world, report)
            await seoul.send(Release(token=token))
            await expect(seoul, Released)
            if over:
                deliver = await expect(tokyo, Deliver)
                assert deliver.token == token
                got = await receive_rest(tokyo)
            else:
                got = (await expect(tokyo, DeliverInline)).data
            assert got == report.ciphertext


async def receive_rest(link: Link) -> bytes:
    from tisa.messages import Chunk

    parts: list[bytes] = []
    while True:
        message = await link.receive()
        if isinstance(message, DeliverEnd):
            return b"".join(parts)
        assert isinstance(message, Chunk)
        parts.append(message.data)


async def test_a_file_kept_report_is_still_delivered_inline(world: World, tmp_path: Path) -> None:
    # Where it is kept (row or file: max_inline_report) does not change the wire form,
    # which depends on the size alone.
    report = seal(world, b"launch detected")
    limits = Limits(handshake_timeout=5, frame_timeout=5, max_inline_report=report.size - 1)
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=limits) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            token = token_for(world, report)
            await seoul.send(inline(report, token))
            assert (await expect(seoul, Stored)).released == [token_id(token)]
            assert h.relay.store.inline_data(report.report_id) is None
            got_token, ciphertext = await receive_delivery(tokyo)
            assert (got_token, ciphertext) == (token, report.ciphertext)


async def test_a_batch_of_deliveries_reads_what_it_sends_in_one_query(
    world: World, store_at: str | Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokyo connects to five deliveries owed: after the one wait for their batch, one
    # query says each is still owed and gives its ciphertext, not one query each. A
    # large one among them streams; what the rest was read as may change meanwhile, so
    # those after it are read again, one by one.
    reports = [seal(world, b"x" * (1000 if n == 2 else 10)) for n in range(5)]
    large = reports[2]
    # Kept in a file and streamed: over both limits (lowered to its size).
    monkeypatch.setattr(relay.server, "MAX_INLINE_CIPHERTEXT", large.size - 1)
    limits = dataclasses.replace(LIMITS, max_inline_report=large.size - 1)
    assert all(report.size < large.size for report in reports if report is not large)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            seoul = await h.connect("seoul")
            tokens = [token_for(world, report) for report in reports]
            for report, token in zip(reports, tokens, strict=True):
                await seoul.send(inline(report, token))
                assert (await expect(seoul, Stored)).released == [token_id(token)]
            store = h.relay.store
            one: list[bytes] = []
            many: list[list[bytes]] = []
            single, batch = store.delivery_source, store.delivery_sources

            def delivery_source(token: bytes) -> tuple[bool, bytes | None]:
                one.append(token)
                return single(token)

            def delivery_sources(ids: list[bytes]) -> dict[bytes, tuple[bool, bytes | None]]:
                many.append(list(ids))
                return batch(ids)

            monkeypatch.setattr(store, "delivery_source", delivery_source)
            monkeypatch.setattr(store, "delivery_sources", delivery_sources)
            tokyo = await h.connect("tokyo")
            got = [await receive_delivery(tokyo) for _ in reports]
            assert got == [(t, r.ciphertext) for t, r in zip(tokens, reports, strict=True)]
            assert many == [[token_id(token) for token in tokens]]
            assert one == [token_id(token) for token in tokens[3:]]


async def test_an_inline_submission_under_another_reports_id_is_a_duplicate(
    world: World, store_at: str | Path
) -> None:
    # Its row is inserted without a look-up first: the insert finds the stored report,
    # which is kept as it was, and the submission is refused as before; its token is
    # not looked at.
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            await seoul.send(inline(report))
            assert (await expect(seoul, Stored)).released == []
            forged = same_id_other_bytes(world, report)
            await seoul.send(inline(forged, token_for(world, forged)))
            refusal = await expect(seoul, Refusal)
            assert (refusal.ref, refusal.reason) == (report.report_id, Reason.DUPLICATE.value)
            assert h.relay.store.inline_data(report.report_id) == report.ciphertext
            # The stored one is still released by its own token.
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)


async def test_an_inline_submissions_first_token_refused_with_its_reason_the_next_released(
    world: World, store_at: str | Path
) -> None:
    # The first token is released in the report's own step only when nothing stands in
    # the way; here its id was used before (for another report), so the report is
    # stored as usual and the token refused with its reason, and the next token of the
    # same submission is released as usual.
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            earlier = seal(world, b"earlier")
            used = token_for(world, earlier)
            await seoul.send(inline(earlier, used))
            assert (await expect(seoul, Stored)).released == [token_id(used)]
            await receive_delivery(tokyo)
            report = seal(world)
            replay = token_for(world, report, token_id=token_id(used))
            good = token_for(world, report, counter=2)
            await seoul.send(inline(report, replay, good))
            stored = await expect(seoul, Stored)
            assert stored.released == [token_id(good)]
            refusal = await expect(seoul, Refusal)
            assert (refusal.ref, refusal.reason) == (token_id(replay), Reason.REPLAYED.value)
            row = h.relay.store.report(report.report_id)
            assert row is not None and row.state == "released"
            token, _ = await receive_delivery(tokyo)
            assert token == good


async def test_an_inline_resend_is_answered_as_before_whatever_its_bytes(
    world: World, store_at: str | Path
) -> None:
    # A stored report's id is found by the row's insert, after the bytes are checked:
    # a resend with bytes that do not match is still a resend (stored again, its bytes
    # dropped), as when the id was looked up first; a new report with such bytes is
    # refused wrong_report.
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            seoul = await h.connect("seoul")
            report = seal(world)
            await seoul.send(inline(report))
            await expect(seoul, Stored)
            await seoul.send(inline(report, data=bytes(len(report.ciphertext))))
            assert (await expect(seoul, Stored)).report == report.report_id
            assert h.relay.store.inline_data(report.report_id) == report.ciphertext
            fresh = seal(world, b"fresh")
            await seoul.send(inline(fresh, data=bytes(len(fresh.ciphertext))))
            refusal = await expect(seoul, Refusal)
            assert (refusal.ref, refusal.reason) == (fresh.report_id, Reason.WRONG_REPORT.value)


@pytest.mark.parametrize("pieces", [[b"x"], [b"ab", b"", b"c" * 5000], [bytes(range(256)) * 300]])
def test_an_inline_uploads_digest_is_taken_once_of_the_whole(
    pieces: list[bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import relay.store
    from tisa.keys import Hash, Hasher

    store = relay.store.Store(tmp_path)
    try:
        # What a streamed upload's running hash gives, taken before InlineBlob is made.
        writer = store.begin_upload(b"\x01" * 16)
        for piece in pieces:
            writer.write(piece)
        streamed = writer.digest()
        writer.abort()
        running = Hasher(Hash.CIPHERTEXT)
        for piece in pieces:
            running.update(piece)
        assert streamed == running.finish()

        def no_state(*args: object, **kwargs: object) -> None:
            raise AssertionError("an inline upload makes no hash state")

        monkeypatch.setattr(relay.store, "Hasher", no_state)
        inline = store.begin_upload(b"\x02" * 16, inline=True)
        for piece in pieces:
            inline.write(piece)
        assert inline.digest() == streamed
        assert inline.data == b"".join(pieces) and inline.written == len(inline.data)
    finally:
        store.close()
