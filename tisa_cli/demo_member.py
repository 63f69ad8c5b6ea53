"""One member of the demo (Seoul or Tokyo) as its own process, driven over stdin/stdout.

The demo (:mod:`tisa_cli.demo`) starts one of these per member. It runs a
:class:`clients.node.Node` against the relay and takes one JSON command per line on
stdin; it answers each with one JSON line on stdout carrying the same ``id``, and in
between may write ``progress`` and ``trace`` lines. Nothing else goes to stdout.

Commands (``op``): ``submit``, ``release``, ``expect_report``, ``expect_receipt``,
``try_seal`` (expects a local refusal), ``raw_out_of_scope``, ``raw_forged``,
``raw_replay`` (hand the relay crafted input on a second, raw connection and report
its refusal), ``audit``, ``quit``. The raw commands exist only to show that the relay
enforces the rules on its own, whatever a client sends it.

Usage::

    python -m tisa_cli.demo_member --key seoul/identity.key --passphrase-env VAR \\
        --arrangement arrangement.tisa --relay 127.0.0.1:7420 --store seoul/store
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from clients.events import (
    ApprovedEvent,
    DeliveredReport,
    DeniedEvent,
    Event,
    ReceiptEvent,
    RequestEvent,
)
from clients.node import Node, open_node
from tisa import encoding as enc
from tisa import messages as m
from tisa.arrangement import Arrangement, SignedArrangement
from tisa.envelope import seal_envelope
from tisa.errors import Reason, Refused, TisaError
from tisa.keys import Context, Hash, Hasher, MemberSecret, random_id
from tisa.messages import MAX_CHUNK_DATA
from tisa.prekeys import PrekeyKind, PrekeySecret, wrap_content_key
from tisa.report import MIN_PADDED, ciphertext_size
from tisa.token import TOKEN_VERSION
from tisa_io.link import Link, connect_member

__all__ = ["main"]

# Seconds a raw request waits for the relay's answer: the relay answers at once; this
# only bounds a demo run against a broken relay.
RAW_TIMEOUT = 10.0
# Progress lines are written at most this often (seconds), so a fast seal of a large
# report does not flood the pipe.
PROGRESS_INTERVAL = 0.1


def _emit(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value, sort_keys=True) + "\n")
    sys.stdout.flush()


def _trace(kind: str, source: str, target: str, label: str, **detail: Any) -> None:
    _emit(
        {
            "trace": {
                "kind": kind,
                "from": source,
                "to": target,
                "label": label,
                "detail": detail,
            }
        }
    )


class Member:
    """The command handlers of one member process."""

    def __init__(
        self,
        node: Node,
        secret: MemberSecret,
        arrangement: Arrangement,
        relay_addr: tuple[str, int],
        workdir: Path,
    ) -> None:
        self.node = node
        self.name = node.name
        self.secret = secret
        self.arrangement = arrangement
        self.relay_addr = relay_addr
        self.workdir = workdir
        self.reports_send, self.reports = trio.open_memory_channel[DeliveredReport](64)
        self.events_send, self.events = trio.open_memory_channel[Event](256)
        self.tokens: dict[str, bytes] = {}  # token id hex -> encoded token, for replay
        # Events that arrived while a command waited for another kind: kept, in order.
        self.held_events: list[Event] = []

    async def pump_reports(self) -> None:
        """Pass the node's delivered reports on to :attr:`reports` (for ``expect_report``).

        Runs until cancelled.
        """
        async for report in self.node.reports():
            await self.reports_send.send(report)

    async def pump_events(self) -> None:
        """Pass the node's events on to :attr:`events` (for ``expect_receipt``).

        Runs until cancelled.
        """
        async for event in self.node.events():
            await self.events_send.send(event)

    # --- originator ---------------------------------------------------------------------

    async def op_submit(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Seal and submit ``text`` or a generated file of ``size_mib`` MiB; wait for the ack."""
        body: bytes | Path
        if "size_mib" in cmd:
            body, sha = await trio.to_thread.run_sync(
                _make_large_file, self.workdir / "large-report.bin", int(cmd["size_mib"])
            )
        else:
            text = cmd["text"].encode("utf-8")
            body, sha = text, hashlib.sha256(text).hexdigest()
        last = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal last
            now = time.monotonic()
            if done == total or now - last >= PROGRESS_INTERVAL:
                last = now
                _emit({"progress": done, "total": total, "id": request_id})

        report_id = await self.node.submit(
            body,
            recipients=cmd["recipients"],
            scope=cmd["scope"],
            level=cmd["level"],
            release_to=cmd.get("release_to", []),
            progress=progress if "size_mib" in cmd else None,
        )
        submission = self.node.store.submission(report_id)
        assert submission is not None
        _trace(
            "message",
            self.name,
            "washington",
            f"submit {report_id.hex()[:8]} ({_size(submission.size)} ciphertext)",
            report=report_id.hex(),
        )
        ack = await self.node.wait_stored(report_id)
        _trace(
            "message",
            "washington",
            self.name,
            f"stored {report_id.hex()[:8]} (signed ack)",
            report=report_id.hex(),
        )
        for release in self.node.store.releases_of(report_id):
            self.tokens[release.token.hex()] = release.encoded
        return {
            "report": report_id.hex(),
            "digest": submission.digest.hex(),
            "size": submission.size,
            "sha256": sha,
            "ack_digest": ack.digest.hex(),
            # Demo only: lets the demo scan the relay's store for the key and show it
            # is not there. A real application never lets a content key leave the node.
            "content_key": submission.content_key.hex(),
        }

    async def op_release(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Release report ``report`` (hex) to member ``to`` and wait until the relay accepts it.

        Returns the token id (hex) and counter, and keeps the token for ``raw_replay``.

        Raises:
            Refused: refused by the node or the relay (see :meth:`clients.node.Node.release`).
            UsageError: an unknown report.

        Cancellation: as for :meth:`clients.node.Node.release`, the token stays queued.
        """
        report_id = bytes.fromhex(cmd["report"])
        _trace("message", self.name, "washington", f"release token -> {cmd['to']}")
        token_id = await self.node.release(report_id, cmd["to"])
        pending = self.node.store.release(token_id)
        assert pending is not None
        self.tokens[token_id.hex()] = pending.encoded
        _trace("message", "washington", self.name, "released (token checked and consumed)")
        return {"token": token_id.hex(), "counter": pending.counter}

    async def op_try_seal(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Try a share the arrangement does not allow; the node must refuse it locally."""
        try:
            await self.node.submit(
                cmd["text"].encode("utf-8"),
                recipients=cmd["recipients"],
                scope=cmd["scope"],
                level=cmd["level"],
            )
        except Refused as exc:
            return {"refused": exc.reason.value, "detail": exc.detail}
        return {"refused": None}

    async def op_expect_receipt(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Wait up to ``wait`` seconds (default 10) for a receipt event.

        Returns the receipt's report, token, recipient and digest (hex), or ``report`` None.
        Other events that arrive meanwhile are kept for later commands.
        """
        event = await self._next_event((ReceiptEvent,), float(cmd.get("wait", 10)))
        if not isinstance(event, ReceiptEvent):
            return {"report": None}
        receipt = event.receipt
        _trace("message", "washington", self.name, f"receipt from {receipt.recipient} (signed)")
        return {
            "report": receipt.report.hex(),
            "token": receipt.token.hex(),
            "recipient": receipt.recipient,
            "digest": receipt.digest.hex(),
        }

    async def _next_event(self, kinds: tuple[type[Event], ...], wait: float) -> Event | None:
        """The first event of one of ``kinds``, held or arriving within ``wait`` seconds
        (None if none); events of other kinds are held for later commands."""
        for index, event in enumerate(self.held_events):
            if isinstance(event, kinds):
                return self.held_events.pop(index)
        with trio.move_on_after(wait):
            while True:
                event = await self.events.receive()
                if isinstance(event, kinds):
                    return event
                self.held_events.append(event)
        return None

    # --- consent ------------------------------------------------------------------------

    async def op_announce(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Announce held report ``report`` (hex) to ``to`` with ``title``."""
        _trace("message", self.name, "washington", f"announce {cmd['report'][:8]} -> {cmd['to']}")
        announcement = await self.node.announce(
            bytes.fromhex(cmd["report"]), cmd["to"], title=cmd.get("title", "")
        )
        for member in cmd["to"]:
            _trace("message", "washington", member, f"announcement of {cmd['report'][:8]}")
        return {"announcement": announcement.hex()}

    async def op_request(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Ask ``originator`` for report ``report`` (hex), with ``purpose``."""
        _trace(
            "message",
            self.name,
            "washington",
            f"request {cmd['report'][:8]} from {cmd['originator']}: {cmd['purpose']}",
        )
        request = await self.node.request(
            bytes.fromhex(cmd["report"]), cmd["originator"], cmd["purpose"]
        )
        return {"request": request.hex()}

    async def op_expect_request(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Wait up to ``wait`` seconds for a request made to this member."""
        event = await self._next_event((RequestEvent,), float(cmd.get("wait", 10)))
        if not isinstance(event, RequestEvent):
            return {"request": None}
        request = event.request
        _trace(
            "message",
            "washington",
            self.name,
            f"request from {request.requester} for {request.report.hex()[:8]} (signed)",
        )
        return {
            "request": request.id.hex(),
            "requester": request.requester,
            "report": request.report.hex(),
            "purpose": request.purpose,
        }

    async def op_approve(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Approve request ``request`` (hex): a token that names it."""
        _trace("message", self.name, "washington", f"approve {cmd['request'][:8]}: token")
        token = await self.node.approve(bytes.fromhex(cmd["request"]))
        return {"token": token.hex()}

    async def op_deny(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Deny request ``request`` (hex) with ``reason`` and ``note``."""
        _trace(
            "message",
            self.name,
            "washington",
            f"deny {cmd['request'][:8]}: {cmd['reason']} (signed)",
        )
        await self.node.deny(bytes.fromhex(cmd["request"]), cmd["reason"], cmd.get("note", ""))
        return {}

    async def op_expect_answer(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Wait up to ``wait`` seconds for an answer to one of this member's requests."""
        event = await self._next_event((ApprovedEvent, DeniedEvent), float(cmd.get("wait", 10)))
        if isinstance(event, DeniedEvent):
            answer = event.answer
            _trace(
                "message",
                "washington",
                self.name,
                f"denied {answer.request.hex()[:8]}: {answer.reason.value} (signed)",
            )
            return {
                "outcome": "denied",
                "request": answer.request.hex(),
                "report": answer.report.hex(),
                "reason": answer.reason.value,
                "note": answer.note,
            }
        if isinstance(event, ApprovedEvent):
            return {
                "outcome": "approved",
                "request": event.request.hex(),
                "report": event.report.hex(),
            }
        return {"outcome": None}

    # --- recipient ----------------------------------------------------------------------

    async def op_expect_report(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Wait up to ``wait`` seconds (default 10) for the next delivered report.

        Returns its header fields, the body's SHA-256 and, for a body held in memory, its
        first 500 bytes as text; or ``report`` None.
        """
        with trio.move_on_after(float(cmd.get("wait", 10))):
            report = await self.reports.receive()
            header = report.header
            sha = await trio.to_thread.run_sync(_sha256_of, report.body)
            await self.node.ack(report)  # taken: shown once, also across a restart
            body = report.body if isinstance(report.body, bytes) else b""
            _trace(
                "message",
                "washington",
                self.name,
                f"deliver {header.id.hex()[:8]} + token",
                report=header.id.hex(),
            )
            _trace(
                "note",
                self.name,
                self.name,
                f"opened, signature of {header.originator} verified",
            )
            _trace("message", self.name, "washington", "ack + signed receipt")
            return {
                "report": header.id.hex(),
                "originator": header.originator,
                "recipients": list(header.recipients),
                "scope": header.scope,
                "level": header.level,
                "size": header.body_size,
                "sha256": sha,
                "text": body[:500].decode("utf-8", "replace") if body else None,
            }
        return {"report": None}

    # --- crafted input, on a raw connection ---------------------------------------------

    async def _raw_link(self) -> Link:
        stream = await trio.open_tcp_stream(*self.relay_addr)
        return await connect_member(stream, self.secret, self.name, self.arrangement)

    async def _answer(self, link: Link, ref: bytes) -> m.Message:
        """The relay's answer about ``ref`` (ignores pushes meant for the real node)."""
        with trio.fail_after(RAW_TIMEOUT):
            while True:
                message = await link.receive()
                if isinstance(message, m.Stored | m.Released) and ref in (
                    message.report,
                    getattr(message, "token", None),
                ):
                    return message
                if isinstance(message, m.Refusal) and message.ref == ref:
                    return message

    async def _raw_blob(self, link: Link) -> tuple[bytes, bytes, int]:
        """Store an opaque blob as a report: the relay cannot tell it from ciphertext."""
        report_id = random_id()
        size = ciphertext_size(MIN_PADDED)
        blob = os.urandom(size)
        hasher = Hasher(Hash.CIPHERTEXT)
        hasher.update(blob)
        digest = hasher.finish()
        async with link.sending():
            await link.send(
                m.SubmitBegin(
                    report=report_id, size=size, digest=digest, expires=int(time.time()) + 3600
                )
            )
            for start in range(0, size, MAX_CHUNK_DATA):
                await link.send(m.Chunk(data=blob[start : start + MAX_CHUNK_DATA]))
            await link.send(m.SubmitEnd(report=report_id))
        answer = await self._answer(link, report_id)
        if not isinstance(answer, m.Stored):
            raise Refused(_reason(answer), "the relay did not store the blob")
        return report_id, digest, size

    def _token_body(
        self, report_id: bytes, digest: bytes, size: int, *, scope: str, recipient: str
    ) -> dict[str, Any]:
        # A well-formed token body signed by this member, built by hand so that it can
        # say what issue_token would refuse to sign (a scope outside the arrangement).
        # The relay refuses it before any prekey matters: the key is wrapped to a prekey
        # made up here, which the recipient would not hold.
        now = int(time.time())
        made_up = PrekeySecret.generate(PrekeyKind.SIGNED, created=now, not_after=now + 3600)
        body: dict[str, Any] = {
            "v": TOKEN_VERSION,
            "id": random_id(),
            "arrangement": self.arrangement.id,
            "version": self.arrangement.version,
            "originator": self.name,
            "relay": self.arrangement.relay,
            "recipient": recipient,
            "report": report_id,
            "digest": digest,
            "size": size,
            "scope": scope,
            "level": self.arrangement.levels[0],
            "not_before": now,
            "not_after": now + 3600,
            "counter": 1,
            "key_commit": bytes(32),
        }
        body["wrap"] = wrap_content_key(
            os.urandom(32),
            enc.pack(body),
            identity=self.arrangement.member(recipient).identity.encryption.raw,
            signed=made_up.public,
            one_time=None,
        ).to_dict()
        return body

    async def _send_token(self, link: Link, token: bytes, ref: bytes) -> dict[str, Any]:
        await link.send(m.Release(token=token))
        answer = await self._answer(link, ref)
        if isinstance(answer, m.Refusal):
            return {"refused": answer.reason, "detail": answer.detail}
        return {"refused": None}

    async def op_raw_out_of_scope(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """A token for scope ``cmd['scope']``, signed by this member, straight to the relay."""
        async with await self._raw_link() as link:
            report_id, digest, size = await self._raw_blob(link)
            _trace("message", self.name, "washington", f"raw submit {report_id.hex()[:8]}")
            body = self._token_body(
                report_id, digest, size, scope=cmd["scope"], recipient=cmd["to"]
            )
            token = seal_envelope(self.secret, Context.TOKEN, body)
            _trace("message", self.name, "washington", f"crafted token, scope {cmd['scope']}")
            result = await self._send_token(link, token, body["id"])
        _trace_refusal(self.name, result)
        return result

    async def op_raw_forged(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """A token whose signature does not verify (one bit flipped)."""
        async with await self._raw_link() as link:
            report_id, digest, size = await self._raw_blob(link)
            body = self._token_body(
                report_id, digest, size, scope=self.arrangement.scopes[0], recipient=cmd["to"]
            )
            token = bytearray(seal_envelope(self.secret, Context.TOKEN, body))
            token[-1] ^= 0x01  # the envelope ends with the signature
            _trace("message", self.name, "washington", "forged token (bad signature)")
            result = await self._send_token(link, bytes(token), body["id"])
        _trace_refusal(self.name, result)
        return result

    async def op_raw_replay(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Send again a token the relay already consumed."""
        token = self.tokens[cmd["token"]]
        async with await self._raw_link() as link:
            _trace("message", self.name, "washington", f"replayed token {cmd['token'][:8]}")
            result = await self._send_token(link, token, bytes.fromhex(cmd["token"]))
        _trace_refusal(self.name, result)
        return result

    # --- audit --------------------------------------------------------------------------

    async def op_audit(self, cmd: dict[str, Any], request_id: int) -> dict[str, Any]:
        """Fetch and verify this member's new audit entries (:meth:`clients.node.Node.fetch_audit`).

        Returns them (seq, event, reason, parties, report id in hex) with ``verified`` True.

        Raises:
            VerificationError, ProtocolError: the relay's extract does not check out.
        """
        _trace("message", self.name, "washington", "audit fetch")
        entries = await self.node.fetch_audit()
        _trace("message", "washington", self.name, f"audit extract ({len(entries)} entries)")
        return {
            "verified": True,
            "entries": [
                {
                    "seq": e.seq,
                    "event": e.event.value,
                    "reason": e.reason,
                    "parties": list(e.parties),
                    "report": e.report.hex() if e.report else None,
                }
                for e in entries
            ],
        }


def _reason(message: m.Message) -> Reason:
    return Reason(message.reason) if isinstance(message, m.Refusal) else Reason.INTERNAL


def _trace_refusal(name: str, result: dict[str, Any]) -> None:
    if result.get("refused"):
        _emit(
            {
                "trace": {
                    "kind": "message",
                    "from": "washington",
                    "to": name,
                    "label": f"refused: {result['refused']}",
                    "status": "refused",
                    "detail": result,
                }
            }
        )


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _make_large_file(path: Path, mib: int) -> tuple[Path, str]:
    """Write ``mib`` MiB of random data to ``path``; returns (path, sha256 hex)."""
    sha = hashlib.sha256()
    block = 1024 * 1024
    with open(path, "wb") as out:
        for _ in range(mib):
            data = os.urandom(block)
            sha.update(data)
            out.write(data)
    return path, sha.hexdigest()


def _sha256_of(body: bytes | Path) -> str:
    if isinstance(body, bytes):
        return hashlib.sha256(body).hexdigest()
    sha = hashlib.sha256()
    with open(body, "rb") as handle:
        while data := handle.read(1024 * 1024):
            sha.update(data)
    return sha.hexdigest()


_Handler = Callable[[Member, dict[str, Any], int], Any]


async def _serve_commands(member: Member) -> None:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        if not line:
            return
        try:
            cmd = json.loads(line)
        except json.JSONDecodeError:
            _emit({"id": None, "ok": False, "error": "not JSON"})
            continue
        request_id = cmd.get("id")
        op = cmd.get("op")
        if op == "quit":
            _emit({"id": request_id, "ok": True})
            return
        handler: _Handler | None = getattr(Member, f"op_{op}", None)
        if handler is None:
            _emit({"id": request_id, "ok": False, "error": f"unknown op {op!r}"})
            continue
        try:
            result = await handler(member, cmd, request_id)
        except TisaError as exc:
            reason = exc.reason.value if isinstance(exc, Refused) else None
            _emit({"id": request_id, "ok": False, "error": str(exc), "reason": reason})
        else:
            _emit({"id": request_id, "ok": True, **result})


async def run(args: argparse.Namespace) -> None:
    """Run one member process: load keys and arrangement, run the node, serve commands.

    Writes ``{"ready": name}`` once connected, then answers commands from stdin until
    ``quit`` or the end of input; the node's name is the one in the key file.

    Args:
        args: the parsed command line (see :func:`main`).

    Raises:
        KeyError: the passphrase variable is not set.
        OSError: the key or the arrangement file cannot be read.
        KeyFileError: wrong passphrase or damaged key file.
        ValueError: ``--relay`` is not HOST:PORT.
        ProtocolError, VerificationError, Refused: the arrangement is malformed, badly
            signed or not in effect, or the key file's name is not a member.
        UsageError: the key is not that member's, or the store is another member's.
        ExceptionGroup: wrapping trio.TooSlowError, no connection within
            ``--connect-timeout`` seconds.

    Cancellation: the node is stopped and its store closed.
    """
    passphrase = os.environ[args.passphrase_env]
    secret, name = MemberSecret.load(args.key, passphrase)
    with open(args.arrangement, "rb") as handle:
        arrangement = SignedArrangement.load_effective(handle.read())
    host, _, port = args.relay.rpartition(":")
    relay_addr = (host, int(port))
    store = Path(args.store)
    async with open_node(secret, name, arrangement, relay_addr, store) as node:
        member = Member(node, secret, arrangement, relay_addr, store.parent)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(member.pump_reports)
            nursery.start_soon(member.pump_events)
            with trio.fail_after(float(args.connect_timeout)):
                await node.wait_connected()
            _emit({"ready": name})
            await _serve_commands(member)
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m tisa_cli.demo_member``: parse ``argv`` and :func:`run`.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Raises:
        SystemExit: status 2, from argparse, for missing or malformed arguments.
        Otherwise what :func:`run` raises; a KeyboardInterrupt (Ctrl-C), bare or
        inside exception groups, ends the member quietly.
    """
    parser = argparse.ArgumentParser(prog="python -m tisa_cli.demo_member")
    parser.add_argument("--key", required=True)
    parser.add_argument("--passphrase-env", required=True, metavar="VAR")
    parser.add_argument("--arrangement", required=True)
    parser.add_argument("--relay", required=True, metavar="HOST:PORT")
    parser.add_argument("--store", required=True)
    parser.add_argument("--connect-timeout", default=20.0, type=float)
    args = parser.parse_args(argv)
    try:
        trio.run(run, args)
    except BaseException as exc:
        # Ctrl-C ends the member quietly, also when it arrives inside the node's
        # nurseries (then wrapped in exception groups).
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if not isinstance(exc, KeyboardInterrupt):
            raise


if __name__ == "__main__":
    main()
