"""Sealed reports: round trips, streaming, padding, tampering, keys and commitments."""

from __future__ import annotations

import itertools
import os
import random
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import nacl.bindings as sodium
import pytest
from conftest import make_trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, Role
from tisa.errors import LimitExceeded, Reason, Refused, UsageError, VerificationError
from tisa.keys import Context, Hash, Hasher, MemberSecret, digest
from tisa.limits import CHUNK_SIZE
from tisa.prekeys import PrekeyKind, PrekeySecret, wrap_content_key
from tisa.report import (
    MIN_PADDED,
    OpenedReport,
    ReportOpener,
    ReportSealer,
    SealedReport,
    ciphertext_size,
    key_commitment,
    open_report,
    padded_size,
    seal_report,
)
from tisa.token import Release, check_for_recipient, issue_token

F = TypeVar("F", bound=Callable[..., Any])


def slow(test: F) -> F:
    """Long runs: marked ``slow`` and skipped unless TISA_SLOW=1."""
    skip = pytest.mark.skipif(os.environ.get("TISA_SLOW") != "1", reason="set TISA_SLOW=1")
    marked: F = pytest.mark.slow(skip(test))
    return marked


ARRANGEMENT, SECRETS = make_trio()
NOW = 1_420_000_000
SCOPE, LEVEL = "missile", "secret"
HEADER_BYTES = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
WIRE_CHUNK = CHUNK_SIZE + ABYTES


def make_quad() -> tuple[Arrangement, dict[str, MemberSecret]]:
    """The trio plus Canberra, a recipient only: someone a report can leave out."""
    arrangement, secrets = make_trio()
    canberra = MemberSecret(sign_seed=b"\x0c" * 32, box_secret=b"\x8c" * 32)
    quad = Arrangement(
        name=arrangement.name,
        version=1,
        members=(
            *arrangement.members,
            Member(name="canberra", identity=canberra.public, roles=frozenset({Role.RECIPIENT})),
        ),
        relay=arrangement.relay,
        scopes=arrangement.scopes,
        levels=arrangement.levels,
        created=arrangement.created,
    )
    return quad, {**secrets, "canberra": canberra}


