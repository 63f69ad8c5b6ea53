"""The core's direct libsodium calls (tisa._sodium) give what PyNaCl's public functions
give, failures included; and the encodings made without a second walk (pack_checked,
a decoded token's associated data) are the bytes the generic paths make."""

from __future__ import annotations

import dataclasses
import os

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tisa import _sodium as fast
from tisa import encoding as enc
from tisa.envelope import _split, open_envelope
from tisa.errors import ProtocolError
from tisa.keys import HASHLIB_STREAM_SIZE, Hash, Hasher, digest
from tisa.token import ReleaseToken
from tisa_testing.world import make_world

P = 2**255 - 19
# The two points of order 8 (RFC 7748's curve); the rest of libsodium's list (0, 1,
# p - 1, p, p + 1) lies in the ranges the test sweeps.
ORDER_EIGHT = (
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)
TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL


def _keypair() -> tuple[bytes, bytes]:
    public, secret = sodium.crypto_sign_seed_keypair(os.urandom(32))
    return bytes(public), bytes(secret)


@pytest.mark.parametrize("size", [0, 1, 64, 300, 4096])
def test_sign_is_pynacls_signature(size: int) -> None:
    _, secret = _keypair()
    message = os.urandom(size)
    signature = fast.sign(message, secret)
    assert signature == bytes(sodium.crypto_sign(message, secret)[:64])
    assert signature == nacl.signing.SigningKey(secret[:32]).sign(message).signature
    with pytest.raises(ValueError):
        fast.sign(message, secret[:32])


def _pynacl_accepts(signed: bytes, public: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public).verify(signed)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True


def test_verify_agrees_with_pynacl_on_good_and_bad_signatures() -> None:
    public, secret = _keypair()
    other, _ = _keypair()
    message = os.urandom(200)
    signed = bytes(sodium.crypto_sign(message, secret))
    cases = {
        "valid": (signed, public),
        "wrong key": (signed, other),
        "message altered": (signed[:-1] + bytes([signed[-1] ^ 1]), public),
        "signature altered": (bytes([signed[0] ^ 1]) + signed[1:], public),
        "s not reduced": (signed[:32] + bytes([255] * 32) + signed[64:], public),
        "message dropped": (signed[:64], public),
        "truncated": (signed[:63], public),
        "empty": (b"", public),
        "low-order key": (signed, bytes(32)),
    }
    for name, (data, key) in cases.items():
        assert fast.verify(data, key) is _pynacl_accepts(data, key), name
    assert fast.verify(signed, public) is True
    assert fast.verify(signed, public[:31]) is False  # a short key never reaches libsodium


