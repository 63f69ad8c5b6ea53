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

__all__ = ["open_envelope", "seal_checked", "seal_envelope"]


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
    outer = enc.check_map(
        enc.unpack(data, max_size=max_size),
        {"body": enc.bin_max(max_size), "sig": enc.bin_exact(SIGNATURE_SIZE)},
        what,
    )
    return outer["body"], enc.unpack(outer["body"]), outer["sig"]


def check_signature(
    key: SigningPublicKey, context: Context, body_bytes: bytes, signature: bytes
) -> None:
    """Verify an envelope's signature (raises the opaque VerificationError)."""
    verify(key, context, body_bytes, signature)
