"""Tracing for the benchmarks: where one report's time goes, and what each process spends.

Off by default, and then nearly free: every hook in the toolkit is written ::

    if trace.enabled:
        trace.mark("R_recv", message.report)

so that a process that does not trace pays one module attribute check per hook, and
evaluates none of its arguments. ``python -m bench nodes --trace`` turns it on in the
three processes of a run and prints what the files say (:mod:`bench.tracing`).

Turning it on
-------------
* In a process, before it imports this module: the environment variable
  ``TISA_TRACE_DIR`` names a directory (created if missing); ``TISA_TRACE_NAME`` names
  the process in it (default ``process``); ``TISA_TRACE_MAX_BYTES`` replaces
  :data:`MAX_FILE_BYTES`.
* Or by a call: :func:`enable` (and :func:`disable`, which writes out what is held).

Each process appends to a file of its own, ``<name>-<pid>.trace`` in that directory.

What is recorded
----------------
* **Stamps** (:func:`mark`, :func:`mark_all`, :func:`begin`): a label, a key (a report
  id, a token id) and the CLOCK_MONOTONIC time in nanoseconds, one clock for every process
  of the machine, so stamps of several processes line up. ``mark(..., alias=other)``
  records that ``other`` names the same thing as the key (the relay sends deliveries by
  token id; the analysis maps them back to the report).
* **Counters** (:func:`count`): e.g. messages in and out of every link, by type.
* **Spans** (:func:`span_start`, :func:`span_end`): how many, and their CPU time (of the
  thread that runs them) and wall time: the COMMIT and the WAL fsync.
* **CPU per trio task** (:func:`instrument`): a :class:`trio.abc.Instrument` adds up the
  trio thread's CPU time of each task step under the task's name (the last two parts of
  its dotted name, e.g. ``Relay._handle``; a task that runs a wrapper of
  :data:`WRAPPERS`, such as ``Node._guard``, under the name of the function it wraps,
  e.g. ``Node._sender``); the time between steps (the scheduler, the I/O wait's system
  call, this instrument's own work) under ``<scheduler>``.
* **Snapshots**, every :data:`SNAPSHOT_INTERVAL` seconds (from the instrument, when the
  loop wakes) and when the file is closed: the process's CPU time (every thread) and
  the running totals of the tasks, counters and spans. Differences between two
  snapshots give the costs of the reports between them.

The stamps placed in the toolkit: the path of one report
--------------------------------------------------------
============  =========================  ==========================================
label         where                      what has happened
============  =========================  ==========================================
``S0``        ``Node.submit`` (begin)    the originator's call (its first line)
``S_sealed``  ``Node.submit``            share checked, report sealed
``S_pre``     ``Node.submit``            the recipients' prekeys taken or fetched
``S_issued``  ``Node.submit``            submission recorded, tokens issued
``S_durable`` ``Node.submit``            that batch on disk
``S_sent``    ``Node._send_pending``     its ``submit_inline`` written to the link
``S_ret``     ``Node.submit``            the call returns
``R_recv``    ``Relay._submit_inline``   the relay decoded it
``R_handled`` ``Relay._submit_inline``   stored, tokens consumed, ``stored`` queued
``R_deliver`` ``Relay._deliver``         a delivery ready, its batch on disk
``R_sent``    ``Relay._send_deliveries`` the delivery written (keyed by token id)
``T_recv``    ``Node._on_deliver``       the recipient decoded the delivery
``T_stored``  ``Node._on_deliver``       token checked, report opened, row written
``T_app``     ``bench.nodes`` (Tokyo)    the application got it from ``reports()``
============  =========================  ==========================================

The links count ``in:<type>`` and ``out:<type>`` for every message decoded and every
message queued; the group committer times each COMMIT (span ``commit``) and the store
each WAL fsync (span ``fsync``, in whichever thread runs it). :func:`instrument` is
called by ``open_node`` and ``Relay.serve_tcp``.

Limits
------
Memory is bounded: stamps are held in a list of at most :data:`BLOCK_LINES` lines, then
appended to the file; the totals are one entry per name. A file stops growing at
:data:`MAX_FILE_BYTES`: it then ends with a ``x truncated`` line and tracing stops in
that process (:data:`enabled` turns false). :class:`TraceLimits` sets all three.

The file format (version 1)
---------------------------
Text, one record per line, fields separated by one space; keys are hex for bytes::

    tisa-trace 1 <name> <pid>                 first line
    m <label> <key> <t_ns>                    a stamp
    a <key> <other key>                       the other key names the same thing
    s <t_ns> <process_cpu_ns>                 a snapshot begins; its totals follow:
    c <task name> <cpu_ns> <steps>            CPU of a trio task's steps, and their number
    n <counter> <value>
    p <span> <count> <cpu_ns> <wall_ns>
    x truncated                               the size limit was reached

:func:`read` parses a file back.

The sans-IO core (:mod:`tisa`) never imports this module; the layers above do.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

import trio

from tisa.errors import UsageError

__all__ = [
    "BLOCK_LINES",
    "ENV_DIR",
    "ENV_MAX_BYTES",
    "ENV_NAME",
    "FORMAT_VERSION",
    "MAX_FILE_BYTES",
    "SNAPSHOT_INTERVAL",
    "WRAPPERS",
    "Key",
    "Snapshot",
    "Stamp",
    "TraceFile",
    "TraceLimits",
    "begin",
    "count",
    "disable",
    "enable",
    "enabled",
    "flush",
    "instrument",
    "mark",
    "mark_all",
    "read",
    "snapshot",
    "span_end",
    "span_start",
]

ENV_DIR: Final = "TISA_TRACE_DIR"
ENV_NAME: Final = "TISA_TRACE_NAME"
ENV_MAX_BYTES: Final = "TISA_TRACE_MAX_BYTES"
FORMAT_VERSION: Final = 1

# Lines held in memory before they are appended to the file: about 240 KiB, one write()
# every 5 s or so for the originator at 100 reports/s (7 stamps of about 60 bytes per
# report, and the snapshots).
BLOCK_LINES: Final = 4096
# A process's file stops growing here: about 1.5 hours of the originator at 100
# reports/s (about 45 KiB/s); the disk of a forgotten TISA_TRACE_DIR does not fill up.
MAX_FILE_BYTES: Final = 256 * 1024 * 1024
# Seconds between two snapshots of the totals: a window of a 20 s run is then placed
# within a quarter of a second, and the snapshots are a few percent of the file.
SNAPSHOT_INTERVAL: Final = 0.25

# Tasks that run a wrapper, named after the function it wraps instead: the wrapper's
# short name -> its argument that holds the wrapped function. Node._guard runs every
# task of a member's connection.
WRAPPERS: Final[dict[str, str]] = {"Node._guard": "task"}

_TRUNCATED: Final = "x truncated\n"

log = logging.getLogger(__name__)

Key = bytes | str | int

#: Whether tracing is on in this process; the hooks check it before calling anything.
enabled: bool = False


@dataclass(frozen=True)
class TraceLimits:
    """The limits of one process's tracing (see :data:`BLOCK_LINES`,
    :data:`MAX_FILE_BYTES`, :data:`SNAPSHOT_INTERVAL`)."""

    block_lines: int = BLOCK_LINES
    max_bytes: int = MAX_FILE_BYTES
    snapshot_interval: float = SNAPSHOT_INTERVAL

    def __post_init__(self) -> None:
        if self.block_lines < 1:
            raise UsageError("block_lines must be at least 1")
        if self.max_bytes < 256:
            raise UsageError("max_bytes must leave room for the header (at least 256)")
        if not self.snapshot_interval > 0:
            raise UsageError("snapshot_interval must be positive")


class _Tracer:
    """One process's trace: the lines held, the totals, the file."""

    def __init__(self, directory: Path, name: str, limits: TraceLimits) -> None:
        if not name or any(c.isspace() for c in name) or "/" in name:
            raise UsageError(f"a trace name without spaces or slashes, not {name!r}")
        directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.limits = limits
        self.path = directory / f"{name}-{os.getpid()}.trace"
        self.lines: list[str] = [f"tisa-trace {FORMAT_VERSION} {name} {os.getpid()}\n"]
        self.written = 0
        self.stopped = False
        # Task name -> [trio thread CPU ns, steps] (lists: the instrument adds to them in
        # place, one lookup per step).
        self.tasks: dict[str, list[int]] = {}
        self.counters: Counter[str] = Counter()
        self.spans: dict[str, list[int]] = {}  # name -> [count, cpu ns, wall ns]
        self.next_snapshot = 0.0
        # Spans may end in worker threads (a WAL fsync); flush may run in any thread.
        # Reentrant: the SIGTERM handler may run in the main thread while it holds it.
        self.lock = threading.RLock()
        self.flushing = False
        self.terminate_after_flush = False  # SIGTERM came during a flush

    def add(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= self.limits.block_lines:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            lines, self.lines = self.lines, []
            if not lines or self.stopped:
                return
            data = "".join(lines).encode()
            room = self.limits.max_bytes - self.written - len(_TRUNCATED)
            if len(data) > room:
                # Whole lines only, then the mark; nothing more is written.
                cut = data.rfind(b"\n", 0, max(room, 0) + 1) + 1
                data = data[:cut] + _TRUNCATED.encode()
                self.stopped = True
            self.flushing = True
            try:
                with open(self.path, "ab") as out:
                    out.write(data)
                self.written += len(data)
            except OSError as exc:
                # Tracing must not take the process down (a full disk): it stops.
                log.warning("tracing stopped: cannot write %s: %s", self.path, exc)
                self.stopped = True
            finally:
                self.flushing = False
        if self.stopped and _tracer is self:
            global enabled
            enabled = False
        if self.terminate_after_flush:
            self.terminate_after_flush = False
            _terminate()

    def snapshot(self) -> None:
        self.next_snapshot = time.monotonic() + self.limits.snapshot_interval
        lines = [f"s {time.monotonic_ns()} {time.process_time_ns()}\n"]
        lines += [f"c {n} {cpu} {steps}\n" for n, (cpu, steps) in list(self.tasks.items())]
        lines += [f"n {n} {v}\n" for n, v in self.counters.items()]
        with self.lock:
            lines += [f"p {n} {c} {cpu} {wall}\n" for n, (c, cpu, wall) in self.spans.items()]
        self.lines += lines
        if len(self.lines) >= self.limits.block_lines:
            self.flush()

    def close(self) -> None:
        self.snapshot()
        self.flush()


_tracer: _Tracer | None = None
# A stamp waiting for its key (begin): the next mark of the same context names it.
_pending: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "tisa_trace_pending", default=None
)
# Spans started in this thread: name -> (thread CPU ns, monotonic ns).
_spans = threading.local()


