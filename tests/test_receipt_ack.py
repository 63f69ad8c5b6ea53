"""Protocol version 4: a recipient's receipt is also its delivery's ack.

A recipient stores a verified report and then sends one message, its signed receipt,
where version 3 sent two (``ack`` of kind delivery, then ``send_receipt``). The relay
takes an accepted receipt as the ack of the delivery it names, in the same batch; a
refused receipt acknowledges nothing, and the recipient then acks the delivery itself
(docs/node-protocol.md, "Receipt"). The crash tests (tests/test_crash.py, points
``receipt_before_commit`` and ``receipt_after_commit``) kill the relay on either side of
that batch's commit.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from nodes.relay_harness import expect, receive_delivery, running_relay, send_submission
from nodes.relay_helpers import make_world, receipt_for, seal, token_for

from clients.events import RefusedEvent
from clients.node import Node
from tisa.errors import Reason, Refused
from tisa.limits import Limits
from tisa.messages import (
    MAX_RECEIPT_ACKS,
    Ack,
    AckReceipts,
    ErrorMessage,
    Message,
    ReceiptNotice,
    Refusal,
    Release,
    Released,
    SendReceipt,
    Stored,
)
from tisa.receipt import Receipt
from tisa.token import ReleaseToken
from tisa_testing import relay as hr
from tisa_testing.world import LEVEL, SCOPE
from tisa_testing.world import World as NodeWorld
from tisa_testing.world import make_world as make_node_world

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, clock_skew=120)
TIMEOUT = 15


# --- at the relay ---------------------------------------------------------------------------


async def test_an_accepted_receipt_acks_its_delivery_a_refused_one_nothing(
    store_at: str | Path,
) -> None:
    world = make_world()
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            report = seal(world, b"launch detected")
            await send_submission(seoul, report)
            await expect(seoul, Stored)
            await seoul.send(Release(token=token_for(world, report)))
            await expect(seoul, Released)
            encoded, _ = await receive_delivery(tokyo)
            token = ReleaseToken.decode(encoded)
            (conn,) = h.relay._connections["tokyo"]
            assert token.id in conn.in_flight

            # A receipt the relay refuses (it names another report): nothing acked.
            wrong = receipt_for(world, token, report=bytes(16))
            await tokyo.send(SendReceipt(receipt=wrong.encoded))
            refusal = await expect(tokyo, Refusal)
            assert (refusal.ref, refusal.reason) == (token.id, Reason.WRONG_REPORT.value)
            row = h.relay.store.token(token.id)
            assert row is not None and row.state in ("pending", "delivered")
            assert token.id in conn.in_flight

            # The right receipt: queued for Seoul and, in the same batch, the ack.
            receipt = receipt_for(world, token)
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            ack = await expect(tokyo, Ack)
            assert (ack.kind, ack.token) == ("receipt", token.id)
            row = h.relay.store.token(token.id)
            assert row is not None and row.state == "acked"
            assert token.id not in conn.in_flight
            # The Ack went out once its batch, the delivery's ack with it, was on disk.
            assert h.relay.store.committed >= h.relay.store.barrier - 1
            notice = await expect(seoul, ReceiptNotice)
            assert Receipt.verify(notice.receipt, world.arrangement) == receipt

            # Sent again (its ack lost, say): acked again, the delivery stays acked, and
            # an ack of the delivery itself is still taken, silently.
            await tokyo.send(SendReceipt(receipt=receipt.encoded))
            await tokyo.send(Ack(kind="delivery", token=token.id))
            ack = await expect(tokyo, Ack)
            assert (ack.kind, ack.token) == ("receipt", token.id)
            with trio.move_on_after(0.3):
                extra: Message = await tokyo.receive()
                raise AssertionError(f"unexpected {extra!r}")
            row = h.relay.store.token(token.id)
            assert row is not None and row.state == "acked"


# --- the recipient's node ---------------------------------------------------------------------


@pytest.fixture
async def relay(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> AsyncIterator[tuple[hr.HostileRelay, int, NodeWorld]]:
    world = make_node_world()
    hostile, port = await hr.start_hostile_relay(
        nursery, world, tmp_path / "washington", hr.Record()
    )
    yield hostile, port, world


def _from_tokyo(relay: hr.HostileRelay) -> list[Message]:
    return [e[2] for e in relay.log if e[0] == "received" and e[1] == "tokyo"]


async def _deliver(
    hostile: hr.HostileRelay, world: NodeWorld, port: int, tmp_path: pathlib.Path, count: int
) -> tuple[list[bytes], Node]:
    """Seoul submits ``count`` reports to Tokyo; Tokyo's application takes them all."""
    async with contextlib.AsyncExitStack() as stack:
        seoul = await stack.enter_async_context(
            hr.open_member(world, "seoul", port, tmp_path / "seoul")
        )
        tokyo = await stack.enter_async_context(
            hr.open_member(world, "tokyo", port, tmp_path / "tokyo")
        )
        await tokyo.wait_connected()
        ids = [
            await seoul.submit(
                f"report {i}".encode(),
                recipients=["tokyo"],
                scope=SCOPE,
                level=LEVEL,
                release_to=["tokyo"],
            )
            for i in range(count)
        ]
        got: list[bytes] = []
        async for report in tokyo.reports():
            got.append(report.report_id)
            await tokyo.ack(report)
            if len(got) == count:
                break
        assert sorted(got) == sorted(ids)
        while len(seoul.store.receipts()) < count or tokyo.store.receipts_to_send():
            await trio.sleep(0.02)
        # Seoul acked every receipt (one ack, or several in one ack_receipts).
        while hostile.store.queued_receipts("seoul"):
            await trio.sleep(0.02)
        tokens = [r.token for i in ids for r in seoul.store.releases_of(i)]
    return tokens, tokyo


