"""libsodium calls of the core's hot paths, without PyNaCl's per-call wrapper checks.

Each function calls the same libsodium function that ``nacl.bindings`` calls, through
PyNaCl's own cffi binding (``nacl._sodium``), as :mod:`tisa.handshake` does for the
channel. The wrappers in ``nacl.bindings`` check every argument's type and length on
every call (``ensure``, ``ffi.new`` for each output) and copy the whole signed message
back out of ``crypto_sign`` and ``crypto_sign_open``: about
a third of the per-role cost of the core against raw libsodium (docs/performance.md).
Here the callers are the toolkit's own code, whose arguments have fixed types and sizes
(checked once where they enter the toolkit), so the checks are left out; every function
still refuses a wrong length where a wrong length could reach libsodium.

``tests/test_sodium_fast.py`` compares every function with PyNaCl's public function,
failures included (bad signature, wrong key, low-order point).
"""

from __future__ import annotations

from typing import Any

import nacl.bindings as _bindings
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

__all__ = [
    "SIGNATURE_SIZE",
    "aead_decrypt",
    "aead_encrypt",
    "has_small_order",
    "scalarmult",
    "scalarmult_base",
    "sign",
    "stream_init_pull",
    "stream_init_push",
    "stream_pull",
    "stream_push",
    "verify",
]

SIGNATURE_SIZE = 64
_KEY = 32
_NONCE = _bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_AEAD_TAG = _bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_STREAM_TAG = _bindings.crypto_secretstream_xchacha20poly1305_ABYTES
_NULL = _ffi.NULL
# The output buffers' type, looked up once (``ffi.new`` parses a type given as a string
# on every call).
_BYTES = _ffi.typeof("unsigned char[]")


