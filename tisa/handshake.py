"""The mutual handshake between a member and the relay, and the encrypted channel after it.

No I/O: the state machines take and return message payloads; the caller frames them
(:mod:`tisa.frames`) and moves them over whatever transport it has.

Protocol, version 2
-------------------

Both sides hold the same effective :class:`~tisa.arrangement.Arrangement`. Handshake
messages travel as plaintext frames whose payloads are canonical msgpack maps
(:mod:`tisa.encoding`); ``||`` below is byte concatenation.

1. member -> relay ``hello``::

       {"t": "hello", "v": 2, "arrangement": id (32), "version": int,
        "member": name, "eph": X25519 kx public key (32), "nonce": random (32)}

   The relay refuses, before any cryptography, an arrangement id or version other than
   its own (``wrong_arrangement``), a name that is not a member (``not_a_member``) and
   its own name (``wrong_role``). It may send an ``error`` message (below) and closes.

2. relay -> member ``welcome``::

       {"t": "welcome", "v": 2, "relay": name, "eph": 32, "nonce": 32,
        "stream": secretstream header, relay->member (24), "sig": 64}

   ``th1 = BLAKE2b[TRANSCRIPT](hello || welcome without "sig")`` and ``sig`` is the
   relay's signature over ``th1`` in context ``handshake-relay``.
   The member checks ``relay`` is the arrangement's relay (``wrong_relay``) and the
   signature with the relay's key from the arrangement.

3. member -> relay ``finish``::

       {"t": "finish", "stream": secretstream header, member->relay (24), "sig": 64}

   ``th2 = BLAKE2b[TRANSCRIPT](th1 || finish without "sig")`` and ``sig`` is the
   member's signature over ``th2`` in context ``handshake-member``. The relay checks it
   with the key the arrangement lists for the member named in ``hello``.

A relay that refuses ``hello`` may answer ``{"t": "error", "reason": code, "detail":
text}`` instead of ``welcome``; the member raises :class:`~tisa.errors.Refused`. A relay
that refuses ``finish`` just closes: the member has already switched to the channel.

Channel keys. ``(rx, tx)`` come from libsodium's ``crypto_kx`` on the ephemeral keys
(the member is the kx client). Each direction's secretstream key is
``BLAKE2b[CHANNEL](thk || label, key=kx key)`` with ``label`` ``b"member->relay"`` or
``b"relay->member"``, where ``thk = BLAKE2b[KX_TRANSCRIPT](hello || welcome without
"stream" and "sig")``. The keys cannot be bound to ``th1`` itself: ``th1`` covers the
relay's secretstream header, which libsodium only produces once the key exists. The two
headers are covered by the signatures instead, and a changed header also fails every
decryption.

After the handshake, each frame's payload is one secretstream message (``TAG_MESSAGE``);
closing sends an empty ``TAG_FINAL`` message.

Why it holds: both ephemeral keys and both nonces are in ``th1`` and ``th2``, so a
signature from one session never verifies in another (replay); the two signatures use
distinct contexts and the messages distinct types, so reflecting a message back to its
sender fails; each side signs the other's name or the name it claims (``relay`` and
``member`` are in ``th1``), so neither can be talked into a session with someone else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import nacl.bindings as sodium
import nacl.exceptions
import nacl.utils
from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib

from tisa import encoding as enc
from tisa.arrangement import Arrangement, Role
from tisa.errors import (
    ProtocolError,
    Reason,
    Refused,
    UsageError,
    VerificationError,
)
from tisa.keys import (
    DIGEST_SIZE,
    SIGNATURE_SIZE,
    Context,
    Hash,
    MemberSecret,
    digest,
    verify,
)
from tisa.limits import MAX_NAME

__all__ = [
    "MAX_ERROR_DETAIL",
    "MAX_HANDSHAKE_MESSAGE",
    "PROTOCOL_VERSION",
    "STREAM_OVERHEAD",
    "MemberHandshake",
    "RelayHandshake",
    "SecureChannel",
    "State",
    "encode_error",
]

# 2: release tokens wrap the content key to recipient prekeys (tisa.prekeys) and may
# name the release request they approve (tisa.consent); the channel carries the prekey
# and the consent messages. 3: a small report and its tokens travel in one message
# (submit_inline, deliver_inline; stored names the tokens accepted with it). 4: fewer
# messages per report: a recipient's send_receipt also acknowledges the delivery it
# names, and one prekeys_fetch asks for several bundles of one member. A peer of
# another version is refused in the handshake.
PROTOCOL_VERSION = 4

KX_KEY_SIZE: Final[int] = sodium.crypto_kx_PUBLIC_KEY_BYTES
NONCE_SIZE = 32
STREAM_HEADER_SIZE: Final[int] = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
# Bytes a sealed channel message adds to its plaintext (tag byte and MAC).
STREAM_OVERHEAD: Final[int] = sodium.crypto_secretstream_xchacha20poly1305_ABYTES

# Largest handshake message accepted. The largest one is a hello: about 150 bytes of
# fixed fields plus a member name of at most MAX_NAME bytes. 1 KiB leaves room and keeps
# what an unauthenticated peer can make us parse tiny.
MAX_HANDSHAKE_MESSAGE = 1024

# Longest detail text in an error message, in UTF-8 bytes: a sentence for a human; the
# reason code is what programs act on. The same bound as tisa.messages uses on the channel.
MAX_ERROR_DETAIL = 512

MEMBER_TO_RELAY = b"member->relay"
RELAY_TO_MEMBER = b"relay->member"

_TAG_MESSAGE: Final[int] = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final[int] = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_MESSAGE_MAX: Final[int] = sodium.crypto_secretstream_xchacha20poly1305_MESSAGEBYTES_MAX


# --- messages ----------------------------------------------------------------------------

_SCHEMAS: Mapping[str, Mapping[str, enc.Field]] = {
    "hello": {
        "t": enc.one_of("hello"),
        "v": enc.uint(PROTOCOL_VERSION, PROTOCOL_VERSION),
        "arrangement": enc.bin_exact(DIGEST_SIZE),
        "version": enc.uint(2**32, 1),
        "member": enc.text(MAX_NAME),
        "eph": enc.bin_exact(KX_KEY_SIZE),
        "nonce": enc.bin_exact(NONCE_SIZE),
    },
    "welcome": {
        "t": enc.one_of("welcome"),
        "v": enc.uint(PROTOCOL_VERSION, PROTOCOL_VERSION),
        "relay": enc.text(MAX_NAME),
        "eph": enc.bin_exact(KX_KEY_SIZE),
        "nonce": enc.bin_exact(NONCE_SIZE),
        "stream": enc.bin_exact(STREAM_HEADER_SIZE),
        "sig": enc.bin_exact(SIGNATURE_SIZE),
    },
    "finish": {
        "t": enc.one_of("finish"),
        "stream": enc.bin_exact(STREAM_HEADER_SIZE),
        "sig": enc.bin_exact(SIGNATURE_SIZE),
    },
    "error": {
        "t": enc.one_of("error"),
        "reason": enc.one_of(*(r.value for r in Reason)),
        "detail": enc.text(MAX_ERROR_DETAIL, allow_empty=True),
    },
}


def _without(fields: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if key not in names}


def encode_error(reason: Reason, detail: str = "") -> bytes:
    """The payload of a handshake ``error`` message, sent by a relay before it closes.

    Args:
        reason: the refusal code, e.g. ``Refused.reason``.
        detail: human-readable text. Control characters become ``?`` and the text is cut
            to :data:`MAX_ERROR_DETAIL` bytes, so any exception's text may be passed.

    Returns:
        The canonical msgpack payload, to be sent in a plaintext frame.

    Raises:
        UsageError: ``reason`` is not a :class:`~tisa.errors.Reason`.
    """
    try:
        reason = Reason(reason)
    except ValueError:
        raise UsageError(f"not a reason code: {reason!r}") from None
    if not isinstance(detail, str):
        raise UsageError("detail must be text")
    clean = "".join("?" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in detail)
    # Cut at a character boundary so the result is still valid UTF-8.
    clean = clean.encode("utf-8")[:MAX_ERROR_DETAIL].decode("utf-8", "ignore")
    return enc.pack({"t": "error", "reason": reason.value, "detail": clean})


# --- key derivation ----------------------------------------------------------------------


def _channel_key(key_transcript: bytes, label: bytes, kx_key: bytes) -> bytes:
    return digest(Hash.CHANNEL, key_transcript + label, key=kx_key)


def _ephemeral_keypair(value: tuple[bytes, bytes] | None) -> tuple[bytes, bytes]:
    if value is None:
        public, secret = sodium.crypto_kx_keypair()
        return bytes(public), bytes(secret)
    public, secret = value
    if type(public) is not bytes or type(secret) is not bytes:
        raise UsageError("an ephemeral key pair is (public, secret) bytes")
    if len(secret) != sodium.crypto_kx_SECRET_KEY_BYTES or len(public) != KX_KEY_SIZE:
        raise UsageError("an ephemeral key pair is two 32-byte keys")
    if bytes(sodium.crypto_scalarmult_base(secret)) != public:
        raise UsageError("ephemeral public key does not match the secret key")
    return public, secret


def _nonce(value: bytes | None) -> bytes:
    if value is None:
        return bytes(nacl.utils.random(NONCE_SIZE))
    if type(value) is not bytes or len(value) != NONCE_SIZE:
        raise UsageError(f"a handshake nonce is {NONCE_SIZE} bytes")
    return value


def _new_stream_state() -> Any:
    return sodium.crypto_secretstream_xchacha20poly1305_state()


# --- the channel -------------------------------------------------------------------------


def _buffer(state: Any, size: int) -> Any:
    """The state's output buffer, grown to ``size`` bytes if needed (as PyNaCl does):
    one per direction, reused, so frames do not each allocate and free a buffer of
    up to a chunk (which left the allocator's heap ~15 MiB larger under a large
    report)."""
    if state.rawbuf is None or len(state.rawbuf) < size:
        state.rawbuf = _ffi.new("unsigned char[]", max(size, 1))
    return state.rawbuf


class SecureChannel:
    """One side's encrypted channel: a secretstream to send and one to receive.

    Made by a completed handshake (:attr:`MemberHandshake.channel`,
    :attr:`RelayHandshake.channel`), not constructed directly. Every payload is one
    secretstream message, so ciphertexts must be opened in the order they were sealed,
    each exactly once.

    Opening fails with :class:`~tisa.errors.VerificationError` for any altered, replayed,
    reordered or foreign ciphertext, and one failure kills the channel: the stream
    position is then unknown, so nothing later can be trusted.
    """

    __slots__ = ("_closed", "_failed", "_peer_closed", "_pull", "_push")

    def __init__(self, *, _push: Any, _pull: Any) -> None:
        self._push = _push
        self._pull = _pull
        self._closed = False
        self._peer_closed = False
        self._failed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: nothing more can be sealed."""
        return self._closed

    @property
    def peer_closed(self) -> bool:
        """True once the peer's final message was opened: nothing more can be opened."""
        return self._peer_closed

    @property
    def failed(self) -> bool:
        """True once opening failed; the channel is then unusable."""
        return self._failed

    def _check_can_send(self) -> None:
        if self._failed:
            raise UsageError("the channel failed; close the connection")
        if self._closed:
            raise UsageError("the channel is closed for sending")

    def _push_message(self, plaintext: bytes, tag: int) -> bytes:
        # libsodium's crypto_secretstream_xchacha20poly1305_push through PyNaCl's own
        # cffi binding, as nacl.bindings calls it, without its per-call argument checks:
        # here the state is ours, the message bytes, no additional data, a fixed tag.
        # Every frame of every connection passes here and in open() (the checks were
        # ~5 µs of ~7 per short frame); tests compare both paths.
        if len(plaintext) > _MESSAGE_MAX:
            raise UsageError("message too long for the channel")
        size = len(plaintext) + STREAM_OVERHEAD
        out = _buffer(self._push, size)
        if _lib.crypto_secretstream_xchacha20poly1305_push(
            self._push.statebuf, out, _ffi.NULL, plaintext, len(plaintext), _ffi.NULL, 0, tag
        ):  # pragma: no cover - libsodium fails here only on sizes checked above
            raise UsageError("the channel could not seal this message")
        sealed: bytes = _ffi.buffer(out, size)[:]
        return sealed

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt the next message to the peer.

        Args:
            plaintext: the message; may be empty.

        Returns:
            The ciphertext (plaintext length + 17 bytes), to send as one frame.

        Raises:
            UsageError: not bytes, or the channel is closed or has failed.
        """
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise UsageError("seal takes bytes")
        self._check_can_send()
        return self._push_message(bytes(plaintext), _TAG_MESSAGE)

    def close(self) -> bytes:
        """End the sending direction; the peer sees :attr:`peer_closed` when it opens this.

        Returns:
            The final ciphertext, to send as one frame.

        Raises:
            UsageError: already closed, or the channel has failed.
        """
        self._check_can_send()
        self._closed = True
        return self._push_message(b"", _TAG_FINAL)

    def open(self, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt the next message from the peer.

        After a call, check :attr:`peer_closed`: the peer's final message opens to
        ``b""`` and sets it.

        Args:
            ciphertext: one frame's payload.

        Returns:
            The plaintext.

        Raises:
            VerificationError: the ciphertext does not open as the next message of the
                peer's stream (always the same message), or the channel failed earlier.
            ProtocolError: a message after the peer's final one, or a final message
                with content; both kill the channel too.
            UsageError: ``ciphertext`` is not bytes.
        """
        if not isinstance(ciphertext, bytes | bytearray | memoryview):
            raise UsageError("open takes bytes")
        if self._failed:
            raise VerificationError()
        if self._peer_closed:
            self._failed = True
            raise ProtocolError("message after the peer closed the channel")
        # As in _push_message: the libsodium call through PyNaCl's cffi binding.
        ciphertext = bytes(ciphertext)
        size = len(ciphertext) - STREAM_OVERHEAD
        out = _buffer(self._pull, size)
        tag_out = self._pull.tagbuf
        if (
            size < 0
            or size > _MESSAGE_MAX
            or _lib.crypto_secretstream_xchacha20poly1305_pull(
                self._pull.statebuf,
                out,
                _ffi.NULL,
                tag_out,
                ciphertext,
                len(ciphertext),
                _ffi.NULL,
                0,
            )
        ):
            # Too short, bad tag, wrong key: the same opaque error for all.
            self._failed = True
            raise VerificationError()
        plaintext: bytes = _ffi.buffer(out, size)[:]
        tag = int(tag_out[0])
        if tag == _TAG_MESSAGE:
            return plaintext
        if tag == _TAG_FINAL and not plaintext:
            self._peer_closed = True
            return b""
        # Authentic, but nothing we send: PUSH or REKEY tags, or a final with content.
        self._failed = True
        raise ProtocolError("unexpected message kind on the channel")

    def __repr__(self) -> str:
        return (
            f"<SecureChannel closed={self._closed} peer_closed={self._peer_closed}"
            f" failed={self._failed}>"
        )


