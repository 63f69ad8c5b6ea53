"""Key commitment, attacked for real: a ciphertext that libsodium opens under two keys.

XChaCha20-Poly1305 (here inside secretstream) is not key-committing: a hostile
originator who knows two keys can choose one 16-byte block of a ciphertext so that
its Poly1305 tag is valid under both ("invisible salamanders", Len-Grubbs-Ristenpart
partitioning oracles). This test builds such a ciphertext for a real report, checks that
libsodium's own secretstream accepts it under both keys, and then shows that the toolkit
still opens it under one token only: under the second key the plaintext has no valid
signed header where the layout requires one (see docs/security.md, "Key commitment").

The secretstream internals are recomputed here in pure Python (ChaCha20, HChaCha20,
Poly1305, test code only) and checked byte for byte against libsodium first.
"""

from __future__ import annotations

import os
import struct

import nacl.bindings as sodium
import pytest

from tisa.errors import VerificationError
from tisa.keys import Hash, digest
from tisa.report import HEADER_BYTES, TAG_FINAL, SealedReport, open_report
from tisa_testing import hostile
from tisa_testing.world import make_world

MASK = 0xFFFFFFFF
P1305 = 2**130 - 5


def _rotl(v: int, n: int) -> int:
    return ((v << n) & MASK) | (v >> (32 - n))


def _rounds(state: list[int]) -> list[int]:
    x = list(state)

    def qr(a: int, b: int, c: int, d: int) -> None:
        x[a] = (x[a] + x[b]) & MASK
        x[d] = _rotl(x[d] ^ x[a], 16)
        x[c] = (x[c] + x[d]) & MASK
        x[b] = _rotl(x[b] ^ x[c], 12)
        x[a] = (x[a] + x[b]) & MASK
        x[d] = _rotl(x[d] ^ x[a], 8)
        x[c] = (x[c] + x[d]) & MASK
        x[b] = _rotl(x[b] ^ x[c], 7)

    for _ in range(10):
        qr(0, 4, 8, 12), qr(1, 5, 9, 13), qr(2, 6, 10, 14), qr(3, 7, 11, 15)
        qr(0, 5, 10, 15), qr(1, 6, 11, 12), qr(2, 7, 8, 13), qr(3, 4, 9, 14)
    return x


_SIGMA = list(struct.unpack("<4I", b"expand 32-byte k"))


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    state = _SIGMA + list(struct.unpack("<8I", key)) + [counter] + list(struct.unpack("<3I", nonce))
    out = _rounds(state)
    return struct.pack("<16I", *((a + b) & MASK for a, b in zip(out, state, strict=True)))


def keystream(key: bytes, counter: int, nonce: bytes, length: int) -> bytes:
    blocks = [chacha20_block(key, counter + i, nonce) for i in range(-(-length // 64))]
    return b"".join(blocks)[:length]


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    x = _rounds(_SIGMA + list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16)))
    return struct.pack("<8I", *x[0:4], *x[12:16])


def poly1305_parts(key: bytes) -> tuple[int, int]:
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    return r, int.from_bytes(key[16:32], "little")


def poly_blocks(message: bytes) -> list[int]:
    out = []
    for i in range(0, len(message), 16):
        piece = message[i : i + 16]
        out.append(int.from_bytes(piece + b"\x01", "little"))
    return out


def poly_eval(blocks: list[int], r: int) -> int:
    h = 0
    for block in blocks:
        h = (h + block) * r % P1305
    return h


def mac(message: bytes, key: bytes) -> bytes:
    r, s = poly1305_parts(key)
    return ((poly_eval(poly_blocks(message), r) + s) % 2**128).to_bytes(16, "little")


class Chunk:
    """One secretstream chunk under ``key`` with stream header ``header``: the values
    libsodium's push and pull compute (crypto_secretstream_xchacha20poly1305.c)."""

    def __init__(self, key: bytes, header: bytes, ad: bytes) -> None:
        self.subkey = hchacha20(key, header[:16])
        self.nonce = struct.pack("<I", 1) + header[16:24]
        self.poly_key = chacha20_block(self.subkey, 0, self.nonce)[:32]
        self.tag_stream = chacha20_block(self.subkey, 1, self.nonce)
        self.ad = ad

    def stream(self, length: int) -> bytes:
        return keystream(self.subkey, 2, self.nonce, length)

    def mac_input(self, c0: int, body: bytes) -> bytes:
        block = bytes([c0]) + self.tag_stream[1:]
        # libsodium pads the ciphertext with (0x10 - 64 + mlen) & 0xf zero bytes:
        # mlen mod 16, not the AEAD's usual 16 - mlen mod 16. Reproduced as it is.
        pad_ad = bytes((0x10 - len(self.ad)) & 0xF)
        pad_c = bytes((0x10 - 64 + len(body)) & 0xF)
        lengths = struct.pack("<QQ", len(self.ad), 64 + len(body))
        return self.ad + pad_ad + block + body + pad_c + lengths


def test_python_model_matches_libsodium() -> None:
    key, ad = os.urandom(32), os.urandom(16)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = bytes(sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key))
    plain = os.urandom(1000)
    real = bytes(sodium.crypto_secretstream_xchacha20poly1305_push(state, plain, ad, TAG_FINAL))
    chunk = Chunk(key, header, ad)
    c0 = TAG_FINAL ^ chunk.tag_stream[0]
    body = bytes(a ^ b for a, b in zip(plain, chunk.stream(len(plain)), strict=True))
    assert real == bytes([c0]) + body + mac(chunk.mac_input(c0, body), chunk.poly_key)


