"""Keys: domain-separated signatures, typed public keys, sealed boxes, key files."""

from __future__ import annotations

import base64
import itertools
import os
import re
import stat
from pathlib import Path
from typing import Any

import msgpack
import nacl.bindings as sodium
import nacl.pwhash
import nacl.secret
import nacl.utils
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.errors import KeyFileError, ProtocolError, UsageError, VerificationError
from tisa.keys import (
    KEYFILE_MAGIC,
    Context,
    EncryptionPublicKey,
    Hash,
    Hasher,
    MemberSecret,
    PublicIdentity,
    SigningPublicKey,
    digest,
    random_id,
    verify,
)

# The cheapest argon2id libsodium allows: key file tests check the format, not the cost.
FAST = {
    "opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN,
    "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN,
}
PASSPHRASE = "correct horse battery staple"


def fixed_secret(i: int) -> MemberSecret:
    """A member secret derived from ``i`` alone, so tests can pin exact bytes."""
    return MemberSecret(sign_seed=bytes([i]) * 32, box_secret=bytes([0x80 + i]) * 32)


ALICE = fixed_secret(1)
BOB = fixed_secret(2)


def flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[position] ^= mask
    return bytes(changed)


# --- signatures -------------------------------------------------------------------------


@pytest.mark.parametrize("context", list(Context), ids=lambda c: c.name)
def test_sign_verify_round_trip(context: Context) -> None:
    signature = ALICE.sign(context, b"message")
    assert len(signature) == 64
    verify(ALICE.public.signing, context, b"message", signature)
    verify(ALICE.public.signing, context, bytearray(b"message"), signature)
    verify(ALICE.public.signing, context, memoryview(b"message"), signature)


def test_signature_is_over_the_labelled_message() -> None:
    # The exact domain-separation format: b"tisa/1/" + label + b"\n" + message.
    signature = ALICE.sign(Context.TOKEN, b"abc")
    signed = b"tisa/1/token\nabc"
    assert sodium.crypto_sign_open(signature + signed, ALICE.public.signing.raw) == signed


@pytest.mark.parametrize(
    ("signed_in", "checked_in"),
    list(itertools.permutations(Context, 2)),
    ids=lambda c: c.name,
)
def test_signature_never_verifies_in_another_context(
    signed_in: Context, checked_in: Context
) -> None:
    signature = ALICE.sign(signed_in, b"same bytes")
    with pytest.raises(VerificationError):
        verify(ALICE.public.signing, checked_in, b"same bytes", signature)


def test_context_labels_are_distinct_and_unambiguous() -> None:
    labels = [c.value for c in Context]
    assert len(set(labels)) == len(labels)
    for label in labels:
        # The label ends at the first newline, so no label may hold one.
        assert label and b"\n" not in label


def test_raw_signature_without_label_verifies_in_no_context() -> None:
    raw = sodium.crypto_sign(b"message", ALICE._sign_secret)[:64]
    sodium.crypto_sign_open(raw + b"message", ALICE.public.signing.raw)
    for context in Context:
        with pytest.raises(VerificationError):
            verify(ALICE.public.signing, context, b"message", raw)


def check_opaque(key: SigningPublicKey, message: Any, signature: Any) -> None:
    with pytest.raises(VerificationError) as info:
        verify(key, Context.REPORT, message, signature)
    assert str(info.value) == VerificationError.MESSAGE
    assert info.value.args == (VerificationError.MESSAGE,)
    # The cause does not leak (raise ... from None, or nothing to chain).
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_every_flipped_signature_bit_fails_opaquely() -> None:
    signature = ALICE.sign(Context.REPORT, b"message")
    for position in range(len(signature)):
        for mask in (0x01, 0x80):
            check_opaque(ALICE.public.signing, b"message", flip(signature, position, mask))


@given(st.binary(min_size=1, max_size=64), st.data())
def test_every_changed_message_fails_opaquely(message: bytes, data: Any) -> None:
    signature = ALICE.sign(Context.REPORT, message)
    position = data.draw(st.integers(0, len(message) - 1))
    mask = data.draw(st.integers(1, 255))
    check_opaque(ALICE.public.signing, flip(message, position, mask), signature)
    check_opaque(ALICE.public.signing, message + b"\x00", signature)
    check_opaque(ALICE.public.signing, message[:-1], signature)


