"""Every decoder of the toolkit as a fuzz target: bytes in, a value or a typed error out.

A :class:`Target` runs one decoder (or verifier) on arbitrary bytes. :func:`run` calls it
and lets through only the exceptions the target allows (the toolkit's
:class:`~tisa.errors.ProtocolError` and :class:`~tisa.errors.VerificationError`,
:class:`~tisa.errors.KeyFileError` for key files, and :class:`~tisa.errors.Refused` for
verifiers, which refuse by policy only after a signature checked); anything else
propagates, and that is the bug a fuzzer is looking for.

The same registry drives the hypothesis tests in ``tests/security/test_fuzz.py`` and the
atheris targets in ``fuzz/``. ``seeds()`` gives valid inputs of each kind to mutate from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import nacl.bindings as sodium
import nacl.pwhash

from tisa import encoding as enc
from tisa.arrangement import Arrangement, SignedArrangement
from tisa.audit import AuditEntry, AuditEvent, Checkpoint, Extract, chain_next, verify_extract
from tisa.consent import (
    Announcement,
    Answer,
    Request,
    check_answer,
    check_incoming_request,
    consent_ref,
)
from tisa.errors import KeyFileError, ProtocolError, Refused, VerificationError
from tisa.frames import NEED_DATA, FrameDecoder, encode_frame
from tisa.handshake import MemberHandshake, RelayHandshake
from tisa.keys import Context, MemberSecret
from tisa.messages import (
    Ack,
    AckReceipts,
    Chunk,
    ConsentNotice,
    Deliver,
    DeliverInline,
    FetchPrekeys,
    Prekeys,
    PrekeyStatus,
    PublishPrekeys,
    Refusal,
    SendConsent,
    Stored,
    SubmitBegin,
    SubmitInline,
    decode_message,
    encode_message,
)
from tisa.prekeys import KeyWrap, Prekey, PrekeyKind, unwrap_content_key
from tisa.receipt import Receipt, StoredAck
from tisa.report import ReportHeader, open_report
from tisa.token import Release, ReleaseToken, check_for_recipient, check_for_relay
from tisa_testing import hostile
from tisa_testing.world import World, make_world

__all__ = ["TARGETS", "Target", "run", "world"]

DECODE_ERRORS: tuple[type[BaseException], ...] = (ProtocolError,)
VERIFY_ERRORS: tuple[type[BaseException], ...] = (ProtocolError, VerificationError, Refused)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One decoder under fuzzing.

    Attributes:
        name: short id, used on the command line of ``fuzz/fuzz_decoders.py``.
        call: runs the decoder on the input.
        allowed: exceptions that count as a correct refusal.
        seeds: valid inputs, to mutate from.
    """

    name: str
    call: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]


def run(target: Target, data: bytes) -> None:
    """Run ``target`` on ``data``; a refusal it allows is swallowed, anything else raised."""
    with contextlib.suppress(*target.allowed):
        target.call(data)


@functools.cache
def world() -> World:
    """The fixed-key world every target decodes against."""
    return make_world(third_party=True)


def _tokyo_opens(token: bytes) -> Release:
    """Tokyo's check of ``token``, with the prekey secrets the world keeps for it."""
    w = world()
    return check_for_recipient(
        token,
        w.arrangement,
        w.secrets["tokyo"],
        "tokyo",
        now=w.now,
        prekey_secret=w.prekey_lookup("tokyo"),
    )


@functools.cache
def _report() -> tuple[bytes, bytes, bytes]:
    """(ciphertext, token to tokyo, digest) of one fixed report."""
    w = world()
    report = w.seal(b"fuzz seed report", attachments=[("a.txt", b"attachment")])
    return report.ciphertext, w.token(report, counter=1), report.digest


# --- frames ------------------------------------------------------------------------------