def content(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def seal(
    body: bytes = b"hello tokyo",
    attachments: Sequence[tuple[str, bytes]] = (),
    *,
    arrangement: Arrangement = ARRANGEMENT,
    secrets: dict[str, MemberSecret] = SECRETS,
    recipients: Sequence[str] = ("tokyo",),
) -> SealedReport:
    return seal_report(
        secrets["seoul"],
        "seoul",
        arrangement,
        recipients=recipients,
        scope=SCOPE,
        level=LEVEL,
        body=body,
        now=NOW,
        attachments=attachments,
    )


def opener_for(sealed: SealedReport, **changes: Any) -> ReportOpener:
    kwargs: dict[str, Any] = {
        "content_key": sealed.content_key,
        "report_id": sealed.report_id,
        "digest": sealed.digest,
        "size": sealed.size,
        "arrangement": ARRANGEMENT,
        "recipient": "tokyo",
        "originator": "seoul",
        "scope": SCOPE,
        "level": LEVEL,
    }
    kwargs.update(changes)
    return ReportOpener(**kwargs)


def open_sealed(
    sealed: SealedReport, ciphertext: bytes | None = None, **changes: Any
) -> OpenedReport:
    data = sealed.ciphertext if ciphertext is None else ciphertext
    return open_report(data, opener_for(sealed, **changes))


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


def plain_size(sealer: ReportSealer) -> int:
    """Plaintext bytes before padding: what the sealer pads up to ``sealer.padded``."""
    header = enc.pack(sealer.header.to_dict())
    return 4 + len(header) + 64 + sealer.header.content_size


def sealer_for(body_size: int, attachments: Sequence[tuple[str, int]] = ()) -> ReportSealer:
    return ReportSealer(
        SECRETS["seoul"],
        "seoul",
        ARRANGEMENT,
        recipients=["tokyo"],
        scope=SCOPE,
        level=LEVEL,
        body_size=body_size,
        attachments=attachments,
        now=NOW,
    )


def body_size_for_plain(target: int) -> int:
    """The body size whose unpadded plaintext is exactly ``target`` bytes."""
    guess = target - plain_size(sealer_for(0))
    for size in range(max(guess - 16, 0), guess + 16):
        if plain_size(sealer_for(size)) == target:
            return size
    raise AssertionError(f"no body size gives {target} plaintext bytes")


# --- round trips -------------------------------------------------------------------------


def test_round_trip_with_attachments() -> None:
    attachments = [("map.png", content(3000, 1)), ("empty", b""), ("notes.txt", b"three")]
    sealed = seal(b"body text", attachments, recipients=("tokyo",))
    opened = open_sealed(sealed)
    assert opened.body == b"body text"
    assert opened.attachments == dict(attachments)
    header = opened.header
    assert header == sealed.header
    assert header.id == sealed.report_id
    assert header.arrangement == ARRANGEMENT.id
    assert header.version == ARRANGEMENT.version
    assert (header.originator, header.recipients) == ("seoul", ("tokyo",))
    assert (header.scope, header.level, header.created) == (SCOPE, LEVEL, NOW)
    assert header.attachments == tuple((n, len(d)) for n, d in attachments)
    assert sealed.size == len(sealed.ciphertext)
    assert sealed.digest == digest(Hash.CIPHERTEXT, sealed.ciphertext)


def test_every_recipient_listed_can_open() -> None:
    quad, secrets = make_quad()
    sealed = seal(b"to both", arrangement=quad, secrets=secrets, recipients=("tokyo", "canberra"))
    assert sealed.header.recipients == ("canberra", "tokyo")  # sorted, canonical
    for name in ("tokyo", "canberra"):
        assert open_sealed(sealed, arrangement=quad, recipient=name).body == b"to both"


def chunk_boundary_body_sizes() -> list[int]:
    sizes = {0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE}
    # Bodies that make the unpadded plaintext end just around the minimum bucket and a
    # chunk boundary, and one whose padded size is exactly two chunks.
    for target in (MIN_PADDED - 1, MIN_PADDED, MIN_PADDED + 1):
        sizes.add(body_size_for_plain(target))
    for target in (CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE):
        sizes.add(body_size_for_plain(target))
    return sorted(sizes)


@pytest.mark.parametrize("body_size", chunk_boundary_body_sizes())
def test_round_trip_at_chunk_boundaries(body_size: int) -> None:
    body = content(body_size, body_size)
    sealed = seal(body)
    padded = sealer_for(body_size).padded
    assert sealed.size == ciphertext_size(padded)
    assert open_sealed(sealed).body == body


def test_plaintext_exactly_one_chunk_is_one_final_chunk() -> None:
    size = body_size_for_plain(CHUNK_SIZE)
    sealer = sealer_for(size)
    assert sealer.padded == CHUNK_SIZE
    assert sealer.size == HEADER_BYTES + WIRE_CHUNK
    size = body_size_for_plain(CHUNK_SIZE + 1)
    assert sealer_for(size).padded > CHUNK_SIZE
    assert sealer_for(size).size > HEADER_BYTES + WIRE_CHUNK + ABYTES


attachment_specs = st.lists(
    st.tuples(
        st.text(alphabet="abcdefghij.-_", min_size=1, max_size=12), st.integers(0, 2 * CHUNK_SIZE)
    ),
    max_size=3,
    unique_by=lambda a: a[0],
)
body_sizes = st.one_of(
    st.integers(0, 3000),
    st.integers(CHUNK_SIZE - 300, CHUNK_SIZE + 300),
    st.sampled_from([CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body_size=body_sizes, specs=attachment_specs, seed=st.integers(0, 2**32))
def test_round_trip_any_sizes(body_size: int, specs: list[tuple[str, int]], seed: int) -> None:
    body = content(body_size, seed)
    attachments = [(name, content(size, seed + i + 1)) for i, (name, size) in enumerate(specs)]
    sealed = seal(body, attachments)
    opened = open_sealed(sealed)
    assert opened.body == body
    assert opened.attachments == dict(attachments)


# --- streaming ---------------------------------------------------------------------------


def seal_streaming(
    parts: Sequence[bytes], pieces: Callable[[bytes], Iterator[bytes]]
) -> tuple[ReportSealer, bytes]:
    """Seal ``parts`` (body, attachments) feeding the sealer the pieces given."""
    sealer = sealer_for(len(parts[0]), [(f"a{i}", len(p)) for i, p in enumerate(parts[1:])])
    out = [sealer.start()]
    for part in parts:
        out.extend(sealer.write(piece) for piece in pieces(part))
    out.append(sealer.finish())
    return sealer, b"".join(out)


def open_streaming(
    sealer: ReportSealer, ciphertext: bytes, pieces: Callable[[bytes], Iterator[bytes]]
) -> list[bytes]:
    opener = ReportOpener(
        content_key=sealer.content_key,
        report_id=sealer.report_id,
        digest=sealer.digest,
        size=sealer.size,
        arrangement=ARRANGEMENT,
        recipient="tokyo",
        originator="seoul",
        scope=SCOPE,
        level=LEVEL,
    )
    parts: list[bytearray] = [bytearray() for _ in range(1 + len(sealer.header.attachments))]
    for piece in pieces(ciphertext):
        for index, data in opener.feed(piece):
            assert data, "no empty pieces"
            parts[index] += data
    header = opener.finish()
    assert header == sealer.header
    return [bytes(p) for p in parts]


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def whole(data: bytes) -> Iterator[bytes]:
    yield data


def test_stream_one_byte_at_a_time() -> None:
    parts = [b"a small body", b"", b"attachment"]
    sealer, ciphertext = seal_streaming(parts, bytewise)
    assert len(ciphertext) == sealer.size
    assert digest(Hash.CIPHERTEXT, ciphertext) == sealer.digest
    assert open_streaming(sealer, ciphertext, bytewise) == parts


def test_stream_crossing_chunks_one_byte_at_a_time_into_the_opener() -> None:
    parts = [content(CHUNK_SIZE + 100, 7)]
    sealer, ciphertext = seal_streaming(parts, whole)
    assert open_streaming(sealer, ciphertext, bytewise) == parts


def splitter(cuts: list[int]) -> Callable[[bytes], Iterator[bytes]]:
    def pieces(data: bytes) -> Iterator[bytes]:
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        for start, end in itertools.pairwise(points):
            yield data[start:end]

    return pieces


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, CHUNK_SIZE + 5000), min_size=1, max_size=3),
    seal_cuts=st.lists(st.integers(0, 2**20), max_size=12),
    open_cuts=st.lists(st.integers(0, 2**20), max_size=12),
)
def test_stream_random_splits(sizes: list[int], seal_cuts: list[int], open_cuts: list[int]) -> None:
    parts = [content(size, i) for i, size in enumerate(sizes)]
    sealer, ciphertext = seal_streaming(parts, splitter(seal_cuts))
    assert len(ciphertext) == sealer.size
    assert open_streaming(sealer, ciphertext, splitter(open_cuts)) == parts