@pytest.mark.parametrize(
    "signature",
    [b"", bytes(63), bytes(65), bytes(64), "x" * 64, None, bytearray(64)],
    ids=["empty", "63", "65", "zeros", "str", "none", "bytearray"],
)
def test_malformed_signatures_fail_opaquely(signature: Any) -> None:
    check_opaque(ALICE.public.signing, b"message", signature)


def test_signature_by_another_key_fails() -> None:
    check_opaque(BOB.public.signing, b"message", ALICE.sign(Context.REPORT, b"message"))


def test_verify_refuses_wrong_argument_types() -> None:
    signature = ALICE.sign(Context.REPORT, b"m")
    with pytest.raises(UsageError):
        verify(ALICE.public.encryption, Context.REPORT, b"m", signature)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        verify(ALICE.public.signing.raw, Context.REPORT, b"m", signature)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        verify(ALICE.public.signing, Context.REPORT, "m", signature)  # type: ignore[arg-type]


def test_signing_is_deterministic() -> None:
    assert ALICE.sign(Context.ACK, b"x") == fixed_secret(1).sign(Context.ACK, b"x")


# --- public keys ------------------------------------------------------------------------

# Ed25519 encodings of the eight small-order points, and non-canonical or off-curve ones.
ED25519_BAD = {
    "identity": "0100000000000000000000000000000000000000000000000000000000000000",
    "order 2": "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "order 4 (y=0)": "0000000000000000000000000000000000000000000000000000000000000000",
    "order 4 (y=0, sign)": "0000000000000000000000000000000000000000000000000000000000000080",
    "order 8 a": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "order 8 b": "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    "order 8 c": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "order 8 d": "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "identity, sign bit": "0100000000000000000000000000000000000000000000000000000000000080",
    "y = p (non-canonical)": "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "y = p + 1 (non-canonical)": "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "not on the curve": "0200000000000000000000000000000000000000000000000000000000000000",
}


@pytest.mark.parametrize("raw", list(ED25519_BAD.values()), ids=list(ED25519_BAD))
def test_signing_key_refuses_bad_points(raw: str) -> None:
    with pytest.raises(UsageError):
        SigningPublicKey(bytes.fromhex(raw))


# X25519 points of low order (libsodium's list), with and without the ignored top bit.
X25519_LOW_ORDER = {
    "zero": "0000000000000000000000000000000000000000000000000000000000000000",
    "one": "0100000000000000000000000000000000000000000000000000000000000000",
    "order 8 a": "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "order 8 b": "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "p - 1": "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "p": "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "p + 1": "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "zero, top bit": "0000000000000000000000000000000000000000000000000000000000000080",
    "order 8 a, top bit": "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880",
    "p, top bit": "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
}


@pytest.mark.parametrize("raw", list(X25519_LOW_ORDER.values()), ids=list(X25519_LOW_ORDER))
def test_encryption_key_refuses_low_order_points(raw: str) -> None:
    with pytest.raises(UsageError, match="low order"):
        EncryptionPublicKey(bytes.fromhex(raw))


@pytest.mark.parametrize("cls", [SigningPublicKey, EncryptionPublicKey])
@pytest.mark.parametrize(
    "raw",
    [b"", bytes(31), bytes(33), "x" * 32, None, 0],
    ids=["empty", "31", "33", "str", "none", "int"],
)
def test_public_keys_check_type_and_length(cls: type, raw: Any) -> None:
    with pytest.raises(UsageError):
        cls(raw)


@pytest.mark.parametrize("cls", [SigningPublicKey, EncryptionPublicKey])
def test_public_keys_refuse_bytes_like_but_not_bytes(cls: type) -> None:
    good = ALICE.public.signing.raw if cls is SigningPublicKey else ALICE.public.encryption.raw
    cls(good)
    with pytest.raises(UsageError):
        cls(bytearray(good))
    with pytest.raises(UsageError):
        cls(memoryview(good))


