"""A minimal in-memory relay for unit tests of the client node.

It speaks the session protocol just enough to exercise the node: it stores submissions
and answers ``stored``, keeps and hands out prekeys (unchecked), checks and consumes
release tokens, delivers to a connected
recipient (redelivering on every connection until acknowledged), forwards receipts.
It keeps nothing on disk and is not the relay; tests use it to script what a real relay
would only do under faults (a replayed delivery, a lost answer, a refusal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import trio

from tisa import messages as m
from tisa.arrangement import Arrangement
from tisa.errors import Reason, Refused, RemoteError
from tisa.keys import MemberSecret
from tisa.limits import MAX_INLINE_CIPHERTEXT
from tisa.receipt import Receipt, StoredAck
from tisa.token import check_for_relay
from tisa_io.link import Link, LinkClosed, accept_member


@dataclasses.dataclass
class FakeRelay:
    secret: MemberSecret
    arrangement: Arrangement
    clock: Callable[[], float] = time.time
    reports: dict[bytes, tuple[str, bytes, bytes]] = dataclasses.field(default_factory=dict)
    consumed: set[bytes] = dataclasses.field(default_factory=set)
    # recipient -> list of (token bytes, token id, report id), unacked deliveries
    pending: dict[str, list[tuple[bytes, bytes, bytes]]] = dataclasses.field(default_factory=dict)
    links: dict[str, Link] = dataclasses.field(default_factory=dict)
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)
    received: list[m.Message] = dataclasses.field(default_factory=list)
    # Messages the relay drops instead of answering (by type), to simulate lost answers.
    drop_answers: set[str] = dataclasses.field(default_factory=set)
    accept: bool = True
    # Acks the relay "loses" (as if it crashed before recording them).
    ignore_acks: bool = False
    # Submissions answered `busy` (as if an upload of the same id were in progress on
    # another connection) before the relay starts taking them.
    busy_submissions: int = 0
    # Every delivery sent, as (token, token id, report id).
    delivered: list[tuple[bytes, bytes, bytes]] = dataclasses.field(default_factory=list)
    # Published prekeys: each member's signed prekey and its one-time supply.
    signed_prekeys: dict[str, bytes] = dataclasses.field(default_factory=dict)
    one_time_prekeys: dict[str, list[bytes]] = dataclasses.field(default_factory=dict)
    # Hand out no one-time prekeys (as if the supply were exhausted), or nothing at all.
    withhold_one_time: bool = False
    withhold_signed: bool = False
    # Seconds before a prekey fetch is answered (answered from a task of its own, so
    # fetches sent together are in flight together), and for each fetch received, how
    # many were unanswered then (itself included).
    fetch_delay: float = 0.0
    fetches_in_flight: list[int] = dataclasses.field(default_factory=list)
    _unanswered: int = 0

    def _poke(self) -> None:
        self.wake.set()
        self.wake = trio.Event()

    async def serve(self, port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if not self.accept:
            await stream.aclose()
            return
        try:
            link = await accept_member(stream, self.secret, self.arrangement)
        except RemoteError:
            return
        self.links[link.peer] = link
        try:
            async with link, trio.open_nursery() as nursery:
                nursery.start_soon(self._push, link)
                with contextlib.suppress(LinkClosed, trio.BrokenResourceError, RemoteError):
                    await self._read(link, nursery)
                nursery.cancel_scope.cancel()
        finally:
            if self.links.get(link.peer) is link:
                del self.links[link.peer]

    async def _push(self, link: Link) -> None:
        sent: set[bytes] = set()
        try:
            while True:
                wake = self.wake
                for token, token_id, report in list(self.pending.get(link.peer, [])):
                    if token_id in sent:
                        continue
                    sent.add(token_id)
                    await self.deliver(link, token, token_id, report)
                await wake.wait()
        except (LinkClosed, trio.BrokenResourceError, RemoteError):
            pass

    async def deliver(self, link: Link, token: bytes, token_id: bytes, report: bytes) -> None:
        ciphertext = self.reports[report][2]
        self.delivered.append((token, token_id, report))
        if len(ciphertext) <= MAX_INLINE_CIPHERTEXT:
            await link.send(m.DeliverInline(token=token, data=ciphertext))
            return
        async with link.sending():
            await link.send(m.Deliver(token=token))
            for start in range(0, len(ciphertext), m.MAX_CHUNK_DATA):
                await link.send(m.Chunk(data=ciphertext[start : start + m.MAX_CHUNK_DATA]))
            await link.send(m.DeliverEnd(token=token_id))

    def _status(self, member: str) -> m.PrekeyStatus:
        from tisa.prekeys import Prekey

        signed = self.signed_prekeys.get(member)
        return m.PrekeyStatus(
            signed_not_after=0 if signed is None else Prekey.decode(signed).not_after,
            one_time=len(self.one_time_prekeys.get(member, [])),
        )

    async def _answer(self, link: Link, message: m.Message) -> None:
        if message.TYPE not in self.drop_answers:
            await link.send(message)

    async def _answer_later(self, link: Link, message: m.Message) -> None:
        await trio.sleep(self.fetch_delay)
        self._unanswered -= 1
        with contextlib.suppress(LinkClosed, trio.BrokenResourceError, RemoteError):
            await self._answer(link, message)

    async def _read(self, link: Link, nursery: trio.Nursery) -> None:
        while True:
            message = await link.receive()
            self.received.append(message)
            if isinstance(message, m.SubmitBegin):
                data = bytearray()
                while True:
                    part = await link.receive()
                    if isinstance(part, m.Chunk):
                        data += part.data
                    else:
                        break
                if self.busy_submissions > 0:
                    self.busy_submissions -= 1
                    await link.send(
                        m.Refusal(ref=message.report, reason=Reason.BUSY.value, detail="upload")
                    )
                    continue
                self.reports[message.report] = (link.peer, message.digest, bytes(data))
                ack = StoredAck.issue(
                    self.secret,
                    self.arrangement,
                    report=message.report,
                    originator=link.peer,
                    digest=message.digest,
                    size=message.size,
                    stored=int(self.clock()),
                )
                await self._answer(link, m.Stored(report=message.report, ack=ack.encoded))
            elif isinstance(message, m.SubmitInline):
                if self.busy_submissions > 0:
                    self.busy_submissions -= 1
                    await link.send(
                        m.Refusal(ref=message.report, reason=Reason.BUSY.value, detail="upload")
                    )
                    continue
                self.reports[message.report] = (link.peer, message.digest, message.data)
                ack = StoredAck.issue(
                    self.secret,
                    self.arrangement,
                    report=message.report,
                    originator=link.peer,
                    digest=message.digest,
                    size=len(message.data),
                    stored=int(self.clock()),
                )
                outcomes = [self._consume(token) for token in message.tokens]
                released = [o.token for o in outcomes if isinstance(o, m.Released)]
                stored = m.Stored(report=message.report, ack=ack.encoded, released=released)
                await self._answer(link, stored)
                for outcome in outcomes:
                    if isinstance(outcome, m.Refusal):
                        await link.send(outcome)
                self._poke()
            elif isinstance(message, m.Release):
                outcome = self._consume(message.token)
                if isinstance(outcome, m.Refusal):
                    await link.send(outcome)
                else:
                    await self._answer(link, outcome)
                    self._poke()
            elif isinstance(message, m.Ack) and message.kind == "delivery":
                if self.ignore_acks:
                    continue
                for queue in self.pending.values():
                    queue[:] = [p for p in queue if p[1] != message.token]
            elif isinstance(message, m.SendReceipt):
                receipt = Receipt.verify(message.receipt, self.arrangement)
                if not self.ignore_acks:
                    # Protocol version 4: the receipt also acks its delivery.
                    for queue in self.pending.values():
                        queue[:] = [p for p in queue if p[1] != receipt.token]
                origin = self.links.get(receipt.originator)
                if origin is not None:
                    await origin.send(m.ReceiptNotice(receipt=message.receipt))
            elif isinstance(message, m.Revoke):
                await self._answer(link, m.Revoked(report=message.report, token=message.token))
            elif isinstance(message, m.PublishPrekeys):
                if message.signed is not None:
                    self.signed_prekeys[link.peer] = message.signed
                self.one_time_prekeys.setdefault(link.peer, []).extend(message.one_time)
                await self._answer(link, self._status(link.peer))
            elif isinstance(message, m.FetchPrekeys):
                supply = self.one_time_prekeys.get(message.member, [])
                one_time: list[bytes] = []
                if not self.withhold_one_time:
                    one_time, supply[:] = supply[: message.count], supply[message.count :]
                signed = None if self.withhold_signed else self.signed_prekeys.get(message.member)
                answer = m.Prekeys(
                    ref=message.ref, member=message.member, signed=signed, one_time=one_time
                )
                self._unanswered += 1
                self.fetches_in_flight.append(self._unanswered)
                if self.fetch_delay:
                    nursery.start_soon(self._answer_later, link, answer)
                else:
                    self._unanswered -= 1
                    await self._answer(link, answer)

    def _consume(self, data: bytes) -> m.Released | m.Refusal:
        """Check and consume a token: the answer to send (a ``released`` or a refusal)."""
        from tisa.token import ReleaseToken

        token_id = ReleaseToken.decode(data).id
        if token_id in self.consumed:
            return m.Refusal(ref=token_id, reason=Reason.REPLAYED.value)
        decoded = ReleaseToken.decode(data)
        stored = self.reports.get(decoded.report)
        if stored is None:
            return m.Refusal(ref=token_id, reason=Reason.UNKNOWN_REPORT.value)
        try:
            token = check_for_relay(
                data,
                self.arrangement,
                report_id=decoded.report,
                digest=stored[1],
                size=len(stored[2]),
                originator=stored[0],
                now=int(self.clock()),
            )
        except Refused as exc:
            return m.Refusal(ref=token_id, reason=exc.reason.value, detail=exc.detail)
        self.consumed.add(token.id)
        self.pending.setdefault(token.recipient, []).append((data, token.id, token.report))
        return m.Released(report=token.report, token=token.id)
