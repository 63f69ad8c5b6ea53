"""relay.tokenstore: a receipt that acknowledges its delivery (protocol version 4) is one
step of the store, both stores: in the usual case (a delivery this process marked
forwarded) two statements, the ack's UPDATE and the receipt's insert, where a receipt
then its ack took a read, an insert and an update in two steps. The audit entries, the
answers and what a refused receipt leaves are those of the two steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing
from nodes.relay_harness import expect, receive_delivery, running_relay, send_submission
from nodes.relay_helpers import (
    NOW,
    World,
    make_world,
    receipt_for,
    released,
    seal,
    token_for,
)

from relay.consentstore import RECEIPTS
from relay.storage import RelayStore, open_store
from relay.store import Store
from tisa.errors import Reason, Refused
from tisa.limits import Limits
from tisa.messages import Ack, ReceiptNotice, Release, Released, SendReceipt, Stored
from tisa.receipt import Receipt
from tisa.token import ReleaseToken

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)


@pytest.fixture
def world() -> World:
    return make_world()


def _logged(store: RelayStore, after: int) -> list[tuple[str, bytes | None, tuple[str, ...]]]:
    return [
        (entry.event.value, entry.token, entry.parties)
        for entry, _, _ in store.audit_entries(after, limit=100)
    ]


def test_a_receipt_of_a_forwarded_delivery_is_one_step_of_two_statements(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        (token,) = released(store, world)
        store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        store.commit_durably()
        seq, ops, receipts = store.audit_seq, store.ops, store.changes("seoul", RECEIPTS)
        seen: list[str] = []
        store._db.set_trace_callback(seen.append)
        assert store.add_receipt(receipt_for(world, token), now=NOW + 1, ack=True)
        store._db.set_trace_callback(None)
        assert [s.split(" (")[0].split(" SET")[0] for s in seen] == [
            "BEGIN IMMEDIATE",
            "UPDATE tokens",
            "INSERT INTO receipts",
        ], seen
        assert "RETURNING" not in seen[1]
        assert store.ops == ops + 1  # one step
        assert store.changes("seoul", RECEIPTS) == receipts + 1
        store.commit_durably()
        assert _logged(store, seq) == [
            ("receipt", token.id, ("seoul", "tokyo")),
            ("acknowledged", token.id, ("seoul", "tokyo")),
        ]
        assert store.token(token.id).state == "acked"  # type: ignore[union-attr]
        assert [r.token for r in store.queued_receipts("seoul")] == [token.id]
        assert store._forwarded == {}
        # Sent again: queued before, and its delivery acked before; nothing written.
        seq = store.audit_seq
        assert not store.add_receipt(receipt_for(world, token), now=NOW + 2, ack=True)
        store.commit_durably()
        assert store.audit_seq == seq
    finally:
        store.close()


@pytest.mark.parametrize("case", ["kept", "not kept", "pending", "acked before"])
def test_a_receipt_that_acks_logs_and_answers_as_a_receipt_then_an_ack(
    store_at: str | Path, world: World, case: str
) -> None:
    # The same entries, in the same order, as add_receipt then ack_delivery made.
    store = open_store(store_at)
    try:
        (token,) = released(store, world)
        if case != "pending":
            store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        if case == "not kept":
            store._forwarded.clear()  # type: ignore[attr-defined]
        if case == "acked before":
            assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        store.commit_durably()
        seq = store.audit_seq
        assert store.add_receipt(receipt_for(world, token), now=NOW + 1, ack=True)
        store.commit_durably()
        expected = [("receipt", token.id, ("seoul", "tokyo"))]
        if case == "pending":  # the ack overtook the forward: it logs the forward too
            expected.append(("forwarded", token.id, ("seoul", "tokyo")))
        if case != "acked before":
            expected.append(("acknowledged", token.id, ("seoul", "tokyo")))
        assert _logged(store, seq) == expected
        assert store.token(token.id).state == "acked"  # type: ignore[union-attr]
        assert store.outstanding("tokyo") == []
        assert [r.token for r in store.queued_receipts("seoul")] == [token.id]
        assert store._forwarded == {}  # type: ignore[attr-defined]
    finally:
        store.close()


@pytest.mark.parametrize("kept", [True, False])
@pytest.mark.parametrize("wrong", ["report", "recipient", "token"])
def test_a_receipt_that_names_no_such_delivery_is_refused_and_acks_nothing(
    store_at: str | Path, world: World, kept: bool, wrong: str
) -> None:
    store = open_store(store_at)
    try:
        (token,) = released(store, world)
        (other,) = released(store, world)
        store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        if not kept:
            store._forwarded.clear()  # type: ignore[attr-defined]
        store.commit_durably()
        seq, kept_before = store.audit_seq, dict(store._forwarded)  # type: ignore[attr-defined]
        if wrong == "report":
            receipt = receipt_for(world, token, report=other.report)
        elif wrong == "recipient":
            # Seoul's receipt (as Tokyo's originator) for Tokyo's delivery.
            receipt = Receipt.issue(
                world.secrets["seoul"],
                world.arrangement,
                report=token.report,
                token=token.id,
                originator="tokyo",
                recipient="seoul",
                digest=token.digest,
                received=NOW,
            )
        else:
            # A token id no delivery has.
            receipt = receipt_for(world, dataclasses.replace(token, id=b"\x01" * len(token.id)))
        with pytest.raises(Refused) as refused:
            store.add_receipt(receipt, now=NOW + 1, ack=True)
        assert refused.value.reason == Reason.WRONG_REPORT
        store.commit_durably()
        assert store.audit_seq == seq
        assert {t.id for t in store.outstanding("tokyo")} == {token.id, other.id}
        assert store.queued_receipts("seoul") == []
        assert store._forwarded == kept_before  # type: ignore[attr-defined]
    finally:
        store.close()


async def test_the_relay_handles_a_receipt_in_one_step_without_reading_the_token(
    world: World, tmp_path: Path
) -> None:
    with trio.fail_after(15):
        async with running_relay(world, tmp_path / "relay", limits=LIMITS) as h:
            seoul, tokyo = await h.connect("seoul"), await h.connect("tokyo")
            report = seal(h.world)
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)
            encoded, _ = await receive_delivery(tokyo)
            token = ReleaseToken.decode(encoded)
            await trio.testing.wait_all_tasks_blocked()
            store = h.relay.store
            assert isinstance(store, Store)
            seen: list[str] = []
            store._db.set_trace_callback(seen.append)
            try:
                await tokyo.send(SendReceipt(receipt=receipt_for(world, token).encoded))
                assert await expect(tokyo, Ack) == Ack(kind="receipt", token=token.id)
                await expect(seoul, ReceiptNotice)
            finally:
                store._db.set_trace_callback(None)
            writes = [s for s in seen if s.startswith(("UPDATE", "INSERT INTO receipts"))]
            assert [w.split(" SET")[0].split(" (")[0] for w in writes][:2] == [
                "UPDATE tokens",
                "INSERT INTO receipts",
            ], seen
            assert not [s for s in seen if s.startswith("SELECT recipient, originator")], seen
            assert store.token(token.id).state == "acked"  # type: ignore[union-attr]
