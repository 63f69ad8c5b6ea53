"""The floors the benchmarks print beside the targets (bench/floors.py, the large report's
floors in bench/core.py) and the target lines' verdicts (bench/targets.py).

No speed is asserted (the machines are shared): only that each floor does the work it
claims, in the amounts it claims, and that every printed verdict follows from the figure
and the target printed on the same line.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest

from bench import ceiling, core, floors, targets
from tisa.keys import Hash, digest
from tisa.limits import CHUNK_SIZE
from tisa_io import durable

# "  target what: 12.3 µs (target <= 250 µs, NOT met); floor ...": the figure, the
# comparison, the bound and the verdict of one printed target or proposed line.
VERDICT_LINE = re.compile(
    r"^  (?P<kind>target|proposed) (?P<what>.+?): (?P<value>-?[\d.]+) (?P<unit>\S+)"
    r" \((?P=kind) (?P<sign><=|>=) (?P<bound>[\d.]+) (?P=unit), (?P<verdict>met|NOT met)\);"
    r" floor .+; load ",
)


def verdict_lines(out: str) -> list[re.Match[str]]:
    """Every target and proposed line of ``out``, each checked: its verdict is what its
    own figure and bound say (so a line can never read "met" for a figure over it)."""
    found = [match for line in out.splitlines() if (match := VERDICT_LINE.match(line))]
    for match in found:
        value, bound = float(match["value"]), float(match["bound"])
        met = value <= bound if match["sign"] == "<=" else value >= bound
        assert match["verdict"] == ("met" if met else "NOT met"), match.group(0)
    return found


# --- the verdicts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "target", "at_most", "said"),
    [
        (249.0, 250.0, True, "met"),
        (250.0, 250.0, True, "met"),
        (251.0, 250.0, True, "NOT met"),
        (0.81, 0.8, False, "met"),
        (0.79, 0.8, False, "NOT met"),
        # Judged as printed: 0.7996 shows as 0.80, so it must read met, not contradict it.
        (0.7996, 0.8, False, "met"),
        (250.04, 250.0, True, "met"),
        (250.06, 250.0, True, "NOT met"),
    ],
)
@pytest.mark.parametrize("printer", [targets.line, targets.proposed_line])
def test_a_line_says_met_exactly_when_its_printed_figure_meets_its_bound(
    printer: Any, value: float, target: float, at_most: bool, said: str
) -> None:
    text = printer("what", value, "x", target, "a floor", at_most=at_most)
    (match,) = verdict_lines(text)
    assert match["verdict"] == said
    assert match["kind"] == ("target" if printer is targets.line else "proposed")


def test_a_proposed_line_never_reads_as_a_target() -> None:
    text = targets.proposed_line("relay over its floor", 4.2, "x", 1.5, "the floor")
    assert text.startswith("  proposed relay over its floor: 4.20 x (proposed <= 1.5 x, NOT met)")
    assert "target" not in text


# --- the durable relay -----------------------------------------------------------------------


def test_the_report_row_is_the_size_of_a_1_kib_reports_ciphertext() -> None:
    assert len(ceiling.make_fixture().ciphertext) == floors.REPORT_CIPHERTEXT


def test_wal_commit_writes_every_row_and_flushes_the_wal_once_per_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_sync = floors.sync_data

    def sync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_sync(fd)

    monkeypatch.setattr(floors, "sync_data", sync)
    figures = floors.wal_commit(tmp_path, batch=7, commits=3, row_size=100)
    assert figures["rows"] == 21 and figures["batch"] == 7
    assert figures["cpu_us_per_row"] == pytest.approx(figures["cpu_us"] / 7)
    assert figures["cpu_us"] > 0 and figures["wall_ms"] > 0
    # One flush of the WAL file for each commit: the timed ones, the four untimed ones
    # that grow the WAL, and the one that restarts it.
    assert len(synced) == 3 + 4 + 1 and all(path.endswith(".db-wal") for path in synced)
    assert list(tmp_path.iterdir()) == []  # the database is removed afterwards


def test_wal_commit_times_commits_that_overwrite_a_reused_wal(tmp_path: Path) -> None:
    # As the stores' checkpoints keep it (tisa_io.durable.CHECKPOINT_STEPS): the timed
    # commits write over frames already in the file, which does not grow.
    figures = floors.wal_commit(tmp_path, batch=3, commits=5, row_size=floors.REPORT_CIPHERTEXT)
    assert figures["wal_reused"] is True and figures["rows"] == 15


def test_the_floor_flushes_the_wal_as_the_stores_do() -> None:
    assert floors.sync_data is durable.sync_data


def test_wal_commit_runs_the_relays_journal_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    real_connect = sqlite3.connect

    class Spy(sqlite3.Connection):
        def close(self) -> None:
            seen["journal"] = self.execute("PRAGMA journal_mode").fetchone()[0]
            seen["synchronous"] = self.execute("PRAGMA synchronous").fetchone()[0]
            query = "SELECT count(*), min(length(data)) FROM reports"
            seen["rows"] = self.execute(query).fetchone()
            super().close()

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(*args, **kwargs, factory=Spy)

    monkeypatch.setattr(sqlite3, "connect", connect)
    floors.wal_commit(tmp_path, batch=2, commits=2, row_size=floors.REPORT_CIPHERTEXT)
    # WAL, synchronous=NORMAL (1) with the WAL fsynced by hand, as relay/store.py runs.
    assert seen["journal"] == "wal" and seen["synchronous"] == 1
    assert seen["rows"] == (11, floors.REPORT_CIPHERTEXT)


@pytest.mark.parametrize(("batch", "commits"), [(0, 1), (1, 0)])
def test_wal_commit_refuses_an_empty_batch(tmp_path: Path, batch: int, commits: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        floors.wal_commit(tmp_path, batch, commits)


def test_the_durable_relay_floor_counts_the_relay_alone_runs_work(tmp_path: Path) -> None:
    floor = floors.durable_relay(tmp_path, 6.4, rounds=1, iterations=5, commits=2)
    assert floor["frames"] == ["submit_inline", "stored", "deliver_inline", "ack"]
    assert floor["audit_entries"] == ["stored", "released", "forwarded", "acknowledged"]
    assert floor["batch"] == 6 and floor["reports_per_flush"] == 6.4
    parts = [floor[part] for part in ("libsodium_us", "codec_us", "commit_us")]
    assert all(part > 0 for part in parts)
    assert floor["floor_us"] == pytest.approx(sum(parts))
    line = floors.relay_floor_line(floor, relay_cpu_us=3 * floor["floor_us"])
    assert "a 1/6 share of one WAL commit" in line and "the relay at 3.00x it" in line


@pytest.mark.parametrize("per_flush", [0.0, math.nan])
def test_the_durable_relay_floor_needs_the_relays_batches(tmp_path: Path, per_flush: float) -> None:
    with pytest.raises(ValueError, match="reports per flush"):
        floors.durable_relay(tmp_path, per_flush, rounds=1, iterations=1)


def test_a_relay_flushing_more_than_once_per_report_is_charged_one_commit_each(
    tmp_path: Path,
) -> None:
    floor = floors.durable_relay(tmp_path, 0.4, rounds=1, iterations=2, commits=2)
    assert floor["batch"] == 1 and floor["commit_us"] > 0


def test_the_relay_alone_codec_decodes_what_arrives_and_encodes_what_leaves() -> None:
    fixture = floors._relay_alone_fixture()
    directions = [(direction, kind) for direction, _, kind, _ in fixture.frames]
    assert directions == [
        ("pull", "submit_inline"), ("push", "stored"), ("push", "deliver_inline"), ("pull", "ack"),
    ]  # fmt: skip
    assert len(fixture.audit_entries) == len(floors.RELAY_ALONE_AUDIT) == 4
    floors._codec(fixture)()  # every frame decodes and encodes


# --- the serial path ------------------------------------------------------------------------


def test_the_serial_path_adds_three_durable_steps_the_core_and_the_hop() -> None:
    core_us = {"originator": 400.0, "relay": 100.0, "recipient": 500.0, "token_issue": 9e9}
    floor = floors.latency_floor(0.5, core_us, 0.6)
    assert floor == pytest.approx(
        {"fsyncs_ms": 1.5, "core_ms": 1.0, "hop_ms": 0.6, "floor_ms": 3.1}
    )
    below = floors.latency_floor_line(floor, core_us, 6.2, 2.5)
    assert "tisa p50 6.20 ms is 2.00x it" in below
    assert "the 2.5 ms target is 0.60 ms below the floor: out of reach on this disk" in below
    above = floors.latency_floor_line(floor, core_us, 6.2, 4.0)
    assert "the 4 ms target leaves 0.90 ms above the floor" in above


def test_fsync_wall_is_one_durable_commit(tmp_path: Path) -> None:
    assert floors.fsync_wall(tmp_path, commits=3) > 0


# --- the large report's floors ----------------------------------------------------------------


class _Recorder:
    def __init__(self, person: bytes) -> None:
        self.person = person
        self.pieces: list[bytes] = []

    def update(self, data: bytes) -> None:
        self.pieces.append(bytes(data))

    def digest(self) -> bytes:
        return b"".join(self.pieces)


def test_the_digest_floor_hashes_the_whole_ciphertext_on_each_side(tmp_path: Path) -> None:
    recorders: list[_Recorder] = []

    def new_hash(person: bytes) -> _Recorder:
        recorders.append(_Recorder(person))
        return recorders[-1]

    path = tmp_path / "report.bin"
    core._bare_stream(str(path), os.urandom(CHUNK_SIZE), 3, new_hash)
    sealer, opener = recorders
    chunks = path.read_bytes()
    # The stream header (24 bytes) and then every chunk as written, 65,553 bytes a time:
    # the ciphertext as the format defines it, hashed as the format personalises it.
    for side in (sealer, opener):
        assert side.person == Hash.CIPHERTEXT.value
        assert len(side.pieces[0]) == 24 and b"".join(side.pieces[1:]) == chunks
        assert [len(piece) for piece in side.pieces[1:]] == [CHUNK_SIZE + 17] * 3


@pytest.mark.parametrize("name", ["hashlib", "libsodium"])
def test_each_digest_floor_computes_the_formats_digest(name: str) -> None:
    data = os.urandom(3 * (CHUNK_SIZE + 17) + 24)
    hasher = core._DIGESTS[name](Hash.CIPHERTEXT.value)
    for start in range(0, len(data), CHUNK_SIZE + 17):
        hasher.update(data[start : start + CHUNK_SIZE + 17])
    found = hasher.digest()  # once: libsodium's state is finished by it
    assert found == digest(Hash.CIPHERTEXT, data)
    libsodium = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        data, digest_size=32, person=Hash.CIPHERTEXT.value
    )
    assert found == libsodium