# --- state machines ----------------------------------------------------------------------


class State(enum.Enum):
    """Handshake states. A member goes START -> AWAIT_WELCOME -> DONE, a relay
    AWAIT_HELLO -> AWAIT_FINISH -> DONE; either may go to FAILED from anywhere."""

    START = "start"
    AWAIT_WELCOME = "await_welcome"
    AWAIT_HELLO = "await_hello"
    AWAIT_FINISH = "await_finish"
    DONE = "done"
    FAILED = "failed"


# (state, event) -> next state. Events are message types received, plus the member's
# local "start". A pair that is not listed is a protocol error: that one rule refuses
# reordered messages, a second hello, reflected messages and anything after the end.
_MEMBER_TRANSITIONS: Mapping[tuple[State, str], State] = {
    (State.START, "start"): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, "welcome"): State.DONE,
    (State.AWAIT_WELCOME, "error"): State.FAILED,
}
_RELAY_TRANSITIONS: Mapping[tuple[State, str], State] = {
    (State.AWAIT_HELLO, "hello"): State.AWAIT_FINISH,
    (State.AWAIT_FINISH, "finish"): State.DONE,
}

_T = TypeVar("_T")


class _Handshake:
    __slots__ = (
        "_arrangement",
        "_channel",
        "_eph_public",
        "_eph_secret",
        "_nonce",
        "_secret",
        "_state",
    )

    _TRANSITIONS: Mapping[tuple[State, str], State] = {}

    def __init__(
        self,
        secret: MemberSecret,
        arrangement: Arrangement,
        initial: State,
        ephemeral: tuple[bytes, bytes] | None,
        nonce: bytes | None,
    ) -> None:
        if not isinstance(secret, MemberSecret):
            raise UsageError("secret must be a MemberSecret")
        if not isinstance(arrangement, Arrangement):
            raise UsageError("arrangement must be an Arrangement")
        self._secret = secret
        self._arrangement = arrangement
        self._state = initial
        self._eph_public, self._eph_secret = _ephemeral_keypair(ephemeral)
        self._nonce = _nonce(nonce)
        self._channel: SecureChannel | None = None

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def channel(self) -> SecureChannel:
        """The encrypted channel, once the handshake is complete.

        Raises:
            UsageError: the handshake has not completed.
        """
        if self._channel is None:
            raise UsageError("the handshake is not complete")
        return self._channel

    def _fail(self) -> None:
        self._state = State.FAILED
        # Python cannot wipe memory, but an ephemeral secret should not stay reachable
        # from a handshake object that may live as long as its connection.
        self._eph_secret = b""

    def _next_state(self, event: str) -> State:
        next_state = self._TRANSITIONS.get((self._state, event))
        if next_state is None:
            if self._state is State.FAILED:
                raise ProtocolError("the handshake has already failed")
            if self._state is State.DONE:
                raise ProtocolError(f"handshake {event} after the handshake completed")
            raise ProtocolError(f"unexpected handshake {event} in state {self._state.value}")
        return next_state

    def _receive(self, payload: bytes, handle: Callable[[str, dict[str, Any]], _T]) -> _T:
        """Decode ``payload``, check the transition, run ``handle``; any failure -> FAILED."""
        try:
            if not isinstance(payload, bytes):
                raise UsageError("a handshake payload is bytes")
            value = enc.unpack(payload, max_size=MAX_HANDSHAKE_MESSAGE)
            kind = value.get("t")
            if not isinstance(kind, str) or kind not in _SCHEMAS:
                raise ProtocolError("not a handshake message")
            # The order check comes before the schema so that a reflected or repeated
            # message is reported as what it is, not as a schema mismatch.
            next_state = self._next_state(kind)
            result = handle(kind, enc.check_map(value, _SCHEMAS[kind], f"handshake {kind}"))
        except BaseException:
            self._fail()
            raise
        self._state = next_state
        return result


