"""A member client on asyncio, built only on tisa's sans-IO core.

The relay and the member node that ship with tisa run on trio, but the protocol core
(:mod:`tisa.frames`, :mod:`tisa.handshake`, :mod:`tisa.messages`, :mod:`tisa.token`,
:mod:`tisa.report`, :mod:`tisa.receipt`) does no I/O, so a client on any event loop can
speak the protocol. This one uses asyncio streams. It connects to the relay, runs the
handshake and publishes the member's prekeys (:func:`publish_prekeys`; an originator can
release to a member only once it has some); then it waits for one delivery, checks the
release token (unwrapping the content key with its prekey secrets), deletes the one-time
prekey it used, opens and verifies the report, acknowledges it and sends the signed
receipt back to the originator.

It keeps what a real client must keep durably (its prekey secrets, the set of reports
already seen, so a replayed delivery is refused even after a restart) only in memory: it
is a sketch of the wire protocol, not a replacement for ``clients.node``.

Run it against a relay (it publishes prekeys, then waits for a report released to it); the
passphrase comes from ``$TISA_PASSPHRASE`` or the variable ``--passphrase-env`` names::

    python examples/asyncio_client.py --key tokyo/identity.key \\
        --arrangement arrangement.tisa --relay 127.0.0.1:7420

It waits ``--wait`` seconds (default 30) for a delivery. Exit status: 0 with a report
printed, 1 on an error or when nothing came (one line on stderr), 2 for bad arguments
(with the usage).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass

from tisa.arrangement import Arrangement, SignedArrangement
from tisa.errors import Reason, Refused, TisaError
from tisa.frames import NEED_DATA, FrameDecoder, encode_frame
from tisa.handshake import MemberHandshake, SecureChannel
from tisa.keys import MemberSecret
from tisa.messages import (
    Chunk,
    Deliver,
    DeliverEnd,
    DeliverInline,
    Message,
    PrekeyStatus,
    PublishPrekeys,
    SendReceipt,
    decode_message,
    encode_message,
)
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.receipt import Receipt
from tisa.report import ReportHeader
from tisa.token import check_for_recipient

__all__ = ["Keyring", "Received", "publish_prekeys", "receive_one"]

READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Received:
    """What :func:`receive_one` opened: the verified header and the plaintext."""

    header: ReportHeader
    body: bytes
    attachments: dict[str, bytes]
    receipt: Receipt


class Keyring:
    """A member's prekey secrets, in memory (a real client keeps them on disk, and
    deletes them: a one-time secret once used, the others after a grace window)."""

    def __init__(self) -> None:
        self.secrets: dict[bytes, PrekeySecret] = {}

    def make(self, kind: PrekeyKind, *, lifetime: int = 7 * 86400) -> PrekeySecret:
        """A fresh prekey of ``kind``, valid for ``lifetime`` seconds, kept here."""
        now = int(time.time())
        secret = PrekeySecret.generate(kind, created=now, not_after=now + lifetime)
        self.secrets[secret.public] = secret
        return secret

    def lookup(self, kind: PrekeyKind, public: bytes) -> bytes:
        """The ``prekey_secret`` of :func:`tisa.token.check_for_recipient`."""
        secret = self.secrets.get(public)
        if secret is None or secret.kind is not kind:
            raise Refused(Reason.UNKNOWN_PREKEY, "this client does not hold that prekey")
        return secret.secret

    def forget(self, public: bytes | None) -> None:
        """Delete a prekey's secret (a one-time prekey, once it opened a report)."""
        if public is not None:
            self.secrets.pop(public, None)


