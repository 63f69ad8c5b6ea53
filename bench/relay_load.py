"""The relay's throughput alone: a pre-sealed load source and an acking sink around it.

Part of ``python -m bench nodes`` (see its docstring, "relay alone"). Three processes on
127.0.0.1, as in the end-to-end run, but the two members do almost nothing, as the bare
forwarder's sender and receiver do, so the figure is the relay's:

* the load source (:func:`load_source`) seals N reports for Tokyo and issues one release
  token each with the protocol core *before* the clock starts (the originator node's
  work, measured end to end elsewhere), connects as Seoul, then, timed, sends each
  report as the originator's node does: a small one (at most ``MAX_INLINE_CIPHERTEXT``)
  as one ``SubmitInline`` carrying its token, a larger one as its streamed submission
  (``SubmitBegin``, its chunks, ``SubmitEnd``) with its ``Release`` right behind; many
  reports per :meth:`tisa_io.link.Link.send_many`, at most ``window`` reports without
  their answer. It reads the relay's answers: every report must be answered ``Stored``
  and its token released (named in ``Stored.released``, or ``Released``); a
  ``Refusal`` or an ``ErrorMessage`` ends the run with its reason;
* the sink (:func:`sink`) connects as Tokyo before the source sends, reads each delivery
  (``DeliverInline``, or ``Deliver``, chunks, ``DeliverEnd``) and answers it
  ``Ack(kind="delivery")`` with its token id (the acks of the deliveries read together
  go in one write). It does not open the reports (the recipient node's work). It stops
  after N distinct token ids;
* the relay, ``python -m relay`` started exactly as for the end-to-end run
  (:func:`bench.processes.start_relay`). It does all of its work: the submission's digest
  check, store and signed ``Stored`` answer, the token's checks (its Ed25519 signature
  among them) whoever sends it, the delivery, and each delivery completed by the sink's
  ack.

Reports per second are N over the source's first send to the sink's Nth delivery.
The run fails unless the source saw N ``Stored`` and N tokens released for exactly its
reports and tokens, the sink N deliveries carrying exactly the tokens the source
issued (the two compare a digest of the sorted token ids), and, read from the relay's
store once the sink is done, the relay holds all N tokens as acked (each delivery
completed). The relay's CPU seconds are given in all (start-up included) and from the
sink's connect to the end of the run; on PostgreSQL, the server's too; and, read from
the relay's metrics (``--metrics`` on a port of 127.0.0.1), how many flushes to disk it
made over the same span, and how many steps these made durable, so the batches its group
commit achieved are known (:mod:`bench.floors` amortises its commit over them).

The relay may be several processes on one PostgreSQL store (:mod:`bench.stores`): the
source then connects to the first, the sink to the last, and the relays' store is read
through a connection of its own for the final check.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio

from bench.processes import Process, emit, load, run_folder
from bench.stores import SQLITE, Relays, Setup
from bench.world import LEVEL, SCOPE, bench_prekey
from tisa.limits import MAX_INLINE_CIPHERTEXT
from tisa.messages import (
    Ack,
    Chunk,
    Deliver,
    DeliverEnd,
    DeliverInline,
    ErrorMessage,
    Message,
    Refusal,
    Release,
    Released,
    Stored,
    SubmitBegin,
    SubmitEnd,
    SubmitInline,
    chunks_of,
)
from tisa.report import seal_report
from tisa.token import ReleaseToken, issue_token

__all__ = ["load_source", "run", "sink", "tokens_digest"]
from tisa_io.link import Link, connect_member

# Reports per send_many call (one message each for a 1 KiB report), room permitting.
BATCH = 64
# Seconds the source's reports and tokens stay valid.
VALIDITY = 3600


def tokens_digest(ids: Iterable[bytes]) -> str:
    """A digest of a set of token ids, for the source and the sink to compare."""
    return hashlib.blake2b(b"".join(sorted(ids)), digest_size=16).hexdigest()


class _Failed(RuntimeError):
    """The relay answered something else than the run expects."""


def _check_answer(message: Message, what: str) -> None:
    if isinstance(message, Refusal):
        raise _Failed(f"{what}: the relay refused {message.ref.hex()}: {message.reason}"
                      f" {message.detail!r}")  # fmt: skip
    if isinstance(message, ErrorMessage):
        raise _Failed(f"{what}: the relay closed the link: {message.reason} {message.detail!r}")
    raise _Failed(f"{what}: unexpected {message.TYPE} message from the relay: {message!r}")


# --- the load source -----------------------------------------------------------------------


def _prepare(
    folder: Path, count: int, size: int
) -> tuple[list[list[Message]], list[bytes], list[bytes]]:
    """Each report's messages (submission and release), the report ids, the token ids."""
    secret, arrangement = load(folder, "seoul")
    now = int(time.time())
    # The relay's load, not the prekey fetch, is measured: Tokyo's signed prekey is made
    # here once (the relay checks tokens, not the prekeys they name).
    signed_prekey, _ = bench_prekey(load(folder, "tokyo")[0], "tokyo", arrangement, now=now)
    loads: list[list[Message]] = []
    report_ids: list[bytes] = []
    token_ids: list[bytes] = []
    for seq in range(count):
        sealed = seal_report(secret, "seoul", arrangement, recipients=["tokyo"], scope=SCOPE,
                             level=LEVEL, body=os.urandom(size), now=now)  # fmt: skip
        token = issue_token(
            secret, "seoul", arrangement,
            recipient="tokyo", report_id=sealed.report_id, digest=sealed.digest,
            size=sealed.size, content_key=sealed.content_key, scope=SCOPE, level=LEVEL,
            not_before=now - 10, not_after=now + VALIDITY, counter=seq + 1,
            signed_prekey=signed_prekey,
        )  # fmt: skip
        data = sealed.ciphertext
        if len(data) <= MAX_INLINE_CIPHERTEXT:
            loads.append([
                SubmitInline(
                    report=sealed.report_id, digest=sealed.digest, expires=now + VALIDITY,
                    data=data, tokens=[token],
                )
            ])  # fmt: skip
        else:
            begin = SubmitBegin(
                report=sealed.report_id, size=len(data), digest=sealed.digest,
                expires=now + VALIDITY,
            )  # fmt: skip
            loads.append(
                [begin, *chunks_of(data), SubmitEnd(report=sealed.report_id), Release(token=token)]
            )
        report_ids.append(sealed.report_id)
        token_ids.append(ReleaseToken.decode(token).id)
    return loads, report_ids, token_ids


