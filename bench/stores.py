"""The relay set-ups the node benchmarks compare: the store, and how many relay processes.

* SQLite: one relay process on a store folder of its own in the run's folder (the
  default, and the only set-up without ``--store``);
* PostgreSQL (``--store postgresql://…`` for an existing server, a role that may create
  schemas; ``--store postgresql`` for a throwaway server brought up and stopped by the
  benchmark, as the tests do it: :mod:`tisa_testing.pg_server`), with one relay process
  and with two on one store. Every run gets an empty schema of its own.

With two relay processes the members connect to different ones (Seoul, or the load
source, to the first; Tokyo, or the sink, to the second), so every report crosses from
one process to the other through the database (the ``NOTIFY`` hint, else the poll).

CPU is read from /proc: each relay process's, and the PostgreSQL server's (its
postmaster, its backends, the ones that ended meanwhile included:
:func:`tisa_testing.pg_server.server_cpu_seconds`), when the server runs on this
machine (NaN otherwise).
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.headclock import Hold, read_holds
from bench.processes import (
    Process,
    commit_flushes,
    cpu_seconds,
    free_port,
    start_relay,
    trace_env,
    wait_port,
)
from relay.store import DB_NAME
from tisa_testing.pg_server import PgServer, postmaster_pid, server_cpu_seconds

__all__ = [
    "SQLITE",
    "THROWAWAY",
    "LockProbe",
    "PgBench",
    "Relays",
    "Setup",
    "head_held",
    "setups",
]

# The --store value that brings up a throwaway server.
THROWAWAY = "postgresql"
# Seconds between two looks of the lock probe at pg_stat_activity.
PROBE_INTERVAL = 0.002


class PgBench:
    """The PostgreSQL server of a benchmark run: an existing one (``postgresql://…``) or a
    throwaway one (``postgresql``)."""

    def __init__(self, address: str) -> None:
        self.server = PgServer(None if address == THROWAWAY else address)
        self.postmaster: int | None = None

    def start(self) -> None:
        """Bring the server up (or check the address). Raises: PgUnavailable."""
        self.server.start()
        self.postmaster = postmaster_pid(self.server.dsn)

    def new_store(self) -> str:
        """The address of an empty schema of its own (a fresh relay store)."""
        return self.server.new_schema()

    def cpu_seconds(self) -> float:
        """The server's CPU seconds so far (NaN when it is not on this machine)."""
        return float("nan") if self.postmaster is None else server_cpu_seconds(self.postmaster)

    def stop(self) -> None:
        self.server.stop()


class LockProbe:
    """How long a writing transaction is open, and how long a backend waits for a lock:
    sampled.

    A thread with a connection of its own (on the store's schema) looks every
    :data:`PROBE_INTERVAL` seconds at pg_stat_activity: whether a client backend of the
    database is inside a transaction that has an id (a writing batch; the short writes of
    the WAL-flush connection, ``wal_sync``, are left out), and whether one waits for a
    lock. Each look counts for the time to the next one; :meth:`shares` adds them up over
    a window. Being samples, these can miss what lasts less than a look's interval (the
    relays' hold of the audit chain's head is not sampled: :mod:`bench.headclock` clocks
    every one). The probe's queries cost the server a little CPU, counted in its figure:
    hence ``--lock-probe`` is opt-in.
    """

    QUERY = (
        "SELECT count(*) FILTER (WHERE backend_xid IS NOT NULL"
        " AND query NOT LIKE '%%wal_sync%%'),"
        " count(*) FILTER (WHERE wait_event_type = 'Lock')"
        " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
        " AND backend_type = 'client backend' AND datname = current_database()"
    )

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn  # the store's address: its search_path names the schema
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        # Each look: (time.monotonic(), a writing transaction open, a backend waiting for
        # a lock); the last one counts until ``stopped``.
        self.looks: list[tuple[float, bool, bool]] = []
        self.stopped = math.inf

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lock-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self._dsn, autocommit=True, connect_timeout=10) as conn:
                while not self._stop.is_set():
                    row = conn.execute(self.QUERY).fetchone()
                    assert row is not None
                    self.looks.append((time.monotonic(), bool(row[0]), bool(row[1])))
                    time.sleep(PROBE_INTERVAL)
        except BaseException as exc:  # reported by stop(), in the orchestrator's thread
            self._failure = exc

    def shares(self, start: float, end: float) -> tuple[float, float]:
        """Seconds within ``start`` to ``end`` (time.monotonic()) during which a writing
        transaction was open, and during which a backend waited for a lock."""
        writing = waiting = 0.0
        for (t, is_writing, is_waiting), until in zip(
            self.looks, [*(look[0] for look in self.looks[1:]), self.stopped], strict=True
        ):
            seconds = max(0.0, min(until, end) - max(t, start))
            writing += seconds if is_writing else 0.0
            waiting += seconds if is_waiting else 0.0
        return writing, waiting

    def stop(self) -> None:
        """Stop sampling (again: nothing). Raises: whatever ended the probe's thread early."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.stopped = time.monotonic()
        if self._failure is not None:
            raise RuntimeError(f"lock probe failed: {self._failure}") from self._failure


def head_held(holds: list[Hold], start: float, end: float) -> dict[str, float]:
    """The holds of the audit chain's head (:func:`bench.headclock.read_holds`, of every
    relay process) within ``start`` to ``end`` (time.monotonic()): ``head_held_s``, the
    seconds during which it was held (one row, held by one batch at a time: two
    processes' holds that overlap by the clocks' half round trips count once);
    ``head_taking_s``, the seconds the processes spent taking it (waiting for it, and the
    statement's round trip), added up; ``head_holds``, the holds within the window."""
    spans = sorted(
        (max(taken / 1e9, start), min(released / 1e9, end)) for _, taken, released in holds
    )
    spans = [(begin, until) for begin, until in spans if until > begin]
    held = 0.0
    reached = start  # the union of the spans so far ends here
    for begin, until in spans:
        held += max(0.0, until - max(begin, reached))
        reached = max(reached, until)
    taking = sum(
        max(0.0, min(taken / 1e9, end) - max(asked / 1e9, start)) for asked, taken, _ in holds
    )
    return {"head_held_s": held, "head_taking_s": taking, "head_holds": len(spans)}


@dataclass(frozen=True)
class Setup:
    """One relay set-up: ``key`` names it in the JSON figures, ``label`` in the output."""

    key: str
    label: str
    relays: int = 1
    server: PgBench | None = None


SQLITE = Setup("sqlite", "sqlite")


def setups(server: PgBench | None) -> list[Setup]:
    """SQLite, then (with a server) PostgreSQL with one and with two relay processes."""
    found = [SQLITE]
    if server is not None:
        found.append(Setup("pg1", "pg 1 relay", 1, server))
        found.append(Setup("pg2", "pg 2 relays", 2, server))
    return found


class Relays:
    """The relay processes of one run of a set-up, on one fresh store.

    :meth:`mark` and :meth:`measure` bracket the measured part: the relays' CPU seconds
    (each, and the server's) between the two; with ``metrics=True``, also their flushes
    to disk and the steps these made durable (read from each relay's metrics). With
    ``trace`` (a folder), each relay process traces into it (:mod:`tisa_io.trace`).
    """

    def __init__(
        self,
        run: Path,
        count: int,
        setup: Setup,
        *,
        probe: bool = False,
        metrics: bool = False,
        trace: Path | None = None,
    ) -> None:
        self.run = run
        self.setup = setup
        self.store = setup.server.new_store() if setup.server is not None else None
        self.labels = ["relay"] if setup.relays == 1 else [f"relay{n}" for n in range(setup.relays)]
        self.metrics_ports = [free_port() for _ in self.labels] if metrics else []
        ports: list[int | None] = [*self.metrics_ports] or [None] * len(self.labels)
        # On PostgreSQL with probe=True: each relay process's holds of the audit chain's
        # head, clocked by itself (bench.headclock), and the sampler of LockProbe.
        clock = probe and self.store is not None
        holds: list[Path | None] = [
            run / f"{label}.holds" if clock else None for label in self.labels
        ]
        self.holds_files = [path for path in holds if path is not None]
        self.processes: list[Process] = [
            start_relay(run, count, self.store, label, port, trace_env(trace, label), path)
            for label, port, path in zip(self.labels, ports, holds, strict=True)
        ]
        self._flushes0 = (0.0, 0.0)
        # Flushes to disk and the steps they made durable, between mark and measure,
        # summed over the relay processes (NaN without metrics).
        self.flushes = self.flushed_steps = math.nan
        self._cpu0: list[float] = []
        self._server0 = float("nan")
        self.run_cpu_s: list[float] = []  # each relay process, between mark and measure
        # No server with SQLite; NaN when the server's processes cannot be read.
        self.server_run_cpu_s = 0.0 if setup.server is None else float("nan")
        self.probe = LockProbe(self.store) if clock and self.store is not None else None

    def ports(self) -> list[int]:
        """Each relay process's port, once it listens."""
        return [
            wait_port(self.run / f"{label}.port", process, timeout=60)
            for label, process in zip(self.labels, self.processes, strict=True)
        ]

    def _flushes(self) -> tuple[float, float]:
        each = [commit_flushes(port) for port in self.metrics_ports]
        return sum(count for count, _ in each), sum(steps for _, steps in each)

    def mark(self) -> None:
        if self.metrics_ports:  # read first: the scrape's CPU is not the run's
            self._flushes0 = self._flushes()
        self._cpu0 = [cpu_seconds(p.popen.pid) for p in self.processes]
        if self.setup.server is not None:
            self._server0 = self.setup.server.cpu_seconds()
        else:
            self._server0 = 0.0
        if self.probe is not None:
            self.probe.start()

    def measure(self) -> None:
        self.run_cpu_s = [
            cpu_seconds(p.popen.pid) - cpu0
            for p, cpu0 in zip(self.processes, self._cpu0, strict=True)
        ]
        if self.setup.server is not None:
            self.server_run_cpu_s = self.setup.server.cpu_seconds() - self._server0
        if self.probe is not None:
            self.probe.stop()
        if self.metrics_ports:
            count, steps = self._flushes()
            self.flushes = count - self._flushes0[0]
            self.flushed_steps = steps - self._flushes0[1]

    def stop(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        for process in self.processes:
            process.stop()

    def _query(self, query: str) -> list[tuple[Any, ...]]:
        """Rows of ``query`` on the relays' store (SQLite in WAL mode is read beside the
        running relay; PostgreSQL through a connection of its own)."""
        if self.store is None:
            uri = f"file:{self.run / 'relay' / DB_NAME}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
                return db.execute(query).fetchall()
        import psycopg

        with psycopg.connect(self.store, connect_timeout=10) as conn:
            return conn.execute(query).fetchall()  # type: ignore[arg-type]

    def tokens_by_state(self) -> dict[str, int]:
        """The relays' tokens by state, read from their store."""
        rows = self._query("SELECT state, count(*) FROM tokens GROUP BY state")
        return {str(state): int(number) for state, number in rows}

    def one_time_used(self) -> int:
        """Tokens the relays accepted that name a one-time prekey (the others were
        wrapped to the signed prekey only: the supply ran out, or the allowance)."""
        rows = self._query(
            "SELECT count(*) FROM prekeys WHERE kind = 'one_time' AND used_by IS NOT NULL"
        )
        return int(rows[0][0])

    def one_time_account(self, recipient: str) -> dict[str, int]:
        """Where the one-time prekeys published in the run went (those handed out are
        kept, so all of them): ``published`` (``recipient``'s), of which ``used`` (named
        by an accepted token), ``held`` (handed out, named by none: the originator's
        prekey pool at the end) and ``on_hand`` (never handed out: the recipient's supply
        left); and ``others`` (the other members' own supplies, which nobody fetched:
        the originator is a member too). See docs/node-protocol.md, "Where the one-time
        prekeys go"."""
        rows = self._query(
            "SELECT owner, taken_by IS NOT NULL, used_by IS NOT NULL, count(*) FROM prekeys"
            " WHERE kind = 'one_time' GROUP BY 1, 2, 3"
        )
        account = dict.fromkeys(("published", "used", "held", "on_hand", "others"), 0)
        for owner, taken, used, count in rows:
            if owner != recipient:
                account["others"] += int(count)
                continue
            account["published"] += int(count)
            key = "used" if used else "held" if taken else "on_hand"
            account[key] += int(count)
        return account

    def figures(self) -> dict[str, Any]:
        """CPU (in all, start-up included, and between mark and measure) and peak RSS."""
        return {
            "relay_cpu_s": sum(p.cpu_s for p in self.processes),
            "relay_run_cpu_s": sum(self.run_cpu_s),
            "relay_run_cpu_each_s": self.run_cpu_s,
            "server_run_cpu_s": self.server_run_cpu_s,
            "relay_peak_mib": max(p.peak_mib for p in self.processes),
            # NaN without metrics.
            "relay_flushes": self.flushes,
            "relay_flushed_steps": self.flushed_steps,
        }

    def lock_figures(self, start: float, end: float) -> dict[str, float]:
        """With the probe, once the relay processes have stopped: the audit chain head's
        holds within ``start`` to ``end`` (time.monotonic()), every one as the relay
        processes clocked it (:func:`head_held`), and the sampled seconds of a writing
        transaction open (``writing_s``) and of a backend waiting for a lock
        (``lock_waiting_s``) within the same window. NaN each without the probe."""
        if self.probe is None:
            keys = ("head_held_s", "head_taking_s", "head_holds", "writing_s", "lock_waiting_s")
            return dict.fromkeys(keys, math.nan)
        holds = [hold for path in self.holds_files for hold in read_holds(path)]
        writing, waiting = self.probe.shares(start, end)
        return {**head_held(holds, start, end), "writing_s": writing, "lock_waiting_s": waiting}