def _word(text: str) -> str:
    # One field of a line: no spaces (a task may be named "Node.reports (abandoned)").
    return "_".join(text.split()) or "_"


def _key(key: Key) -> str:
    return key.hex() if isinstance(key, bytes) else _word(str(key))


def enable(
    directory: str | os.PathLike[str], name: str = "process", *, limits: TraceLimits | None = None
) -> Path:
    """Turn tracing on in this process, into ``directory/<name>-<pid>.trace``.

    Ends a trace already on (its file is written out first). Until :func:`disable` or
    the process's exit, the held lines are written out in blocks; on SIGTERM too when
    the process had left that signal at its default (the handler writes the file out,
    then lets the signal end the process as before).

    Args:
        directory: where the file goes (created if missing).
        name: the process's name in the file's name and first line (no spaces).
        limits: :class:`TraceLimits` (default: the module's constants).

    Returns:
        The path of the file.

    Raises:
        UsageError: a name with spaces or slashes, or bad limits.
        OSError: the directory cannot be created.
    """
    global _tracer, enabled
    disable()
    tracer = _Tracer(Path(directory), name, limits or TraceLimits())
    _tracer = tracer
    enabled = True
    tracer.snapshot()
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)
    return tracer.path


def disable() -> None:
    """Turn tracing off: a last snapshot, and everything held written out. Nothing if it
    is off."""
    global _tracer, enabled
    tracer, _tracer = _tracer, None
    enabled = False
    if tracer is not None:
        tracer.close()
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is _on_sigterm
    ):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    tracer = _tracer
    if tracer is not None and tracer.flushing:
        # In the middle of a write: that write finishes, then this.
        tracer.terminate_after_flush = True
        return
    _terminate()


