"""Floors for the targets of issue 11 that the issue's own floors leave out, measured in
the same run as the figure they stand beside (printed by ``python -m bench core`` and
``python -m bench nodes``, never in place of the issue's floors).

Each one is the least work that a requirement of the format or of durability puts on
the path, so a figure over it says how much of the gap to a target is the toolkit's own:

* **A durable Python relay** (beside "relay alone ≤ 250 µs CPU per report"): per 1 KiB
  report in the relay-alone run, the libsodium work that run makes the relay do (the
  token check, the signed stored-ack, the ciphertext and audit digests, the four frames
  through the channels: :mod:`bench.ceiling`'s work less the receipt, which that run
  does not send); one canonical decode (:func:`tisa.encoding.unpack`) of each message the
  relay receives (the ``submit_inline``, the sink's ``ack``) and one encode
  (:func:`tisa.messages.encode_message`, the relay's own canonical encoder) of each it
  sends (``stored``, ``deliver_inline``); and a share of one SQLite WAL commit writing
  the report row (:func:`wal_commit`), amortised over as many reports as the relay
  itself made durable per flush in the same run (read from its metrics,
  ``tisa_relay_commit_batch_steps``, by :class:`bench.stores.Relays`). No other
  statement, no schema check, no trio, no audit chain hash, no checkpoint: the least a
  relay that keeps every promise of ``../shared/DESIGN.md`` in Python can do. (The
  libsodium part goes through ``nacl.bindings`` as :mod:`bench.ceiling` times it, a few
  µs a call above the cffi path the toolkit takes: the floor is that much higher than
  the very least.) The commit is the relay's: ``synchronous=NORMAL`` and one fsync of the
  WAL file after each COMMIT on a descriptor of its own, the same single fsync per
  commit as ``synchronous=FULL``.
* **The serial path at a low rate** (beside "p50 ≤ 2.5 ms at 100/s"): a report handled
  alone crosses three durable steps in sequence (the originator's before it sends, the
  relay's before it forwards, the recipient's before it hands the report over), each a
  WAL commit and its flush on this disk, in a WAL reused as the stores keep it
  (:func:`fsync_wall`); the protocol core's CPU of the
  three roles (``bench core``'s per-role figures, the toolkit's own calls); and the bare
  forwarder's hop latency at the same rate. None of these can overlap another for one
  report, so their sum is a floor of the p50.

The floor of the large report (secretstream plus the BLAKE2b of the ciphertext the
format requires on each side) lives with the large-report run in :mod:`bench.core`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sqlite3
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import ceiling
from tisa import encoding as enc
from tisa.audit import AuditEvent
from tisa.messages import decode_message, encode_message
from tisa_io.durable import sync_data

__all__ = [
    "RELAY_ALONE_AUDIT",
    "RELAY_ALONE_FRAMES",
    "REPORT_CIPHERTEXT",
    "durable_relay",
    "fsync_wall",
    "latency_floor",
    "latency_floor_line",
    "relay_floor_line",
    "wal_commit",
]

# The frames of one report in the relay-alone run (bench.relay_load): the source's
# submit_inline and its stored answer, the delivery to the sink and the sink's ack.
RELAY_ALONE_FRAMES: tuple[tuple[str, str, str], ...] = (
    ("pull", "originator", "submit_inline"),
    ("push", "originator", "stored"),
    ("push", "recipient", "deliver_inline"),
    ("pull", "recipient", "ack"),
)
# Its audit entries: no receipt in that run.
RELAY_ALONE_AUDIT: tuple[AuditEvent, ...] = tuple(
    event for event in ceiling.AUDIT_ENTRIES_PER_REPORT if event is not AuditEvent.RECEIPT
)

# The relay's reports table, as relay/store.py makes it (the row a report writes).
_SCHEMA = """
CREATE TABLE reports (
    id BLOB PRIMARY KEY,
    originator TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest BLOB NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    ended TEXT,
    expires INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    key_commit BLOB,
    data BLOB
);
CREATE INDEX reports_expiry ON reports (state, expires);
"""
_INSERT = (
    "INSERT INTO reports (id, originator, size, digest, path, state, expires, stored_at, data)"
    " VALUES (?, 'seoul', ?, ?, '', 'held', ?, ?, ?)"
)
# The ciphertext of a 1 KiB report, kept in its row (the size of ceiling.make_fixture's;
# a test checks the two agree).
REPORT_CIPHERTEXT = 1321


@contextlib.contextmanager
def _database(folder: Path) -> Iterator[tuple[sqlite3.Connection, Path]]:
    """A fresh database in ``folder`` set up as the relay's (WAL, ``synchronous=NORMAL``
    with the WAL fsynced by hand after each COMMIT, no automatic checkpoint)."""
    path = folder / f"floor-{os.getpid()}-{time.monotonic_ns()}.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        db.executescript(_SCHEMA)
        yield db, Path(f"{path}-wal")
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")


def _commit_durably(db: sqlite3.Connection, wal: Path, rows: list[tuple[Any, ...]]) -> None:
    # As the relay's group commit: one transaction, COMMIT into the WAL, then a flush of
    # the WAL file on a descriptor of its own (tisa_io.durable.DurableStore.fsync_wal,
    # with the stores' own call: fdatasync where there is one), the same one sync per
    # commit that synchronous=FULL makes inside COMMIT.
    db.execute("BEGIN")
    db.executemany(_INSERT, rows)
    db.execute("COMMIT")
    fd = os.open(wal, os.O_RDONLY)
    try:
        sync_data(fd)
    finally:
        os.close(fd)


def _rows(count: int, size: int) -> list[tuple[Any, ...]]:
    return [
        (os.urandom(16), size, os.urandom(32), 2_000_000_000, 1_700_000_000, os.urandom(size))
        for _ in range(count)
    ]


def wal_commit(
    folder: Path, batch: int, commits: int = 20, row_size: int = REPORT_CIPHERTEXT
) -> dict[str, float]:
    """Commit ``commits`` batches of ``batch`` report rows (of ``row_size`` ciphertext
    bytes each) durably (:func:`_commit_durably`) in a fresh database in ``folder``;
    returns the median thread CPU µs per commit and per row (``cpu_us``,
    ``cpu_us_per_row``), the median wall ms per commit (``wall_ms``), how many rows the
    timed commits wrote (``rows``) and whether they reused the WAL file without growing
    it (``wal_reused``), as the stores' checkpoints keep it."""
    if batch < 1 or commits < 1:
        raise ValueError("batch and commits must be at least 1")
    cpu: list[float] = []
    wall: list[float] = []
    with _database(folder) as (db, wal):
        # The WAL as the stores keep it (tisa_io.durable.CHECKPOINT_STEPS): reused from
        # its start after a checkpoint, so each timed commit overwrites frames already in
        # the file (half the flush of an append on ext4). Grown by as many commits as are
        # timed, then checkpointed whole: the next transaction restarts the WAL.
        for _ in range(commits + 1):
            _commit_durably(db, wal, _rows(batch, row_size))
        db.execute("PRAGMA wal_checkpoint(RESTART)")
        _commit_durably(db, wal, _rows(1, row_size))  # the restart (and its header sync)
        grown = wal.stat().st_size
        for _ in range(commits):
            rows = _rows(batch, row_size)  # untimed
            start, cpu0 = time.perf_counter(), time.thread_time()
            _commit_durably(db, wal, rows)
            cpu.append(time.thread_time() - cpu0)
            wall.append(time.perf_counter() - start)
        (stored,) = db.execute("SELECT count(*) FROM reports").fetchone()
        reused = wal.stat().st_size == grown
    each = statistics.median(cpu) * 1e6
    return {
        "batch": batch,
        "cpu_us": each,
        "cpu_us_per_row": each / batch,
        "wall_ms": statistics.median(wall) * 1e3,
        "rows": stored - (commits + 1) * batch - 1,
        "wal_reused": reused,
    }