def test_public_identity_refuses_swapped_or_raw_keys() -> None:
    signing, encryption = ALICE.public.signing, ALICE.public.encryption
    assert PublicIdentity(signing, encryption) == ALICE.public
    # A signing key is never accepted where an encryption key belongs, and back.
    with pytest.raises(UsageError, match="encryption"):
        PublicIdentity(signing=signing, encryption=SigningPublicKey(BOB.public.signing.raw))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="signing"):
        PublicIdentity(signing=encryption, encryption=encryption)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        PublicIdentity(signing=signing.raw, encryption=encryption)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        PublicIdentity(signing=signing, encryption=encryption.raw)  # type: ignore[arg-type]


def test_public_keys_are_frozen_values() -> None:
    key = SigningPublicKey(ALICE.public.signing.raw)
    assert key == ALICE.public.signing and hash(key) == hash(ALICE.public.signing)
    with pytest.raises(AttributeError):
        key.raw = bytes(32)  # type: ignore[misc]
    assert key != EncryptionPublicKey(ALICE.public.encryption.raw)


def test_public_identity_dict_round_trip() -> None:
    as_dict = ALICE.public.to_dict()
    assert as_dict == {"sign": ALICE.public.signing.raw, "box": ALICE.public.encryption.raw}
    assert PublicIdentity.from_dict(enc.unpack(enc.pack(as_dict))) == ALICE.public


@pytest.mark.parametrize(
    "value",
    [
        {"sign": bytes(32)},
        {"sign": bytes(32), "box": bytes(32), "extra": 1},
        {"sign": b"x" * 31, "box": b"x" * 32},
        {"sign": "x" * 32, "box": "x" * 32},
        # well-formed, but a small-order signing key and a low-order box key
        {"sign": bytes.fromhex(ED25519_BAD["identity"]), "box": bytes(32)},
        "not a map",
    ],
    ids=["missing", "extra", "short", "text", "bad points", "not a map"],
)
def test_public_identity_from_dict_refuses(value: Any) -> None:
    with pytest.raises(ProtocolError):
        PublicIdentity.from_dict(value)


def test_public_identity_from_dict_refuses_each_bad_key() -> None:
    good = ALICE.public.to_dict()
    with pytest.raises(ProtocolError, match=r"x.*Ed25519"):
        PublicIdentity.from_dict({**good, "sign": bytes.fromhex(ED25519_BAD["order 2"])}, "x")
    with pytest.raises(ProtocolError, match=r"x.*low order"):
        PublicIdentity.from_dict({**good, "box": bytes(32)}, "x")


# --- fingerprints and hashes ------------------------------------------------------------

FINGERPRINT = re.compile(r"^[a-z2-7]{4}(-[a-z2-7]{4}){5}$")


def test_fingerprint_format_and_known_value() -> None:
    fingerprint = ALICE.public.fingerprint
    assert FINGERPRINT.match(fingerprint)
    # Pinned: a changed fingerprint would make every user re-check every key.
    assert fingerprint == "yoon-xuna-ercb-jmzo-v2ja-u3uv"
    raw = digest(Hash.FINGERPRINT, ALICE.public.signing.raw + ALICE.public.encryption.raw)
    assert base64.b32decode(fingerprint.replace("-", "").upper()) == raw[:15]


def test_fingerprint_is_stable_and_covers_both_keys() -> None:
    assert ALICE.public.fingerprint == fixed_secret(1).public.fingerprint
    assert ALICE.public.fingerprint != BOB.public.fingerprint
    mixed = PublicIdentity(ALICE.public.signing, BOB.public.encryption)
    assert mixed.fingerprint not in (ALICE.public.fingerprint, BOB.public.fingerprint)
    mixed = PublicIdentity(BOB.public.signing, ALICE.public.encryption)
    assert mixed.fingerprint not in (ALICE.public.fingerprint, BOB.public.fingerprint)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_fingerprint_format_for_any_identity(seed: bytes, box: bytes) -> None:
    public = MemberSecret(sign_seed=seed, box_secret=box).public
    assert FINGERPRINT.match(public.fingerprint)
    assert public.fingerprint == PublicIdentity(public.signing, public.encryption).fingerprint


def test_derivation_matches_libsodium() -> None:
    # RFC 8032 / libsodium seed expansion and X25519 base-point multiplication.
    assert ALICE.public.signing.raw.hex() == (
        "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
    )
    assert ALICE.public.encryption.raw == sodium.crypto_scalarmult_base(bytes([0x81]) * 32)


