"""Consent: announcements of held reports, release requests, and signed denials.

Three signed objects, each a signed envelope (:mod:`tisa.envelope`) under a context label
of its own, so none verifies as another or as any other kind:

* :class:`Announcement` (context ``announce``): the originator tells chosen members that
  it holds a report, revealing only what it chooses: the report id, scope, level, a size
  bucket and a short title. Optional; nobody learns of a held report otherwise.
* :class:`Request` (context ``request``): a member asks the originator to release a
  report, with a purpose text. Bound to the arrangement (id and version), the report id,
  the requester, the originator and a fresh request id, and valid until ``expires``.
* :class:`Answer` (context ``answer``): the originator's signed denial of one request,
  with a reason code from :data:`DENIAL_REASONS` and an optional note. A denial is final
  for that request; a new request may follow.

An approval is not an :class:`Answer`: it is an ordinary release token
(:mod:`tisa.token`) whose optional ``request`` field names the request it answers, so the
content key travels exactly as for any release and the relay consumes one object.

The acceptance rules each party applies on top of the signatures are pure functions here
(:func:`check_incoming_request`, :func:`check_answer`, :func:`check_approval`), so they are
tested without I/O and every node applies the same ones. They refuse a replayed, reflected
or re-targeted request or answer with a reason code, and an answer from anyone but the
originator the request was addressed to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar, Self

from tisa import encoding as enc
from tisa.arrangement import MAX_MEMBERS, Arrangement, Role
from tisa.envelope import open_envelope, seal_envelope
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import DIGEST_SIZE, Context, MemberSecret, random_id, verify
from tisa.limits import MAX_NAME, MAX_REPORT_SIZE
from tisa.report import REPORT_ID_SIZE

__all__ = [
    "DENIAL_REASONS",
    "MAX_CONSENT_SIZE",
    "MAX_NOTE",
    "MAX_PURPOSE",
    "MAX_REQUEST_VALIDITY",
    "MAX_TITLE",
    "Announcement",
    "Answer",
    "Request",
    "check_answer",
    "check_approval",
    "check_incoming_request",
    "consent_ref",
    "size_bucket",
]

ID_SIZE = 16
# A short title, as a subject line: 200 bytes of UTF-8 says what a report is about
# without becoming a summary of it (the threat model counts it as revealed).
MAX_TITLE = 200
# Why the requester wants the report: a paragraph, enough for an approver to decide.
MAX_PURPOSE = 1000
# An optional note with a denial: a sentence or two.
MAX_NOTE = 500
# Longest time a request stays open: as long as a token may be valid (30 days); an
# originator that has not answered by then answers a new request, not a stale one.
MAX_REQUEST_VALIDITY = 30 * 24 * 3600
# Largest encoded announcement, request or answer. An announcement to every member of a
# full arrangement (256 names of up to 128 bytes) is ~34 KiB; the others are ~1.5 KiB.
MAX_CONSENT_SIZE = 40 * 1024

DENIAL_REASONS: frozenset[Reason] = frozenset(
    {
        Reason.DENIED,
        Reason.OUT_OF_SCOPE,
        Reason.LEVEL_NOT_ALLOWED,
        Reason.EXPIRED,
        Reason.UNAVAILABLE,
        Reason.RATE_LIMITED,
    }
)
"""The reason codes a denial may carry, and no other."""

_name = enc.text(MAX_NAME)
_ID = enc.bin_exact(ID_SIZE)
_COMMON: dict[str, enc.Field] = {
    "v": enc.uint(1, 1),
    "arrangement": enc.bin_exact(DIGEST_SIZE),
    "version": enc.uint(2**32, 1),
    "report": enc.bin_exact(REPORT_ID_SIZE),
}
# Sizes are powers of two up to MAX_REPORT_SIZE (2^32): the bucket is the exponent.
_MAX_BUCKET = MAX_REPORT_SIZE.bit_length() - 1


def size_bucket(size: int) -> int:
    """The smallest ``k`` with ``size <= 2**k``: what an announcement reveals of a size.

    Raises:
        UsageError: ``size`` is not in 1..MAX_REPORT_SIZE.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_REPORT_SIZE:
        raise UsageError(f"a report size is 1..{MAX_REPORT_SIZE} bytes")
    return (size - 1).bit_length()