def _terminate() -> None:
    # Write everything out, then end the process as SIGTERM would have.
    disable()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def flush() -> None:
    """Append the lines held to the file now (they are otherwise written a block at a
    time, and at :func:`disable`)."""
    if _tracer is not None:
        _tracer.flush()


def snapshot() -> None:
    """Record the totals now (the instrument does it every :data:`SNAPSHOT_INTERVAL`
    seconds while the trio loop runs)."""
    if _tracer is not None:
        _tracer.snapshot()


def mark(label: str, key: Key, *, t: int | None = None, alias: Key | None = None) -> None:
    """Stamp ``label`` for ``key`` (a stamp waiting from :func:`begin` in this context
    gets the key too).

    Args:
        label: the point of the path (no spaces).
        key: what passes there: bytes (written in hex), a str (its spaces written as
            underscores), an int.
        t: the time, CLOCK_MONOTONIC nanoseconds (default: now).
        alias: another key naming the same thing (recorded once, beside the stamp).
    """
    tracer = _tracer
    if tracer is None:
        return
    now = time.monotonic_ns() if t is None else t
    name = _key(key)
    pending = _pending.get()
    if pending is not None:
        _pending.set(None)
        tracer.add(f"m {pending[0]} {name} {pending[1]}\n")
    if alias is not None:
        tracer.add(f"a {name} {_key(alias)}\n")
    tracer.add(f"m {label} {name} {now}\n")


