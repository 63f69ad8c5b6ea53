"""Typed events a member node reports to its application, and delivered reports.

Every event is written to the node's store in the same transaction as the state change
that caused it, so an event the application has not consumed yet survives a restart
(see :meth:`clients.node.Node.events`). :func:`encode_event` / :func:`decode_event` are
the store's record format: a kind name and a msgpack map.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, ClassVar

import msgpack

from tisa.consent import Announcement, Answer, Request
from tisa.errors import ProtocolError, Reason, Refused, TisaError, VerificationError
from tisa.receipt import Receipt, StoredAck
from tisa.report import ReportHeader

__all__ = [
    "AnnouncementEvent",
    "ApprovedEvent",
    "ConsentRejected",
    "DeliveredReport",
    "DeliveryRejected",
    "DeniedEvent",
    "Event",
    "ExpiredEvent",
    "PrekeysLow",
    "ReceiptEvent",
    "RefusedEvent",
    "ReleaseGap",
    "RequestEvent",
    "Released",
    "RevokedEvent",
    "Stored",
    "WeakerWrap",
    "decode_event",
    "encode_event",
    "verified_on_decode",
]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of the node's events."""

    KIND: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Stored(Event):
    """The relay stored a submission durably; ``ack`` is its signed, verified ack."""

    KIND: ClassVar[str] = "stored"
    report: bytes
    ack: StoredAck


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Released(Event):
    """The relay accepted (and consumed) the release token ``token`` for ``recipient``."""

    KIND: ClassVar[str] = "released"
    report: bytes
    token: bytes
    recipient: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RefusedEvent(Event):
    """Something this node sent was refused. ``ref`` is the report or token id it
    concerned (empty for a refused connection)."""

    KIND: ClassVar[str] = "refused"
    ref: bytes
    reason: Reason
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ExpiredEvent(Event):
    """The relay expired a held report (``token`` None) or an undelivered token."""

    KIND: ClassVar[str] = "expired"
    report: bytes
    token: bytes | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RevokedEvent(Event):
    """The relay carried out a revocation of a token, or of the whole report."""

    KIND: ClassVar[str] = "revoked"
    report: bytes
    token: bytes | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptEvent(Event):
    """A recipient's signed receipt for one of this node's reports (verified)."""

    KIND: ClassVar[str] = "receipt"
    receipt: Receipt


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseGap(Event):
    """A release counter from ``originator`` skipped values: a release the relay may
    have dropped (or one the originator withdrew before it reached this node)."""

    KIND: ClassVar[str] = "release_gap"
    originator: str
    expected: int
    got: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRejected(Event):
    """A delivery failed verification or policy at this node and was not handed over.

    ``error`` is :class:`~tisa.errors.VerificationError` (opaque), a
    :class:`~tisa.errors.Refused` with its reason (``replayed`` for a report seen
    before under another token, ``expired``, ``wrong_recipient``, ...) or a
    :class:`~tisa.errors.ProtocolError`.
    """

    KIND: ClassVar[str] = "delivery_rejected"
    token_id: bytes
    error: TisaError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AnnouncementEvent(Event):
    """An originator announced to this member that it holds a report (verified: signed
    by its originator, naming this member). Ask for it with :meth:`clients.node.Node.request`."""

    KIND: ClassVar[str] = "announcement"
    announcement: Announcement


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RequestEvent(Event):
    """A member asks this originator to release one of its reports (verified, addressed
    to this member, not seen before, open, for a report this member submitted). Answer
    with :meth:`clients.node.Node.approve` or :meth:`clients.node.Node.deny`."""

    KIND: ClassVar[str] = "request"
    request: Request


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ApprovedEvent(Event):
    """A request of this member's was approved: the report came under ``token``, a
    release token naming ``request`` (the report itself is in :meth:`Node.reports`)."""

    KIND: ClassVar[str] = "approved"
    request: bytes
    report: bytes
    token: bytes


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeniedEvent(Event):
    """A request of this member's was denied, by the originator it asked (verified);
    ``answer.reason`` is the denial code, ``answer.note`` the originator's note."""

    KIND: ClassVar[str] = "denied"
    answer: Answer


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsentRejected(Event):
    """An announcement, request or answer the relay forwarded failed a check here and
    was not handed over. ``kind`` is "announce", "request" or "answer"; ``ref`` its id
    (empty if it did not decode); ``error`` as for :class:`DeliveryRejected`, e.g.
    ``Refused`` with ``reflected``, ``wrong_originator``, ``unsolicited``, ``replayed``."""

    KIND: ClassVar[str] = "consent_rejected"
    kind: str
    ref: bytes
    error: TisaError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrekeysLow(Event):
    """The relay says this member's published one-time prekeys run low (``one_time``
    left; ``signed_not_after`` of its signed prekey, 0 for none): the node is
    publishing more, and releases to it fall back to the signed prekey meanwhile."""

    KIND: ClassVar[str] = "prekeys_low"
    one_time: int
    signed_not_after: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WeakerWrap(Event):
    """A token was issued with less than a one-time prekey: ``mode`` ``signed`` (the
    relay had none of ``recipient``'s one-time prekeys left) or ``identity`` (no signed
    prekey either; the arrangement allows this last resort, without forward secrecy)."""

    KIND: ClassVar[str] = "weaker_wrap"
    token: bytes
    recipient: str
    mode: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliveredReport:
    """A verified report, stored in this node's inbox and handed to the application by
    :meth:`clients.node.Node.reports`, again and again until the application
    acknowledges it with :meth:`clients.node.Node.ack`.

    ``body`` is the plaintext in memory when it is small, else the path of a file in
    the inbox holding it (valid as long as the store is); the same holds per attachment.
    ``token_id`` identifies the delivery: an application that records it with its
    effect can recognise a report handed over again after a crash.
    """

    header: ReportHeader
    body: bytes | pathlib.Path
    attachments: dict[str, bytes | pathlib.Path]
    token_id: bytes
    originator: str

    @property
    def report_id(self) -> bytes:
        """The report's id, from its verified header."""
        return self.header.id

    def read_body(self) -> bytes:
        """The body as bytes, reading the file when it was too large to hold."""
        return self.body if isinstance(self.body, bytes) else self.body.read_bytes()