def _frames(data: bytes, step: int) -> list[bytes] | str:
    decoder = FrameDecoder(max_frame=4096)
    out: list[bytes] = []
    try:
        for start in range(0, len(data), step):
            decoder.receive_data(data[start : start + step])
            while (frame := decoder.next_frame()) is not NEED_DATA:
                out.append(frame)
        decoder.receive_data(b"")
        while (frame := decoder.next_frame()) is not NEED_DATA:
            out.append(frame)
    except ProtocolError as exc:
        return f"error after {len(out)} frames: {type(exc).__name__}"
    return out


def _frames_every_way(data: bytes) -> None:
    """Whole, one byte at a time and in threes: the same frames or the same error."""
    whole = _frames(data, max(len(data), 1))
    if _frames(data, 1) != whole or _frames(data, 3) != whole:
        raise AssertionError("frame decoding depends on how the bytes arrive")


# --- handshake ---------------------------------------------------------------------------


# Fixed ephemeral keys and nonces make the transcripts, and so the seeds, reproducible.
def _kx_pair(seed: bytes) -> tuple[bytes, bytes]:
    public, secret = sodium.crypto_kx_seed_keypair(seed)
    return bytes(public), bytes(secret)


def _member() -> MemberHandshake:
    w = world()
    return MemberHandshake(
        w.secrets["seoul"],
        "seoul",
        w.arrangement,
        _ephemeral=_kx_pair(b"m" * 32),
        _nonce=b"n" * 32,
    )


def _relay() -> RelayHandshake:
    w = world()
    return RelayHandshake(
        w.secrets["washington"],
        w.arrangement,
        _ephemeral=_kx_pair(b"r" * 32),
        _nonce=b"N" * 32,
    )


def _hello(data: bytes) -> None:
    _relay().receive(data)


def _welcome(data: bytes) -> None:
    member = _member()
    member.start()
    member.receive(data)


def _finish(data: bytes) -> None:
    relay = _relay()
    relay.receive(_member().start())
    relay.receive(data)


def _channel(data: bytes) -> None:
    w = world()
    member = MemberHandshake(w.secrets["seoul"], "seoul", w.arrangement)
    relay = RelayHandshake(w.secrets["washington"], w.arrangement)
    welcome = relay.receive(member.start())
    assert welcome is not None
    relay.receive(member.receive(welcome))
    decode_message(relay.channel.open(data))


# --- reports -----------------------------------------------------------------------------


def _open_ciphertext(data: bytes) -> None:
    """Tokyo opens arbitrary ciphertext under a valid token (sized to the input)."""
    w = world()
    _, token, _ = _report()
    release = _tokyo_opens(token)
    open_report(data, release.opener(w.arrangement))


def _open_plaintext(data: bytes) -> None:
    """A hostile originator encrypts (and signs) any plaintext; Tokyo opens it.

    The input is the plaintext after the length prefix and before the signature is
    spliced in: ``u32 length | header`` is kept, Seoul signs the header bytes as they
    are, and the rest follows. This reaches the header parser and the content layout.
    """
    w = world()
    if len(data) < 4:
        data = data.ljust(4, b"\0")
    length = int.from_bytes(data[:4], "big") % 2048
    header = data[4 : 4 + length]
    signature = w.secrets["seoul"].sign(Context.REPORT, header)
    plain = len(header).to_bytes(4, "big") + header + signature + data[4 + length :]
    key, report_id = bytes(range(32)), ReleaseToken.decode(_report()[1]).report
    ciphertext, digest = hostile.seal_raw(plain, key, report_id)
    token = hostile.forge_token(
        w.secrets["seoul"],
        w.arrangement,
        recipient="tokyo",
        report_id=report_id,
        digest_=digest,
        size=len(ciphertext),
        content_key=key,
        scope="nk.missile",
        level="secret",
        not_before=w.now - 10,
        not_after=w.now + 60,
        originator="seoul",
        signed_prekey=w.signed_prekey_key("tokyo"),
    )
    release = _tokyo_opens(token)
    open_report(ciphertext, release.opener(w.arrangement))


