"""The relay's durable state: SQLite (WAL, synchronous=NORMAL, WAL fsynced by hand) plus
ciphertext files.

Layout of a store directory::

    relay.db        reports, tokens, receipts, notices, prekeys, audit log
    blobs/<hex id>  one sealed report's ciphertext (never a key, never plaintext)
    tmp/            uploads in progress; emptied when the store opens

Rules that make the relay lose nothing:

* A ciphertext is written to ``tmp/``, fsynced, renamed into ``blobs/`` and the
  directory fsynced (:meth:`BlobWriter.place`) before its row is committed
  (:meth:`Store.add_report`), and the row is committed before ``stored`` is sent. A
  small ciphertext (:class:`InlineBlob`, at most ``Limits.max_inline_report`` bytes)
  is kept in the row itself (column ``data``) and needs no file at all.
* Consuming a token and creating its pending delivery is one transaction
  (:meth:`Store.release`); the token id is the primary key, so a second use fails.
* An inline submission (``submit_inline``) reads no row of its report. Usually (a new
  report, its first token good) the report and that token are one step of two
  statements (:meth:`Store.add_released_report`): the token's row, inserted only if no
  report is stored under the id, the token id was never used and its one-time prekey
  (if any) was handed to its originator and is unused, all checked by that insert;
  then the report's row, released with its key commitment pinned (before: a look-up,
  the report's insert, a read of both states, the token's insert and a rewrite of the
  report's row with its ciphertext, five statements). Otherwise the report's insert
  finds a report already stored under the id (``add_report(if_new=True)``: nothing
  written; the server then reads that row and answers a resend ``stored``, another
  report ``duplicate``), and the first release of a row just inserted
  (``release(fresh=row)``) is the same guarded insert, then the key pinned. Whatever a
  guarded insert does not let through goes to the full check, which names the refusal
  in the protocol's order; nothing of a refused release is written.
* A one-time prekey is handed out in one transaction that marks it taken by the
  asker (:meth:`Store.take_prekeys`, :mod:`relay.prekeystore`), committed before the
  answer is sent, so it is handed out once; a token naming it is accepted only from that
  asker, once.
* Every audit entry is appended in the same transaction as the state change it records
  (the entries of a batch are written together, by one ``executemany`` right before its
  ``COMMIT``; the chain head is kept in memory meanwhile, and a step rolled back takes
  its entries with it).
* The log line of a report event (``relay.events``) is written only once the batch
  that records it is on disk (:meth:`Store.mark_durable`): the lines of a batch go out
  together, as one record (:data:`EVENT_LINES`), in one write. A batch whose commit
  fails is logged as one error line instead, and its events never as done.
* A row's blob is deleted only after the row's ``deleted`` state is committed; blobs
  without a live row (a crash between rename and commit, or between commit and unlink)
  are swept when the store opens.

The rules of releases, deliveries, revocations, receipts, notices and expiry, and of
release requests, are shared with the PostgreSQL store (:mod:`relay.tokenstore`,
:mod:`relay.consentstore`); this module holds what is SQLite's own.

Group commit: a store opened with ``group_commit=True`` (the relay's) does not commit
each method's transaction: every method runs as one step of the open batch, and
:meth:`Store.commit` commits them all; :attr:`Store.barrier` names the batch that must
be on disk (:attr:`Store.committed`) before the current state may be announced (the
server waits for it before every message it sends). Blob files are removed only once
the batch that deleted their row is on disk. The database runs in WAL mode with
``synchronous=NORMAL``, and a batch counts as on disk only after a WAL fsync that
started after its COMMIT (:meth:`Store.fsync_wal`, run by the server in a worker
thread); the batch bookkeeping, and the argument why that is durable, are in
:mod:`tisa_io.durable`, shared with the member's store.

All methods are synchronous and short; the slow steps, fsync, are in
:meth:`BlobWriter.place` and :meth:`Store.fsync_wal`, which the server runs in worker
threads. The connection is used from one thread at a time (the trio thread);
:meth:`Store.fsync_wal` does not touch it and may run in any thread.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import sqlite3
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from relay.consentstore import REQUEST_RATE_WINDOW, ConsentRow
from relay.prekeystore import PrekeyTables
from relay.tokenstore import (
    OWED,
    PENDING_COLUMNS,
    NoticeRow,
    ReceiptRow,
    ReportRow,
    StoreBusy,
    StoreUnavailable,
    TokenRow,
    TokenTables,
    pending_values,
    release_refusal,
)
from tisa.audit import (
    GENESIS,
    AuditEntry,
    AuditEvent,
    chain_next,
    content_hash_of,
    entry_bytes,
    sorted_parties,
)
from tisa.errors import Reason, Refused, UsageError
from tisa.keys import Hash, Hasher, random_id
from tisa.keys import digest as hash_digest
from tisa.prekeys import Prekey
from tisa.token import ReleaseToken
from tisa_io.durable import DurableStore

# The relay's report events (one line each): stored, released, forwarded, ...
log = logging.getLogger("relay.events")

# The attribute of a ``relay.events`` record that carries the lines of a batch's events
# (a list of str, one per event); relay.cli's formatter gives each its own prefix. The
# record's message is the same lines joined by newlines, for any other formatter.
EVENT_LINES = "event_lines"

__all__ = [
    "EVENT_LINES",
    "event_line",
    "StoreBusy",
    "StoreUnavailable",
    "BlobWriter",
    "ConsentRow",
    "REQUEST_RATE_WINDOW",
    "InlineBlob",
    "ReceiptRow",
    "ReportRow",
    "Store",
    "TokenRow",
    "NoticeRow",
]

DB_NAME = "relay.db"
# 2: reports.key_commit; 3: reports.data (inline ciphertext); 4: the tokens' indexes
# hold only deliveries still owed (partial indexes, see _OWED); 5: requests,
# announcements, consent_queue (release requests); 6: prekeys; 7: prekey_rate (one-time
# prekeys handed to each originator, relay.prekeystore) (5 to 7: new tables only); 8:
# the reports' expiry index holds only live reports, keyed by expiry alone (_SCHEMA); 9:
# tokens and receipts number their rows without AUTOINCREMENT (_TOKENS, _RECEIPTS); 10:
# the states of tokens and reports checked by comparisons, not an IN list (_rebuild).
SCHEMA_VERSION = 10

# The tokens' indexes hold only deliveries still owed (OWED, stated literally in every
# query that should use them: SQLite uses a partial index only then). Indexed only while
# owed, and without the state in their keys, a token's row enters the indexes once
# (release), stays put when it is forwarded, and leaves them when it is acked: before,
# each state change moved it in three indexes.
_OWED = OWED

_INSERT_REPORT = (
    "INSERT INTO reports (id, originator, size, digest, path, state, expires, stored_at, data)"
    " VALUES (?, ?, ?, ?, ?, 'held', ?, ?, ?)"
)
# A report released as it is stored: its key commitment pinned in the row's insert.
_INSERT_RELEASED_REPORT = (
    "INSERT INTO reports (id, originator, size, digest, path, state, expires, stored_at, data,"
    " key_commit) VALUES (?, ?, ?, ?, '', 'released', ?, ?, ?, ?)"
)
# A token's row, only if its id was never used (ON CONFLICT below) ...
_INSERT_TOKEN_VALUES = (
    f"INSERT INTO tokens ({PENDING_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
# ... and, with the conditions below after WHERE, only if they hold (a condition in the
# insert costs an index look-up, a statement of its own a round through the module).
_INSERT_TOKEN_IF = (
    f"INSERT INTO tokens ({PENDING_COLUMNS}) SELECT ?, ?, ?, ?, ?, ?, 'pending', ?, ?"
)
_TOKEN_IF_END = " ON CONFLICT (id) DO NOTHING"
# Its one-time prekey was handed to its originator as its recipient's, and is unused.
_UNUSED_PREKEY = (
    "EXISTS (SELECT 1 FROM prekeys WHERE key = ? AND kind = 'one_time'"
    " AND owner = ? AND taken_by = ? AND used_by IS NULL)"
)
# No report is stored under the id yet.
_NO_REPORT = "NOT EXISTS (SELECT 1 FROM reports WHERE id = ?)"
_PIN_KEY = (
    "UPDATE reports SET key_commit = coalesce(key_commit, ?),"
    " state = CASE state WHEN 'held' THEN 'released' ELSE state END WHERE id = ?"
)

# A token's seq is its place in the push order (the pusher reads on from the last seq it
# sent), so a seq is never used twice: a plain rowid is the largest so far plus one, and
# the newest token row is never deleted (relay.tokenstore.TokenTables.expire keeps it),
# so the largest so far is never taken back. AUTOINCREMENT promised the same through a
# counter row in sqlite_sequence, read and rewritten by every insert (schema 8 and
# before). Receipts are never deleted: their rowids grow alone.
_TOKENS = """
CREATE TABLE IF NOT EXISTS {name} (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    report BLOB NOT NULL,
    recipient TEXT NOT NULL,
    originator TEXT NOT NULL,
    token BLOB NOT NULL,
    counter INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state = 'pending' OR state = 'delivered' OR state = 'acked'
        OR state = 'revoked' OR state = 'expired'),
    not_after INTEGER NOT NULL,
    keep_until INTEGER NOT NULL
);"""
_RECEIPTS = """
CREATE TABLE IF NOT EXISTS {name} (
    seq INTEGER PRIMARY KEY,
    originator TEXT NOT NULL,
    token BLOB NOT NULL UNIQUE,
    receipt BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'acked'))
);"""

_REPORTS = """
CREATE TABLE IF NOT EXISTS {name} (
    id BLOB PRIMARY KEY,
    originator TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest BLOB NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state = 'held' OR state = 'released' OR state = 'deleted'),
    ended TEXT,
    expires INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    key_commit BLOB,
    data BLOB                      -- the ciphertext of a small report; NULL: blobs/<hex id>
);"""

_SCHEMA = """{reports}
-- Live reports by expiry (the sweep). The state is in the condition, not the key, so a
-- release (held -> released) rewrites its entry in place and a report stored and
-- released in one batch writes one page of it, not two (a lone report's commit wrote 12
-- WAL pages, now 10); a deleted report leaves it.
CREATE INDEX IF NOT EXISTS reports_live ON reports (expires)
    WHERE state IN ('held', 'released');
{tokens}
CREATE INDEX IF NOT EXISTS tokens_owed ON tokens (recipient, seq)
    WHERE state IN ('pending', 'delivered');
