"""Benchmark of the trio nodes against a bare trio forwarder, measured in the same run.

Three separate processes on 127.0.0.1 in every set-up:

* tisa: Seoul (``open_node``, submit with immediate release; in throughput mode up to
  ``--concurrency`` ``submit`` calls at once, so the node's group commit can batch them), the relay
  (``python -m relay``), Tokyo (``open_node``, ``reports()``; in throughput mode its
  application acknowledges every report it has in hand at once with ``ack_many`` while
  the next ones arrive, in latency mode each report with ``ack`` before the next);
* relay alone (throughput only; :mod:`bench.relay_load`): a load source, the same relay
  (``python -m relay``, started as for tisa), and a sink. The source seals the N reports
  for Tokyo and issues their release tokens with the protocol core before the clock
  starts, connects as Seoul, then sends each report with its token as the originator's
  node does (a 1 KiB report: one ``SubmitInline`` carrying the token), pipelined (many
  reports per ``Link.send_many``, at most ``--load-window`` without their answer), and
  checks that every report is answered ``Stored`` naming its token released. The sink,
  connected as Tokyo before the source sends,
  answers each delivery with its ``Ack`` (which completes it at the relay) and opens
  nothing. Neither does a member node's work (sealing, opening, their stores): on a
  2-core machine the tisa set-up's three CPU-bound processes share the cores, so its
  figure mixes the relay with both nodes; this one isolates the relay, as the floor's
  sender and receiver isolate the forwarder. The relay does all its work: digest check,
  store and signed ``Stored`` answer, the token checks (they do not depend on who sends
  it), delivery, ack. The run fails unless the sink got exactly the
  N tokens the source released and the relay's store holds all N as acked;
* floor: a sender, a bare trio forwarder that checks the same Ed25519 token signature
  on every message and forwards it, and a receiver; length-prefixed frames, no
  encryption, no storage.

Figures:

* throughput (``--rounds`` rounds, each measuring the floor right before the two tisa
  set-ups, ratios per round and their median: the shared machine moves the floor by up
  to 2x between runs): reports per second, N pipelined 1 KiB reports, first send to last receipt
  by the receiving application (for the relay alone: the source's first send to the
  sink's Nth delivery), tisa and the relay alone each over the bare forwarder, with the
  relay's CPU seconds; then, measured in this process once the nodes are gone,
  the ceiling that libsodium work alone puts on the ratio (:mod:`bench.ceiling`): the
  least the relay must spend in libsodium per report against the bare forwarder's one
  Ed25519 check per message, and the most reports a second a relay doing only that work
  on one core could handle, over the bare forwarder's measured rate;
* latency: p50/p99 from the originator's call to the recipient's application, reports
  sent one at a time (each its own call, never batched by the caller) on a fixed
  schedule at each offered rate (``--rate``, repeatable; default 1,000/s). Open loop:
  a report is sent at its time whether or not earlier ones are done, so a slow call
  does not slow the schedule. (Stamps are taken when the call starts, not at the
  scheduled time: trio wakes a sleeper up to a millisecond late, which would count
  against the bare forwarder too.) Past the rate tisa sustains, latency grows with the
  run: the delivered rate is printed beside the figures;
* floors of this run beside two targets (:mod:`bench.floors`): after the throughput
  rounds, the least a durable Python relay does per report of the relay-alone run (its
  libsodium work, one canonical decode or encode per message, a share of one durable
  WAL commit over as many reports as the relay made durable per flush, read from its
  metrics), with the relay's CPU as a multiple of it and a "proposed" line (at most
  1.5x of it) beside the issue's target line; after each latency rate, the serial path
  of one report: three durable steps (a WAL commit and its fsync on this disk, measured
  then), the protocol core's CPU of the three roles (``bench core``'s per-role figures,
  measured before the latency runs) and the bare forwarder's p50 hop, with the p50 as
  a multiple of it and whether the target lies above it;
* large: one report of ``--large-mib`` MiB end to end, with each process's peak RSS,
  beside the same at 16 MiB, to show peak memory does not grow with the report.

With ``--store`` (a ``postgresql://`` address, or ``postgresql`` for a throwaway server),
the throughput and latency runs are made for three relay set-ups, each beside the same
floor: SQLite, PostgreSQL with one relay process, and PostgreSQL with two relay processes
on one store, the two members connected to different ones (:mod:`bench.stores`). Each
relay process's CPU per report and the PostgreSQL server's are printed, with what N
cores would give from the CPU alone and the bound more cores leave.

The clock is CLOCK_MONOTONIC, which is one clock for every process on the machine.

With ``--trace``, the tisa processes of the latency runs trace themselves
(:mod:`tisa_io.trace`) and, after each run, the path of one report is printed step by
step (p50/p90, which process, which step) with each process's costs per report: CPU by
trio task, COMMITs and WAL fsyncs (CPU and wall time), messages in and out by type
(:mod:`bench.tracing`; ``bench/README.md``).

    python -m bench nodes [--count 2000] [--rate 1000 [--rate 100 ...]] [--large-mib 1024]
                          [--concurrency 64] [--load-window 256]
                          [--only throughput|latency|large] [--trace]
                          [--store postgresql://…|postgresql]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nacl.bindings as sodium
import trio

from bench import ceiling, core, floors, targets, tracing
from bench.processes import (
    Process,
    cpu_seconds,
    emit,
    load,
    make_world,
    profile,
    relay_limits,
    run_folder,
    trace_env,
    vm_hwm_mib,
    wait_port,
)
from bench.stores import SQLITE, THROWAWAY, PgBench, Relays, Setup, setups
from bench.world import LEVEL, SCOPE
from relay.storage import is_postgresql
from tisa_io import trace
from tisa_testing.pg_server import PgUnavailable

if TYPE_CHECKING:
    from clients.events import DeliveredReport
    from clients.node import Node

__all__ = ["main"]

_LEN = struct.Struct(">I")
_STAMP = struct.Struct(">dI")  # send time (monotonic), sequence number


# --- tisa roles --------------------------------------------------------------------------


def _addresses(ports: str) -> list[tuple[str, int]]:
    """The relay addresses of a role's ``ports`` argument (comma-separated, in the order
    the node tries them)."""
    return [("127.0.0.1", int(port)) for port in ports.split(",")]


async def _seoul(
    folder: Path, ports: str, mode: str, count: int, rate: float, size: int, concurrency: int
) -> None:
    from clients.node import open_node

    secret, arrangement = load(folder, "seoul")
    async with open_node(secret, "seoul", arrangement, _addresses(ports), folder / "seoul") as node:
        await node.wait_connected()
        if mode == "large":
            source = folder / "large.bin"
            start = time.monotonic()
            await node.submit(source, recipients=["tokyo"], scope=SCOPE, level=LEVEL,
                              release_to=["tokyo"])  # fmt: skip
            emit({"start": start})
            # Stay connected until Tokyo has it (the orchestrator ends us).
            await trio.sleep_forever()
        filler = os.urandom(max(0, size - _STAMP.size))
        cpu0 = time.process_time()  # start-up (key file, imports, handshake) excluded

        async def submit(seq: int) -> None:
            body = _STAMP.pack(time.monotonic(), seq) + filler
            await node.submit(body, recipients=["tokyo"], scope=SCOPE, level=LEVEL,
                              release_to=["tokyo"])  # fmt: skip

        start = time.monotonic()
        if mode == "latency":
            # Open loop: each report is submitted on its own at its scheduled time,
            # whether or not the earlier ones are done.
            # Paced on trio's clock: it is not time.monotonic() (trio adds an offset).
            paced = trio.current_time()
            async with trio.open_nursery() as nursery:
                for seq in range(count):
                    await trio.sleep_until(paced + seq / rate)
                    nursery.start_soon(submit, seq)
        else:
            # Pipelined: at most `concurrency` submit calls in progress at once.
            limiter = trio.Semaphore(concurrency)

            async def bounded(seq: int) -> None:
                try:
                    await submit(seq)
                finally:
                    limiter.release()

            async with trio.open_nursery() as nursery:
                for seq in range(count):
                    await limiter.acquire()
                    nursery.start_soon(bounded, seq)
        emit({"start": start, "cpu0": cpu0})
        await trio.sleep_forever()


async def _tokyo(folder: Path, ports: str, mode: str, count: int) -> None:
    from clients.node import open_node

    secret, arrangement = load(folder, "tokyo")
    async with open_node(secret, "tokyo", arrangement, _addresses(ports), folder / "tokyo") as node:
        latencies: list[float] = []
        received = 0
        end = 0.0
        cpu0 = time.process_time()
        # The reports the application has taken and not acknowledged yet.
        send: trio.MemorySendChannel[DeliveredReport]
        in_hand: trio.MemoryReceiveChannel[DeliveredReport]
        send, in_hand = trio.open_memory_channel(math.inf)
        async with trio.open_nursery() as nursery:
            if mode == "throughput":
                # As an application that takes reports as they come and acknowledges
                # all it has in hand at once (Node.ack_many: one commit and fsync for
                # all of them) while the next ones arrive.
                nursery.start_soon(_ack_in_hand, node, in_hand)
            async with send:
                async for report in node.reports():
                    now = time.monotonic()
                    if trace.enabled:
                        trace.mark("T_app", report.report_id)
                    if mode == "large":
                        emit({"end": now, "peak_mib": vm_hwm_mib()})
                        return
                    body = report.read_body()
                    sent, _ = _STAMP.unpack_from(body)
                    latencies.append(now - sent)
                    if mode == "throughput":
                        send.send_nowait(report)
                    else:
                        # One report at a time, as the latency runs offer them: each
                        # taken (Node.ack, on disk when it returns) before the next.
                        await node.ack(report)
                    received += 1
                    if received == count:
                        end = now
                        break
            # (Throughput: the last reports in hand are acknowledged before the CPU
            # figure is taken, as the latency runs' last ack is.)
        emit({"end": end, "latencies": latencies, "cpu0": cpu0, "cpu1": time.process_time()})


async def _ack_in_hand(node: Node, in_hand: trio.MemoryReceiveChannel[DeliveredReport]) -> None:
    """Acknowledge, each time, every report in hand (``Node.ack_many``)."""
    async for report in in_hand:
        reports = [report]
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                reports.append(in_hand.receive_nowait())
        await node.ack_many(reports)


def _run_tisa(
    folder: Path,
    mode: str,
    count: int,
    rate: float,
    size: int,
    concurrency: int = 1,
    setup: Setup = SQLITE,
    traced: bool = False,
) -> dict[str, Any]:
    run = run_folder(folder)
    if mode == "large":
        (run / "large.bin").symlink_to(folder / "large.bin")
    # With tracing, every process writes its file into one folder (tisa_io.trace).
    trace_folder = run / "trace" if traced else None
    relays = Relays(run, count, setup, trace=trace_folder)
    seoul = tokyo = None
    try:
        ports = relays.ports()
        relays.mark()  # their start-up, excluded
        # With two relay processes, Seoul tries the first one first, Tokyo the second.
        forward, backward = ",".join(map(str, ports)), ",".join(map(str, ports[::-1]))
        rest = [mode, str(count), str(rate), str(size)]
        tokyo = Process(run, "tokyo", ["-m", "bench.nodes", "--role", "tokyo", str(run),
                                       backward, *rest],
                        trace_env(trace_folder, "tokyo"))  # fmt: skip
        seoul = Process(run, "seoul", ["-m", "bench.nodes", "--role", "seoul", str(run),
                                       forward, *rest, str(concurrency)],
                        trace_env(trace_folder, "seoul"))  # fmt: skip
        for process, label in ((tokyo, "tokyo"), (seoul, "seoul")):
            profile(process, "BENCH_PROFILE_NODES", label)
        tokyo.wait(timeout=900)
        relays.measure()
        one_time_used = relays.one_time_used() if mode == "throughput" else 0
        one_time = relays.one_time_account("tokyo") if mode == "throughput" else {}
    finally:
        for process in (seoul, tokyo):
            if process is not None:
                process.stop()
        relays.stop()
    return {
        # Read once every process has ended (and written its file out).
        **({"trace": tracing.analyse(trace_folder)} if trace_folder is not None else {}),
        "seoul": {**seoul.records()[-1], "peak_mib": seoul.peak_mib, "cpu_s": seoul.cpu_s},
        "tokyo": {"peak_mib": tokyo.peak_mib, **tokyo.records()[-1], "cpu_s": tokyo.cpu_s},
        "one_time_used": one_time_used,
        "one_time": one_time,
        **relays.figures(),
    }


def _pipeline_cpu_each_ms(result: dict[str, Any], count: int) -> dict[str, float]:
    """CPU milliseconds per report of each process of a run (``server``: PostgreSQL's,
    0 with SQLite), each from the end of its start-up (the originator's first send, the
    recipient's node open, the relay's listening) to its end."""
    return {
        "seoul": 1000 * (result["seoul"]["cpu_s"] - result["seoul"]["cpu0"]) / count,
        "relay": 1000 * result["relay_run_cpu_s"] / count,
        "server": 1000 * result.get("server_run_cpu_s", 0.0) / count,
        "tokyo": 1000 * (result["tokyo"]["cpu1"] - result["tokyo"]["cpu0"]) / count,
    }


def _pipeline_cpu_ms(result: dict[str, Any], count: int) -> float:
    """CPU milliseconds per report summed over the processes of a run
    (:func:`_pipeline_cpu_each_ms`)."""
    return sum(_pipeline_cpu_each_ms(result, count).values())


# --- bare floor --------------------------------------------------------------------------


async def _read_frame(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    while True:
        if len(buffer) >= 4:
            (length,) = _LEN.unpack_from(buffer)
            if len(buffer) >= 4 + length:
                frame = bytes(buffer[4 : 4 + length])
                del buffer[: 4 + length]
                return frame
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data


async def _forwarder(port_file: Path, public_key: bytes) -> None:
    receiver_ready = trio.Event()
    receiver: list[trio.SocketStream] = []

    async def handle(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        hello = await _read_frame(stream, buffer)
        if hello == b"receiver":
            receiver.append(stream)
            receiver_ready.set()
            await trio.sleep_forever()
        await receiver_ready.wait()
        out = receiver[0]
        while (frame := await _read_frame(stream, buffer)) is not None:
            # frame = signature(64) || token message(300) || report
            signed, report = frame[:364], frame[364:]
            sodium.crypto_sign_open(signed, public_key)
            await out.send_all(_LEN.pack(len(report)) + report)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port_file.write_text(str(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(handle, listeners)


async def _bare_sender(port: int, mode: str, count: int, rate: float, size: int) -> None:
    seed = b"\x07" * 32
    _, secret_key = sodium.crypto_sign_seed_keypair(seed)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(_LEN.pack(6) + b"sender")
    filler = os.urandom(max(0, size - _STAMP.size))
    message = os.urandom(300)
    interval = 1.0 / rate if mode == "latency" else 0.0
    cpu0 = time.process_time()
    start = time.monotonic()
    paced = trio.current_time()  # trio's clock, the one sleep_until uses
    for seq in range(count):
        if interval:
            await trio.sleep_until(paced + seq * interval)
        signed = sodium.crypto_sign(message, secret_key)
        report = _STAMP.pack(time.monotonic(), seq) + filler
        await stream.send_all(_LEN.pack(len(signed) + len(report)) + signed + report)
    emit({"start": start, "cpu0": cpu0})
    await trio.sleep_forever()


async def _bare_receiver(port: int, count: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(_LEN.pack(8) + b"receiver")
    buffer = bytearray()
    latencies = []
    cpu0 = time.process_time()
    for _ in range(count):
        frame = await _read_frame(stream, buffer)
        if frame is None:
            break
        sent, _ = _STAMP.unpack_from(frame)
        latencies.append(time.monotonic() - sent)
    emit({"end": time.monotonic(), "latencies": latencies, "cpu0": cpu0,
           "cpu1": time.process_time()})  # fmt: skip


def _run_bare(folder: Path, mode: str, count: int, rate: float, size: int) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(dir=folder))
    public_key, _ = sodium.crypto_sign_seed_keypair(b"\x07" * 32)
    forwarder = Process(run, "forwarder", ["-m", "bench.nodes", "--role", "forwarder",
                                            str(run / "port"), public_key.hex()])  # fmt: skip
    sender = receiver = None
    try:
        port = wait_port(run / "port", forwarder)
        forwarder_cpu0 = cpu_seconds(forwarder.popen.pid)
        args = [str(port), mode, str(count), str(rate), str(size)]
        receiver = Process(run, "receiver", ["-m", "bench.nodes", "--role", "bare-receiver", *args])
        time.sleep(0.3)
        sender = Process(run, "sender", ["-m", "bench.nodes", "--role", "bare-sender", *args])
        receiver.wait(timeout=600)
    finally:
        for process in (sender, receiver, forwarder):
            if process is not None:
                process.stop()
    return {
        "seoul": {**sender.records()[-1], "cpu_s": sender.cpu_s},
        "tokyo": receiver.records()[-1],
        "relay_run_cpu_s": forwarder.cpu_s - forwarder_cpu0,
    }


# --- orchestration -----------------------------------------------------------------------


def _throughput(result: dict[str, Any], count: int) -> float:
    return float(count / (result["tokyo"]["end"] - result["seoul"]["start"]))


def _percentiles(result: dict[str, Any]) -> tuple[float, float]:
    latencies = sorted(result["tokyo"]["latencies"])
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return p50 * 1000, p99 * 1000


def _setup_round(
    tisa: dict[str, Any], alone: dict[str, Any], bare_rate: float, count: int
) -> dict[str, Any]:
    """One round's figures of one set-up: rates over the floor, CPU per report."""
    tisa_rate = _throughput(tisa, count)
    alone["ratio"] = alone["rate"] / bare_rate
    alone["relay_cpu_us"] = 1e6 * alone["relay_run_cpu_s"] / count
    alone["relay_cpu_each_us"] = [1e6 * each / count for each in alone["relay_run_cpu_each_s"]]
    alone["server_cpu_us"] = 1e6 * alone["server_run_cpu_s"] / count
    alone["head_held_us"] = 1e6 * alone["head_held_s"] / count
    alone["head_held_share"] = alone["head_held_s"] / alone["seconds"]
    alone["lock_waiting_share"] = alone["lock_waiting_s"] / alone["seconds"]
    alone["writing_share"] = alone["writing_s"] / alone["seconds"]
    # Reports made durable per flush to disk (the relay's group commit), from its metrics.
    flushes = alone["relay_flushes"]
    alone["reports_per_flush"] = count / flushes if flushes > 0 else math.nan
    return {
        "tisa": tisa_rate,
        "ratio": tisa_rate / bare_rate,
        "tisa_cpu_ms": _pipeline_cpu_ms(tisa, count),
        "tisa_cpu_each_ms": _pipeline_cpu_each_ms(tisa, count),
        "one_time_used": tisa["one_time_used"],
        "one_time": tisa["one_time"],
        "tisa_relay_cpu_us": 1e6 * tisa["relay_run_cpu_s"] / count,
        "tisa_server_cpu_us": 1e6 * tisa["server_run_cpu_s"] / count,
        "relay_alone": alone,
        "cpu_s": {
            "seoul": tisa["seoul"]["cpu_s"],
            "relay": tisa["relay_cpu_s"],
            "tokyo": tisa["tokyo"]["cpu_s"],
        },
    }


