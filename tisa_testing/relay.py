"""A hostile relay on trio: the real relay, with a misbehaviour chosen per test.

:class:`HostileRelay` is :class:`relay.server.Relay` (the same store, token checks,
audit log and session protocol, so honest members get as far as the attack) with every
authenticated link wrapped so that a :class:`Behaviour` sees, and may change, each
message in both directions. Deliveries (``deliver``, the chunks, ``deliver_end``) reach
the behaviour whole, as one :class:`Delivery`, and it answers with what to send to whom.
It holds the relay's real key: it can sign acks, checkpoints and audit extracts, and
forge tokens with its own key, exactly as a compromised relay could.

Ready-made behaviours: :class:`DropDeliveries`, :class:`Delay`, :class:`Reorder`,
:class:`Replay` (also after the recipient restarts), :class:`Reflect`,
:class:`ReflectDelivery`, :class:`ForwardWithoutToken`, :class:`SwapTokens`,
:class:`SwapRecipients`, :class:`FlipBit`, :class:`Truncate`, :class:`Inject` (e.g.
deliveries made under an old arrangement version) and :class:`Equivocate`; for release
requests and their answers, :class:`ReflectConsent`, :class:`RetargetConsent` and
:class:`ReplayConsent` (forged ones go in with :class:`Inject`). Write your
own by subclassing :class:`Behaviour`; every hook defaults to honest.

Usage::

    behaviour = SwapRecipients({"tokyo": "seoul"})
    relay, port = await start_hostile_relay(nursery, world, tmp_path / "relay", behaviour)
    async with open_member(world, "tokyo", port, tmp_path / "tokyo") as tokyo: ...

Deliveries pass through the behaviour in memory: meant for test-sized reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import nacl.bindings as sodium
import trio

from clients.node import Backoff, Node, open_node
from relay.server import Relay
from tisa.audit import AuditEntry, Checkpoint, Extract, chain_next
from tisa.consent import consent_ref
from tisa.keys import Context
from tisa.limits import DEFAULT_LIMITS, MAX_INLINE_CIPHERTEXT, Limits
from tisa.messages import (
    CONSENT_KINDS,
    Ack,
    AuditReply,
    Chunk,
    ConsentNotice,
    Deliver,
    DeliverEnd,
    DeliverInline,
    Message,
    Prekeys,
    Release,
    SendConsent,
    SendReceipt,
    chunks_of,
)
from tisa.token import ReleaseToken
from tisa_io.link import Link, LinkClosed
from tisa_testing import hostile
from tisa_testing.world import World

__all__ = [
    "FAST_BACKOFF",
    "Behaviour",
    "Delay",
    "Delivery",
    "DropDeliveries",
    "Equivocate",
    "FlipBit",
    "ForwardWithoutToken",
    "HostileRelay",
    "Inject",
    "Record",
    "Reflect",
    "ReflectConsent",
    "ReflectDelivery",
    "acked_delivery",
    "Reorder",
    "Replay",
    "ReplayConsent",
    "RetargetConsent",
    "ReplayPrekeys",
    "SubstitutePrekeys",
    "SwapRecipients",
    "SwapTokens",
    "Truncate",
    "WithholdPrekeys",
    "open_member",
    "start_hostile_relay",
]

# Reconnection delays for member nodes in tests: a node the hostile relay disconnects
# comes back within a tenth of a second.
FAST_BACKOFF = Backoff(initial=0.01, maximum=0.1)


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery as the relay sends it: the token, the ciphertext, the id that ends
    it (``deliver_end``; normally the token's id). On the wire a small one is one
    ``deliver_inline``, a larger one (or one ended by another id) a stream."""

    token: bytes
    ciphertext: bytes
    end_id: bytes

    @classmethod
    def of(cls, token: bytes, ciphertext: bytes) -> Delivery:
        """A delivery of ``ciphertext`` under ``token`` (ended by the token's own id)."""
        return cls(token, ciphertext, _token_id(token) or bytes(16))

    def messages(self) -> list[Message]:
        """The messages that carry it: one ``deliver_inline`` when the ciphertext is of 1
        to MAX_INLINE_CIPHERTEXT bytes and :attr:`end_id` is the token's id (what an
        honest relay sends), else ``deliver``, chunks, ``deliver_end`` with :attr:`end_id`."""
        if 0 < len(self.ciphertext) <= MAX_INLINE_CIPHERTEXT and self.end_id == _token_id(
            self.token
        ):
            return [DeliverInline(token=self.token, data=self.ciphertext)]
        chunks = chunks_of(self.ciphertext)
        return [Deliver(token=self.token), *chunks, DeliverEnd(token=self.end_id)]

    @property
    def decoded(self) -> ReleaseToken:
        """The token, decoded but not verified.

        Raises:
            ProtocolError: the token does not decode.
        """
        return ReleaseToken.decode(self.token)


