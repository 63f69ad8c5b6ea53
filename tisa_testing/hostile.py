"""What a hostile member or relay can do with the core alone (no I/O).

Every function here builds an attack input; none checks anything. The tests in
``tests/security`` feed the results to the toolkit's own verifiers and expect a typed
refusal. Another client's test suite can feed them to its verifiers the same way.

Groups:

* Raw report access (a recipient holds the content key): :func:`open_raw`,
  :func:`seal_raw`, :func:`split_plaintext`, :func:`rewrite_report`.
* Surreptitious forwarding and strip-and-re-sign: :func:`reseal_to_third_party`,
  :func:`rerelease_as_self`, :func:`resign_envelope`, :func:`forge_token`.
* Key substitution: :func:`substitute_key`, :func:`transplant_signatures`,
  :class:`ImpostorRelay`, :class:`ImpostorMember`.
* Cross-kind signatures: :func:`sign_envelope` (any body, any context),
  :func:`retarget_envelope`, :func:`sign_without_context`.
* Signature and encoding malleability: :func:`malleate_signature`,
  :func:`malleate_envelope`, :func:`loose_pack`, :func:`noncanonical_variants`.
* Bytes on the wire: :func:`flip_bit`, :func:`truncate`, :func:`splice_chunk`.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Member, SignedArrangement
from tisa.errors import VerificationError
from tisa.handshake import PROTOCOL_VERSION
from tisa.keys import (
    SIGNATURE_SIZE,
    Context,
    EncryptionPublicKey,
    Hash,
    Hasher,
    MemberSecret,
    PublicIdentity,
    SigningPublicKey,
    digest,
    random_id,
)
from tisa.limits import CHUNK_SIZE
from tisa.prekeys import wrap_content_key
from tisa.report import ABYTES, HEADER_BYTES, TAG_FINAL, TAG_MESSAGE, SealedReport, key_commitment
from tisa.token import TOKEN_VERSION, Release, ReleaseToken

__all__ = [
    "ED25519_ORDER",
    "Forged",
    "ImpostorMember",
    "ImpostorRelay",
    "envelope_parts",
    "flip_bit",
    "forge_token",
    "loose_pack",
    "malleate_envelope",
    "malleate_signature",
    "noncanonical_variants",
    "open_raw",
    "rerelease_as_self",
    "reseal_to_third_party",
    "resign_envelope",
    "retarget_envelope",
    "rewrite_report",
    "seal_raw",
    "sign_envelope",
    "sign_without_context",
    "splice_chunk",
    "split_plaintext",
    "substitute_key",
    "token_body",
    "transplant_signatures",
    "truncate",
]

_ss = sodium
_LEN = struct.Struct(">I")

# The order L of the Ed25519 base point. A signature (R, S) and (R, S + L) satisfy the
# same group equation; only a verifier that insists on S < L refuses the second.
ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


# --- raw report access -----------------------------------------------------------------


def open_raw(ciphertext: bytes, content_key: bytes, report_id: bytes) -> bytes:
    """Decrypt a sealed report without any check but the AEAD's: the padded plaintext.

    Raises:
        VerificationError: a chunk does not open under ``content_key``.
    """
    state = _ss.crypto_secretstream_xchacha20poly1305_state()
    try:
        _ss.crypto_secretstream_xchacha20poly1305_init_pull(
            state, ciphertext[:HEADER_BYTES], content_key
        )
        out = []
        for start in range(HEADER_BYTES, len(ciphertext), CHUNK_SIZE + ABYTES):
            plain, _tag = _ss.crypto_secretstream_xchacha20poly1305_pull(
                state, ciphertext[start : start + CHUNK_SIZE + ABYTES], report_id
            )
            out.append(bytes(plain))
    except (nacl.exceptions.CryptoError, ValueError):
        raise VerificationError() from None
    return b"".join(out)


def seal_raw(plaintext: bytes, content_key: bytes, report_id: bytes) -> tuple[bytes, bytes]:
    """Encrypt ``plaintext`` exactly as a report is encrypted (chunks, tags, report id
    as additional data). No padding is added: pass an already padded plaintext.

    Returns:
        (ciphertext, its digest as tokens state it)
    """
    state = _ss.crypto_secretstream_xchacha20poly1305_state()
    parts = [bytes(_ss.crypto_secretstream_xchacha20poly1305_init_push(state, content_key))]
    for start in range(0, len(plaintext), CHUNK_SIZE):
        piece = plaintext[start : start + CHUNK_SIZE]
        tag = TAG_FINAL if start + CHUNK_SIZE >= len(plaintext) else TAG_MESSAGE
        parts.append(
            bytes(_ss.crypto_secretstream_xchacha20poly1305_push(state, piece, report_id, tag))
        )
    ciphertext = b"".join(parts)
    hasher = Hasher(Hash.CIPHERTEXT)
    hasher.update(ciphertext)
    return ciphertext, hasher.finish()


def split_plaintext(plaintext: bytes) -> tuple[bytes, bytes, bytes]:
    """(signed header bytes, header signature, content and padding) of a plaintext."""
    (length,) = _LEN.unpack_from(plaintext)
    end = _LEN.size + length
    return (
        plaintext[_LEN.size : end],
        plaintext[end : end + SIGNATURE_SIZE],
        plaintext[end + SIGNATURE_SIZE :],
    )


def join_plaintext(header: bytes, signature: bytes, rest: bytes) -> bytes:
    """The inverse of :func:`split_plaintext`."""
    return _LEN.pack(len(header)) + header + signature + rest


def rewrite_report(
    report: SealedReport,
    transform: Callable[[bytes, bytes, bytes], tuple[bytes, bytes, bytes]],
    *,
    content_key: bytes | None = None,
    report_id: bytes | None = None,
) -> SealedReport:
    """Decrypt ``report``, let ``transform`` change (header, signature, rest), re-encrypt.

    What a hostile originator (who may sign anything) or a recipient (who holds the key)
    can do. The result has a new digest; a token must name it to be checked at all.
    ``rest`` keeps its length unless ``transform`` changes it.
    """
    plain = open_raw(report.ciphertext, report.content_key, report.report_id)
    header, signature, rest = transform(*split_plaintext(plain))
    key = content_key or report.content_key
    rid = report_id or report.report_id
    ciphertext, new_digest = seal_raw(join_plaintext(header, signature, rest), key, rid)
    return SealedReport(
        report_id=rid,
        ciphertext=ciphertext,
        digest=new_digest,
        content_key=key,
        header=report.header,
    )


# --- tokens and envelopes ----------------------------------------------------------------


def envelope_parts(envelope: bytes) -> tuple[bytes, bytes]:
    """(body bytes, signature) of a signed envelope, without any check of the body."""
    outer = enc.unpack(envelope)
    return outer["body"], outer["sig"]


def sign_envelope(secret: MemberSecret, context: Context, body: Mapping[str, Any] | bytes) -> bytes:
    """An envelope over ``body`` (a map, packed canonically, or exact bytes, packed or not)
    signed by ``secret`` in ``context``: any signer, any kind, any body."""
    body_bytes = body if isinstance(body, bytes) else enc.pack(body)
    return enc.pack({"body": body_bytes, "sig": secret.sign(context, body_bytes)})


def resign_envelope(
    envelope: bytes,
    secret: MemberSecret,
    context: Context,
    *,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> bytes:
    """Strip an envelope's signature, optionally edit its body, and sign it as ``secret``.

    The strip-and-re-sign attack: the signature becomes valid for ``secret``, but the body
    still names whoever it named unless ``edit`` changes that.
    """
    body_bytes, _ = envelope_parts(envelope)
    if edit is None:
        return sign_envelope(secret, context, body_bytes)
    body = enc.unpack(body_bytes)
    edit(body)
    return sign_envelope(secret, context, body)


def retarget_envelope(envelope: bytes, secret: MemberSecret, context: Context) -> bytes:
    """The same body, signed by ``secret`` in another ``context`` (cross-kind confusion)."""
    return resign_envelope(envelope, secret, context)


def sign_without_context(secret: MemberSecret, message: bytes) -> bytes:
    """A plain Ed25519 signature over ``message``, with no tisa context prefix.

    What a key used by some other protocol would produce.
    """
    # A hostile tool may reach into the key object: the toolkit itself never signs
    # without a context.
    sign_secret: bytes = secret._sign_secret
    return bytes(sodium.crypto_sign(message, sign_secret)[:SIGNATURE_SIZE])


def token_body(token: bytes | ReleaseToken) -> dict[str, Any]:
    """The decoded body map of a token (with ``v``), for editing and re-signing."""
    encoded = token.encoded if isinstance(token, ReleaseToken) else token
    return enc.unpack(envelope_parts(encoded)[0])


def forge_token(
    secret: MemberSecret,
    arrangement: Arrangement,
    *,
    recipient: str,
    report_id: bytes,
    digest_: bytes,
    size: int,
    content_key: bytes,
    scope: str,
    level: str,
    not_before: int,
    not_after: int,
    originator: str,
    counter: int = 1,
    context: Context = Context.TOKEN,
    sealed_to: EncryptionPublicKey | None = None,
    key_commit: bytes | None = None,
    relay: str | None = None,
    signed_prekey: bytes | None = None,
    one_time_prekey: bytes | None = None,
) -> bytes:
    """A token built like :func:`tisa.token.issue_token` with none of its checks.

    ``originator`` is the name the body claims; ``secret`` is who actually signs.
    The key is wrapped (:func:`tisa.prekeys.wrap_content_key`) to ``signed_prekey`` and
    ``one_time_prekey`` (public keys; both None: to the identity key alone) and to the
    recipient's identity key, or ``sealed_to`` in its place; ``key_commit`` replaces the
    commitment; ``context`` signs it as another kind.
    """
    box_key = sealed_to or arrangement.member(recipient).identity.encryption
    body: dict[str, Any] = {
        "v": TOKEN_VERSION,
        "id": random_id(),
        "arrangement": arrangement.id,
        "version": arrangement.version,
        "originator": originator,
        "relay": relay or arrangement.relay,
        "recipient": recipient,
        "report": report_id,
        "digest": digest_,
        "size": size,
        "scope": scope,
        "level": level,
        "not_before": not_before,
        "not_after": not_after,
        "counter": counter,
        "key_commit": key_commit or key_commitment(content_key, report_id),
    }
    body["wrap"] = wrap_content_key(
        content_key,
        enc.pack(body),
        identity=box_key.raw,
        signed=signed_prekey,
        one_time=one_time_prekey,
    ).to_dict()
    return sign_envelope(secret, context, body)


@dataclasses.dataclass(frozen=True, slots=True)
class Forged:
    """A forged delivery: the ciphertext to deliver and the token to deliver it with."""

    ciphertext: bytes
    digest: bytes
    content_key: bytes
    token: bytes


def reseal_to_third_party(
    ciphertext: bytes,
    release: Release,
    secret: MemberSecret,
    arrangement: Arrangement,
    *,
    to: str,
    claim_originator: str,
    now: int,
    edit_header: Callable[[dict[str, Any]], None] | None = None,
    counter: int = 1,
    signed_prekey: bytes | None = None,
) -> Forged:
    """Surreptitious forwarding by a recipient holding ``release`` for ``ciphertext``.

    The recipient decrypts, keeps the originator's signed header and signature (or edits
    the header, which breaks that signature), re-encrypts under a fresh key for ``to``
    and signs a token with its own ``secret`` claiming ``claim_originator`` sent it.
    """
    t = release.token
    plain = open_raw(ciphertext, release.content_key, t.report)
    header, signature, rest = split_plaintext(plain)
    if edit_header is not None:
        fields = enc.unpack(header)
        edit_header(fields)
        header = enc.pack(fields)
    key = bytes(nacl.utils.random(32))
    new_ct, new_digest = seal_raw(join_plaintext(header, signature, rest), key, t.report)
    token = forge_token(
        secret,
        arrangement,
        recipient=to,
        report_id=t.report,
        digest_=new_digest,
        size=len(new_ct),
        content_key=key,
        scope=t.scope,
        level=t.level,
        not_before=now - 10,
        not_after=now + 3600,
        originator=claim_originator,
        counter=counter,
        signed_prekey=signed_prekey,
    )
    return Forged(ciphertext=new_ct, digest=new_digest, content_key=key, token=token)


def rerelease_as_self(
    release: Release,
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    *,
    to: str,
    now: int,
    counter: int = 1,
    signed_prekey: bytes | None = None,
) -> bytes:
    """Strip-and-re-sign at the token level: a recipient issues its own valid token for
    someone else's ciphertext (it knows the content key), naming itself as originator."""
    t = release.token
    return forge_token(
        secret,
        arrangement,
        recipient=to,
        report_id=t.report,
        digest_=t.digest,
        size=t.size,
        content_key=release.content_key,
        scope=t.scope,
        level=t.level,
        not_before=now - 10,
        not_after=now + 3600,
        originator=name,
        counter=counter,
        signed_prekey=signed_prekey,
    )