def build_two_key_ciphertext(
    ciphertext: bytes, key1: bytes, report_id: bytes, free_offset: int
) -> tuple[bytes, bytes]:
    """Change one 16-byte block of ``ciphertext`` (a one-chunk report) so that its tag is
    valid under ``key1`` and a second key; returns (new ciphertext, second key)."""
    header, c0, body = ciphertext[:HEADER_BYTES], ciphertext[HEADER_BYTES], ciphertext[25:-16]
    one = Chunk(key1, header, report_id)
    # The encrypted tag byte must decrypt to FINAL under both keys: try keys until the
    # second keystream agrees on that one byte (1 in 256).
    for _ in range(20_000):
        key2 = os.urandom(32)
        two = Chunk(key2, header, report_id)
        if two.tag_stream[0] != one.tag_stream[0]:
            continue
        (r1, s1), (r2, s2) = poly1305_parts(one.poly_key), poly1305_parts(two.poly_key)
        # The free block is block j of the MAC input (ciphertext body starts after
        # 16 bytes of ad and the 64-byte tag block).
        j = (16 + 64 + free_offset) // 16
        zeroed = body[:free_offset] + bytes(16) + body[free_offset + 16 :]
        m1 = poly_blocks(one.mac_input(c0, zeroed))
        m2 = poly_blocks(two.mac_input(c0, zeroed))
        n = len(m1)
        h1, h2 = poly_eval(m1, r1), poly_eval(m2, r2)
        a1, a2 = pow(r1, n - j, P1305), pow(r2, n - j, P1305)
        # h_i(X) = h_i + X * a_i (mod p); want h1(X) - h2(X) = s2 - s1 exactly.
        d = s2 - s1
        x = (d - h1 + h2) * pow(a1 - a2, -1, P1305) % P1305
        if x >= 2**128:
            continue
        t1, t2 = (h1 + x * a1) % P1305, (h2 + x * a2) % P1305
        if t1 - t2 != d:
            continue
        new_body = body[:free_offset] + x.to_bytes(16, "little") + body[free_offset + 16 :]
        tag = mac(one.mac_input(c0, new_body), one.poly_key)
        assert tag == mac(two.mac_input(c0, new_body), two.poly_key)
        return header + bytes([c0]) + new_body + tag, key2
    raise AssertionError("no second key found")  # pragma: no cover - 2^-100 or so


def _pull(ciphertext: bytes, key: bytes, ad: bytes) -> tuple[bytes, int]:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, ciphertext[:HEADER_BYTES], key)
    plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
        state, ciphertext[HEADER_BYTES:], ad
    )
    return bytes(plain), tag


@pytest.mark.parametrize("attempt", range(3))
def test_ciphertext_valid_under_two_keys_opens_under_one_token_only(attempt: int) -> None:
    world = make_world(third_party=True)
    # A hostile originator: the body is its to choose, so a block of it can be bent.
    report = world.seal(os.urandom(600), recipients=["tokyo", "canberra"])
    plain = hostile.open_raw(report.ciphertext, report.content_key, report.report_id)
    header_len = 4 + int.from_bytes(plain[:4], "big") + 64
    free = (header_len + 15) // 16 * 16 + 16 * attempt  # a body block, 16-aligned
    crafted, key2 = build_two_key_ciphertext(
        report.ciphertext, report.content_key, report.report_id, free
    )
    # libsodium itself accepts the ciphertext under both keys, as the final chunk.
    p1, tag1 = _pull(crafted, report.content_key, report.report_id)
    p2, tag2 = _pull(crafted, key2, report.report_id)
    assert tag1 == tag2 == TAG_FINAL and p1 != p2
    # The originator signs two tokens for it, one per key; both tokens check out.
    twin = SealedReport(
        report_id=report.report_id,
        ciphertext=crafted,
        digest=digest(Hash.CIPHERTEXT, crafted),
        content_key=report.content_key,
        header=report.header,
    )
    token1 = world.token(twin, "tokyo")
    token2 = world.token(twin, "canberra", content_key=key2)
    release1, release2 = world.check(token1, "tokyo"), world.check(token2, "canberra")
    # Under the first key it is the originator's report (with 16 bent body bytes) ...
    opened = open_report(crafted, release1.opener(world.arrangement))
    assert opened.header.id == report.report_id
    # ... under the second it is refused: no signed header where the layout needs one.
    with pytest.raises(VerificationError):
        open_report(crafted, release2.opener(world.arrangement))