def _token_id(token: bytes) -> bytes | None:
    try:
        return ReleaseToken.decode(token).id
    except Exception:
        return None


Outgoing = tuple[str, Delivery | Message]
"""Something to send: (member name, a delivery or a single message)."""


class Behaviour:
    """How the relay misbehaves. Every hook defaults to honest; override what you need.

    ``relay`` is set when the behaviour is attached, so hooks can read the store
    (``relay.store``), sign with the relay's key (``relay.secret``) and send to any
    member (:meth:`HostileRelay.send_to`).
    """

    relay: HostileRelay

    async def on_connect(self, member: str) -> list[Outgoing]:
        """A member's link is up; what to push to anyone before the relay's own pushes."""
        return []

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """The relay is about to deliver to ``member``; what to send instead."""
        return [(member, delivery)]

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Any other message the relay is about to send to ``member``."""
        return [(member, message)]

    async def on_receive(self, member: str, message: Message) -> Message | None:
        """A message from ``member``; what the relay should act on (None: ignore it)."""
        return message


class _InterceptedLink:
    """Wraps the relay's side of one link; the relay code sees a :class:`Link`."""

    def __init__(self, inner: Link, relay: HostileRelay) -> None:
        self.inner = inner
        self.peer = inner.peer
        self._relay = relay
        self._stream: list[Message] | None = None

    @property
    def stream(self) -> trio.abc.Stream:
        return self.inner.stream

    def sending(self) -> contextlib.AbstractAsyncContextManager[Link]:
        return self.inner.sending()

    async def send(self, message: Message) -> None:
        behaviour = self._relay.behaviour
        if isinstance(message, DeliverInline):
            delivery = Delivery(message.token, message.data, _token_id(message.token) or bytes(16))
            self._relay.log.append(("sent", self.peer, delivery))
            await self._relay.emit(await behaviour.on_delivery(self.peer, delivery), self)
            return
        if isinstance(message, Deliver):
            self._stream = [message]
            return
        if self._stream is not None:
            self._stream.append(message)
            if not isinstance(message, DeliverEnd):
                return
            first, *chunks = self._stream
            self._stream = None
            assert isinstance(first, Deliver)
            delivery = Delivery(
                first.token,
                b"".join(c.data for c in chunks if isinstance(c, Chunk)),
                message.token,
            )
            self._relay.log.append(("sent", self.peer, delivery))
            await self._relay.emit(await behaviour.on_delivery(self.peer, delivery), self)
            return
        await self._relay.emit(await behaviour.on_send(self.peer, message), self)

    async def send_many(self, messages: Iterable[Message]) -> None:
        """As :meth:`Link.send_many`: each message through the behaviour, in order."""
        for message in messages:
            await self.send(message)

    async def send_now(self, item: Delivery | Message) -> None:
        """Send on this link, as one uninterrupted stream (the caller may hold the lock)."""
        messages = item.messages() if isinstance(item, Delivery) else [item]
        for message in messages:
            await self.inner.send(message)

    def receive_nowait(self) -> Message:
        """Always :class:`trio.WouldBlock`: every message goes through :meth:`receive`,
        so the behaviour sees it."""
        raise trio.WouldBlock

    async def receive(self) -> Message:
        while True:
            message = await self.inner.receive()
            self._relay.log.append(("received", self.peer, message))
            result = await self._relay.behaviour.on_receive(self.peer, message)
            if result is not None:
                return result

    async def aclose(self) -> None:
        await self.inner.aclose()


