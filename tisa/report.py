"""Sealed reports: signed by the originator, padded, encrypted in chunks.

Plaintext layout (before encryption)::

    u32 header length (big endian) | header | signature | body | attachments... | zeros

``header`` is the canonical msgpack of :class:`ReportHeader` (id, arrangement, originator,
the full recipient list, scope, level, created time, body size, attachment names and
sizes). ``signature`` is the originator's Ed25519 signature over ``header`` in context
``report``. The content itself is bound to the originator by the release token, which
the originator signs over the digest of the whole ciphertext and a commitment to the
content key: hashing the content a second time would cost a full BLAKE2b pass on each
side and prove nothing more.

The plaintext is padded with zeros to ``padded_size(n)`` (PADME, at least
:data:`MIN_PADDED`), then encrypted with libsodium secretstream (XChaCha20-Poly1305)
under a fresh 32-byte content key, in chunks of :data:`~tisa.limits.CHUNK_SIZE`
plaintext bytes, every chunk with the report id as additional data and the last one
tagged FINAL. The ciphertext is the 24-byte secretstream header followed by the chunks,
so its length depends only on the padded size. Its digest (BLAKE2b-256, personalised
``tisa1-ciphertext``) is what release tokens and the relay refer to.

:class:`ReportSealer` and :class:`ReportOpener` work incrementally in constant memory;
:func:`seal_report` and :func:`open_report` are the one-call forms for bytes in memory.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterable, Iterator, Sequence
from itertools import pairwise
from typing import Annotated, Any

import msgspec
import nacl.bindings as sodium
import nacl.utils

from tisa import _sodium as fast
from tisa import encoding as enc
from tisa.arrangement import Arrangement, Role
from tisa.errors import LimitExceeded, ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import (
    DIGEST_SIZE,
    KEY_SIZE,
    SIGNATURE_SIZE,
    Context,
    Hash,
    Hasher,
    MemberSecret,
    digest,
    random_id,
    verify,
)
from tisa.limits import CHUNK_SIZE, MAX_ATTACHMENTS, MAX_HEADER, MAX_NAME, MAX_REPORT_SIZE

__all__ = [
    "MIN_PADDED",
    "OpenedReport",
    "ReportHeader",
    "ReportOpener",
    "ReportSealer",
    "SealedReport",
    "ciphertext_size",
    "key_commitment",
    "open_report",
    "padded_size",
    "seal_report",
]

_ss = sodium
HEADER_BYTES = _ss.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
ABYTES = _ss.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
TAG_MESSAGE = _ss.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = _ss.crypto_secretstream_xchacha20poly1305_TAG_FINAL
REPORT_ID_SIZE = 16

# Smallest padded plaintext: every report under 1 KiB looks the same size, so short
# messages ("yes", "no", a coordinate) are indistinguishable.
MIN_PADDED = 1024

_LEN = struct.Struct(">I")
# The ciphertext size of a report whose padded plaintext is one chunk.
_ONE_CHUNK_REPORT = HEADER_BYTES + CHUNK_SIZE + ABYTES


def padded_size(length: int) -> int:
    """PADME padding (Nikitin et al. 2019): at most ~12% overhead, O(log log n) leakage.

    Rounds ``length`` up so that only the top ``floor(log2(E)) + 1`` bits of it, where
    ``E = floor(log2(length))``, may be non-zero; never below :data:`MIN_PADDED`.
    """
    if length <= MIN_PADDED:
        return MIN_PADDED
    exponent = length.bit_length() - 1
    low_bits = exponent - exponent.bit_length()
    mask = (1 << low_bits) - 1
    return (length + mask) & ~mask


def ciphertext_size(padded: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Ciphertext bytes for ``padded`` plaintext bytes: header plus one tag per chunk."""
    chunks = -(-padded // chunk_size)
    return HEADER_BYTES + padded + ABYTES * chunks


def key_commitment(content_key: bytes, report_id: bytes) -> bytes:
    """Binds a content key to a report: BLAKE2b keyed with the content key over the id.

    Release tokens carry it (signed), so a ciphertext opens under one key only, whatever
    a token's sealed key says (XChaCha20-Poly1305 alone is not key-committing).
    """
    return digest(Hash.KEY_COMMIT, report_id, key=content_key)


# Recipients listed in one report header.
MAX_RECIPIENTS = 256
_name = enc.text(MAX_NAME)
_HEADER_SCHEMA: dict[str, enc.Field] = {
    "v": enc.uint(1, 1),
    "id": enc.bin_exact(REPORT_ID_SIZE),
    "arrangement": enc.bin_exact(DIGEST_SIZE),
    "version": enc.uint(2**32, 1),
    "originator": _name,
    "recipients": enc.list_of(
        _name, min_items=1, max_items=MAX_RECIPIENTS, unique=True, sorted_=True
    ),
    "scope": _name,
    "level": _name,
    "created": enc.uint(),
    "body": enc.uint(MAX_REPORT_SIZE),
    "attachments": enc.list_of(
        lambda v, p: enc.check_map(v, {"name": _name, "size": enc.uint(MAX_REPORT_SIZE)}, p),
        max_items=MAX_ATTACHMENTS,
    ),
}

# The header schema typed (keys in canonical order): the fast path of ReportHeader.decode
# (enc.typed_decoder). What msgspec does not check (text's UTF-8 length and control
# characters, recipients sorted and unique, attachment names unique) is checked in
# _decode_typed; anything that path does not accept goes through the schema.
_Name = Annotated[str, msgspec.Meta(min_length=1)]
_Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_REPORT_SIZE)]


