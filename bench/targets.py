"""The data-path targets (issue 11) and the line each benchmark prints for one.

Every figure is printed beside its target and beside the floor measured in the same run,
with the machine's load average at that moment: the machines are shared, and a figure
taken at a load of 4 on two cores says little without it.
"""

from __future__ import annotations

import os

__all__ = ["line", "load_average", "proposed_line", "verdict"]

# Relay alone: CPU seconds per 1 KiB report (>= 4,000 reports/s on one core).
RELAY_CPU_US = 250.0
# Three processes end to end: CPU per report summed over Seoul, the relay and Tokyo.
PIPELINE_CPU_MS = 1.0
# Latency at 100 reports/s offered, open loop, on a quiet machine.
LATENCY_P50_MS = 2.5
LATENCY_P99_MS = 6.0
LATENCY_RATE = 100.0
# Protocol core per role, against the same libsodium calls made directly.
CORE_RATIO = 1.25
# 256 MiB sealed then opened, against a bare secretstream loop (rate ratio, at least).
LARGE_RATIO = 0.8

# Requirements we would propose in place of two of the above, each against a floor that
# counts what the format or durability requires (bench/floors.py), printed as "proposed"
# lines beside the targets, which stay as they are:
# the large report against secretstream plus the BLAKE2b of the ciphertext on each side;
PROPOSED_LARGE_RATIO = 0.8
# the relay alone at most this multiple of the durable-relay floor.
PROPOSED_RELAY_FLOOR_RATIO = 1.5


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as printed beside each figure."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux or macOS
        return "load n/a"
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} cores)"


def verdict(value: float, target: float, *, at_most: bool = True) -> str:
    """``met`` or ``NOT met`` for ``value`` against ``target``."""
    met = value <= target if at_most else value >= target
    return "met" if met else "NOT met"


def line(
    what: str,
    value: float,
    unit: str,
    target: float,
    floor: str,
    *,
    at_most: bool = True,
    kind: str = "target",
) -> str:
    """One target line: the figure, its target and verdict, the floor, the load."""
    sign = "<=" if at_most else ">="
    # The verdict is of the figure as printed, so that the line never contradicts itself.
    shown = round(value, _digits(value))
    return (
        f"  {kind} {what}: {shown:.{_digits(value)}f} {unit} ({kind} {sign} {target:g} {unit},"
        f" {verdict(shown, target, at_most=at_most)}); floor {floor}; {load_average()}"
    )


def proposed_line(
    what: str,
    value: float,
    unit: str,
    target: float,
    floor: str,
    *,
    at_most: bool = True,
) -> str:
    """As :func:`line`, for a requirement we propose instead of the issue's (never in
    place of its line: both are printed)."""
    return line(what, value, unit, target, floor, at_most=at_most, kind="proposed")


def _digits(value: float) -> int:
    return 2 if abs(value) < 10 else 1 if abs(value) < 1000 else 0