def test_sealer_misuse() -> None:
    sealer = sealer_for(3)
    with pytest.raises(UsageError):
        sealer.write(b"abc")  # before start
    sealer.start()
    with pytest.raises(UsageError):
        sealer.start()
    with pytest.raises(UsageError):
        sealer.write(b"abcd")  # more than declared
    with pytest.raises(UsageError):
        sealer.finish()  # less than declared
    sealer.write(b"abc")
    sealer.finish()
    with pytest.raises(UsageError):
        sealer.finish()
    with pytest.raises(UsageError):
        sealer.write(b"")


@pytest.mark.parametrize("size", [-1, True, 1.5])
def test_sealer_refuses_bad_sizes(size: Any) -> None:
    with pytest.raises(UsageError):
        sealer_for(size)
    with pytest.raises(UsageError):
        sealer_for(0, [("a", size)])


def test_sealer_refuses_duplicate_attachment_names() -> None:
    with pytest.raises(UsageError):
        sealer_for(0, [("a", 1), ("a", 2)])


def test_report_size_limit() -> None:
    size = sealer_for(10_000).size
    with pytest.raises(LimitExceeded):
        ReportSealer(
            SECRETS["seoul"],
            "seoul",
            ARRANGEMENT,
            recipients=["tokyo"],
            scope=SCOPE,
            level=LEVEL,
            body_size=10_000,
            now=NOW,
            max_report_size=size - 1,
        )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"scope": "chemical"}, Reason.OUT_OF_SCOPE),
        ({"level": "top-secret"}, Reason.LEVEL_NOT_ALLOWED),
        ({"recipients": ["beijing"]}, Reason.NOT_A_MEMBER),
        ({"recipients": ["washington"]}, Reason.WRONG_ROLE),
        ({"recipients": ["seoul"]}, Reason.WRONG_RECIPIENT),
        ({"recipients": []}, Reason.WRONG_RECIPIENT),
    ],
)
def test_sealer_refuses_what_the_arrangement_does_not_allow(
    changes: dict[str, Any], reason: Reason
) -> None:
    kwargs: dict[str, Any] = {"recipients": ["tokyo"], "scope": SCOPE, "level": LEVEL}
    kwargs.update(changes)
    with pytest.raises(Refused) as info:
        ReportSealer(SECRETS["seoul"], "seoul", ARRANGEMENT, body_size=1, now=NOW, **kwargs)
    assert info.value.reason is reason


def test_sealer_needs_the_originators_key() -> None:
    with pytest.raises(UsageError):
        seal_report(
            SECRETS["tokyo"],
            "seoul",
            ARRANGEMENT,
            recipients=["tokyo"],
            scope=SCOPE,
            level=LEVEL,
            body=b"",
            now=NOW,
        )


# --- constant memory ---------------------------------------------------------------------


