"""Member identities, domain-separated signatures and hashes, and passphrase key files.

A member has two key pairs: Ed25519 for signing and X25519 for receiving sealed content
keys. The public halves are distinct types (:class:`SigningPublicKey`,
:class:`EncryptionPublicKey`), so one is never taken for the other, and both are checked
when constructed: length, type, and for X25519 that the point is not of low order.

Every signature is made over ``b"tisa/1/" + label + b"\\n" + message`` where ``label`` is
one of :class:`Context`; a signature of one kind therefore never verifies as another.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import nacl.bindings as sodium
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from tisa import _sodium as fast
from tisa import encoding as enc
from tisa.errors import KeyFileError, ProtocolError, UsageError, VerificationError

__all__ = [
    "Context",
    "EncryptionPublicKey",
    "HASHLIB_STREAM_SIZE",
    "Hash",
    "Hasher",
    "MemberSecret",
    "PublicIdentity",
    "SigningPublicKey",
    "digest",
    "random_id",
    "verify",
]

SIGNATURE_SIZE = 64
KEY_SIZE = 32
DIGEST_SIZE = 32


class Context(enum.Enum):
    """Context labels, one per kind of signed object or derived value (protocol v1)."""

    REPORT = b"report"
    TOKEN = b"token"
    RECEIPT = b"receipt"
    ARRANGEMENT = b"arrangement"
    HANDSHAKE_RELAY = b"handshake-relay"
    HANDSHAKE_MEMBER = b"handshake-member"
    AUDIT = b"audit"
    ACK = b"ack"
    ANNOUNCE = b"announce"
    REQUEST = b"request"
    ANSWER = b"answer"
    PREKEY = b"prekey"


SIGN_PREFIX = b"tisa/1/"


# What precedes the message in each context, made once (one concatenation per
# signature); looked up by the label's bytes (``_value_``, a plain attribute: ``value``
# and a plain Enum's hash are Python-level calls).
_SIGN_PREFIXES = {context.value: SIGN_PREFIX + context.value + b"\n" for context in Context}


def _signed_message(context: Context, message: bytes) -> bytes:
    return _SIGN_PREFIXES[context._value_] + message


class Hash(enum.Enum):
    """Personalisation strings for BLAKE2b (16 bytes each), one per use."""

    CIPHERTEXT = b"tisa1-ciphertext"
    CONTENT = b"tisa1-content\0\0\0"
    ARRANGEMENT = b"tisa1-arrangemnt"
    FINGERPRINT = b"tisa1-fingerprnt"
    KEY_COMMIT = b"tisa1-keycommit\0"
    TRANSCRIPT = b"tisa1-transcript"
    KX_TRANSCRIPT = b"tisa1-kx-transcr"
    CHANNEL = b"tisa1-channel\0\0\0"
    AUDIT = b"tisa1-audit\0\0\0\0\0"
    AUDIT_CHAIN = b"tisa1-auditchain"
    KEYFILE = b"tisa1-keyfile\0\0\0"
    PREKEY_WRAP = b"tisa1-prekeywrap"


if any(len(purpose.value) > sodium.crypto_generichash_PERSONALBYTES for purpose in Hash):
    raise ImportError("a Hash personalisation is longer than libsodium allows")  # pragma: no cover


def digest(purpose: Hash, data: bytes, *, key: bytes = b"") -> bytes:
    """BLAKE2b-256 of ``data``, personalised for ``purpose`` (libsodium generichash).

    Computed by the standard library's ``hashlib.blake2b``: the same function (RFC 7693
    with BLAKE2b's parameter block: key, an all-zero salt, the personalisation padded
    with zeros, exactly as ``crypto_generichash_blake2b_salt_personal`` fills it), about
    four times faster for the short inputs the relay hashes several times per report
    (audit entries, chain heads), and it releases the GIL for long ones. A test checks
    equality with libsodium's result for every personalisation, keyed and unkeyed, at the
    sizes the toolkit hashes.
    """
    # ``_value_``: a plain attribute (``value`` is a Python-level property).
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, key=key, person=purpose._value_).digest()


class Hasher:
    """Incremental BLAKE2b-256 for streams, personalised like :func:`digest`.

    libsodium's own (``crypto_generichash_blake2b_init_salt_personal`` and its update
    and final, called through PyNaCl's cffi binding as :mod:`tisa._sodium` does): for
    the long pieces streams are made of it is about 10% faster than ``hashlib`` (its
    BLAKE2b has vectorised code), and a report's ciphertext is hashed once on each
    side. (Hashing in a worker thread beside the AEAD was tried twice and did not pay
    on the shared two-core machine: docs/performance.md.) The state is made without
    ``nacl.bindings``' per-call checks (its
    ``generichash_blake2b_init`` alone cost about as much as hashing a 1 KiB report);
    a test compares the digests with :func:`digest` and PyNaCl's.

    With ``size`` (the number of bytes the caller will add, when it knows it) of at most
    :data:`HASHLIB_STREAM_SIZE`, the state is ``hashlib.blake2b``'s instead: for a small
    report (one chunk) its one C object costs less than libsodium's state made, fed
    and finished through cffi, and the bytes are the same (tested as :func:`digest`).
    """

    __slots__ = ("_hashlib", "_state")

    def __init__(self, purpose: Hash, size: int | None = None) -> None:
        if size is not None and size <= HASHLIB_STREAM_SIZE:
            self._hashlib: Any = hashlib.blake2b(digest_size=DIGEST_SIZE, person=purpose._value_)
            self._state: Any = None
            return
        self._hashlib = None
        self._state = _ffi.new("unsigned char[]", _HASH_STATE_BYTES)
        _lib.crypto_generichash_blake2b_init_salt_personal(
            self._state, _ffi.NULL, 0, DIGEST_SIZE, _ZERO_SALT, purpose.value.ljust(16, b"\0")
        )

    def update(self, data: bytes) -> None:
        """Add ``data`` to the hash."""
        if self._hashlib is not None:
            self._hashlib.update(data)
            return
        if self._state is None:
            raise UsageError("this hash is finished")
        if type(data) is not bytes:
            data = bytes(data)
        _lib.crypto_generichash_blake2b_update(self._state, data, len(data))

    def finish(self) -> bytes:
        """The 32-byte digest of everything added.

        Call it once: a finished state cannot be finished again (a second call raises).
        """
        if self._hashlib is not None:
            result: bytes = self._hashlib.digest()
            self._hashlib = None
            return result
        if self._state is None:
            raise UsageError("this hash is finished")
        out = _ffi.new("unsigned char[]", DIGEST_SIZE)
        _lib.crypto_generichash_blake2b_final(self._state, out, DIGEST_SIZE)
        self._state = None
        return _ffi.buffer(out, DIGEST_SIZE)[:]  # type: ignore[no-any-return]


_HASH_STATE_BYTES = sodium.crypto_generichash_STATEBYTES
# Streams of at most this many bytes (a report of one or two chunks) are hashed with
# hashlib (see Hasher): below it the call overhead of libsodium's state dominates, above
# it libsodium's vectorised BLAKE2b is faster per byte.
HASHLIB_STREAM_SIZE = 128 * 1024
_ZERO_SALT = bytes(sodium.crypto_generichash_SALTBYTES)


# --- public keys -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SigningPublicKey:
    """An Ed25519 public key. Only :func:`verify` uses it."""

    raw: bytes

    def __post_init__(self) -> None:
        if type(self.raw) is not bytes or len(self.raw) != KEY_SIZE:
            raise UsageError("an Ed25519 public key is 32 bytes")
        # libsodium refuses to verify with small-order or non-canonical keys; refuse them
        # here already, so an arrangement never lists a key that can verify nothing. This
        # check is stricter than verification: it also refuses a key with a small-order
        # (torsion) component, which no honest key generation produces.
        if not sodium.crypto_core_ed25519_is_valid_point(self.raw):
            raise UsageError("not a valid Ed25519 public key")


_LOW_ORDER_PROBE = bytes([9]) + bytes(31)


@dataclass(frozen=True, slots=True)
class EncryptionPublicKey:
    """An X25519 public key, checked not to be of low order."""

    raw: bytes

    def __post_init__(self) -> None:
        if type(self.raw) is not bytes or len(self.raw) != KEY_SIZE:
            raise UsageError("an X25519 public key is 32 bytes")
        # The keys for which crypto_scalarmult fails (an all-zero shared point) whatever
        # the secret: libsodium's list, checked without an X25519 (tisa._sodium).
        if fast.has_small_order(self.raw):
            raise UsageError("X25519 public key of low order")


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """The public half of a member identity."""

    signing: SigningPublicKey
    encryption: EncryptionPublicKey

    def __post_init__(self) -> None:
        if not isinstance(self.signing, SigningPublicKey):
            raise UsageError("signing must be a SigningPublicKey")
        if not isinstance(self.encryption, EncryptionPublicKey):
            raise UsageError("encryption must be an EncryptionPublicKey")

    @property
    def fingerprint(self) -> str:
        """A short printable fingerprint: 24 base32 characters (120 bits) in groups of four."""
        raw = digest(Hash.FINGERPRINT, self.signing.raw + self.encryption.raw)[:15]
        text = base64.b32encode(raw).decode("ascii").lower()
        return "-".join(text[i : i + 4] for i in range(0, 24, 4))

    def to_dict(self) -> dict[str, Any]:
        """The identity as its wire map: ``sign`` (Ed25519) and ``box`` (X25519) raw keys."""
        return {"sign": self.signing.raw, "box": self.encryption.raw}

    @classmethod
    def from_dict(cls, value: Any, path: str = "identity") -> PublicIdentity:
        """Check an identity map (as :meth:`to_dict` makes it) and build the identity.

        Args:
            value: the decoded map.
            path: where the map sits, for error messages.

        Raises:
            ProtocolError: not such a map, or a key the key types refuse (not a valid Ed25519
                point, an X25519 key of low order).
        """
        fields = enc.check_map(
            value, {"sign": enc.bin_exact(KEY_SIZE), "box": enc.bin_exact(KEY_SIZE)}, path
        )
        try:
            return cls(SigningPublicKey(fields["sign"]), EncryptionPublicKey(fields["box"]))
        except UsageError as exc:
            raise ProtocolError(f"{path}: {exc}") from None


# --- signatures ------------------------------------------------------------------------


def verify(key: SigningPublicKey, context: Context, message: bytes, signature: bytes) -> None:
    """Check ``signature`` over ``message`` in ``context``.

    Raises:
        VerificationError: for any failure, with no detail.
    """
    if not isinstance(key, SigningPublicKey):
        raise UsageError("verify needs a SigningPublicKey")
    if type(message) is not bytes and not isinstance(message, bytearray | memoryview):
        raise UsageError("verify needs the message as bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise VerificationError()
    # crypto_sign_open on signature || message, without PyNaCl's checks and the copy
    # of the message out (tisa._sodium; tests compare the two).
    if not fast.verify(signature + _signed_message(context, message), key.raw):
        raise VerificationError()


class MemberSecret:
    """A member's secret keys: Ed25519 signing and X25519 decryption.

    Never printed: ``repr`` shows only the fingerprint.
    """

    __slots__ = ("_box_secret", "_public", "_seed", "_sign_secret")

    def __init__(self, *, sign_seed: bytes, box_secret: bytes) -> None:
        if type(sign_seed) is not bytes or len(sign_seed) != KEY_SIZE:
            raise UsageError("an Ed25519 seed is 32 bytes")
        if type(box_secret) is not bytes or len(box_secret) != KEY_SIZE:
            raise UsageError("an X25519 secret key is 32 bytes")
        self._seed = sign_seed
        sign_public, self._sign_secret = sodium.crypto_sign_seed_keypair(sign_seed)
        self._box_secret = box_secret
        box_public = sodium.crypto_scalarmult_base(box_secret)
        self._public = PublicIdentity(
            SigningPublicKey(bytes(sign_public)), EncryptionPublicKey(bytes(box_public))
        )

    @classmethod
    def generate(cls) -> MemberSecret:
        """Fresh keys from libsodium's random generator."""
        return cls(sign_seed=nacl.utils.random(KEY_SIZE), box_secret=nacl.utils.random(KEY_SIZE))

    @property
    def public(self) -> PublicIdentity:
        """The public half, as the arrangement lists it."""
        return self._public

    def sign(self, context: Context, message: bytes) -> bytes:
        """Sign ``message`` in ``context``; returns the 64-byte detached signature."""
        # crypto_sign, only its first 64 bytes copied out (tisa._sodium; tests compare).
        return fast.sign(_signed_message(context, message), self._sign_secret)

    def unseal(self, sealed: bytes) -> bytes:
        """Open a sealed box addressed to this member.

        Raises:
            VerificationError: the box was not sealed to this key or was altered.
            UsageError: ``sealed`` is not bytes.
        """
        if not isinstance(sealed, bytes | bytearray | memoryview):
            raise UsageError("unseal takes bytes")
        try:
            return bytes(
                sodium.crypto_box_seal_open(
                    bytes(sealed), self._public.encryption.raw, self._box_secret
                )
            )
        except (nacl.exceptions.CryptoError, nacl.exceptions.TypeError, ValueError):
            raise VerificationError() from None

    def exchange(self, public: bytes) -> bytes:
        """X25519 of this member's encryption secret with ``public`` (libsodium
        ``crypto_scalarmult``): the identity part of a token's key wrap.

        Raises:
            VerificationError: ``public`` is not 32 bytes or is of low order (the shared
                point would be all zeros).
        """
        if type(public) is not bytes or len(public) != KEY_SIZE:
            raise VerificationError()
        shared = fast.scalarmult(self._box_secret, public)
        if shared is None:
            raise VerificationError()
        return shared

    def __repr__(self) -> str:
        return f"<MemberSecret {self._public.fingerprint}>"

    # --- key files ---------------------------------------------------------------------

    def to_keyfile(
        self,
        passphrase: str,
        *,
        name: str = "",
        opslimit: int = nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
        memlimit: int = nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
    ) -> bytes:
        """Encrypt the secret keys under ``passphrase`` (argon2id + secretbox).

        Args:
            passphrase: at least one character; what the user types.
            name: a label stored with the keys, e.g. the member name.
            opslimit, memlimit: argon2id cost; the defaults are libsodium's "moderate".
        """
        if not isinstance(passphrase, str) or not passphrase:
            raise UsageError("a key file needs a non-empty passphrase")
        # Refuse here what from_keyfile would refuse, so a key file written is one that loads.
        try:
            _KEYFILE_NAME(name, "name")
            _KEYFILE_OPS(opslimit, "opslimit")
            _KEYFILE_MEM(memlimit, "memlimit")
        except ProtocolError as exc:
            raise UsageError(str(exc)) from None
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        key = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE,
            passphrase.encode("utf-8"),
            salt,
            opslimit=opslimit,
            memlimit=memlimit,
        )
        inner = enc.pack({"name": name, "sign_seed": self._seed, "box_secret": self._box_secret})
        header = {"v": 1, "kdf": "argon2id13", "ops": opslimit, "mem": memlimit, "salt": salt}
        # The header travels inside the box as well, so a tampered cost or salt is caught
        # when the file is opened (a lowered cost would otherwise go unnoticed).
        box = nacl.secret.SecretBox(key).encrypt(enc.pack({"header": header, "keys": inner}))
        return KEYFILE_MAGIC + enc.pack({**header, "box": bytes(box)})

    @classmethod
    def from_keyfile(cls, data: bytes, passphrase: str) -> tuple[MemberSecret, str]:
        """Decrypt a key file made by :meth:`to_keyfile`; returns (secret, name).

        Raises:
            KeyFileError: wrong passphrase, damaged file, or not a key file.
        """
        if not isinstance(data, bytes | bytearray) or not isinstance(passphrase, str):
            raise UsageError("from_keyfile takes the file's bytes and a passphrase string")
        data = bytes(data)
        if not data.startswith(KEYFILE_MAGIC):
            raise KeyFileError("not a tisa key file")
        try:
            outer = enc.check_map(
                enc.unpack(data[len(KEYFILE_MAGIC) :], max_size=4096),
                {
                    "v": enc.uint(1, 1),
                    "kdf": enc.one_of("argon2id13"),
                    "ops": _KEYFILE_OPS,
                    "mem": _KEYFILE_MEM,
                    "salt": enc.bin_exact(nacl.pwhash.argon2id.SALTBYTES),
                    "box": enc.bin_max(4096),
                },
            )
        except ProtocolError:
            raise KeyFileError("key file is damaged") from None
        try:
            key = nacl.pwhash.argon2id.kdf(
                nacl.secret.SecretBox.KEY_SIZE,
                passphrase.encode("utf-8"),
                outer["salt"],
                opslimit=outer["ops"],
                memlimit=outer["mem"],
            )
        except (nacl.exceptions.CryptoError, ValueError, MemoryError):
            # A damaged cost field can ask for more memory than the machine has.
            raise KeyFileError("key file is damaged") from None
        try:
            plain = nacl.secret.SecretBox(key).decrypt(outer["box"])
            content = enc.check_map(
                enc.unpack(bytes(plain)), {"header": lambda v, p: v, "keys": enc.bin_max(1024)}
            )
            header = {k: outer[k] for k in ("v", "kdf", "ops", "mem", "salt")}
            if content["header"] != header:
                raise KeyFileError("key file is damaged")
            keys = enc.check_map(
                enc.unpack(content["keys"]),
                {
                    "name": _KEYFILE_NAME,
                    "sign_seed": enc.bin_exact(KEY_SIZE),
                    "box_secret": enc.bin_exact(KEY_SIZE),
                },
            )
        except (nacl.exceptions.CryptoError, ProtocolError):
            raise KeyFileError("wrong passphrase or damaged key file") from None
        return cls(sign_seed=keys["sign_seed"], box_secret=keys["box_secret"]), keys["name"]

    def save(self, path: str | os.PathLike[str], passphrase: str, **kwargs: Any) -> None:
        """Write an encrypted key file with mode 0600; refuses to overwrite."""
        data = self.to_keyfile(passphrase, **kwargs)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: str) -> tuple[MemberSecret, str]:
        """Read a key file written by :meth:`save`; returns (secret, name)."""
        with open(path, "rb") as handle:
            data = handle.read(65536)
        return cls.from_keyfile(data, passphrase)


KEYFILE_MAGIC = b"tisa-keyfile-1\n"
_KEYFILE_NAME = enc.text(256, allow_empty=True)
# The cost fields are read before anything in the file is authenticated, so a crafted
# file could ask for hours of work or all the memory: cap them at libsodium's
# "sensitive" level (4 passes, 1 GiB), the most any key file written by us asks for.
MAX_KEYFILE_OPS = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
MAX_KEYFILE_MEM = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
_KEYFILE_OPS = enc.uint(MAX_KEYFILE_OPS, nacl.pwhash.argon2id.OPSLIMIT_MIN)
_KEYFILE_MEM = enc.uint(MAX_KEYFILE_MEM, nacl.pwhash.argon2id.MEMLIMIT_MIN)


def random_id() -> bytes:
    """A fresh 16-byte identifier (reports, tokens)."""
    return nacl.utils.random(16)
