"""Messages exchanged between a member and the relay once the channel is up.

Each message is a canonical msgpack map whose ``"t"`` names its type; the other keys are
exactly the fields of its class below. Messages are frozen, keyword-only dataclasses
checked on construction and on decode; :func:`decode_message` returns one of them or
raises :class:`~tisa.errors.ProtocolError`, nothing else. (:meth:`Message.trusted`
builds one without the construction check, for values its builder made or checked
itself: the relay's own answers and deliveries.)

A report of at most :data:`~tisa.limits.MAX_INLINE_CIPHERTEXT` ciphertext bytes moves in
one message: ``SubmitInline`` (member to relay, with the release tokens sent at once) or
``DeliverInline`` (relay to member). A larger one moves in a stream: ``SubmitBegin`` or
``Deliver``, then ``Chunk`` messages carrying exactly the declared number of bytes, then
``SubmitEnd`` / ``DeliverEnd``. In one direction of a connection no other message may
come between a stream's begin and end.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, ClassVar, Literal, Self

import msgspec

from tisa import encoding as enc
from tisa.consent import MAX_CONSENT_SIZE
from tisa.errors import ProtocolError, Reason
from tisa.keys import DIGEST_SIZE
from tisa.limits import (
    CHUNK_SIZE,
    MAX_INLINE_CIPHERTEXT,
    MAX_INLINE_TOKENS,
    MAX_NAME,
    MAX_REPORT_SIZE,
)
from tisa.prekeys import MAX_PREKEY_SIZE
from tisa.token import MAX_TOKEN_SIZE

__all__ = [
    "INLINE_OVERHEAD",
    "INLINE_TOKEN_OVERHEAD",
    "MAX_PREKEY_BUNDLES",
    "MAX_RECEIPT_ACKS",
    "Ack",
    "AckReceipts",
    "AuditFetch",
    "AuditReply",
    "Chunk",
    "ConsentNotice",
    "Deliver",
    "DeliverEnd",
    "DeliverInline",
    "ErrorMessage",
    "Expired",
    "FetchPrekeys",
    "Message",
    "PrekeyStatus",
    "Prekeys",
    "PublishPrekeys",
    "ReceiptNotice",
    "Refusal",
    "Release",
    "Released",
    "Revoke",
    "Revoked",
    "SendConsent",
    "SendReceipt",
    "Stored",
    "SubmitBegin",
    "SubmitEnd",
    "SubmitInline",
    "chunks_of",
    "decode_message",
    "encode_message",
]

ID = enc.bin_exact(16)
DIGEST = enc.bin_exact(DIGEST_SIZE)
# One chunk message carries at most this much ciphertext: one secretstream chunk of a
# report, with its tag, so a node can pass chunks through without re-slicing.
MAX_CHUNK_DATA = CHUNK_SIZE + 17
_blob = enc.bin_max(8192)
_token = enc.bin_max(MAX_TOKEN_SIZE)


# Bytes a submit_inline or deliver_inline adds to its data and tokens, at most (map and
# bin headers, keys, type, ids, digest, expiry), and per token: a sender checks with them
# that the message fits the frame limit before it chooses the inline form.
INLINE_OVERHEAD = 160
INLINE_TOKEN_OVERHEAD = 5


def _inline_data(value: Any, path: str) -> bytes:
    """A whole report's ciphertext in one message: 1 to MAX_INLINE_CIPHERTEXT bytes."""
    if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_INLINE_CIPHERTEXT:
        raise ProtocolError(f"{path}: expected 1..{MAX_INLINE_CIPHERTEXT} bytes")
    return value