class _Connection:
    """Frames over an asyncio stream pair, sealed by the handshake's channel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.channel: SecureChannel | None = None

    async def send_frame(self, payload: bytes) -> None:
        self.writer.write(encode_frame(payload))
        await self.writer.drain()

    async def receive_frame(self) -> bytes:
        while True:
            frame = self.decoder.next_frame()
            if frame is not NEED_DATA:
                return frame
            if self.decoder.eof:
                raise ConnectionError("the relay closed the connection")
            # b"" marks the end of the stream; the decoder then refuses a partial frame.
            self.decoder.receive_data(await self.reader.read(READ_SIZE))

    async def send(self, message: Message) -> None:
        assert self.channel is not None
        await self.send_frame(self.channel.seal(encode_message(message)))

    async def receive(self) -> Message:
        assert self.channel is not None
        return decode_message(self.channel.open(await self.receive_frame()))

    async def close(self) -> None:
        if self.channel is not None and not self.channel.closed:
            await self.send_frame(self.channel.close())
        self.writer.close()
        await self.writer.wait_closed()


async def _connect(
    secret: MemberSecret, name: str, arrangement: Arrangement, host: str, port: int
) -> _Connection:
    reader, writer = await asyncio.open_connection(host, port)
    conn = _Connection(reader, writer)
    # The handshake: hello and finish out, welcome in, as plaintext frames.
    handshake = MemberHandshake(secret, name, arrangement)
    await conn.send_frame(handshake.start())
    await conn.send_frame(handshake.receive(await conn.receive_frame()))
    conn.channel = handshake.channel
    return conn


async def publish_prekeys(
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    host: str,
    port: int,
    keyring: Keyring,
    *,
    one_time: int = 10,
) -> PrekeyStatus:
    """Publish a signed prekey and ``one_time`` one-time prekeys; returns the relay's
    status (what it now holds of this member's prekeys).

    Raises:
        tisa.errors.Refused: the relay refused the handshake.
        ConnectionError: the relay closed the connection, or answered something else.
    """
    conn = await _connect(secret, name, arrangement, host, port)
    try:
        signed = keyring.make(PrekeyKind.SIGNED)
        fresh = [keyring.make(PrekeyKind.ONE_TIME) for _ in range(one_time)]
        await conn.send(
            PublishPrekeys(
                signed=signed.publish(secret, name, arrangement),
                one_time=[p.publish(secret, name, arrangement) for p in fresh],
            )
        )
        while True:
            message = await conn.receive()
            if isinstance(message, PrekeyStatus):
                return message
            if not isinstance(message, Deliver | DeliverInline | Chunk | DeliverEnd):
                raise ConnectionError(f"the relay answered {message.TYPE!r}")
    finally:
        await conn.close()


async def receive_one(
    secret: MemberSecret,
    name: str,
    arrangement: Arrangement,
    host: str,
    port: int,
    keyring: Keyring,
) -> Received:
    """Connect as member ``name``, take one delivery, open it, ack it, send the receipt.

    Raises:
        tisa.errors.Refused: the relay refused the handshake, or the token or report
            was refused by policy (``unknown_prekey``: the token names a prekey
            ``keyring`` does not hold).
        tisa.errors.VerificationError: the token or the report did not verify.
        ConnectionError: the relay closed the connection first.
    """
    conn = await _connect(secret, name, arrangement, host, port)
    try:
        while True:
            message = await conn.receive()
            if isinstance(message, Deliver | DeliverInline):
                break
            # Anything else (receipt notices for reports we sent, expiry notices) is
            # not this sketch's business; a real client would handle and ack it.

        release = check_for_recipient(
            message.token,
            arrangement,
            secret,
            name,
            now=int(time.time()),
            prekey_secret=keyring.lookup,
        )
        # The content key is out: the one-time prekey is spent. (A real client deletes
        # it durably, with the report, before handing the report on.)
        keyring.forget(release.token.wrap.opk)
        opener = release.opener(arrangement)
        parts: dict[int, list[bytes]] = {}
        if isinstance(message, DeliverInline):
            # A small report comes whole in the one message (protocol version 3).
            for part, data in opener.feed(message.data):
                parts.setdefault(part, []).append(data)
        while isinstance(message, Deliver | Chunk):
            message = await conn.receive()
            if isinstance(message, Chunk):
                # Pieces are not authenticated until finish(); hold them aside.
                for part, data in opener.feed(message.data):
                    parts.setdefault(part, []).append(data)
            elif isinstance(message, DeliverEnd):
                break
            else:
                raise ConnectionError(f"unexpected {message.TYPE!r} inside a delivery")
        header = opener.finish()

        # Protocol version 4: the signed receipt also acknowledges the delivery it
        # names, one message for both (a delivery refused here would be acked with
        # Ack(kind="delivery") instead, and a receipt the relay refuses too).
        receipt = Receipt.issue(
            secret,
            arrangement,
            report=header.id,
            token=release.token.id,
            originator=header.originator,
            recipient=name,
            digest=release.token.digest,
            received=int(time.time()),
        )
        await conn.send(SendReceipt(receipt=receipt.encoded))
        return Received(
            header=header,
            body=b"".join(parts.get(0, [])),
            attachments={
                attachment: b"".join(parts.get(i + 1, []))
                for i, (attachment, _) in enumerate(header.attachments)
            },
            receipt=receipt,
        )
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    """The command line: parse, load the key and arrangement, receive one report."""
    parser = argparse.ArgumentParser(
        prog="python examples/asyncio_client.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--key", required=True, help="the member's key file")
    parser.add_argument(
        "--passphrase-env",
        default="TISA_PASSPHRASE",
        metavar="VAR",
        help="environment variable holding the key file's passphrase (default: %(default)s)",
    )
    parser.add_argument("--arrangement", required=True, help="the arrangement file")
    parser.add_argument("--relay", default="127.0.0.1:7420", metavar="HOST:PORT")
    parser.add_argument(
        "--wait", type=float, default=30.0, help="seconds to wait for a delivery (%(default)s)"
    )
    args = parser.parse_args(argv)
    passphrase = os.environ.get(args.passphrase_env)
    if not passphrase:
        parser.error(f"environment variable {args.passphrase_env} is not set (the passphrase)")
    host, _, port = args.relay.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--relay {args.relay!r}: expected HOST:PORT")
    try:
        secret, name = MemberSecret.load(args.key, passphrase)
        with open(args.arrangement, "rb") as handle:
            arrangement = SignedArrangement.load_effective(handle.read())
        keyring = Keyring()
        asyncio.run(publish_prekeys(secret, name, arrangement, host, int(port), keyring))
        received = asyncio.run(
            asyncio.wait_for(
                receive_one(secret, name, arrangement, host, int(port), keyring),
                timeout=args.wait,
            )
        )
    except TimeoutError:
        print(f"error: no report for {name} within {args.wait:g} s", file=sys.stderr)
        return 1
    except (TisaError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    header = received.header
    print(
        f"{header.originator} -> {name}: {header.scope}/{header.level}, "
        f"{len(received.body)} bytes: {received.body[:200]!r}",
        file=sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