class MemberHandshake(_Handshake):
    """The member's side of the handshake (the one that connects).

    Usage::

        hs = MemberHandshake(secret, "seoul", arrangement)
        send(hs.start())
        send(hs.receive(welcome_payload))   # the finish message
        channel = hs.channel

    Args:
        secret: this member's secret keys.
        name: this member's name in ``arrangement``.
        arrangement: the effective arrangement both sides hold.
        _ephemeral: fixed (public, secret) kx key pair, for test vectors only.
        _nonce: fixed 32-byte nonce, for test vectors only.

    Raises:
        UsageError: ``name`` is not a member other than the relay, or ``secret`` is not
            that member's key in the arrangement.
    """

    __slots__ = ("_hello", "_name")

    _TRANSITIONS = _MEMBER_TRANSITIONS

    def __init__(
        self,
        secret: MemberSecret,
        name: str,
        arrangement: Arrangement,
        *,
        _ephemeral: tuple[bytes, bytes] | None = None,
        _nonce: bytes | None = None,
    ) -> None:
        super().__init__(secret, arrangement, State.START, _ephemeral, _nonce)
        try:
            member = arrangement.member(name)
        except Refused:
            raise UsageError(f"{name!r} is not a member of the arrangement") from None
        if Role.RELAY in member.roles:
            raise UsageError("the relay does not connect to itself")
        if secret.public != member.identity:
            raise UsageError(f"this key is not {name!r}'s key in the arrangement")
        self._name = name
        self._hello = b""

    def start(self) -> bytes:
        """Begin the handshake.

        Returns:
            The ``hello`` payload to send to the relay.

        Raises:
            UsageError: called more than once (the handshake then fails).
        """
        if self._state is not State.START:
            self._fail()
            raise UsageError("start() may be called once, first")
        self._hello = enc.pack(
            {
                "t": "hello",
                "v": PROTOCOL_VERSION,
                "arrangement": self._arrangement.id,
                "version": self._arrangement.version,
                "member": self._name,
                "eph": self._eph_public,
                "nonce": self._nonce,
            }
        )
        self._state = self._TRANSITIONS[(State.START, "start")]
        return self._hello

    def receive(self, payload: bytes) -> bytes:
        """Take the relay's answer to ``hello``.

        Args:
            payload: the relay's message (a frame's payload).

        Returns:
            The ``finish`` payload to send; :attr:`channel` is then ready.

        Raises:
            Refused: the relay sent an ``error`` (with its reason), or the answer names a
                relay other than the arrangement's (``wrong_relay``).
            VerificationError: the relay's signature does not check.
            ProtocolError: malformed, out of order, or the handshake is over.
            UsageError: called before :meth:`start`.
        """
        if self._state is State.START:
            self._fail()
            raise UsageError("receive() before start()")
        return self._receive(payload, self._handle)

    def _handle(self, kind: str, fields: dict[str, Any]) -> bytes:
        if kind == "error":
            raise Refused(Reason(fields["reason"]), fields["detail"])
        return self._on_welcome(fields)

    def _on_welcome(self, welcome: dict[str, Any]) -> bytes:
        arrangement = self._arrangement
        if welcome["relay"] != arrangement.relay:
            raise Refused(Reason.WRONG_RELAY, f"{welcome['relay']!r} is not the relay")
        relay = arrangement.member(arrangement.relay)
        th1 = digest(Hash.TRANSCRIPT, self._hello + enc.pack(_without(welcome, "sig")))
        verify(relay.identity.signing, Context.HANDSHAKE_RELAY, th1, welcome["sig"])
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(
                self._eph_public, self._eph_secret, welcome["eph"]
            )
        except nacl.exceptions.CryptoError:
            # Only a relay that signed a low-order key gets here.
            raise ProtocolError("invalid ephemeral key") from None
        thk = digest(Hash.KX_TRANSCRIPT, self._hello + enc.pack(_without(welcome, "stream", "sig")))
        pull = _new_stream_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(
            pull, welcome["stream"], _channel_key(thk, RELAY_TO_MEMBER, bytes(rx))
        )
        push = _new_stream_state()
        header = bytes(
            sodium.crypto_secretstream_xchacha20poly1305_init_push(
                push, _channel_key(thk, MEMBER_TO_RELAY, bytes(tx))
            )
        )
        finish = {"t": "finish", "stream": header}
        th2 = digest(Hash.TRANSCRIPT, th1 + enc.pack(finish))
        signature = self._secret.sign(Context.HANDSHAKE_MEMBER, th2)
        self._eph_secret = b""
        self._channel = SecureChannel(_push=push, _pull=pull)
        return enc.pack({**finish, "sig": signature})


