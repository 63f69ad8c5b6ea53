"""Signed envelopes: a canonical body and a detached signature in one msgpack map.

Every signed object but the report (whose signature lives inside its ciphertext) travels
as ``{"body": bin, "sig": bin(64)}``. ``body`` is itself the canonical msgpack of the
object, so the signature covers exact bytes, and the context label of its kind
(:class:`tisa.keys.Context`) keeps a signature of one kind from verifying as another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tisa import encoding as enc
from tisa.keys import SIGNATURE_SIZE, Context, MemberSecret, SigningPublicKey, verify

__all__ = ["open_envelope", "seal_checked", "seal_envelope", "split_envelope"]


def seal_envelope(secret: MemberSecret, context: Context, body: Mapping[str, Any]) -> bytes:
    """Encode ``body`` canonically and sign it in ``context``; returns the envelope."""
    body_bytes = enc.pack(body)
    return enc.pack({"body": body_bytes, "sig": secret.sign(context, body_bytes)})


def seal_checked(secret: MemberSecret, context: Context, body_bytes: bytes) -> bytes:
    """Sign ``body_bytes``, a canonical encoding already made (:func:`tisa.encoding.pack`
    or :func:`~tisa.encoding.pack_checked`), in ``context``; returns the envelope."""
    return enc.pack_checked({"body": body_bytes, "sig": secret.sign(context, body_bytes)})


def open_envelope(data: bytes, *, max_size: int, what: str) -> tuple[bytes, dict[str, Any], bytes]:
    """Decode an envelope without checking the signature (the signer is in the body).

    Returns:
        (body bytes, decoded body map, signature)

    Raises:
        ProtocolError: not a canonical envelope of at most ``max_size`` bytes.
    """
    split = split_envelope(data, max_size=max_size)
    if split is None:
        outer = enc.check_map(
            enc.unpack(data, max_size=max_size),
            {"body": enc.bin_max(max_size), "sig": enc.bin_exact(SIGNATURE_SIZE)},
            what,
        )
        split = outer["body"], outer["sig"]
    return split[0], enc.unpack(split[0]), split[1]


def split_envelope(data: bytes, *, max_size: int) -> tuple[bytes, bytes] | None:
    """(body bytes, signature) of an envelope of at most ``max_size`` bytes in exactly
    its canonical form, the body not decoded; None for anything else, which
    :func:`open_envelope` then decodes the generic way (the same result, or the precise
    error)."""
    return _split(data) if type(data) is bytes and len(data) <= max_size else None


# The canonical envelope, byte by byte: a map of two, "body" and its bin (bin 8 below
# 256 bytes, bin 16 from 256: the shortest form), then "sig" and its 64-byte bin 8.
_HEAD = b"\x82\xa4body"
_SIG = b"\xa3sig\xc4" + bytes([SIGNATURE_SIZE])


def _split(data: bytes) -> tuple[bytes, bytes] | None:
    """(body, signature) of an envelope in exactly its canonical form, or None.

    The envelope's outer map read without the generic decoder: for bytes in this form
    it gives what that decoder and the schema give; anything else (None) goes through
    them for the same result or the precise error (tests compare both paths).
    """
    if not data.startswith(_HEAD) or len(data) < 8:
        return None
    kind = data[6]
    if kind == 0xC4:
        size, start = data[7], 8
    elif kind == 0xC5 and len(data) >= 9:
        size, start = data[7] << 8 | data[8], 9
        if size < 256:
            return None
    else:
        return None
    end = start + size
    if len(data) != end + len(_SIG) + SIGNATURE_SIZE or not data.startswith(_SIG, end):
        return None
    return data[start:end], data[end + len(_SIG) :]


def check_signature(
    key: SigningPublicKey, context: Context, body_bytes: bytes, signature: bytes
) -> None:
    """Verify an envelope's signature (raises the opaque VerificationError)."""
    verify(key, context, body_bytes, signature)