# --- key substitution --------------------------------------------------------------------


def substitute_key(
    arrangement: Arrangement,
    member: str,
    *,
    signing: SigningPublicKey | None = None,
    encryption: EncryptionPublicKey | None = None,
) -> Arrangement:
    """The same arrangement version with ``member``'s keys swapped (a relay's substitution).

    Its id differs, so no signature gathered for the original verifies on it.
    """
    members = []
    for m in arrangement.members:
        if m.name == member:
            identity = PublicIdentity(
                signing or m.identity.signing, encryption or m.identity.encryption
            )
            m = Member(name=m.name, identity=identity, roles=m.roles)
        members.append(m)
    return Arrangement(
        name=arrangement.name,
        version=arrangement.version,
        previous=arrangement.previous,
        members=tuple(members),
        relay=arrangement.relay,
        scopes=arrangement.scopes,
        levels=arrangement.levels,
        created=arrangement.created,
    )


def transplant_signatures(signed: SignedArrangement, onto: Arrangement) -> bytes:
    """An arrangement file pairing ``onto`` with the signatures gathered for ``signed``."""
    return enc.pack({"arrangement": onto.encoded, "signatures": dict(signed.signatures)})


def _without(fields: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in names}


class ImpostorRelay:
    """Answers a member's ``hello`` as the relay would, but signs with its own key.

    ``receive(hello)`` returns a well-formed ``welcome`` naming the arrangement's relay,
    so the member gets as far as the signature check.
    """

    def __init__(self, secret: MemberSecret, arrangement: Arrangement) -> None:
        self._secret = secret
        self._arrangement = arrangement

    def receive(self, hello: bytes, *, eph: bytes | None = None) -> bytes:
        """The ``welcome``; ``eph`` replaces the ephemeral key (e.g. a low-order point)."""
        if eph is None:
            eph = bytes(sodium.crypto_kx_keypair()[0])
        welcome: dict[str, Any] = {
            "t": "welcome",
            "v": PROTOCOL_VERSION,
            "relay": self._arrangement.relay,
            "eph": eph,
            "nonce": bytes(nacl.utils.random(32)),
            "stream": bytes(nacl.utils.random(HEADER_BYTES)),
        }
        th1 = digest(Hash.TRANSCRIPT, hello + enc.pack(welcome))
        welcome["sig"] = self._secret.sign(Context.HANDSHAKE_RELAY, th1)
        return enc.pack(welcome)