class RelayHandshake(_Handshake):
    """The relay's side of the handshake, one per incoming connection.

    Usage::

        hs = RelayHandshake(secret, arrangement)
        send(hs.receive(hello_payload))     # the welcome message
        hs.receive(finish_payload)          # returns None
        channel, member = hs.channel, hs.peer

    Args:
        secret: the relay's secret keys.
        arrangement: the effective arrangement; its relay is this node.
        _ephemeral: fixed (public, secret) kx key pair, for test vectors only.
        _nonce: fixed 32-byte nonce, for test vectors only.

    Raises:
        UsageError: ``secret`` is not the relay's key in ``arrangement``.
    """

    __slots__ = ("_member", "_pull_key", "_push", "_th1")

    _TRANSITIONS = _RELAY_TRANSITIONS

    def __init__(
        self,
        secret: MemberSecret,
        arrangement: Arrangement,
        *,
        _ephemeral: tuple[bytes, bytes] | None = None,
        _nonce: bytes | None = None,
    ) -> None:
        super().__init__(secret, arrangement, State.AWAIT_HELLO, _ephemeral, _nonce)
        if secret.public != arrangement.member(arrangement.relay).identity:
            raise UsageError("this key is not the relay's key in the arrangement")
        self._member = ""
        self._th1 = b""
        self._pull_key = b""
        self._push: Any = None

    @property
    def peer(self) -> str:
        """The authenticated member's name, once the handshake is complete.

        Raises:
            UsageError: the handshake has not completed.
        """
        if self._channel is None:
            raise UsageError("the handshake is not complete")
        return self._member

    def receive(self, payload: bytes) -> bytes | None:
        """Take the member's next handshake message.

        Args:
            payload: the member's message (a frame's payload).

        Returns:
            For ``hello``, the ``welcome`` payload to send. For ``finish``, ``None``;
            :attr:`channel` and :attr:`peer` are then ready.

        Raises:
            Refused: ``wrong_arrangement``, ``not_a_member`` or ``wrong_role`` for a
                ``hello`` the relay will not serve; send :func:`encode_error` and close.
            VerificationError: the member's signature on ``finish`` does not check.
            ProtocolError: malformed, out of order, or the handshake is over.
        """
        return self._receive(payload, self._handle)

    def _handle(self, kind: str, fields: dict[str, Any]) -> bytes | None:
        if kind == "hello":
            return self._on_hello(fields)
        self._on_finish(fields)
        return None

    def _on_hello(self, hello: dict[str, Any]) -> bytes:
        arrangement = self._arrangement
        # Policy first, before any cryptography: a stranger learns only the refusal.
        if hello["arrangement"] != arrangement.id or hello["version"] != arrangement.version:
            raise Refused(Reason.WRONG_ARRANGEMENT, "not the relay's arrangement version")
        member = arrangement.member(hello["member"])
        if Role.RELAY in member.roles:
            raise Refused(Reason.WRONG_ROLE, "the relay does not connect to itself")
        try:
            rx, tx = sodium.crypto_kx_server_session_keys(
                self._eph_public, self._eph_secret, hello["eph"]
            )
        except nacl.exceptions.CryptoError:
            raise ProtocolError("invalid ephemeral key") from None
        self._eph_secret = b""
        # The payload was checked to be canonical, so packing the checked fields gives
        # back exactly the bytes the member hashes.
        hello_bytes = enc.pack(hello)
        welcome: dict[str, Any] = {
            "t": "welcome",
            "v": PROTOCOL_VERSION,
            "relay": arrangement.relay,
            "eph": self._eph_public,
            "nonce": self._nonce,
        }
        thk = digest(Hash.KX_TRANSCRIPT, hello_bytes + enc.pack(welcome))
        self._pull_key = _channel_key(thk, MEMBER_TO_RELAY, bytes(rx))
        self._push = _new_stream_state()
        welcome["stream"] = bytes(
            sodium.crypto_secretstream_xchacha20poly1305_init_push(
                self._push, _channel_key(thk, RELAY_TO_MEMBER, bytes(tx))
            )
        )
        self._th1 = digest(Hash.TRANSCRIPT, hello_bytes + enc.pack(welcome))
        welcome["sig"] = self._secret.sign(Context.HANDSHAKE_RELAY, self._th1)
        self._member = member.name
        return enc.pack(welcome)

    def _on_finish(self, finish: dict[str, Any]) -> None:
        member = self._arrangement.member(self._member)
        th2 = digest(Hash.TRANSCRIPT, self._th1 + enc.pack(_without(finish, "sig")))
        verify(member.identity.signing, Context.HANDSHAKE_MEMBER, th2, finish["sig"])
        pull = _new_stream_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(
            pull, finish["stream"], self._pull_key
        )
        self._pull_key = b""
        self._channel = SecureChannel(_push=self._push, _pull=pull)