def consent_ref(kind: str, data: bytes) -> bytes:
    """The id a consent object goes by, read without verifying: an announcement's
    ``id``, a request's ``id``, an answer's ``request``. Empty if ``data`` does not
    decode that far (the relay and the nodes ack and refuse by this id)."""
    try:
        _, fields, _ = open_envelope(data, max_size=MAX_CONSENT_SIZE, what=kind)
    except ProtocolError:
        return b""
    ref = fields.get("request" if kind == "answer" else "id")
    return ref if type(ref) is bytes and len(ref) == ID_SIZE else b""


def _sign(
    secret: MemberSecret,
    signer: str,
    role: Role,
    arrangement: Arrangement,
    context: Context,
    schema: dict[str, enc.Field],
    body: dict[str, Any],
    what: str,
) -> tuple[dict[str, Any], bytes]:
    """Check ``body`` as the verifier will, then sign it; returns (fields, encoded)."""
    try:
        member = arrangement.require_role(signer, role)
    except Refused as exc:
        raise UsageError(str(exc)) from None
    if secret.public != member.identity:
        raise UsageError(f"this key is not {signer!r}'s key in the arrangement")
    try:
        fields = enc.check_map(dict(body), schema, what)
    except ProtocolError as exc:
        raise UsageError(exc.detail) from None
    encoded = seal_envelope(secret, context, body)
    fields.pop("v")
    return fields, encoded


