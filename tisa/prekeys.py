"""Recipient prekeys and the key wrap of release tokens: forward secrecy for content keys.

A recipient publishes, through the relay, X25519 *prekeys* signed with its Ed25519
identity in context ``prekey``: one *signed prekey* at a time, replaced on a schedule,
and a supply of *one-time prekeys*, each handed out by the relay once. An originator
issuing a token wraps the content key to them (X3DH-like, one-way):

    eph      = a fresh X25519 key pair
    dh       = X25519(eph, recipient identity) || X25519(eph, signed prekey)
               [|| X25519(eph, one-time prekey)]
    wrap key = BLAKE2b-256[tisa1-prekeywrap](dh || mode || "\\n" || eph_pk || identity_pk
               || signed_pk || one_time_pk)
    sealed   = XChaCha20-Poly1305-IETF(content key, aad = the token's other signed fields,
               nonce = 24 zero bytes, key = wrap key)

The recipient deletes each prekey secret (a one-time one as soon as it opened the report
with it, a signed one after a grace window), after which nothing it keeps, its long-term
keys included, opens the token again. The mode says which keys were used: ``one_time``
(all three), ``signed`` (the relay had no one-time prekey left) or ``identity`` (the
long-term key alone: a last resort that only an arrangement with ``identity_fallback``
allows, with no forward secrecy).

Everything here is pure: no I/O, time and randomness injected where vectors need them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

import msgspec
import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils

from tisa import _sodium as fast
from tisa import encoding as enc
from tisa.arrangement import Arrangement, Role
from tisa.envelope import open_envelope, seal_envelope, split_envelope
from tisa.errors import ProtocolError, Reason, Refused, UsageError, VerificationError
from tisa.keys import (
    DIGEST_SIZE,
    KEY_SIZE,
    Context,
    Hash,
    MemberSecret,
    digest,
    verify,
)
from tisa.limits import CLOCK_SKEW, MAX_NAME

__all__ = [
    "MAX_PREKEY_SIZE",
    "MAX_VERIFIED_SIGNED_PREKEYS",
    "KeyWrap",
    "Prekey",
    "PrekeyKind",
    "PrekeySecret",
    "WrapFields",
    "WrapMode",
    "unwrap_content_key",
    "wrap_content_key",
]

PREKEY_VERSION = 2
# An encoded prekey envelope: ~230 bytes with the longest owner name; 512 leaves room.
MAX_PREKEY_SIZE = 512
# The content key (32 bytes) and the Poly1305 tag (16).
SEALED_SIZE = KEY_SIZE + sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES
# Every wrap key is derived from a fresh ephemeral key pair and used for one encryption,
# so a fixed nonce never repeats under one key (as in libsodium's sealed box).
_NONCE = bytes(sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)


class PrekeyKind(enum.StrEnum):
    """What a prekey is for: the rotating signed prekey, or one of the one-time supply."""

    SIGNED = "signed"
    ONE_TIME = "one_time"


class WrapMode(enum.StrEnum):
    """Which of the recipient's keys a token's content key is wrapped to."""

    ONE_TIME = "one_time"  # identity, signed prekey and one-time prekey
    SIGNED = "signed"  # identity and signed prekey: the one-time supply was exhausted
    IDENTITY = "identity"  # identity alone: last resort, no forward secrecy


_PREKEY_SCHEMA: dict[str, enc.Field] = {
    "v": enc.uint(PREKEY_VERSION, PREKEY_VERSION),
    "arrangement": enc.bin_exact(DIGEST_SIZE),
    "owner": enc.text(MAX_NAME),
    "kind": enc.one_of(*(k.value for k in PrekeyKind)),
    "key": enc.bin_exact(KEY_SIZE),
    "created": enc.uint(),
    "not_after": enc.uint(),
}

_Key = Annotated[bytes, msgspec.Meta(min_length=KEY_SIZE, max_length=KEY_SIZE)]
_KindName = Literal["one_time", "signed"]
if set(get_args(_KindName)) != {k.value for k in PrekeyKind}:
    raise ImportError("_KindName does not list the prekey kinds")  # pragma: no cover
_KINDS = {kind.value: kind for kind in PrekeyKind}


class _PrekeyFields(msgspec.Struct, forbid_unknown_fields=True):
    # _PREKEY_SCHEMA typed, keys in canonical order (enc.typed_decoder).
    arrangement: Annotated[bytes, msgspec.Meta(min_length=DIGEST_SIZE, max_length=DIGEST_SIZE)]
    created: Annotated[int, msgspec.Meta(ge=0)]
    key: _Key
    kind: _KindName
    not_after: Annotated[int, msgspec.Meta(ge=0)]
    owner: Annotated[str, msgspec.Meta(min_length=1)]
    v: Annotated[int, msgspec.Meta(ge=PREKEY_VERSION, le=PREKEY_VERSION)]


_decode_prekey_fields = enc.typed_decoder(_PrekeyFields)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Prekey:
    """A published prekey. Decoded by :meth:`decode` (unchecked) or :meth:`verify`."""

    arrangement: bytes
    owner: str
    kind: PrekeyKind
    key: bytes
    created: int
    not_after: int
    encoded: bytes = dataclasses.field(repr=False, compare=False)
    body: bytes = dataclasses.field(repr=False, compare=False)
    signature: bytes = dataclasses.field(repr=False, compare=False)

    @classmethod
    def decode(cls, data: bytes) -> Prekey:
        """Decode without verifying.

        A prekey in its canonical form is decoded once, straight into typed fields
        (:func:`tisa.encoding.typed_decoder`); anything else goes through the schema,
        which accepts it the same or names the fault.

        Raises:
            ProtocolError: not a canonical prekey envelope, an empty lifetime, or a key
                of low order.
        """
        split = split_envelope(data, max_size=MAX_PREKEY_SIZE)
        if split is not None:
            prekey = cls._decode_typed(data, *split)
            if prekey is not None:
                return prekey
        return cls._decode_schema(data)

    @classmethod
    def _decode_schema(cls, data: bytes) -> Prekey:
        body, fields, signature = open_envelope(data, max_size=MAX_PREKEY_SIZE, what="prekey")
        fields = enc.check_map(fields, _PREKEY_SCHEMA, "prekey")
        if fields["not_after"] <= fields["created"]:
            raise ProtocolError("prekey: empty lifetime")
        # The key type's check (tisa._sodium: a lookup, no X25519).
        if fast.has_small_order(fields["key"]):
            raise ProtocolError("prekey: key of low order")
        fields.pop("v")
        fields["kind"] = PrekeyKind(fields["kind"])
        return cls(**fields, encoded=bytes(data), body=body, signature=signature)

    @classmethod
    def _decode_typed(cls, data: bytes, body: bytes, signature: bytes) -> Prekey | None:
        # The fast path of decode: one typed decoding, then what msgspec does not check;
        # None hands the prekey to the schema (tests compare the two paths).
        fields = _decode_prekey_fields(body)
        if fields is None or fields.not_after <= fields.created:
            return None
        if fast.has_small_order(fields.key) or not enc.are_texts([fields.owner], MAX_NAME):
            return None
        return _build_prekey(
            fields.arrangement,
            fields.owner,
            _KINDS[fields.kind],
            fields.key,
            fields.created,
            fields.not_after,
            data,
            body,
            signature,
        )

    @classmethod
    def verify(
        cls,
        data: bytes,
        arrangement: Arrangement,
        *,
        owner: str,
        kind: PrekeyKind,
        now: int,
        clock_skew: int = CLOCK_SKEW,
    ) -> Prekey:
        """Check a prekey that ``owner`` is meant to have published, of ``kind``.

        Args:
            data: the encoded envelope.
            arrangement: the verifier's arrangement.
            owner: the member whose prekey this must be (who was asked for).
            kind: the kind expected where it was found.
            now: unix seconds.

        Returns:
            The verified prekey.

        Raises:
            ProtocolError: malformed. VerificationError: the signature is not the named
                owner's (or the owner has no recipient role, so no key to check with).
            Refused: ``bad_prekey`` (another owner, another kind or another arrangement:
                a substituted prekey), ``expired`` (past ``not_after``).
        """
        prekey = cls.decode(data)
        try:
            member = arrangement.require_role(prekey.owner, Role.RECIPIENT)
        except Refused:
            raise VerificationError() from None
        checked = (member.identity.signing.raw, prekey.body, prekey.signature)
        if checked not in _VERIFIED_SIGNED:
            verify(member.identity.signing, Context.PREKEY, prekey.body, prekey.signature)
            if prekey.kind is PrekeyKind.SIGNED:
                _remember_signed(checked)
        if prekey.owner != owner:
            raise Refused(Reason.BAD_PREKEY, f"a prekey of {prekey.owner!r}, not of {owner!r}")
        if prekey.kind is not kind:
            raise Refused(Reason.BAD_PREKEY, f"a {prekey.kind.value} prekey, not {kind.value}")
        if prekey.arrangement != arrangement.id:
            raise Refused(Reason.BAD_PREKEY, "a prekey of another arrangement version")
        if now - clock_skew >= prekey.not_after:
            raise Refused(Reason.EXPIRED, f"prekey expired at {prekey.not_after}")
        return prekey


_build_prekey = enc.slot_builder(
    Prekey,
    (
        "arrangement",
        "owner",
        "kind",
        "key",
        "created",
        "not_after",
        "encoded",
        "body",
        "signature",
    ),
)

# Signed prekeys whose signature was found good, by (signing key, body, signature): an
# originator wraps every token of a recipient to the same signed prekey (it changes
# about weekly), so its Ed25519 check is made once, not once per token (issue 11). Only
# the signature check is skipped: owner, kind, arrangement and expiry are checked on
# every call. One-time prekeys (each used once) are never remembered. Oldest out first.
MAX_VERIFIED_SIGNED_PREKEYS = 64
_VERIFIED_SIGNED: dict[tuple[bytes, bytes, bytes], None] = {}


def _remember_signed(checked: tuple[bytes, bytes, bytes]) -> None:
    while len(_VERIFIED_SIGNED) >= MAX_VERIFIED_SIGNED_PREKEYS:
        del _VERIFIED_SIGNED[next(iter(_VERIFIED_SIGNED))]
    _VERIFIED_SIGNED[checked] = None


class PrekeySecret:
    """The secret half of one prekey, as its owner keeps it until deleting it.

    Never printed: ``repr`` shows the kind and the public key only.
    """

    __slots__ = ("_secret", "created", "kind", "not_after", "public")

    def __init__(self, *, kind: PrekeyKind, secret: bytes, created: int, not_after: int) -> None:
        if type(secret) is not bytes or len(secret) != KEY_SIZE:
            raise UsageError("an X25519 secret key is 32 bytes")
        if not 0 <= created < not_after < 2**64:
            raise UsageError("a prekey's lifetime must be non-empty")
        self.kind = PrekeyKind(kind)
        self._secret = secret
        self.public = bytes(sodium.crypto_scalarmult_base(secret))
        self.created = created
        self.not_after = not_after

    @classmethod
    def generate(cls, kind: PrekeyKind, *, created: int, not_after: int) -> PrekeySecret:
        """A fresh prekey from libsodium's random generator."""
        return cls(
            kind=kind, secret=nacl.utils.random(KEY_SIZE), created=created, not_after=not_after
        )

    @property
    def secret(self) -> bytes:
        """The 32 secret bytes, for the owner's store (which deletes them)."""
        return self._secret

    def publish(self, member: MemberSecret, name: str, arrangement: Arrangement) -> bytes:
        """The signed prekey envelope that ``name`` hands the relay.

        Raises:
            UsageError: ``member`` is not ``name``'s key in the arrangement.
            Refused: ``name`` is no member with the recipient role.
        """
        listed = arrangement.require_role(name, Role.RECIPIENT)
        if member.public != listed.identity:
            raise UsageError(f"this key is not {name!r}'s key in the arrangement")
        body = {
            "v": PREKEY_VERSION,
            "arrangement": arrangement.id,
            "owner": name,
            "kind": self.kind.value,
            "key": self.public,
            "created": self.created,
            "not_after": self.not_after,
        }
        try:
            enc.check_map(body, _PREKEY_SCHEMA, "prekey")
        except ProtocolError as exc:
            raise UsageError(exc.detail) from None
        return seal_envelope(member, Context.PREKEY, body)

    def __repr__(self) -> str:
        return f"<PrekeySecret {self.kind.value} {self.public.hex()[:16]}>"


