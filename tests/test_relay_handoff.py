"""relay.server: a delivery made pending by an inline submission is handed to the
recipient's pusher in memory (Relay._hand_over, _Handed), which then sends it without
querying the store for it (no read of the member's deliveries, none of its ciphertext),
still only once its batch is on disk. The hand-off holds only while the store's count of
the member's deliveries moved by exactly the hand-offs: a batch rolled back drops it
(the pusher reads the store, and what was rolled back is not sent); a delivery that may
have stopped being owed meanwhile (a revocation, an ack, an expiry) is read again.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from nodes.relay_harness import Harness, expect, running_relay, statements
from nodes.relay_helpers import NOW, World, make_world, seal, token_for

from relay.consentstore import DELIVERIES
from relay.server import MAX_HANDED, Relay, _Feed, _Handed
from relay.store import TokenRow
from tisa.limits import Limits
from tisa.messages import DeliverInline, Refusal, Revoke, Revoked, Stored, SubmitInline
from tisa.report import SealedReport
from tisa.token import ReleaseToken

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)
TIMEOUT = 15
# The pusher's queries a hand-off saves: the member's deliveries, their ciphertexts.
OUTSTANDING = (
    "FROM tokens WHERE recipient = 'tokyo' AND state IN ('pending', 'delivered') AND seq >"
)
SOURCES = "LEFT JOIN reports"


@pytest.fixture
def world() -> World:
    return make_world()


def _inline(report: SealedReport, token: bytes) -> SubmitInline:
    return SubmitInline(
        report=report.report_id,
        digest=report.digest,
        expires=NOW + 3600,
        data=report.ciphertext,
        tokens=[token],
    )


def _count(seen: list[str], part: str) -> int:
    return sum(part in statement for statement in seen)


async def test_a_handed_delivery_goes_out_without_a_query(world: World, tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, tmp_path / "relay", limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            await trio.testing.wait_all_tasks_blocked()
            for text in (b"first", b"second", b"third"):
                report = seal(world, text)
                token = token_for(world, report)
                with statements(h) as seen:
                    await seoul.send(_inline(report, token))
                    await expect(seoul, Stored)
                    delivery = await expect(tokyo, DeliverInline)
                    await trio.testing.wait_all_tasks_blocked()
                assert (delivery.token, delivery.data) == (token, report.ciphertext)
                assert _count(seen, OUTSTANDING) == _count(seen, SOURCES) == 0, seen
                # Still recorded as forwarded, once its batch was on disk.
                row = h.relay.store.token(ReleaseToken.decode(token).id)
                assert row is not None and row.state == "delivered"
            assert _connection(h, "tokyo").handed == []


def _connection(h: Harness, member: str) -> Any:
    (conn,) = h.relay._connections[member]
    return conn


async def test_a_batch_rolled_back_drops_the_hand_off_and_the_pusher_reads_the_store(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hand_over = Relay._hand_over
    lose = [True]

    def hand_over_then_lose(relay: Relay, *args: Any) -> None:
        hand_over(relay, *args)
        if lose and lose.pop():
            # The batch is lost right after the hand-off, before the pusher ran (as a
            # failed COMMIT does): the release it handed over never happened.
            relay.store._abandon_batch()  # type: ignore[attr-defined]

    monkeypatch.setattr(Relay, "_hand_over", hand_over_then_lose)
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, tmp_path / "relay", limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            await trio.testing.wait_all_tasks_blocked()
            lost = seal(world, b"lost")
            with statements(h) as seen:
                await seoul.send(_inline(lost, token_for(world, lost)))
                await trio.testing.wait_all_tasks_blocked()
            # Tokyo's pusher read the store (not the hand-off) and found nothing.
            assert _count(seen, OUTSTANDING) == 1, seen
            assert h.relay.store.token(ReleaseToken.decode(token_for(world, lost)).id) is None
            # Tokyo's connection is whole: the next report is the first it gets.
            seoul = await h.connect("seoul")
            kept = seal(world, b"kept")
            await seoul.send(_inline(kept, token_for(world, kept)))
            await expect(seoul, Stored)
            delivery = await expect(tokyo, DeliverInline)
            assert delivery.data == kept.ciphertext


async def test_a_delivery_revoked_after_its_hand_off_is_not_sent(
    world: World, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, tmp_path / "relay", limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            await trio.testing.wait_all_tasks_blocked()
            report = seal(world, b"withdrawn")
            token = token_for(world, report)
            token_id = ReleaseToken.decode(token).id
            # In one write: the reader handles both before Tokyo's pusher runs.
            with statements(h) as seen:
                await seoul.send_many(
                    [_inline(report, token), Revoke(report=report.report_id, token=token_id)]
                )
                await expect(seoul, Stored)
                await expect(seoul, Revoked)
                await trio.testing.wait_all_tasks_blocked()
            # The pusher took the hand-off (no query of the member's deliveries) but read
            # the delivery's state again: revoked, so it is not sent.
            assert _count(seen, OUTSTANDING) == 0 and _count(seen, SOURCES) == 1, "\n".join(seen)
            with pytest.raises(trio.WouldBlock):
                tokyo.receive_nowait()
            row = h.relay.store.token(token_id)
            assert row is not None and row.state == "revoked"
            later = seal(world, b"later")
            await seoul.send(_inline(later, token_for(world, later)))
            assert (await expect(tokyo, DeliverInline)).data == later.ciphertext


async def test_hand_offs_past_the_limit_are_dropped_and_every_delivery_still_goes_out(
    world: World, tmp_path: Path
) -> None:
    limits = Limits(
        handshake_timeout=5, frame_timeout=5, clock_skew=120, max_queue_per_recipient=1000
    )
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, tmp_path / "relay", limits=limits) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            await trio.testing.wait_all_tasks_blocked()
            conn = _connection(h, "tokyo")
            count = MAX_HANDED + 1
            reports = [seal(world, b"report %d" % n) for n in range(count)]
            tokens = [token_for(world, report) for report in reports]
            # In one write: the reader hands all of them over before the pusher runs,
            # and drops the hand-off when it would pass MAX_HANDED.
            with statements(h) as seen:
                await seoul.send_many([_inline(r, t) for r, t in zip(reports, tokens, strict=True)])
                answers = [await expect(seoul, Stored) for _ in reports]
                got = [(await expect(tokyo, DeliverInline)).token for _ in reports]
            assert all(not isinstance(a, Refusal) for a in answers)
            assert sorted(got) == sorted(tokens)  # each once
            assert conn.handed == []
            del seen
            # The bound itself: a pusher that does not run holds at most MAX_HANDED.
            row = h.relay.store.token(ReleaseToken.decode(tokens[0]).id)
            assert row is not None
            count = h.relay.store.changes("tokyo", DELIVERIES)
            for number in range(1, MAX_HANDED + 1):
                h.relay._hand_over([row], b"data")
                assert len(conn.handed) == number
            h.relay._hand_over([row], b"data")
            assert conn.handed == [] and conn.handed_full
            # Nothing more is handed over until the pusher took what there was.
            h.relay._hand_over([row], b"data")
            assert conn.handed == []
            feed = _Feed(DELIVERIES, after=0, seen=count)
            assert h.relay._take_handed(conn, feed, count + 1, 64) is None
            assert not conn.handed_full
            h.relay._hand_over([row], b"data")
            assert len(conn.handed) == 1
            conn.handed.clear()


def test_a_hand_off_is_taken_only_when_it_accounts_for_every_delivery_queued(
    world: World, tmp_path: Path
) -> None:
    relay = Relay(world.secrets["washington"], world.arrangement, tmp_path, limits=LIMITS)
    try:
        row = TokenRow(7, b"t" * 16, b"r" * 16, "tokyo", "seoul", b"token", 1, "pending", NOW)

        def hands(*counts: int, seq: int = 7) -> Any:
            return [
                _Handed(dataclasses.replace(row, seq=seq + n), b"data", 1, count, 0)
                for n, count in enumerate(counts)
            ]

        conn: Any = types.SimpleNamespace(handed=[])
        feed = _Feed(DELIVERIES, after=6, seen=10)
        cases = [
            (hands(11), 11, True),  # one release since the pusher read all: handed
            (hands(11, 12), 12, True),
            (hands(11), 12, False),  # a release not handed over (or a rollback) since
            (hands(12), 12, False),  # one before it not handed over
            (hands(11, 13), 13, False),  # a gap between
            (hands(11, seq=6), 11, False),  # a row the pusher read already
            (hands(*range(11, 11 + 65)), 75, False),  # more than a query's page
            ([], 10, False),
        ]
        for handed, count, taken in cases:
            conn.handed = list(handed)
            taking = relay._take_handed(conn, feed, count, 64)
            assert taking == (handed if taken else None)
            assert conn.handed == []  # taken or dropped
        # A pusher that must read everything again (a rescan, a batch undone, another
        # process's change) takes no hand-off.
        conn.handed = hands(11)
        assert relay._take_handed(conn, _Feed(DELIVERIES, after=6, seen=-1), 11, 64) is None
    finally:
        relay.close()