_reason = enc.one_of(*(r.value for r in Reason))
_detail = enc.text(512, allow_empty=True)
# The consent objects of tisa.consent, as they travel in SendConsent and ConsentNotice.
CONSENT_KINDS = ("announce", "request", "answer")
_consent_kind = enc.one_of(*CONSENT_KINDS)
_consent = enc.bin_max(MAX_CONSENT_SIZE)
_prekey = enc.bin_max(MAX_PREKEY_SIZE)
# One-time prekeys in one publish message: 100 envelopes of at most 512 bytes stay well
# inside a frame; a member with more to publish sends several messages.
MAX_PREKEYS_PER_MESSAGE = 100
# Prekey bundles one prekeys_fetch asks for and one prekeys answer carries (protocol
# version 4): an originator's node refills a pool of Limits.prekey_pool (16) bundles per
# recipient in one fetch; 32 one-time prekeys of at most 512 bytes keep the answer near
# 17 KiB, well inside a frame. A fetch asking for more is malformed.
MAX_PREKEY_BUNDLES = 32
# Receipt notices one ack_receipts acknowledges (protocol version 4): an originator's
# node acks the receipts a commit of its made durable in one message; 256 ids of 16
# bytes are about 4.6 KiB (the relay pushes receipts 256 at a time, NOTICE_PAGE).
MAX_RECEIPT_ACKS = 256


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of all channel messages."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, enc.Field]] = {}

    def __post_init__(self) -> None:
        try:
            # The schema names exactly the fields (a test checks it for every message).
            enc.check_map(
                {name: getattr(self, name) for name in self.SCHEMA},
                self.SCHEMA,
                self.TYPE,
            )
        except ProtocolError as exc:
            from tisa.errors import UsageError

            raise UsageError(exc.detail) from None

    @classmethod
    def trusted(cls, **fields: Any) -> Self:
        """The message of ``fields``, built without the schema check of construction:
        for a message a node builds from values it made or checked itself (the relay's
        own ``stored`` answer and deliveries: ids and tokens from its store, a
        ciphertext whose digest it checked, its own signature), on every report's path.

        The caller vouches that each value is of its schema's kind and within its
        limits, as construction would check (``bytes``, ``str``, ``int``, ``None``, or
        a list of them): :func:`encode_message` relies on it, and the bytes sent are
        then those of the checked construction (a test compares them for every message
        the relay builds this way). Only the field names are checked.

        Raises:
            UsageError: ``fields`` are not exactly the message's fields.
        """
        if fields.keys() != cls.SCHEMA.keys():
            from tisa.errors import UsageError

            raise UsageError(f"{cls.TYPE}: fields {sorted(fields)}, not {sorted(cls.SCHEMA)}")
        message = object.__new__(cls)
        for key, value in fields.items():
            object.__setattr__(message, key, value)
        return message

    def to_dict(self) -> dict[str, Any]:
        """The message as a map: its fields, plus ``"t"`` naming its type."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["t"] = self.TYPE
        return out


_REGISTRY: dict[str, type[Message]] = {}


def _message(cls: type[Message]) -> type[Message]:
    _REGISTRY[cls.TYPE] = cls
    return cls


# --- member to relay ---------------------------------------------------------------------


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubmitBegin(Message):
    """Originator starts uploading a sealed report of ``size`` bytes with ``digest``."""

    TYPE: ClassVar[str] = "submit"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "report": ID,
        "size": enc.uint(MAX_REPORT_SIZE, 1),
        "digest": DIGEST,
        "expires": enc.uint(),
    }
    report: bytes
    size: int
    digest: bytes
    expires: int  # unix time after which the relay may drop the held report


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubmitInline(Message):
    """Originator submits a small sealed report whole (``data``, at most
    :data:`~tisa.limits.MAX_INLINE_CIPHERTEXT` bytes) and the release tokens for it it
    has at hand (at most :data:`~tisa.limits.MAX_INLINE_TOKENS`). The relay stores the
    report and consumes the tokens in one step and answers one :class:`Stored` naming
    the tokens it accepted (each refused one gets its :class:`Refusal`), or one
    :class:`Refusal` of the submission (its tokens then are not looked at)."""

    TYPE: ClassVar[str] = "submit_inline"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "report": ID,
        "digest": DIGEST,
        "expires": enc.uint(),
        "data": _inline_data,
        "tokens": enc.list_of(_token, max_items=MAX_INLINE_TOKENS),
    }
    report: bytes
    digest: bytes
    expires: int  # as in SubmitBegin
    data: bytes
    tokens: list[bytes] = dataclasses.field(default_factory=list)


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(Message):
    """A piece of report ciphertext inside a submission or a delivery stream.

    At most :data:`MAX_CHUNK_DATA` bytes: one secretstream chunk with its tag.
    """

    TYPE: ClassVar[str] = "chunk"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"data": enc.bin_max(MAX_CHUNK_DATA)}
    data: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SubmitEnd(Message):
    """Originator ends the submission of ``report``.

    The chunks since :class:`SubmitBegin` must add up to its ``size``; the relay then
    answers :class:`Stored` or :class:`Refusal`.
    """

    TYPE: ClassVar[str] = "submit_end"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"report": ID}
    report: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Release(Message):
    """Originator hands the relay a release token (see :mod:`tisa.token`)."""

    TYPE: ClassVar[str] = "release"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"token": _token}
    token: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Revoke(Message):
    """Originator withdraws one token, or with ``token`` None the whole report."""

    TYPE: ClassVar[str] = "revoke"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"report": ID, "token": enc.optional(ID)}
    report: bytes
    token: bytes | None = None


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    """Member confirms it durably holds a delivery (``kind`` "delivery", token id) or a
    receipt notice (``kind`` "receipt", token id of the receipt); relay confirms to the
    recipient that it holds the recipient's receipt (``kind`` "receipt").

    For the consent kinds ("announce", "request", "answer") ``token`` holds the
    announcement id or the request id (an answer is acked by its request's id): the
    relay confirms it holds what the member sent (:class:`SendConsent`), the member that
    it holds what the relay forwarded (:class:`ConsentNotice`)."""

    TYPE: ClassVar[str] = "ack"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "kind": enc.one_of("delivery", "receipt", *CONSENT_KINDS),
        "token": ID,
    }
    kind: str
    token: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AckReceipts(Message):
    """An originator confirms it durably holds several receipt notices at once (their
    token ids, at most :data:`MAX_RECEIPT_ACKS`): each as an :class:`Ack` of kind
    "receipt" would (protocol version 4)."""

    TYPE: ClassVar[str] = "ack_receipts"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "tokens": enc.list_of(ID, max_items=MAX_RECEIPT_ACKS, min_items=1),
    }
    tokens: list[bytes]


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SendReceipt(Message):
    """Recipient sends its signed receipt (:class:`tisa.receipt.Receipt`) to the originator."""

    TYPE: ClassVar[str] = "send_receipt"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"receipt": _blob}
    receipt: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SendConsent(Message):
    """A member sends a signed consent object (:mod:`tisa.consent`) for the relay to
    forward: an announcement (originator), a request (requester) or a denial
    (originator). The relay answers :class:`Ack` of the same kind, or :class:`Refusal`."""

    TYPE: ClassVar[str] = "send_consent"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"kind": _consent_kind, "data": _consent}
    kind: str
    data: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditFetch(Message):
    """Ask for the audit extract from ``since`` (the seq of the member's last checkpoint)."""

    TYPE: ClassVar[str] = "audit_fetch"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"since": enc.uint(2**63)}
    since: int = 0


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PublishPrekeys(Message):
    """A recipient publishes its signed prekey (or None: unchanged) and one-time prekeys
    (:class:`tisa.prekeys.Prekey` envelopes); the relay answers :class:`PrekeyStatus`.
    With neither, it only asks for that status (a node does so on every connection)."""

    TYPE: ClassVar[str] = "prekeys_publish"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "signed": enc.optional(_prekey),
        "one_time": enc.list_of(_prekey, max_items=MAX_PREKEYS_PER_MESSAGE),
    }
    signed: bytes | None
    one_time: list[bytes]


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FetchPrekeys(Message):
    """An originator asks for ``count`` bundles of ``member``'s prekeys (the signed
    prekey and ``count`` one-time prekeys, at most :data:`MAX_PREKEY_BUNDLES`); ``ref``
    (its choice) names the answer."""

    TYPE: ClassVar[str] = "prekeys_fetch"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "ref": ID,
        "member": enc.text(MAX_NAME),
        "count": enc.uint(MAX_PREKEY_BUNDLES, 1),
    }
    ref: bytes
    member: str
    count: int = 1


