"""The relay's report event log (``relay.events``): a batch's lines are written once the
batch is on disk, together, in one write; a batch rolled back is logged as an error."""

from __future__ import annotations

import io
import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import relay.store as store_module
import tisa_io.durable
from relay.cli import LOG_FORMAT, EventLinesFormatter, configure_logging
from relay.store import EVENT_LINES, Store
from tests.test_relay_store_steps import _store_and_release
from tisa.audit import AuditEntry
from tisa_testing.world import NOW, World, make_world

EVENTS = logging.getLogger("relay.events")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int = logging.INFO) -> list[str]:
        return [
            line
            for record in self.records
            if record.levelno == level
            for line in record.getMessage().splitlines()
        ]


class _CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture
def world() -> World:
    return make_world()


@pytest.fixture
def captured() -> Iterator[_Records]:
    handler = _Records()
    level, propagate = EVENTS.level, EVENTS.propagate
    EVENTS.addHandler(handler)
    EVENTS.setLevel(logging.INFO)
    EVENTS.propagate = False
    try:
        yield handler
    finally:
        EVENTS.removeHandler(handler)
        EVENTS.setLevel(level)
        EVENTS.propagate = propagate


def _report_events(store: Store, world: World) -> bytes:
    """Store, release, forward and acknowledge one report: its four events."""
    token = _store_and_release(store, world)
    store.mark_forwarded(token.id, now=NOW)
    assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
    return token.report


def _expected(report_id: bytes) -> list[str]:
    return [f"{event} report {report_id.hex()}" for event in ("stored", "released")] + [
        f"{event} report {report_id.hex()}" for event in ("forwarded", "acknowledged")
    ]


def test_a_batchs_event_lines_are_logged_only_once_it_is_on_disk(
    tmp_path: Path, world: World, captured: _Records
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        reports = [_report_events(store, world) for _ in range(3)]
        assert captured.records == []  # recorded, not committed
        store.commit()
        batch = store.written
        assert captured.records == []  # committed, not yet on disk
        store.fsync_wal()
        store.mark_durable(batch)
        # One record for the batch, a line per event, in the order recorded.
        assert len(captured.records) == 1
        lines = captured.lines()
        assert len(lines) == 12
        for line, (report, want) in zip(
            lines, [(r, w) for r in reports for w in _expected(r)], strict=True
        ):
            assert line.startswith(want + " ")
            assert report.hex() in line
        assert getattr(captured.records[0], EVENT_LINES) == lines
    finally:
        store.close()
    assert len(captured.records) == 1  # closing logs nothing twice


def test_event_lines_go_out_in_one_write_each_with_the_per_event_format(
    tmp_path: Path, world: World, captured: _Records
) -> None:
    stream = _CountingStream()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EventLinesFormatter(LOG_FORMAT))
    EVENTS.addHandler(handler)
    store = Store(tmp_path, group_commit=True)
    try:
        report = _report_events(store, world)
        store.commit_durably()
        assert (stream.writes, stream.flushes) == (1, 1)
        lines = stream.getvalue().splitlines()
        entries = [entry for entry, _, _ in store.audit_entries(0, limit=100)]
        assert len(lines) == len(entries) == 4
        plain = logging.Formatter(LOG_FORMAT)
        for line, entry in zip(lines, entries, strict=True):
            # Byte for byte what a record of that one event formats to (but the time).
            alone = EVENTS.makeRecord(
                "relay.events",
                logging.INFO,
                __file__,
                1,
                store_module.event_line(entry),
                (),
                None,
            )
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} .*", line)
            assert line[23:] == plain.format(alone)[23:]
        assert lines[0].endswith(f" relay.events INFO stored report {report.hex()} parties seoul")
    finally:
        store.close()
        EVENTS.removeHandler(handler)


