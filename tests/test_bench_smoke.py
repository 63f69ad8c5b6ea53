"""The benchmarks still run: each once, at the smallest sizes, as a subprocess.

Speed is never asserted here (the machines are shared and noisy; the figures belong to
``python -m bench``); only that every part runs to its end and prints its figures, and
that the --json output carries them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_floors import verdict_lines
from tisa_testing.pg_server import PgServer

ROOT = Path(__file__).resolve().parent.parent


def _bench(*args: str, timeout: float = 180) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_nodes_runs_every_part(tmp_path: Path) -> None:
    figures_file = tmp_path / "figures.json"
    out = _bench(
        "nodes", "--count", "40", "--rounds", "1", "--latency-count", "30",
        "--rate", "100", "--large-mib", "2", "--trace", "--json", str(figures_file),
    )  # fmt: skip
    assert "round 1: bare forwarder" in out and "relay alone" in out
    assert "ceiling from libsodium work alone" in out
    # Each target beside its floor, with the load average.
    assert "target relay alone, CPU per 1 KiB report" in out
    assert "target three processes, CPU per report summed" in out
    assert "target p50 at 100/s" in out and "target p99 at 100/s" in out
    assert out.count("; load ") >= 4
    assert "latency, 30 reports of 1 KiB offered at 100/s" in out
    assert "large report, 2 MiB end to end" in out
    # --trace: the path of one report step by step, and each process's costs per report
    # (bench/tracing.py), from the files the three processes wrote.
    assert "trace: 30 reports, 30 with every stamp, 21 in the middle of the run" in out
    for step in ("S0 -> S_sealed", "S_durable -> S_sent", "R_deliver -> R_sent",
                 "T_stored -> T_app", "S0 -> T_app, the whole path"):  # fmt: skip
        assert step in out, step
    for process in ("seoul", "relay", "tokyo"):
        assert f"    {process}: CPU " in out, process
    assert out.count("      messages out: ") == 3 and "WAL fsyncs" in out
    # The floors beside the targets (bench/floors.py), each from this run.
    assert "floor, a durable Python relay per 1 KiB report (relay-alone run)" in out
    assert "proposed relay alone over the durable-relay floor" in out
    assert "floor, the serial path of one report" in out
    # Every target and proposed line's verdict follows from its own figures.
    said = {match["what"] for match in verdict_lines(out)}
    assert {"relay alone, CPU per 1 KiB report (median of rounds)", "p50 at 100/s",
            "relay alone over the durable-relay floor (median of rounds)"} <= said  # fmt: skip
    figures = json.loads(figures_file.read_text())
    durable = figures["throughput"]["durable_relay_floor"]
    # Read from the relay's metrics: it made every report durable in some flush.
    assert 1 <= durable["reports_per_flush"] <= 40 and durable["batch"] >= 1
    assert durable["floor_us"] > durable["libsodium_us"] > 0
    serial = figures["latency_ms"]["100"]["serial_floor"]
    assert serial["floor_ms"] > serial["fsyncs_ms"] > 0 and serial["core_ms"] > 0
    assert figures["throughput"]["tisa"] > 0 and figures["throughput"]["bare"] > 0
    assert figures["throughput"]["relay_alone"]["rate"] > 0
    assert figures["latency_ms"]["100"]["tisa"][1] > 0
    traced = figures["latency_ms"]["100"]["trace"]
    assert traced["kept"] == 21 and len(traced["segments"]) == 12
    for process in ("seoul", "relay", "tokyo"):
        costs = traced["processes"][process]
        assert costs["cpu_us"] > 0 and costs["messages"]["out"]
    assert traced["processes"]["seoul"]["messages"]["out"]["submit_inline"] > 0
    assert figures["throughput"]["relay_cpu_us"] > 0 and figures["throughput"]["tisa_cpu_ms"] > 0
    for process in ("seoul", "relay", "tokyo"):
        # VmHWM of each process: a real reading, not nan, and at least the interpreter.
        assert figures["large"]["2"][f"{process}_peak_mib"] > 10


def test_bench_nodes_runs_on_postgresql_with_one_and_two_relays(
    tmp_path: Path, pg_server: PgServer
) -> None:
    # On the tests' server (--store postgresql://…), each run in a schema of its own.
    figures_file = tmp_path / "figures.json"
    out = _bench(
        "nodes", "--count", "20", "--rounds", "1", "--latency-count", "20", "--rate", "100",
        "--only", "throughput", "--only", "latency", "--store", pg_server.dsn,
        "--lock-probe", "--json", str(figures_file), timeout=300,
    )  # fmt: skip
    assert "set-ups sqlite, pg 1 relay, pg 2 relays" in out
    assert "CPU-only projection, reports/s on N cores" in out
    assert "head row held" in out and "holds, each clocked" in out
    figures = json.loads(figures_file.read_text())
    setups = figures["throughput"]["setups"]
    assert set(setups) == {"sqlite", "pg1", "pg2"}
    for key, relays in (("pg1", 1), ("pg2", 2)):
        mine = setups[key]
        assert mine["tisa"] > 0 and mine["relay_alone"] > 0 and mine["relays"] == relays
        # Each relay process's CPU and the server's: real readings from /proc, not NaN.
        assert len(mine["relay_cpu_each_us"]) == relays
        assert all(each > 0 for each in mine["relay_cpu_each_us"])
        assert math.isfinite(mine["server_cpu_us"]) and mine["server_cpu_us"] >= 0
        assert figures["latency_ms"]["100"]["setups"][key]["tisa"][1] > 0
    # The audit head's holds, every one clocked by the relay processes (bench/headclock.py,
    # nothing sampled), within the timed run: the batch that stores the first report takes
    # the row after the source's first send, and before any report is delivered (its
    # COMMIT comes first), so each set-up reads at least one hold overlapping the window by
    # some time, and a share of the run (two relay processes take turns: one share).
    for key in ("pg1", "pg2"):
        round_alone = figures["throughput"]["rounds"][0]["setups"][key]["relay_alone"]
        assert round_alone["head_holds"] >= 1 and round_alone["head_held_s"] > 0
        assert 0 < setups[key]["head_held_share"] <= 1 and setups[key]["head_holds"] >= 1
    # Every relay-alone run checked the relay's tokens in its own store: all acked.
    round_ = figures["throughput"]["rounds"][0]["setups"]
    assert all(round_[key]["relay_alone"]["relay_tokens"] == {"acked": 20} for key in round_)
    assert setups["sqlite"]["server_cpu_us"] == 0


@pytest.mark.parametrize(
    ("store", "said"),
    [
        ("/tmp/some-folder", "--store takes a postgresql:// address, or 'postgresql'"),
        ("postgresql://nobody@/none?host=/nonexistent-folder",
         "error: no PostgreSQL server for the benchmark: cannot connect to PostgreSQL"),
    ],
)  # fmt: skip
def test_bench_nodes_says_why_a_store_will_not_do(store: str, said: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "nodes", "--store", store],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and said in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("core", "--large-mib", "2", "--rounds", "1", "--iterations", "20"),
        ("ceiling", "--rounds", "1", "--iterations", "20"),
    ],
)
def test_bench_core_and_ceiling_run(args: tuple[str, ...]) -> None:
    out = _bench(*args)
    assert "ratio" in out or "ceiling" in out
    if args[0] == "core":
        for role in ("originator", "relay", "recipient"):
            assert f"target core {role}" in out
        assert "target 2 MiB seal then open" in out
        assert "floor secretstream + the ciphertext's BLAKE2b-256 on each side" in out
        assert "proposed 2 MiB seal then open over secretstream + BLAKE2b" in out
        # Five roles, the large-report target and the proposed one; each verdict
        # follows from its own figures.
        assert len(verdict_lines(out)) == 7


def test_bench_availability_runs(tmp_path: Path) -> None:
    figures_file = tmp_path / "figures.json"
    out = _bench("availability", "--idle", "50", "--rounds", "1", "--json", str(figures_file))
    assert "50 idle connections from 127.0.0.2" in out
    assert "delivery past a newer stale connection" in out
    figures = json.loads(figures_file.read_text())
    for part in ("round_trip_s", "stale_older_s", "stale_newer_s"):
        assert len(figures[part]) == 1 and 0 < figures[part][0] < float("inf")