def fsync_wall(folder: Path, commits: int = 30) -> float:
    """The median wall milliseconds of one durable step on this disk: a WAL commit of one
    report row and the fsync that makes it durable, as each of the three processes makes
    before it lets a report go on."""
    return wal_commit(folder, 1, commits)["wall_ms"]


def _codec(fixture: ceiling.Fixture) -> Callable[[], object]:
    """One canonical decode of each frame the relay receives and one encode of each it
    sends, for one report of the relay-alone run."""
    received = [data for direction, _, _, data in fixture.frames if direction == "pull"]
    sent = [decode_message(data) for direction, _, _, data in fixture.frames if direction == "push"]
    unpack = enc.unpack

    def codec() -> None:
        for data in received:
            unpack(data)
        for message in sent:
            encode_message(message)

    return codec


def _relay_alone_fixture() -> ceiling.Fixture:
    # The sink acks each delivery (an ack of kind delivery, valid in protocol version 4
    # for a delivery with no receipt), which the end-to-end path no longer sends.
    fixture = ceiling.make_fixture(RELAY_ALONE_FRAMES)
    frames = fixture.frames
    audit = fixture.audit_entries[: len(RELAY_ALONE_AUDIT)]
    return dataclasses.replace(fixture, frames=frames, audit_entries=audit)


