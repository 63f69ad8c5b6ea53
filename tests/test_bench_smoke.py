"""The benchmarks still run: each once, at the smallest sizes, as a subprocess.

Speed is never asserted here (the machines are shared and noisy; the figures belong to
``python -m bench``); only that every part runs to its end and prints its figures, and
that the --json output carries them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        "--rate", "100", "--large-mib", "2", "--json", str(figures_file),
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
    figures = json.loads(figures_file.read_text())
    assert figures["throughput"]["tisa"] > 0 and figures["throughput"]["bare"] > 0
    assert figures["throughput"]["relay_alone"]["rate"] > 0
    assert figures["latency_ms"]["100"]["tisa"][1] > 0
    assert figures["throughput"]["relay_cpu_us"] > 0 and figures["throughput"]["tisa_cpu_ms"] > 0
    for process in ("seoul", "relay", "tokyo"):
        # VmHWM of each process: a real reading, not nan, and at least the interpreter.
        assert figures["large"]["2"][f"{process}_peak_mib"] > 10


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


def test_bench_availability_runs(tmp_path: Path) -> None:
    figures_file = tmp_path / "figures.json"
    out = _bench("availability", "--idle", "50", "--rounds", "1", "--json", str(figures_file))
    assert "50 idle connections from 127.0.0.2" in out
    assert "delivery past a newer stale connection" in out
    figures = json.loads(figures_file.read_text())
    for part in ("round_trip_s", "stale_older_s", "stale_newer_s"):
        assert len(figures[part]) == 1 and 0 < figures[part][0] < float("inf")