def _plaintext_seeds() -> list[bytes]:
    ciphertext, token, _ = _report()
    release = _tokyo_opens(token)
    t = release.token
    plain = hostile.open_raw(ciphertext, release.content_key, t.report)
    header, _, rest = hostile.split_plaintext(plain)
    return [len(header).to_bytes(4, "big") + header + rest]


# --- tokens, receipts, audit ---------------------------------------------------------------


def _token_relay(data: bytes) -> None:
    w = world()
    ciphertext, _, digest = _report()
    token = ReleaseToken.decode(data)
    check_for_relay(
        token,
        w.arrangement,
        report_id=token.report,
        digest=digest,
        size=len(ciphertext),
        originator="seoul",
        now=w.now,
    )


def _token_recipient(data: bytes) -> None:
    w = world()
    check_for_recipient(
        data,
        w.arrangement,
        w.secrets["tokyo"],
        "tokyo",
        now=w.now,
        prekey_secret=w.prekey_lookup("tokyo"),
    )


def _receipt_seed() -> bytes:
    w = world()
    _, token, digest = _report()
    return Receipt.issue(
        w.secrets["tokyo"],
        w.arrangement,
        report=ReleaseToken.decode(token).report,
        token=ReleaseToken.decode(token).id,
        originator="seoul",
        recipient="tokyo",
        digest=digest,
        received=w.now,
    ).encoded


def _ack_seed() -> bytes:
    w = world()
    _, token, digest = _report()
    return StoredAck.issue(
        w.secrets["washington"],
        w.arrangement,
        report=ReleaseToken.decode(token).report,
        originator="seoul",
        digest=digest,
        size=2000,
        stored=w.now,
    ).encoded


def _entries() -> list[AuditEntry]:
    w = world()
    return [
        AuditEntry(
            seq=i + 1,
            time=w.now + i,
            event=event,
            report=bytes([i]) * 16,
            token=None if i % 2 else bytes([i + 1]) * 16,
            parties=("seoul", "tokyo") if i != 1 else ("canberra", "seoul"),
            reason="expired" if event is AuditEvent.REFUSED else None,
        )
        for i, event in enumerate((AuditEvent.STORED, AuditEvent.RELEASED, AuditEvent.REFUSED))
    ]


def _extract_seed() -> bytes:
    w = world()
    head = bytes(32)
    pairs = []
    for entry in _entries():
        content = entry.content_hash
        head = chain_next(head, content)
        pairs.append((entry, content))
    checkpoint = Checkpoint.issue(
        w.secrets["washington"], w.arrangement, seq=len(pairs), head=head, time=w.now
    )
    return Extract.build(
        pairs, "tokyo", start_seq=0, start_head=bytes(32), checkpoint=checkpoint.encoded
    ).encode()


def _verify_extract(data: bytes) -> None:
    w = world()
    verify_extract(data, w.arrangement, "tokyo")


# --- key files ---------------------------------------------------------------------------


@functools.cache
def _keyfile_seed() -> bytes:
    # The cheapest argon2id costs: a fuzzer runs the KDF for every input that gets past
    # the outer schema.
    return (
        world()
        .secrets["seoul"]
        .to_keyfile(
            "correct horse",
            name="seoul",
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
        )
    )


def _keyfile(data: bytes) -> None:
    MemberSecret.from_keyfile(data, "correct horse")


# --- the registry --------------------------------------------------------------------------