CREATE INDEX IF NOT EXISTS tokens_owed_report ON tokens (report)
    WHERE state IN ('pending', 'delivered');
CREATE INDEX IF NOT EXISTS tokens_owed_expiry ON tokens (not_after)
    WHERE state IN ('pending', 'delivered');
{receipts}
CREATE INDEX IF NOT EXISTS receipts_originator ON receipts (originator, state, seq);
CREATE TABLE IF NOT EXISTS notices (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    member TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('expired', 'revoked')),
    report BLOB NOT NULL,
    token BLOB
);
CREATE INDEX IF NOT EXISTS notices_member ON notices (member, seq);
CREATE TABLE IF NOT EXISTS requests (
    id BLOB PRIMARY KEY,
    requester TEXT NOT NULL,
    originator TEXT NOT NULL,
    report BLOB NOT NULL,
    request BLOB NOT NULL,         -- the signed request, as received
    state TEXT NOT NULL CHECK (state IN ('open', 'approved', 'denied')),
    answer BLOB,                   -- the signed denial, once denied
    expires INTEGER NOT NULL,
    received INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_rate ON requests (requester, received);
CREATE TABLE IF NOT EXISTS announcements (
    id BLOB PRIMARY KEY,
    report BLOB NOT NULL,
    announcement BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    member TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('announce', 'request', 'answer')),
    ref BLOB NOT NULL,             -- announcement id, or request id (request, answer)
    data BLOB NOT NULL,
    UNIQUE (member, kind, ref)
);
CREATE INDEX IF NOT EXISTS consent_member ON consent_queue (member, seq);
CREATE TABLE IF NOT EXISTS prekeys (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('signed', 'one_time')),
    key BLOB NOT NULL UNIQUE,
    encoded BLOB NOT NULL,
    not_after INTEGER NOT NULL,
    taken_by TEXT,                 -- one-time: the originator it was handed out to
    used_by BLOB                   -- one-time: the token id that used it
);
CREATE INDEX IF NOT EXISTS prekeys_owner ON prekeys (owner, kind, taken_by, seq);
CREATE TABLE IF NOT EXISTS prekey_rate (
    owner TEXT NOT NULL,           -- the recipient whose one-time prekeys were handed out
    taker TEXT NOT NULL,           -- the originator they were handed to
    slot INTEGER NOT NULL,         -- now // PREKEY_RATE_SLOT
    handed INTEGER NOT NULL,
    PRIMARY KEY (owner, taker, slot)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    content BLOB NOT NULL,
    head BLOB NOT NULL
);
""".format(
    reports=_REPORTS.format(name="reports"),
    tokens=_TOKENS.format(name="tokens"),
    receipts=_RECEIPTS.format(name="receipts"),
)

# The tables a schema change made again, with their columns in order (the rows copied
# over keep their rowid, a token's or receipt's seq): tokens and receipts by schema 9,
# tokens and reports by schema 10.
_REBUILT = {
    "tokens": (
        _TOKENS,
        "rowid, id, report, recipient, originator, token, counter, state, not_after, keep_until",
    ),
    "receipts": (_RECEIPTS, "rowid, originator, token, receipt, state"),
    "reports": (
        _REPORTS,
        "rowid, id, originator, size, digest, path, state, ended, expires, stored_at,"
        " key_commit, data",
    ),
}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """One upload in progress: a temporary file and a running digest.

    :meth:`write` is cheap (one chunk into the page cache); :meth:`place` does the
    fsyncs and the rename and should run in a worker thread. :meth:`abort` removes
    the temporary file; it is safe to call at any point, also after :meth:`place`
    (then it does nothing).
    """

    __slots__ = ("_file", "_hasher", "_placed", "_target", "_temp", "written")

    def __init__(self, temp: Path, target: Path) -> None:
        self._temp = temp
        self._target = target
        self._file: BinaryIO | None = open(temp, "xb")  # noqa: SIM115 - closed in place/abort
        self._hasher = Hasher(Hash.CIPHERTEXT)
        self._placed = False
        self.written = 0

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise UsageError("the upload is finished")
        self._file.write(data)
        self._hasher.update(data)
        self.written += len(data)

    def digest(self) -> bytes:
        """The ciphertext digest of everything written (call once, at the end)."""
        return self._hasher.finish()

    def place(self) -> None:
        """Flush, fsync, rename into ``blobs/`` and fsync the directory. Blocking."""
        if self._file is None:
            raise UsageError("the upload is finished")
        file, self._file = self._file, None
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        os.replace(self._temp, self._target)
        _fsync_dir(self._target.parent)
        self._placed = True

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._placed:
            with contextlib.suppress(FileNotFoundError):
                self._temp.unlink()

    @property
    def data(self) -> bytes | None:
        """None: the ciphertext is in the placed file."""
        return None


class InlineBlob:
    """An upload small enough to live in its row: its bytes in memory.

    Same interface as :class:`BlobWriter`; :meth:`place` does nothing (the bytes become
    durable with the row's commit) and :attr:`data` is the ciphertext. Its digest is
    taken once, of the whole (:func:`tisa.keys.digest`, the same bytes as a running
    :class:`tisa.keys.Hasher`): for an inline report, one piece, that costs half of
    making a hash state, feeding it and finishing it.
    """

    __slots__ = ("_parts", "written")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self.written += len(data)

    def digest(self) -> bytes:
        data = self.data
        self._parts = [data]  # joined once: data is read again to store it
        return hash_digest(Hash.CIPHERTEXT, data)

    def place(self) -> None:
        pass

    def abort(self) -> None:
        self._parts = []

    @property
    def data(self) -> bytes:
        return b"".join(self._parts)


def event_line(entry: AuditEntry) -> str:
    """The log line of one report event, from what its audit entry records (ids, names,
    reason codes: nothing secret)."""
    report = f" report {entry.report.hex()}" if entry.report else ""
    token = f" token {entry.token.hex()}" if entry.token else ""
    reason = f" reason {entry.reason}" if entry.reason else ""
    return f"{entry.event.value}{report}{token} parties {','.join(entry.parties) or '-'}{reason}"


class Store(TokenTables, PrekeyTables, DurableStore):
    """The relay's durable state in ``directory``.

    Args:
        directory: created if missing.

    Raises:
        UsageError: the directory holds a store of another schema version.
    """

    def __init__(self, directory: str | os.PathLike[str], *, group_commit: bool = False) -> None:
        super().__init__()
        # Audit rows (seq, entry, content, head) of the open batch, written by one
        # executemany before its COMMIT; _audit_mark: where the current step's begin.
        self._audit_rows: list[tuple[int, bytes, bytes, bytes]] = []
        self._audit_mark = 0
        # The entries to log (event_line) of the open batch (and where the current step's
        # begin), then, keyed by batch, of the batches committed but not yet on disk.
        self._events: list[AuditEntry] = []
        self._events_mark = 0
        self._events_written: collections.deque[tuple[int, list[AuditEntry]]] = collections.deque()
        # recipient -> deliveries outstanding, for those counted so far (queue_length).
        self._queued: dict[str, int] = {}
        self.directory = Path(directory)
        self.group_commit = group_commit
        self.blobs = self.directory / "blobs"
        self.tmp = self.directory / "tmp"
        for path in (self.directory, self.blobs, self.tmp):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.directory / DB_NAME, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: COMMIT does not fsync; the WAL is fsynced by fsync_wal before anything
        # of a batch is announced (see the module docstring).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # 16 MiB of page cache (SQLite's default is 2 MiB): a large batch's dirty pages
        # stay in memory until its COMMIT instead of spilling to the WAL mid-statement.
        self._db.execute("PRAGMA cache_size=-16384")
        # Freed pages are zeroed, so a dropped token (and its sealed key) leaves no copy.
        self._db.execute("PRAGMA secure_delete=ON")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 2, 3, 4, 5, 6, 7, 8, 9, SCHEMA_VERSION):
            self._db.close()
            raise UsageError(f"relay store schema {version}; this relay knows {SCHEMA_VERSION}")
        if version == 2:
            self._db.execute("ALTER TABLE reports ADD COLUMN data BLOB")
        if version in (2, 3, 4):
            # The indexes of every token, replaced by the partial ones of _SCHEMA.
            for index in ("tokens_recipient", "tokens_report", "tokens_expiry"):
                self._db.execute(f"DROP INDEX IF EXISTS {index}")
        if version in (2, 3, 4, 5, 6, 7):
            # Replaced by reports_live.
            self._db.execute("DROP INDEX IF EXISTS reports_expiry")
        if version in (2, 3, 4, 5, 6, 7, 8):
            self._rebuild(("tokens", "receipts", "reports"))
        elif version == 9:
            self._rebuild(("tokens", "reports"))
        # Every statement is idempotent (IF NOT EXISTS), so no transaction is needed.
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._load_head()
        self._sweep_files()
        # The set-up above is on disk, and the WAL file's directory entry with it.
        self.fsync_wal()
        _fsync_dir(self.directory)

    def _rebuild(self, names: tuple[str, ...]) -> None:
        # The tables ``names`` of _REBUILT are made again as _SCHEMA has them now (no
        # ALTER changes a column's constraint), every row copied with its rowid, in one
        # transaction; their indexes go with the old table and _SCHEMA makes them again.
        # Schema 9: tokens and receipts without AUTOINCREMENT (a seq taken by a token row
        # deleted before may be used again once: no pusher's position, kept in memory,
        # outlives the restart). Schema 10: tokens and reports with their state checked
        # by comparisons, not an IN list, for which SQLite builds a temporary table at
        # every row written (some 30,000 instructions, as much as the write itself).
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for name in names:
                table, columns = _REBUILT[name]
                new = f"{name}_{SCHEMA_VERSION}"
                self._db.execute(table.format(name=new))
                self._db.execute(f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {name}")
                self._db.execute(f"DROP TABLE {name}")
                self._db.execute(f"ALTER TABLE {new} RENAME TO {name}")
            self._db.execute("DELETE FROM sqlite_sequence WHERE name IN ('tokens', 'receipts')")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._db.close()
            raise
        self._db.execute("COMMIT")

    @property
    def wal_path(self) -> Path:
        """The WAL file (``relay.db-wal``) that :meth:`fsync_wal` fsyncs."""
        return self.directory / (DB_NAME + "-wal")

    def close(self) -> None:
        """Commit what is pending (it was never announced, but keeping it is harmless)
        and close. A store poisoned by a failed fsync is closed without committing:
        what was never announced is rolled back, and recovery sees what is on disk."""
        try:
            if self.failed is None:
                self.commit_durably()
        finally:
            self._db.close()
            unlogged = len(self._events) + sum(len(events) for _, events in self._events_written)
            if unlogged:
                # Poisoned by a failed fsync: these batches may not be on disk.
                log.error("closed with %d report events not known to be on disk", unlogged)

    # --- plumbing --------------------------------------------------------------------

    def _transaction(
        self, *, savepoint: bool = True
    ) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # One step of the open batch (group commit), or a transaction durable on return.
        # savepoint=False: the step checks everything before its first write (see
        # tisa_io.durable.DurableStore._step).
        return self._step(savepoint=savepoint) if self.group_commit else self._single_logged()

    @contextlib.contextmanager
    def _single_logged(self) -> Iterator[sqlite3.Connection]:
        # Without group commit the transaction is on disk when _single returns.
        with self._single() as db:
            yield db
        events, self._events = self._events, []
        self._log_events(events)

    def commit(self) -> None:
        """:meth:`tisa_io.durable.DurableStore.commit`; the batch's event lines wait for
        :meth:`mark_durable`, or are logged as one error if its commit fails."""
        written = self.written
        super().commit()
        if self.written != written and self._events:
            self._events_written.append((self.written, self._events))
            self._events = []

    def _abandon_batch(self) -> None:
        lost = len(self._events)  # _rolled_back drops them
        batch = self.generation
        super()._abandon_batch()
        if lost:
            log.error("batch %d rolled back: %d report events not recorded", batch, lost)

    def mark_durable(self, batch: int) -> None:
        """:meth:`tisa_io.durable.DurableStore.mark_durable`, then the event lines of the
        batches now on disk, in one record (one write)."""
        super().mark_durable(batch)
        events: list[AuditEntry] = []
        while self._events_written and self._events_written[0][0] <= self.committed:
            events += self._events_written.popleft()[1]
        self._log_events(events)

    def _log_events(self, events: list[AuditEntry]) -> None:
        # One record for the lines of a batch's events (see EVENT_LINES); the level is
        # checked once, and nothing is formatted below it.
        if events and log.isEnabledFor(logging.INFO):
            lines = [event_line(entry) for entry in events]
            log.info("\n".join(lines), extra={EVENT_LINES: lines})

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(query, params)

    def _step_started(self) -> None:
        self._audit_mark = len(self._audit_rows)
        self._events_mark = len(self._events)

    def _changes(self) -> int:
        return self._db.total_changes + len(self._audit_rows)

    def _before_commit(self) -> None:
        self._flush_audit()

    def _flush_audit(self) -> None:
        # The audit entries of the open batch, in one statement; inside its transaction,
        # so each entry still commits with the change it records.
        if self._audit_rows:
            self._db.executemany(
                "INSERT INTO audit (seq, entry, content, head) VALUES (?, ?, ?, ?)",
                self._audit_rows,
            )
            self._audit_rows.clear()
            self._audit_mark = 0

    def _rolled_back(self) -> None:
        if self._db.in_transaction:
            # One step rolled back: its buffered entries go with it.
            del self._audit_rows[self._audit_mark :]
            del self._events[self._events_mark :]
        else:
            # A whole batch (or a transaction) was rolled back, not one step: counts
            # changed by its committed steps are wrong now.
            self._audit_rows.clear()
            self._events.clear()
            self._queued.clear()
            self._batch_undone()
        # The cached audit head may belong to rolled-back entries.
        if self._audit_rows:
            self._seq, _, _, self._head = self._audit_rows[-1]
        else:
            self._load_head()

    def _load_head(self) -> None:
        row = self._db.execute("SELECT seq, head FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq, self._head = (0, GENESIS) if row is None else (int(row[0]), bytes(row[1]))

    def _audit(
        self,
        event: AuditEvent,
        *,
        now: int,
        parties: tuple[str, ...],
        report: bytes | None = None,
        token: bytes | None = None,
        reason: str | None = None,
    ) -> AuditEntry:
        # Called inside a transaction only: the entry commits with the change it records.
        # Its fields are the relay's own (ints, ids, names): encoded without the
        # entry's keyword handling and generic checks (tisa.audit.entry_bytes).
        seq, time, names = self._seq + 1, max(now, 0), sorted_parties(parties)
        encoded = entry_bytes(seq, time, event, report, token, names, reason)
        content = content_hash_of(encoded)
        head = chain_next(self._head, content)
        self._audit_rows.append((seq, encoded, content, head))
        self._seq, self._head = seq, head
        # Its log line (event_line) is written once the batch is on disk (_log_events).
        entry = AuditEntry.built(seq, time, event, report, token, names, reason)
        self._events.append(entry)
        return entry

    def _sweep_files(self) -> None:
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        live = {
            bytes(row[0]).hex()
            for row in self._db.execute("SELECT id FROM reports WHERE state != 'deleted'")
        }
        for path in self.blobs.iterdir():
            if path.name not in live:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _remove_blob(self, report_id: bytes) -> None:
        self._remove_after_commit(self.blob_path(report_id))

    # The hooks of relay.tokenstore.TokenTables.

    def _delete_ciphertext(self, report_id: bytes, ended: str) -> None:
        # The file goes once the step is over (_ciphertexts_deleted), and only once the
        # row's deleted state is on disk.
        self._db.execute(
            "UPDATE reports SET state = 'deleted', ended = ?, data = NULL WHERE id = ?",
            (ended, report_id),
        )

    def _ciphertexts_deleted(self, report_ids: list[bytes]) -> None:
        for report_id in report_ids:
            self._remove_blob(report_id)

    def _audit_read(self) -> None:
        self._flush_audit()

    def _queues_changed(self) -> None:
        self._queued.clear()  # queue lengths are counted again when next needed

    def _acked(self, token_id: bytes, recipient: str) -> None:
        if recipient in self._queued:
            self._queued[recipient] -= 1

    # --- reports ---------------------------------------------------------------------

    def blob_path(self, report_id: bytes) -> Path:
        return self.blobs / report_id.hex()

    def begin_upload(self, report_id: bytes, *, inline: bool = False) -> BlobWriter | InlineBlob:
        """A writer for a new blob of ``report_id`` (placed only by :meth:`BlobWriter.place`);
        with ``inline``, an :class:`InlineBlob` whose bytes go into the row."""
        if inline:
            return InlineBlob()
        return BlobWriter(self.tmp / f"{random_id().hex()}.part", self.blob_path(report_id))

    def inline_data(self, report_id: bytes) -> bytes | None:
        """The ciphertext of a report stored inline, or None (it is a file, or gone)."""
        row = self._db.execute("SELECT data FROM reports WHERE id = ?", (report_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def open_ciphertext(self, report_id: bytes) -> BinaryIO:
        """A readable stream of a stored report's ciphertext, wherever it is kept (in
        its row or in a file). The caller closes it.

        Raises:
            FileNotFoundError: no such report, or its ciphertext was deleted.
        """
        inline = self.inline_data(report_id)
        if inline is not None:
            return io.BytesIO(inline)
        return open(self.blob_path(report_id), "rb")

    @typing.overload
    def add_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes | None = None,
        if_new: typing.Literal[False] = False,
    ) -> ReportRow:
        """Without ``if_new``: the new row, always (see the implementation below)."""

    @typing.overload
    def add_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes | None = None,
        if_new: bool,
    ) -> ReportRow | None:
        """With ``if_new``: the new row, or None if a report is stored under the id."""

    def add_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes | None = None,
        if_new: bool = False,
    ) -> ReportRow | None:
        """Record a placed blob (or, with ``data``, an inline ciphertext) as a held
        report and log ``stored``, in one transaction.

        ``if_new`` (an inline ciphertext whose id was not looked up first): a report
        already stored under this id is left as it is and None is returned, with
        nothing written; the caller reads that row and decides (a resend or another
        report). One statement where a look-up and an insert were two."""
        with self._transaction(savepoint=False) as db:
            cursor = db.execute(
                _INSERT_REPORT + (" ON CONFLICT (id) DO NOTHING" if if_new else ""),
                (
                    report_id,
                    originator,
                    size,
                    digest,
                    "" if data is not None else report_id.hex(),
                    expires,
                    now,
                    data,
                ),
            )
            if cursor.rowcount == 0:
                return None
            self._audit(AuditEvent.STORED, now=now, parties=(originator,), report=report_id)
        # The row just inserted, built rather than read back.
        return ReportRow(report_id, originator, size, digest, "held", None, expires, now)

    # --- tokens ----------------------------------------------------------------------

    def ping(self) -> None:
        """A trivial read: raises if the database cannot answer (the health check)."""
        self._db.execute("SELECT 1").fetchone()

    def queue_length(self, recipient: str) -> int:
        """Deliveries still owed to ``recipient``.

        Counted once, then kept up to date by :meth:`release` and :meth:`ack_delivery`
        (after their step succeeded); revocation, expiry and a rolled-back batch drop the
        counts. Counting on every release cost O(queue): ~0.3 ms at 10,000 queued.
        """
        count = self._queued.get(recipient)
        if count is None:
            row = self._db.execute(
                f"SELECT COUNT(*) FROM tokens WHERE recipient = ? AND {_OWED}", (recipient,)
            ).fetchone()
            count = self._queued[recipient] = int(row[0])
        return count

    def release(
        self,
        token: ReleaseToken,
        *,
        now: int,
        max_queue: int,
        clock_skew: int = 0,
        fresh: ReportRow | None = None,
    ) -> TokenRow:
        """Consume ``token`` (already checked) and make its delivery pending, atomically.
        A token that names a request (``token.request``) also closes that request as
        approved, in the same transaction.

        Raises:
            Refused: REPLAYED (the id was used), REVOKED (the id or the report was
                revoked), EXPIRED (the report expired, or the request the token
                approves), UNKNOWN_REPORT, QUEUE_FULL (the recipient has ``max_queue``
                deliveries outstanding); for an approval, UNSOLICITED (no open request
                with that id from the recipient to the originator for the report) and
                ANSWERED (the request was approved or denied before).

        ``fresh``: the row of ``token``'s report when it was inserted by this batch and
        nothing changed it since (an inline submission's first release): the report's
        state is known, so the release is one guarded insert (see
        :meth:`_release_fresh`) unless that finds a reason to refuse, which the full
        check below then names.
        """
        if fresh is not None and token.request is None:
            row = self._release_fresh(token, fresh, now=now, max_queue=max_queue)
            if row is not None:
                return row
        # Every refusal of a plain release is decided before its first write: no
        # savepoint. An approval writes the request's state first, so it keeps one.
        with self._transaction(savepoint=token.request is not None) as db:
            if token.request is not None:
                self._approve(token, now=now, clock_skew=clock_skew)
            # The token id's state and the report's, in one query (NULLs: not there).
            found = db.execute(
                "SELECT (SELECT state FROM tokens WHERE id = ?), r.id IS NOT NULL,"
                " r.state, r.ended, r.expires, r.key_commit"
                " FROM (SELECT 1) LEFT JOIN reports r ON r.id = ?",
                (token.id, token.report),
            ).fetchone()
            # The first release pins the key commitment (the UPDATE below).
            refusal = release_refusal(
                token,
                found,
                now=now,
                queued=lambda: self.queue_length(token.recipient),
                max_queue=max_queue,
            )
            if refusal is not None:
                raise refusal
            if token.wrap.opk is not None:
                self._use_one_time_prekey(token)
            cursor = db.execute(
                f"INSERT INTO tokens ({PENDING_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                pending_values(token),
            )
            assert cursor.lastrowid is not None  # the row's seq (its rowid)
            _, _, state, _, _, pinned = found
            if state != "released" or pinned is None:
                # The first release: the report is released, its key commitment pinned.
                # (A later one found both done, and its key commitment the pinned one.)
                db.execute(_PIN_KEY, (token.key_commit, token.report))
            row = self._released(token, cursor.lastrowid, now=now)
        if token.recipient in self._queued:
            self._queued[token.recipient] += 1
        return row

    def _release_fresh(
        self, token: ReleaseToken, report: ReportRow, *, now: int, max_queue: int
    ) -> TokenRow | None:
        """The first release of a report this batch just inserted (``report``, its row
        as inserted: held, no key commitment pinned): no read of the token's or the
        report's state. The token's row goes in only if its id was never used (ON
        CONFLICT) and its one-time prekey, if any, was handed to its originator and is
        unused (the guard of the same statement); then the prekey is marked used and
        the key pinned. Returns None, with nothing written, when that insert finds a
        reason to refuse (or the report's own state does): :meth:`release` then checks
        it in full, in the protocol's order, and names the reason. Three statements
        where the full path takes four (five with a one-time prekey)."""
        if token.report != report.id or not self._may_release(
            token, report.state, report.expires, now=now, max_queue=max_queue
        ):
            return None
        opk = token.wrap.opk
        with self._transaction(savepoint=False) as db:
            if opk is None:
                cursor = db.execute(_INSERT_TOKEN_VALUES, pending_values(token))
            else:
                cursor = db.execute(
                    _INSERT_TOKEN_IF + " WHERE " + _UNUSED_PREKEY + _TOKEN_IF_END,
                    (*pending_values(token), opk, token.recipient, token.originator),
                )
            if cursor.rowcount != 1:
                return None  # nothing written: the full check names the refusal
            assert cursor.lastrowid is not None
            self._use_checked_prekey(token)
            db.execute(_PIN_KEY, (token.key_commit, token.report))
            row = self._released(token, cursor.lastrowid, now=now)
        if token.recipient in self._queued:
            self._queued[token.recipient] += 1
        return row

    def _may_release(
        self, token: ReleaseToken, state: str, expires: int, *, now: int, max_queue: int
    ) -> bool:
        # release_refusal for an unused token id and a report row in ``state`` with no
        # key pinned: whatever the guarded insert that follows does not check itself.
        queued = self.queue_length(token.recipient)
        found = (None, True, state, None, expires, None)
        refusal = release_refusal(token, found, now=now, queued=lambda: queued, max_queue=max_queue)
        return refusal is None

    def _use_checked_prekey(self, token: ReleaseToken) -> None:
        # The token's one-time prekey, if any, checked by the insert of its row: used.
        if token.wrap.opk is not None:
            self._db.execute(
                "UPDATE prekeys SET used_by = ? WHERE key = ? AND kind = 'one_time'",
                (token.id, token.wrap.opk),
            )

    def add_released_report(
        self,
        report_id: bytes,
        *,
        originator: str,
        size: int,
        digest: bytes,
        expires: int,
        now: int,
        data: bytes,
        token: ReleaseToken,
        max_queue: int,
    ) -> tuple[ReportRow, TokenRow] | None:
        """An inline ciphertext stored and released by ``token`` (already checked against
        these values) in one step, as :meth:`add_report` then :meth:`release` would do
        it (entries ``stored`` then ``released``), if nothing stands in the way: no
        report stored under the id yet, the token's id never used, its one-time prekey
        (if any) handed to its originator and unused, room in the recipient's queue.
        Then the token's row goes in first, guarded by all of that in one statement,
        and the report's row after it, released with the key commitment pinned: two
        statements (three with a one-time prekey) where storing, then releasing, take
        three (four), the last of them a rewrite of the row with its ciphertext.

        Returns:
            The report's row and the token's; or None, with nothing written, when
            anything stands in the way: the caller then stores and releases as usual
            (:meth:`add_report`, :meth:`release`), which names the reason.
        """
        if (
            token.report != report_id
            or token.request is not None
            or not self._may_release(token, "held", expires, now=now, max_queue=max_queue)
        ):
            return None
        opk = token.wrap.opk
        with self._transaction(savepoint=False) as db:
            if opk is None:
                cursor = db.execute(
                    _INSERT_TOKEN_IF + " WHERE " + _NO_REPORT + _TOKEN_IF_END,
                    (*pending_values(token), report_id),
                )
            else:
                cursor = db.execute(
                    _INSERT_TOKEN_IF + " WHERE " + _NO_REPORT + " AND " + _UNUSED_PREKEY
                    + _TOKEN_IF_END,
                    (*pending_values(token), report_id, opk, token.recipient, token.originator),
                )  # fmt: skip
            if cursor.rowcount != 1:
                return None  # nothing written
            assert cursor.lastrowid is not None
            self._use_checked_prekey(token)
            # No report under the id (checked by the insert above, in this same step).
            db.execute(
                _INSERT_RELEASED_REPORT,
                (report_id, originator, size, digest, expires, now, data, token.key_commit),
            )
            self._audit(AuditEvent.STORED, now=now, parties=(originator,), report=report_id)
            token_row = self._released(token, cursor.lastrowid, now=now)
        if token.recipient in self._queued:
            self._queued[token.recipient] += 1
        report = ReportRow(report_id, originator, size, digest, "released", None, expires, now)
        return report, token_row

    # --- prekeys -----------------------------------------------------------------------

    def publish_prekeys(
        self, owner: str, signed: Prekey | None, one_time: list[Prekey], *, max_one_time: int
    ) -> None:
        """Store ``owner``'s verified prekeys (one already stored is ignored).

        Raises:
            Refused: LIMIT, the one-time prekeys would exceed ``max_one_time`` (nothing
                of this publish is stored then).
        """
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO prekeys (owner, kind, key, encoded, not_after)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                [
                    (owner, prekey.kind.value, prekey.key, prekey.encoded, prekey.not_after)
                    for prekey in ([signed] if signed is not None else []) + one_time
                ],
            )
            (available,) = db.execute(
                "SELECT count(*) FROM prekeys WHERE owner = ? AND kind = 'one_time'"
                " AND taken_by IS NULL",
                (owner,),
            ).fetchone()
            if available > max_one_time:
                # Raised inside the transaction: the inserts above are rolled back.
                raise Refused(
                    Reason.LIMIT, f"at most {max_one_time} one-time prekeys are stored per member"
                )

    def prekey_status(self, owner: str, *, now: int) -> tuple[int, int]:
        """(``not_after`` of ``owner``'s newest valid signed prekey or 0, one-time prekeys
        still available)."""
        signed = self._db.execute(
            "SELECT not_after FROM prekeys WHERE owner = ? AND kind = 'signed'"
            " AND not_after > ? ORDER BY seq DESC LIMIT 1",
            (owner, now),
        ).fetchone()
        return (0 if signed is None else int(signed[0])), self._one_time_left(owner, now=now)

    def _handout_step(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction(savepoint=False)

    # --- audit -----------------------------------------------------------------------

    @property
    def audit_seq(self) -> int:
        """Sequence number of the last audit entry (0 when empty)."""
        return self._seq

    @property
    def audit_head(self) -> bytes:
        return self._head