def _open(
    data: bytes,
    arrangement: Arrangement,
    *,
    signer_field: str,
    role: Role,
    context: Context,
    schema: dict[str, enc.Field],
    what: str,
) -> dict[str, Any]:
    """Decode, check the schema and the signer's signature, then the arrangement.

    The signature comes first: a refusal with a reason code rests on signed fields only.
    A signer the arrangement does not list in ``role`` gives no key: the opaque failure.
    """
    body, fields, signature = open_envelope(data, max_size=MAX_CONSENT_SIZE, what=what)
    fields = enc.check_map(fields, schema, what)
    try:
        member = arrangement.require_role(fields[signer_field], role)
    except Refused:
        raise VerificationError() from None
    verify(member.identity.signing, context, body, signature)
    if fields["arrangement"] != arrangement.id or fields["version"] != arrangement.version:
        raise Refused(Reason.WRONG_ARRANGEMENT, f"{what} names another arrangement version")
    fields.pop("v")
    return fields


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """An originator's signed statement that it holds a report, sent to chosen members.

    Make one with :meth:`issue` or :meth:`verify`; both set ``encoded``.

    Attributes:
        id: a fresh id of this announcement (the relay queues and acks by it).
        arrangement, version: the arrangement it was made under.
        originator: who holds the report (and signed this).
        to: the members told, sorted; only they receive it.
        report: the report id.
        scope, level: of the report, as the arrangement lists them.
        size_bucket: the report's ciphertext is at most ``2**size_bucket`` bytes.
        title: a short title, possibly empty.
        time: unix time (seconds) of the announcement at the originator.
    """

    id: bytes
    arrangement: bytes
    version: int
    originator: str
    to: tuple[str, ...]
    report: bytes
    scope: str
    level: str
    size_bucket: int
    title: str
    time: int
    encoded: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    _SCHEMA: ClassVar[dict[str, enc.Field]] = {
        **_COMMON,
        "id": _ID,
        "originator": _name,
        "to": enc.list_of(_name, min_items=1, max_items=MAX_MEMBERS, unique=True, sorted_=True),
        "scope": _name,
        "level": _name,
        "size_bucket": enc.uint(_MAX_BUCKET),
        "title": enc.text(MAX_TITLE, allow_empty=True),
        "time": enc.uint(),
    }

    @classmethod
    def issue(
        cls,
        secret: MemberSecret,
        originator: str,
        arrangement: Arrangement,
        *,
        report: bytes,
        to: Iterable[str],
        scope: str,
        level: str,
        size: int,
        title: str = "",
        now: int,
        _id: bytes | None = None,
    ) -> Self:
        """Sign an announcement of ``report`` (of ``size`` ciphertext bytes) to ``to``.

        Raises:
            Refused: the arrangement does not allow this share (as for a report).
            UsageError: bad arguments, or a key that is not ``originator``'s.
        """
        names = sorted(set(to), key=str.encode)
        arrangement.check_share(originator, names, scope, level)
        body: dict[str, Any] = {
            "v": 1,
            "id": _id or random_id(),
            "arrangement": arrangement.id,
            "version": arrangement.version,
            "originator": originator,
            "to": names,
            "report": report,
            "scope": scope,
            "level": level,
            "size_bucket": size_bucket(size),
            "title": title,
            "time": now,
        }
        fields, encoded = _sign(
            secret,
            originator,
            Role.ORIGINATOR,
            arrangement,
            Context.ANNOUNCE,
            cls._SCHEMA,
            body,
            "announcement",
        )
        fields["to"] = tuple(fields["to"])
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify against the originator's key in ``arrangement``.

        Raises:
            ProtocolError: malformed. VerificationError: bad signature, or an originator
                the arrangement does not list as one.
            Refused: WRONG_ARRANGEMENT; NOT_A_MEMBER, WRONG_ROLE, WRONG_RECIPIENT,
                OUT_OF_SCOPE, LEVEL_NOT_ALLOWED (the share it announces is not allowed).
        """
        fields = _open(
            data,
            arrangement,
            signer_field="originator",
            role=Role.ORIGINATOR,
            context=Context.ANNOUNCE,
            schema=cls._SCHEMA,
            what="announcement",
        )
        arrangement.check_share(
            fields["originator"], fields["to"], fields["scope"], fields["level"]
        )
        fields["to"] = tuple(fields["to"])
        return cls(**fields, encoded=bytes(data))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A member's signed request that an originator release one report to it.

    Make one with :meth:`issue` or :meth:`verify`; both set ``encoded``.

    Attributes:
        id: a fresh request id, chosen by the requester.
        arrangement, version: the arrangement it was made under.
        requester: who asks (and signed this); a recipient of the arrangement.
        originator: whom it asks; an originator of the arrangement.
        report: the report id.
        purpose: why, for the originator's application to weigh.
        time: unix time (seconds) of the request at the requester.
        expires: after this unix time the request is no longer open.
    """

    id: bytes
    arrangement: bytes
    version: int
    requester: str
    originator: str
    report: bytes
    purpose: str
    time: int
    expires: int
    encoded: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    _SCHEMA: ClassVar[dict[str, enc.Field]] = {
        **_COMMON,
        "id": _ID,
        "requester": _name,
        "originator": _name,
        "purpose": enc.text(MAX_PURPOSE),
        "time": enc.uint(),
        "expires": enc.uint(),
    }

    @classmethod
    def issue(
        cls,
        secret: MemberSecret,
        requester: str,
        arrangement: Arrangement,
        *,
        originator: str,
        report: bytes,
        purpose: str,
        now: int,
        valid_for: int,
        _id: bytes | None = None,
    ) -> Self:
        """Sign a request as ``requester`` to ``originator`` for ``report``.

        Raises:
            Refused: WRONG_ROLE / NOT_A_MEMBER (``originator`` cannot originate),
                WRONG_RECIPIENT (a member asking itself).
            UsageError: bad arguments (``valid_for`` outside 1..MAX_REQUEST_VALIDITY, an
                empty or too long purpose), or a key that is not ``requester``'s.
        """
        if not 1 <= valid_for <= MAX_REQUEST_VALIDITY:
            raise UsageError(f"a request is valid for 1..{MAX_REQUEST_VALIDITY} seconds")
        _check_parties(arrangement, requester=requester, originator=originator)
        body: dict[str, Any] = {
            "v": 1,
            "id": _id or random_id(),
            "arrangement": arrangement.id,
            "version": arrangement.version,
            "requester": requester,
            "originator": originator,
            "report": report,
            "purpose": purpose,
            "time": now,
            "expires": now + valid_for,
        }
        fields, encoded = _sign(
            secret,
            requester,
            Role.RECIPIENT,
            arrangement,
            Context.REQUEST,
            cls._SCHEMA,
            body,
            "request",
        )
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify against the requester's key in ``arrangement``.

        Raises:
            ProtocolError: malformed, or a validity window that is empty or longer than
                MAX_REQUEST_VALIDITY. VerificationError: bad signature, or a requester
                the arrangement does not list as a recipient.
            Refused: WRONG_ARRANGEMENT; NOT_A_MEMBER / WRONG_ROLE (the originator named
                cannot originate); WRONG_RECIPIENT (requester and originator are one).
        """
        fields = _open(
            data,
            arrangement,
            signer_field="requester",
            role=Role.RECIPIENT,
            context=Context.REQUEST,
            schema=cls._SCHEMA,
            what="request",
        )
        if not 0 < fields["expires"] - fields["time"] <= MAX_REQUEST_VALIDITY:
            raise ProtocolError("request: validity window empty or too long")
        _check_parties(arrangement, requester=fields["requester"], originator=fields["originator"])
        return cls(**fields, encoded=bytes(data))

    def check_open(self, *, now: int, clock_skew: int) -> None:
        """Raises Refused(EXPIRED) once the request has lapsed (with ``clock_skew`` of grace)."""
        if now - clock_skew >= self.expires:
            raise Refused(Reason.EXPIRED, f"request expired at {self.expires}")


def _check_parties(arrangement: Arrangement, *, requester: str, originator: str) -> None:
    arrangement.require_role(originator, Role.ORIGINATOR)
    arrangement.require_role(requester, Role.RECIPIENT)
    if requester == originator:
        raise Refused(Reason.WRONG_RECIPIENT, "a member does not ask itself")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """An originator's signed denial of one request (an approval is a token instead).

    Make one with :meth:`deny` or :meth:`verify`; both set ``encoded``.

    Attributes:
        request: the id of the request it answers.
        arrangement, version: the arrangement it was made under.
        originator: who answers (and signed this).
        requester: who asked.
        report: the report the request named.
        reason: one of :data:`DENIAL_REASONS`.
        note: free text for the requester, possibly empty.
        time: unix time (seconds) of the answer at the originator.
    """

    request: bytes
    arrangement: bytes
    version: int
    originator: str
    requester: str
    report: bytes
    reason: Reason
    note: str
    time: int
    encoded: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    _SCHEMA: ClassVar[dict[str, enc.Field]] = {
        **_COMMON,
        "request": _ID,
        "originator": _name,
        "requester": _name,
        "reason": enc.one_of(*sorted(r.value for r in DENIAL_REASONS)),
        "note": enc.text(MAX_NOTE, allow_empty=True),
        "time": enc.uint(),
    }

    @classmethod
    def deny(
        cls,
        secret: MemberSecret,
        originator: str,
        arrangement: Arrangement,
        request: Request,
        *,
        reason: Reason | str,
        note: str = "",
        now: int,
    ) -> Self:
        """Sign a denial of ``request`` as its originator.

        Raises:
            UsageError: ``reason`` is not a denial reason, ``request`` is not addressed
                to ``originator``, or the key is not ``originator``'s.
        """
        if request.originator != originator:
            raise UsageError("only the originator a request names answers it")
        try:
            code = Reason(reason)
        except ValueError:
            code = None
        if code not in DENIAL_REASONS:
            raise UsageError(f"a denial reason is one of {sorted(r.value for r in DENIAL_REASONS)}")
        body: dict[str, Any] = {
            "v": 1,
            "request": request.id,
            "arrangement": arrangement.id,
            "version": arrangement.version,
            "originator": originator,
            "requester": request.requester,
            "report": request.report,
            "reason": str(code),
            "note": note,
            "time": now,
        }
        fields, encoded = _sign(
            secret,
            originator,
            Role.ORIGINATOR,
            arrangement,
            Context.ANSWER,
            cls._SCHEMA,
            body,
            "answer",
        )
        fields["reason"] = Reason(fields["reason"])
        return cls(**fields, encoded=encoded)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Self:
        """Decode and verify against the originator's key in ``arrangement``.

        Raises:
            ProtocolError: malformed (also a reason outside :data:`DENIAL_REASONS`).
            VerificationError: bad signature, or an originator the arrangement does not
                list as one. Refused: WRONG_ARRANGEMENT.
        """
        fields = _open(
            data,
            arrangement,
            signer_field="originator",
            role=Role.ORIGINATOR,
            context=Context.ANSWER,
            schema=cls._SCHEMA,
            what="answer",
        )
        fields["reason"] = Reason(fields["reason"])
        return cls(**fields, encoded=bytes(data))


# --- acceptance rules ----------------------------------------------------------------------


def check_incoming_request(
    request: Request,
    name: str,
    *,
    seen: bool,
    holds_report: bool,
    now: int,
    clock_skew: int,
) -> None:
    """The originator's rules for a verified request the relay forwarded to ``name``.

    Args:
        request: verified with :meth:`Request.verify`.
        name: this member.
        seen: this member has received a request with this id before.
        holds_report: ``request.report`` is a report this member submitted.

    Raises:
        Refused: REFLECTED (this member's own request sent back to it), WRONG_ORIGINATOR
            (addressed to another originator: re-targeted), REPLAYED, EXPIRED,
            UNKNOWN_REPORT.
    """
    if request.originator != name:
        if request.requester == name:
            raise Refused(Reason.REFLECTED, "this member's own request came back to it")
        raise Refused(Reason.WRONG_ORIGINATOR, f"request addressed to {request.originator!r}")
    if seen:
        raise Refused(Reason.REPLAYED, "request received before")
    request.check_open(now=now, clock_skew=clock_skew)
    if not holds_report:
        raise Refused(Reason.UNKNOWN_REPORT, "no such report of this member")


def check_answer(answer: Answer, name: str, made: Request | None, *, answered: bool) -> None:
    """The requester's rules for a verified answer the relay forwarded to ``name``.

    Args:
        answer: verified with :meth:`Answer.verify`.
        name: this member.
        made: this member's own request with the id ``answer.request``, or None.
        answered: that request was answered (denied or approved) before.

    Raises:
        Refused: REFLECTED (this member's own answer sent back to it), WRONG_RECIPIENT
            (an answer to someone else's request: re-targeted), UNSOLICITED (no request
            of this member has that id), WRONG_ORIGINATOR (signed by another member
            than the one asked), WRONG_REPORT, REPLAYED (the request was answered).
    """
    if answer.requester != name:
        if answer.originator == name:
            raise Refused(Reason.REFLECTED, "this member's own answer came back to it")
        raise Refused(Reason.WRONG_RECIPIENT, f"answer to {answer.requester!r}")
    _check_answers(made, answer.originator, answer.report, answered=answered)


def check_approval(token: Any, name: str, made: Request | None, *, answered: bool) -> None:
    """The requester's rules for a verified release token that names a request.

    Args:
        token: a :class:`tisa.token.ReleaseToken` verified for ``name`` (its ``request``
            is set).
        made: this member's own request with the id ``token.request``, or None.
        answered: that request was answered before.

    Raises:
        Refused: as :func:`check_answer`: UNSOLICITED, WRONG_ORIGINATOR, WRONG_REPORT,
            REPLAYED.
    """
    if token.recipient != name:
        raise Refused(Reason.WRONG_RECIPIENT, f"token is for {token.recipient!r}")
    _check_answers(made, token.originator, token.report, answered=answered)


def _check_answers(made: Request | None, originator: str, report: bytes, *, answered: bool) -> None:
    if made is None:
        raise Refused(Reason.UNSOLICITED, "no request of this member has that id")
    if originator != made.originator:
        raise Refused(Reason.WRONG_ORIGINATOR, f"the request asked {made.originator!r}")
    if report != made.report:
        raise Refused(Reason.WRONG_REPORT, "the request named another report")
    if answered:
        raise Refused(Reason.REPLAYED, "the request was answered before")