def sign(message: bytes, secret: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message`` with the 64-byte libsodium secret key.

    ``crypto_sign`` (PyNaCl's binding declares no ``crypto_sign_detached``): its output
    is the signature followed by the message; only the signature is copied out.
    """
    if len(secret) != 2 * _KEY:
        raise ValueError("an Ed25519 secret key is 64 bytes")
    out = _ffi.new(_BYTES, len(message) + SIGNATURE_SIZE)
    _lib.crypto_sign(out, _NULL, message, len(message), secret)
    return _ffi.buffer(out, SIGNATURE_SIZE)[:]  # type: ignore[no-any-return]


def verify(signed: bytes, public: bytes) -> bool:
    """Whether ``signed`` (a 64-byte signature followed by the message) is ``public``'s
    Ed25519 signature: ``crypto_sign_open``, as ``nacl.bindings.crypto_sign_open``
    calls it, with a boolean instead of an exception."""
    if len(signed) < SIGNATURE_SIZE or len(public) != _KEY:
        return False
    # libsodium writes the message length only through a non-NULL pointer (every
    # version); the message itself it copies out unconditionally in older ones, so the
    # output buffer stays.
    out = _ffi.new(_BYTES, len(signed))
    return _lib.crypto_sign_open(out, _NULL, signed, len(signed), public) == 0  # type: ignore[no-any-return]


def scalarmult(secret: bytes, public: bytes) -> bytes | None:
    """X25519 of 32-byte ``secret`` and ``public``; None where libsodium fails (a
    low-order ``public``: the shared point would be all zeros)."""
    if len(secret) != _KEY or len(public) != _KEY:
        return None
    out = _ffi.new(_BYTES, _KEY)
    if _lib.crypto_scalarmult(out, secret, public):
        return None
    return _ffi.buffer(out, _KEY)[:]  # type: ignore[no-any-return]


def scalarmult_base(secret: bytes) -> bytes:
    """The X25519 public key of the 32-byte ``secret``."""
    if len(secret) != _KEY:
        raise ValueError("an X25519 secret key is 32 bytes")
    out = _ffi.new(_BYTES, _KEY)
    _lib.crypto_scalarmult_base(out, secret)
    return _ffi.buffer(out, _KEY)[:]  # type: ignore[no-any-return]


# The X25519 public keys for which crypto_scalarmult fails whatever the secret: those
# whose point has an order dividing 8 on the curve or 4 on its twist (0, 1, -1 and the
# two of order 8), with the two non-canonical encodings p and p + 1 of 0 and 1. The
# most significant bit is ignored by X25519 (RFC 7748), so it is ignored here too. This
# is libsodium's own list (``has_small_order`` in its ref10 X25519); checking it costs a
# set lookup instead of one X25519 (≈ 60 µs), and tests check it against libsodium on
# the list, its top-bit variants and random keys.
_P = 2**255 - 19
_SMALL_ORDER = frozenset(
    value.to_bytes(32, "little")
    for value in (
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P - 1,
        _P,
        _P + 1,
    )
)


def has_small_order(public: bytes) -> bool:
    """Whether the 32-byte X25519 ``public`` key is of low order (see the list above)."""
    if public[31] & 0x80:
        public = public[:31] + bytes([public[31] & 0x7F])
    return public in _SMALL_ORDER


def aead_encrypt(message: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    """XChaCha20-Poly1305-IETF encryption (``crypto_aead_xchacha20poly1305_ietf_encrypt``)."""
    if len(nonce) != _NONCE or len(key) != _KEY:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce and a 32-byte key")
    size = len(message) + _AEAD_TAG
    out = _ffi.new(_BYTES, size)
    _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        out, _NULL, message, len(message), aad, len(aad), _NULL, nonce, key
    )
    return _ffi.buffer(out, size)[:]  # type: ignore[no-any-return]


def aead_decrypt(ciphertext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """XChaCha20-Poly1305-IETF decryption; None for any failure (tag, key, length)."""
    size = len(ciphertext) - _AEAD_TAG
    if size < 0 or len(nonce) != _NONCE or len(key) != _KEY:
        return None
    out = _ffi.new(_BYTES, max(size, 1))
    if _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        out, _NULL, _NULL, ciphertext, len(ciphertext), aad, len(aad), nonce, key
    ):
        return None
    return _ffi.buffer(out, size)[:]  # type: ignore[no-any-return]


_STREAM_HEADER = _bindings.crypto_secretstream_xchacha20poly1305_HEADERBYTES


def stream_init_push(state: Any, key: bytes) -> bytes:
    """``crypto_secretstream_xchacha20poly1305_init_push`` on a fresh PyNaCl state;
    returns the (random) stream header."""
    if type(key) is not bytes or len(key) != _KEY:
        raise ValueError("a secretstream key is 32 bytes")
    header = _ffi.new(_BYTES, _STREAM_HEADER)
    _lib.crypto_secretstream_xchacha20poly1305_init_push(state.statebuf, header, key)
    return _ffi.buffer(header, _STREAM_HEADER)[:]  # type: ignore[no-any-return]


def stream_init_pull(state: Any, header: bytes, key: bytes) -> bool:
    """``crypto_secretstream_xchacha20poly1305_init_pull``; False for a key or header
    of the wrong type or length (or a failure of libsodium's)."""
    if type(key) is not bytes or len(key) != _KEY:
        return False
    if type(header) is not bytes or len(header) != _STREAM_HEADER:
        return False
    return _lib.crypto_secretstream_xchacha20poly1305_init_pull(state.statebuf, header, key) == 0  # type: ignore[no-any-return]


def _in_place(data: bytes | memoryview) -> Any:
    # cffi takes bytes as they are; a view (of a bytearray, or a slice) is passed as a
    # pointer into its buffer rather than copied.
    return data if type(data) is bytes else _ffi.from_buffer(data)


def _state_buffer(state: Any, size: int) -> Any:
    # The state's output buffer, reused from chunk to chunk (as PyNaCl's own wrappers
    # and tisa.handshake do): a large report does not allocate a chunk per chunk.
    if state.rawbuf is None or len(state.rawbuf) < size:
        state.rawbuf = _ffi.new(_BYTES, max(size, 1))
    return state.rawbuf


def stream_push(state: Any, message: bytes | memoryview, ad: bytes, tag: int) -> bytes:
    """``crypto_secretstream_xchacha20poly1305_push`` on a PyNaCl state (from
    ``nacl.bindings.crypto_secretstream_xchacha20poly1305_state``, initialised).

    ``message`` may be a view of a larger buffer: libsodium reads it in place.
    """
    size = len(message) + _STREAM_TAG
    out = _state_buffer(state, size)
    _lib.crypto_secretstream_xchacha20poly1305_push(
        state.statebuf, out, _NULL, _in_place(message), len(message), ad, len(ad), tag
    )
    return _ffi.buffer(out, size)[:]  # type: ignore[no-any-return]


def stream_pull(state: Any, chunk: bytes | memoryview, ad: bytes) -> tuple[bytes, int] | None:
    """``crypto_secretstream_xchacha20poly1305_pull``: (message, tag), or None for any
    failure (a chunk that does not open as the next of the stream). ``chunk`` may be a
    view of a larger buffer, read in place."""
    size = len(chunk) - _STREAM_TAG
    if size < 0:
        return None
    out = _state_buffer(state, size)
    tag = state.tagbuf
    if tag is None:
        tag = state.tagbuf = _ffi.new("unsigned char *")
    if _lib.crypto_secretstream_xchacha20poly1305_pull(
        state.statebuf, out, _NULL, tag, _in_place(chunk), len(chunk), ad, len(ad)
    ):
        return None
    return _ffi.buffer(out, size)[:], int(tag[0])