class ImpostorMember:
    """Claims to be member ``name`` in a handshake while signing with its own key."""

    def __init__(self, secret: MemberSecret, name: str, arrangement: Arrangement) -> None:
        self._secret = secret
        self._name = name
        self._arrangement = arrangement
        self._hello = b""

    def start(self, *, eph: bytes | None = None) -> bytes:
        """The ``hello``; ``eph`` replaces the ephemeral key (e.g. a low-order point)."""
        self._hello = enc.pack(
            {
                "t": "hello",
                "v": PROTOCOL_VERSION,
                "arrangement": self._arrangement.id,
                "version": self._arrangement.version,
                "member": self._name,
                "eph": eph if eph is not None else bytes(sodium.crypto_kx_keypair()[0]),
                "nonce": bytes(nacl.utils.random(32)),
            }
        )
        return self._hello

    def receive(self, welcome: bytes) -> bytes:
        """The ``finish`` for the relay's ``welcome``, signed with the impostor's key."""
        fields = enc.unpack(welcome)
        th1 = digest(Hash.TRANSCRIPT, self._hello + enc.pack(_without(fields, "sig")))
        finish = {"t": "finish", "stream": bytes(nacl.utils.random(HEADER_BYTES))}
        th2 = digest(Hash.TRANSCRIPT, th1 + enc.pack(finish))
        return enc.pack({**finish, "sig": self._secret.sign(Context.HANDSHAKE_MEMBER, th2)})