# --- the key wrap ----------------------------------------------------------------------

_WRAP_SCHEMA: dict[str, enc.Field] = {
    "mode": enc.one_of(*(m.value for m in WrapMode)),
    "eph": enc.bin_exact(KEY_SIZE),
    "spk": enc.optional(enc.bin_exact(KEY_SIZE)),
    "opk": enc.optional(enc.bin_exact(KEY_SIZE)),
    "sealed": enc.bin_exact(SEALED_SIZE),
}


_ModeName = Literal["identity", "one_time", "signed"]
if set(get_args(_ModeName)) != {m.value for m in WrapMode}:
    raise ImportError("_ModeName does not list the wrap modes")  # pragma: no cover


class WrapFields(msgspec.Struct, forbid_unknown_fields=True):
    """The wrap map typed as :data:`_WRAP_SCHEMA` checks it, keys in canonical order:
    the fast path of a token's decoding (:func:`tisa.encoding.typed_decoder`)."""

    eph: _Key
    mode: _ModeName
    opk: _Key | None
    sealed: Annotated[bytes, msgspec.Meta(min_length=SEALED_SIZE, max_length=SEALED_SIZE)]
    spk: _Key | None


_MODES = {mode.value: mode for mode in WrapMode}
# Which prekeys (signed, one-time) each mode uses.
_MODE_PREKEYS = {
    WrapMode.ONE_TIME: (True, True),
    WrapMode.SIGNED: (True, False),
    WrapMode.IDENTITY: (False, False),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class KeyWrap:
    """A token's wrapped content key: the mode, the originator's ephemeral public key,
    the prekeys used (by their public keys, None where the mode uses none) and the
    AEAD ciphertext of the content key."""

    mode: WrapMode
    eph: bytes
    spk: bytes | None
    opk: bytes | None
    sealed: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_dict(cls, value: Any, path: str = "wrap") -> KeyWrap:
        """Check a wrap map (as :meth:`to_dict` makes it).

        Raises:
            ProtocolError: malformed, or prekeys that do not match the mode.
        """
        fields = enc.check_map(value, _WRAP_SCHEMA, path)
        mode = WrapMode(fields["mode"])
        spk, opk = fields["spk"], fields["opk"]
        if (spk is not None, opk is not None) != _MODE_PREKEYS[mode]:
            raise ProtocolError(f"{path}: prekeys do not match mode {mode.value!r}")
        return cls(mode=mode, eph=fields["eph"], spk=spk, opk=opk, sealed=fields["sealed"])

    @classmethod
    def from_typed(cls, fields: WrapFields) -> KeyWrap | None:
        """The wrap of typed fields (their types, sizes and mode checked by decoding
        them), or None where :meth:`from_dict` would refuse them: prekeys that do not
        match the mode."""
        mode = _MODES[fields.mode]
        spk, opk = fields.spk, fields.opk
        if (spk is not None, opk is not None) != _MODE_PREKEYS[mode]:
            return None
        return _build_wrap(mode, fields.eph, spk, opk, fields.sealed)

    def to_dict(self) -> dict[str, Any]:
        """The wrap as its wire map."""
        return {
            "mode": self.mode.value,
            "eph": self.eph,
            "spk": self.spk,
            "opk": self.opk,
            "sealed": self.sealed,
        }


# For from_typed: its fields are checked, so the wrap is built without __init__'s keywords.
_build_wrap = enc.slot_builder(KeyWrap, ("mode", "eph", "spk", "opk", "sealed"))


# Each mode's label in the wrap key's transcript: its name and a newline.
_MODE_LABELS = {mode: mode.value.encode() + b"\n" for mode in WrapMode}


def _wrap_key(mode: WrapMode, shared: bytes, eph: bytes, identity: bytes, *prekeys: bytes) -> bytes:
    # One unkeyed, personalised BLAKE2b over the Diffie-Hellman outputs and every public
    # key involved, as crypto_kx derives its session keys; the mode's length and those of
    # the keys are fixed, so the input parses one way only.
    transcript = _MODE_LABELS[mode] + eph + identity + b"".join(prekeys)
    return digest(Hash.PREKEY_WRAP, shared + transcript)


def _dh(secret: bytes, public: bytes) -> bytes:
    shared = fast.scalarmult(secret, public)
    if shared is None:
        raise VerificationError()
    return shared


def wrap_content_key(
    content_key: bytes,
    aad: bytes,
    *,
    identity: bytes,
    signed: bytes | None,
    one_time: bytes | None,
    _ephemeral: bytes | None = None,
) -> KeyWrap:
    """Wrap ``content_key`` to a recipient's keys (originator side).

    Args:
        content_key: the 32-byte report key.
        aad: the associated data (the token's other signed fields, canonically encoded).
        identity: the recipient's long-term X25519 public key.
        signed, one_time: the public keys of its verified prekeys; None when not used
            (``one_time`` needs ``signed``). Both None is the ``identity`` mode.
        _ephemeral: fixed ephemeral secret, for vectors only.

    Raises:
        UsageError: bad sizes, or a one-time prekey without a signed one.
    """
    if type(content_key) is not bytes or len(content_key) != KEY_SIZE:
        raise UsageError("content key is 32 bytes")
    if one_time is not None and signed is None:
        raise UsageError("a one-time prekey is used with a signed prekey")
    eph_secret = _ephemeral if _ephemeral is not None else nacl.utils.random(KEY_SIZE)
    eph = fast.scalarmult_base(eph_secret)
    prekeys = [key for key in (signed, one_time) if key is not None]
    try:
        shared = b"".join(_dh(eph_secret, key) for key in (identity, *prekeys))
    except VerificationError:
        raise UsageError("a recipient key of low order") from None
    mode = (
        WrapMode.IDENTITY
        if signed is None
        else WrapMode.SIGNED
        if one_time is None
        else WrapMode.ONE_TIME
    )
    key = _wrap_key(mode, shared, eph, identity, *prekeys)
    sealed = fast.aead_encrypt(content_key, aad, _NONCE, key)
    return KeyWrap(mode=mode, eph=eph, spk=signed, opk=one_time, sealed=sealed)


def unwrap_content_key(
    wrap: KeyWrap,
    aad: bytes,
    member: MemberSecret,
    prekey_secret: Callable[[PrekeyKind, bytes], bytes],
) -> bytes:
    """Unwrap a token's content key (recipient side).

    Args:
        wrap: the token's key wrap.
        aad: the token's other signed fields, canonically encoded.
        member: the recipient's long-term secret keys.
        prekey_secret: returns the 32 secret bytes of the recipient's prekey of the given
            kind and public key, or raises Refused (``unknown_prekey``, ``replayed``).

    Returns:
        The 32-byte content key.

    Raises:
        Refused: from ``prekey_secret``.
        VerificationError: anything cryptographic (opaque).
    """
    eph, spk, opk = wrap.eph, wrap.spk, wrap.opk
    # Both prekeys' secrets are looked up before any Diffie-Hellman (a lookup refuses
    # with its reason first), then the DH outputs in the order identity, signed,
    # one-time, and the transcript with the prekeys in that order (_wrap_key).
    spk_secret = None if spk is None else prekey_secret(PrekeyKind.SIGNED, spk)
    opk_secret = None if opk is None else prekey_secret(PrekeyKind.ONE_TIME, opk)
    shared = member.exchange(eph)
    prekeys = b""
    if spk_secret is not None and spk is not None:
        shared += _dh(spk_secret, eph)
        prekeys = spk
    if opk_secret is not None and opk is not None:
        shared += _dh(opk_secret, eph)
        prekeys += opk
    key = _wrap_key(wrap.mode, shared, eph, member.public.encryption.raw, prekeys)
    content_key = fast.aead_decrypt(wrap.sealed, aad, _NONCE, key)
    if content_key is None:
        raise VerificationError()
    return content_key