def test_hash_personalisations_are_distinct_16_bytes() -> None:
    persons = [h.value for h in Hash]
    assert all(len(p) == 16 for p in persons)
    assert len(set(persons)) == len(persons)


def test_digest_is_domain_separated() -> None:
    digests = {digest(h, b"data") for h in Hash}
    assert len(digests) == len(Hash)
    assert all(len(d) == 32 for d in digests)
    assert digest(Hash.CONTENT, b"data") == digest(Hash.CONTENT, b"data")
    assert digest(Hash.CONTENT, b"data", key=b"k" * 32) != digest(Hash.CONTENT, b"data")


@given(st.lists(st.binary(max_size=100), max_size=8))
def test_hasher_matches_digest(chunks: list[bytes]) -> None:
    hasher = Hasher(Hash.CIPHERTEXT)
    for chunk in chunks:
        hasher.update(chunk)
    assert hasher.finish() == digest(Hash.CIPHERTEXT, b"".join(chunks))


def test_hasher_is_libsodiums_incremental_generichash() -> None:
    # Pieces of every size the toolkit feeds (a secretstream header, full chunks with
    # their tag, a short last one): the digest is libsodium's incremental generichash
    # of the same stream.
    pieces = [os.urandom(n) for n in (24, 65553, 5, 65553, 70_000, 0, 17)]
    hasher = Hasher(Hash.CIPHERTEXT)
    state = sodium.crypto_generichash_blake2b_init(digest_size=32, person=Hash.CIPHERTEXT.value)
    for piece in pieces:
        hasher.update(piece)
        sodium.crypto_generichash_blake2b_update(state, piece)
    assert hasher.finish() == bytes(sodium.crypto_generichash_blake2b_final(state))


