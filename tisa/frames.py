"""Length-prefixed frames, with no I/O.

A frame is a 4-byte big-endian unsigned length followed by that many bytes of payload.
The length counts the payload only and is never zero: an empty frame carries nothing, so
a peer that sends one is confused or probing.

:class:`FrameDecoder` follows h11: the caller feeds whatever bytes arrived with
:meth:`~FrameDecoder.receive_data` (``b""`` for end of stream) and pulls complete frames
with :meth:`~FrameDecoder.next_frame` until it returns :data:`NEED_DATA`. The decoder
refuses an oversized frame as soon as its length prefix is in, before any of the body is
buffered, so a peer cannot make a node hold more than ``max_frame`` bytes of one frame.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

from tisa.errors import LimitExceeded, ProtocolError, UsageError
from tisa.limits import MAX_FRAME

__all__ = [
    "FRAME_HEADER_SIZE",
    "MAX_FRAME_LIMIT",
    "NEED_DATA",
    "FrameDecoder",
    "NeedData",
    "encode_frame",
]

FRAME_HEADER_SIZE = 4

# The largest length a 4-byte prefix can express; no configuration may exceed it.
MAX_FRAME_LIMIT = 2**32 - 1


class _Sentinel(enum.Enum):
    # An enum member rather than a bare object() so that ``frame is NEED_DATA`` narrows
    # the type for mypy, as h11's sentinel classes do for its users.
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by :meth:`FrameDecoder.next_frame` when no complete frame is buffered."""

NeedData = Literal[_Sentinel.NEED_DATA]
"""The type of :data:`NEED_DATA`, for annotations."""


def _check_max_frame(max_frame: int) -> int:
    if isinstance(max_frame, bool) or not isinstance(max_frame, int):
        raise UsageError("max_frame must be an integer")
    if not 1 <= max_frame <= MAX_FRAME_LIMIT:
        raise UsageError(f"max_frame must be in 1..{MAX_FRAME_LIMIT}")
    return max_frame


def encode_frame(payload: bytes | bytearray | memoryview, *, max_frame: int = MAX_FRAME) -> bytes:
    """Prefix ``payload`` with its length.

    Args:
        payload: the frame body, 1..``max_frame`` bytes.
        max_frame: the largest payload allowed; the peer's decoder should use the same.

    Returns:
        The frame, ready to write to the stream.

    Raises:
        UsageError: ``payload`` is not bytes, is empty, or is larger than ``max_frame``
            (sending it would only make the peer drop the connection).
    """
    _check_max_frame(max_frame)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise UsageError("a frame payload must be bytes")
    size = len(payload)
    if size == 0:
        raise UsageError("a frame payload cannot be empty")
    if size > max_frame:
        raise UsageError(f"frame payload of {size} bytes exceeds max_frame {max_frame}")
    return size.to_bytes(FRAME_HEADER_SIZE, "big") + bytes(payload)


class FrameDecoder:
    """Incremental frame decoder over a byte stream.

    Once it has raised, the decoder is dead: every later :meth:`next_frame` raises the
    same error, since the stream can no longer be split into frames reliably.

    Args:
        max_frame: the largest payload accepted, checked from the length prefix.

    Raises:
        UsageError: ``max_frame`` is not in 1..2**32-1.
    """

    __slots__ = ("_buffer", "_eof", "_error", "_max_frame")

    def __init__(self, *, max_frame: int = MAX_FRAME) -> None:
        self._max_frame = _check_max_frame(max_frame)
        # bytearray: appending is amortised O(1) and deleting a prefix only moves a start
        # offset in CPython, so a long stream of large frames costs linear time overall.
        self._buffer = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def max_frame(self) -> int:
        """The largest payload this decoder accepts."""
        return self._max_frame

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    @property
    def at_frame_boundary(self) -> bool:
        """True when no byte of an unfinished frame is buffered.

        Checked after :meth:`next_frame` returned :data:`NEED_DATA`, it tells a node
        whether the peer is in the middle of a frame (and so whether a per-frame
        deadline applies).
        """
        return not self._buffer

    @property
    def eof(self) -> bool:
        """True once end of stream was fed in. When :meth:`next_frame` then returns
        :data:`NEED_DATA`, every frame has been returned and none will follow."""
        return self._eof

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes that arrived from the peer.

        Args:
            data: the bytes, possibly empty; ``b""`` means the peer closed the stream
                (it may be fed more than once).

        Raises:
            UsageError: ``data`` is not bytes, or is non-empty after end of stream.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("receive_data takes bytes")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise UsageError("data received after end of stream")
        self._buffer += data

    def next_frame(self) -> bytes | NeedData:
        """Return the next complete frame's payload, or :data:`NEED_DATA`.

        Returns:
            The payload, or :data:`NEED_DATA` if the buffer holds no complete frame.

        Raises:
            LimitExceeded: a length prefix above ``max_frame`` (raised as soon as the
                prefix is in, before the body arrives).
            ProtocolError: a zero-length frame, or end of stream inside a frame.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_frame()
        except ProtocolError as exc:
            self._error = exc
            raise

    def _next_frame(self) -> bytes | NeedData:
        buffer = self._buffer
        if len(buffer) < FRAME_HEADER_SIZE:
            if buffer and self._eof:
                raise ProtocolError("truncated frame")
            return NEED_DATA
        size = int.from_bytes(buffer[:FRAME_HEADER_SIZE], "big")
        if size > self._max_frame:
            raise LimitExceeded("frame", size, self._max_frame)
        if size == 0:
            raise ProtocolError("empty frame")
        end = FRAME_HEADER_SIZE + size
        if len(buffer) < end:
            if self._eof:
                raise ProtocolError("truncated frame")
            return NEED_DATA
        # Copy the payload once, through a view; the view must be released before the
        # buffer is resized, hence the with-block.
        with memoryview(buffer) as view:
            payload = bytes(view[FRAME_HEADER_SIZE:end])
        del buffer[:end]
        return payload

    def __repr__(self) -> str:
        return f"<FrameDecoder pending={self.pending} eof={self._eof}>"