class HostileRelay(Relay):
    """The real relay with a :class:`Behaviour` between it and every member.

    Args:
        behaviour: the misbehaviour; see the module docstring.
        *args, **kwargs: as for :class:`relay.server.Relay`.

    Attributes:
        log: ("sent", member, Delivery) and ("received", member, Message) in order, for
            assertions.
    """

    def __init__(self, *args: Any, behaviour: Behaviour | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.behaviour = behaviour or Behaviour()
        self.behaviour.relay = self
        self.log: list[tuple[str, str, Any]] = []
        self._links: dict[str, list[_InterceptedLink]] = {}
        self._pending: dict[str, list[Delivery | Message]] = {}

    async def serve_link(self, link: Link) -> None:
        """Serve ``link`` through the behaviour: pending items first, then the relay."""
        wrapped = _InterceptedLink(link, self)
        member = link.peer
        self._links.setdefault(member, []).append(wrapped)
        try:
            async with link.sending():
                for item in self._pending.pop(member, []):
                    await wrapped.send_now(item)
            await self.emit(await self.behaviour.on_connect(member), wrapped)
            await super().serve_link(wrapped)  # type: ignore[arg-type]
        except LinkClosed:
            await link.aclose()
        finally:
            self._links[member].remove(wrapped)

    async def emit(self, items: Sequence[Outgoing], current: _InterceptedLink | None) -> None:
        """Send each item to its member: on ``current`` when it is theirs (in this task,
        which may hold that link's send lock), else on one of their links, else queued
        for their next connection."""
        for member, item in items:
            if current is not None and member == current.peer:
                await current.send_now(item)
            else:
                await self.send_to(member, item)

    async def send_to(self, member: str, item: Delivery | Message) -> None:
        """Send ``item`` to ``member`` now if connected, else on its next connection."""
        for link in self._links.get(member, []):
            try:
                async with link.sending():
                    await link.send_now(item)
                return
            except LinkClosed:
                continue
        self._pending.setdefault(member, []).append(item)


# --- behaviours ------------------------------------------------------------------------


class DropDeliveries(Behaviour):
    """Drop deliveries for which ``which(member, delivery)`` is true (all by default).

    ``dropped`` lists what was dropped. A dropped delivery stays unacknowledged, so the
    relay redelivers it on the next connection, and it is dropped again.
    """

    def __init__(self, which: Callable[[str, Delivery], bool] = lambda m, d: True) -> None:
        self.which = which
        self.dropped: list[Delivery] = []

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Drop the delivery into :attr:`dropped` when ``which`` says so; else pass it on."""
        if self.which(member, delivery):
            self.dropped.append(delivery)
            return []
        return [(member, delivery)]


class Delay(Behaviour):
    """Hold every delivery ``seconds`` before sending it (``before`` runs first, e.g. to
    move a test clock past the token's validity)."""

    def __init__(self, seconds: float, before: Callable[[], None] | None = None) -> None:
        self.seconds = seconds
        self.before = before

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Sleep ``seconds``, call ``before``, then pass the delivery on.

        Cancellation: during the sleep, ``before`` is not called and nothing is sent.
        """
        await trio.sleep(self.seconds)
        if self.before is not None:
            self.before()
        return [(member, delivery)]


class Reorder(Behaviour):
    """Collect ``batch`` deliveries per member, then send them in reverse order."""

    def __init__(self, batch: int = 2) -> None:
        self.batch = batch
        self.held: dict[str, list[Delivery]] = {}

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Hold the delivery; once ``batch`` are held for ``member``, send them newest first.

        A redelivery of one already held is dropped.
        """
        held = self.held.setdefault(member, [])
        if any(d.end_id == delivery.end_id for d in held):
            return []  # a redelivery of one we are holding
        held.append(delivery)
        if len(held) < self.batch:
            return []
        self.held[member] = []
        return [(member, d) for d in reversed(held)]


def acked_delivery(message: Message) -> bytes | None:
    """The token id of the delivery a member's ``message`` acknowledges: an ``ack`` of
    kind delivery, or (protocol version 4) the ``send_receipt`` a recipient sends in its
    place once the report is stored (read without verifying); None for anything else."""
    if isinstance(message, Ack) and message.kind == "delivery":
        return message.token
    if isinstance(message, SendReceipt):
        with contextlib.suppress(Exception):
            return bytes(hostile.token_body(message.receipt)["token"])
    return None


class Replay(Behaviour):
    """Record every delivery; send it again after the member acknowledges it
    (``after_ack``) and all of them again whenever the member reconnects, e.g. after a
    restart (``on_reconnect``). ``replayed`` counts the replays sent."""

    def __init__(self, *, after_ack: bool = True, on_reconnect: bool = True) -> None:
        self.after_ack = after_ack
        self.on_reconnect = on_reconnect
        self.recorded: dict[str, dict[bytes, Delivery]] = {}
        self.replayed = 0
        self._acked_once: set[bytes] = set()

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Record the delivery (by its end id) and pass it on."""
        self.recorded.setdefault(member, {})[delivery.end_id] = delivery
        return [(member, delivery)]

    async def on_receive(self, member: str, message: Message) -> Message | None:
        """With ``after_ack``, the first delivery ack (or the receipt standing for it) for a
        recorded delivery sends it again.

        The ack itself goes on to the relay unchanged.

        Cancellation: the replay may have gone out in part or not at all; it is already
        counted in ``replayed`` and is not tried again on a later ack.
        """
        token_id = acked_delivery(message) if self.after_ack else None
        if token_id is not None and token_id not in self._acked_once:
            delivery = self.recorded.get(member, {}).get(token_id)
            if delivery is not None:
                self._acked_once.add(token_id)
                self.replayed += 1
                await self.relay.send_to(member, delivery)
        return message

    async def on_connect(self, member: str) -> list[Outgoing]:
        """With ``on_reconnect``, send every delivery recorded for ``member`` again (counted)."""
        if not self.on_reconnect:
            return []
        recorded = list(self.recorded.get(member, {}).values())
        self.replayed += len(recorded)
        return [(member, d) for d in recorded]


class Reflect(Behaviour):
    """Send every message of the kinds in ``kinds`` back to the member that sent it
    (and also act on it, as the honest relay would)."""

    def __init__(self, kinds: tuple[type[Message], ...] = (Release,)) -> None:
        self.kinds = kinds
        self.reflected = 0

    async def on_receive(self, member: str, message: Message) -> Message | None:
        """Send a message of one of ``kinds`` back to ``member`` (counted), then pass it on.

        Cancellation: the reflection may or may not have gone out; it is already counted, and
        the relay does not act on the message.
        """
        if isinstance(message, self.kinds):
            self.reflected += 1
            await self.relay.send_to(member, message)
        return message


class Record(Behaviour):
    """Honest, but keeps everything the relay forwards: every message it sends and every
    delivery (with its ciphertext), in order; with :attr:`HostileRelay.log` (what it
    received) and the relay's store directory, that is all the relay ever holds."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Delivery | Message]] = []

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Keep the delivery, then deliver it."""
        self.sent.append((member, delivery))
        return [(member, delivery)]

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Keep the message, then send it."""
        self.sent.append((member, message))
        return [(member, message)]


class WithholdPrekeys(Behaviour):
    """Answer prekey fetches without the one-time prekey (as if the supply were
    exhausted) and, with ``signed``, without the signed prekey too."""

    def __init__(self, *, signed: bool = False) -> None:
        self.signed = signed
        self.withheld = 0

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Strip what is withheld from a ``prekeys`` answer."""
        if isinstance(message, Prekeys):
            self.withheld += 1
            message = dataclasses.replace(
                message, one_time=[], signed=None if self.signed else message.signed
            )
        return [(member, message)]


class SubstitutePrekeys(Behaviour):
    """Answer prekey fetches with a signed prekey the relay made itself: signed by the
    relay in the recipient's name (``forge``), or a real prekey of another member
    (``other``), so that it could read what is wrapped to it."""

    def __init__(self, mode: str = "forge", other: str = "seoul") -> None:
        if mode not in ("forge", "other"):
            raise ValueError(mode)
        self.mode = mode
        self.other = other

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Replace the signed prekey of a ``prekeys`` answer (and drop the one-time one)."""
        if isinstance(message, Prekeys) and message.signed is not None:
            substitute: bytes | None
            if self.mode == "forge":
                body = hostile.token_body(message.signed)  # any envelope's body map
                body["key"] = bytes(sodium.crypto_scalarmult_base(bytes(range(32))))
                substitute = hostile.sign_envelope(self.relay.secret, Context.PREKEY, body)
            else:
                now = self.relay.now()
                substitute, _, _ = self.relay.store.take_prekeys(self.other, taker=member, now=now)
            message = dataclasses.replace(message, signed=substitute, one_time=[])
        return [(member, message)]


class ReplayPrekeys(Behaviour):
    """Hand out the first one-time prekey of each member again on every later fetch."""

    def __init__(self) -> None:
        self.first: dict[str, bytes] = {}

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Replace the one-time prekeys of a ``prekeys`` answer by the first one handed."""
        if isinstance(message, Prekeys) and message.one_time:
            first = self.first.setdefault(message.member, message.one_time[0])
            message = dataclasses.replace(message, one_time=[first] * len(message.one_time))
        return [(member, message)]


class ReflectDelivery(Behaviour):
    """When an originator releases a report, deliver the report and its token back to
    the originator (a reflection that is well-formed on the wire)."""

    def __init__(self) -> None:
        self.reflected = 0

    async def on_receive(self, member: str, message: Message) -> Message | None:
        """On a ``release``, deliver the report's ciphertext back to ``member`` under that token.

        The ciphertext is read from the relay's store; when the token does not decode or
        the report is not stored, nothing is reflected. The relay acts on the release as usual.

        Cancellation: the reflection may have gone out in part or not at all, and the relay
        does not act on the release.
        """
        if isinstance(message, Release):
            try:
                token = ReleaseToken.decode(message.token)
                with self.relay.store.open_ciphertext(token.report) as blob:
                    ciphertext = blob.read()
            except (OSError, Exception):
                return message
            self.reflected += 1
            await self.relay.send_to(member, Delivery.of(message.token, ciphertext))
        return message


class ReflectConsent(Behaviour):
    """Send every announcement, request or answer of the kinds in ``kinds`` back to the
    member that sent it, as if forwarded to it (and also act on it, as the honest relay
    would). ``reflected`` counts them."""

    def __init__(self, kinds: tuple[str, ...] = CONSENT_KINDS) -> None:
        self.kinds = kinds
        self.reflected = 0

    async def on_receive(self, member: str, message: Message) -> Message | None:
        """Send a ``send_consent`` of one of ``kinds`` back to ``member``, then pass it on.

        Cancellation: as :meth:`Reflect.on_receive`.
        """
        if isinstance(message, SendConsent) and message.kind in self.kinds:
            self.reflected += 1
            await self.relay.send_to(member, ConsentNotice(kind=message.kind, data=message.data))
        return message


class RetargetConsent(Behaviour):
    """Forward announcements, requests and answers meant for one member to another:
    ``{"seoul": "canberra"}`` hands Seoul's requests to Canberra."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping
        self.retargeted = 0

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Send a ``consent`` notice to ``mapping[member]`` instead (counted)."""
        if isinstance(message, ConsentNotice) and member in self.mapping:
            self.retargeted += 1
            return [(self.mapping[member], message)]
        return [(member, message)]


class ReplayConsent(Behaviour):
    """Record every announcement, request and answer forwarded to a member; send each
    again once the member acks it, and all of them again whenever it reconnects.
    ``replayed`` counts the replays sent."""

    def __init__(self) -> None:
        self.recorded: dict[str, dict[tuple[str, bytes], ConsentNotice]] = {}
        self.replayed = 0
        self._acked_once: set[tuple[str, str, bytes]] = set()

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Record a ``consent`` notice (by its kind and id) and pass it on."""
        if isinstance(message, ConsentNotice):
            ref = consent_ref(message.kind, message.data)
            self.recorded.setdefault(member, {})[(message.kind, ref)] = message
        return [(member, message)]

    async def on_receive(self, member: str, message: Message) -> Message | None:
        """The first ack of a recorded notice sends it again; the ack goes on unchanged.

        Cancellation: as :meth:`Replay.on_receive`.
        """
        if isinstance(message, Ack) and message.kind in CONSENT_KINDS:
            key = (member, message.kind, message.token)
            notice = self.recorded.get(member, {}).get((message.kind, message.token))
            if notice is not None and key not in self._acked_once:
                self._acked_once.add(key)
                self.replayed += 1
                await self.relay.send_to(member, notice)
        return message

    async def on_connect(self, member: str) -> list[Outgoing]:
        """Send every notice recorded for ``member`` again (counted)."""
        recorded = list(self.recorded.get(member, {}).values())
        self.replayed += len(recorded)
        return [(member, notice) for notice in recorded]


class ForwardWithoutToken(Behaviour):
    """Deliver the ciphertext with a token the relay made itself: the same fields, its own
    signature, a content key it chose sealed to the recipient (it has no other)."""

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Send the ciphertext under a token the relay forged (see the class docstring).

        Raises:
            ProtocolError: the original token does not decode.
        """
        t = delivery.decoded
        forged = hostile.forge_token(
            self.relay.secret,
            self.relay.arrangement,
            recipient=t.recipient,
            report_id=t.report,
            digest_=t.digest,
            size=t.size,
            content_key=os.urandom(32),
            scope=t.scope,
            level=t.level,
            not_before=t.not_before,
            not_after=t.not_after,
            originator=t.originator,
            counter=t.counter,
            context=Context.TOKEN,
            # The relay holds the recipient's published prekeys: it wraps to the same.
            signed_prekey=t.wrap.spk,
        )
        return [(member, Delivery(forged, delivery.ciphertext, ReleaseToken.decode(forged).id))]


class SwapTokens(Behaviour):
    """Pair consecutive deliveries to one member and swap their tokens (each ciphertext
    goes out under the other report's token)."""

    def __init__(self) -> None:
        self.held: dict[str, Delivery] = {}

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Hold the first delivery to ``member``; with the second, send both, each
        ciphertext under the other's token (the end id follows the token).
        """
        first = self.held.pop(member, None)
        if first is None:
            self.held[member] = delivery
            return []
        return [
            (member, Delivery(delivery.token, first.ciphertext, delivery.end_id)),
            (member, Delivery(first.token, delivery.ciphertext, first.end_id)),
        ]


class SwapRecipients(Behaviour):
    """Deliver what is meant for one member to another: ``{"tokyo": "seoul"}``."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = mapping

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Send the delivery to ``mapping[member]`` instead (to ``member`` if unmapped)."""
        return [(self.mapping.get(member, member), delivery)]


class FlipBit(Behaviour):
    """Flip one bit of every delivery, in the ciphertext (``where="ciphertext"``) or the
    token (``where="token"``); ``bit`` counts from the start and wraps."""

    def __init__(self, bit: int, where: str = "ciphertext") -> None:
        if where not in {"ciphertext", "token"}:
            raise ValueError("where is 'ciphertext' or 'token'")
        self.bit = bit
        self.where = where

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Pass the delivery on with bit ``bit`` of its ciphertext or token flipped."""
        if self.where == "token":
            changed = dataclasses.replace(
                delivery, token=hostile.flip_bit(delivery.token, self.bit)
            )
        else:
            changed = dataclasses.replace(
                delivery, ciphertext=hostile.flip_bit(delivery.ciphertext, self.bit)
            )
        return [(member, changed)]


class Truncate(Behaviour):
    """Cut every delivery's ciphertext to its first ``keep_chunks`` secretstream chunks.

    With ``refill`` the cut is filled back to the token's size with bytes of the same
    length from ``refill`` (e.g. another report's chunks), so the stream is not short.
    """

    def __init__(self, keep_chunks: int = 1, refill: bytes | None = None) -> None:
        self.keep_chunks = keep_chunks
        self.refill = refill

    async def on_delivery(self, member: str, delivery: Delivery) -> list[Outgoing]:
        """Cut the ciphertext after its first ``keep_chunks`` chunks, then refill it if asked.

        A delivery of no more chunks than that passes unchanged; ``keep_chunks=0`` keeps only
        the secretstream header.
        """
        spans = hostile.chunk_spans(len(delivery.ciphertext))
        if len(spans) <= self.keep_chunks:
            return [(member, delivery)]
        cut = spans[self.keep_chunks - 1][1] if self.keep_chunks else spans[0][0]
        ciphertext = delivery.ciphertext[:cut]
        if self.refill is not None:
            ciphertext += self.refill[cut : len(delivery.ciphertext)]
        return [(member, dataclasses.replace(delivery, ciphertext=ciphertext))]


class Inject(Behaviour):
    """Push given items to a member when it connects, before anything honest: deliveries
    recorded earlier, made under an old arrangement version, or crafted by the test."""

    def __init__(self, items: dict[str, list[Delivery | Message]], *, every_time: bool = False):
        self.items = items
        self.every_time = every_time

    async def on_connect(self, member: str) -> list[Outgoing]:
        """Push ``member``'s items on its first connection (on each with ``every_time``)."""
        items = self.items.get(member, [])
        if not self.every_time:
            self.items[member] = []
        return [(member, item) for item in items]


class Equivocate(Behaviour):
    """Show ``member`` an audit history of the relay's choosing, signed by the relay.

    ``histories`` maps a member to the entries it should see; every extract it fetches
    is built from that fake log (internally consistent, checkpoint signed by the real
    relay key), while the others see the real log. Set ``enabled`` to False to switch a
    member back to the real history.
    """

    def __init__(self, histories: dict[str, list[AuditEntry]]) -> None:
        self.histories = histories
        self.enabled = True

    async def on_send(self, member: str, message: Message) -> list[Outgoing]:
        """Replace an audit reply to a member of ``histories`` with one from its fake log.

        While ``enabled``, the fake extract starts at the point the member asked from and
        ends in a checkpoint signed now with the relay's key; every other message passes on.
        """
        if not (self.enabled and isinstance(message, AuditReply) and member in self.histories):
            return [(member, message)]
        real = Extract.decode(message.extract)
        entries = self.histories[member]
        pairs = [(e, e.content_hash) for e in entries if e.seq > real.start_seq]
        # The fake chain from the point the member asked from: what it was shown before
        # came from the same fake log, so its start is the fake head at that point.
        start_head = _fake_head(entries, real.start_seq)
        head = start_head
        for _, content in pairs:
            head = chain_next(head, content)
        checkpoint = Checkpoint.issue(
            self.relay.secret,
            self.relay.arrangement,
            seq=real.start_seq + len(pairs),
            head=head,
            time=self.relay.now(),
        )
        fake = Extract.build(
            pairs,
            member,
            start_seq=real.start_seq,
            start_head=start_head,
            checkpoint=checkpoint.encoded,
        )
        return [(member, AuditReply(extract=fake.encode()))]


def _fake_head(entries: list[AuditEntry], upto: int) -> bytes:
    head = bytes(32)
    for entry in entries:
        if entry.seq > upto:
            break
        head = chain_next(head, entry.content_hash)
    return head


# --- running it ------------------------------------------------------------------------


async def start_hostile_relay(
    nursery: trio.Nursery,
    world: World,
    store_path: str | os.PathLike[str],
    behaviour: Behaviour | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    clock: Callable[[], float] | None = None,
    **kwargs: Any,
) -> tuple[HostileRelay, int]:
    """Start a :class:`HostileRelay` for ``world`` on 127.0.0.1, port 0.

    Returns:
        (the relay, its port). It runs until ``nursery`` is cancelled.
    """
    relay = HostileRelay(
        world.secrets[world.relay],
        world.arrangement,
        store_path,
        behaviour=behaviour,
        limits=limits,
        clock=clock or (lambda: float(world.now)),
        expiry_interval=kwargs.pop("expiry_interval", 0.05),
        **kwargs,
    )

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await relay.serve_tcp(task_status=task_status)
        finally:
            relay.close()

    port: int = await nursery.start(run)
    return relay, port


def open_member(
    world: World,
    name: str,
    port: int,
    store_path: str | os.PathLike[str],
    **kwargs: Any,
) -> contextlib.AbstractAsyncContextManager[Node]:
    """A member node of ``world`` connected to the relay on ``port`` (fast reconnects,
    the world's clock unless ``clock`` is given)."""
    kwargs.setdefault("backoff", FAST_BACKOFF)
    kwargs.setdefault("clock", lambda: float(world.now))
    return open_node(
        world.secrets[name],
        name,
        world.arrangement,
        ("127.0.0.1", port),
        store_path,
        **kwargs,
    )