def test_random_id() -> None:
    ids = {random_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(type(i) is bytes and len(i) == 16 for i in ids)


# --- member secrets and sealed boxes ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sign_seed": bytes(31), "box_secret": bytes(32)},
        {"sign_seed": bytes(32), "box_secret": bytes(33)},
        {"sign_seed": "x" * 32, "box_secret": bytes(32)},
        {"sign_seed": bytes(32), "box_secret": bytearray(32)},
    ],
    ids=["short seed", "long box", "text seed", "bytearray box"],
)
def test_member_secret_checks_its_inputs(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        MemberSecret(**kwargs)


def test_generate_gives_distinct_working_secrets() -> None:
    one, two = MemberSecret.generate(), MemberSecret.generate()
    assert one.public != two.public
    verify(one.public.signing, Context.RECEIPT, b"r", one.sign(Context.RECEIPT, b"r"))


def test_repr_shows_no_secret() -> None:
    text = repr(ALICE) + str(ALICE) + format(ALICE)
    assert ALICE.public.fingerprint in text
    secrets = [bytes([1]) * 32, bytes([0x81]) * 32, ALICE._sign_secret]
    for secret in secrets:
        for form in (secret.hex(), repr(secret), base64.b64encode(secret).decode()):
            assert form not in text
    assert not hasattr(ALICE, "__dict__")  # slotted: vars() cannot dump it either


def seal(recipient: MemberSecret, message: bytes) -> bytes:
    return bytes(sodium.crypto_box_seal(message, recipient.public.encryption.raw))


def test_sealed_box_opens_only_for_its_recipient() -> None:
    sealed = seal(ALICE, b"content key")
    assert ALICE.unseal(sealed) == b"content key"
    with pytest.raises(VerificationError) as info:
        BOB.unseal(sealed)
    assert str(info.value) == VerificationError.MESSAGE


def test_sealed_box_tampering_fails_opaquely() -> None:
    sealed = seal(ALICE, b"content key")
    for position in range(len(sealed)):
        with pytest.raises(VerificationError):
            ALICE.unseal(flip(sealed, position))
    for bad in (sealed[:-1], sealed + b"\x00", b"", sealed[:47], bytes(len(sealed))):
        with pytest.raises(VerificationError):
            ALICE.unseal(bad)
    assert ALICE.unseal(bytearray(sealed)) == b"content key"
    for wrong_type in ("text", None, 0):
        with pytest.raises(UsageError):
            ALICE.unseal(wrong_type)  # type: ignore[arg-type]


# --- key files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyfile() -> bytes:
    return ALICE.to_keyfile(PASSPHRASE, name="seoul", **FAST)


def test_keyfile_round_trip(keyfile: bytes) -> None:
    assert keyfile.startswith(KEYFILE_MAGIC)
    loaded, name = MemberSecret.from_keyfile(keyfile, PASSPHRASE)
    assert name == "seoul"
    assert loaded.public == ALICE.public
    assert loaded.sign(Context.TOKEN, b"t") == ALICE.sign(Context.TOKEN, b"t")
    assert loaded.unseal(seal(ALICE, b"k")) == b"k"
    assert MemberSecret.from_keyfile(bytearray(keyfile), PASSPHRASE)[0].public == ALICE.public


def test_keyfile_salt_is_fresh() -> None:
    one = ALICE.to_keyfile(PASSPHRASE, **FAST)
    two = ALICE.to_keyfile(PASSPHRASE, **FAST)
    assert one != two
    assert MemberSecret.from_keyfile(one, PASSPHRASE)[1] == ""


@pytest.mark.parametrize("name", ["", "é" * 128, "washington desk"])
def test_keyfile_names(name: str) -> None:
    data = ALICE.to_keyfile("pw", name=name, **FAST)
    assert MemberSecret.from_keyfile(data, "pw")[1] == name


@pytest.mark.parametrize("passphrase", ["", None, b"bytes"], ids=["empty", "none", "bytes"])
def test_keyfile_refuses_bad_passphrase_argument(passphrase: Any) -> None:
    with pytest.raises(UsageError):
        ALICE.to_keyfile(passphrase, **FAST)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "x" * 257},
        {"name": "line\nbreak"},
        {"name": None},
        {"opslimit": 0},
        {"memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN - 1},
        {"memlimit": 2**32 + 1024},
        {"opslimit": True},
    ],
    ids=repr,
)
def test_keyfile_refuses_what_it_could_not_load(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        ALICE.to_keyfile("pw", **{**FAST, **kwargs})


@pytest.mark.parametrize(
    "passphrase",
    ["wrong", "", PASSPHRASE + " ", PASSPHRASE.upper(), PASSPHRASE[:-1]],
    ids=repr,
)
def test_wrong_passphrase(keyfile: bytes, passphrase: str) -> None:
    with pytest.raises(KeyFileError):
        MemberSecret.from_keyfile(keyfile, passphrase)


def field_boundaries(keyfile: bytes) -> dict[str, int]:
    """Named byte positions: the magic, then the start and end of every key and value."""
    body = keyfile[len(KEYFILE_MAGIC) :]
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(body)
    size = unpacker.read_map_header()
    positions = {"start": 0, "magic end": len(KEYFILE_MAGIC) - 1, "map header": len(KEYFILE_MAGIC)}
    for _ in range(size):
        start = len(KEYFILE_MAGIC) + unpacker.tell()
        key = unpacker.unpack()
        positions[f"{key} key"] = start
        positions[f"{key} value"] = len(KEYFILE_MAGIC) + unpacker.tell()
        unpacker.unpack()
        positions[f"{key} value end"] = len(KEYFILE_MAGIC) + unpacker.tell() - 1
    box = positions["box value"] + 2  # bin8 marker and length, then nonce | mac | ciphertext
    positions.update({"box nonce": box, "box mac": box + 24, "box ciphertext": box + 40})
    positions["end"] = len(keyfile) - 1
    return positions


BOUNDARIES = [
    "start",
    "magic end",
    "map header",
    *(
        f"{field} {part}"
        for field in ("box", "kdf", "mem", "ops", "salt", "v")
        for part in ("key", "value", "value end")
    ),
    "box nonce",
    "box mac",
    "box ciphertext",
    "end",
]


def test_field_boundaries_cover_every_field(keyfile: bytes) -> None:
    assert sorted(field_boundaries(keyfile)) == sorted(BOUNDARIES)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
@pytest.mark.parametrize("where", BOUNDARIES)
def test_flip_at_field_boundary(keyfile: bytes, where: str, mask: int) -> None:
    position = field_boundaries(keyfile)[where]
    with pytest.raises(KeyFileError):
        MemberSecret.from_keyfile(flip(keyfile, position, mask), PASSPHRASE)


def test_every_byte_flipped_is_refused(keyfile: bytes) -> None:
    loaded = []
    for position in range(len(keyfile)):
        for mask in (0x01, 0x80, 0xFF):
            try:
                MemberSecret.from_keyfile(flip(keyfile, position, mask), PASSPHRASE)
            except KeyFileError:
                continue
            loaded.append((position, mask))
    assert loaded == []


def test_every_truncation_is_refused(keyfile: bytes) -> None:
    for end in range(len(keyfile)):
        with pytest.raises(KeyFileError):
            MemberSecret.from_keyfile(keyfile[:end], PASSPHRASE)
    with pytest.raises(KeyFileError):
        MemberSecret.from_keyfile(keyfile + b"\x00", PASSPHRASE)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"tisa-keyfile-2\n",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
        bytes(32),
        enc.pack({"v": 1}),
        KEYFILE_MAGIC,
        KEYFILE_MAGIC + b"\xc1",
        KEYFILE_MAGIC + enc.pack({"v": 1}),
    ],
    ids=["empty", "other magic", "ssh key", "raw seed", "no magic", "magic only", "junk", "map"],
)
def test_not_a_keyfile(data: bytes) -> None:
    with pytest.raises(KeyFileError):
        MemberSecret.from_keyfile(data, PASSPHRASE)