def _stream_large(body_size: int, tmp_path: Any) -> tuple[int, int]:
    """Seal then open ``body_size`` bytes through a file; returns the two peaks."""
    block = content(CHUNK_SIZE, 3)
    path = tmp_path / "report.sealed"
    tracemalloc.start()
    try:
        sealer = sealer_for(body_size)
        with open(path, "wb") as out:
            out.write(sealer.start())
            left = body_size
            while left:
                piece = block[: min(left, len(block))]
                out.write(sealer.write(piece))
                left -= len(piece)
            out.writelines(sealer.finish_iter())
        seal_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        opener = ReportOpener(
            content_key=sealer.content_key,
            report_id=sealer.report_id,
            digest=sealer.digest,
            size=sealer.size,
            arrangement=ARRANGEMENT,
            recipient="tokyo",
            originator="seoul",
            scope=SCOPE,
            level=LEVEL,
        )
        received = 0
        with open(path, "rb") as source:
            while piece := source.read(100_000):  # deliberately not chunk-aligned
                for _, data in opener.feed(piece):
                    received += len(data)
        opener.finish()
        open_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == body_size
    return seal_peak, open_peak


def test_constant_memory_64_mib(tmp_path: Any) -> None:
    size = 64 * 1024 * 1024
    seal_peak, open_peak = _stream_large(size, tmp_path)
    # Anything proportional to the report would be 64 MiB (or 2 MiB for its padding).
    assert seal_peak < 1024 * 1024, seal_peak
    assert open_peak < 2 * 1024 * 1024, open_peak


def test_sealer_finish_memory_independent_of_padding() -> None:
    # A plaintext just over 64 MiB gets nearly the largest padding of its bucket (2 MiB);
    # finish_iter() must hand it out a chunk at a time.
    size = body_size_for_plain(64 * 1024 * 1024 + 1)
    sealer = sealer_for(size)
    assert sealer.padded - plain_size(sealer) > 2_000_000
    hasher = Hasher(Hash.CIPHERTEXT)
    hasher.update(sealer.start())
    block = bytes(CHUNK_SIZE)
    left = size
    while left:
        piece = block[: min(left, CHUNK_SIZE)]
        hasher.update(sealer.write(piece))
        left -= len(piece)
    tracemalloc.start()
    try:
        pieces = sealer.finish_iter()
        assert sealer.digest == b""  # set only once the padding is through
        total = 0
        for piece in pieces:
            assert len(piece) <= 2 * WIRE_CHUNK
            hasher.update(piece)
            total += len(piece)
            del piece
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * WIRE_CHUNK, peak
    assert total > 2_000_000
    assert sealer.digest == hasher.finish()


def test_finish_iter_checks_before_the_first_piece() -> None:
    sealer = sealer_for(3)
    sealer.start()
    with pytest.raises(UsageError):
        sealer.finish_iter()  # declared content missing: raised on the call itself
    sealer.write(b"abc")
    assert b"".join(sealer.finish_iter())
    with pytest.raises(UsageError):
        sealer.finish_iter()


@slow
def test_constant_memory_does_not_grow_with_size(tmp_path: Any) -> None:
    small = _stream_large(8 * 1024 * 1024, tmp_path)
    (tmp_path / "report.sealed").unlink()
    large = _stream_large(512 * 1024 * 1024, tmp_path)
    assert large[1] < small[1] + 1024 * 1024


# --- padding -----------------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(0, 2**40))
def test_padded_size_properties(length: int) -> None:
    padded = padded_size(length)
    assert padded >= length
    assert padded >= MIN_PADDED
    assert padded_size(padded) == padded  # a bucket boundary pads to itself
    assert padded_size(length + 1) >= padded  # monotone
    if length > 1024:
        assert padded - length <= 0.12 * length


def test_padded_size_buckets() -> None:
    assert padded_size(0) == padded_size(1) == padded_size(MIN_PADDED) == MIN_PADDED
    assert padded_size(MIN_PADDED + 1) > MIN_PADDED
    assert padded_size(CHUNK_SIZE) == CHUNK_SIZE
    # Far fewer buckets than lengths: O(log log n) bits of the length leak, not all of
    # them. Between 2**k and 2**(k+1) there are at most 2**bit_length(k) buckets.
    for k in (10, 13, 16, 19):
        octave = {padded_size(n) for n in range(2**k + 1, 2 ** (k + 1) + 1)}
        assert len(octave) <= 2 ** k.bit_length()