def mark_all(label: str, keys: Iterable[Key]) -> None:
    """Stamp ``label`` for each of ``keys``, all at the same time (one write of several
    messages)."""
    now = time.monotonic_ns()
    for key in keys:
        mark(label, key, t=now)


def begin(label: str) -> None:
    """Stamp ``label`` now, for a key not known yet: the next :func:`mark` of this
    context (this trio task, or this thread) gives it its key. A later ``begin`` in the
    same context replaces a stamp still waiting."""
    if _tracer is not None:
        _pending.set((label, time.monotonic_ns()))


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to counter ``name`` (no spaces)."""
    if _tracer is not None:
        _tracer.counters[name] += n


def span_start(name: str) -> None:
    """Start span ``name`` in this thread (a later start of the same name replaces it)."""
    if _tracer is not None:
        _spans.__dict__[name] = (time.thread_time_ns(), time.monotonic_ns())


def span_end(name: str) -> None:
    """End span ``name`` of this thread: one more of it, with its thread CPU time and
    wall time. Nothing if it was not started in this thread (or started before
    tracing was turned on)."""
    started = _spans.__dict__.pop(name, None)
    tracer = _tracer
    if tracer is None or started is None:
        return
    cpu, wall = time.thread_time_ns() - started[0], time.monotonic_ns() - started[1]
    with tracer.lock:
        totals = tracer.spans.setdefault(name, [0, 0, 0])
        totals[0] += 1
        totals[1] += cpu
        totals[2] += wall


# --- CPU per trio task -------------------------------------------------------------------


def _short(dotted: str) -> str:
    return _word(".".join(dotted.rsplit(".", 2)[-2:]))


def _task_name(task: trio.lowlevel.Task) -> str:
    name = _short(task.name)
    argument = WRAPPERS.get(name)
    if argument is not None:
        frame = getattr(task.coro, "cr_frame", None)
        wrapped = frame.f_locals.get(argument) if frame is not None else None
        qualname = getattr(wrapped, "__qualname__", None)
        if isinstance(qualname, str):
            return _short(qualname)
    return name


_thread_time_ns = time.thread_time_ns


class _CpuByTask(trio.abc.Instrument):
    """Adds the trio thread's CPU time of each task step to the task's name; the time
    between steps to ``<scheduler>``; snapshots the totals now and then.

    Called twice per step of every task: kept to one clock read and one lookup each.
    """

    def __init__(self, tracer: _Tracer) -> None:
        self.tracer = tracer
        self.totals: dict[trio.lowlevel.Task, list[int]] = {}  # the task's name's
        self.scheduler = tracer.tasks.setdefault("<scheduler>", [0, 0])
        self.exited: trio.lowlevel.Task | None = None  # in its last step
        # Installed during a step: that step counts from here.
        self.step_started = self.idle_from = _thread_time_ns()

    def _totals(self, task: trio.lowlevel.Task) -> list[int]:
        totals = self.totals[task] = self.tracer.tasks.setdefault(_task_name(task), [0, 0])
        return totals

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        # Named before its first step: a wrapper's arguments are in its frame already,
        # and a task that ends in its first step has no frame after it.
        self._totals(task)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        now = _thread_time_ns()
        self.scheduler[0] += now - self.idle_from
        self.step_started = now

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        now = _thread_time_ns()
        totals = self.totals.get(task) or self._totals(task)
        totals[0] += now - self.step_started
        totals[1] += 1
        self.idle_from = now
        if task is self.exited:
            del self.totals[task]
            self.exited = None

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        # Called inside the task's last step: its name is dropped after the step.
        self.exited = task

    def after_io_wait(self, timeout: float) -> None:
        tracer = self.tracer
        if tracer is not _tracer:
            # Tracing was turned off (or on again, into another file): done here.
            with contextlib.suppress(KeyError):
                trio.lowlevel.remove_instrument(self)
        elif time.monotonic() >= tracer.next_snapshot:
            tracer.snapshot()


_INSTRUMENTED: trio.lowlevel.RunVar[_CpuByTask | None] = trio.lowlevel.RunVar(
    "tisa_trace_instrument", default=None
)


def instrument() -> None:
    """Count the CPU time of each trio task of this run (once per run; nothing if tracing
    is off). Call it from inside ``trio.run``."""
    tracer = _tracer
    if tracer is None:
        return
    current = _INSTRUMENTED.get()
    if current is not None and current.tracer is tracer:
        return
    if current is not None:
        with contextlib.suppress(KeyError):  # it may have removed itself
            trio.lowlevel.remove_instrument(current)
    added = _CpuByTask(tracer)
    trio.lowlevel.add_instrument(added)
    _INSTRUMENTED.set(added)


# --- reading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stamp:
    """One stamp of a file: ``label`` for ``key`` (hex for bytes) at ``t`` ns."""

    label: str
    key: str
    t: int


@dataclass
class Snapshot:
    """The totals at ``t`` (CLOCK_MONOTONIC ns): the process's CPU ns (every thread),
    CPU ns and steps per trio task, counters, spans (count, CPU ns, wall ns)."""

    t: int
    process_cpu: int
    tasks: dict[str, tuple[int, int]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    spans: dict[str, tuple[int, int, int]] = field(default_factory=dict)


@dataclass
class TraceFile:
    """What one process's file holds (:func:`read`)."""

    name: str
    pid: int
    stamps: list[Stamp] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # other key -> key
    snapshots: list[Snapshot] = field(default_factory=list)
    truncated: bool = False