class _AttachmentFields(msgspec.Struct, forbid_unknown_fields=True):
    name: _Name
    size: _Size


class _HeaderFields(msgspec.Struct, forbid_unknown_fields=True):
    arrangement: Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
    attachments: Annotated[list[_AttachmentFields], msgspec.Meta(max_length=MAX_ATTACHMENTS)]
    body: _Size
    created: Annotated[int, msgspec.Meta(ge=0)]
    id: Annotated[bytes, msgspec.Meta(min_length=REPORT_ID_SIZE, max_length=REPORT_ID_SIZE)]
    level: _Name
    originator: _Name
    recipients: Annotated[list[_Name], msgspec.Meta(min_length=1, max_length=MAX_RECIPIENTS)]
    scope: _Name
    v: Annotated[int, msgspec.Meta(ge=1, le=1)]
    version: Annotated[int, msgspec.Meta(ge=1, le=2**32)]


_decode_header_fields = enc.typed_decoder(_HeaderFields)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReportHeader:
    """The signed metadata of a report, as the recipient sees it after opening."""

    id: bytes
    arrangement: bytes
    version: int
    originator: str
    recipients: tuple[str, ...]
    scope: str
    level: str
    created: int
    body_size: int
    attachments: tuple[tuple[str, int], ...]

    def to_dict(self) -> dict[str, Any]:
        """The header as its wire map; the originator signs the canonical encoding of it."""
        return {
            "v": 1,
            "id": self.id,
            "arrangement": self.arrangement,
            "version": self.version,
            "originator": self.originator,
            "recipients": list(self.recipients),
            "scope": self.scope,
            "level": self.level,
            "created": self.created,
            "body": self.body_size,
            "attachments": [{"name": n, "size": s} for n, s in self.attachments],
        }

    @property
    def content_size(self) -> int:
        """Bytes of content declared: the body plus every attachment."""
        return self.body_size + sum(size for _, size in self.attachments)

    @classmethod
    def decode(cls, data: bytes) -> ReportHeader:
        """Decode a header. Raises ProtocolError.

        A header in its canonical form is decoded once, straight into typed fields;
        anything that path does not accept goes through the schema (:meth:`from_dict`),
        which accepts it the same or names the fault.
        """
        if type(data) is bytes and len(data) <= MAX_HEADER:
            header = cls._decode_typed(data)
            if header is not None:
                return header
        return cls.from_dict(enc.unpack(data, max_size=MAX_HEADER))

    @classmethod
    def _decode_typed(cls, data: bytes) -> ReportHeader | None:
        fields = _decode_header_fields(data)
        if fields is None:
            return None
        recipients = fields.recipients
        names = [fields.originator, fields.scope, fields.level, *recipients]
        if fields.attachments:
            names += [a.name for a in fields.attachments]
        if not enc.are_texts(names, MAX_NAME):
            return None
        # Strictly ascending by UTF-8 bytes: sorted and unique, as the schema requires.
        if len(recipients) > 1 and not all(
            a.encode() < b.encode() for a, b in pairwise(recipients)
        ):
            return None
        attachments: tuple[tuple[str, int], ...] = ()
        if fields.attachments:
            attachments = tuple((a.name, a.size) for a in fields.attachments)
            if len({name for name, _ in attachments}) != len(attachments):
                return None
        # The fields are checked: the header is built without __init__'s keywords.
        return _build_header(
            fields.id,
            fields.arrangement,
            fields.version,
            fields.originator,
            tuple(recipients),
            fields.scope,
            fields.level,
            fields.created,
            fields.body,
            attachments,
        )

    @classmethod
    def from_dict(cls, value: Any) -> ReportHeader:
        """Check a header map against the schema. Raises ProtocolError."""
        fields = enc.check_map(value, _HEADER_SCHEMA, "report header")
        names = [a["name"] for a in fields["attachments"]]
        if len(set(names)) != len(names):
            raise ProtocolError("report header: duplicate attachment names")
        return cls(
            id=fields["id"],
            arrangement=fields["arrangement"],
            version=fields["version"],
            originator=fields["originator"],
            recipients=tuple(fields["recipients"]),
            scope=fields["scope"],
            level=fields["level"],
            created=fields["created"],
            body_size=fields["body"],
            attachments=tuple((a["name"], a["size"]) for a in fields["attachments"]),
        )