def test_from_keyfile_argument_types(keyfile: bytes) -> None:
    with pytest.raises(UsageError):
        MemberSecret.from_keyfile(keyfile.decode("latin-1"), PASSPHRASE)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        MemberSecret.from_keyfile(keyfile, PASSPHRASE.encode())  # type: ignore[arg-type]


def craft_keyfile(
    outer: dict[str, Any], inner_header: dict[str, Any], keys: dict[str, Any]
) -> bytes:
    """A key file written by hand, so the checks behind the decryption can be reached."""
    key = nacl.pwhash.argon2id.kdf(
        32, PASSPHRASE.encode(), outer["salt"], opslimit=outer["ops"], memlimit=outer["mem"]
    )
    inner = enc.pack({"header": inner_header, "keys": enc.pack(keys)})
    box = bytes(nacl.secret.SecretBox(key).encrypt(inner))
    return KEYFILE_MAGIC + enc.pack({**outer, "box": box})


HEADER = {
    "v": 1,
    "kdf": "argon2id13",
    "ops": FAST["opslimit"],
    "mem": FAST["memlimit"],
    "salt": bytes(16),
}
KEYS = {"name": "x", "sign_seed": bytes(32), "box_secret": bytes(32)}


def test_crafted_keyfile_loads() -> None:
    secret, name = MemberSecret.from_keyfile(craft_keyfile(HEADER, HEADER, KEYS), PASSPHRASE)
    assert name == "x"
    assert secret.public == MemberSecret(sign_seed=bytes(32), box_secret=bytes(32)).public


@pytest.mark.parametrize(
    ("outer", "inner_header", "keys"),
    [
        # cost changed outside the box but not inside: the header is authenticated
        ({**HEADER, "ops": 2}, HEADER, KEYS),
        ({**HEADER, "mem": 2 * HEADER["mem"]}, HEADER, KEYS),
        (HEADER, {**HEADER, "salt": b"\x01" * 16}, KEYS),
        (HEADER, {}, KEYS),
        (HEADER, HEADER, {**KEYS, "sign_seed": bytes(31)}),
        (HEADER, HEADER, {**KEYS, "name": "bad\x00name"}),
        (HEADER, HEADER, {"name": "x", "sign_seed": bytes(32)}),
    ],
    ids=["ops", "mem", "salt", "no header", "short seed", "bad name", "missing key"],
)
def test_inner_checks(outer: dict[str, Any], inner_header: dict[str, Any], keys: Any) -> None:
    with pytest.raises(KeyFileError):
        MemberSecret.from_keyfile(craft_keyfile(outer, inner_header, keys), PASSPHRASE)