async def load_source(folder: Path, port: int, count: int, size: int, window: int) -> None:
    """The source role: see the module docstring. Emits ``{"start": ...}`` and its checks."""
    loads, report_ids, token_ids = _prepare(folder, count, size)
    expected_reports, expected_tokens = set(report_ids), set(token_ids)
    secret, arrangement = load(folder, "seoul")
    link = await connect_member(
        await trio.open_tcp_stream("127.0.0.1", port), secret, "seoul", arrangement
    )
    stored: set[bytes] = set()
    released: set[bytes] = set()
    wake = [trio.Event()]  # set whenever answers came in (room in the window)
    sent = 0

    async def send() -> None:
        nonlocal sent
        while sent < count:
            wake[0] = trio.Event()
            room = window - (sent - len(released))
            if room <= 0:
                await wake[0].wait()
                continue
            take = min(BATCH, room, count - sent)
            await link.send_many(m for load in loads[sent : sent + take] for m in load)
            sent += take

    def release(report: bytes, token: bytes) -> None:
        if token not in expected_tokens or token in released:
            raise _Failed(f"source: released answer for token {token.hex()}")
        if report not in stored:
            raise _Failed(f"source: report {report.hex()} released before stored")
        released.add(token)

    def handle(message: Message) -> None:
        if isinstance(message, Stored):
            if message.report not in expected_reports or message.report in stored:
                raise _Failed(f"source: stored answer for report {message.report.hex()}")
            stored.add(message.report)
            for token in message.released:
                release(message.report, token)
        elif isinstance(message, Released):
            release(message.report, message.token)
        else:
            _check_answer(message, "source")

    async def receive() -> None:
        while len(released) < count:
            handle(await link.receive())
            while True:  # the answers already buffered, without a trip through trio
                try:
                    handle(link.receive_nowait())
                except trio.WouldBlock:
                    break
            wake[0].set()

    cpu = time.process_time()
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    answered = time.monotonic()
    cpu = time.process_time() - cpu
    if stored != expected_reports or released != expected_tokens:
        raise _Failed(f"source: {len(stored)} stored, {len(released)} released of {count}")
    await link.aclose()
    emit({
        "start": start,
        "answered": answered,
        "stored": len(stored),
        "released": len(released),
        "tokens": tokens_digest(released),
        "timed_cpu_s": cpu,
    })  # fmt: skip


# --- the sink ------------------------------------------------------------------------------


