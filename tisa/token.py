"""Release tokens: the originator's signed permission to deliver one report to one recipient.

A token binds its id, the arrangement (id and version), originator, relay, one
recipient, the report id, the ciphertext digest and size, scope, level, a validity
window, a per-(originator, recipient) release counter, a commitment to the content key,
and the content key itself sealed to the recipient (libsodium sealed box). It travels as
a signed envelope (:mod:`tisa.envelope`) in context ``token``.

Two checks: :func:`check_for_relay` (everything but the key, which the relay cannot open)
and :func:`check_for_recipient` (all of that, then unseal and check the key commitment).
The report itself is checked against the token by :class:`tisa.report.ReportOpener`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nacl.bindings as sodium

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Role
from tisa.envelope import open_envelope, seal_envelope
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import DIGEST_SIZE, KEY_SIZE, Context, MemberSecret, random_id, verify
from tisa.limits import CLOCK_SKEW, MAX_NAME, MAX_REPORT_SIZE
from tisa.report import REPORT_ID_SIZE, ReportOpener, key_commitment

__all__ = [
    "MAX_TOKEN_SIZE",
    "Release",
    "ReleaseToken",
    "check_for_recipient",
    "check_for_relay",
    "issue_token",
]

TOKEN_ID_SIZE = 16
SEALED_KEY_SIZE = KEY_SIZE + sodium.crypto_box_SEALBYTES  # 80
# An encoded token: ~400 bytes with names at their longest; 2 KiB leaves room.
MAX_TOKEN_SIZE = 2048
# Longest validity window an originator may grant: 30 days. A token outliving that is
# more likely a mistake than a plan, and the relay keeps consumed ids at least this long.
MAX_VALIDITY = 30 * 24 * 3600

_name = enc.text(MAX_NAME)
_SCHEMA: dict[str, enc.Field] = {
    "v": enc.uint(1, 1),
    "id": enc.bin_exact(TOKEN_ID_SIZE),
    "arrangement": enc.bin_exact(DIGEST_SIZE),
    "version": enc.uint(2**32, 1),
    "originator": _name,
    "relay": _name,
    "recipient": _name,
    "report": enc.bin_exact(REPORT_ID_SIZE),
    "digest": enc.bin_exact(DIGEST_SIZE),
    "size": enc.uint(MAX_REPORT_SIZE, 1),
    "scope": _name,
    "level": _name,
    "not_before": enc.uint(),
    "not_after": enc.uint(),
    "counter": enc.uint(2**63, 1),
    "key_commit": enc.bin_exact(DIGEST_SIZE),
    "sealed_key": enc.bin_exact(SEALED_KEY_SIZE),
}
# A token that approves a release request (tisa.consent) carries one more key, "request":
# the request's id. It is absent (never nil) from every other token, so a token without
# it encodes exactly as before.
_SCHEMA_WITH_REQUEST: dict[str, enc.Field] = {**_SCHEMA, "request": enc.bin_exact(TOKEN_ID_SIZE)}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseToken:
    """A decoded token. ``encoded`` is the envelope as sent; ``signature`` not yet checked
    unless it came from one of the check functions."""

    id: bytes
    arrangement: bytes
    version: int
    originator: str
    relay: str
    recipient: str
    report: bytes
    digest: bytes
    size: int
    scope: str
    level: str
    not_before: int
    not_after: int
    counter: int
    key_commit: bytes
    sealed_key: bytes = dataclasses.field(repr=False)
    # The id of the release request this token approves (tisa.consent), or None.
    request: bytes | None = None
    encoded: bytes = dataclasses.field(repr=False, compare=False)
    body: bytes = dataclasses.field(repr=False, compare=False)
    signature: bytes = dataclasses.field(repr=False, compare=False)
    # Set only by decode: the fields are exactly what ``body`` holds, so a check need not
    # decode ``encoded`` again (one built by hand, or copied with dataclasses.replace,
    # has it False and is decoded again before it is trusted).
    _from_encoding: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def decode(cls, data: bytes) -> ReleaseToken:
        """Decode without verifying. Raises ProtocolError."""
        body, fields, signature = open_envelope(data, max_size=MAX_TOKEN_SIZE, what="token")
        schema = _SCHEMA_WITH_REQUEST if "request" in fields else _SCHEMA
        fields = enc.check_map(fields, schema, "token")
        if fields["not_after"] <= fields["not_before"]:
            raise ProtocolError("token: empty validity window")
        fields.pop("v")
        token = cls(**fields, encoded=bytes(data), body=body, signature=signature)
        object.__setattr__(token, "_from_encoding", True)
        return token


def issue_token(
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    *,
    recipient: str,
    report_id: bytes,
    digest: bytes,
    size: int,
    content_key: bytes,
    scope: str,
    level: str,
    not_before: int,
    not_after: int,
    counter: int,
    request: bytes | None = None,
    _token_id: bytes | None = None,
) -> bytes:
    """Issue a signed release token for one recipient; returns its encoding.

    With ``request`` (a release request's id, :mod:`tisa.consent`) the token approves
    that request; the relay then checks that the request is open and addressed by the
    recipient to this originator for this report.

    Raises:
        Refused: the arrangement does not allow this release (parties, scope, level).
        UsageError: bad arguments (window, sizes, a key that is not ``name``'s).
    """
    arrangement.check_share(name, [recipient], scope, level)
    if secret.public != arrangement.member(name).identity:
        raise UsageError(f"this key is not {name!r}'s key in the arrangement")
    if not 0 <= not_before < not_after or not_after - not_before > MAX_VALIDITY:
        raise UsageError(f"validity window must be non-empty and at most {MAX_VALIDITY} s")
    if counter < 1:
        raise UsageError("release counters start at 1")
    if type(content_key) is not bytes or len(content_key) != KEY_SIZE:
        raise UsageError("content key is 32 bytes")
    recipient_key = arrangement.member(recipient).identity.encryption.raw
    body: dict[str, Any] = {
        "v": 1,
        "id": _token_id or random_id(),
        "arrangement": arrangement.id,
        "version": arrangement.version,
        "originator": name,
        "relay": arrangement.relay,
        "recipient": recipient,
        "report": report_id,
        "digest": digest,
        "size": size,
        "scope": scope,
        "level": level,
        "not_before": not_before,
        "not_after": not_after,
        "counter": counter,
        "key_commit": key_commitment(content_key, report_id),
        "sealed_key": bytes(sodium.crypto_box_seal(content_key, recipient_key)),
    }
    if request is not None:
        body["request"] = request
    try:
        enc.check_map(body, _SCHEMA_WITH_REQUEST if request is not None else _SCHEMA, "token")
    except ProtocolError as exc:
        raise UsageError(exc.detail) from None
    return seal_envelope(secret, Context.TOKEN, body)


def _check_common(
    token: ReleaseToken | bytes, arrangement: Arrangement, *, now: int, clock_skew: int
) -> ReleaseToken:
    # A ReleaseToken built by hand could carry fields that differ from its signed body;
    # decoding the encoded form again makes the fields exactly what was signed. One that
    # ReleaseToken.decode made is that already: the relay decodes each token once.
    if not isinstance(token, ReleaseToken):
        token = ReleaseToken.decode(token)
    elif not token._from_encoding:
        token = ReleaseToken.decode(token.encoded)
    # The signature comes first: a refusal with a reason code must rest on what the
    # originator signed, never on a field anyone could have altered in transit. A name
    # that is no originator gives no key to check with, so it fails the same opaque way.
    try:
        originator = arrangement.require_role(token.originator, Role.ORIGINATOR)
    except Refused:
        raise VerificationError() from None
    verify(originator.identity.signing, Context.TOKEN, token.body, token.signature)
    # Authentic from here on: the rest are policy checks with precise reasons.
    if token.arrangement != arrangement.id or token.version != arrangement.version:
        raise Refused(Reason.WRONG_ARRANGEMENT, "token names another arrangement version")
    if token.relay != arrangement.relay:
        raise Refused(Reason.WRONG_RELAY, f"token is for relay {token.relay!r}")
    arrangement.check_share(token.originator, [token.recipient], token.scope, token.level)
    if now + clock_skew < token.not_before:
        raise Refused(Reason.NOT_YET_VALID, f"token valid from {token.not_before}")
    if now - clock_skew >= token.not_after:
        raise Refused(Reason.EXPIRED, f"token expired at {token.not_after}")
    return token


def check_for_relay(
    token: ReleaseToken | bytes,
    arrangement: Arrangement,
    *,
    report_id: bytes,
    digest: bytes,
    size: int,
    originator: str,
    now: int,
    clock_skew: int = CLOCK_SKEW,
) -> ReleaseToken:
    """The relay's check against the stored report. Consuming the token is the caller's.

    Args:
        token: the encoded token (or one already decoded).
        arrangement: the effective arrangement the relay serves.
        report_id, digest, size, originator: of the stored report the token names.
        now: current unix time in seconds.

    Returns:
        The verified token.

    Raises:
        ProtocolError: malformed. VerificationError: bad signature, or an originator
            the arrangement does not list (there is no key to check it with).
        Refused: WRONG_ARRANGEMENT, NOT_A_MEMBER, WRONG_ROLE, WRONG_RELAY, OUT_OF_SCOPE,
            LEVEL_NOT_ALLOWED, NOT_YET_VALID, EXPIRED, WRONG_REPORT, WRONG_ORIGINATOR.
    """
    checked = _check_common(token, arrangement, now=now, clock_skew=clock_skew)
    if checked.report != report_id:
        raise Refused(Reason.WRONG_REPORT, "token names another report")
    if checked.originator != originator:
        raise Refused(Reason.WRONG_ORIGINATOR, "token signed by someone else than the submitter")
    if checked.digest != digest or checked.size != size:
        raise Refused(Reason.WRONG_REPORT, "token digest or size differs from the stored report")
    return checked


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """A token verified by its recipient, with the content key unsealed."""

    token: ReleaseToken
    content_key: bytes = dataclasses.field(repr=False)

    def opener(self, arrangement: Arrangement, **kwargs: Any) -> ReportOpener:
        """A :class:`ReportOpener` for the report this release names."""
        t = self.token
        return ReportOpener(
            content_key=self.content_key,
            report_id=t.report,
            digest=t.digest,
            size=t.size,
            arrangement=arrangement,
            recipient=t.recipient,
            originator=t.originator,
            scope=t.scope,
            level=t.level,
            **kwargs,
        )


def check_for_recipient(
    token: ReleaseToken | bytes,
    arrangement: Arrangement,
    secret: MemberSecret,
    name: str,
    *,
    now: int,
    clock_skew: int = CLOCK_SKEW,
) -> Release:
    """The recipient's check: everything the relay checks that it can, then the key.

    Raises:
        ProtocolError, VerificationError (opaque for anything cryptographic),
        Refused (as :func:`check_for_relay`, plus WRONG_RECIPIENT).
    """
    checked = _check_common(token, arrangement, now=now, clock_skew=clock_skew)
    if checked.recipient != name:
        raise Refused(Reason.WRONG_RECIPIENT, f"token is for {checked.recipient!r}")
    if secret.public != arrangement.member(name).identity:
        raise UsageError(f"this key is not {name!r}'s key in the arrangement")
    key = secret.unseal(checked.sealed_key)
    if len(key) != KEY_SIZE or key_commitment(key, checked.report) != checked.key_commit:
        raise VerificationError()
    return Release(checked, key)