# --- malleability ------------------------------------------------------------------------


def malleate_signature(signature: bytes) -> bytes:
    """(R, S) -> (R, S + L): the same group equation, a non-canonical S."""
    s = int.from_bytes(signature[32:], "little") + ED25519_ORDER
    return signature[:32] + s.to_bytes(32, "little")


def malleate_envelope(envelope: bytes) -> bytes:
    """An envelope whose signature is malleated (see :func:`malleate_signature`)."""
    body, signature = envelope_parts(envelope)
    return enc.pack({"body": body, "sig": malleate_signature(signature)})


def loose_pack(
    value: Any,
    *,
    widen: frozenset[str] = frozenset(),
    reverse_keys: bool = False,
) -> bytes:
    """msgpack with choices the canonical form forbids.

    Args:
        value: maps, lists, str, bytes, int, bool, None.
        widen: kinds to encode in a longer form than needed: any of ``"int"``,
            ``"str"``, ``"bin"``, ``"array"``, ``"map"``.
        reverse_keys: write map keys in reverse canonical order.
    """
    out = bytearray()

    def length(n: int, kind: str, fix_base: int | None, fix_max: int, codes: list[int]) -> None:
        wide = kind in widen
        if fix_base is not None and n <= fix_max and not wide:
            out.append(fix_base | n)
            return
        sizes = [1, 2, 4] if len(codes) == 3 else [2, 4]
        start = 0
        for i, size in enumerate(sizes):
            if n < 1 << (8 * size):
                start = i
                break
        if wide and (fix_base is None or n > fix_max):
            start += 1
        start = min(start, len(sizes) - 1)
        out.append(codes[start])
        out.extend(n.to_bytes(sizes[start], "big"))

    def walk(v: Any) -> None:
        if v is None:
            out.append(0xC0)
        elif v is True or v is False:
            out.append(0xC3 if v else 0xC2)
        elif isinstance(v, int):
            if v < 0:
                out.extend(enc.pack({"x": v})[3:])  # negative ints: canonical form
            elif v < 128 and "int" not in widen:
                out.append(v)
            else:
                sizes = [(1, 0xCC), (2, 0xCD), (4, 0xCE), (8, 0xCF)]
                index = next(i for i, (s, _) in enumerate(sizes) if v < 1 << (8 * s))
                if "int" in widen and v >= 128:
                    index = min(index + 1, 3)
                size, code = sizes[index]
                out.append(code)
                out.extend(v.to_bytes(size, "big"))
        elif isinstance(v, str):
            raw = v.encode("utf-8")
            length(len(raw), "str", 0xA0, 31, [0xD9, 0xDA, 0xDB])
            out.extend(raw)
        elif isinstance(v, bytes):
            length(len(v), "bin", None, 0, [0xC4, 0xC5, 0xC6])
            out.extend(v)
        elif isinstance(v, list | tuple):
            length(len(v), "array", 0x90, 15, [0xDC, 0xDD])
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            length(len(v), "map", 0x80, 15, [0xDE, 0xDF])
            keys = sorted(v, key=str.encode, reverse=reverse_keys)
            for key in keys:
                walk(key)
                walk(v[key])
        else:
            raise TypeError(f"loose_pack cannot encode {type(v).__name__}")

    walk(value)
    return bytes(out)