_build_header = enc.slot_builder(
    ReportHeader,
    (
        "id",
        "arrangement",
        "version",
        "originator",
        "recipients",
        "scope",
        "level",
        "created",
        "body_size",
        "attachments",
    ),
)


def _encode_header(header: dict[str, Any]) -> bytes:
    """The canonical encoding of a header map that the recipient's schema accepts.

    Raises:
        UsageError: the schema refuses it (naming the fault).
    """
    if enc.is_plain(header):
        # Plain values: their encoding decodes back to them, so the typed decoding the
        # recipient makes of the bytes checks the values themselves, in one C call.
        try:
            data: bytes | None = enc.pack_checked(header)
        except (TypeError, ValueError, OverflowError):  # not encodable: the schema says why
            data = None
        if data is not None and ReportHeader._decode_typed(data) is not None:
            return data
    try:
        ReportHeader.from_dict(header)  # the schema the recipient applies
        # Checked by that schema: encoded without pack's walk over every value.
        return enc.pack_checked(header)
    except ProtocolError as exc:
        raise UsageError(f"report header: {exc.detail}") from None


class ReportSealer:
    """Seal a report incrementally: feed the content, collect ciphertext as it comes.

    Usage::

        sealer = ReportSealer(secret, "seoul", arrangement, recipients=["tokyo"],
                              scope="nk.missile", level="secret", body_size=n, now=t)
        out.write(sealer.start())
        for piece in content:            # body, then each attachment, in order
            out.write(sealer.write(piece))
        out.writelines(sealer.finish_iter())  # or out.write(sealer.finish())
        sealer.digest, sealer.size, sealer.content_key, sealer.report_id

    Memory stays under two chunks whatever the report size (with :meth:`finish_iter`;
    :meth:`finish` returns the padding's ciphertext in one piece).

    Raises (constructor):
        Refused: the arrangement does not allow this share (scope, level, parties).
        UsageError: bad arguments (sizes, names, too many attachments).
    """

    def __init__(
        self,
        secret: MemberSecret,
        name: str,
        arrangement: Arrangement,
        *,
        recipients: Iterable[str],
        scope: str,
        level: str,
        body_size: int,
        now: int,
        attachments: Sequence[tuple[str, int]] = (),
        max_report_size: int = MAX_REPORT_SIZE,
        _report_id: bytes | None = None,
        _content_key: bytes | None = None,
    ) -> None:
        recipients = tuple(sorted(set(recipients), key=str.encode))
        arrangement.check_share(name, recipients, scope, level)
        if secret.public != arrangement.require_role(name, Role.ORIGINATOR).identity:
            raise UsageError(f"this key is not {name!r}'s key in the arrangement")
        if len(attachments) > MAX_ATTACHMENTS:
            raise UsageError(f"at most {MAX_ATTACHMENTS} attachments")
        for size in [body_size, *(s for _, s in attachments)]:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise UsageError("sizes are non-negative integers")
        self.header = ReportHeader(
            id=_report_id or random_id(),
            arrangement=arrangement.id,
            version=arrangement.version,
            originator=name,
            recipients=recipients,
            scope=scope,
            level=level,
            created=now,
            body_size=body_size,
            attachments=tuple((str(n), int(s)) for n, s in attachments),
        )
        self._header_bytes = _encode_header(self.header.to_dict())
        if len(self._header_bytes) > MAX_HEADER:
            raise UsageError("report header too large (recipients or attachment names)")
        self._content_left = self.header.content_size
        plain = _LEN.size + len(self._header_bytes) + SIGNATURE_SIZE + self._content_left
        self.padded = padded_size(plain)
        self.size = ciphertext_size(self.padded)
        if self.size > max_report_size:
            raise LimitExceeded("report size", self.size, max_report_size)
        self._padding = self.padded - plain
        self.report_id = self.header.id
        self.content_key = _content_key or nacl.utils.random(KEY_SIZE)
        self._secret = secret
        self._state = _ss.crypto_secretstream_xchacha20poly1305_state()
        self._cipher = Hasher(Hash.CIPHERTEXT, self.size)
        self._buffer = bytearray()
        self._pushed = 0
        self._started = False
        self._done = False
        self.digest = b""

    def start(self) -> bytes:
        """Begin: returns the secretstream header and any chunk the header fills."""
        if self._started:
            raise UsageError("start() called twice")
        self._started = True
        stream_header = fast.stream_init_push(self._state, self.content_key)
        self._cipher.update(stream_header)
        signature = self._secret.sign(Context.REPORT, self._header_bytes)
        self._buffer += _LEN.pack(len(self._header_bytes)) + self._header_bytes + signature
        return stream_header + self._drain()

    def write(self, data: bytes) -> bytes:
        """Add content (body, then attachments in order); returns ciphertext ready."""
        if not self._started or self._done:
            raise UsageError("write() outside start()..finish()")
        if len(data) > self._content_left:
            raise UsageError("more content than the sizes declared")
        self._content_left -= len(data)
        self._buffer += data
        return self._drain()

    def finish(self) -> bytes:
        """Pad and encrypt the rest; afterwards ``digest`` is set.

        The rest includes the padding, up to ~12% of the report (PADME), returned in one
        piece: for a large report use :meth:`finish_iter`, which keeps memory constant.
        """
        return b"".join(self.finish_iter())

    def finish_iter(self) -> Iterator[bytes]:
        """As :meth:`finish`, yielding the ciphertext a chunk or two at a time.

        ``digest`` is set once the iterator is exhausted. The checks run on the call,
        before the first piece is asked for.
        """
        if not self._started or self._done:
            raise UsageError("finish() outside start()..finish()")
        if self._content_left:
            raise UsageError(f"{self._content_left} bytes of declared content not written")
        self._done = True
        return self._pad_and_drain()

    def _pad_and_drain(self) -> Iterator[bytes]:
        # The padding goes in a chunk at a time: it can be megabytes for a large report.
        left = self._padding
        while True:
            take = min(left, CHUNK_SIZE)
            self._buffer += bytes(take)
            left -= take
            out = self._drain()
            if out:
                yield out
            if not left:
                break
        self.digest = self._cipher.finish()

    def _drain(self) -> bytes:
        out = []
        start, end = 0, len(self._buffer)
        with memoryview(self._buffer) as view:
            while start < end:
                remaining = self.padded - self._pushed
                if end - start < CHUNK_SIZE and end - start < remaining:
                    break
                # libsodium reads the chunk in place; the buffer is shifted once.
                with view[start : start + CHUNK_SIZE] as piece:
                    start += len(piece)
                    self._pushed += len(piece)
                    tag = TAG_FINAL if self._pushed == self.padded else TAG_MESSAGE
                    chunk = fast.stream_push(self._state, piece, self.report_id, tag)
                self._cipher.update(chunk)
                out.append(chunk)
        if start:
            del self._buffer[:start]
        return out[0] if len(out) == 1 else b"".join(out)