_EVENTS: dict[str, type[Event]] = {
    cls.KIND: cls
    for cls in (
        Stored,
        Released,
        RefusedEvent,
        ExpiredEvent,
        RevokedEvent,
        ReceiptEvent,
        ReleaseGap,
        DeliveryRejected,
        AnnouncementEvent,
        RequestEvent,
        ApprovedEvent,
        DeniedEvent,
        ConsentRejected,
        PrekeysLow,
        WeakerWrap,
    )
}
# Events that carry a signed object, stored as its encoding and verified again on load.
_SIGNED: dict[str, tuple[str, Any]] = {
    Stored.KIND: ("ack", StoredAck),
    ReceiptEvent.KIND: ("receipt", Receipt),
    AnnouncementEvent.KIND: ("announcement", Announcement),
    RequestEvent.KIND: ("request", Request),
    DeniedEvent.KIND: ("answer", Answer),
}


def _error_record(error: TisaError) -> dict[str, Any]:
    if isinstance(error, Refused):
        return {"e": "refused", "reason": error.reason.value, "detail": error.detail}
    if isinstance(error, ProtocolError):
        return {"e": "protocol", "detail": error.detail}
    return {"e": "verification"}


def _error_from(record: dict[str, Any]) -> TisaError:
    if record["e"] == "refused":
        return Refused(Reason(record["reason"]), record["detail"])
    if record["e"] == "protocol":
        return ProtocolError(record["detail"])
    return VerificationError()


# Field values written as they are (the common case, checked first).
_PLAIN = frozenset({bytes, str, int, bool, type(None)})


# The field names of each event class, looked up once.
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(event: Event) -> tuple[str, ...]:
    cls = type(event)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(field.name for field in dataclasses.fields(event))
    return names


def encode_event(event: Event) -> tuple[str, bytes]:
    """The store record of ``event``: (kind, msgpack bytes)."""
    fields: dict[str, Any] = {}
    for name in _field_names(event):
        value = getattr(event, name)
        if type(value) in _PLAIN:
            pass
        elif isinstance(value, StoredAck | Receipt | Announcement | Request | Answer):
            value = value.encoded
        elif isinstance(value, TisaError):
            value = _error_record(value)
        elif isinstance(value, Reason):
            value = value.value
        fields[name] = value
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return event.KIND, packed


def verified_on_decode(kind: str) -> bool:
    """Whether :func:`decode_event` verifies a signature in a record of ``kind``."""
    return kind in _SIGNED


def decode_event(kind: str, data: bytes, *, arrangement: Any) -> Event:
    """Rebuild an event from its store record (signed parts are verified again)."""
    cls = _EVENTS[kind]
    fields: dict[str, Any] = msgpack.unpackb(data, raw=False)
    if kind in _SIGNED:
        name, signed = _SIGNED[kind]
        fields[name] = signed.verify(fields[name], arrangement)
    elif cls is DeliveryRejected or cls is ConsentRejected:
        fields["error"] = _error_from(fields["error"])
    elif cls is RefusedEvent:
        fields["reason"] = Reason(fields["reason"])
    return cls(**fields)