# --- relay to member ---------------------------------------------------------------------


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Prekeys(Message):
    """The answer to :class:`FetchPrekeys`: ``member``'s newest signed prekey (None when
    there is none) and up to the ``count`` asked for of its one-time prekeys, newest
    first, handed out to the asker only (fewer, or none, when fewer are left or the
    asker's hourly allowance runs out)."""

    TYPE: ClassVar[str] = "prekeys"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "ref": ID,
        "member": enc.text(MAX_NAME),
        "signed": enc.optional(_prekey),
        "one_time": enc.list_of(_prekey, max_items=MAX_PREKEY_BUNDLES),
    }
    ref: bytes
    member: str
    signed: bytes | None
    one_time: list[bytes]


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrekeyStatus(Message):
    """What the relay holds of the member's own prekeys: the ``not_after`` of its newest
    signed prekey (0: none) and how many one-time prekeys are left. Sent in answer to a
    publish (an empty one asks for it), and on its own when a handout leaves fewer than
    the relay's ``prekey_low_water``."""

    TYPE: ClassVar[str] = "prekey_status"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "signed_not_after": enc.uint(),
        "one_time": enc.uint(2**32),
    }
    signed_not_after: int
    one_time: int


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Stored(Message):
    """The relay stored a submission durably; ``ack`` is a signed StoredAck.

    ``released``: the ids of the tokens of a :class:`SubmitInline` the relay accepted
    and consumed in the same step (each as a :class:`Released` would say); empty for a
    streamed submission."""

    TYPE: ClassVar[str] = "stored"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "report": ID,
        "ack": _blob,
        "released": enc.list_of(ID, max_items=MAX_INLINE_TOKENS),
    }
    report: bytes
    ack: bytes
    released: list[bytes] = dataclasses.field(default_factory=list)


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Released(Message):
    """The relay accepted and consumed a token; delivery is pending."""

    TYPE: ClassVar[str] = "released"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"report": ID, "token": ID}
    report: bytes
    token: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Deliver(Message):
    """A delivery starts: the token, then ``Chunk`` messages for the token's size."""

    TYPE: ClassVar[str] = "deliver"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"token": _token}
    token: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliverInline(Message):
    """A whole delivery in one message: the token and the report's ciphertext (exactly
    the token's size, at most :data:`~tisa.limits.MAX_INLINE_CIPHERTEXT` bytes)."""

    TYPE: ClassVar[str] = "deliver_inline"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"token": _token, "data": _inline_data}
    token: bytes
    data: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliverEnd(Message):
    """The relay ends a delivery; ``token`` is the id of the token its :class:`Deliver` carried.

    The chunks since :class:`Deliver` must add up to the size that token states.
    """

    TYPE: ClassVar[str] = "deliver_end"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"token": ID}
    token: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptNotice(Message):
    """A recipient's receipt, forwarded to the originator."""

    TYPE: ClassVar[str] = "receipt"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"receipt": _blob}
    receipt: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsentNotice(Message):
    """A consent object forwarded to the member it is for; the member acks it (kind and
    id as in :class:`Ack`) once it holds it durably, and gets it again until then."""

    TYPE: ClassVar[str] = "consent"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"kind": _consent_kind, "data": _consent}
    kind: str
    data: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Refusal(Message):
    """Something the member sent was refused; ``ref`` is the report or token id."""

    TYPE: ClassVar[str] = "refused"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "ref": enc.bin_max(16),
        "reason": _reason,
        "detail": _detail,
    }
    ref: bytes
    reason: str
    detail: str = ""


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Expired(Message):
    """A held report (``token`` None) or an undelivered token expired at the relay."""

    TYPE: ClassVar[str] = "expired"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"report": ID, "token": enc.optional(ID)}
    report: bytes
    token: bytes | None = None


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Revoked(Message):
    """The relay carried out a revocation."""

    TYPE: ClassVar[str] = "revoked"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"report": ID, "token": enc.optional(ID)}
    report: bytes
    token: bytes | None = None


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditReply(Message):
    """An audit extract (:class:`tisa.audit.Extract`, encoded)."""

    TYPE: ClassVar[str] = "audit"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"extract": enc.bin_max(200_000)}
    extract: bytes