def noncanonical_variants(encoded: bytes) -> Iterator[tuple[str, bytes]]:
    """Encodings of the same canonical map that the canonical decoder must refuse.

    Yields (label, bytes) for each variant that differs from ``encoded``: every kind
    widened, keys reversed, a duplicated key, trailing bytes.
    """
    value = enc.unpack(encoded)
    for kind in ("int", "str", "bin", "array", "map"):
        variant = loose_pack(value, widen=frozenset({kind}))
        if variant != encoded:
            yield f"wide {kind}", variant
    if len(value) > 1:
        yield "keys reversed", loose_pack(value, reverse_keys=True)
    first = sorted(value, key=str.encode)[0]
    # A duplicate of the first key at the end: the map header counts one more entry.
    body = loose_pack(value)
    count = len(value) + 1
    head = bytes([0x80 | count]) if count <= 15 else b"\xde" + count.to_bytes(2, "big")
    skip = 1 if len(value) <= 15 else 3
    yield "duplicate key", head + body[skip:] + loose_pack({first: value[first]})[1:]
    yield "trailing byte", encoded + b"\x00"
    yield "trailing map", encoded + enc.pack({})


# --- bytes on the wire -------------------------------------------------------------------


def flip_bit(data: bytes, bit: int) -> bytes:
    """``data`` with bit number ``bit`` (0 = lowest bit of the first byte) flipped.

    ``bit`` wraps around the length; empty data comes back unchanged.
    """
    if not data:
        return data
    index, shift = divmod(bit % (8 * len(data)), 8)
    return data[:index] + bytes([data[index] ^ (1 << shift)]) + data[index + 1 :]


def truncate(data: bytes, keep: int) -> bytes:
    """The first ``keep`` bytes of ``data`` (negative: drop that many from the end)."""
    return data[:keep]


def chunk_spans(size: int) -> list[tuple[int, int]]:
    """(start, end) of every secretstream chunk in a ciphertext of ``size`` bytes."""
    spans = []
    start = HEADER_BYTES
    while start < size:
        end = min(start + CHUNK_SIZE + ABYTES, size)
        spans.append((start, end))
        start = end
    return spans


def splice_chunk(target: bytes, source: bytes, index: int) -> bytes:
    """``target`` with its chunk ``index`` replaced by ``source``'s chunk ``index``."""
    start, end = chunk_spans(len(target))[index]
    s_start, s_end = chunk_spans(len(source))[index]
    return target[:start] + source[s_start:s_end] + target[end:]
