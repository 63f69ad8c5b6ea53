"""What ``python -m bench nodes --trace`` prints: the path of one report, segment by
segment, and what each process spends per report, from the files of :mod:`tisa_io.trace`.

The three processes of a traced run write one file each (``seoul-<pid>.trace``,
``relay-<pid>.trace``, ``tokyo-<pid>.trace``); :func:`analyse` reads a folder of them:

* **the path**: every report that has each stamp of :data:`PATH` (the relay's stamps by
  token id are mapped back to the report through the alias it records), ordered by its
  first stamp; the first :data:`WARMUP_SHARE` and the last :data:`TAIL_SHARE` of them
  are left out (connections, caches and the prekey pool warm up; the run winds down).
  For each step, the time from the previous stamp to it (p50, p90, p99, max, mean, in
  ms): which process, which step. Two steps may come out negative on some reports: ``S_sent`` and
  ``R_sent`` are stamped when the write returns, and the peer may have read the message
  before the writer's task runs again. Then the whole path (``S0`` to ``T_app``) and
  the originator's ``submit`` call (``S0`` to ``S_ret``); and the whole path once more
  over every complete report of the run, warm-up and wind-down included (the bench's
  own p99 is over all of them: a tail outside the middle shows here);
* **each process, per report**, over the same middle of the run: between the last
  snapshot at or before the first kept report's ``S0`` and the first one at or after
  the last kept report's ``T_app``, divided by the reports that entered that process
  meanwhile (their first stamp in its file): the process's CPU (every thread), the trio
  thread's CPU by task and between steps (``<scheduler>``), COMMITs, WAL fsyncs and
  checkpoints run in line on the event loop (how many, CPU and wall time each),
  messages in and out by type.

Percentiles interpolate between the nearest values (``statistics.quantiles``,
inclusive method).

A folder traced otherwise (``TISA_TRACE_DIR`` set for any of the processes) is read the
same way: ``python -m bench.tracing FOLDER [--json FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tisa_io import trace

__all__ = [
    "PATH",
    "TAIL_SHARE",
    "TOP_TASKS",
    "WARMUP_SHARE",
    "analyse",
    "analyse_files",
    "lines",
    "load",
    "main",
    "paths",
]

# The stamps of one report's path in their nominal order: label, where the step from
# the previous stamp runs, what it did (see tisa_io.trace for where each is taken).
PATH: tuple[tuple[str, str, str], ...] = (
    ("S0", "Seoul", "submit called"),
    ("S_sealed", "Seoul", "share checked, report sealed"),
    ("S_pre", "Seoul", "the recipient's prekeys taken (pool) or fetched"),
    ("S_issued", "Seoul", "submission recorded, token issued (open batch)"),
    ("S_durable", "Seoul", "that batch committed and fsynced"),
    ("S_sent", "Seoul", "the sender wrote the submit_inline"),
    ("R_recv", "wire+relay", "the relay read and decoded it"),
    ("R_handled", "relay", "stored, token consumed, stored answer queued"),
    ("R_deliver", "relay", "the delivery found, its batch on disk"),
    ("R_sent", "relay", "the deliver_inline written"),
    ("T_recv", "wire+Tokyo", "Tokyo read and decoded it"),
    ("T_stored", "Tokyo", "token checked, report opened, inbox row written"),
    ("T_app", "Tokyo", "its batch on disk, handed to the application"),
)
# Left out of every figure: the first fifth of the reports (connections, caches and
# the prekey pool warming up) and the last tenth (the run winding down).
WARMUP_SHARE = 0.2
TAIL_SHARE = 0.1
# Tasks printed per process, the most expensive first (the JSON has them all).
TOP_TASKS = 10


@dataclass(frozen=True)
class _Window:
    keys: list[str]
    start: int  # ns: the first kept report's S0
    end: int  # ns: the last kept report's T_app


def load(folder: str | Path) -> list[trace.TraceFile]:
    """Every trace file in ``folder``, by name."""
    return [trace.read(path) for path in sorted(Path(folder).glob("*.trace"))]


def paths(files: list[trace.TraceFile]) -> dict[str, dict[str, int]]:
    """Report key -> label -> time (ns), over every file, aliases resolved; the first
    stamp of a label for a key counts."""
    aliases: dict[str, str] = {}
    for found in files:
        aliases.update(found.aliases)
    stamps: dict[str, dict[str, int]] = {}
    for found in files:
        for stamp in found.stamps:
            key = aliases.get(stamp.key, stamp.key)
            stamps.setdefault(key, {}).setdefault(stamp.label, stamp.t)
    return stamps


def _quantiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"), values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values),
            "mean": statistics.fmean(values)}  # fmt: skip


def _window(stamps: dict[str, dict[str, int]]) -> _Window | None:
    labels = [label for label, _, _ in PATH]
    complete = sorted(
        (key for key, mine in stamps.items() if all(label in mine for label in labels)),
        key=lambda key: stamps[key]["S0"],
    )
    if not complete:
        return None
    first = int(len(complete) * WARMUP_SHARE)
    last = len(complete) - int(len(complete) * TAIL_SHARE)
    keys = complete[first:last] or complete
    return _Window(
        keys=keys,
        start=min(stamps[key]["S0"] for key in keys),
        end=max(stamps[key]["T_app"] for key in keys),
    )


def _ms(stamps: dict[str, dict[str, int]], keys: list[str], a: str, b: str) -> list[float]:
    return [(stamps[key][b] - stamps[key][a]) / 1e6 for key in keys if a in stamps[key]]


def _process(found: trace.TraceFile, aliases: dict[str, str], window: _Window) -> dict[str, Any]:
    """One process's costs per report over ``window`` (empty if its snapshots do not
    bracket a report)."""
    snapshots = sorted(found.snapshots, key=lambda s: s.t)
    if len(snapshots) < 2:
        return {}
    before = [s for s in snapshots if s.t <= window.start]
    after = [s for s in snapshots if s.t >= window.end]
    a = before[-1] if before else snapshots[0]
    b = after[0] if after else snapshots[-1]
    entered: dict[str, int] = {}
    for stamp in found.stamps:
        key = aliases.get(stamp.key, stamp.key)
        entered[key] = min(entered.get(key, stamp.t), stamp.t)
    reports = sum(1 for t in entered.values() if a.t <= t < b.t)
    if reports == 0 or b.t <= a.t:
        return {}
    us = 1e-3 / reports
    tasks = {}
    for name, (cpu, steps) in b.tasks.items():
        cpu0, steps0 = a.tasks.get(name, (0, 0))
        if cpu > cpu0 or steps > steps0:
            tasks[name] = {"cpu_us": (cpu - cpu0) * us, "steps": (steps - steps0) / reports}
    spans = {}
    for name, (n, cpu, wall) in b.spans.items():
        n0, cpu0, wall0 = a.spans.get(name, (0, 0, 0))
        if n > n0:
            spans[name] = {
                "per_report": (n - n0) / reports,
                "cpu_us_each": (cpu - cpu0) / (n - n0) / 1e3,
                "wall_us_each": (wall - wall0) / (n - n0) / 1e3,
            }
    messages: dict[str, dict[str, float]] = {"in": {}, "out": {}}
    for name, value in b.counters.items():
        direction, _, kind = name.partition(":")
        moved = value - a.counters.get(name, 0)
        if direction in messages and moved:
            messages[direction][kind] = moved / reports
    trio_us = sum(task["cpu_us"] for task in tasks.values())
    cpu_us = (b.process_cpu - a.process_cpu) * us
    return {
        "pid": found.pid,
        "reports": reports,
        "seconds": (b.t - a.t) / 1e9,
        "cpu_us": cpu_us,
        "trio_thread_us": trio_us,
        "other_threads_us": cpu_us - trio_us,
        "tasks": dict(sorted(tasks.items(), key=lambda item: -item[1]["cpu_us"])),
        "spans": spans,
        "messages": {d: dict(sorted(m.items())) for d, m in messages.items()},
        "truncated": found.truncated,
    }


def analyse_files(files: list[trace.TraceFile]) -> dict[str, Any]:
    """The figures of :func:`analyse`, from files already read."""
    stamps = paths(files)
    window = _window(stamps)
    result: dict[str, Any] = {
        "reports": sum(1 for mine in stamps.values() if "S0" in mine),
        "complete": 0,
        "kept": 0,
        "segments": [],
        "processes": {},
        "truncated": any(found.truncated for found in files),
    }
    if window is None:
        return result
    keys = window.keys
    result["complete"] = sum(
        1 for mine in stamps.values() if all(label in mine for label, _, _ in PATH)
    )
    result["kept"] = len(keys)
    for (previous, _, _), (label, where, what) in itertools.pairwise(PATH):
        result["segments"].append(
            {"from": previous, "to": label, "where": where, "what": what,
             **_quantiles(_ms(stamps, keys, previous, label))}
        )  # fmt: skip
    result["path"] = _quantiles(_ms(stamps, keys, "S0", "T_app"))
    # Every complete report, the warm-up and the wind-down too: where a tail the middle
    # leaves out shows (the bench's own p99 is over every report).
    every = [key for key, mine in stamps.items() if all(label in mine for label, _, _ in PATH)]
    result["path_every"] = _quantiles(_ms(stamps, every, "S0", "T_app"))
    returned = [key for key in keys if "S_ret" in stamps[key]]
    if returned:
        result["submit_call"] = _quantiles(_ms(stamps, returned, "S0", "S_ret"))
    aliases: dict[str, str] = {}
    for found in files:
        aliases.update(found.aliases)
    for found in files:
        name = found.name if found.name not in result["processes"] else f"{found.name}-{found.pid}"
        result["processes"][name] = _process(found, aliases, window)
    return result


def analyse(folder: str | Path) -> dict[str, Any]:
    """The figures of a folder of trace files (see the module docstring), JSON-ready:
    ``reports`` (with an ``S0``), ``complete`` (with every stamp of :data:`PATH`),
    ``kept`` (the middle of the run), ``segments`` (each step's ``p50``, ``p90``,
    ``p99``, ``max`` and ``mean`` in ms), ``path`` and ``submit_call`` (the same),
    ``path_every`` (the path over every complete report, warm-up and wind-down too), and
    ``processes`` (name -> costs per report; empty when its snapshots bracket no
    report)."""
    return analyse_files(load(folder))


def _figures(figures: dict[str, float]) -> str:
    return "  ".join(f"{figures[key]:7.3f}" for key in ("p50", "p90", "p99", "max", "mean"))


def _messages(counts: dict[str, float]) -> str:
    return ", ".join(f"{kind} {n:.2f}" for kind, n in counts.items()) or "none"


def lines(result: dict[str, Any]) -> list[str]:
    """The analysis as printed by ``bench nodes --trace``."""
    out = [
        f"  trace: {result['reports']} reports, {result['complete']} with every stamp,"
        f" {result['kept']} in the middle of the run (the first {WARMUP_SHARE:.0%} and"
        f" the last {TAIL_SHARE:.0%} left out)"
        + ("; a file reached its size limit" if result["truncated"] else "")
    ]
    if not result["kept"]:
        return [*out, "    no report has every stamp of the path"]
    out.append(f"    {'path of one report, ms':58}    p50      p90      p99      max     mean")
    for step in result["segments"]:
        name = f"{step['from']} -> {step['to']}"
        out.append(f"    {name:22} {step['where']:10} {step['what']:50} {_figures(step)}")
    for key, what in (
        ("path", "S0 -> T_app, the whole path"),
        ("submit_call", "S0 -> S_ret, Seoul's submit call"),
        ("path_every", "S0 -> T_app, every report of the run (warm-up, wind-down too)"),
    ):
        if key in result:
            out.append(f"    {what:84} {_figures(result[key])}")
    out.append("    per report, each process over the same middle of the run:")
    for name, costs in result["processes"].items():
        if not costs:
            out.append(f"    {name}: no two snapshots around a report of the window")
            continue
        out.append(f"    {name}: CPU {costs['cpu_us']:.0f} µs ({costs['reports']} reports in"
                   f" {costs['seconds']:.1f} s): trio thread {costs['trio_thread_us']:.0f} µs,"
                   f" other threads {costs['other_threads_us']:.0f} µs")  # fmt: skip
        tasks = list(costs["tasks"].items())
        shown = ", ".join(f"{task} {figures['cpu_us']:.0f} ({figures['steps']:.1f})"
                          for task, figures in tasks[:TOP_TASKS])  # fmt: skip
        rest = sum(figures["cpu_us"] for _, figures in tasks[TOP_TASKS:])
        out.append(f"      by task, µs (steps): {shown}"
                   + (f", {len(tasks) - TOP_TASKS} others {rest:.0f}" if rest else ""))  # fmt: skip
        durable = []
        for span, label in (
            ("commit", "COMMITs"),
            ("fsync", "WAL fsyncs"),
            ("checkpoint", "in-line checkpoints"),
        ):
            if span in costs["spans"]:
                figures = costs["spans"][span]
                durable.append(f"{label} {figures['per_report']:.2f} (each CPU"
                               f" {figures['cpu_us_each']:.0f} µs, wall"
                               f" {figures['wall_us_each']:.0f} µs)")  # fmt: skip
        out.append("      " + ("; ".join(durable) or "no COMMIT, no WAL fsync"))
        out.append(f"      messages in: {_messages(costs['messages']['in'])}")
        out.append(f"      messages out: {_messages(costs['messages']['out'])}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.tracing FOLDER [--json FILE]``: print the analysis of a folder of
    trace files (and write it as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    files = load(args.folder)
    if not files:
        print(f"error: no .trace file in {args.folder}", file=sys.stderr)
        return 2
    result = analyse_files(files)
    for line in lines(result):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