@settings(deadline=None)
@given(st.integers(0, 2**36))
def test_ciphertext_size_is_header_plus_chunk_tags(padded: int) -> None:
    chunks = -(-padded // CHUNK_SIZE)
    assert ciphertext_size(padded) == HEADER_BYTES + padded + ABYTES * chunks


def test_ciphertext_length_depends_only_on_the_bucket() -> None:
    # Two pairs of bodies of different lengths in the same bucket: the minimum one, and
    # a PADME bucket above a chunk.
    base = body_size_for_plain(CHUNK_SIZE + 10)
    bucket = sealer_for(base).padded
    other = base + (bucket - plain_size(sealer_for(base))) - 3
    assert other > base and sealer_for(other).padded == bucket
    for first, second in [(0, 500), (base, other)]:
        sealed = [seal(content(n, n)) for n in (first, second)]
        assert len(sealed[0].ciphertext) == len(sealed[1].ciphertext)
        assert sealed[0].size == ciphertext_size(sealer_for(first).padded)
    # Attachments count like body bytes: one body, or a body split over attachments.
    split = seal(b"x" * 100, [("a", b"y" * 100), ("b", b"z" * 100)])
    assert split.size == seal(b"x" * 300).size


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 4 * CHUNK_SIZE), st.integers(0, 4 * CHUNK_SIZE))
def test_size_is_a_function_of_the_bucket(first: int, second: int) -> None:
    a, b = sealer_for(first), sealer_for(second)
    assert a.size == ciphertext_size(a.padded)
    assert (a.padded == b.padded) == (a.size == b.size)


# --- tampering ---------------------------------------------------------------------------


def assert_fails_opaquely(sealed: SealedReport, ciphertext: bytes, **changes: Any) -> None:
    with pytest.raises(VerificationError) as info:
        open_sealed(sealed, ciphertext, **changes)
    assert type(info.value) is VerificationError
    assert str(info.value) == VerificationError.MESSAGE


SMALL = seal(b"a short report", [("attached", b"data")])
# Three chunks, so that tampering hits a middle chunk and chunk boundaries.
LARGE = seal(content(2 * CHUNK_SIZE + 5000, 9))


def test_flip_every_byte_of_a_small_report() -> None:
    for position in range(len(SMALL.ciphertext)):
        tampered = flip(SMALL.ciphertext, position)
        assert_fails_opaquely(SMALL, tampered)
        # The attacker may also control the digest the opener is told to expect.
        assert_fails_opaquely(SMALL, tampered, digest=digest(Hash.CIPHERTEXT, tampered))