@_message
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMessage(Message):
    """Sent just before the relay closes a connection."""

    TYPE: ClassVar[str] = "error"
    SCHEMA: ClassVar[dict[str, enc.Field]] = {"reason": _reason, "detail": _detail}
    reason: str
    detail: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = dict(_REGISTRY)


def _sorted_keys(cls: type[Message]) -> tuple[str, ...]:
    keys = _SORTED_KEYS.get(cls)
    if keys is None:
        keys = _SORTED_KEYS[cls] = tuple(sorted([*cls.SCHEMA, "t"]))
    return keys


_SORTED_KEYS: dict[type[Message], tuple[str, ...]] = {}


def chunks_of(data: bytes) -> list[Chunk]:
    """``data`` (report ciphertext) as the :class:`Chunk` messages of a stream, each of
    at most :data:`MAX_CHUNK_DATA` bytes, in order."""
    return [
        Chunk(data=data[start : start + MAX_CHUNK_DATA])
        for start in range(0, len(data), MAX_CHUNK_DATA)
    ]


def encode_message(message: Message) -> bytes:
    """The canonical encoding of ``message``.

    Every message was checked against its schema when built, so its values are already
    of the canonical kinds (bytes, str, int, None) and only the key order is left to do:
    the map is built in sorted order and :func:`tisa.encoding.pack_checked` encodes it in
    C, without the generic walk of :func:`tisa.encoding.pack` (this runs for every frame
    of every report).
    """
    cls = type(message)
    value = {key: cls.TYPE if key == "t" else getattr(message, key) for key in _sorted_keys(cls)}
    return enc.pack_checked(value)


