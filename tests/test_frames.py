"""Frames: encoding, and the decoder fed whole, byte by byte, with trailing data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tisa.errors import LimitExceeded, ProtocolError, UsageError
from tisa.frames import MAX_FRAME_LIMIT, NEED_DATA, FrameDecoder, encode_frame
from tisa.limits import MAX_FRAME

PAYLOADS = [b"a", b"hello", bytes(range(256)) * 3]


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        frames.append(frame)
    return frames


def test_encode_frame_layout() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 256)[:4] == b"\x00\x00\x01\x00"


def test_encode_frame_refuses_empty_and_oversized() -> None:
    with pytest.raises(UsageError):
        encode_frame(b"")
    with pytest.raises(UsageError):
        encode_frame(b"x" * 11, max_frame=10)
    with pytest.raises(UsageError):
        encode_frame(b"x" * (MAX_FRAME + 1))
    assert len(encode_frame(b"x" * MAX_FRAME)) == MAX_FRAME + 4
    with pytest.raises(UsageError):
        encode_frame("text")  # type: ignore[arg-type]


@pytest.mark.parametrize("max_frame", [0, -1, MAX_FRAME_LIMIT + 1, True, 1.5])
def test_max_frame_must_be_sane(max_frame: object) -> None:
    with pytest.raises(UsageError):
        FrameDecoder(max_frame=max_frame)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        encode_frame(b"x", max_frame=max_frame)  # type: ignore[arg-type]


def test_whole() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(encode_frame(p) for p in PAYLOADS))
    assert drain(decoder) == PAYLOADS
    assert decoder.pending == 0
    assert decoder.at_frame_boundary


def test_one_byte_at_a_time() -> None:
    stream = b"".join(encode_frame(p) for p in PAYLOADS)
    decoder = FrameDecoder()
    frames: list[bytes] = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        frames.extend(drain(decoder))
        assert decoder.pending == i + 1 - sum(len(f) + 4 for f in frames)
    assert frames == PAYLOADS
    assert decoder.at_frame_boundary


def test_pending_and_boundary_track_partial_frames() -> None:
    decoder = FrameDecoder()
    assert decoder.at_frame_boundary and decoder.pending == 0
    frame = encode_frame(b"hello")
    decoder.receive_data(frame[:2])
    assert decoder.next_frame() is NEED_DATA
    assert decoder.pending == 2 and not decoder.at_frame_boundary
    decoder.receive_data(frame[2:6])
    assert decoder.next_frame() is NEED_DATA
    assert decoder.pending == 6
    decoder.receive_data(frame[6:])
    assert decoder.next_frame() == b"hello"
    assert decoder.pending == 0 and decoder.at_frame_boundary


def test_trailing_data_stays_buffered() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"one") + encode_frame(b"two")[:5])
    assert decoder.next_frame() == b"one"
    assert decoder.next_frame() is NEED_DATA
    assert decoder.pending == 5
    decoder.receive_data(b"wo")
    assert decoder.next_frame() == b"two"
    assert decoder.next_frame() is NEED_DATA


def test_oversized_prefix_refused_before_body() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.receive_data((101).to_bytes(4, "big"))  # the prefix alone, no body
    with pytest.raises(LimitExceeded) as info:
        decoder.next_frame()
    assert (info.value.limit, info.value.value, info.value.maximum) == ("frame", 101, 100)
    # The decoder is dead: it cannot find the next frame boundary any more.
    with pytest.raises(LimitExceeded):
        decoder.next_frame()


def test_default_limit_is_max_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.max_frame == MAX_FRAME
    decoder.receive_data((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(LimitExceeded):
        decoder.next_frame()
    decoder = FrameDecoder()
    decoder.receive_data((0xFFFFFFFF).to_bytes(4, "big"))
    with pytest.raises(LimitExceeded):
        decoder.next_frame()


def test_frame_of_exactly_max_frame_passes() -> None:
    decoder = FrameDecoder(max_frame=10)
    decoder.receive_data(encode_frame(b"x" * 10, max_frame=10))
    assert decoder.next_frame() == b"x" * 10


def test_empty_frame_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="empty frame"):
        decoder.next_frame()


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 8])
def test_eof_inside_a_frame(cut: int) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"hello")[:cut])
    decoder.receive_data(b"")
    with pytest.raises(ProtocolError, match="truncated frame"):
        decoder.next_frame()


def test_eof_at_boundary_is_clean() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"last"))
    decoder.receive_data(b"")
    decoder.receive_data(b"")  # repeated EOF is harmless
    assert decoder.eof
    assert decoder.next_frame() == b"last"
    assert decoder.next_frame() is NEED_DATA
    assert decoder.next_frame() is NEED_DATA


def test_data_after_eof_is_a_usage_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(UsageError):
        decoder.receive_data(b"x")


def test_receive_data_needs_bytes() -> None:
    decoder = FrameDecoder()
    with pytest.raises(UsageError):
        decoder.receive_data("text")  # type: ignore[arg-type]
    decoder.receive_data(bytearray(encode_frame(b"a")))
    decoder.receive_data(memoryview(encode_frame(b"b")))
    assert drain(decoder) == [b"a", b"b"]


def test_many_large_frames_in_linear_time() -> None:
    # 32 MiB in 64 KiB frames, fed as one block and then in odd-sized pieces; quadratic
    # buffer handling would take minutes here.
    payload = bytes(range(256)) * 256
    count = 512
    stream = encode_frame(payload) * count
    decoder = FrameDecoder()
    decoder.receive_data(stream)
    assert sum(1 for _ in drain(decoder)) == count
    decoder = FrameDecoder()
    seen = 0
    piece = 100_003
    for start in range(0, len(stream), piece):
        decoder.receive_data(stream[start : start + piece])
        for frame in drain(decoder):
            assert frame == payload
            seen += 1
    assert seen == count and decoder.at_frame_boundary


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.data())
def test_roundtrip_any_split(payloads: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    frames: list[bytes] = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        if cut > previous:  # an empty piece would mean end of stream
            decoder.receive_data(stream[previous:cut])
        previous = cut
        frames.extend(drain(decoder))
    assert frames == payloads
    assert decoder.at_frame_boundary


@given(st.binary(max_size=200), st.integers(1, 64))
def test_any_bytes_decode_or_raise_protocol_error(stream: bytes, max_frame: int) -> None:
    decoder = FrameDecoder(max_frame=max_frame)
    decoder.receive_data(stream)
    decoder.receive_data(b"")
    total = 0
    try:
        for frame in drain(decoder):
            assert 1 <= len(frame) <= max_frame
            total += len(frame) + 4
    except ProtocolError:
        return
    # No error: the stream was exactly a sequence of frames.
    assert total == len(stream)