def test_kdf_failure_is_a_keyfile_error(keyfile: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # A damaged cost field may ask argon2id for more memory than there is.
    for exc in (nacl.exceptions.RuntimeError("out of memory"), MemoryError()):

        def fail(*args: Any, exc: BaseException = exc, **kwargs: Any) -> bytes:
            raise exc

        monkeypatch.setattr(nacl.pwhash.argon2id, "kdf", fail)
        with pytest.raises(KeyFileError):
            MemberSecret.from_keyfile(keyfile, PASSPHRASE)


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "seoul.key"
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        ALICE.save(path, PASSPHRASE, name="seoul", **FAST)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded, name = MemberSecret.load(path, PASSPHRASE)
    assert (loaded.public, name) == (ALICE.public, "seoul")
    loaded, _ = MemberSecret.load(str(path), PASSPHRASE)
    assert loaded.public == ALICE.public


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "seoul.key"
    ALICE.save(path, PASSPHRASE, **FAST)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        BOB.save(path, PASSPHRASE, **FAST)
    assert path.read_bytes() == before
    assert MemberSecret.load(path, PASSPHRASE)[0].public == ALICE.public


def test_save_with_bad_arguments_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "seoul.key"
    with pytest.raises(UsageError):
        ALICE.save(path, "", **FAST)
    assert not path.exists()


def test_load_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "seoul.key"
    ALICE.save(path, PASSPHRASE, **FAST)
    with pytest.raises(KeyFileError):
        MemberSecret.load(path, "wrong")


def test_keyfile_costs_are_capped_both_ways() -> None:
    import nacl.pwhash

    from tisa import encoding as enc
    from tisa.errors import KeyFileError, UsageError
    from tisa.keys import KEYFILE_MAGIC, MAX_KEYFILE_MEM, MAX_KEYFILE_OPS, MemberSecret

    secret = MemberSecret.generate()
    with pytest.raises(UsageError, match="opslimit"):
        secret.to_keyfile("pw", opslimit=MAX_KEYFILE_OPS + 1)
    with pytest.raises(UsageError, match="memlimit"):
        secret.to_keyfile("pw", memlimit=MAX_KEYFILE_MEM + 1)
    good = secret.to_keyfile(
        "pw",
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
    )
    outer = enc.unpack(good[len(KEYFILE_MAGIC) :])
    # A crafted file asking for more than the cap fails at once, before any argon2id run.
    for field, value in (("ops", MAX_KEYFILE_OPS + 1), ("mem", MAX_KEYFILE_MEM * 4)):
        crafted = KEYFILE_MAGIC + enc.pack({**outer, field: value})
        with pytest.raises(KeyFileError):
            MemberSecret.from_keyfile(crafted, "pw")


def _generichash(data: bytes, purpose: Hash, key: bytes = b"") -> bytes:
    return bytes(
        sodium.crypto_generichash_blake2b_salt_personal(
            data, digest_size=32, key=key, person=purpose.value
        )
    )


# The sizes the toolkit hashes: empty, ids and keys (16, 32), chain heads (64), audit
# entries and transcripts (~100-600), around BLAKE2b's 128-byte block, a 1 KiB report's
# ciphertext (1,065), a full chunk with its tag, and past hashlib's 2,047-byte point
# where it releases the GIL.
_HASH_SIZES = [0, 1, 16, 32, 64, 127, 128, 129, 255, 256, 600, 1065, 2047, 2048, 65553, 200_000]


@pytest.mark.parametrize("purpose", list(Hash))
@pytest.mark.parametrize("size", _HASH_SIZES)
def test_digest_is_libsodiums_generichash(purpose: Hash, size: int) -> None:
    # digest() computes with hashlib.blake2b: the same bytes as libsodium's generichash
    # with the same personalisation, unkeyed and keyed with a 32-byte key (content keys,
    # channel keys), for every personalisation the toolkit uses.
    data = os.urandom(size)
    assert digest(purpose, data) == _generichash(data, purpose)
    key = os.urandom(32)
    assert digest(purpose, data, key=key) == _generichash(data, purpose, key)


@given(
    data=st.binary(max_size=3000), purpose=st.sampled_from(list(Hash)), key=st.binary(max_size=64)
)
def test_digest_matches_generichash_any_input(data: bytes, purpose: Hash, key: bytes) -> None:
    assert digest(purpose, data, key=key) == _generichash(data, purpose, key)
    assert digest(purpose, bytearray(data)) == _generichash(data, purpose)