def _us(values: list[float]) -> str:
    return " + ".join(f"{value:.0f}" for value in values)


def _setup_medians(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The median over the rounds of each figure of set-up ``key``."""
    mine = [r["setups"][key] for r in rounds]

    def median(pick: Any) -> float:
        return float(statistics.median(pick(r) for r in mine))

    each = len(mine[0]["relay_alone"]["relay_cpu_each_us"])
    return {
        "tisa": median(lambda r: r["tisa"]),
        "ratio": median(lambda r: r["ratio"]),
        "tisa_cpu_ms": median(lambda r: r["tisa_cpu_ms"]),
        "tisa_relay_cpu_us": median(lambda r: r["tisa_relay_cpu_us"]),
        "tisa_server_cpu_us": median(lambda r: r["tisa_server_cpu_us"]),
        "relay_alone": median(lambda r: r["relay_alone"]["rate"]),
        "relay_alone_ratio": median(lambda r: r["relay_alone"]["ratio"]),
        "relay_cpu_us": median(lambda r: r["relay_alone"]["relay_cpu_us"]),
        "relay_cpu_each_us": [
            median(lambda r, n=n: r["relay_alone"]["relay_cpu_each_us"][n]) for n in range(each)
        ],
        "server_cpu_us": median(lambda r: r["relay_alone"]["server_cpu_us"]),
        "head_held_us": median(lambda r: r["relay_alone"]["head_held_us"]),
        "head_held_share": median(lambda r: r["relay_alone"]["head_held_share"]),
        "head_holds": median(lambda r: r["relay_alone"]["head_holds"]),
        "reports_per_flush": median(lambda r: r["relay_alone"]["reports_per_flush"]),
        "relays": each,
    }


def _projection(label: str, figures: dict[str, Any], cores: tuple[int, ...]) -> list[str]:
    """What N cores would give, from the CPU per report alone, and the bound that more
    cores leave: a relay process runs its store's statements in its event loop's thread,
    so it waits for the server on each, and its own CPU and the server's work for it add
    up per report; with ``--lock-probe``, the bound the audit chain head's row lock sets
    (1 / the time it is held per report). NOTIFY and the poll are left out (see
    docs/performance.md)."""
    relays = figures["relays"]
    alone_us = figures["relay_cpu_us"] + figures["server_cpu_us"]
    # The busiest relay process, with its share of the server's work (an even share).
    serial_us = max(figures["relay_cpu_each_us"]) + figures["server_cpu_us"] / relays
    tisa_us = 1000 * figures["tisa_cpu_ms"]
    return [
        f"  {label}: relay alone {alone_us:.0f} µs CPU per report (relay processes"
        f" {_us(figures['relay_cpu_each_us'])}, PostgreSQL server"
        f" {figures['server_cpu_us']:.0f}); end to end {tisa_us:.0f} µs (of which relay"
        f" processes {figures['tisa_relay_cpu_us']:.0f}, server"
        f" {figures['tisa_server_cpu_us']:.0f}, the two members the rest)",
        "    CPU-only projection, reports/s on N cores: "
        + ", ".join(
            f"{n} cores relay alone {n * 1e6 / alone_us:.0f}, end to end {n * 1e6 / tisa_us:.0f}"
            for n in cores
        ),
        # Every report passes through every relay process here (the members are on
        # different ones), so the busiest one caps the run.
        f"    whatever the cores, a relay process waits on each of its statements: the"
        f" busiest one's {serial_us:.0f} µs per report (its CPU and an even share of the"
        f" server's) caps the run at {1e6 / serial_us:.0f}/s",
        *(
            []
            if not figures["head_held_us"] > 0  # NaN without the probe
            else [
                f"    and the audit head row, held {figures['head_held_share']:.0%} of the"
                f" run ({figures['head_held_us']:.0f} µs per report), at"
                f" {1e6 / figures['head_held_us']:.0f}/s however many processes"
            ]
        ),
    ]


def _throughput_part(folder: Path, args: argparse.Namespace, kinds: list[Setup]) -> dict[str, Any]:
    from bench import relay_load

    print(f"throughput, {args.count} pipelined 1 KiB reports, three processes"
          f" ({args.concurrency} submit calls at once), {args.rounds} rounds,"
          f" set-ups {', '.join(kind.label for kind in kinds)}:")  # fmt: skip
    print(f"  relay limits set for the run (above their defaults, so that every report takes"
          f" the normal path): {', '.join(relay_limits(args.count))}")  # fmt: skip
    print(
        "  Tokyo's application takes each report as it comes and acknowledges all it has in"
        " hand at once (Node.ack_many: one commit and fsync for them) while the next arrive"
    )
    # The machine is shared: the bare forwarder alone varies by 2x from run to run. Each
    # round measures the floor right before the tisa set-ups; ratios are per round.
    rounds: list[dict[str, Any]] = []
    for number in range(1, args.rounds + 1):
        bare = _run_bare(folder, "throughput", args.count, 1000.0, 1024)
        bare_rate = _throughput(bare, args.count)
        bare_cpu = _pipeline_cpu_ms(bare, args.count)
        print(f"  round {number}: bare forwarder {bare_rate:6.0f}/s ({bare_cpu:.3f} ms CPU per"
              f" message over its three processes)")  # fmt: skip
        found: dict[str, Any] = {}
        for kind in kinds:
            tisa = _run_tisa(folder, "throughput", args.count, 1000.0, 1024, args.concurrency,
                             kind)  # fmt: skip
            alone = relay_load.run(folder, args.count, 1024, args.load_window, kind,
                                   probe=args.lock_probe)  # fmt: skip
            mine = found[kind.key] = _setup_round(tisa, alone, bare_rate, args.count)
            server = ""
            if kind.server is not None:
                server = (f", server {mine['tisa_server_cpu_us']:.0f} µs / relay alone"
                          f" {alone['server_cpu_us']:.0f} µs")  # fmt: skip
                if args.lock_probe:
                    server += (f"; head row held {alone['head_held_share']:.0%} of the"
                               f" relay-alone run ({alone['head_held_us']:.0f} µs per"
                               f" report, {alone['head_holds']:.0f} holds, each clocked),"
                               f" sampled: a writing transaction open"
                               f" {alone['writing_share']:.0%}, a lock waited for"
                               f" {alone['lock_waiting_share']:.0%}")  # fmt: skip
            print(f"    {kind.label:12}  tisa {mine['tisa']:5.0f}/s ({mine['ratio']:5.3f}x)"
                  f"   relay alone {alone['rate']:5.0f}/s ({alone['ratio']:5.3f}x);"
                  f" CPU per report: tisa {mine['tisa_cpu_ms']:.2f} ms summed, relay alone"
                  f" {_us(alone['relay_cpu_each_us'])} µs{server};"
                  f" {targets.load_average()}")  # fmt: skip
            each, account = mine["tisa_cpu_each_ms"], mine["one_time"]
            print(f"      tisa CPU per report by process: Seoul {each['seoul']:.2f} ms,"
                  f" relay {each['relay']:.2f} ms, Tokyo {each['tokyo']:.2f} ms"
                  + (f", PostgreSQL {each['server']:.2f} ms" if kind.server is not None else "")
                  + f"; tokens with a one-time prekey {mine['one_time_used']} of"
                  f" {args.count}, Tokyo's one-time prekeys published"
                  f" {account['published']} (used {account['used']}, handed out unused"
                  f" {account['held']}, on hand {account['on_hand']}; Seoul's own"
                  f" {account['others']})")  # fmt: skip
        sqlite = found["sqlite"]
        rounds.append({"bare": bare_rate, "bare_cpu_ms": bare_cpu, "setups": found,
                       "tisa": sqlite["tisa"], "relay_alone": sqlite["relay_alone"],
                       "tisa_cpu_ms": sqlite["tisa_cpu_ms"]})  # fmt: skip
    medians = {kind.key: _setup_medians(rounds, kind.key) for kind in kinds}
    bare_rate = statistics.median(r["bare"] for r in rounds)
    bare_cpu_ms = statistics.median(r["bare_cpu_ms"] for r in rounds)
    print(f"  median of rounds (bare forwarder {bare_rate:.0f}/s):")
    for kind in kinds:
        mine = medians[kind.key]
        print(f"    {kind.label:12}  tisa {mine['tisa']:5.0f}/s ({mine['ratio']:5.3f}x)"
              f"   relay alone (pre-sealed load, acking sink) {mine['relay_alone']:5.0f}/s"
              f" ({mine['relay_alone_ratio']:5.3f}x)")  # fmt: skip
    alone = rounds[-1]["relay_alone"]
    print(f"    last round's sqlite relay alone: relay CPU {alone['relay_cpu_s']:.2f} s in all"
          f" ({alone['relay_run_cpu_s']:.2f} s during the run); timed CPU source"
          f" {alone['source_timed_cpu_s']:.2f} s, sink {alone['sink_timed_cpu_s']:.2f} s;"
          f" at most {args.load_window} reports unanswered")  # fmt: skip
    if len(kinds) > 1:
        print("  CPU per report on PostgreSQL, per process and of the database server"
              " (median of rounds):")  # fmt: skip
        for kind in kinds:
            if kind.server is not None:
                for text in _projection(kind.label, medians[kind.key], (2, 4, 8)):
                    print(text)
    # Measured here, with the node processes gone (see bench/ceiling.py).
    limit = ceiling.measure()
    limit["against_measured_bare"] = ceiling.bound_against(limit, bare_rate)
    print(ceiling.summary_line(limit))
    print(ceiling.bound_line(limit["against_measured_bare"], bare_rate))
    sqlite = medians["sqlite"]
    relay_cpu_us, tisa_cpu_ms = sqlite["relay_cpu_us"], sqlite["tisa_cpu_ms"]
    print(targets.line("relay alone, CPU per 1 KiB report (median of rounds)", relay_cpu_us,
                       "µs", targets.RELAY_CPU_US,
                       f"libsodium work the relay must do {limit['relay_us']:.0f} µs, the"
                       f" relay at {relay_cpu_us / limit['relay_us']:.2f}x it"))  # fmt: skip
    # The least a durable Python relay does per report, amortising its commit over the
    # batches the relay itself achieved in these runs (bench/floors.py).
    durable = floors.durable_relay(folder, sqlite["reports_per_flush"])
    print(floors.relay_floor_line(durable, relay_cpu_us))
    print(targets.proposed_line("relay alone over the durable-relay floor (median of rounds)",
                                relay_cpu_us / durable["floor_us"], "x",
                                targets.PROPOSED_RELAY_FLOOR_RATIO,
                                f"durable Python relay {durable['floor_us']:.0f} µs"))  # fmt: skip
    floor = f"bare forwarder's three processes {bare_cpu_ms:.3f} ms per message"
    print(targets.line("three processes, CPU per report summed (median of rounds)",
                       tisa_cpu_ms, "ms", targets.PIPELINE_CPU_MS, floor))  # fmt: skip
    cpu = rounds[-1]["setups"]["sqlite"]["cpu_s"]
    print("  last round's tisa CPU seconds (start-up included): "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items()))  # fmt: skip
    return {
        "cpu_s": cpu,
        "tisa": sqlite["tisa"],
        "bare": bare_rate,
        "ratio": sqlite["ratio"],
        "relay_alone": alone,
        "relay_alone_ratio": sqlite["relay_alone_ratio"],
        "relay_cpu_us": relay_cpu_us,
        "tisa_cpu_ms": tisa_cpu_ms,
        "bare_cpu_ms": bare_cpu_ms,
        "setups": medians,
        "load": targets.load_average(),
        "rounds": rounds,
        "concurrency": args.concurrency,
        "ceiling": limit,
        "durable_relay_floor": durable,
    }


def _latency_part(folder: Path, args: argparse.Namespace, kinds: list[Setup]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    # The protocol core's CPU per role (the toolkit's own calls), measured in this process
    # before the runs: part of the serial path's floor (bench/floors.py).
    roles = core.per_role(3, 100, show=False)
    core_us = {role: roles[role]["toolkit_us"] for role in ("originator", "relay", "recipient")}
    for rate in args.rate:
        print(f"latency, {args.latency_count} reports of 1 KiB offered at {rate:.0f}/s"
              " (open loop; Tokyo's application acknowledges each report with Node.ack,"
              " on disk when it returns, before it takes the next):")  # fmt: skip
        bare = _run_bare(folder, "latency", args.latency_count, rate, 1024)
        b50, b99 = _percentiles(bare)
        found: dict[str, Any] = {}
        for kind in kinds:
            tisa = _run_tisa(folder, "latency", args.latency_count, rate, 1024, 1, kind,
                             traced=args.trace)  # fmt: skip
            t50, t99 = _percentiles(tisa)
            achieved = args.latency_count / (tisa["tokyo"]["end"] - tisa["seoul"]["start"])
            tisa_cpu = _pipeline_cpu_ms(tisa, args.latency_count)
            found[kind.key] = {"tisa": [t50, t99], "tisa_rate": achieved, "tisa_cpu_ms": tisa_cpu}
            name = "tisa" if kind.server is None else kind.label
            print(f"  {name:12} p50 {t50:7.2f} ms  p99 {t99:8.2f} ms (delivered {achieved:.0f}/s;"
                  f" p99 over bare {t99 / b99:5.1f}x); CPU per report {tisa_cpu:.2f} ms summed"
                  f" over the processes" + (", traced" if args.trace else ""))  # fmt: skip
            if args.trace:
                found[kind.key]["trace"] = tisa["trace"]
                for line in tracing.lines(tisa["trace"]):
                    print(line)
        print(f"  {'bare':12} p50 {b50:7.2f} ms  p99 {b99:8.2f} ms"
              f" (CPU per message {_pipeline_cpu_ms(bare, args.latency_count):.3f} ms);"
              f" {targets.load_average()}")  # fmt: skip
        t50, t99 = found["sqlite"]["tisa"]
        # A durable step on this disk, measured right after the runs.
        serial = floors.latency_floor(floors.fsync_wall(folder), core_us, b50)
        print(floors.latency_floor_line(serial, core_us, t50, targets.LATENCY_P50_MS))
        if rate == targets.LATENCY_RATE:
            print(targets.line("p50 at 100/s", t50, "ms", targets.LATENCY_P50_MS,
                               f"bare forwarder p50 {b50:.2f} ms; the serial path"
                               f" {serial['floor_ms']:.2f} ms"))  # fmt: skip
            print(targets.line("p99 at 100/s", t99, "ms", targets.LATENCY_P99_MS,
                               f"bare forwarder p99 {b99:.2f} ms"))  # fmt: skip
        figures[f"{rate:g}"] = {
            **found["sqlite"],
            "bare": [b50, b99],
            "serial_floor": {**serial, "core_us": core_us},
            "setups": found,
            "load": targets.load_average(),
        }
    return figures


def _large_part(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    large: dict[str, Any] = {}
    for mib in (16, args.large_mib):
        with open(folder / "large.bin", "wb") as handle:
            block = os.urandom(1024 * 1024)
            for _ in range(mib):
                handle.write(block)
        result = _run_tisa(folder, "large", 1, 1000.0, 0)
        seconds = result["tokyo"]["end"] - result["seoul"]["start"]
        large[str(mib)] = {
            "seconds": seconds,
            "mib_per_s": mib / seconds,
            "seoul_peak_mib": result["seoul"]["peak_mib"],
            "tokyo_peak_mib": result["tokyo"]["peak_mib"],
            "relay_peak_mib": result["relay_peak_mib"],
        }
        print(f"large report, {mib} MiB end to end: {seconds:6.1f} s ({mib / seconds:6.1f}"
              f" MiB/s); peak RSS seoul {result['seoul']['peak_mib']:.0f} MiB,"
              f" relay {result['relay_peak_mib']:.0f} MiB,"
              f" tokyo {result['tokyo']['peak_mib']:.0f} MiB")  # fmt: skip
        os.unlink(folder / "large.bin")
    return large


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench nodes", description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        help="offered rate of the latency run, reports/s (repeatable; default 1000)",
    )
    parser.add_argument("--latency-count", type=int, default=2000)
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="submit calls in progress at once in the throughput run (default 64)",
    )
    parser.add_argument(
        "--load-window",
        type=int,
        default=256,
        help="reports the load source of the relay-alone run keeps unanswered at most"
        " (default 256)",
    )
    parser.add_argument(
        "--only",
        choices=("throughput", "latency", "large"),
        action="append",
        help="run only this part (may be given more than once; default: all three)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="throughput rounds, each with its own floor (default 3; median ratio printed)",
    )
    parser.add_argument(
        "--store",
        metavar="ADDRESS",
        help="also measure the relay on PostgreSQL, with one and with two relay processes:"
        " a postgresql://… address of a role that may create schemas, or 'postgresql' for a"
        " throwaway server brought up for the run (as the tests do); default: SQLite only",
    )
    parser.add_argument(
        "--lock-probe",
        action="store_true",
        help="with --store: during the relay-alone runs, clock each hold of the audit chain's"
        " head row in the relay processes (bench/headclock.py), and sample how long a writing"
        " transaction is open and a lock waited for (pg_stat_activity every 2 ms; its"
        " queries add to the server's CPU)",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace the tisa processes of the latency runs (tisa_io.trace) and print, after"
        " each, the path of one report step by step (p50/p90) and each process's costs per"
        " report (CPU by trio task, COMMITs and WAL fsyncs, messages by type), over the"
        " middle of the run; tracing adds its own cost to the figures",
    )
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rate = args.rate or [1000.0]
    if args.role:
        return _role(args.role)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.load_window < 1:
        parser.error("--load-window must be at least 1")
    if args.store is not None and not (args.store == THROWAWAY or is_postgresql(args.store)):
        parser.error("--store takes a postgresql:// address, or 'postgresql'")
    if args.lock_probe and args.store is None:
        parser.error("--lock-probe needs --store")
    if args.trace and args.only and "latency" not in args.only:
        parser.error("--trace traces the latency runs: it needs the latency part")
    parts = args.only or ["throughput", "latency", "large"]
    figures: dict[str, Any] = {}
    server = None if args.store is None else PgBench(args.store)
    with tempfile.TemporaryDirectory() as name, contextlib.ExitStack() as stack:
        if server is not None:
            stack.callback(server.stop)
            try:
                server.start()
            except PgUnavailable as exc:
                print(f"error: no PostgreSQL server for the benchmark: {exc}", file=sys.stderr)
                return 2
            figures["store"] = "postgresql" if args.store == THROWAWAY else "postgresql://…"
        kinds = setups(server)
        folder = Path(name)
        make_world(folder)
        if "throughput" in parts:
            figures["throughput"] = _throughput_part(folder, args, kinds)
        if "latency" in parts:
            figures["latency_ms"] = _latency_part(folder, args, kinds)
        if "large" in parts:  # SQLite only: the large run is about the nodes' memory
            figures["large"] = _large_part(folder, args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _role(argv: list[str]) -> int:
    role, *rest = argv
    if role == "forwarder":
        trio.run(_forwarder, Path(rest[0]), bytes.fromhex(rest[1]))
    elif role == "bare-sender":
        trio.run(_bare_sender, int(rest[0]), rest[1], int(rest[2]), float(rest[3]), int(rest[4]))
    elif role == "bare-receiver":
        trio.run(_bare_receiver, int(rest[0]), int(rest[2]))
    elif role == "seoul":
        folder, ports, mode, count, rate, size, concurrency = rest
        trio.run(
            _seoul,
            Path(folder),
            ports,
            mode,
            int(count),
            float(rate),
            int(size),
            int(concurrency),
        )
    elif role == "tokyo":
        folder, ports, mode, count = rest[:4]
        trio.run(_tokyo, Path(folder), ports, mode, int(count))
    elif role == "load-source":
        from bench import relay_load

        folder, port, count, size, window = rest
        trio.run(relay_load.load_source, Path(folder), int(port), int(count), int(size),
                 int(window))  # fmt: skip
    elif role == "relay-sink":
        from bench import relay_load

        folder, port, count = rest
        trio.run(relay_load.sink, Path(folder), int(port), int(count))
    else:
        raise SystemExit(f"unknown role {role}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