def large_positions() -> list[int]:
    size = len(LARGE.ciphertext)
    positions = {0, HEADER_BYTES - 1, HEADER_BYTES, size - 1, size - ABYTES, size - ABYTES - 1}
    for chunk in range(1, -(-(size - HEADER_BYTES) // WIRE_CHUNK)):
        boundary = HEADER_BYTES + chunk * WIRE_CHUNK
        positions.update({boundary - 1, boundary, boundary - ABYTES})
    positions.update(random.Random(5).sample(range(size), 40))
    return sorted(positions)


@pytest.mark.parametrize("position", large_positions())
def test_flip_sampled_bytes_of_a_large_report(position: int) -> None:
    tampered = flip(LARGE.ciphertext, position, 0x80)
    assert_fails_opaquely(LARGE, tampered)
    assert_fails_opaquely(LARGE, tampered, digest=digest(Hash.CIPHERTEXT, tampered))


@pytest.mark.parametrize("keep", [0, 1, HEADER_BYTES - 1, HEADER_BYTES, WIRE_CHUNK, -1, -ABYTES])
def test_truncation_fails(keep: int) -> None:
    for sealed in (SMALL, LARGE):
        cut = sealed.ciphertext[:keep]
        if len(cut) == sealed.size:
            continue  # SMALL is shorter than one chunk
        assert_fails_opaquely(sealed, cut)
        if len(cut) >= ciphertext_size(MIN_PADDED):
            assert_fails_opaquely(sealed, cut, size=len(cut), digest=digest(Hash.CIPHERTEXT, cut))


def test_truncation_at_a_chunk_boundary_fails() -> None:
    # The first two chunks are complete and authentic, but neither is tagged FINAL.
    cut = LARGE.ciphertext[: HEADER_BYTES + 2 * WIRE_CHUNK]
    assert_fails_opaquely(LARGE, cut, size=len(cut), digest=digest(Hash.CIPHERTEXT, cut))


@pytest.mark.parametrize("extra", [b"\x00", b"x" * ABYTES, b"y" * WIRE_CHUNK])
def test_extension_fails(extra: bytes) -> None:
    for sealed in (SMALL, LARGE):
        longer = sealed.ciphertext + extra
        assert_fails_opaquely(sealed, longer)
        assert_fails_opaquely(
            sealed, longer, size=len(longer), digest=digest(Hash.CIPHERTEXT, longer)
        )


def test_reordered_and_dropped_chunks_fail() -> None:
    data = LARGE.ciphertext
    head, body = data[:HEADER_BYTES], data[HEADER_BYTES:]
    chunks = [body[i : i + WIRE_CHUNK] for i in range(0, len(body), WIRE_CHUNK)]
    assert len(chunks) == 3
    variants = [
        [chunks[1], chunks[0], chunks[2]],
        [chunks[0], chunks[0], chunks[2]],
        [chunks[0], chunks[2]],
        [chunks[1], chunks[2]],
    ]
    for variant in variants:
        tampered = head + b"".join(variant)
        assert_fails_opaquely(
            LARGE, tampered, size=len(tampered), digest=digest(Hash.CIPHERTEXT, tampered)
        )


def test_chunks_of_another_report_fail() -> None:
    # Same key, other report: the first chunk is authentic under this key only with its
    # own header and report id.
    other = seal(b"another")
    spliced = SMALL.ciphertext[:HEADER_BYTES] + other.ciphertext[HEADER_BYTES:]
    assert_fails_opaquely(SMALL, spliced, digest=digest(Hash.CIPHERTEXT, spliced))
    assert_fails_opaquely(SMALL, other.ciphertext, digest=other.digest)


@pytest.mark.parametrize(
    "changes",
    [
        {"content_key": bytes(32)},
        {"content_key": flip(SMALL.content_key, 31)},
        {"report_id": flip(SMALL.report_id, 0)},
        {"digest": flip(SMALL.digest, 5)},
        {"size": SMALL.size + 1},
        {"size": SMALL.size - 1},
        {"size": 0},
        {"originator": "tokyo"},
        {"scope": "nuclear"},
        {"level": "restricted"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_wrong_parameters_fail_opaquely(changes: dict[str, Any]) -> None:
    assert_fails_opaquely(SMALL, SMALL.ciphertext, **changes)


def test_opener_is_dead_after_a_failure() -> None:
    opener = opener_for(SMALL)
    with pytest.raises(VerificationError):
        opener.feed(flip(SMALL.ciphertext, 40))
    with pytest.raises(VerificationError):
        opener.feed(b"")
    with pytest.raises(VerificationError):
        opener.finish()


def test_opener_finish_is_single_use() -> None:
    opener = opener_for(SMALL)
    opener.feed(SMALL.ciphertext)
    opener.finish()
    with pytest.raises(VerificationError):
        opener.finish()


# --- context and policy ------------------------------------------------------------------


def test_recipient_not_listed_is_refused() -> None:
    quad, secrets = make_quad()
    sealed = seal(b"for tokyo only", arrangement=quad, secrets=secrets, recipients=("tokyo",))
    assert open_sealed(sealed, arrangement=quad).body == b"for tokyo only"
    # Canberra holding the key (say, forwarded by Tokyo) still cannot pass the report off
    # as addressed to it: the signed recipient list names Tokyo alone.
    with pytest.raises(Refused) as info:
        open_sealed(sealed, arrangement=quad, recipient="canberra")
    assert info.value.reason is Reason.WRONG_RECIPIENT


def test_report_under_another_arrangement_version_is_refused() -> None:
    amended = ARRANGEMENT.amend(levels=(*ARRANGEMENT.levels, "top-secret"))
    with pytest.raises(Refused) as info:
        open_sealed(SMALL, arrangement=amended)
    assert info.value.reason is Reason.WRONG_ARRANGEMENT


def test_report_from_an_impostor_fails() -> None:
    # Tokyo seals a report claiming nothing false but signed with its own key, then a
    # token claims Seoul as the originator: the signature does not check.
    forged = seal_report(
        SECRETS["tokyo"],
        "tokyo",
        ARRANGEMENT,
        recipients=["seoul"],
        scope=SCOPE,
        level=LEVEL,
        body=b"x",
        now=NOW,
    )
    assert_fails_opaquely(forged, forged.ciphertext, recipient="seoul", originator="seoul")


# --- randomness and key commitment -------------------------------------------------------


def test_every_seal_has_fresh_key_id_and_stream_header() -> None:
    seals = [seal(b"same body") for _ in range(200)]
    assert len({s.content_key for s in seals}) == 200
    assert len({s.report_id for s in seals}) == 200
    assert len({s.ciphertext[:HEADER_BYTES] for s in seals}) == 200
    assert len({s.digest for s in seals}) == 200
    assert all(len(s.content_key) == 32 and len(s.report_id) == 16 for s in seals)


def test_fixed_key_and_id_still_give_fresh_stream_headers() -> None:
    sealers = [
        ReportSealer(
            SECRETS["seoul"],
            "seoul",
            ARRANGEMENT,
            recipients=["tokyo"],
            scope=SCOPE,
            level=LEVEL,
            body_size=0,
            now=NOW,
            _report_id=bytes(16),
            _content_key=bytes(range(32)),
        )
        for _ in range(50)
    ]
    headers = {s.start()[:HEADER_BYTES] for s in sealers}
    assert len(headers) == 50


SIGNED_PREKEY = PrekeySecret(
    kind=PrekeyKind.SIGNED, secret=bytes(range(32)), created=NOW - 60, not_after=NOW + 7200
)


def tokyos_prekey(kind: PrekeyKind, public: bytes) -> bytes:
    assert public == SIGNED_PREKEY.public
    return SIGNED_PREKEY.secret


def check(token: bytes) -> Release:
    return check_for_recipient(
        token, ARRANGEMENT, SECRETS["tokyo"], "tokyo", now=NOW, prekey_secret=tokyos_prekey
    )


def token_for(sealed: SealedReport, content_key: bytes) -> bytes:
    return issue_token(
        SECRETS["seoul"],
        "seoul",
        ARRANGEMENT,
        recipient="tokyo",
        report_id=sealed.report_id,
        digest=sealed.digest,
        size=sealed.size,
        content_key=content_key,
        scope=SCOPE,
        level=LEVEL,
        not_before=NOW,
        not_after=NOW + 3600,
        counter=1,
        signed_prekey=SIGNED_PREKEY.publish(SECRETS["tokyo"], "tokyo", ARRANGEMENT),
    )


def test_token_round_trip_opens_the_report() -> None:
    release = check(token_for(SMALL, SMALL.content_key))
    assert release.content_key == SMALL.content_key
    opened = open_report(SMALL.ciphertext, release.opener(ARRANGEMENT))
    assert opened.body == b"a short report"


def test_key_commitment_binds_key_to_report() -> None:
    commit = key_commitment(SMALL.content_key, SMALL.report_id)
    assert commit != key_commitment(flip(SMALL.content_key, 0), SMALL.report_id)
    assert commit != key_commitment(SMALL.content_key, flip(SMALL.report_id, 0))
    # A token honestly signed over another key commits to that key: it checks, but the
    # ciphertext does not open under it.
    release = check(token_for(SMALL, bytes(32)))
    with pytest.raises(VerificationError):
        open_report(SMALL.ciphertext, release.opener(ARRANGEMENT))


def test_sealed_key_that_differs_from_the_commitment_is_refused() -> None:
    # The originator's signature covers key_commit; a wrapped key other than the one
    # committed to (a buggy or malicious originator, targeting one recipient with a
    # different plaintext) is refused before anything is decrypted.
    envelope = enc.unpack(token_for(SMALL, SMALL.content_key))
    body = enc.unpack(envelope["body"])
    other_key = bytes(range(32))
    del body["wrap"]
    body["wrap"] = wrap_content_key(
        other_key,
        enc.pack(body),
        identity=SECRETS["tokyo"].public.encryption.raw,
        signed=SIGNED_PREKEY.public,
        one_time=None,
    ).to_dict()
    body_bytes = enc.pack(body)
    forged = enc.pack({"body": body_bytes, "sig": SECRETS["seoul"].sign(Context.TOKEN, body_bytes)})
    with pytest.raises(VerificationError):
        check(forged)


# --- chunks read in place ------------------------------------------------------------------


def _fixed_sealer(body_size: int, **kwargs: Any) -> ReportSealer:
    return ReportSealer(
        SECRETS["seoul"], "seoul", ARRANGEMENT, recipients=["tokyo"], scope=SCOPE,
        level=LEVEL, body_size=body_size, now=NOW, _report_id=bytes(range(16)),
        _content_key=bytes(range(32)), **kwargs,
    )  # fmt: skip


def _seal_with(sealer: ReportSealer, body: bytes, piece: int) -> bytes:
    out = [sealer.start()]
    out.extend(sealer.write(body[i : i + piece]) for i in range(0, len(body), piece))
    out.extend(sealer.finish_iter())
    return b"".join(out)


def _opener(sealer: ReportSealer, **kwargs: Any) -> ReportOpener:
    return ReportOpener(
        content_key=sealer.content_key, report_id=sealer.report_id, digest=sealer.digest,
        size=sealer.size, arrangement=ARRANGEMENT, recipient="tokyo", originator="seoul",
        scope=SCOPE, level=LEVEL, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("piece", [CHUNK_SIZE + 17, 1, 4096, 2 * (CHUNK_SIZE + 17) + 3, 10**9])
def test_opener_reads_chunks_in_place_from_any_pieces(piece: int) -> None:
    # Pieces aligned on chunks are pulled straight from the caller's bytes; any other
    # split goes through the buffer; a caller that reuses its buffer after each feed (a
    # bytearray overwritten) changes nothing.
    body = content(3 * CHUNK_SIZE + 77, 5)
    sealer = _fixed_sealer(len(body))
    ciphertext = _seal_with(sealer, body, CHUNK_SIZE)
    opener = _opener(sealer)
    got = bytearray()
    for start in range(0, len(ciphertext), piece):
        buffer = bytearray(ciphertext[start : start + piece])
        for index, data in opener.feed(buffer):  # type: ignore[arg-type]
            assert index == 0
            got += data
        buffer[:] = bytes(len(buffer))
    assert opener.finish() == sealer.header
    assert bytes(got) == body


@pytest.mark.parametrize("piece", [CHUNK_SIZE, 1000, 3 * CHUNK_SIZE + 5])
def test_sealer_pushes_chunks_in_place_from_any_pieces(piece: int) -> None:
    body = content(5 * CHUNK_SIZE + 321, 3)
    sealer = _fixed_sealer(len(body))
    ciphertext = _seal_with(sealer, body, piece)
    assert len(ciphertext) == sealer.size
    assert sealer.digest == digest(Hash.CIPHERTEXT, ciphertext)
    opener = _opener(sealer)
    assert b"".join(data for _, data in opener.feed(ciphertext)) == body
    assert opener.finish() == sealer.header


def test_opener_reading_in_place_still_refuses_tampering() -> None:
    body = content(2 * CHUNK_SIZE, 9)
    sealer = _fixed_sealer(len(body))
    ciphertext = _seal_with(sealer, body, CHUNK_SIZE)
    # The last byte (a tag): the AEAD refuses it while feeding.
    opener = _opener(sealer)
    with pytest.raises(VerificationError):
        opener.feed(flip(ciphertext, len(ciphertext) - 1))
    with pytest.raises(VerificationError):
        opener.finish()
    # A token naming another digest: only the digest check at the end can tell.
    other = _opener(sealer)
    object.__setattr__(other, "_digest", bytes(32))
    other.feed(ciphertext)
    with pytest.raises(VerificationError):
        other.finish()


@pytest.mark.parametrize("feed", [whole, bytewise], ids=["whole", "bytewise"])
def test_the_openers_header_limit_holds_however_the_report_is_fed(
    feed: Callable[[bytes], Iterator[bytes]],
) -> None:
    # The signed header is read in place from the first chunk it arrives in, however
    # the ciphertext is cut: the opener's max_header refuses a header one byte over it
    # (the check on that path fails this test if dropped), and a limit it fits opens it.
    sealed = seal(content(3000, 4), [("map.png", content(70_000, 5))])
    header_size = len(enc.pack(sealed.header.to_dict()))
    for limit, opens in ((header_size - 1, False), (header_size, True)):
        opener = opener_for(sealed, max_header=limit)
        try:
            for piece in feed(sealed.ciphertext):
                opener.feed(piece)
            header = opener.finish()
        except VerificationError:
            assert not opens
        else:
            assert opens and header == sealed.header


def test_a_signed_header_split_across_pieces_is_gathered_as_one_in_place() -> None:
    # A chunk's plaintext holds the header whole as a rule (read in place); one cut
    # anywhere in the length, header or signature is gathered first: both give the same
    # header and parts, and the header limit holds on the gathering path too.
    sealed = seal(content(300, 6), [("a", b"xyz")])
    header_bytes = enc.pack(sealed.header.to_dict())
    signature = SECRETS["seoul"].sign(Context.REPORT, header_bytes)
    head = len(header_bytes).to_bytes(4, "big") + header_bytes + signature
    plain = head + content(300, 6) + b"xyz" + bytes(50)
    for cut in sorted({1, 3, 4, 5, len(head) // 2, len(head) - 64, len(head) - 1, len(head)}):
        opener = opener_for(sealed)
        out = opener._consume_plain(plain[:cut]) + opener._consume_plain(plain[cut:])
        assert opener.header == sealed.header
        assert b"".join(data for part, data in out if part == 0) == content(300, 6)
        assert b"".join(data for part, data in out if part == 1) == b"xyz"
        over = opener_for(sealed, max_header=len(header_bytes) - 1)
        with pytest.raises(VerificationError):
            over._consume_plain(plain[:cut])
            over._consume_plain(plain[cut:])


@pytest.mark.parametrize(
    "parts",
    [[b""], [b"body"], [b"", b"", b"x"], [b"a small body", b"", b"attachment", b""], [b"b" * 900]],
)
def test_one_chunk_report_fed_whole_matches_the_piecewise_path(
    parts: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-chunk report fed in one piece takes ReportOpener._feed_whole; fed byte by
    # byte it takes the general loop: same pieces, same header.
    sealer, ciphertext = seal_streaming(parts, whole)
    calls: list[int] = []
    feed_whole = ReportOpener._feed_whole

    def spy(self: ReportOpener, data: bytes) -> list[tuple[int, bytes]]:
        calls.append(len(data))
        return feed_whole(self, data)

    monkeypatch.setattr(ReportOpener, "_feed_whole", spy)
    assert open_streaming(sealer, ciphertext, whole) == parts
    assert calls == [len(ciphertext)]
    assert open_streaming(sealer, ciphertext, bytewise) == parts
    assert calls == [len(ciphertext)]