class _SubmitInlineWire(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`SubmitInline`'s schema as a typed value (:func:`tisa.encoding.typed_decoder`),
    its fields in the canonical key order. ``expires`` has no upper bound here: msgpack
    carries no integer above the schema's 2**64 - 1."""

    data: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_INLINE_CIPHERTEXT)]
    digest: Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
    expires: Annotated[int, msgspec.Meta(ge=0)]
    report: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    t: Literal["submit_inline"]
    tokens: Annotated[
        list[Annotated[bytes, msgspec.Meta(max_length=MAX_TOKEN_SIZE)]],
        msgspec.Meta(max_length=MAX_INLINE_TOKENS),
    ]


_submit_inline_typed = enc.typed_decoder(_SubmitInlineWire)
# How a canonical submit_inline begins: a map of six keys, the first "data".
_SUBMIT_INLINE_START = b"\x86\xa4data"


def decode_message(data: bytes, *, max_size: int | None = None) -> Message:
    """Decode one message. Raises ProtocolError for anything else.

    A ``submit_inline`` (every small report, at the relay) is decoded straight into its
    typed value when it can be (:func:`tisa.encoding.typed_decoder`: one C call, and the
    canonical check by re-encoding); anything it does not accept takes the schema's path,
    so what is accepted, and the error for what is not, are exactly as before (a test
    compares the two paths)."""
    if (
        type(data) is bytes
        and data.startswith(_SUBMIT_INLINE_START)
        and (max_size is None or len(data) <= max_size)
    ):
        wire = _submit_inline_typed(data)
        if wire is not None:
            return SubmitInline.trusted(
                report=wire.report,
                digest=wire.digest,
                expires=wire.expires,
                data=wire.data,
                tokens=wire.tokens,
            )
    return _decode_by_schema(data, max_size=max_size)


def _decode_by_schema(data: bytes, *, max_size: int | None = None) -> Message:
    # decode_message's general path: the canonical map, then its type's schema.
    value = enc.unpack(data, max_size=max_size)
    kind = value.pop("t", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    fields = enc.check_map(value, cls.SCHEMA, cls.TYPE)
    # The fields were just checked against the schema: build the frozen instance without
    # running the same check again in __post_init__ (this runs for every frame).
    message = object.__new__(cls)
    for key, item in fields.items():
        object.__setattr__(message, key, item)
    return message