async def test_the_recipient_sends_one_message_per_stored_report(
    relay: tuple[hr.HostileRelay, int, NodeWorld], tmp_path: pathlib.Path
) -> None:
    hostile, port, world = relay
    with trio.fail_after(TIMEOUT):
        tokens, _ = await _deliver(hostile, world, port, tmp_path, 3)
    sent = [m for m in _from_tokyo(hostile) if isinstance(m, Ack | SendReceipt)]
    # One receipt per report and no delivery ack: the receipt stood for it.
    assert [type(m) for m in sent] == [SendReceipt] * 3
    assert sorted(hr.acked_delivery(m) or b"" for m in sent) == sorted(tokens)
    for token_id in tokens:
        row = hostile.store.token(token_id)
        assert row is not None and row.state == "acked"


async def test_a_refused_receipt_is_followed_by_the_delivery_ack(
    relay: tuple[hr.HostileRelay, int, NodeWorld],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hostile, port, world = relay
    refused: list[bytes] = []

    def refuse(receipt: Receipt, *, now: int, ack: bool = False) -> bool:
        refused.append(receipt.token)
        raise Refused(Reason.WRONG_REPORT, "no such delivery (refused by the test)")

    monkeypatch.setattr(hostile.store, "add_receipt", refuse)
    with trio.fail_after(TIMEOUT):
        async with (
            hr.open_member(world, "seoul", port, tmp_path / "seoul") as seoul,
            hr.open_member(world, "tokyo", port, tmp_path / "tokyo") as tokyo,
        ):
            await tokyo.wait_connected()
            report_id = await seoul.submit(
                b"refused receipt",
                recipients=["tokyo"],
                scope=SCOPE,
                level=LEVEL,
                release_to=["tokyo"],
            )
            (release,) = seoul.store.releases_of(report_id)
            async for report in tokyo.reports():
                await tokyo.ack(report)
                break
            # The receipt went out, was refused, and Tokyo acked the delivery itself.
            while hostile.store.token(release.token).state != "acked":  # type: ignore[union-attr]
                await trio.sleep(0.02)
            async for event in tokyo.events():
                if isinstance(event, RefusedEvent):
                    assert (event.ref, event.reason) == (release.token, Reason.WRONG_REPORT)
                    break
            assert not tokyo.store.receipts_to_send()  # not resent
    sent = [m for m in _from_tokyo(hostile) if hr.acked_delivery(m) is not None]
    assert [type(m) for m in sent] == [SendReceipt, Ack]
    assert [hr.acked_delivery(m) for m in sent] == [release.token] * 2
    assert refused == [release.token]


# --- the originator's acks of receipts, several in one message -------------------------------


def test_the_acks_of_several_receipts_go_out_as_one_message() -> None:
    from clients.node import _receipt_acks_merged

    tokens = [bytes([n]) * 16 for n in range(3)]
    consent = Ack(kind="request", token=b"q" * 16)
    ready: list[Message] = [
        Ack(kind="receipt", token=tokens[0]),
        consent,
        Ack(kind="receipt", token=tokens[1]),
        Ack(kind="receipt", token=tokens[2]),
    ]
    assert _receipt_acks_merged(ready) == [AckReceipts(tokens=tokens), consent]
    # One alone goes as it is; more than MAX_RECEIPT_ACKS in several messages.
    assert _receipt_acks_merged(ready[:2]) == ready[:2]
    many = [bytes([n % 256, n // 256]) * 8 for n in range(MAX_RECEIPT_ACKS + 1)]
    merged = _receipt_acks_merged([Ack(kind="receipt", token=t) for t in many])
    assert merged == [
        AckReceipts(tokens=many[:MAX_RECEIPT_ACKS]),
        AckReceipts(tokens=many[MAX_RECEIPT_ACKS:]),
    ]


async def test_the_relay_takes_ack_receipts_as_one_ack_each(store_at: str | Path) -> None:
    world = make_world()
    with trio.fail_after(TIMEOUT):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            seoul = await h.connect("seoul")
            tokens = []
            for n in range(2):
                report = seal(world, b"report %d" % n)
                await send_submission(seoul, report)
                await expect(seoul, Stored)
                await seoul.send(Release(token=token_for(world, report)))
                await expect(seoul, Released)
                token = ReleaseToken.decode((await receive_delivery(tokyo))[0])
                await tokyo.send(SendReceipt(receipt=receipt_for(world, token).encoded))
                assert (await expect(tokyo, Ack)).kind == "receipt"
                await expect(seoul, ReceiptNotice)
                tokens.append(token.id)
            assert len(h.relay.store.queued_receipts("seoul")) == 2
            unknown = b"u" * 16
            await seoul.send(AckReceipts(tokens=[tokens[0], unknown, tokens[1]]))
            refusal = await expect(seoul, Refusal)
            assert (refusal.ref, refusal.reason) == (unknown, Reason.UNKNOWN_REPORT.value)
            assert h.relay.store.queued_receipts("seoul") == []
            # More than MAX_RECEIPT_ACKS ids in one message: malformed, the link closes.
            over = object.__new__(AckReceipts)
            object.__setattr__(over, "tokens", [unknown] * (MAX_RECEIPT_ACKS + 1))
            await seoul.send(over)
            assert (await expect(seoul, ErrorMessage)).reason == Reason.MALFORMED.value


class _DropReceiptAcks(hr.Behaviour):
    """Honest, but the relay's acks of Tokyo's receipts are lost while ``dropping``."""

    def __init__(self) -> None:
        self.dropping = True
        self.dropped = 0

    async def on_send(self, member: str, message: Message) -> list[hr.Outgoing]:
        if self.dropping and isinstance(message, Ack) and message.kind == "receipt":
            self.dropped += 1
            return []
        return [(member, message)]


async def test_a_receipt_whose_ack_never_came_is_resent_once_on_the_next_connection(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_node_world()
    behaviour = _DropReceiptAcks()
    hostile, port = await hr.start_hostile_relay(nursery, world, tmp_path / "washington", behaviour)
    with trio.fail_after(TIMEOUT):
        async with hr.open_member(world, "seoul", port, tmp_path / "seoul") as seoul:
            async with hr.open_member(world, "tokyo", port, tmp_path / "tokyo") as tokyo:
                await tokyo.wait_connected()
                report_id = await seoul.submit(
                    b"ack lost",
                    recipients=["tokyo"],
                    scope=SCOPE,
                    level=LEVEL,
                    release_to=["tokyo"],
                )
                (release,) = seoul.store.releases_of(report_id)
                while not behaviour.dropped:
                    await trio.sleep(0.02)
                # The delivery was acked by the receipt; the receipt itself not confirmed.
                assert hostile.store.token(release.token).state == "acked"  # type: ignore[union-attr]
                assert [t for _, t, _ in tokyo.store.receipts_to_send()] == [release.token]
                await trio.sleep(0.2)  # not sent twice on one connection
            behaviour.dropping = False
            async with hr.open_member(world, "tokyo", port, tmp_path / "tokyo") as tokyo:
                while tokyo.store.receipts_to_send():
                    await trio.sleep(0.02)
    receipts = [m for m in _from_tokyo(hostile) if isinstance(m, SendReceipt)]
    assert [hr.acked_delivery(m) for m in receipts] == [release.token] * 2
    # Acked before: not delivered again, so no delivery ack either.
    assert not any(isinstance(m, Ack) for m in _from_tokyo(hostile))