def read(path: str | os.PathLike[str]) -> TraceFile:
    """Parse a trace file.

    Raises:
        UsageError: not a trace file of this format version, or a malformed line (its
            number given).
        OSError: the file cannot be read.
    """
    with open(path, encoding="utf-8") as lines:
        head = lines.readline().split()
        if len(head) != 4 or head[0] != "tisa-trace" or head[1] != str(FORMAT_VERSION):
            raise UsageError(f"{os.fspath(path)}: not a version {FORMAT_VERSION} trace file")
        found = TraceFile(name=head[2], pid=int(head[3]))
        current: Snapshot | None = None
        for number, line in enumerate(lines, start=2):
            fields = line.split()
            try:
                kind = fields[0]
                if kind == "m":
                    found.stamps.append(Stamp(fields[1], fields[2], int(fields[3])))
                elif kind == "a":
                    found.aliases[fields[2]] = fields[1]
                elif kind == "s":
                    current = Snapshot(int(fields[1]), int(fields[2]))
                    found.snapshots.append(current)
                elif kind == "x":
                    found.truncated = True
                elif current is None:
                    raise ValueError("totals before a snapshot")
                elif kind == "c":
                    current.tasks[fields[1]] = (int(fields[2]), int(fields[3]))
                elif kind == "n":
                    current.counters[fields[1]] = int(fields[2])
                elif kind == "p":
                    current.spans[fields[1]] = (int(fields[2]), int(fields[3]), int(fields[4]))
                else:
                    raise ValueError(f"unknown record {kind!r}")
            except (IndexError, ValueError) as exc:
                raise UsageError(f"{os.fspath(path)}, line {number}: {exc}") from None
    return found


def _from_environment() -> None:
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return
    limits = TraceLimits()
    if os.environ.get(ENV_MAX_BYTES):
        try:
            limits = TraceLimits(max_bytes=int(os.environ[ENV_MAX_BYTES]))
        except ValueError:
            raise UsageError(f"{ENV_MAX_BYTES} must be a number of bytes") from None
    enable(directory, os.environ.get(ENV_NAME) or "process", limits=limits)


atexit.register(disable)
_from_environment()
