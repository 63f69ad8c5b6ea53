"""The relay's pusher reads a kind of row only when rows of that kind may have been
queued for its member since it last read them all (relay.server.Relay._push_loop,
relay.consentstore.ConsentTables.changes).

A wake-up for another kind, or one that changes nothing, runs no statement of the kinds
that did not change (statements counted with SQLite's trace callback); every kind still
reaches the member: deliveries, receipts, consent and notices, after a batch rolled back
(rows it had taken out are back), and, with PostgreSQL, rows another relay process
queued (its notification marks every kind of the member's connections to be read again).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
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
    statements,
)
from nodes.relay_helpers import (
    NOW,
    FakeClock,
    World,
    add_inline_report,
    announce,
    make_world,
    receipt_for,
    seal,
    token_for,
)

from relay.consentstore import CONSENT, DELIVERIES, NOTICES, QUEUED_KINDS, RECEIPTS
from relay.storage import RelayStore, is_postgresql, open_store
from tisa.errors import Refused
from tisa.limits import Limits
from tisa.messages import (
    Ack,
    ConsentNotice,
    Expired,
    ReceiptNotice,
    Release,
    Released,
    SendConsent,
    SendReceipt,
    Stored,
)
from tisa.receipt import Receipt
from tisa.report import SealedReport
from tisa.token import ReleaseToken
from tisa_io.link import Link

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)
TIMEOUT = 15

# The pusher's query of each kind, as SQLite's trace callback shows it.
QUERIES = {
    DELIVERIES: "FROM tokens WHERE recipient",
    RECEIPTS: "FROM receipts WHERE originator",
    CONSENT: "FROM consent_queue WHERE member",
    NOTICES: "FROM notices WHERE member",
}


@pytest.fixture
def world() -> World:
    return make_world()


def _connection(h: Harness, member: str) -> Any:
    (conn,) = h.relay._connections[member]
    return conn


async def _deliver_to_tokyo(
    h: Harness, seoul: Link, tokyo: Link, text: bytes = b"launch detected"
) -> tuple[SealedReport, ReleaseToken]:
    """Seoul stores and releases a report; Tokyo reads its delivery (and acks nothing)."""
    report = seal(h.world, text)
    await send_submission(seoul, report)
    await expect(seoul, Stored)
    await seoul.send(Release(token=token_for(h.world, report)))
    await expect(seoul, Released)
    encoded, _ = await receive_delivery(tokyo)
    return report, ReleaseToken.decode(encoded)


def _queries(seen: list[str]) -> dict[str, int]:
    return {kind: sum(QUERIES[kind] in s for s in seen) for kind in QUEUED_KINDS}


def _counts(store: RelayStore) -> dict[tuple[str, str], int]:
    return {(m, k): store.changes(m, k) for m in ("seoul", "tokyo") for k in QUEUED_KINDS}


def _moved(before: dict[tuple[str, str], int], store: RelayStore) -> set[tuple[str, str]]:
    return {key for key, count in _counts(store).items() if count != before[key]}


def test_the_store_counts_what_each_step_queues_per_member_and_kind(
    world: World, store_at: str | Path
) -> None:
    store = open_store(store_at, group_commit=True)
    try:
        report = seal(world)
        before = _counts(store)
        add_inline_report(store, report)
        assert _moved(before, store) == set()  # a held report is queued for nobody
        token = ReleaseToken.decode(token_for(world, report))
        store.release(token, now=NOW, max_queue=100)
        assert _moved(before, store) == {("tokyo", DELIVERIES)}
        before = _counts(store)
        with pytest.raises(Refused):
            store.release(token, now=NOW, max_queue=100)  # a replay: nothing queued
        assert store.add_receipt(receipt_for(world, token), now=NOW)
        assert _moved(before, store) == {("seoul", RECEIPTS)}
        before = _counts(store)
        assert store.add_announcement(announce(world, report), now=NOW)
        assert _moved(before, store) == {("tokyo", CONSENT)}
        store.commit_durably()
        before = _counts(store)
        # Taking rows out moves nothing; a whole batch rolled back moves every count
        # (what it had taken out is back).
        assert store.ack_receipt(token.id, originator="seoul")
        assert _moved(before, store) == set()
        store._abandon_batch()
        assert _moved(before, store) == set(before)
        assert [r.token for r in store.queued_receipts("seoul")] == [token.id]
    finally:
        store.close()


async def test_a_wake_up_for_another_kind_queries_only_that_kind(
    world: World, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, tmp_path / "relay", limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            _, token = await _deliver_to_tokyo(h, seoul, tokyo)
            await trio.testing.wait_all_tasks_blocked()

            # A wake-up with nothing changed: no statement of any kind.
            with statements(h) as seen:
                _connection(h, "seoul").wake.set()
                _connection(h, "tokyo").wake.set()
                await trio.testing.wait_all_tasks_blocked()
            assert _queries(seen) == dict.fromkeys(QUEUED_KINDS, 0), seen

            # Tokyo's receipt (which acks its delivery): Seoul's pusher reads receipts
            # only, and Tokyo's, whose window had room all along, is not woken at all.
            with statements(h) as seen:
                await tokyo.send(SendReceipt(receipt=receipt_for(world, token).encoded))
                await expect(tokyo, Ack)
                notice = await expect(seoul, ReceiptNotice)
                await trio.testing.wait_all_tasks_blocked()
            assert Receipt.verify(notice.receipt, world.arrangement).token == token.id
            assert _queries(seen) == {DELIVERIES: 0, RECEIPTS: 1, CONSENT: 0, NOTICES: 0}, seen

            # A release to Tokyo: Tokyo's pusher reads its deliveries once (a page that
            # is not full read all there was), and nothing else; Seoul's runs nothing.
            with statements(h) as seen:
                await _deliver_to_tokyo(h, seoul, tokyo, b"second")
                await trio.testing.wait_all_tasks_blocked()
            assert _queries(seen) == {DELIVERIES: 1, RECEIPTS: 0, CONSENT: 0, NOTICES: 0}, seen


async def test_a_full_window_is_read_again_when_an_ack_makes_room(
    world: World, store_at: str | Path
) -> None:
    limits = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120, delivery_window=1)
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, store_at, limits=limits) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            _, first = await _deliver_to_tokyo(h, seoul, tokyo, b"first")
            second = seal(world, b"second")
            await send_submission(seoul, second)
            await expect(seoul, Stored)
            await seoul.send(Release(token=token_for(world, second)))
            await expect(seoul, Released)
            await trio.testing.wait_all_tasks_blocked()
            conn = _connection(h, "tokyo")
            assert conn.window_full and conn.in_flight == {first.id}
            # The ack makes room: the second delivery goes out (no new row was queued
            # since the pusher last looked, only the window changed).
            await tokyo.send(Ack(kind="delivery", token=first.id))
            encoded, _ = await receive_delivery(tokyo)
            assert ReleaseToken.decode(encoded).report == second.report_id


async def test_every_kind_reaches_the_member_and_again_after_a_batch_rolled_back(
    world: World, store_at: str | Path
) -> None:
    clock = FakeClock()
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, store_at, limits=LIMITS, clock=clock) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            report, token = await _deliver_to_tokyo(h, seoul, tokyo)
            store = h.relay.store

            # Consent: Seoul's announcement reaches Tokyo.
            announcement = announce(world, report)
            await seoul.send(SendConsent(kind="announce", data=announcement.encoded))
            await expect(seoul, Ack)
            consent = await expect(tokyo, ConsentNotice)
            assert consent.data == announcement.encoded

            # A notice: a held report of Seoul's expires.
            held = seal(world, b"held")
            await send_submission(seoul, held, expires=NOW + 100)
            await expect(seoul, Stored)
            clock.now = NOW + 150
            h.relay.expire_now()
            assert await expect(seoul, Expired) == Expired(report=held.report_id, token=None)

            # A receipt queued in one batch (committed), then taken out in the next
            # before Seoul's pusher read it: the pusher looks (its count moved), finds
            # nothing and counts the receipts read. That second batch is rolled back:
            # the receipt is queued again, and the next wake-up must read it although
            # no step queued anything since.
            await _settled(h)
            receipt = receipt_for(world, token)
            assert store.add_receipt(receipt, now=NOW)
            store.commit()
            assert store.ack_receipt(token.id, originator="seoul")
            conn = _connection(h, "seoul")
            conn.wake.set()
            await trio.testing.wait_all_tasks_blocked()
            assert store.in_transaction  # the ack's batch, still open
            store._abandon_batch()
            conn.wake.set()
            notice = await expect(seoul, ReceiptNotice)
            assert notice.receipt == receipt.encoded


async def _settled(h: Harness) -> None:
    """Return once everything is on disk, the background committer idle (it commits
    nothing the test opens next) and every task blocked."""
    store, commit = h.relay.store, h.relay._group_commit
    while True:
        await trio.testing.wait_all_tasks_blocked()
        if not store.pending and not commit._dirty.is_set():
            return
        await commit.durable(store.barrier)
        await trio.sleep(0.01)


async def _watching(h: Harness, nursery: trio.Nursery) -> None:
    # What serve_tcp starts: this relay process hears of the others' writes.
    shared = h.relay._shared
    assert shared is not None
    nursery.start_soon(shared.watch, h.relay._store_changed)


@contextlib.asynccontextmanager
async def _two_processes(world: World, dsn: str) -> AsyncIterator[tuple[Harness, Harness]]:
    async with (
        running_relay(world, dsn, limits=LIMITS) as one,
        running_relay(world, dsn, limits=LIMITS) as other,
        trio.open_nursery() as nursery,
    ):
        await _watching(one, nursery)
        await _watching(other, nursery)
        try:
            yield one, other
        finally:
            nursery.cancel_scope.cancel()


async def test_rows_another_relay_process_queued_reach_the_member(
    world: World, pg_dsn: str
) -> None:
    assert is_postgresql(pg_dsn)
    with trio.fail_after(TIMEOUT):
        async with _two_processes(world, pg_dsn) as (here, there):
            tokyo, seoul = await here.connect("tokyo"), await there.connect("seoul")
            await trio.testing.wait_all_tasks_blocked()
            # A delivery released through the other process.
            report = seal(world, b"launch detected")
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)
            encoded, _ = await receive_delivery(tokyo)
            token = ReleaseToken.decode(encoded)
            # Consent queued through the other process: this process counted no change
            # of that kind for Tokyo, the notification has its pusher read it all.
            announcement = announce(world, report)
            await seoul.send(SendConsent(kind="announce", data=announcement.encoded))
            await expect(seoul, Ack)
            assert (await expect(tokyo, ConsentNotice)).data == announcement.encoded
            # A receipt queued here, for Seoul on the other process.
            receipt = receipt_for(world, token)
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            await expect(tokyo, Ack)
            assert (await expect(seoul, ReceiptNotice)).receipt == receipt.encoded
