"""Release tokens: the originator's signed permission to deliver one report to one recipient.

A token binds its id, the arrangement (id and version), originator, relay, one
recipient, the report id, the ciphertext digest and size, scope, level, a validity
window, a per-(originator, recipient) release counter, a commitment to the content key,
the content key itself wrapped to the recipient's prekeys (:mod:`tisa.prekeys`), and,
in a token approving a release request (:mod:`tisa.consent`), the request's id. It
travels as a signed envelope (:mod:`tisa.envelope`) in context ``token``.

Two checks: :func:`check_for_relay` (everything but the key, which the relay cannot open)
and :func:`check_for_recipient` (all of that, then unwrap and check the key commitment).
The report itself is checked against the token by :class:`tisa.report.ReportOpener`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Role
from tisa.envelope import open_envelope, seal_checked, split_envelope
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import DIGEST_SIZE, KEY_SIZE, Context, MemberSecret, random_id, verify
from tisa.limits import CLOCK_SKEW, MAX_NAME, MAX_REPORT_SIZE
from tisa.prekeys import (
    KeyWrap,
    Prekey,
    PrekeyKind,
    WrapFields,
    WrapMode,
    unwrap_content_key,
    wrap_content_key,
)
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
# Version 2: the content key is wrapped to prekeys (``wrap``) instead of sealed to the
# recipient's long-term key (``sealed_key``).
TOKEN_VERSION = 2
# An encoded token: ~400 bytes with names at their longest; 2 KiB leaves room.
MAX_TOKEN_SIZE = 2048
# Longest validity window an originator may grant: 30 days. A token outliving that is
# more likely a mistake than a plan, and the relay keeps consumed ids at least this long.
MAX_VALIDITY = 30 * 24 * 3600

_name = enc.text(MAX_NAME)
_SCHEMA: dict[str, enc.Field] = {
    "v": enc.uint(TOKEN_VERSION, TOKEN_VERSION),
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
    "wrap": KeyWrap.from_dict,
}
# A token that approves a release request (tisa.consent) carries one more key, "request":
# the request's id. It is absent (never nil) from every other token, so a token without
# it encodes exactly as before.
_SCHEMA_WITH_REQUEST: dict[str, enc.Field] = {**_SCHEMA, "request": enc.bin_exact(TOKEN_ID_SIZE)}
# The signed fields but the wrap: what issue_token checks (and encodes as the wrap's
# associated data) before it wraps the key.
_UNWRAPPED = {key: check for key, check in _SCHEMA.items() if key != "wrap"}
_UNWRAPPED_WITH_REQUEST = {**_UNWRAPPED, "request": _SCHEMA_WITH_REQUEST["request"]}

_TokenId = Annotated[bytes, msgspec.Meta(min_length=TOKEN_ID_SIZE, max_length=TOKEN_ID_SIZE)]
_Digest = Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
_ReportId = Annotated[bytes, msgspec.Meta(min_length=REPORT_ID_SIZE, max_length=REPORT_ID_SIZE)]
# Text: its UTF-8 length and control characters are checked after decoding (enc.is_text).
_Name = Annotated[str, msgspec.Meta(min_length=1)]
_Time = Annotated[int, msgspec.Meta(ge=0)]
# msgspec bounds integers within int64 only: the counter's top (2**63) is checked after.
_MAX_COUNTER = 2**63


class _TokenFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    # _SCHEMA_WITH_REQUEST typed, keys in canonical order, ``request`` absent when None:
    # the fast path of ReleaseToken.decode (enc.typed_decoder), one C call for the
    # decoding, types, sizes and ranges; the rest is checked in _decode_typed.
    arrangement: _Digest
    counter: Annotated[int, msgspec.Meta(ge=1)]
    digest: _Digest
    id: _TokenId
    key_commit: _Digest
    level: _Name
    not_after: _Time
    not_before: _Time
    originator: _Name
    recipient: _Name
    relay: _Name
    report: _ReportId
    request: _TokenId | None = None
    scope: _Name
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPORT_SIZE)]
    v: Annotated[int, msgspec.Meta(ge=TOKEN_VERSION, le=TOKEN_VERSION)]
    version: Annotated[int, msgspec.Meta(ge=1, le=2**32)]
    wrap: WrapFields


_decode_fields = enc.typed_decoder(_TokenFields)


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
    wrap: KeyWrap = dataclasses.field(repr=False)
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
        """Decode without verifying. Raises ProtocolError.

        A token in its canonical form is decoded once, straight into typed fields
        (:func:`tisa.encoding.typed_decoder`); anything that path does not accept goes
        through the schema, which accepts it the same or names the fault.
        """
        split = split_envelope(data, max_size=MAX_TOKEN_SIZE)
        if split is not None:
            token = cls._decode_typed(data, *split)
            if token is not None:
                return token
        return cls._decode_schema(data)

    @classmethod
    def _decode_typed(cls, data: bytes, body: bytes, signature: bytes) -> ReleaseToken | None:
        # The schema's checks that msgspec does not make, in one place; None hands the
        # token to _decode_schema (the tests feed both paths valid and mutated tokens).
        typed = _typed_body(body)
        if typed is None:
            return None
        fields, wrap = typed
        # The fields are checked: the token is built without __init__'s keywords.
        return _build_token(
            fields.id,
            fields.arrangement,
            fields.version,
            fields.originator,
            fields.relay,
            fields.recipient,
            fields.report,
            fields.digest,
            fields.size,
            fields.scope,
            fields.level,
            fields.not_before,
            fields.not_after,
            fields.counter,
            fields.key_commit,
            wrap,
            fields.request,
            data,
            body,
            signature,
            True,
        )

    @classmethod
    def _decode_schema(cls, data: bytes) -> ReleaseToken:
        body, fields, signature = open_envelope(data, max_size=MAX_TOKEN_SIZE, what="token")
        schema = _SCHEMA_WITH_REQUEST if "request" in fields else _SCHEMA
        fields = enc.check_map(fields, schema, "token")
        if fields["not_after"] <= fields["not_before"]:
            raise ProtocolError("token: empty validity window")
        fields.pop("v")
        token = cls(**fields, encoded=bytes(data), body=body, signature=signature)
        object.__setattr__(token, "_from_encoding", True)
        return token

    @property
    def associated_data(self) -> bytes:
        """What the key wrap authenticates: the canonical encoding of the signed body
        without its ``wrap`` (which cannot cover itself)."""
        if not self._from_encoding:
            fields = enc.unpack(self.body)
            del fields["wrap"]
            return enc.pack(fields)
        # Decoded from ``body``: the fields hold exactly its values (checked by the
        # schema), so the body need not be decoded a second time.
        fields = {
            "v": TOKEN_VERSION,
            "id": self.id,
            "arrangement": self.arrangement,
            "version": self.version,
            "originator": self.originator,
            "relay": self.relay,
            "recipient": self.recipient,
            "report": self.report,
            "digest": self.digest,
            "size": self.size,
            "scope": self.scope,
            "level": self.level,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "counter": self.counter,
            "key_commit": self.key_commit,
        }
        if self.request is not None:
            fields["request"] = self.request
        return enc.pack_checked(fields)


def _typed_body(body: bytes) -> tuple[_TokenFields, KeyWrap] | None:
    """The fields and wrap of a token body that the schema accepts, decoded the typed
    way; None for anything else (the schema then decides, naming the fault)."""
    fields = _decode_fields(body)
    if fields is None or fields.not_after <= fields.not_before:
        return None
    if fields.counter > _MAX_COUNTER:
        return None
    names = [fields.originator, fields.relay, fields.recipient, fields.scope, fields.level]
    if not enc.are_texts(names, MAX_NAME):
        return None
    wrap = KeyWrap.from_typed(fields.wrap)
    if wrap is None:
        return None
    return fields, wrap


_build_token = enc.slot_builder(
    ReleaseToken,
    (
        "id",
        "arrangement",
        "version",
        "originator",
        "relay",
        "recipient",
        "report",
        "digest",
        "size",
        "scope",
        "level",
        "not_before",
        "not_after",
        "counter",
        "key_commit",
        "wrap",
        "request",
        "encoded",
        "body",
        "signature",
        "_from_encoding",
    ),
)


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
    signed_prekey: bytes | None,
    one_time_prekey: bytes | None = None,
    request: bytes | None = None,
    token_id: bytes | None = None,
    _ephemeral: bytes | None = None,
) -> bytes:
    """Issue a signed release token for one recipient; returns its encoding.

    The token's id is ``token_id`` when given (:data:`TOKEN_ID_SIZE` bytes, which must
    be fresh: :func:`tisa.keys.random_id`; the relay refuses an id it has seen as a
    replay), else a fresh random one. A caller that picks it knows the id without
    decoding the token it gets back.

    The content key is wrapped to the recipient's identity key, ``signed_prekey`` and,
    when given, ``one_time_prekey`` (both encoded prekeys as the relay handed them out,
    checked here against the recipient and ``not_before``). Without a signed prekey the
    key is wrapped to the identity key alone, which only an arrangement with
    ``identity_fallback`` allows; the token's ``wrap.mode`` says which was done.

    With ``request`` (a release request's id, :mod:`tisa.consent`) the token approves
    that request; the relay then checks that the request is open and addressed by the
    recipient to this originator for this report. The request id is part of the body
    the key wrap authenticates.

    Raises:
        Refused: the arrangement does not allow this release (parties, scope, level);
            ``no_prekey``: no signed prekey and no identity fallback; ``bad_prekey`` or
            ``expired``: a prekey that is not the recipient's of its kind, or too old.
        VerificationError: a prekey whose signature is not its owner's.
        ProtocolError: a prekey that does not decode.
        UsageError: bad arguments (window, sizes, a key that is not ``name``'s).
    """
    arrangement.check_share(name, [recipient], scope, level)
    if secret.public != arrangement.member(name).identity:
        raise UsageError(f"this key is not {name!r}'s key in the arrangement")
    if not 0 <= not_before < not_after or not_after - not_before > MAX_VALIDITY:
        raise UsageError(f"validity window must be non-empty and at most {MAX_VALIDITY} s")
    if counter < 1:
        raise UsageError("release counters start at 1")
    if token_id is None:
        token_id = random_id()
    elif type(token_id) is not bytes or len(token_id) != TOKEN_ID_SIZE:
        raise UsageError(f"a token id is {TOKEN_ID_SIZE} bytes")
    if type(content_key) is not bytes or len(content_key) != KEY_SIZE:
        raise UsageError("content key is 32 bytes")
    if signed_prekey is None:
        if one_time_prekey is not None:
            raise UsageError("a one-time prekey is used with a signed prekey")
        if not arrangement.identity_fallback:
            raise Refused(Reason.NO_PREKEY, f"no signed prekey of {recipient!r}")
    prekeys = [
        Prekey.verify(data, arrangement, owner=recipient, kind=kind, now=not_before).key
        if data is not None
        else None
        for kind, data in (
            (PrekeyKind.SIGNED, signed_prekey),
            (PrekeyKind.ONE_TIME, one_time_prekey),
        )
    ]
    body: dict[str, Any] = {
        "v": TOKEN_VERSION,
        "id": token_id,
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
    }
    if request is not None:
        body["request"] = request
    identity = arrangement.member(recipient).identity.encryption.raw
    body_bytes = _encode_body_typed(body, content_key, identity, prekeys, _ephemeral)
    if body_bytes is not None:
        return seal_checked(secret, Context.TOKEN, body_bytes)
    try:
        # Checked once, before the wrap: the checked fields are plain values, encoded
        # without a second walk (as the associated data, then with the wrap).
        checked = enc.check_map(
            body, _UNWRAPPED_WITH_REQUEST if request is not None else _UNWRAPPED, "token"
        )
        wrap = wrap_content_key(
            content_key,
            enc.pack_checked(checked),
            identity=identity,
            signed=prekeys[0],
            one_time=prekeys[1],
            _ephemeral=_ephemeral,
        )
        checked["wrap"] = KeyWrap.from_dict(wrap.to_dict()).to_dict()
    except ProtocolError as exc:
        raise UsageError(exc.detail) from None
    return seal_checked(secret, Context.TOKEN, enc.pack_checked(checked))


def _encode_body_typed(
    body: dict[str, Any],
    content_key: bytes,
    identity: bytes,
    prekeys: list[bytes | None],
    ephemeral: bytes | None,
) -> bytes | None:
    # issue_token's fast path: plain values (enc.is_plain) encode to bytes that decode
    # back to them, so the recipient's typed decoding of the body (_typed_body) checks
    # the values themselves, wrap included. None, for anything it does not accept or a
    # wrap that fails, hands the body to the schema path, which refuses it in the order
    # it always did (the schema first, then the wrap) or makes the same bytes.
    if not enc.is_plain(body):
        return None
    try:
        aad = enc.pack_checked(body)
        wrap = wrap_content_key(
            content_key,
            aad,
            identity=identity,
            signed=prekeys[0],
            one_time=prekeys[1],
            _ephemeral=ephemeral,
        )
        body_bytes = enc.pack_checked({**body, "wrap": wrap.to_dict()})
    except (UsageError, TypeError, ValueError, OverflowError):
        return None
    return body_bytes if _typed_body(body_bytes) is not None else None


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
    # check_share without its first check, made above (``originator`` is that member).
    arrangement.check_recipients(token.originator, [token.recipient], token.scope, token.level)
    if token.wrap.mode is WrapMode.IDENTITY and not arrangement.identity_fallback:
        raise Refused(
            Reason.FALLBACK_NOT_ALLOWED, "key wrapped to the long-term key; not allowed here"
        )
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
    prekey_secret: Callable[[PrekeyKind, bytes], bytes] | None = None,
) -> Release:
    """The recipient's check: everything the relay checks that it can, then the key.

    Args:
        prekey_secret: returns the secret of this recipient's prekey of a kind and public
            key, or raises Refused (``unknown_prekey`` for one it does not hold,
            ``replayed`` for a one-time prekey already used). None: no prekeys held.

    Raises:
        ProtocolError, VerificationError (opaque for anything cryptographic),
        Refused (as :func:`check_for_relay`, plus WRONG_RECIPIENT, FALLBACK_NOT_ALLOWED,
        and what ``prekey_secret`` raises).
    """
    checked = _check_common(token, arrangement, now=now, clock_skew=clock_skew)
    if checked.recipient != name:
        raise Refused(Reason.WRONG_RECIPIENT, f"token is for {checked.recipient!r}")
    if secret.public != arrangement.member(name).identity:
        raise UsageError(f"this key is not {name!r}'s key in the arrangement")
    key = unwrap_content_key(
        checked.wrap, checked.associated_data, secret, prekey_secret or _no_prekeys
    )
    if len(key) != KEY_SIZE or key_commitment(key, checked.report) != checked.key_commit:
        raise VerificationError()
    return Release(checked, key)


def _no_prekeys(kind: PrekeyKind, public: bytes) -> bytes:
    raise Refused(Reason.UNKNOWN_PREKEY, f"no {kind.value} prekey {public.hex()[:16]}")