def _messages() -> list[bytes]:
    prekey = world().signed_prekey("tokyo")
    return [
        encode_message(m)
        for m in (
            SubmitBegin(report=bytes(16), size=2000, digest=bytes(32), expires=1),
            Chunk(data=b"\x01" * 100),
            Ack(kind="delivery", token=bytes(16)),
            AckReceipts(tokens=[bytes(16), b"\x01" * 16]),
            Refusal(ref=bytes(16), reason="expired", detail="too late"),
            Deliver(token=_report()[1]),
            # Protocol version 3: a small report and its tokens in one message each way.
            SubmitInline(
                report=bytes(16),
                digest=_report()[2],
                expires=1,
                data=_report()[0],
                tokens=[_report()[1]],
            ),
            DeliverInline(token=_report()[1], data=_report()[0]),
            Stored(report=bytes(16), ack=b"\x02" * 40, released=[bytes(16)]),
            SendConsent(kind="request", data=_request().encoded),
            ConsentNotice(kind="answer", data=_answer_seed()),
            Ack(kind="answer", token=bytes(16)),
            PublishPrekeys(signed=prekey, one_time=[world().prekey("tokyo")]),
            # Protocol version 4: several prekey bundles of one member in one fetch.
            FetchPrekeys(ref=bytes(16), member="tokyo", count=4),
            Prekeys(ref=bytes(16), member="tokyo", signed=prekey, one_time=[]),
            Prekeys(
                ref=bytes(16), member="tokyo", signed=prekey, one_time=[world().prekey("tokyo")] * 2
            ),
            PrekeyStatus(signed_not_after=1, one_time=3),
        )
    ]


@functools.cache
def _request() -> Request:
    """Tokyo's request to Seoul for the fixed report."""
    w = world()
    return Request.issue(
        w.secrets["tokyo"],
        "tokyo",
        w.arrangement,
        originator="seoul",
        report=hostile.token_body(_report()[1])["report"],
        purpose="fuzzing seed",
        now=w.now,
        valid_for=3600,
    )


def _answer_seed() -> bytes:
    w = world()
    return Answer.deny(
        w.secrets["seoul"], "seoul", w.arrangement, _request(), reason="denied", now=w.now
    ).encoded


def _announcement_seed() -> bytes:
    w = world()
    return Announcement.issue(
        w.secrets["seoul"],
        "seoul",
        w.arrangement,
        report=_request().report,
        to=["tokyo", "canberra"],
        scope="nk.missile",
        level="secret",
        size=4096,
        title="fuzzing seed",
        now=w.now,
    ).encoded


def _approval_seed() -> bytes:
    """A token to Tokyo that approves :func:`_request`."""
    w = world()
    token = hostile.token_body(_report()[1])
    return w.token(w.seal(b"approved"), counter=token["counter"] + 1, request=_request().id)


def _incoming_request(data: bytes) -> None:
    """Seoul's whole intake of a forwarded request: verify, then its acceptance rules."""
    w = world()
    consent_ref("request", data)
    request = Request.verify(data, w.arrangement)
    check_incoming_request(
        request, "seoul", seen=False, holds_report=True, now=w.now, clock_skew=120
    )


def _incoming_answer(data: bytes) -> None:
    """Tokyo's whole intake of a forwarded answer: verify, then its acceptance rules."""
    w = world()
    consent_ref("answer", data)
    check_answer(Answer.verify(data, w.arrangement), "tokyo", _request(), answered=False)


def _prekey(data: bytes) -> None:
    """The originator's check of a prekey the relay handed out as Tokyo's signed one."""
    w = world()
    Prekey.verify(data, w.arrangement, owner="tokyo", kind=PrekeyKind.SIGNED, now=w.now)


def _key_wrap(data: bytes) -> None:
    """A token's ``wrap`` map as any canonical map: decoded, then unwrapped by Tokyo
    under the seed token's associated data."""
    w = world()
    wrap = KeyWrap.from_dict(enc.unpack(data))
    aad = ReleaseToken.decode(_report()[1]).associated_data
    unwrap_content_key(wrap, aad, w.secrets["tokyo"], w.prekey_lookup("tokyo"))


def _key_wrap_seed() -> bytes:
    return enc.pack(ReleaseToken.decode(_report()[1]).wrap.to_dict())