def durable_relay(
    folder: Path,
    reports_per_flush: float,
    *,
    rounds: int = 5,
    iterations: int = 300,
    commits: int = 20,
) -> dict[str, Any]:
    """The durable-relay floor per 1 KiB report of the relay-alone run (module doc), in
    thread CPU µs: ``libsodium_us``, ``codec_us``, ``commit_us`` (one durable commit of
    ``reports_per_flush`` rows, rounded to a whole batch of at least one, over that
    many) and their sum
    ``floor_us``. Rounds alternate the parts; the best round of each is kept."""
    if not reports_per_flush > 0:  # NaN too: the relay made no flush that could be read
        raise ValueError(f"reports per flush must be more than 0, not {reports_per_flush}")
    fixture = _relay_alone_fixture()
    # A relay flushing more often than once per report is charged one commit per report:
    # that much it needs (each report made durable before it is answered), no more.
    batch = max(1, round(reports_per_flush))
    best = {"libsodium": math.inf, "codec": math.inf, "commit": math.inf}
    for _ in range(rounds):
        calls = ceiling.relay_calls(fixture, iterations, check_receipt=False)
        best["libsodium"] = min(best["libsodium"], ceiling.per_call_us(calls, iterations))
        best["codec"] = min(best["codec"], ceiling.per_call_us(_codec(fixture), iterations))
        commit = wal_commit(folder, batch, commits, len(fixture.ciphertext))
        best["commit"] = min(best["commit"], commit["cpu_us_per_row"])
    return {
        "libsodium_us": best["libsodium"],
        "codec_us": best["codec"],
        "commit_us": best["commit"],
        "floor_us": sum(best.values()),
        "batch": batch,
        "reports_per_flush": reports_per_flush,
        "frames": [frame[2] for frame in fixture.frames],
        "audit_entries": [event.value for event in RELAY_ALONE_AUDIT],
    }


def relay_floor_line(floor: dict[str, Any], relay_cpu_us: float) -> str:
    """The line ``python -m bench nodes`` prints for :func:`durable_relay`."""
    return (
        f"  floor, a durable Python relay per 1 KiB report (relay-alone run):"
        f" {floor['floor_us']:.0f} µs = libsodium {floor['libsodium_us']:.0f}"
        f" ({', '.join(floor['frames'])}; token check, stored-ack signature, ciphertext and"
        f" {len(floor['audit_entries'])} audit digests) + canonical decode/encode"
        f" {floor['codec_us']:.0f} + a 1/{floor['batch']} share of one WAL commit with its"
        f" fsync {floor['commit_us']:.0f} (the relay made {floor['reports_per_flush']:.1f}"
        f" reports durable per flush in this run); the relay at"
        f" {relay_cpu_us / floor['floor_us']:.2f}x it"
    )


def latency_floor(fsync_ms: float, core_us: dict[str, float], hop_ms: float) -> dict[str, float]:
    """The serial path's floor in ms (module doc): three durable steps of ``fsync_ms``,
    the protocol core's CPU of the three roles (``core_us``: originator, relay,
    recipient) and the bare forwarder's hop ``hop_ms``."""
    core_ms = sum(core_us[role] for role in ("originator", "relay", "recipient")) / 1000
    return {
        "fsyncs_ms": 3 * fsync_ms,
        "core_ms": core_ms,
        "hop_ms": hop_ms,
        "floor_ms": 3 * fsync_ms + core_ms + hop_ms,
    }


def latency_floor_line(
    floor: dict[str, float], core_us: dict[str, float], p50_ms: float, target_ms: float
) -> str:
    """The line ``python -m bench nodes`` prints beside the p50 of a latency run."""
    room = target_ms - floor["floor_ms"]
    said = (
        f"leaves {room:.2f} ms above the floor"
        if room > 0
        else f"is {-room:.2f} ms below the floor: out of reach on this disk"
    )
    return (
        f"  floor, the serial path of one report: {floor['floor_ms']:.2f} ms = 3 durable"
        f" steps (WAL commit + fsync) {floor['fsyncs_ms']:.2f} + core CPU"
        f" {floor['core_ms']:.2f} (originator {core_us['originator']:.0f} + relay"
        f" {core_us['relay']:.0f} + recipient {core_us['recipient']:.0f} µs) + bare hop p50"
        f" {floor['hop_ms']:.2f}; tisa p50 {p50_ms:.2f} ms is {p50_ms / floor['floor_ms']:.2f}x"
        f" it; the {target_ms:g} ms target {said}"
    )