@dataclasses.dataclass(frozen=True, slots=True)
class SealedReport:
    """A whole sealed report in memory (see :func:`seal_report`)."""

    report_id: bytes
    ciphertext: bytes
    digest: bytes
    content_key: bytes = dataclasses.field(repr=False)
    header: ReportHeader

    @property
    def size(self) -> int:
        """Length of the ciphertext in bytes (the size a release token states)."""
        return len(self.ciphertext)


def seal_report(
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    *,
    recipients: Iterable[str],
    scope: str,
    level: str,
    body: bytes,
    now: int,
    attachments: Sequence[tuple[str, bytes]] = (),
    max_report_size: int = MAX_REPORT_SIZE,
) -> SealedReport:
    """Seal a report held in memory. See :class:`ReportSealer` for the streaming form."""
    sealer = ReportSealer(
        secret,
        name,
        arrangement,
        recipients=recipients,
        scope=scope,
        level=level,
        body_size=len(body),
        attachments=[(n, len(d)) for n, d in attachments],
        now=now,
        max_report_size=max_report_size,
    )
    parts = [sealer.start(), sealer.write(body)]
    parts.extend(sealer.write(data) for _, data in attachments)
    parts.append(sealer.finish())
    return SealedReport(
        report_id=sealer.report_id,
        ciphertext=b"".join(parts),
        digest=sealer.digest,
        content_key=sealer.content_key,
        header=sealer.header,
    )