def _handshake_seeds() -> tuple[bytes, bytes, bytes]:
    member, relay = _member(), _relay()
    hello = member.start()
    welcome = relay.receive(hello)
    assert welcome is not None
    return hello, welcome, member.receive(welcome)


def _arrangement(data: bytes) -> Arrangement:
    return Arrangement.decode(data)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "frames",
            _frames_every_way,
            (),
            lambda: [encode_frame(b"abc") + encode_frame(b"\x00" * 300), b"\x00\x00\x10\x01"],
        ),
        Target("message", decode_message, DECODE_ERRORS, _messages),
        Target(
            "report_header",
            ReportHeader.decode,
            DECODE_ERRORS,
            lambda: [hostile.split_plaintext(_header_plain())[0]],
        ),
        Target("report_ciphertext", _open_ciphertext, VERIFY_ERRORS, lambda: [_report()[0]]),
        Target("report_plaintext", _open_plaintext, VERIFY_ERRORS, _plaintext_seeds),
        Target(
            "token", ReleaseToken.decode, DECODE_ERRORS, lambda: [_report()[1], _approval_seed()]
        ),
        Target("prekey", _prekey, VERIFY_ERRORS, lambda: [world().signed_prekey("tokyo")]),
        Target("key_wrap", _key_wrap, VERIFY_ERRORS, lambda: [_key_wrap_seed()]),
        Target("token_relay", _token_relay, VERIFY_ERRORS, lambda: [_report()[1]]),
        Target(
            "token_recipient",
            _token_recipient,
            VERIFY_ERRORS,
            lambda: [_report()[1], _approval_seed()],
        ),
        Target(
            "announcement",
            lambda d: Announcement.verify(d, world().arrangement),
            VERIFY_ERRORS,
            lambda: [_announcement_seed()],
        ),
        Target("request", _incoming_request, VERIFY_ERRORS, lambda: [_request().encoded]),
        Target("answer", _incoming_answer, VERIFY_ERRORS, lambda: [_answer_seed()]),
        Target(
            "receipt",
            lambda d: Receipt.verify(d, world().arrangement),
            VERIFY_ERRORS,
            lambda: [_receipt_seed()],
        ),
        Target(
            "ack",
            lambda d: StoredAck.verify(d, world().arrangement),
            VERIFY_ERRORS,
            lambda: [_ack_seed()],
        ),
        Target(
            "checkpoint",
            lambda d: Checkpoint.verify(d, world().arrangement),
            VERIFY_ERRORS,
            lambda: [Extract.decode(_extract_seed()).checkpoint],
        ),
        Target(
            "audit_entry",
            AuditEntry.decode,
            DECODE_ERRORS,
            lambda: [e.encode() for e in _entries()],
        ),
        Target("extract", _verify_extract, VERIFY_ERRORS, lambda: [_extract_seed()]),
        Target("hello", _hello, VERIFY_ERRORS, lambda: [_handshake_seeds()[0]]),
        Target("welcome", _welcome, VERIFY_ERRORS, lambda: [_handshake_seeds()[1]]),
        Target("finish", _finish, VERIFY_ERRORS, lambda: [_handshake_seeds()[2]]),
        Target("channel", _channel, VERIFY_ERRORS, lambda: [b"\x00" * 40]),
        Target("arrangement", _arrangement, DECODE_ERRORS, lambda: [world().arrangement.encoded]),
        Target(
            "signed_arrangement",
            SignedArrangement.decode,
            VERIFY_ERRORS,
            lambda: [world().signed.encode()],
        ),
        Target("keyfile", _keyfile, (KeyFileError,), lambda: [_keyfile_seed()]),
    )
}


def _header_plain() -> bytes:
    ciphertext, token, _ = _report()
    release = _tokyo_opens(token)
    return hostile.open_raw(ciphertext, release.content_key, release.token.report)
