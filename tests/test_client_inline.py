"""Protocol version 3 at the member node: a small report leaves as one ``submit_inline``
with the tokens of its immediate releases (their prekeys fetched first), a larger one as
a stream with ``release`` behind it; deliveries are taken in either form."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
import trio
from nodes import client_fake_relay
from nodes.client_fake_relay import FakeRelay
from nodes.client_world import LEVEL, SCOPE, make_world

import clients.node
from clients.node import Backoff, Node, open_node
from tisa import messages as m
from tisa.errors import VerificationError
from tisa.receipt import StoredAck

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


async def until_published(fake: FakeRelay, name: str = "tokyo") -> None:
    while name not in fake.signed_prekeys or not fake.one_time_prekeys.get(name):
        await trio.sleep(0.01)


async def released(seoul: Node, report_id: bytes) -> None:
    while [r.state for r in seoul.store.releases_of(report_id)] != ["released"]:
        await trio.sleep(0.01)


async def send_one(seoul: Node, body: bytes = b"launch detected") -> bytes:
    report_id = await seoul.submit(
        body, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
    )
    await seoul.wait_stored(report_id)
    await released(seoul, report_id)
    return report_id


def sent(fake: FakeRelay, *kinds: type[m.Message]) -> list[m.Message]:
    return [message for message in fake.received if isinstance(message, kinds)]


async def test_a_connected_submit_sends_report_and_token_in_one_message(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo, node("seoul", port, tmp_path) as seoul:
            await until_published(fake)
            report_id = await send_one(seoul)
            (submission,) = sent(fake, m.SubmitInline, m.SubmitBegin, m.Release)
            assert isinstance(submission, m.SubmitInline)
            assert submission.report == report_id
            (token,) = seoul.store.releases_of(report_id)
            assert submission.tokens == [token.encoded]
            # The prekeys were fetched before the submission went out.
            kinds = [type(message) for message in fake.received]
            assert kinds.index(m.FetchPrekeys) < kinds.index(m.SubmitInline)
            async for report in tokyo.reports():
                assert report.body == b"launch detected"
                await tokyo.ack(report)
                break


@pytest.mark.parametrize("over", [0, 1], ids=["at-the-limit", "one-byte-over"])
async def test_one_byte_over_the_inline_limit_the_report_streams(
    relay: tuple[FakeRelay, int],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    over: int,
) -> None:
    # The limit is a protocol constant; moved here onto a real sealed report's size.
    fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo, node("seoul", port, tmp_path) as seoul:
            await until_published(fake)
            first = await send_one(seoul)
            size = seoul._submission(first).size
            monkeypatch.setattr(clients.node, "MAX_INLINE_CIPHERTEXT", size - over)
            fake.received.clear()
            second = await send_one(seoul, b"launch detected")
            assert seoul._submission(second).size == size
            kinds = [
                type(message)
                for message in sent(
                    fake, m.SubmitInline, m.SubmitBegin, m.Chunk, m.SubmitEnd, m.Release
                )
            ]
            if over:
                # (The fake relay reads a stream's chunks and end inside its begin.)
                assert kinds == [m.SubmitBegin, m.Release]
            else:
                assert kinds == [m.SubmitInline]
            bodies = []
            async for report in tokyo.reports():
                bodies.append(report.body)
                await tokyo.ack(report)
                if len(bodies) == 2:
                    break


async def test_a_streamed_delivery_is_taken_as_an_inline_one(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relay may stream a small report (one kept in a row larger than the wire's
    # limit, or an older habit): the node takes both forms.
    fake, port = relay
    monkeypatch.setattr(client_fake_relay, "MAX_INLINE_CIPHERTEXT", 0)
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path) as tokyo, node("seoul", port, tmp_path) as seoul:
            await until_published(fake)
            await send_one(seoul)
            async for report in tokyo.reports():
                assert report.body == b"launch detected"
                await tokyo.ack(report)
                break


async def test_offline_submit_sends_the_report_then_its_token(
    relay: tuple[FakeRelay, int], tmp_path: pathlib.Path
) -> None:
    # Submitted while no relay is reachable, the report goes out on the next connection
    # (inline) and its token once issued, as a `release` behind it.
    fake, port = relay
    with trio.fail_after(10):
        async with node("tokyo", port, tmp_path):
            await until_published(fake)
        async with node("seoul", 1, tmp_path) as offline:
            report_id = await offline.submit(
                b"launch", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
        async with node("seoul", port, tmp_path) as seoul:
            await seoul.wait_stored(report_id)
            await released(seoul, report_id)
        kinds = [type(x) for x in sent(fake, m.SubmitInline, m.SubmitBegin, m.Release)]
        assert kinds == [m.SubmitInline, m.Release]
        (submission,) = sent(fake, m.SubmitInline)
        assert isinstance(submission, m.SubmitInline) and submission.tokens == []


async def test_a_stored_answer_is_checked_against_the_submission(
    tmp_path: pathlib.Path,
) -> None:
    # The digest and size a `stored` ack signs are checked by the write that records
    # it: an ack for another ciphertext changes nothing and is refused as before; a
    # copy of the ack recorded changes nothing and is not refused.
    async with node("seoul", 1, tmp_path) as seoul:  # offline: its submission stays queued
        report_id = await seoul.submit(b"launch", recipients=["tokyo"], scope=SCOPE, level=LEVEL)
        (submission,) = seoul.store.queued_submissions()

        def stored(digest: bytes, size: int, report: bytes = report_id) -> m.Stored:
            ack = StoredAck.issue(
                SECRETS["washington"],
                ARRANGEMENT,
                report=report,
                originator="seoul",
                digest=digest,
                size=size,
                stored=1_700_000_000,
            )
            return m.Stored(report=report, ack=ack.encoded)

        for wrong in (
            stored(b"e" * 32, submission.size),
            stored(submission.digest, submission.size + 1),
            stored(submission.digest, submission.size, b"x" * 16),
        ):
            with pytest.raises(VerificationError):
                seoul._on_stored(wrong)
        assert seoul.store.submission(report_id).state == "queued"  # type: ignore[union-attr]
        right = stored(submission.digest, submission.size)
        seoul._on_stored(right)
        seoul._on_stored(right)
        assert seoul.store.submission(report_id).state == "stored"  # type: ignore[union-attr]
        kinds = [kind for _, kind, _ in seoul.store.events_after(0, limit=10)]
        assert kinds.count("stored") == 1
        with trio.fail_after(5):
            await seoul.wait_stored(report_id)
