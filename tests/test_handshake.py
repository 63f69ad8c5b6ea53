"""The member-relay handshake and the secure channel after it."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import nacl.bindings as sodium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.arrangement import Arrangement
from tisa.errors import (
    ProtocolError,
    Reason,
    Refused,
    RemoteError,
    UsageError,
    VerificationError,
)
from tisa.handshake import (
    MAX_ERROR_DETAIL,
    MAX_HANDSHAKE_MESSAGE,
    PROTOCOL_VERSION,
    MemberHandshake,
    RelayHandshake,
    SecureChannel,
    State,
    encode_error,
)
from tisa.keys import Context, Hash, MemberSecret, digest

Trio = tuple[Arrangement, dict[str, MemberSecret]]


class Session:
    """One complete handshake between a member and the relay, with its messages."""

    def __init__(self, trio: Trio, name: str = "seoul", **fixed: Any) -> None:
        arrangement, secrets = trio
        self.member = MemberHandshake(secrets[name], name, arrangement, **fixed)
        self.relay = RelayHandshake(secrets["washington"], arrangement)
        self.hello = self.member.start()
        welcome = self.relay.receive(self.hello)
        assert welcome is not None
        self.welcome = welcome
        self.finish = self.member.receive(welcome)
        assert self.relay.receive(self.finish) is None


def fresh(trio: Trio, name: str = "seoul") -> tuple[MemberHandshake, RelayHandshake]:
    arrangement, secrets = trio
    return (
        MemberHandshake(secrets[name], name, arrangement),
        RelayHandshake(secrets["washington"], arrangement),
    )


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def th1_of(hello: bytes, welcome: bytes) -> bytes:
    fields = enc.unpack(welcome)
    del fields["sig"]
    return digest(Hash.TRANSCRIPT, hello + enc.pack(fields))


def resign_welcome(hello: bytes, welcome: bytes, signer: MemberSecret, context: Context) -> bytes:
    fields = enc.unpack(welcome)
    fields["sig"] = signer.sign(context, th1_of(hello, welcome))
    return enc.pack(fields)


def forge_finish(th1: bytes, signer: MemberSecret, context: Context) -> bytes:
    core = {"t": "finish", "stream": bytes(24)}
    th2 = digest(Hash.TRANSCRIPT, th1 + enc.pack(core))
    return enc.pack({**core, "sig": signer.sign(context, th2)})


# --- success -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seoul", "tokyo"])
def test_handshake_and_channel_both_ways(trio_arrangement: Trio, name: str) -> None:
    session = Session(trio_arrangement, name)
    assert session.member.state is State.DONE
    assert session.relay.state is State.DONE
    assert session.relay.peer == name
    to_relay, to_member = session.member.channel, session.relay.channel
    for i in range(5):
        message = f"report {i}".encode() * (i + 1)
        assert to_member.open(to_relay.seal(message)) == message
        assert to_relay.open(to_member.seal(message + b"!")) == message + b"!"
    assert to_member.open(to_relay.seal(b"")) == b""
    assert not to_member.peer_closed


def test_messages_have_the_specified_shape(trio_arrangement: Trio) -> None:
    arrangement, _ = trio_arrangement
    session = Session(trio_arrangement)
    hello = enc.unpack(session.hello)
    assert hello.keys() == {"t", "v", "arrangement", "version", "member", "eph", "nonce"}
    assert (hello["t"], hello["v"], hello["member"]) == ("hello", PROTOCOL_VERSION, "seoul")
    assert (hello["arrangement"], hello["version"]) == (arrangement.id, arrangement.version)
    welcome = enc.unpack(session.welcome)
    assert welcome.keys() == {"t", "v", "relay", "eph", "nonce", "stream", "sig"}
    assert (welcome["t"], welcome["relay"], len(welcome["stream"])) == ("welcome", "washington", 24)
    finish = enc.unpack(session.finish)
    assert finish.keys() == {"t", "stream", "sig"}


def test_fixed_randomness_gives_fixed_hello(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    public, secret = sodium.crypto_kx_seed_keypair(bytes(range(32)))
    ephemeral, nonce = (bytes(public), bytes(secret)), b"\x07" * 32
    first = MemberHandshake(
        secrets["seoul"], "seoul", arrangement, _ephemeral=ephemeral, _nonce=nonce
    ).start()
    again = MemberHandshake(
        secrets["seoul"], "seoul", arrangement, _ephemeral=ephemeral, _nonce=nonce
    ).start()
    assert (
        first
        == again
        == enc.pack(
            {
                "t": "hello",
                "v": PROTOCOL_VERSION,
                "arrangement": arrangement.id,
                "version": 1,
                "member": "seoul",
                "eph": bytes(public),
                "nonce": b"\x07" * 32,
            }
        )
    )
    # And a handshake with fixed randomness still completes.
    Session(trio_arrangement, _ephemeral=ephemeral, _nonce=nonce)


def test_injected_randomness_is_checked(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    public, secret = sodium.crypto_kx_keypair()
    other, _ = sodium.crypto_kx_keypair()
    with pytest.raises(UsageError):
        MemberHandshake(secrets["seoul"], "seoul", arrangement, _ephemeral=(other, secret))
    with pytest.raises(UsageError):
        MemberHandshake(secrets["seoul"], "seoul", arrangement, _ephemeral=(public, secret[:31]))
    with pytest.raises(UsageError):
        RelayHandshake(secrets["washington"], arrangement, _nonce=b"short")


def test_each_session_has_its_own_keys(trio_arrangement: Trio) -> None:
    first, second = Session(trio_arrangement), Session(trio_arrangement)
    ciphertext = first.member.channel.seal(b"for the first session")
    with pytest.raises(VerificationError):
        second.relay.channel.open(ciphertext)


# --- refusals at hello -----------------------------------------------------------------


def test_wrong_arrangement_version(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    amended = arrangement.amend(scopes=("missile",))
    member = MemberHandshake(secrets["seoul"], "seoul", amended)
    relay = RelayHandshake(secrets["washington"], arrangement)
    with pytest.raises(Refused) as info:
        relay.receive(member.start())
    assert info.value.reason is Reason.WRONG_ARRANGEMENT
    assert relay.state is State.FAILED


def test_wrong_arrangement_same_version(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    other = Arrangement(
        name="another",
        version=1,
        members=arrangement.members,
        relay=arrangement.relay,
        scopes=arrangement.scopes,
        levels=arrangement.levels,
        created=arrangement.created,
    )
    member = MemberHandshake(secrets["seoul"], "seoul", other)
    relay = RelayHandshake(secrets["washington"], arrangement)
    with pytest.raises(Refused) as info:
        relay.receive(member.start())
    assert info.value.reason is Reason.WRONG_ARRANGEMENT


def test_a_version_1_hello_is_refused(trio_arrangement: Trio) -> None:
    # Version 2 changed the token and the messages: an older peer is refused in the
    # handshake, before anything it sent could be misread.
    arrangement, secrets = trio_arrangement
    hello = enc.unpack(_hello_as(arrangement, "seoul"))
    hello["v"] = 1
    with pytest.raises(ProtocolError):
        RelayHandshake(secrets["washington"], arrangement).receive(enc.pack(hello))


def _hello_as(arrangement: Arrangement, name: str) -> bytes:
    public, _ = sodium.crypto_kx_keypair()
    return enc.pack(
        {
            "t": "hello",
            "v": PROTOCOL_VERSION,
            "arrangement": arrangement.id,
            "version": arrangement.version,
            "member": name,
            "eph": bytes(public),
            "nonce": bytes(32),
        }
    )


def test_non_member_refused(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement)
    with pytest.raises(Refused) as info:
        relay.receive(_hello_as(arrangement, "pyongyang"))
    assert info.value.reason is Reason.NOT_A_MEMBER
    assert relay.state is State.FAILED


def test_relay_name_refused_as_member(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement)
    with pytest.raises(Refused) as info:
        relay.receive(_hello_as(arrangement, "washington"))
    assert info.value.reason is Reason.WRONG_ROLE


def test_impostor_claiming_a_member_name_fails_at_finish(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement)
    hello = _hello_as(arrangement, "seoul")
    welcome = relay.receive(hello)
    assert welcome is not None
    mallory = MemberSecret.generate()
    with pytest.raises(VerificationError):
        relay.receive(forge_finish(th1_of(hello, welcome), mallory, Context.HANDSHAKE_MEMBER))
    assert relay.state is State.FAILED
    with pytest.raises(UsageError):
        _ = relay.channel
    with pytest.raises(UsageError):
        _ = relay.peer


def test_other_member_cannot_finish_for_seoul(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement)
    hello = _hello_as(arrangement, "seoul")
    welcome = relay.receive(hello)
    assert welcome is not None
    with pytest.raises(VerificationError):
        relay.receive(
            forge_finish(th1_of(hello, welcome), secrets["tokyo"], Context.HANDSHAKE_MEMBER)
        )


@pytest.mark.parametrize("context", [c for c in Context if c is not Context.HANDSHAKE_MEMBER])
def test_member_signature_in_another_context_fails(
    trio_arrangement: Trio, context: Context
) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement)
    hello = _hello_as(arrangement, "seoul")
    welcome = relay.receive(hello)
    assert welcome is not None
    with pytest.raises(VerificationError):
        relay.receive(forge_finish(th1_of(hello, welcome), secrets["seoul"], context))


def test_low_order_ephemeral_key_refused(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement)
    hello = enc.unpack(_hello_as(arrangement, "seoul"))
    hello["eph"] = bytes(32)
    with pytest.raises(ProtocolError):
        relay.receive(enc.pack(hello))


# --- the relay's answer, checked by the member -------------------------------------------


def test_welcome_naming_another_relay(trio_arrangement: Trio) -> None:
    member, relay = fresh(trio_arrangement)
    hello = member.start()
    welcome = enc.unpack(relay.receive(hello) or b"")
    welcome["relay"] = "tokyo"
    with pytest.raises(Refused) as info:
        member.receive(enc.pack(welcome))
    assert info.value.reason is Reason.WRONG_RELAY
    assert member.state is State.FAILED


def test_welcome_signed_by_someone_else(trio_arrangement: Trio) -> None:
    _, secrets = trio_arrangement
    for signer in (MemberSecret.generate(), secrets["tokyo"], secrets["seoul"]):
        member, relay = fresh(trio_arrangement)
        hello = member.start()
        welcome = relay.receive(hello) or b""
        with pytest.raises(VerificationError):
            member.receive(resign_welcome(hello, welcome, signer, Context.HANDSHAKE_RELAY))


@pytest.mark.parametrize("context", [c for c in Context if c is not Context.HANDSHAKE_RELAY])
def test_relay_signature_in_another_context_fails(trio_arrangement: Trio, context: Context) -> None:
    _, secrets = trio_arrangement
    member, relay = fresh(trio_arrangement)
    hello = member.start()
    welcome = relay.receive(hello) or b""
    with pytest.raises(VerificationError):
        member.receive(resign_welcome(hello, welcome, secrets["washington"], context))


def test_relay_constructor_needs_the_relay_key(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    with pytest.raises(UsageError):
        RelayHandshake(secrets["tokyo"], arrangement)
    with pytest.raises(UsageError):
        RelayHandshake(MemberSecret.generate(), arrangement)


def test_member_constructor_checks_name_and_key(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    with pytest.raises(UsageError):
        MemberHandshake(secrets["tokyo"], "seoul", arrangement)
    with pytest.raises(UsageError):
        MemberHandshake(secrets["seoul"], "pyongyang", arrangement)
    with pytest.raises(UsageError):
        MemberHandshake(secrets["washington"], "washington", arrangement)
    with pytest.raises(UsageError):
        MemberHandshake(secrets["seoul"], "seoul", "not an arrangement")  # type: ignore[arg-type]


# --- error messages ------------------------------------------------------------------------


def test_relay_refusal_reaches_member_as_refused(trio_arrangement: Trio) -> None:
    arrangement, secrets = trio_arrangement
    member = MemberHandshake(secrets["seoul"], "seoul", arrangement.amend(levels=("secret",)))
    relay = RelayHandshake(secrets["washington"], arrangement)
    try:
        relay.receive(member.start())
    except Refused as exc:
        error = encode_error(exc.reason, exc.detail)
    with pytest.raises(Refused) as info:
        member.receive(error)
    assert info.value.reason is Reason.WRONG_ARRANGEMENT
    assert info.value.detail
    assert member.state is State.FAILED


def test_busy_error_before_welcome(trio_arrangement: Trio) -> None:
    member, _ = fresh(trio_arrangement)
    member.start()
    with pytest.raises(Refused) as info:
        member.receive(encode_error(Reason.BUSY, "too many connections"))
    assert (info.value.reason, info.value.detail) == (Reason.BUSY, "too many connections")


def test_encode_error_cleans_detail() -> None:
    decoded = enc.unpack(encode_error(Reason.MALFORMED, "bad\nline\x7f" + "é" * 400))
    assert decoded["t"] == "error" and decoded["reason"] == "malformed"
    assert decoded["detail"].startswith("bad?line?é")
    assert len(decoded["detail"].encode()) <= MAX_ERROR_DETAIL
    with pytest.raises(UsageError):
        encode_error("nonsense", "")  # type: ignore[arg-type]
    assert enc.unpack(encode_error(Reason.BUSY))["detail"] == ""


def test_relay_does_not_accept_an_error_message(trio_arrangement: Trio) -> None:
    _, relay = fresh(trio_arrangement)
    with pytest.raises(ProtocolError):
        relay.receive(encode_error(Reason.INTERNAL, "reflected"))


def test_unknown_reason_in_error_is_malformed(trio_arrangement: Trio) -> None:
    member, _ = fresh(trio_arrangement)
    member.start()
    with pytest.raises(ProtocolError):
        member.receive(enc.pack({"t": "error", "reason": "whatever", "detail": ""}))


# --- order, reflection, replay ----------------------------------------------------------


def test_hello_reflected_to_a_member(trio_arrangement: Trio) -> None:
    member, _ = fresh(trio_arrangement)
    hello = member.start()
    with pytest.raises(ProtocolError):
        member.receive(hello)
    assert member.state is State.FAILED
    other, _ = fresh(trio_arrangement, "tokyo")
    other.start()
    with pytest.raises(ProtocolError):
        other.receive(hello)


def test_welcome_reflected_to_a_relay(trio_arrangement: Trio) -> None:
    session = Session(trio_arrangement)
    _, relay = fresh(trio_arrangement)
    with pytest.raises(ProtocolError):
        relay.receive(session.welcome)
    _, relay = fresh(trio_arrangement)
    relay.receive(session.hello)
    with pytest.raises(ProtocolError):
        relay.receive(session.welcome)


def test_finish_reflected_to_a_member(trio_arrangement: Trio) -> None:
    session = Session(trio_arrangement)
    member, _ = fresh(trio_arrangement)
    member.start()
    with pytest.raises(ProtocolError):
        member.receive(session.finish)


def test_second_hello_fails(trio_arrangement: Trio) -> None:
    member, relay = fresh(trio_arrangement)
    hello = member.start()
    welcome = relay.receive(hello) or b""
    with pytest.raises(ProtocolError):
        relay.receive(hello)
    assert relay.state is State.FAILED
    # Failed for good: even the right finish is refused now.
    with pytest.raises(ProtocolError):
        relay.receive(member.receive(welcome))


def test_finish_before_hello_fails(trio_arrangement: Trio) -> None:
    session = Session(trio_arrangement)
    _, relay = fresh(trio_arrangement)
    with pytest.raises(ProtocolError):
        relay.receive(session.finish)


def test_messages_after_completion_fail(trio_arrangement: Trio) -> None:
    session = Session(trio_arrangement)
    with pytest.raises(ProtocolError):
        session.relay.receive(session.hello)
    with pytest.raises(ProtocolError):
        session.member.receive(session.welcome)
    assert session.member.state is State.FAILED


def test_member_call_order(trio_arrangement: Trio) -> None:
    member, _ = fresh(trio_arrangement)
    with pytest.raises(UsageError):
        member.receive(b"\x80")
    assert member.state is State.FAILED
    member, _ = fresh(trio_arrangement)
    member.start()
    with pytest.raises(UsageError):
        member.start()
    with pytest.raises(UsageError):
        _ = member.channel


def test_replayed_finish_in_a_new_session_fails(trio_arrangement: Trio) -> None:
    recorded = Session(trio_arrangement)
    _, relay = fresh(trio_arrangement)
    # An attacker replays the whole recorded member side: hello gets a fresh welcome...
    assert relay.receive(recorded.hello) is not None
    # ...but the recorded finish signs the old transcript.
    with pytest.raises(VerificationError):
        relay.receive(recorded.finish)
    assert relay.state is State.FAILED


def test_replayed_welcome_in_a_new_session_fails(trio_arrangement: Trio) -> None:
    recorded = Session(trio_arrangement)
    member, _ = fresh(trio_arrangement)
    member.start()
    with pytest.raises(VerificationError):
        member.receive(recorded.welcome)


def test_finish_from_another_session_fails(trio_arrangement: Trio) -> None:
    # Two concurrent sessions of the same member: finishes are not interchangeable.
    m1, r1 = fresh(trio_arrangement)
    m2, r2 = fresh(trio_arrangement)
    w1, w2 = r1.receive(m1.start()) or b"", r2.receive(m2.start()) or b""
    f1, f2 = m1.receive(w1), m2.receive(w2)
    with pytest.raises(VerificationError):
        r1.receive(f2)
    with pytest.raises(VerificationError):
        r2.receive(f1)


# --- tampering ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["hello", "welcome", "finish"])
def test_tampering_any_byte_fails(trio_arrangement: Trio, which: str) -> None:
    arrangement, secrets = trio_arrangement
    fixed = Session(trio_arrangement)
    size = len(getattr(fixed, which))
    for index in range(size):
        member = MemberHandshake(secrets["seoul"], "seoul", arrangement)
        relay = RelayHandshake(secrets["washington"], arrangement)
        with pytest.raises(RemoteError):
            hello = member.start()
            if which == "hello":
                hello = flip(hello, index)
            welcome = relay.receive(hello) or b""
            if which == "welcome":
                welcome = flip(welcome, index % len(welcome))
            finish = member.receive(welcome)
            if which == "finish":
                finish = flip(finish, index % len(finish))
            relay.receive(finish)
        assert State.FAILED in (member.state, relay.state)


# The fixture is immutable (an arrangement and keys), so sharing it across examples is safe.
_shared_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@_shared_fixture
@given(data=st.binary(max_size=300))
def test_relay_any_bytes_raise_protocol_error(trio_arrangement: Trio, data: bytes) -> None:
    arrangement, secrets = trio_arrangement
    relay = RelayHandshake(secrets["washington"], arrangement, _nonce=bytes(32))
    with pytest.raises(ProtocolError):
        relay.receive(data)


@_shared_fixture
@given(data=st.binary(max_size=300))
def test_member_any_bytes_raise_protocol_error(trio_arrangement: Trio, data: bytes) -> None:
    arrangement, secrets = trio_arrangement
    member = MemberHandshake(secrets["seoul"], "seoul", arrangement)
    member.start()
    with pytest.raises(ProtocolError):
        member.receive(data)


def test_oversized_handshake_message(trio_arrangement: Trio) -> None:
    _, relay = fresh(trio_arrangement)
    padded = enc.pack({"t": "hello", "pad": b"x" * MAX_HANDSHAKE_MESSAGE})
    with pytest.raises(ProtocolError, match="too large"):
        relay.receive(padded)


def test_payload_must_be_bytes(trio_arrangement: Trio) -> None:
    _, relay = fresh(trio_arrangement)
    with pytest.raises(UsageError):
        relay.receive("hello")  # type: ignore[arg-type]


# --- the channel ------------------------------------------------------------------------


def channels(trio: Trio) -> tuple[SecureChannel, SecureChannel]:
    session = Session(trio)
    return session.member.channel, session.relay.channel


def test_channel_tampered_ciphertext(trio_arrangement: Trio) -> None:
    sender, receiver = channels(trio_arrangement)
    ciphertext = sender.seal(b"nuclear test detected")
    for index in (0, len(ciphertext) // 2, len(ciphertext) - 1):
        _, fresh_receiver = channels(trio_arrangement)
        with pytest.raises(VerificationError):
            fresh_receiver.open(flip(ciphertext, index))
    with pytest.raises(VerificationError):
        receiver.open(flip(ciphertext, 0))
    # One failure kills the channel: the genuine ciphertext no longer opens either.
    assert receiver.failed
    with pytest.raises(VerificationError):
        receiver.open(ciphertext)
    with pytest.raises(UsageError):
        receiver.seal(b"reply")


def test_channel_reorder_and_replay(trio_arrangement: Trio) -> None:
    sender, receiver = channels(trio_arrangement)
    first, second = sender.seal(b"one"), sender.seal(b"two")
    with pytest.raises(VerificationError):
        receiver.open(second)

    sender, receiver = channels(trio_arrangement)
    first = sender.seal(b"one")
    assert receiver.open(first) == b"one"
    with pytest.raises(VerificationError):
        receiver.open(first)


def test_channel_short_and_reflected_ciphertext(trio_arrangement: Trio) -> None:
    sender, receiver = channels(trio_arrangement)
    with pytest.raises(VerificationError):
        receiver.open(b"short")
    sender, receiver = channels(trio_arrangement)
    # A member's own ciphertext reflected back to it: the directions use distinct keys.
    with pytest.raises(VerificationError):
        sender.open(sender.seal(b"to the relay"))
    with pytest.raises(VerificationError):
        receiver.open(receiver.seal(b"to the member"))


def test_channel_close(trio_arrangement: Trio) -> None:
    member, relay = channels(trio_arrangement)
    assert relay.open(member.seal(b"last report")) == b"last report"
    final = member.close()
    assert member.closed
    with pytest.raises(UsageError):
        member.seal(b"more")
    with pytest.raises(UsageError):
        member.close()
    assert relay.open(final) == b""
    assert relay.peer_closed
    # Half-close: the other direction still works.
    assert member.open(relay.seal(b"ack")) == b"ack"
    with pytest.raises(ProtocolError):
        relay.open(final)
    assert relay.failed


def test_channel_final_with_content_is_refused(trio_arrangement: Trio) -> None:
    member, relay = channels(trio_arrangement)
    final = sodium.crypto_secretstream_xchacha20poly1305_push(
        member._push, b"smuggled", tag=sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
    )
    with pytest.raises(ProtocolError):
        relay.open(final)
    assert relay.failed


def test_channel_needs_bytes(trio_arrangement: Trio) -> None:
    member, relay = channels(trio_arrangement)
    with pytest.raises(UsageError):
        member.seal("text")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        relay.open("text")  # type: ignore[arg-type]


def test_large_channel_messages(trio_arrangement: Trio) -> None:
    member, relay = channels(trio_arrangement)
    payload = bytes(range(256)) * 1024
    for _ in range(8):
        assert relay.open(member.seal(payload)) == payload


# --- the core stays free of I/O ----------------------------------------------------------


def test_core_modules_import_no_io() -> None:
    code = (
        "import sys, tisa.frames, tisa.handshake;"
        "print(sorted({'trio', 'socket', 'asyncio'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert result.stdout.strip() == b"[]"


@given(messages=st.lists(st.binary(max_size=2000), min_size=1, max_size=8))
def test_channel_frames_are_pynacls_secretstream(messages: list[bytes]) -> None:
    # SecureChannel calls libsodium's secretstream through PyNaCl's cffi binding
    # directly: its frames must be exactly what PyNaCl's push makes, and PyNaCl's
    # frames must open on it.
    key = sodium.crypto_secretstream_xchacha20poly1305_keygen()
    ours, theirs = (sodium.crypto_secretstream_xchacha20poly1305_state() for _ in range(2))
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(ours, key)
    reference_push = sodium.crypto_secretstream_xchacha20poly1305_state()
    reference_push.statebuf[0 : len(ours.statebuf)] = bytes(ours.statebuf)  # same state
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(theirs, header, key)
    pull = sodium.crypto_secretstream_xchacha20poly1305_state()
    pull_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(
        peer := sodium.crypto_secretstream_xchacha20poly1305_state(), key
    )
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(pull, pull_header, key)
    channel = SecureChannel(_push=ours, _pull=pull)
    for message in messages:
        sealed = channel.seal(message)
        assert sealed == sodium.crypto_secretstream_xchacha20poly1305_push(reference_push, message)
        assert sodium.crypto_secretstream_xchacha20poly1305_pull(theirs, sealed) == (message, 0)
        assert channel.open(sodium.crypto_secretstream_xchacha20poly1305_push(peer, message)) == (
            message
        )
    with pytest.raises(VerificationError):
        channel.open(b"\x00" * 16)  # shorter than the tag