# The smallest ciphertext a report has (one padded to MIN_PADDED).
_MIN_CIPHERTEXT = ciphertext_size(MIN_PADDED)


class ReportOpener:
    """Open a sealed report incrementally, in constant memory.

    ``feed`` returns plaintext pieces as ``(part, data)`` where part 0 is the body and
    part ``i`` is attachment ``i - 1``. The signed header is checked before the first
    piece comes out, but the pieces are not proven to be the originator's until the
    ciphertext digest is checked against the token at the end: hold them aside (a
    temporary file) and hand them to the application only after :meth:`finish` returns.
    Any failure raises :class:`VerificationError` (opaque) or :class:`Refused` (a
    consistent, signed report that this recipient must not accept) and the opener is
    dead afterwards.

    Args:
        content_key: the key unsealed from a verified release token.
        report_id, digest, size: as the verified token states them.
        arrangement: the effective arrangement, for the originator's key.
        recipient: the name of the member opening it (must be listed in the report).
        originator, scope, level: as the token states them; the report must agree.
    """

    def __init__(
        self,
        *,
        content_key: bytes,
        report_id: bytes,
        digest: bytes,
        size: int,
        arrangement: Arrangement,
        recipient: str,
        originator: str,
        scope: str,
        level: str,
        max_header: int = MAX_HEADER,
    ) -> None:
        if size < _MIN_CIPHERTEXT or size > MAX_REPORT_SIZE:
            raise VerificationError()
        self._key = content_key
        self._report_id = report_id
        self._digest = digest
        self._size = size
        self._arrangement = arrangement
        self._recipient = recipient
        self._expect = (originator, scope, level)
        self._max_header = max_header
        self._state = _ss.crypto_secretstream_xchacha20poly1305_state()
        self._cipher = Hasher(Hash.CIPHERTEXT, size)
        self._inbuf = bytearray()
        self._received = 0
        self._consumed = 0
        self._initialised = False
        self._final_seen = False
        self._dead = False
        # Plaintext parsing state.
        self._plain = bytearray()
        self.header: ReportHeader | None = None
        self._parts: list[int] = []
        self._part = 0
        self._padding_ok = True

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add ciphertext; returns the (unauthenticated) plaintext pieces it completes."""
        if self._dead:
            raise VerificationError()
        try:
            return self._feed(data)
        except (VerificationError, Refused, ProtocolError):
            self._dead = True
            raise

    def _feed(self, data: bytes) -> list[tuple[int, bytes]]:
        if (
            len(data) == self._size
            and not self._initialised
            and not self._inbuf
            and self._size <= _ONE_CHUNK_REPORT
        ):
            return self._feed_whole(data)
        self._received += len(data)
        if self._received > self._size:
            raise VerificationError()
        self._cipher.update(data)
        out: list[tuple[int, bytes]] = []
        start = 0
        source: bytes | bytearray
        if not self._initialised and not self._inbuf and len(data) >= HEADER_BYTES:
            # The stream header and what follows it are read in place from the first
            # piece (a small report comes in one), nothing copied aside.
            if not fast.stream_init_pull(self._state, bytes(data[:HEADER_BYTES]), self._key):
                raise VerificationError()
            self._initialised = True
            source, start = data, HEADER_BYTES
        elif self._inbuf or not self._initialised:
            self._inbuf += data
            source = self._inbuf
        else:
            # Nothing held back: the chunks are read in place from the caller's bytes,
            # and only a partial chunk at the end is kept.
            source = data
        if not self._initialised:
            if len(self._inbuf) < HEADER_BYTES:
                return out
            if not fast.stream_init_pull(self._state, bytes(self._inbuf[:HEADER_BYTES]), self._key):
                raise VerificationError()
            del self._inbuf[:HEADER_BYTES]
            self._initialised = True
        stream_size = self._size - HEADER_BYTES
        end = len(source)
        with memoryview(source) as view:
            while True:
                # Every chunk is full but the last, so its length follows from the size.
                take = min(CHUNK_SIZE + ABYTES, stream_size - self._consumed)
                if take <= 0 or end - start < take:
                    break
                chunk = view[start : start + take]
                start += take
                self._consumed += take
                is_last = self._consumed == stream_size
                if self._final_seen:
                    raise VerificationError()
                with chunk:
                    pulled = fast.stream_pull(self._state, chunk, self._report_id)
                if pulled is None:
                    raise VerificationError()
                plain, tag = pulled
                if (tag == TAG_FINAL) != is_last or tag not in (TAG_FINAL, TAG_MESSAGE):
                    raise VerificationError()
                self._final_seen = tag == TAG_FINAL
                out.extend(self._consume_plain(plain))
        if source is self._inbuf:
            if start:
                del self._inbuf[:start]
        elif start < end:
            self._inbuf += data[start:]
        return out

    def _feed_whole(self, data: bytes) -> list[tuple[int, bytes]]:
        # A report of one chunk fed whole (the common small report): the same checks as
        # the loop of _feed, with nothing to gather or hold back.
        self._received = self._size
        self._cipher.update(data)
        if not fast.stream_init_pull(self._state, bytes(data[:HEADER_BYTES]), self._key):
            raise VerificationError()
        self._initialised = True
        pulled = fast.stream_pull(self._state, data[HEADER_BYTES:], self._report_id)
        if pulled is None:
            raise VerificationError()
        plain, tag = pulled
        if tag != TAG_FINAL:
            raise VerificationError()
        self._consumed = self._size - HEADER_BYTES
        self._final_seen = True
        if self.header is None and not self._plain and len(self._parts) == 0:
            head = self._header_end(plain)
            if head:
                return self._consume_whole(plain, head)
        return self._consume_plain(plain)

    def _consume_whole(self, plain: bytes, head: int) -> list[tuple[int, bytes]]:
        # The whole plaintext of a one-chunk report: header, signature, every part and
        # the padding, sliced out of it (what _consume_plain does piece by piece).
        length = head - _LEN.size - SIGNATURE_SIZE
        self._header_bytes = plain[_LEN.size : _LEN.size + length]
        self._check_header(self._header_bytes, plain[head - SIGNATURE_SIZE : head])
        out: list[tuple[int, bytes]] = []
        start = head
        end = len(plain)
        parts = self._parts
        for index, size in enumerate(parts):
            take = min(size, end - start)
            if take:
                out.append((index, plain[start : start + take]))
                start += take
                parts[index] = size - take
            if parts[index]:
                # Content declared beyond the plaintext: finish refuses it.
                self._part = index
                return out
        self._part = len(parts)
        if start < end:
            self._padding_ok = plain.count(0, start) == end - start
        return out

    def _consume_plain(self, plain: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        view = memoryview(plain)
        head = self._header_end(plain) if self.header is None and not self._plain else 0
        if head:
            # Length, header and signature all in this piece (a report's first chunk, as
            # a rule): read from it in place; the content after them is the view.
            length = head - _LEN.size - SIGNATURE_SIZE
            self._header_bytes = plain[_LEN.size : _LEN.size + length]
            self._check_header(self._header_bytes, plain[head - SIGNATURE_SIZE : head])
            view = view[head:]
        elif self.header is None:
            self._plain += view
            view = memoryview(b"")
            if len(self._plain) < _LEN.size:
                return out
            (length,) = _LEN.unpack_from(self._plain)
            if length > self._max_header:
                raise VerificationError()
            end = _LEN.size + length + SIGNATURE_SIZE
            if len(self._plain) < end:
                return out
            self._header_bytes = bytes(self._plain[_LEN.size : _LEN.size + length])
            self._check_header(self._header_bytes, bytes(self._plain[end - SIGNATURE_SIZE : end]))
            plain = bytes(self._plain[end:])
            view = memoryview(plain)
            self._plain = bytearray()
        while view and self._part < len(self._parts):
            take = min(len(view), self._parts[self._part])
            if take:
                # A chunk that is all one part is handed out as it is, not copied.
                whole = take == len(plain) and len(view) == len(plain)
                out.append((self._part, plain if whole else bytes(view[:take])))
                view = view[take:]
                self._parts[self._part] -= take
            if self._parts[self._part] == 0:
                self._part += 1
        while self._part < len(self._parts) and self._parts[self._part] == 0:
            self._part += 1
        if view and self._padding_ok:
            padding = len(plain) - len(view)
            self._padding_ok = plain.count(0, padding) == len(view)
        return out

    def _header_end(self, plain: bytes) -> int:
        # Where the signature after the header ends when ``plain`` holds the length, the
        # header and the signature, and the length is within the limit; else 0 (the
        # piece is then gathered in self._plain, which refuses a length over the limit).
        if len(plain) < _LEN.size:
            return 0
        (length,) = _LEN.unpack_from(plain)
        end = _LEN.size + length + SIGNATURE_SIZE
        return end if length <= self._max_header and len(plain) >= end else 0

    def _check_header(self, header_bytes: bytes, signature: bytes) -> None:
        """Decode and verify the signed header as soon as it is in (before any content)."""
        try:
            header = ReportHeader.decode(header_bytes)
        except ProtocolError:
            raise VerificationError() from None
        originator, scope, level = self._expect
        if (
            header.id != self._report_id
            or header.originator != originator
            or header.scope != scope
            or header.level != level
        ):
            raise VerificationError()
        try:
            member = self._arrangement.require_role(originator, Role.ORIGINATOR)
        except Refused:
            raise VerificationError() from None
        verify(member.identity.signing, Context.REPORT, header_bytes, signature)
        self.header = header
        self._parts = [header.body_size]
        if header.attachments:
            self._parts += [size for _, size in header.attachments]

    def finish(self) -> ReportHeader:
        """Check digest, signature and context; returns the verified header.

        Raises:
            VerificationError: anything cryptographic or structural is wrong.
            Refused: WRONG_ARRANGEMENT (another arrangement id or version), then
                WRONG_RECIPIENT when this member is not listed, then what the arrangement
                says of the signed share (NOT_A_MEMBER, WRONG_ROLE, WRONG_RECIPIENT for
                a listed recipient; OUT_OF_SCOPE, LEVEL_NOT_ALLOWED).
        """
        if self._dead:
            raise VerificationError()
        self._dead = True
        header = self.header
        if (
            not self._final_seen
            or self._received != self._size
            or header is None
            or self._part != len(self._parts)
            or not self._padding_ok
            or self._cipher.finish() != self._digest
        ):
            raise VerificationError()
        # Signed and consistent: the remaining checks are policy, with reasons, in the
        # order of docs/protocol.md section 9.4 step 7.
        if (header.arrangement, header.version) != (
            self._arrangement.id,
            self._arrangement.version,
        ):
            # The id covers the version, so a header whose version differs from the one
            # its id names is inconsistent: refused like any other arrangement.
            raise Refused(Reason.WRONG_ARRANGEMENT, "report sealed under another arrangement")
        if self._recipient not in header.recipients:
            raise Refused(Reason.WRONG_RECIPIENT, "this member is not a recipient of the report")
        # The whole signed share, as the sealer checked it: every listed recipient a member
        # that may receive and not the originator (so never the relay), scope and level.
        self._arrangement.check_share(
            header.originator, header.recipients, header.scope, header.level
        )
        return header


@dataclasses.dataclass(frozen=True, slots=True)
class OpenedReport:
    """A verified report opened in memory."""

    header: ReportHeader
    body: bytes
    attachments: dict[str, bytes]


def open_report(ciphertext: bytes, opener: ReportOpener) -> OpenedReport:
    """Open a whole report held in memory with a prepared :class:`ReportOpener`."""
    parts: dict[int, list[bytes]] = {}
    for start in range(0, max(len(ciphertext), 1), 4 * CHUNK_SIZE):
        for part, data in opener.feed(ciphertext[start : start + 4 * CHUNK_SIZE]):
            parts.setdefault(part, []).append(data)
    header = opener.finish()
    return OpenedReport(
        header=header,
        body=b"".join(parts.get(0, [])),
        attachments={
            name: b"".join(parts.get(i + 1, [])) for i, (name, _) in enumerate(header.attachments)
        },
    )