def test_below_info_no_line_is_built_and_the_level_is_checked_once_per_batch(
    tmp_path: Path, world: World, captured: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    EVENTS.setLevel(logging.WARNING)
    checks: list[int] = []
    built: list[AuditEntry] = []
    real_check, real_line = EVENTS.isEnabledFor, store_module.event_line

    def check(level: int) -> bool:
        checks.append(level)
        return real_check(level)

    def line(entry: AuditEntry) -> str:
        built.append(entry)
        return real_line(entry)

    monkeypatch.setattr(EVENTS, "isEnabledFor", check)
    monkeypatch.setattr(store_module, "event_line", line)
    store = Store(tmp_path, group_commit=True)
    try:
        for _ in range(3):
            _report_events(store, world)
        store.commit_durably()
        assert checks == [logging.INFO] and built == [] and captured.records == []
        EVENTS.setLevel(logging.INFO)
        _report_events(store, world)
        store.commit_durably()
        # Once for the batch, once in Logger.info for its one record: not per event.
        assert checks == [logging.INFO] * 3 and len(built) == 4
        assert len(captured.lines()) == 4
    finally:
        store.close()


def test_a_batch_whose_commit_fails_is_logged_as_an_error_not_as_done(
    tmp_path: Path, world: World, captured: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        _report_events(store, world)
        _report_events(store, world)
        batch = store.barrier
        real_execute = store._execute

        def failing(statement: str) -> None:
            if statement == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            real_execute(statement)

        monkeypatch.setattr(store, "_execute", failing)
        with pytest.raises(sqlite3.OperationalError):
            store.commit()
        monkeypatch.setattr(store, "_execute", real_execute)
        assert store.lost(batch)
        assert captured.lines() == []  # no event of it is logged as done
        errors = captured.lines(logging.ERROR)
        assert errors == [f"batch {batch} rolled back: 8 report events not recorded"]
        # The next batch logs its own events only.
        report = _report_events(store, world)
        store.commit_durably()
        assert [" ".join(line.split()[:3]) for line in captured.lines()] == _expected(report)
    finally:
        store.close()


def test_a_refused_step_logs_no_event(
    tmp_path: Path, world: World, captured: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        token = _store_and_release(store, world)
        real_audit = store._audit

        def audit_then_fail(*args: object, **kwargs: object) -> AuditEntry:
            real_audit(*args, **kwargs)  # type: ignore[arg-type]
            raise RuntimeError("fails after recording its event")

        # revoke runs in a savepoint: its event goes with it, the batch stays.
        monkeypatch.setattr(store, "_audit", audit_then_fail)
        with pytest.raises(RuntimeError):
            store.revoke(token.report, token.id, by="seoul", now=NOW)
        monkeypatch.setattr(store, "_audit", real_audit)
        store.commit_durably()
        assert [line.split(" ")[0] for line in captured.lines()] == ["stored", "released"]
        assert captured.lines(logging.ERROR) == []
    finally:
        store.close()


def test_closing_the_store_logs_what_it_commits(
    tmp_path: Path, world: World, captured: _Records
) -> None:
    # A clean shutdown (or Ctrl-C: the relay closes its store on the way out) commits
    # the open batch and logs its events; nothing is left behind.
    store = Store(tmp_path, group_commit=True)
    _report_events(store, world)
    store.commit()  # committed, never synced by the server
    report = _report_events(store, world)  # still open
    assert captured.records == []
    store.close()
    lines = captured.lines()
    assert len(lines) == 8 and lines[-1].startswith(f"acknowledged report {report.hex()}")


def test_without_group_commit_each_transaction_logs_once_on_disk(
    tmp_path: Path, world: World, captured: _Records
) -> None:
    store = Store(tmp_path)
    try:
        report = _report_events(store, world)
        # One record per transaction (each is on disk on return).
        assert len(captured.records) == 4
        assert [" ".join(line.split()[:3]) for line in captured.lines()] == _expected(report)
    finally:
        store.close()


def test_a_batchs_record_reads_whole_under_any_formatter() -> None:
    record = EVENTS.makeRecord(
        "relay.events", logging.INFO, __file__, 1, "a\nb", (), None, extra={EVENT_LINES: ["a", "b"]}
    )
    assert logging.Formatter("%(levelname)s %(message)s").format(record) == "INFO a\nb"
    assert EventLinesFormatter("%(levelname)s %(message)s").format(record) == "INFO a\nINFO b"
    plain = EVENTS.makeRecord("relay.events", logging.INFO, __file__, 1, "x %s", ("y",), None)
    assert EventLinesFormatter("%(levelname)s %(message)s").format(plain) == "INFO x y"


def test_a_store_poisoned_by_a_failed_fsync_logs_no_event_and_says_so_on_close(
    tmp_path: Path, world: World, captured: _Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path, group_commit=True)
    _report_events(store, world)
    store.commit()
    batch = store.written

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    # The WAL is flushed with fdatasync where there is one (tisa_io.durable).
    monkeypatch.setattr(tisa_io.durable, "sync_data", failing_fsync)
    with pytest.raises(OSError):
        store.fsync_wal()
    store.mark_durable(batch)  # ignored: the store is poisoned
    store.close()
    assert captured.lines() == []
    assert captured.lines(logging.ERROR) == ["closed with 4 report events not known to be on disk"]


def test_the_relays_logging_formats_a_batch_a_line_per_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("INFO")
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert isinstance(handler.formatter, EventLinesFormatter)
    assert handler.formatter._fmt == LOG_FORMAT