def test_every_flipped_bit_of_a_signature_is_refused_as_by_pynacl() -> None:
    public, secret = _keypair()
    signed = bytes(sodium.crypto_sign(b"report header", secret))
    for bit in range(64 * 8):
        flipped = bytearray(signed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert fast.verify(bytes(flipped), public) is _pynacl_accepts(bytes(flipped), public)


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_scalarmult_is_pynacls(secret: bytes, public: bytes) -> None:
    try:
        expected: bytes | None = bytes(sodium.crypto_scalarmult(secret, public))
    except nacl.exceptions.RuntimeError:
        expected = None
    assert fast.scalarmult(secret, public) == expected
    assert fast.scalarmult_base(secret) == bytes(sodium.crypto_scalarmult_base(secret))


def _libsodium_refuses(public: bytes) -> bool:
    try:
        sodium.crypto_scalarmult(os.urandom(32), public)
    except nacl.exceptions.RuntimeError:
        return True
    return False


def test_small_order_list_is_exactly_what_x25519_refuses() -> None:
    # The points of order 8, every small u and every encoding at or above p (both reduce
    # to small values), with and without the ignored top bit; then random keys.
    candidates = [u.to_bytes(32, "little") for u in (*ORDER_EIGHT, *range(300))]
    candidates += [u.to_bytes(32, "little") for u in range(P - 300, 2**255)]
    candidates += [os.urandom(32) for _ in range(300)]
    for point in candidates:
        for top in (0, 0x80):
            variant = point[:31] + bytes([point[31] | top])
            refused = _libsodium_refuses(variant)
            assert fast.has_small_order(variant) is refused, variant.hex()
            assert (fast.scalarmult(os.urandom(32), variant) is None) is refused
    assert sum(map(fast.has_small_order, candidates)) == 7  # libsodium's list, found again
    assert fast.scalarmult(bytes(31), bytes(32)) is None  # a wrong length never reaches it


@pytest.mark.parametrize("size", [0, 32, 1000])
def test_aead_is_pynacls(size: int) -> None:
    key, nonce, aad = os.urandom(32), os.urandom(24), os.urandom(50)
    message = os.urandom(size)
    sealed = fast.aead_encrypt(message, aad, nonce, key)
    assert sealed == sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(message, aad, nonce, key)
    assert fast.aead_decrypt(sealed, aad, nonce, key) == message
    for name, args in {
        "wrong key": (sealed, aad, nonce, os.urandom(32)),
        "wrong aad": (sealed, aad + b"x", nonce, key),
        "tampered": (bytes([sealed[0] ^ 1]) + sealed[1:], aad, nonce, key),
        "short": (sealed[:15], aad, nonce, key),
        "short key": (sealed, aad, nonce, key[:31]),
    }.items():
        assert fast.aead_decrypt(*args) is None, name
        with pytest.raises((nacl.exceptions.CryptoError, ValueError)):
            sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(*args)
    with pytest.raises(ValueError):
        fast.aead_encrypt(message, aad, nonce[:23], key)


def test_secretstream_push_and_pull_are_pynacls() -> None:
    key, ad = os.urandom(32), os.urandom(16)
    ours, reference = (sodium.crypto_secretstream_xchacha20poly1305_state() for _ in range(2))
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(ours, key)
    sodium.crypto_secretstream_xchacha20poly1305_init_push(reference, key)
    reference.statebuf[0 : len(ours.statebuf)] = ours.statebuf  # the same stream state
    messages = [os.urandom(n) for n in (0, 100, 65536, 7)]
    chunks = []
    for i, message in enumerate(messages):
        tag = TAG_FINAL if i == len(messages) - 1 else TAG_MESSAGE
        chunk = fast.stream_push(ours, message, ad, tag)
        assert chunk == sodium.crypto_secretstream_xchacha20poly1305_push(
            reference, message, ad, tag
        )
        chunks.append(chunk)
    pull, reference_pull = (sodium.crypto_secretstream_xchacha20poly1305_state() for _ in range(2))
    for state in (pull, reference_pull):
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    for i, chunk in enumerate(chunks):
        got = fast.stream_pull(pull, chunk, ad)
        assert got == sodium.crypto_secretstream_xchacha20poly1305_pull(reference_pull, chunk, ad)
        assert got == (messages[i], TAG_FINAL if i == len(chunks) - 1 else TAG_MESSAGE)


def test_secretstream_pull_refuses_what_pynacl_refuses() -> None:
    key, ad = os.urandom(32), os.urandom(16)
    push = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(push, key)
    chunk = sodium.crypto_secretstream_xchacha20poly1305_push(push, b"content", ad)
    for name, (data, data_ad) in {
        "tampered": (chunk[:-1] + bytes([chunk[-1] ^ 1]), ad),
        "wrong ad": (chunk, ad[:-1]),
        "short": (chunk[:16], ad),
    }.items():
        pull, reference = (sodium.crypto_secretstream_xchacha20poly1305_state() for _ in range(2))
        for state in (pull, reference):
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
        assert fast.stream_pull(pull, data, data_ad) is None, name
        with pytest.raises((nacl.exceptions.CryptoError, ValueError)):
            sodium.crypto_secretstream_xchacha20poly1305_pull(reference, data, data_ad)


@pytest.mark.parametrize("purpose", list(Hash))
def test_hasher_is_pynacls_generichash_for_every_personalisation(purpose: Hash) -> None:
    pieces = [os.urandom(n) for n in (0, 24, 1321, 65553)]
    hasher = Hasher(purpose)
    state = sodium.crypto_generichash_blake2b_init(digest_size=32, person=purpose.value)
    for piece in pieces:
        hasher.update(piece)
        sodium.crypto_generichash_blake2b_update(state, piece)
    result = hasher.finish()
    assert result == bytes(sodium.crypto_generichash_blake2b_final(state))
    assert result == digest(purpose, b"".join(pieces))
    with pytest.raises(Exception, match="finished"):
        hasher.finish()
    with pytest.raises(Exception, match="finished"):
        hasher.update(b"more")


# --- encodings made once --------------------------------------------------------------

WORLD = make_world()


def _tokens() -> list[bytes]:
    report = WORLD.seal()
    one_time = {"one_time_prekey": WORLD.prekey("tokyo")}
    return [WORLD.token(report), WORLD.token(report, request=os.urandom(16), **one_time)]


def test_pack_checked_is_pack_for_checked_maps() -> None:
    for token in _tokens():
        body = enc.unpack(ReleaseToken.decode(token).body)
        shuffled = dict(reversed(list(body.items())))
        shuffled["wrap"] = dict(reversed(list(body["wrap"].items())))
        assert enc.pack_checked(shuffled) == enc.pack(shuffled) == ReleaseToken.decode(token).body


def test_decoded_tokens_associated_data_is_the_body_without_the_wrap() -> None:
    for token in _tokens():
        decoded = ReleaseToken.decode(token)
        fields = enc.unpack(decoded.body)
        del fields["wrap"]
        assert decoded.associated_data == enc.pack(fields)
        # A token not made by decode (a copy) takes the slow path: the same bytes.
        copy = dataclasses.replace(decoded)
        assert not copy._from_encoding
        assert copy.associated_data == decoded.associated_data


def _generic_envelope(data: bytes, max_size: int) -> tuple[bytes, bytes] | str:
    try:
        outer = enc.check_map(
            enc.unpack(data, max_size=max_size),
            {"body": enc.bin_max(max_size), "sig": enc.bin_exact(64)},
        )
    except ProtocolError:
        return "refused"
    return outer["body"], outer["sig"]


def _fast_envelope(data: bytes, max_size: int) -> tuple[bytes, bytes] | str:
    try:
        body, _, signature = open_envelope(data, max_size=max_size, what="envelope")
    except ProtocolError:
        return "refused"
    return body, signature


@pytest.mark.parametrize("size", [0, 1, 200, 255, 256, 257, 1500, 2000])
def test_envelope_split_agrees_with_the_generic_decoder(size: int) -> None:
    # Every body here is itself a canonical map (open_envelope decodes it too).
    body = enc.pack({"x": os.urandom(max(size - 5, 0))}) if size >= 5 else enc.pack({})
    envelope = enc.pack({"body": body, "sig": os.urandom(64)})
    assert _split(envelope) == (body, envelope[-64:])
    assert _fast_envelope(envelope, 4096) == _generic_envelope(envelope, 4096) != "refused"
    # Bodies above max_size, non-canonical lengths (a bin 16 for a short body, a bin 32),
    # a str where a bin belongs, a short or long signature, trailing and missing bytes,
    # and every single byte of the frame changed: both paths agree.
    head = len(envelope) - len(body) - 70
    variants = [
        envelope + b"\x00",
        envelope[:-1],
        b"\x82\xa4body\xc5" + len(body).to_bytes(2, "big") + envelope[head:],
        b"\x82\xa4body\xc6" + len(body).to_bytes(4, "big") + envelope[head:],
        envelope[: len(envelope) - 70] + b"\xa3sig\xc4\x3f" + envelope[-63:],
        enc.pack({"body": body, "sig": os.urandom(65)}),
        enc.pack({"body": body.decode("latin-1"), "sig": os.urandom(64)}),
        enc.pack({"body": body, "sig": os.urandom(64), "x": 1}),
    ]
    for position in [*range(0, head + 2), *range(len(envelope) - 70, len(envelope) - 62)]:
        for mask in (0x01, 0x80):
            changed = bytearray(envelope)
            changed[position] ^= mask
            variants.append(bytes(changed))
    for data in variants:
        for max_size in (4096, len(envelope), len(envelope) - 1, len(body), max(len(body) - 1, 0)):
            assert _fast_envelope(data, max_size) == _generic_envelope(data, max_size) or (
                _generic_envelope(data, max_size) != "refused"
                and _fast_envelope(data, max_size) == "refused"  # the body is not a map
            )


def test_secretstream_init_is_pynacls() -> None:
    key = os.urandom(32)
    ours = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = fast.stream_init_push(ours, key)
    assert len(header) == sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
    chunk = fast.stream_push(ours, b"first", b"", TAG_MESSAGE)
    # PyNaCl's pull opens what our push made, and our pull what PyNaCl's push made.
    theirs = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(theirs, header, key)
    assert sodium.crypto_secretstream_xchacha20poly1305_pull(theirs, chunk) == (b"first", 0)
    push = sodium.crypto_secretstream_xchacha20poly1305_state()
    their_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(push, key)
    pull = sodium.crypto_secretstream_xchacha20poly1305_state()
    assert fast.stream_init_pull(pull, their_header, key)
    sealed = sodium.crypto_secretstream_xchacha20poly1305_push(push, b"second")
    assert fast.stream_pull(pull, sealed, b"") == (b"second", TAG_MESSAGE)
    # Wrong lengths and types are refused, as PyNaCl refuses them.
    for bad_header, bad_key in ((header[:-1], key), (header, key[:31]), (header, bytearray(key))):
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        assert not fast.stream_init_pull(state, bad_header, bad_key)  # type: ignore[arg-type]
        with pytest.raises((nacl.exceptions.ValueError, nacl.exceptions.TypeError)):
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, bad_header, bad_key)
    with pytest.raises(ValueError):
        fast.stream_init_push(ours, key[:16])