async def sink(folder: Path, port: int, count: int) -> None:
    """The sink role: see the module docstring. Emits ``{"ready": true}`` once connected,
    then ``{"end": ...}`` with what it received."""
    secret, arrangement = load(folder, "tokyo")
    link: Link = await connect_member(
        await trio.open_tcp_stream("127.0.0.1", port), secret, "tokyo", arrangement
    )
    emit({"ready": True})
    tokens: set[bytes] = set()
    deliveries = 0
    in_delivery = False
    end = float("nan")
    cpu: float | None = None  # process time at the first message
    while len(tokens) < count:
        acks: list[Message] = []
        message = await link.receive()
        if cpu is None:
            cpu = time.process_time()
        while True:
            if isinstance(message, DeliverInline):
                if in_delivery:
                    raise _Failed("sink: a delivery inside a delivery")
                token = ReleaseToken.decode(message.token).id
                deliveries += 1
                tokens.add(token)
                acks.append(Ack(kind="delivery", token=token))
                if len(tokens) == count:
                    end = time.monotonic()
                    break
            elif isinstance(message, Deliver):
                if in_delivery:
                    raise _Failed("sink: a delivery inside a delivery")
                in_delivery = True
            elif isinstance(message, Chunk):
                if not in_delivery:
                    raise _Failed("sink: a chunk outside a delivery")
            elif isinstance(message, DeliverEnd):
                if not in_delivery:
                    raise _Failed("sink: deliver_end outside a delivery")
                in_delivery = False
                deliveries += 1
                tokens.add(message.token)
                acks.append(Ack(kind="delivery", token=message.token))
                if len(tokens) == count:
                    end = time.monotonic()
                    break
            else:
                _check_answer(message, "sink")
            try:
                message = link.receive_nowait()
            except trio.WouldBlock:
                break
        if acks:
            await link.send_many(acks)
    assert cpu is not None
    cpu = time.process_time() - cpu
    await link.aclose()
    emit({
        "end": end,
        "deliveries": deliveries,
        "distinct": len(tokens),
        "tokens": tokens_digest(tokens),
        "timed_cpu_s": cpu,
    })  # fmt: skip


# --- orchestration -------------------------------------------------------------------------


def _wait_ready(process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(record.get("ready") for record in process.records()):
            return
        if process.reap():
            raise RuntimeError(f"{process.popen.args!r} ended before it was ready")
        time.sleep(0.02)
    raise TimeoutError(f"{process.popen.args!r} not ready")


def _wait_all(processes: list[Process], timeout: float) -> None:
    """Wait until every process has ended; a failed one raises at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all([process.reap() for process in processes]):
            return
        time.sleep(0.01)
    raise TimeoutError(f"not finished in {timeout:.0f} s")


def _wait_acked(relays: Relays, count: int, timeout: float = 30.0) -> dict[str, int]:
    """The relay's tokens by state once all ``count`` are acked (or at the timeout): the
    sink's last acks may still be on their way when it ends."""
    deadline = time.monotonic() + timeout
    while True:
        states = relays.tokens_by_state()
        if states.get("acked", 0) >= count or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def run(
    folder: Path,
    count: int,
    size: int = 1024,
    window: int = 256,
    setup: Setup = SQLITE,
    *,
    probe: bool = False,
) -> dict[str, Any]:
    """One run against the real relay (one or more processes, as ``setup`` says); returns
    the figures (checked, see the docstring). ``probe``: on PostgreSQL, clock every hold
    of the audit chain's head row in the relay processes (:mod:`bench.headclock`) and
    sample pg_stat_activity (:class:`bench.stores.LockProbe`), both over the timed window
    (:meth:`bench.stores.Relays.lock_figures`)."""
    where = run_folder(folder)
    relays = Relays(where, count, setup, probe=probe, metrics=True)
    source = receiver = None
    try:
        ports = relays.ports()
        # With two relay processes, the source on the first and the sink on the last.
        role_args = [str(where), str(ports[-1]), str(count)]
        receiver = Process(where, "sink", ["-m", "bench.nodes", "--role", "relay-sink", *role_args])
        _wait_ready(receiver)  # connected before the source sends anything
        relays.mark()
        role_args[1] = str(ports[0])
        source = Process(
            where, "source",
            ["-m", "bench.nodes", "--role", "load-source", *role_args, str(size), str(window)],
        )  # fmt: skip
        _wait_all([receiver, source], timeout=900)
        relays.measure()
        # After the clock: every delivery must be complete at the relay (acked).
        states = _wait_acked(relays, count)
    finally:
        for process in (source, receiver):
            if process is not None:
                process.stop()
        relays.stop()
    sent, got = source.records()[-1], receiver.records()[-1]
    if not (sent["stored"] == sent["released"] == got["deliveries"] == got["distinct"] == count):
        raise RuntimeError(f"relay alone: source {sent}, sink {got}, expected {count} each")
    if sent["tokens"] != got["tokens"]:
        raise RuntimeError("relay alone: the sink got other tokens than the source released")
    if states != {"acked": count}:
        raise RuntimeError(f"relay alone: the relay's tokens by state {states}, not all acked")
    seconds = got["end"] - sent["start"]
    return {
        "rate": count / seconds,
        "released_rate": count / (sent["answered"] - sent["start"]),
        "seconds": seconds,
        "window": window,
        # relay_cpu_s: in all; relay_run_cpu_s: from the sink's connect to the end of the
        # source and sink (the source's sealing before the clock included, while the relay
        # idles), summed over the relay processes (each in relay_run_cpu_each_s);
        # server_run_cpu_s: the PostgreSQL server's over the same span.
        **relays.figures(),
        # The relay processes have stopped: their clocked holds are all on file.
        **relays.lock_figures(sent["start"], got["end"]),
        "relay_tokens": states,
        "source_timed_cpu_s": sent["timed_cpu_s"],
        "sink_timed_cpu_s": got["timed_cpu_s"],
    }
