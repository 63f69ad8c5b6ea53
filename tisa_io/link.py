"""The trio side of a member-relay link, used by both ends.

A :class:`Link` is an authenticated, encrypted connection after the handshake: it
moves :mod:`tisa.messages` values, each sealed with the handshake's
:class:`~tisa.handshake.SecureChannel` and sent as one :mod:`tisa.frames` frame. Frames
are sealed and queued together, so they go out in the order sealed; one task at a time
writes whatever is queued, so concurrent senders share writes (one system call and one
trip through the scheduler for many frames: the main cost per frame in trio, before
this). :meth:`Link.send_many` sends several messages with nothing between them (a
small ``deliver`` stream in one call); :meth:`Link.sending` holds the send lock across
a whole large stream (``submit``/``deliver``, the chunks, the end), as the session
protocol requires (see ``docs/node-protocol.md``). A received frame already buffered
is returned without a trip through the scheduler.

:func:`connect_member` (member side) and :func:`accept_member` (relay side) run the
handshake on a :class:`trio.abc.Stream` under ``limits.handshake_timeout`` and return the
link. Every failure surfaces as a :mod:`tisa.errors` exception:

* :class:`LinkClosed`: the peer closed the stream, reset it, or ended the channel.
* :class:`LinkTimeout` (a :class:`~tisa.errors.ProtocolError`): the handshake or a
  frame did not finish within its deadline.
* :class:`~tisa.errors.ProtocolError` / :class:`~tisa.errors.LimitExceeded`: bad
  framing or a malformed message.
* :class:`~tisa.errors.VerificationError`: a signature or a sealed frame did not check.
* :class:`~tisa.errors.Refused`: the relay refused the handshake (member side), or the
  relay refused the member (relay side, after it sent the ``error`` frame).
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable

import trio

from tisa.arrangement import Arrangement
from tisa.errors import (
    LimitExceeded,
    ProtocolError,
    Reason,
    Refused,
    RemoteError,
    TisaError,
    UsageError,
    VerificationError,
)
from tisa.frames import FRAME_HEADER_SIZE, NEED_DATA, FrameDecoder, encode_frame
from tisa.handshake import (
    MAX_HANDSHAKE_MESSAGE,
    STREAM_OVERHEAD,
    MemberHandshake,
    RelayHandshake,
    SecureChannel,
    encode_error,
)
from tisa.keys import MemberSecret
from tisa.limits import DEFAULT_LIMITS, Limits
from tisa.messages import ErrorMessage, Message, decode_message, encode_message
from tisa_io import trace

__all__ = [
    "Link",
    "LinkClosed",
    "LinkTimeout",
    "accept_member",
    "connect_member",
    "keep_alive",
    "linger",
]

# Bytes asked of the stream per read. Large enough that a 64 KiB chunk frame arrives in
# a few reads, small enough that a connection never buffers much beyond one frame.
RECEIVE_SIZE = 64 * 1024

# Seconds :meth:`Link.aclose` waits to send the channel's final message before it
# closes the stream anyway: a peer that does not read must not hold up a close.
CLOSE_GRACE = 1.0

# Seconds the relay waits to hand a refused peer its plaintext error frame.
ERROR_GRACE = 1.0

# After its last frame, a closing side half-closes and reads (and drops) what the peer
# still sends, for at most this long and this many bytes. Closing a TCP socket with
# unread data makes the kernel send a reset, which can destroy the last frame (an
# error with its reason code) before the peer reads it.
LINGER = 1.0
MAX_LINGER_BYTES = 1024 * 1024

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
_FRAME_LENGTH = struct.Struct(">I")


class LinkClosed(RemoteError):
    """The peer closed or reset the connection, or ended the encrypted channel."""


class LinkTimeout(ProtocolError):
    """The peer did not finish the handshake or a frame within its deadline.

    ``reason`` is :attr:`tisa.errors.Reason.TIMEOUT`, for an ``error`` message.
    """

    reason = Reason.TIMEOUT


class Link:
    """An established, encrypted link to the peer. Made by :func:`connect_member` or
    :func:`accept_member`, not constructed directly.

    Sending and receiving may happen in different tasks at the same time; each direction
    has its own lock, so concurrent senders queue rather than interleave frames.

    Attributes:
        peer: the peer's name in the arrangement (the member, for the relay; the relay,
            for a member).
    """

    __slots__ = (
        "_broken",
        "_channel",
        "_closed",
        "_decoder",
        "_flushing",
        "_frame_deadline",
        "_limits",
        "_out",
        "_queued",
        "_receive_lock",
        "_send_lock",
        "_send_owner",
        "_sent",
        "_stream",
        "_writes",
        "_written",
        "peer",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        channel: SecureChannel,
        peer: str,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._stream = stream
        self._channel = channel
        self.peer = peer
        self._limits = limits
        self._decoder = FrameDecoder(max_frame=limits.max_frame)
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._send_owner: trio.lowlevel.Task | None = None
        self._out: list[bytes] = []  # sealed frames (prefix, body) not yet written
        self._queued = 0  # frames queued since the start
        self._sent = 0  # frames written since the start
        self._flushing = False  # a task is writing
        self._written = trio.lowlevel.ParkingLot()  # senders waiting for a write
        self._writes = 0  # writes (send_all calls) since the start
        self._frame_deadline: float | None = None
        self._broken = False
        self._closed = False

    @property
    def stream(self) -> trio.abc.Stream:
        """The underlying transport stream (for addresses and socket options)."""
        return self._stream

    @property
    def frames_sent(self) -> int:
        """Frames written to the stream since the link was made."""
        return self._sent

    @property
    def writes(self) -> int:
        """Writes made to the stream since the link was made (each one ``send_all`` and,
        on a socket, usually one system call): at most :attr:`frames_sent`, fewer when
        frames share writes."""
        return self._writes

    # --- sending ---------------------------------------------------------------------
    #
    # Frames are sealed in the order they are queued (the channel is a stream cipher),
    # so sealing and queueing happen together, with no checkpoint between. One task at
    # a time writes (the "flusher"). Before its first write it lets every other task
    # that is ready run once (one pass of the scheduler), so whatever they send in this
    # pass joins the same write: an answer and a push caused by the same incoming
    # frames go out together (one flush per loop pass, not one per message). Then
    # everything queued goes out in one send_all. Tasks that queued meanwhile park
    # until a later write covers their frame; when the flusher's own frame is out, a
    # parked task takes over, so no caller waits for frames queued after its own.
    # Under load many frames share one system call and one trip through the scheduler.

    async def send(self, message: Message) -> None:
        """Seal ``message`` and send it as one frame.

        Concurrent senders never interleave frames; their frames may share one write.
        Inside :meth:`sending` (same task) other tasks' frames wait until the block exits.

        Raises:
            LinkClosed: the stream is closed or broken, or a send was cancelled earlier.
            LinkTimeout: the peer did not take the frame within ``limits.frame_timeout``
                (the link is then broken).
            UsageError: ``message`` is not a :class:`~tisa.messages.Message`.

        Cancellation: if cancelled, the message may have been partly written, or may
        still be written later (it is queued, in order); if a write was cut short the
        link is broken (the peer's channel position is unknown) and every later send
        raises :class:`LinkClosed`. Close the link.
        """
        await self.send_many((message,))

    async def send_many(self, messages: Iterable[Message]) -> None:
        """Seal and send several messages, in order, in one write when possible.

        No other task's frame comes between them, so a whole small stream (``deliver``,
        its chunk, ``deliver_end``) can go in one call without :meth:`sending`.
        Raises and cancels as :meth:`send`; if one message cannot be encoded
        (:class:`~tisa.errors.UsageError`), none of them is sent.
        """
        task = trio.lowlevel.current_task()
        while self._send_owner is not None and self._send_owner is not task:
            # Another task is sending a stream: nothing may come between its frames.
            async with self._send_lock:
                pass
        ticket = self._queue_frames(messages)
        await self._flush(ticket)

    @contextlib.asynccontextmanager
    async def sending(self) -> AsyncIterator[Link]:
        """Hold the send lock across several :meth:`send` calls of this task.

        Usage::

            async with link.sending():
                await link.send(Deliver(token=...))
                for piece in chunks:
                    await link.send(Chunk(data=piece))
                await link.send(DeliverEnd(token=...))

        Other tasks' sends wait until the block exits, so nothing comes between a
        stream's begin and end.
        """
        async with self._send_lock:
            self._send_owner = trio.lowlevel.current_task()
            try:
                yield self
            finally:
                self._send_owner = None

    def _queue_frames(self, messages: Iterable[Message]) -> int:
        # Synchronous: seal and queue with no checkpoint, so the order on the wire is
        # the order of sealing. Returns the ticket of the last frame.
        if self._broken or self._closed:
            raise LinkClosed("the link is closed")
        plaintexts = []
        room = self._limits.max_frame - STREAM_OVERHEAD
        for message in messages:
            if not isinstance(message, Message):
                raise UsageError("send takes a tisa.messages.Message")
            plaintext = encode_message(message)
            if len(plaintext) > room:
                # Checked before sealing: a sealed frame that is not sent would leave
                # the peer's channel position behind ours.
                raise UsageError(f"a {message.TYPE} message of {len(plaintext)} bytes")
            plaintexts.append(plaintext)
            if trace.enabled:
                trace.count("out:" + message.TYPE)
        if self._channel.closed or self._channel.failed:
            raise LinkClosed("the channel is closed")
        seal = self._channel.seal
        for plaintext in plaintexts:
            sealed = seal(plaintext)
            self._out.append(_FRAME_LENGTH.pack(len(sealed)))
            self._out.append(sealed)
        self._queued += len(plaintexts)
        return self._queued

    async def _flush(self, ticket: int) -> None:
        while self._sent < ticket:
            if self._broken or self._closed:
                raise LinkClosed("the link is closed")
            if self._flushing:
                await self._written.park()
                continue
            await self._write_queued()

    async def _write_queued(self) -> None:
        self._flushing = True
        try:
            # One pass of the scheduler first (see above). Shielded: the frames are
            # sealed and queued already, so this wait must not be where a
            # cancellation leaves them unwritten; the write below still sees it.
            await trio.lowlevel.cancel_shielded_checkpoint()
            while self._out:
                data = b"".join(self._out)
                upto = self._queued
                self._out.clear()
                # A peer that stops reading must not hold this task forever: each write
                # gets the same deadline as an incoming frame.
                with trio.move_on_after(self._limits.frame_timeout) as deadline:
                    self._writes += 1
                    await self._stream.send_all(data)
                if deadline.cancelled_caught:
                    raise LinkTimeout("the peer did not take a frame within the frame deadline")
                self._sent = upto
                if self._written:
                    break  # a parked sender takes over the rest
        except BaseException as exc:
            # A cancelled, failed or timed-out write leaves the peer's secretstream
            # position unknown: nothing more can be sent on this link.
            self._broken = True
            if isinstance(exc, _STREAM_ERRORS):
                raise LinkClosed(f"connection lost while sending: {exc}") from None
            raise
        finally:
            self._flushing = False
            self._written.unpark_all()

    # --- receiving -------------------------------------------------------------------

    async def receive(self) -> Message:
        """Wait for the next message from the peer.

        No deadline applies while the link is idle between frames (the caller sets its
        own idle timeout); once the first byte of a frame is in, the frame must be
        complete within ``limits.frame_timeout``.

        Returns:
            The decoded message.

        Raises:
            LinkClosed: end of stream, or the peer ended the channel.
            LinkTimeout: a frame started but was not finished in time.
            ProtocolError: bad framing (``LimitExceeded`` for an oversized length
                prefix) or a malformed message.
            VerificationError: a frame did not open on the channel.

        Cancellation: a cancelled call loses nothing; bytes already read stay buffered
        for the next call (the frame deadline keeps running).
        """
        if not self._receive_lock.locked():
            # Fast path: a whole frame is already buffered (several usually arrive in
            # one read under load), so no lock and no trip through the scheduler.
            frame = self._decoder.next_frame()
            if frame is not NEED_DATA:
                self._frame_deadline = None
                return self._open(frame)
        async with self._receive_lock:
            return self._open(await self._next_frame())

    def receive_nowait(self) -> Message:
        """The next message if a whole frame of it is already buffered.

        A reader loop calls this first and :meth:`receive` (under its idle timeout) only
        when it raises :class:`trio.WouldBlock`: under load most frames arrive several
        to a read, and neither the wait nor its timeout is needed for them.

        Raises:
            trio.WouldBlock: no whole frame is buffered (or another task is receiving).
            The rest as :meth:`receive`.
        """
        if self._receive_lock.locked():
            raise trio.WouldBlock
        frame = self._decoder.next_frame()
        if frame is NEED_DATA:
            if self._decoder.eof:
                raise LinkClosed("the peer closed the connection")
            raise trio.WouldBlock
        self._frame_deadline = None
        return self._open(frame)

    def _open(self, payload: bytes) -> Message:
        plaintext = self._channel.open(payload)
        if self._channel.peer_closed:
            raise LinkClosed("the peer closed the channel")
        message = decode_message(plaintext, max_size=self._limits.max_frame)
        if trace.enabled:
            trace.count("in:" + message.TYPE)
        return message

    async def _next_frame(self) -> bytes:
        decoder = self._decoder
        while True:
            frame = decoder.next_frame()
            if frame is not NEED_DATA:
                self._frame_deadline = None
                return frame
            if decoder.eof:
                raise LinkClosed("the peer closed the connection")
            data: bytes | None = None
            if decoder.at_frame_boundary:
                self._frame_deadline = None
                data = await self._read()
            else:
                if self._frame_deadline is None:
                    self._frame_deadline = trio.current_time() + self._limits.frame_timeout
                with trio.move_on_at(self._frame_deadline):
                    data = await self._read()
                if data is None:
                    raise LinkTimeout("frame not finished within the frame deadline")
            decoder.receive_data(data)

    async def _read(self) -> bytes:
        try:
            data = await self._stream.receive_some(RECEIVE_SIZE)
        except _STREAM_ERRORS as exc:
            raise LinkClosed(f"connection lost while receiving: {exc}") from None
        # Socket streams return bytes already; only other streams pay for the copy.
        return data if isinstance(data, bytes) else bytes(data)

    # --- closing ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """End the channel (best effort, within :data:`CLOSE_GRACE`) and close the stream.

        Idempotent. Cancellation: the stream is closed anyway (forcefully), and the
        peer may not have seen the channel's final message.
        """
        if self._closed:
            return
        try:
            if not (self._broken or self._channel.closed or self._channel.failed):
                with trio.move_on_after(CLOSE_GRACE):
                    async with self.sending():
                        if not (self._broken or self._channel.closed):
                            final = self._channel.close()
                            self._out += [_FRAME_LENGTH.pack(len(final)), final]
                            self._queued += 1
                            await self._flush(self._queued)
                            await linger(self._stream)
        except (*_STREAM_ERRORS, UsageError, LinkClosed, LinkTimeout):
            pass
        finally:
            self._closed = True
            await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> Link:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Link peer={self.peer!r} closed={self._closed}>"


# --- handshake -----------------------------------------------------------------------


def keep_alive(stream: trio.abc.Stream, limits: Limits = DEFAULT_LIMITS) -> bool:
    """Turn on TCP keepalive on ``stream`` as ``limits`` says, when it is a TCP socket.

    The kernel then probes a silent peer after ``keepalive_idle`` seconds and every
    ``keepalive_interval`` after that, and resets the connection after
    ``keepalive_probes`` unanswered probes; where the platform has ``TCP_USER_TIMEOUT``
    (Linux), data the peer's TCP has not acknowledged for the same total time ends the
    connection too (keepalive alone stays silent while data waits). Either way the next
    read or write on the link fails, and the connection is closed.
    :func:`connect_member` and :func:`accept_member` call it once the handshake is done.

    Returns:
        Whether the options were set (False for other streams, or a socket that was
        already closed).
    """
    if not isinstance(stream, trio.SocketStream):
        return False
    idle = max(1, math.ceil(limits.keepalive_idle))
    interval = max(1, math.ceil(limits.keepalive_interval))
    probes = max(1, math.ceil(limits.keepalive_probes))
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", probes),
        ("TCP_USER_TIMEOUT", (idle + interval * probes) * 1000),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    try:
        for level, option, value in options:
            stream.setsockopt(level, option, value)
    except OSError:
        return False
    return True


async def _receive_exactly(stream: trio.abc.Stream, size: int) -> bytes:
    # Exact reads, so nothing past the handshake is consumed here: the link's decoder
    # starts on the first sealed frame.
    out = bytearray()
    while len(out) < size:
        try:
            data = await stream.receive_some(size - len(out))
        except _STREAM_ERRORS as exc:
            raise LinkClosed(f"connection lost during the handshake: {exc}") from None
        if not data:
            raise LinkClosed("the peer closed the connection during the handshake")
        out += data
    return bytes(out)


async def _receive_handshake_frame(stream: trio.abc.Stream) -> bytes:
    header = await _receive_exactly(stream, FRAME_HEADER_SIZE)
    size = int.from_bytes(header, "big")
    if size > MAX_HANDSHAKE_MESSAGE:
        # As for channel frames (docs/protocol.md section 13.1): refused `limit` from the
        # length prefix alone, before any of the payload is read.
        raise LimitExceeded("handshake frame", size, MAX_HANDSHAKE_MESSAGE)
    if size == 0:
        raise ProtocolError("empty handshake frame")
    return await _receive_exactly(stream, size)


async def _send_raw(stream: trio.abc.Stream, payload: bytes) -> None:
    try:
        await stream.send_all(encode_frame(payload))
    except _STREAM_ERRORS as exc:
        raise LinkClosed(f"connection lost during the handshake: {exc}") from None


async def connect_member(
    stream: trio.abc.Stream,
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Link:
    """Run the member's side of the handshake on ``stream``.

    Args:
        stream: a connected stream to the relay; the link owns it from now on.
        secret: this member's keys.
        name: this member's name in ``arrangement``.
        arrangement: the effective arrangement.
        limits: ``handshake_timeout`` bounds the whole handshake; ``max_frame`` and
            ``frame_timeout`` apply to the link; the ``keepalive_*`` fields to a TCP
            stream (:func:`keep_alive`).

    Returns:
        The link, with ``peer`` the relay's name.

    Raises:
        Refused: the relay refused us (its reason: ``not_a_member``,
            ``wrong_arrangement``, ``busy``, ...) or named another relay.
        VerificationError: the relay's signature did not check.
        LinkTimeout: the handshake took longer than ``limits.handshake_timeout``.
        LinkClosed: the connection closed during the handshake.
        ProtocolError: the relay sent something malformed.
        UsageError: ``name`` or ``secret`` does not fit ``arrangement`` (before any I/O).

    On any failure the stream is closed. Cancellation: the stream is closed; the relay
    may have seen part of the handshake.
    """
    handshake = MemberHandshake(secret, name, arrangement)
    try:
        with trio.fail_after(limits.handshake_timeout):
            await _send_raw(stream, handshake.start())
            finish = handshake.receive(await _receive_handshake_frame(stream))
            await _send_raw(stream, finish)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise LinkTimeout("handshake not finished within the handshake deadline") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    keep_alive(stream, limits)
    return Link(stream, handshake.channel, arrangement.relay, limits=limits)


async def accept_member(
    stream: trio.abc.Stream,
    secret: MemberSecret,
    arrangement: Arrangement,
    *,
    limits: Limits = DEFAULT_LIMITS,
    admit: Callable[[str], None] | None = None,
) -> Link:
    """Run the relay's side of the handshake on ``stream``.

    Args:
        stream: an accepted connection; the link owns it from now on.
        secret: the relay's keys.
        arrangement: the effective arrangement this relay serves.
        limits: ``handshake_timeout`` bounds the whole handshake; the ``keepalive_*``
            fields apply to a TCP stream (:func:`keep_alive`).
        admit: called with the member's authenticated name once its ``finish`` checked;
            it may raise :class:`~tisa.errors.Refused` (e.g. ``busy``), answered with an
            ``error`` message on the new channel before the stream is closed. The relay
            uses it for per-member connection caps; when it raised, nothing was recorded.

    Returns:
        The link, with ``peer`` the authenticated member's name.

    Raises:
        Refused: the member was refused (``not_a_member``, ``wrong_arrangement``,
            ``wrong_role`` or whatever ``admit`` raised); the plaintext ``error`` frame
            was sent (within :data:`ERROR_GRACE`) and the stream closed.
        VerificationError: the member's ``finish`` signature did not check.
        LinkTimeout: the handshake took longer than ``limits.handshake_timeout``.
        LinkClosed: the connection closed during the handshake.
        LimitExceeded: the ``hello`` frame's length prefix is above
            ``MAX_HANDSHAKE_MESSAGE`` (answered ``limit``), or the ``finish`` one's.
        ProtocolError: malformed handshake input (answered ``malformed`` when it was
            the ``hello``).
        UsageError: ``secret`` is not the relay's key in ``arrangement`` (found once
            a ``hello`` came).

    On any failure the stream is closed. Cancellation: the stream is closed.
    """
    try:
        with trio.fail_after(limits.handshake_timeout):
            try:
                hello = await _receive_handshake_frame(stream)
                # Made only now: a connection that never says hello (a flood of idle
                # ones) costs no ephemeral key pair.
                handshake = RelayHandshake(secret, arrangement)
                welcome = handshake.receive(hello)
                if welcome is None:  # pragma: no cover - the state machine forbids it
                    raise ProtocolError("handshake finished early")
            except Refused as exc:
                await _refuse(stream, exc.reason, exc.detail)
                raise
            except LimitExceeded as exc:
                await _refuse(stream, Reason.LIMIT, exc.detail)
                raise
            except ProtocolError as exc:
                await _refuse(stream, Reason.MALFORMED, exc.detail)
                raise
            await _send_raw(stream, welcome)
            handshake.receive(await _receive_handshake_frame(stream))
            if admit is not None:
                # Only now is the name authenticated: counting a claimed name would let
                # anyone hold a member's connection slots with half-open handshakes.
                try:
                    admit(handshake.peer)
                except Refused as exc:
                    link = Link(stream, handshake.channel, handshake.peer, limits=limits)
                    with trio.move_on_after(ERROR_GRACE), contextlib.suppress(TisaError):
                        await link.send(ErrorMessage(reason=exc.reason.value, detail=exc.detail))
                    raise
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise LinkTimeout("handshake not finished within the handshake deadline") from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    keep_alive(stream, limits)
    return Link(stream, handshake.channel, handshake.peer, limits=limits)


async def _refuse(stream: trio.abc.Stream, reason: Reason, detail: str) -> None:
    with trio.move_on_after(ERROR_GRACE), contextlib.suppress(LinkClosed):
        await _send_raw(stream, encode_error(reason, detail))
        await linger(stream)


async def linger(stream: trio.abc.Stream) -> None:
    """Half-close ``stream`` and drain it, so the last frame sent is not lost to a reset
    (see :data:`LINGER`). Never raises but trio.Cancelled; the caller closes the stream."""
    with trio.move_on_after(LINGER), contextlib.suppress(*_STREAM_ERRORS):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        drained = 0
        while drained < MAX_LINGER_BYTES:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                break
            drained += len(data)


# Re-exported for callers that catch everything a link can raise in one clause.
LINK_ERRORS = (LinkClosed, ProtocolError, VerificationError, Refused)