def test_pack_checked_is_pack_for_a_report_header_with_attachments() -> None:
    from tisa.report import ReportHeader

    header = ReportHeader(
        id=bytes(16), arrangement=bytes(32), version=3, originator="seoul",
        recipients=("tokyo", "washington"), scope="nk.missile", level="secret",
        created=1_700_000_000, body_size=10, attachments=(("map.png", 5), ("b", 0)),
    )  # fmt: skip
    fields = header.to_dict()
    fields["attachments"] = [dict(reversed(list(a.items()))) for a in fields["attachments"]]
    assert enc.pack_checked(fields) == enc.pack(fields)
    assert ReportHeader.decode(enc.pack_checked(fields)) == header


@pytest.mark.parametrize("purpose", list(Hash))
def test_a_hasher_told_its_size_is_libsodiums_generichash_on_either_side_of_the_switch(
    purpose: Hash,
) -> None:
    # A stream of at most HASHLIB_STREAM_SIZE bytes is hashed by hashlib, a longer one by
    # libsodium: the same digest either way, at the sizes a small report is fed in.
    for total in (0, 1065, HASHLIB_STREAM_SIZE, HASHLIB_STREAM_SIZE + 1):
        data = os.urandom(total)
        pieces = [data[:24], data[24:1000], data[1000:]]
        state = sodium.crypto_generichash_blake2b_init(digest_size=32, person=purpose.value)
        told = Hasher(purpose, total)
        assert (told._hashlib is not None) is (total <= HASHLIB_STREAM_SIZE)
        for piece in pieces:
            told.update(piece)
            sodium.crypto_generichash_blake2b_update(state, piece)
        result = told.finish()
        assert result == bytes(sodium.crypto_generichash_blake2b_final(state))
        with pytest.raises(Exception, match="finished"):
            told.finish()
        with pytest.raises(Exception, match="finished"):
            told.update(b"x")
