"""A member node's durable state: SQLite (WAL, synchronous=NORMAL, WAL fsynced by hand)
plus files beside it.

Layout of a store directory::

    member.db            the database (tables below)
    outbox/<id>.sealed   sealed report ciphertext waiting to be stored by the relay
    inbox/<token>/       a delivered report: ``body`` and ``a<i>`` per attachment
                         (prekey secrets live in member.db, table ``prekeys``)
    tmp/                 files being written; anything here at start-up is debris

Rules that make it crash-safe:

* A file is written, fsynced, renamed into place and its directory fsynced *before*
  the row that refers to it is committed. A crash in between leaves an unreferenced
  file, which :meth:`MemberStore.open` removes; never a row without its file.
* Every state change commits together with the event it causes (table ``events``), so
  an event is never lost and never reported for a change that did not happen.
* A release counter is incremented in the transaction that records the token, which
  commits before the token is sent: a counter value is never used twice.
* The seen-set (token and report ids) and the inbox row commit in one transaction, and
  the node acknowledges a delivery to the relay only after that commit.

* A one-time prekey's secret is deleted (and its public key kept as used) in the
  transaction that stores the report it opened, so the secret is gone, on disk, before
  the report reaches the application. SQLite's ``secure_delete`` zeroes the freed
  space in the database file; a later WAL checkpoint overwrites the WAL's old frames.

* A small report (at most ``Limits.max_inline_report`` bytes of ciphertext) is kept in
  its row (``outbox.data``, ``inbox.data``) instead of in files, so it costs one commit
  and no file, rename or directory fsync.

Group commit: a store opened with ``group_commit=True`` (the node's) runs each
:meth:`MemberStore.transaction` as a step of one open SQLite transaction that
:meth:`MemberStore.commit` commits (in a savepoint, or without one for the per-report
steps, which make every check before their first write); :attr:`MemberStore.barrier`
names the batch that must be on disk (:attr:`MemberStore.committed`) before the current
state may be announced (to the relay, to the application, or to a caller by
returning); :meth:`MemberStore.batch_of` names the earlier batch that wrote the rows of
a kind a reader announces (the kinds are the constants :data:`SUBMISSIONS`,
:data:`RELEASES`, ...), so that reader waits for that one and not for a batch unrelated
steps opened since. Files are unlinked only once the batch that dropped their row is on
disk.

Durability without an fsync on the event loop, by the same rule as the relay's store
(the batch bookkeeping and the full argument are in :mod:`tisa_io.durable`):
``synchronous=NORMAL``, so ``COMMIT`` only appends the batch's frames to
``member.db-wal``, and a batch counts as on disk (:meth:`MemberStore.mark_durable`)
only once an fsync of the WAL file that started after its COMMIT returned has completed
(:meth:`MemberStore.fsync_wal`, which the node runs in a worker thread); a failed fsync
poisons the store (:attr:`MemberStore.failed`) so nothing later is ever announced.
Without group commit every transaction is fsynced before it returns. In particular an
ack goes to the relay only after the inbox row's batch is fsynced, and a release token
only after the batch holding its counter is.

Everything here is synchronous and cheap except the fsyncs; the node calls it from its
trio thread (:meth:`MemberStore.fsync_wal` from a worker). One :class:`MemberStore` per
directory, one process at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sqlite3
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from typing import Any

from clients.events import Event, Released, encode_event, verified_on_decode
from tisa import encoding as enc
from tisa.consent import Announcement, Answer, Request
from tisa.envelope import open_envelope
from tisa.errors import ProtocolError, Reason, Refused, UsageError
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.report import ReportHeader
from tisa.token import MAX_TOKEN_SIZE, ReleaseToken
from tisa_io.durable import DurableStore

__all__ = [
    "CONSENT",
    "EVENTS",
    "INBOX",
    "OUTBOX_STATE",
    "RELEASES",
    "REVOCATIONS",
    "STORED",
    "SUBMISSIONS",
    "WANTED",
    "ConsentOut",
    "InboxEntry",
    "MemberStore",
    "Submission",
    "PendingRelease",
    "PendingRevocation",
    "RequestRecord",
    "WantedRelease",
    "fsync_dir",
    "read_store_name",
    "write_durably",
]

# 2: outbox.data and inbox.data (small reports kept in the row); 3: consent_out,
# requests, announcements; 4: wanted_releases, prekeys, used_prekeys (new tables only:
# a version-2 or -3 store just gains them, and wanted_releases.approves if it had the
# table without that column)
SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    report BLOB PRIMARY KEY,
    file TEXT NOT NULL,            -- ciphertext file name in outbox/, '' once dropped
    size INTEGER NOT NULL,
    digest BLOB NOT NULL,
    content_key BLOB NOT NULL,     -- kept to issue tokens later (hold, then release)
    scope TEXT NOT NULL,
    level TEXT NOT NULL,
    recipients TEXT NOT NULL,      -- JSON list of names
    expires INTEGER NOT NULL,
    created INTEGER NOT NULL,
    state TEXT NOT NULL,           -- queued | withdrawn | stored | refused | revoked
                                   -- | expired | dropped (withdrawn, then deleted)
    ack BLOB,
    reason TEXT,
    detail TEXT,
    data BLOB                      -- the ciphertext of a small report (then file is '')
);
CREATE TABLE IF NOT EXISTS releases (
    token BLOB PRIMARY KEY,
    report BLOB NOT NULL,
    recipient TEXT NOT NULL,
    counter INTEGER NOT NULL,
    encoded BLOB NOT NULL,
    created INTEGER NOT NULL,
    state TEXT NOT NULL,           -- pending | released | refused | revoked | expired
                                   -- | dropped
    reason TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS releases_state ON releases (state, created);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    report BLOB NOT NULL,
    token BLOB,
    state TEXT NOT NULL,           -- pending | revoked | refused
    reason TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS issued_counters (
    recipient TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_counters (
    originator TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS received_counters (
    originator TEXT NOT NULL,
    counter INTEGER NOT NULL,
    PRIMARY KEY (originator, counter)
);
CREATE TABLE IF NOT EXISTS seen (
    id BLOB NOT NULL,
    kind TEXT NOT NULL,            -- token | report
    at INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    token BLOB NOT NULL UNIQUE,
    report BLOB NOT NULL UNIQUE,
    originator TEXT NOT NULL,
    header BLOB NOT NULL,          -- canonical encoding of the verified ReportHeader
    dir TEXT NOT NULL,             -- directory name under inbox/
    received INTEGER NOT NULL,
    handed INTEGER NOT NULL DEFAULT 0,  -- 1 once the application acknowledged it
    receipt BLOB NOT NULL,         -- our signed receipt, sent to the originator
    receipt_sent INTEGER NOT NULL DEFAULT 0,  -- 1 once the relay confirmed it has it
    data BLOB                      -- a small report's parts (packed list); dir is ''
);
CREATE TABLE IF NOT EXISTS rejected (
    token BLOB PRIMARY KEY,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    token BLOB PRIMARY KEY,
    report BLOB NOT NULL,
    recipient TEXT NOT NULL,
    encoded BLOB NOT NULL,
    received INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    head BLOB NOT NULL,
    checkpoint BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_out (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,            -- announce | request | answer
    ref BLOB NOT NULL,             -- announcement id, or request id (request, answer)
    data BLOB NOT NULL,            -- the signed object, sent until the relay acks it
    state TEXT NOT NULL,           -- queued | held (the relay acked) | refused
    reason TEXT,
    detail TEXT,
    UNIQUE (kind, ref)
);
CREATE TABLE IF NOT EXISTS requests (
    id BLOB PRIMARY KEY,
    direction TEXT NOT NULL,       -- out: this member asked | in: this member was asked
    requester TEXT NOT NULL,
    originator TEXT NOT NULL,
    report BLOB NOT NULL,
    purpose TEXT NOT NULL,
    expires INTEGER NOT NULL,
    encoded BLOB NOT NULL,         -- the signed request
    state TEXT NOT NULL,           -- open | approved | denied | refused (by the relay)
    reason TEXT,                   -- the denial code (or the relay's refusal reason)
    note TEXT,
    token BLOB,                    -- the approving token's id
    answer BLOB,                   -- the signed denial
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS announcements (
    id BLOB PRIMARY KEY,
    originator TEXT NOT NULL,
    report BLOB NOT NULL,
    encoded BLOB NOT NULL,
    received INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS wanted_releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    report BLOB NOT NULL,
    recipient TEXT NOT NULL,
    valid_for INTEGER NOT NULL,
    state TEXT NOT NULL,           -- waiting (for the recipient's prekeys) | issued | refused
    token BLOB,
    reason TEXT,
    detail TEXT,
    approves BLOB                  -- the incoming release request the token approves
);
-- The releases still waiting for a token, found without a scan of every release ever
-- asked for (the node's issuer looks on every state change).
CREATE INDEX IF NOT EXISTS wanted_waiting ON wanted_releases (id) WHERE state = 'waiting';
CREATE TABLE IF NOT EXISTS prekeys (
    public BLOB PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('signed', 'one_time')),
    secret BLOB NOT NULL,
    created INTEGER NOT NULL,
    not_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS used_prekeys (
    public BLOB PRIMARY KEY,       -- a one-time prekey used (its secret deleted)
    not_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    data BLOB NOT NULL
);
"""

# Events kept for an application that does not consume them. Beyond this the oldest
# are dropped: each is also recorded in the state tables (outbox, releases, receipts,
# rejected), so nothing is lost, only its notification. 100,000 small rows is a few MB.
MAX_STORED_EVENTS = 100_000
# Events with a signed object kept in memory for the event feed (MemberStore.fresh_event):
# a few feeds' worth (EVENT_BUFFER is 16), so that an application that reads its events
# takes them all from memory, and one that does not holds at most this many objects.
MAX_FRESH_EVENTS = 1024
# Reports this store object stored and nobody has read from the inbox yet, kept decoded
# (header and a small report's parts, see MemberStore.inbox_after) so that the hand-over
# to the application does not decode what the node just verified: beyond
# Limits.delivery_window (256), the deliveries in flight at once, and few enough that a
# full set of inline reports (at most 64 KiB each) holds at most 16 MiB. When it is full
# a new delivery is not kept (the oldest, read first, stay).
MAX_FRESH_INBOX = 256

# Kinds of rows the node announces (sends to the relay, hands to the application),
# each marked by the steps that add or change such rows (DurableStore.wrote), so that
# a reader waits for the batch that wrote what it read (MemberStore.batch_of), not for
# whatever batch is open, and skips a query when nothing of its kind was written
# (MemberStore.kind_changes). A step that only takes rows out of what a reader reads
# marks nothing: announcing less before it is on disk is always safe.
SUBMISSIONS = "submissions"  # queued submissions (recorded, or queued again)
RELEASES = "releases"  # pending releases (a token issued)
OUTBOX_STATE = "outbox_state"  # a submission's state moved (withdrawn, ended, queued)
# A queued submission stored by the relay (MemberStore.mark_stored). Kept apart from
# OUTBOX_STATE because it makes nothing sendable: the relay answers a submission on the
# connection it came on, so the sender sent it there and its releases go out anyway;
# only a pending revocation waits for it. So the sender is not woken by each `stored`.
# A submission stored after it was withdrawn counts as OUTBOX_STATE.
STORED = "stored"
REVOCATIONS = "revocations"  # pending revocations
INBOX = "inbox"  # stored reports: handed to the application, their receipts sent
CONSENT = "consent"  # queued announcements, requests, denials
EVENTS = "events"  # events for the application
WANTED = "wanted"  # a release request ended (its token issued, or refused)
# Not a kind anything announces, so no batch is waited for: a release request added
# that the issuer has to take up (see MemberStore.want_release); it only counts.
WAITING = "waiting"

# Tokens per statement when a step names many reports (MemberStore.mark_handed_many):
# SQLite before 3.32 takes at most 999 host parameters in one statement.
_IN_CHUNK = 500


def fsync_dir(path: pathlib.Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name; durable on return."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Submission:
    """A row of the outbox."""

    report: bytes
    path: pathlib.Path | None
    size: int
    digest: bytes
    content_key: bytes = dataclasses.field(repr=False)
    scope: str
    level: str
    recipients: tuple[str, ...]
    expires: int
    created: int
    state: str
    ack: bytes | None
    reason: str | None
    detail: str | None
    data: bytes | None = None
    seq: int = 0  # the row's rowid: rows are queued in this order


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PendingRelease:
    token: bytes
    report: bytes
    recipient: str
    counter: int
    encoded: bytes
    state: str
    reason: str | None
    detail: str | None
    seq: int = 0  # the row's rowid: tokens are issued in this order


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WantedRelease:
    """A release asked for and recorded, issued once the recipient's prekeys are in."""

    id: int
    report: bytes
    recipient: str
    valid_for: int
    state: str  # waiting | issued | refused
    token: bytes | None
    reason: str | None
    detail: str | None
    # The id of the incoming release request (tisa.consent) the token approves, or None.
    approves: bytes | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PendingRevocation:
    id: int
    report: bytes
    token: bytes | None
    state: str
    reason: str | None
    detail: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsentOut:
    """An announcement, request or denial this member sent (or is sending) to the relay.

    ``state``: ``queued`` until the relay acks it, then ``held``; ``refused`` with the
    relay's ``reason`` and ``detail``.
    """

    seq: int
    kind: str
    ref: bytes
    data: bytes
    state: str
    reason: str | None
    detail: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """A release request this member made (``direction`` "out") or received ("in").

    ``state``: ``open``; ``approved`` (``token``: the approving token's id); ``denied``
    (``reason``: the denial code, ``note``); ``refused`` (by the relay; ``reason``).
    """

    id: bytes
    direction: str
    requester: str
    originator: str
    report: bytes
    purpose: str
    expires: int
    encoded: bytes
    state: str
    reason: str | None
    note: str | None
    token: bytes | None
    created: int

    @property
    def answered(self) -> bool:
        """Approved or denied: a request is answered once, and finally."""
        return self.state in ("approved", "denied")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class InboxEntry:
    seq: int
    token: bytes
    header: ReportHeader
    dir: pathlib.Path
    handed: bool
    receipt: bytes
    receipt_sent: bool
    parts: list[bytes] | None = None  # a small report's body and attachments


def read_store_name(path: str | os.PathLike[str]) -> str | None:
    """The member name a store directory belongs to, read without opening it for
    writing; None if there is no store there yet."""
    db_path = pathlib.Path(path) / "member.db"
    if not db_path.exists():
        return None
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'name'").fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return str(row[0]) if row else None


class MemberStore(DurableStore):
    """The durable state of one member node (see the module docstring).

    Args:
        path: the store directory; created if missing.
        name: the member's name, recorded on first use and checked afterwards so a
            store is never opened as another member.
    """

    def __init__(
        self, path: str | os.PathLike[str], name: str, *, group_commit: bool = False
    ) -> None:
        super().__init__()
        self.root = pathlib.Path(path)
        self.group_commit = False  # the set-up below commits as it goes
        self.closed = False  # set by close(): nothing may be written after it
        # Counts the writes that may end waiting releases wholesale (a report's final
        # state ends its releases still waiting for a token): a node waiting for its
        # releases looks again when it moved. (The node's issuer ends them one by one
        # and wakes whoever waits for that one.)
        self.wanted_ended = 0
        # State kept in memory beside its rows, so that a per-report step need not read
        # it back (each dropped after any rollback, and read again from the rows):
        # the last counter issued per recipient and seen per originator, the signed
        # prekeys' secrets, and the tokens issued for each report still to go out
        # (token id, encoding; see fresh_tokens).
        self._issued_last: dict[str, int] = {}
        self._seen_last: dict[str, int] = {}
        self._signed_secrets: dict[bytes, bytes] = {}
        self._fresh_tokens: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._fresh_events: dict[int, Event] = {}
        self._fresh_inbox: dict[bytes, tuple[ReportHeader, list[bytes] | None]] = {}
        # Whether a revocation may be pending (set at open, and by record_revocation):
        # without one, the sender need not look for revocations whenever a
        # submission's state moves.
        self.revocations_known = True
        self.outbox_dir = self.root / "outbox"
        self.inbox_dir = self.root / "inbox"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.root, self.outbox_dir, self.inbox_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / "member.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: COMMIT does not fsync; fsync_wal does, before anything is announced.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Freed pages are zeroed: a deleted prekey secret leaves no copy in member.db.
        self._db.execute("PRAGMA secure_delete=ON")
        # executescript commits on its own; the statements are idempotent.
        self._db.executescript(_SCHEMA)
        with self.transaction() as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT INTO meta VALUES ('name', ?)", (name,))
            elif stored.get("name") != name:
                raise UsageError(f"store at {self.root} belongs to {stored.get('name')!r}")
            elif stored.get("schema") in ("1", "2", "3"):
                if stored.get("schema") == "1":
                    db.execute("ALTER TABLE outbox ADD COLUMN data BLOB")
                    db.execute("ALTER TABLE inbox ADD COLUMN data BLOB")
                # Versions 3 and 4 only added tables, made by the script above; a store
                # that had wanted_releases before it named the approved request gains
                # the column.
                columns = {row[1] for row in db.execute("PRAGMA table_info(wanted_releases)")}
                if "approves" not in columns:
                    db.execute("ALTER TABLE wanted_releases ADD COLUMN approves BLOB")
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
            elif stored.get("schema") != str(SCHEMA_VERSION):
                raise UsageError(f"store schema {stored.get('schema')} is not supported")
        self._clean_debris()
        self.revocations_known = (
            self._db.execute("SELECT 1 FROM revocations WHERE state = 'pending' LIMIT 1").fetchone()
            is not None
        )
        # The WAL file may be new: make its directory entry durable once.
        fsync_dir(self.root)
        self.group_commit = group_commit

    @property
    def wal_path(self) -> pathlib.Path:
        """The WAL file (``member.db-wal``) that :meth:`fsync_wal` fsyncs."""
        return self.root / "member.db-wal"

    def close(self) -> None:
        """Commit what is pending and close."""
        try:
            self.commit_durably()
        finally:
            self.closed = True
            self._db.close()

    @contextlib.contextmanager
    def transaction(self, *, savepoint: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on normal exit, rolled back on any error.

        With group commit, one step of the open batch instead: rolled back alone on an
        error, committed with the batch by :meth:`commit`. ``savepoint=False`` for a step
        that makes every check before its first write (the per-report steps: two
        statements fewer each); should one raise after a write all the same (an SQLite
        error), the whole batch is lost, as when its COMMIT fails (see
        :meth:`tisa_io.durable.DurableStore._step`)."""
        if self._in_step or (not self.group_commit and self._db.in_transaction):
            raise UsageError("nested store transaction")
        with self._step(savepoint=savepoint) if self.group_commit else self._single() as db:
            yield db

    def _rolled_back(self) -> None:
        # What the rolled-back writes put in memory is read from the rows again, and
        # every reader that skips a query while its kind did not change looks again
        # (an undone change may bring a row back: a release request waiting again).
        # Every kind a step ever marked is counted (a kind never marked has nothing to
        # undo), so a kind added later needs no list of its own here.
        for kind in list(self.kind_changes):
            self.kind_changes[kind] += 1
        self._issued_last.clear()
        self._seen_last.clear()
        self._signed_secrets.clear()
        self._fresh_tokens.clear()
        self._fresh_events.clear()
        self._fresh_inbox.clear()

    def _clean_debris(self) -> None:
        # Files that no committed row refers to: written before a crash that came
        # before their row. Their content is either in the database elsewhere (a
        # redelivery will bring it back) or never acknowledged to anyone.
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        files = {row[0] for row in self._db.execute("SELECT file FROM outbox WHERE file != ''")}
        for entry in self.outbox_dir.iterdir():
            if entry.name not in files:
                entry.unlink(missing_ok=True)
        dirs = {row[0] for row in self._db.execute("SELECT dir FROM inbox WHERE dir != ''")}
        for entry in self.inbox_dir.iterdir():
            if entry.name not in dirs:
                shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _record(event: Event) -> tuple[str, bytes, Event]:
        # What _event writes, encoded ahead: a step without a savepoint encodes its
        # events before its first write, so that nothing it checks can fail after one.
        return (*encode_event(event), event)

    def _event(self, db: sqlite3.Connection, event: Event | tuple[str, bytes, Event]) -> None:
        # An event or its record (_record).
        self._events(db, [event if isinstance(event, tuple) else self._record(event)])

    def _events(self, db: sqlite3.Connection, records: Sequence[tuple[str, bytes, Event]]) -> None:
        # Several events' records (_record), in order, in one INSERT: a step that records
        # several (a `stored` that also releases its tokens) takes one statement for all.
        if not records:
            return
        self.wrote(EVENTS)
        if len(records) == 1:
            kind, data, _ = records[0]
            last = db.execute(
                "INSERT INTO events (kind, data) VALUES (?, ?)", (kind, data)
            ).lastrowid
        else:
            values = ", ".join(["(?, ?)"] * len(records))
            last = db.execute(
                f"INSERT INTO events (kind, data) VALUES {values}",
                [value for kind, data, _ in records for value in (kind, data)],
            ).lastrowid
        assert last is not None
        # The rows of one INSERT take consecutive seqs (AUTOINCREMENT: each one more
        # than the largest ever), the last one's is lastrowid.
        for seq, (kind, _, event) in enumerate(records, start=last - len(records) + 1):
            if verified_on_decode(kind):
                # Handed over from memory (see fresh_event), its signature not checked again.
                fresh = self._fresh_events
                fresh[seq] = event
                if len(fresh) > MAX_FRESH_EVENTS:
                    del fresh[next(iter(fresh))]
        # Bound the table; see MAX_STORED_EVENTS. (last is the newest row's: no query
        # for the maximum, and no DELETE at all until the bound is first reached.)
        if last > MAX_STORED_EVENTS:
            db.execute("DELETE FROM events WHERE seq <= ?", (last - MAX_STORED_EVENTS,))

    def fresh_event(self, seq: int) -> Event | None:
        """Event ``seq`` as this store object wrote it, if it is one whose record
        carries a signed object (a stored ack, a receipt, consent) and is still held in
        memory (at most :data:`MAX_FRESH_EVENTS`, newest kept; none after a restart or
        a rollback); taken out. None: decode its record (which verifies the signature
        again, as for anything read from disk). Saves verifying, per report, the
        signatures the node verified before it recorded them."""
        return self._fresh_events.pop(seq, None)

    def add_event(self, event: Event) -> None:
        """Record an event that goes with no other state change."""
        with self.transaction() as db:
            self._event(db, event)

    # --- outbox (originator) ---------------------------------------------------------

    def record_submission(
        self,
        *,
        report: bytes,
        file: str,
        size: int,
        digest: bytes,
        content_key: bytes,
        scope: str,
        level: str,
        recipients: tuple[str, ...],
        expires: int,
        created: int,
        data: bytes | None = None,
    ) -> Submission:
        """Queue a sealed report whose ciphertext file is already durable in outbox/
        (or, with ``data`` and ``file`` '', whose ciphertext is ``data``); returns its
        row as :meth:`submission` would read it."""
        with self.transaction(savepoint=False) as db:
            self.wrote(SUBMISSIONS)
            seq = db.execute(
                "INSERT INTO outbox (report, file, size, digest, content_key, scope, level,"
                " recipients, expires, created, state, data)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,'queued',?)",
                (
                    report,
                    file,
                    size,
                    digest,
                    content_key,
                    scope,
                    level,
                    json.dumps(list(recipients)),
                    expires,
                    created,
                    data,
                ),
            ).lastrowid
        assert seq is not None
        return Submission(
            report=report,
            path=self.outbox_dir / file if file else None,
            size=size,
            digest=digest,
            content_key=content_key,
            scope=scope,
            level=level,
            recipients=recipients,
            expires=expires,
            created=created,
            state="queued",
            ack=None,
            reason=None,
            detail=None,
            data=data,
            seq=seq,
        )

    def _submission(self, row: tuple[Any, ...]) -> Submission:
        return Submission(
            report=row[0],
            path=self.outbox_dir / row[1] if row[1] else None,
            size=row[2],
            digest=row[3],
            content_key=row[4],
            scope=row[5],
            level=row[6],
            recipients=tuple(json.loads(row[7])),
            expires=row[8],
            created=row[9],
            state=row[10],
            ack=row[11],
            reason=row[12],
            detail=row[13],
            data=row[14],
            seq=row[15],
        )

    _SUBMISSION_COLUMNS = (
        "report, file, size, digest, content_key, scope, level, recipients, expires,"
        " created, state, ack, reason, detail, data, rowid"
    )

    def submission(self, report: bytes) -> Submission | None:
        row = self._db.execute(
            f"SELECT {self._SUBMISSION_COLUMNS} FROM outbox WHERE report = ?", (report,)
        ).fetchone()
        return self._submission(row) if row else None

    def queued_submissions(self, *, after: int = 0) -> list[Submission]:
        """Submissions the relay has not acknowledged, oldest first; with ``after``,
        only those queued after the one whose :attr:`Submission.seq` it is."""
        if after:
            rows = self._db.execute(
                f"SELECT {self._SUBMISSION_COLUMNS} FROM outbox"
                " WHERE rowid > ? AND state = 'queued' ORDER BY rowid",
                (after,),
            ).fetchall()
            return [self._submission(row) for row in rows]
        rows = self._db.execute(
            f"SELECT {self._SUBMISSION_COLUMNS} FROM outbox WHERE state = 'queued'"
            " ORDER BY created, rowid"
        ).fetchall()
        return [self._submission(row) for row in rows]

    def mark_stored(
        self,
        report: bytes,
        ack: bytes,
        event: Event,
        *,
        digest: bytes,
        size: int,
        released: Sequence[bytes] = (),
    ) -> bool:
        """Record the relay's ack and drop the local ciphertext, if the submission of
        ``report`` is queued (or withdrawn: the relay stored it before it was withdrawn)
        and its ciphertext has this ``digest`` and ``size`` (what the ack signs). False,
        with nothing written, otherwise (the caller tells a copy of an earlier ack from
        a wrong one by reading the row). A small report (no file) takes one statement
        for the check and the change.

        ``released``: tokens the relay accepted with the submission (``submit_inline``),
        each marked as :meth:`mark_released` would, in the same step; the events (the
        ack's, then each release's) are written in one statement. When this returns
        False they are not marked (the caller does that after its check).

        A queued submission stored counts as a change of :data:`STORED`, a withdrawn
        one of :data:`OUTBOX_STATE` (see there)."""
        record = self._record(event)
        where = "report = ? AND digest = ? AND size = ?"
        change = "UPDATE outbox SET state = 'stored', ack = ?, file = '', data = NULL WHERE "
        with self.transaction(savepoint=False) as db:
            file = ""
            small = db.execute(
                change + where + " AND state = 'queued' AND file = ''", (ack, report, digest, size)
            )
            kind = STORED
            if not small.rowcount:
                # A file to remove once this is on disk, or a withdrawn submission (or
                # no such submission).
                row = db.execute(
                    "SELECT file, state FROM outbox WHERE "
                    + where
                    + " AND state IN ('queued', 'withdrawn')",
                    (report, digest, size),
                ).fetchone()
                if row is None:
                    return False
                file = row[0]
                if row[1] != "queued":
                    kind = OUTBOX_STATE
                db.execute(change + "report = ?", (ack, report))
            self.wrote(kind)
            records = [record]
            for token in released:
                recipient = self._release_accepted(db, token)
                if recipient is not None:
                    records.append(
                        self._record(Released(report=report, token=token, recipient=recipient))
                    )
            self._events(db, records)
        self._fresh_tokens.pop(report, None)
        if file:
            # After the commit: a crash before this unlink leaves debris, cleaned later.
            self._remove_after_commit(self.outbox_dir / file)
        return True

    def withdraw_submission(self, report: bytes) -> None:
        """A queued submission becomes withdrawn: kept, sealed, but not sent."""
        with self.transaction() as db:
            self.wrote(OUTBOX_STATE)
            db.execute(
                "UPDATE outbox SET state = 'withdrawn' WHERE report = ? AND state = 'queued'",
                (report,),
            )

    def requeue_submission(self, report: bytes) -> None:
        """A withdrawn submission is queued again (its pending releases follow it)."""
        with self.transaction() as db:
            self.wrote(SUBMISSIONS)
            self.wrote(OUTBOX_STATE)
            db.execute(
                "UPDATE outbox SET state = 'queued' WHERE report = ? AND state = 'withdrawn'",
                (report,),
            )

    def unsent_submissions(self) -> list[Submission]:
        """Submissions the relay has not acknowledged, queued or withdrawn, oldest first."""
        rows = self._db.execute(
            f"SELECT {self._SUBMISSION_COLUMNS} FROM outbox"
            " WHERE state IN ('queued', 'withdrawn') ORDER BY created, rowid"
        ).fetchall()
        return [self._submission(row) for row in rows]

    def set_submission_state(
        self,
        report: bytes,
        state: str,
        event: Event | None,
        *,
        reason: str = "",
        detail: str = "",
    ) -> None:
        """Final state other than stored (refused, revoked, expired, dropped), with its
        event (none for a change the application made itself)."""
        self._fresh_tokens.pop(report, None)
        with self.transaction() as db:
            row = db.execute("SELECT file FROM outbox WHERE report = ?", (report,)).fetchone()
            self.wrote(OUTBOX_STATE)
            db.execute(
                "UPDATE outbox SET state = ?, reason = ?, detail = ?, file = '', data = NULL"
                " WHERE report = ?",
                (state, reason or None, detail or None, report),
            )
            # Releases not yet accepted can never be now.
            db.execute(
                "UPDATE releases SET state = ?, reason = ? WHERE report = ? AND state = 'pending'",
                (state, reason or state, report),
            )
            # Nor can releases not issued yet (waiting for the recipient's prekeys).
            self.wanted_ended += 1
            self.wrote(WANTED)
            db.execute(
                "UPDATE wanted_releases SET state = 'refused', reason = ?"
                " WHERE report = ? AND state = 'waiting'",
                (reason or state, report),
            )
            if event is not None:
                self._event(db, event)
        if row and row[0]:
            self._remove_after_commit(self.outbox_dir / row[0])

    # --- releases (originator) -------------------------------------------------------

    def want_release(
        self,
        report: bytes,
        recipient: str,
        valid_for: int,
        *,
        approves: bytes | None = None,
        issued_here: bool = False,
    ) -> int:
        """Record that ``report`` is to be released to ``recipient`` (a token valid for
        ``valid_for`` seconds from when it is issued, approving the incoming release
        request ``approves`` if given); returns the request's id. It counts as a change
        of :data:`WAITING` (the issuer looks for requests to take up) unless
        ``issued_here``: the caller ends it itself before any checkpoint, or calls
        :meth:`waiting_added` if it cannot."""
        if not issued_here:
            self.waiting_added()
        with self.transaction(savepoint=False) as db:
            cursor = db.execute(
                "INSERT INTO wanted_releases (report, recipient, valid_for, state, approves)"
                " VALUES (?, ?, ?, 'waiting', ?)",
                (report, recipient, valid_for, approves),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def waiting_added(self) -> None:
        """Count a change of :data:`WAITING`: a release request may wait for the issuer."""
        self.kind_changes[WAITING] += 1

    _WANTED_COLUMNS = "id, report, recipient, valid_for, state, token, reason, detail, approves"

    def _wanted(self, row: tuple[Any, ...]) -> WantedRelease:
        return WantedRelease(
            id=row[0],
            report=row[1],
            recipient=row[2],
            valid_for=row[3],
            state=row[4],
            token=row[5],
            reason=row[6],
            detail=row[7],
            approves=None if row[8] is None else bytes(row[8]),
        )

    def wanted_release(self, wanted: int) -> WantedRelease | None:
        """The release request ``wanted`` (see :meth:`want_release`), or None."""
        row = self._db.execute(
            f"SELECT {self._WANTED_COLUMNS} FROM wanted_releases WHERE id = ?", (wanted,)
        ).fetchone()
        return self._wanted(row) if row else None

    def waiting_releases(self, limit: int = -1) -> list[WantedRelease]:
        """Releases asked for and not issued yet, oldest first (at most ``limit``; -1:
        all)."""
        rows = self._db.execute(
            f"SELECT {self._WANTED_COLUMNS} FROM wanted_releases WHERE state = 'waiting'"
            " ORDER BY id LIMIT ?",
            (limit,),
        ).fetchall()
        return [self._wanted(row) for row in rows]

    def refuse_wanted(self, wanted: int, reason: str, detail: str, event: Event) -> None:
        """A release that could not be issued (no prekey, a substituted one, ...)."""
        with self.transaction() as db:
            self.wrote(WANTED)
            db.execute(
                "UPDATE wanted_releases SET state = 'refused', reason = ?, detail = ?"
                " WHERE id = ? AND state = 'waiting'",
                (reason, detail, wanted),
            )
            self._event(db, event)

    def issue_release(
        self,
        report: bytes,
        recipient: str,
        make_token: Callable[[int], bytes],
        now: int,
        *,
        wanted: int | None = None,
        approves: bytes | None = None,
        token_id: bytes | None = None,
    ) -> bytes:
        """Take the next counter for ``recipient``, issue the token and record it.

        ``token_id``: the id ``make_token`` gives the token (the caller chose it, see
        :func:`tisa.token.issue_token`); without it the id is read from the token.

        The counter increment and the pending release commit together, before the
        caller sends anything; so does the end of the request ``wanted`` it answers.
        With ``approves`` (an open incoming release request's id) that request is marked
        approved by this token in the same transaction.

        The last counter per recipient is kept in memory once read (read again after a
        rollback). The conditional writes (the end of ``wanted``, the approval) come
        first, so a refusal comes before any write and needs no savepoint, unless both
        are given.

        Returns:
            The token id.
        """
        last = self._issued_last.get(recipient)
        with self.transaction(savepoint=wanted is not None and approves is not None) as db:
            if last is None:
                row = db.execute(
                    "SELECT last FROM issued_counters WHERE recipient = ?", (recipient,)
                ).fetchone()
                last = row[0] if row else 0
            counter = last + 1
            encoded = make_token(counter)
            if token_id is None:
                # Its id, read from the token issued here without decoding it whole
                # (its fields were checked when it was made): a third of the decode's
                # cost.
                _, fields, _ = open_envelope(encoded, max_size=MAX_TOKEN_SIZE, what="token")
                token_id = fields["id"]
                if type(token_id) is not bytes:
                    raise ProtocolError("token: no id")
            if wanted is not None:
                # A request ended meanwhile (its report refused, say) issues nothing: the
                # whole step, counter included, is undone.
                cursor = db.execute(
                    "UPDATE wanted_releases SET state = 'issued', token = ?"
                    " WHERE id = ? AND state = 'waiting'",
                    (token_id, wanted),
                )
                if cursor.rowcount == 0:
                    raise Refused(Reason.EXPIRED, "the release request ended before its token")
                self.wrote(WANTED)
            if approves is not None:
                # Denied (or approved) meanwhile: nothing is issued, as above.
                cursor = db.execute(
                    "UPDATE requests SET state = 'approved', token = ?"
                    " WHERE id = ? AND direction = 'in' AND state = 'open'",
                    (token_id, approves),
                )
                if cursor.rowcount != 1:
                    raise Refused(Reason.ANSWERED, "no open request with this id to this member")
            db.execute(
                "INSERT INTO issued_counters VALUES (?, ?)"
                " ON CONFLICT (recipient) DO UPDATE SET last = excluded.last",
                (recipient, counter),
            )
            db.execute(
                "INSERT INTO releases (token, report, recipient, counter, encoded, created, state)"
                " VALUES (?,?,?,?,?,?,'pending')",
                (token_id, report, recipient, counter, encoded, now),
            )
            self.wrote(RELEASES)
        self._issued_last[recipient] = counter
        self._fresh_tokens.setdefault(report, []).append((token_id, encoded))
        return token_id

    def fresh_tokens(self, report: bytes) -> list[tuple[bytes, bytes]] | None:
        """The tokens issued by this store object for ``report`` (id, encoding), in the
        order issued, all still pending, while its submission is queued; None when not
        known in memory (after a restart or a rollback, or once a release of the
        report changed state): read :meth:`releases_of` instead. Saves the sender
        reading back the tokens it puts inline in a ``submit_inline``."""
        return self._fresh_tokens.get(report)

    _RELEASE_COLUMNS = "token, report, recipient, counter, encoded, state, reason, detail, rowid"

    def _release(self, row: tuple[Any, ...]) -> PendingRelease:
        return PendingRelease(
            token=row[0],
            report=row[1],
            recipient=row[2],
            counter=row[3],
            encoded=row[4],
            state=row[5],
            reason=row[6],
            detail=row[7],
            seq=row[8],
        )

    def release(self, token: bytes) -> PendingRelease | None:
        row = self._db.execute(
            f"SELECT {self._RELEASE_COLUMNS} FROM releases WHERE token = ?", (token,)
        ).fetchone()
        return self._release(row) if row else None

    def releases_of(self, report: bytes) -> list[PendingRelease]:
        rows = self._db.execute(
            f"SELECT {self._RELEASE_COLUMNS} FROM releases WHERE report = ? ORDER BY rowid",
            (report,),
        ).fetchall()
        return [self._release(row) for row in rows]

    def releases_to_send(
        self, *, after: int = 0, submitted: Container[bytes] = frozenset()
    ) -> list[PendingRelease]:
        """Pending releases that may go to the relay, in the order they were issued:
        those whose report the relay has stored, and those of reports in ``submitted``
        (whose submission went out on the current connection, so the relay handles the
        release after it); never those of a withdrawn submission. With ``after``, only
        releases issued after the one whose :attr:`PendingRelease.seq` it is.

        The list stops before the first pending release that may not go yet (its
        submission has not been sent), so a caller that remembers the last ``seq`` it
        got skips none.
        """
        rows = self._db.execute(
            f"SELECT {', '.join('r.' + c for c in self._RELEASE_COLUMNS.split(', '))},"
            " o.state FROM releases r JOIN outbox o ON o.report = r.report"
            " WHERE r.rowid > ? AND r.state = 'pending' AND o.state != 'withdrawn'"
            " ORDER BY r.rowid",
            (after,),
        ).fetchall()
        out: list[PendingRelease] = []
        for row in rows:
            if row[-1] != "stored" and row[1] not in submitted:
                break
            out.append(self._release(row))
        return out

    def set_release_state(
        self, token: bytes, state: str, event: Event | None, *, reason: str = "", detail: str = ""
    ) -> bool:
        """Move a pending release to ``state``. False (and no event) if it was not pending."""
        record = None if event is None else self._record(event)
        self._fresh_tokens.clear()  # rare (a refusal, a revocation): all read again
        with self.transaction(savepoint=False) as db:
            if state == "pending":
                self.wrote(RELEASES)
            cursor = db.execute(
                "UPDATE releases SET state = ?, reason = ?, detail = ?"
                " WHERE token = ? AND state = 'pending'",
                (state, reason or None, detail or None, token),
            )
            if cursor.rowcount == 0:
                return False
            if record is not None:
                self._event(db, record)
        return True

    def mark_released(self, token: bytes, report: bytes) -> bool:
        """The relay accepted the pending release ``token`` (of ``report``): released,
        with its :class:`~clients.events.Released` event naming the recipient read in
        the same statement. False (and no event) if it was not pending."""
        with self.transaction(savepoint=False) as db:
            recipient = self._release_accepted(db, token)
            if recipient is None:
                return False
            self._event(db, Released(report=report, token=token, recipient=recipient))
        tokens = self._fresh_tokens.pop(report, None)
        if tokens is not None and (left := [t for t in tokens if t[0] != token]):
            self._fresh_tokens[report] = left
        return True

    @staticmethod
    def _release_accepted(db: sqlite3.Connection, token: bytes) -> str | None:
        # The pending release ``token`` becomes released; its recipient, or None when it
        # was not pending (nothing written).
        row = db.execute(
            "UPDATE releases SET state = 'released', reason = NULL, detail = NULL"
            " WHERE token = ? AND state = 'pending' RETURNING recipient",
            (token,),
        ).fetchall()
        return str(row[0][0]) if row else None

    def force_release_state(self, token: bytes, state: str, event: Event) -> None:
        """Record a relay-side outcome (expired, revoked) whatever the local state was."""
        self._fresh_tokens.clear()
        with self.transaction() as db:
            if state == "pending":
                self.wrote(RELEASES)
            db.execute("UPDATE releases SET state = ? WHERE token = ?", (state, token))
            self._event(db, event)

    # --- revocations (originator) ----------------------------------------------------

    def record_revocation(self, report: bytes, token: bytes | None) -> int:
        """Queue a revocation; releases of it not yet sent are withdrawn at once."""
        self._fresh_tokens.clear()  # rare: the tokens left pending are read again
        self.revocations_known = True
        with self.transaction() as db:
            self.wrote(REVOCATIONS)
            cursor = db.execute(
                "INSERT INTO revocations (report, token, state) VALUES (?, ?, 'pending')",
                (report, token),
            )
            if token is None:
                db.execute(
                    "UPDATE releases SET state = 'revoked' WHERE report = ? AND state = 'pending'",
                    (report,),
                )
            else:
                db.execute(
                    "UPDATE releases SET state = 'revoked' WHERE token = ? AND state = 'pending'",
                    (token,),
                )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def _revocation(self, row: tuple[Any, ...]) -> PendingRevocation:
        return PendingRevocation(
            id=row[0], report=row[1], token=row[2], state=row[3], reason=row[4], detail=row[5]
        )

    def revocation(self, rev_id: int) -> PendingRevocation | None:
        row = self._db.execute(
            "SELECT id, report, token, state, reason, detail FROM revocations WHERE id = ?",
            (rev_id,),
        ).fetchone()
        return self._revocation(row) if row else None

    def revocations_to_send(self) -> list[PendingRevocation]:
        rows = self._db.execute(
            "SELECT v.id, v.report, v.token, v.state, v.reason, v.detail FROM revocations v"
            " JOIN outbox o ON o.report = v.report"
            " WHERE v.state = 'pending' AND o.state != 'queued' ORDER BY v.id"
        ).fetchall()
        return [self._revocation(row) for row in rows]

    def pending_revocation(self, report: bytes, token: bytes | None) -> PendingRevocation | None:
        row = self._db.execute(
            "SELECT id, report, token, state, reason, detail FROM revocations"
            " WHERE report = ? AND token IS ? AND state = 'pending' ORDER BY id LIMIT 1",
            (report, token),
        ).fetchone()
        return self._revocation(row) if row else None

    def set_revocation_state(
        self, rev_id: int, state: str, event: Event, *, reason: str = "", detail: str = ""
    ) -> None:
        self._fresh_tokens.clear()
        with self.transaction() as db:
            row = db.execute(
                "SELECT report, token FROM revocations WHERE id = ?", (rev_id,)
            ).fetchone()
            if state == "pending":
                self.wrote(REVOCATIONS)
            db.execute(
                "UPDATE revocations SET state = ?, reason = ?, detail = ? WHERE id = ?",
                (state, reason or None, detail or None, rev_id),
            )
            if state == "revoked" and row is not None:
                report, token = row
                if token is None:
                    self.wrote(OUTBOX_STATE)
                    db.execute("UPDATE outbox SET state = 'revoked' WHERE report = ?", (report,))
                    db.execute(
                        "UPDATE releases SET state = 'revoked' WHERE report = ?"
                        " AND state IN ('pending', 'released')",
                        (report,),
                    )
                else:
                    db.execute("UPDATE releases SET state = 'revoked' WHERE token = ?", (token,))
            self._event(db, event)

    # --- receipts (originator) -------------------------------------------------------

    def add_receipt(
        self,
        *,
        token: bytes,
        report: bytes,
        recipient: str,
        encoded: bytes,
        now: int,
        event: Event,
        of_release: bool = False,
    ) -> bool:
        """Record a verified receipt. False if it was already known (no new event).
        ``of_release``: only if this node issued ``token`` for ``report`` to
        ``recipient`` (checked in the same statement); False otherwise too."""
        record = self._record(event)
        with self.transaction(savepoint=False) as db:
            values = (token, report, recipient, encoded, now)
            cursor = (
                db.execute(
                    "INSERT OR IGNORE INTO receipts SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1"
                    " FROM releases WHERE token = ? AND report = ? AND recipient = ?)",
                    (*values, token, report, recipient),
                )
                if of_release
                else db.execute("INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?, ?)", values)
            )
            if cursor.rowcount == 0:
                return False
            self._event(db, record)
        return True

    def receipts(self) -> list[bytes]:
        return [r[0] for r in self._db.execute("SELECT encoded FROM receipts ORDER BY rowid")]

    # --- deliveries (recipient) ------------------------------------------------------

    def seen(self, kind: str, ident: bytes) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM seen WHERE kind = ? AND id = ?", (kind, ident)
        ).fetchone()
        return row is not None

    def seen_delivery(self, token: bytes, report: bytes) -> tuple[bool, bool]:
        """Whether token id ``token`` and whether report id ``report`` are in the
        seen-set, in one query (a delivery checks both)."""
        kinds = {
            row[0]
            for row in self._db.execute(
                "SELECT kind FROM seen WHERE (kind = 'token' AND id = ?)"
                " OR (kind = 'report' AND id = ?)",
                (token, report),
            )
        }
        return "token" in kinds, "report" in kinds

    def rejected(self, token: bytes) -> bool:
        return (
            self._db.execute("SELECT 1 FROM rejected WHERE token = ?", (token,)).fetchone()
            is not None
        )

    def missing_counters(self, originator: str, *, limit: int = 1000) -> list[int]:
        """Release counters of ``originator`` below the highest one received that never
        arrived (at most ``limit``, lowest first): releases the relay dropped, or the
        originator revoked before delivery."""
        rows = self._db.execute(
            "SELECT counter FROM received_counters WHERE originator = ? ORDER BY counter",
            (originator,),
        ).fetchall()
        missing: list[int] = []
        expected = 1
        for (counter,) in rows:
            missing.extend(range(expected, min(counter, expected + limit - len(missing))))
            if len(missing) >= limit:
                break
            expected = counter + 1
        return missing[:limit]

    def last_counter(self, originator: str) -> int:
        """The highest release counter of ``originator`` received (kept in memory once
        read)."""
        last = self._seen_last.get(originator)
        if last is None:
            row = self._db.execute(
                "SELECT last FROM seen_counters WHERE originator = ?", (originator,)
            ).fetchone()
            last = self._seen_last[originator] = int(row[0]) if row else 0
        return last

    def store_delivery(
        self,
        *,
        token: ReleaseToken,
        header: ReportHeader,
        staged: pathlib.Path | None,
        receipt: bytes,
        now: int,
        events: list[Event],
        parts: list[bytes] | None = None,
    ) -> None:
        """Move a verified delivery from tmp/ into the inbox and commit it as seen; a
        token that approves one of this member's requests closes it as approved, and
        the one-time prekey its token names (if any) is deleted in the same transaction.

        ``staged`` is a directory under tmp/ whose files are already fsynced. The rename
        and the directory fsync happen before the commit, so a committed row always has
        its files. A small report comes as ``parts`` (body, then attachments) instead,
        kept in the row.
        """
        name = ""
        if staged is not None:
            name = token.id.hex()
            target = self.inbox_dir / name
            if target.exists():  # debris of a crash between rename and commit
                shutil.rmtree(target)
            os.replace(staged, target)
            fsync_dir(self.inbox_dir)
            fsync_dir(self.tmp_dir)
        records = [self._record(event) for event in events]
        header_record = enc.pack(header.to_dict())
        with self.transaction(savepoint=False) as db:
            self.wrote(INBOX)
            db.execute(
                "INSERT INTO inbox (token, report, originator, header, dir, received, receipt,"
                " data) VALUES (?,?,?,?,?,?,?,?)",
                (
                    token.id,
                    header.id,
                    header.originator,
                    header_record,
                    name,
                    now,
                    receipt,
                    None if parts is None else enc.pack({"parts": parts}),
                ),
            )
            db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, 'token', ?), (?, 'report', ?)",
                (token.id, now, header.id, now),
            )
            self._bump_counter(db, token)
            if token.request is not None:
                db.execute(
                    "UPDATE requests SET state = 'approved', token = ?"
                    " WHERE id = ? AND direction = 'out' AND state = 'open'",
                    (token.id, token.request),
                )
            self._consume_prekey(db, token)
            for record in records:
                self._event(db, record)
        self._counter_seen(token)
        if len(self._fresh_inbox) < MAX_FRESH_INBOX:
            self._fresh_inbox[token.id] = (header, None if parts is None else list(parts))

    def _consume_prekey(self, db: sqlite3.Connection, token: ReleaseToken) -> None:
        public = token.wrap.opk
        if public is None:
            return
        self._signed_secrets.pop(public, None)
        rows = db.execute(
            "DELETE FROM prekeys WHERE public = ? RETURNING not_after", (public,)
        ).fetchall()
        if rows:
            db.execute("INSERT OR IGNORE INTO used_prekeys VALUES (?, ?)", (public, rows[0][0]))

    @staticmethod
    def _bump_counter(db: sqlite3.Connection, token: ReleaseToken) -> None:
        db.execute(
            "INSERT INTO seen_counters VALUES (?, ?) ON CONFLICT (originator)"
            " DO UPDATE SET last = MAX(last, excluded.last)",
            (token.originator, token.counter),
        )
        db.execute(
            "INSERT OR IGNORE INTO received_counters VALUES (?, ?)",
            (token.originator, token.counter),
        )

    def reject_delivery(
        self,
        *,
        token_id: bytes,
        token: ReleaseToken | None,
        reason: str,
        detail: str,
        now: int,
        events: list[Event],
        consumed: ReleaseToken | None = None,
    ) -> None:
        """Record a delivery that was refused here (its token id joins the seen-set).

        ``consumed``: a token whose key was unwrapped before the report failed to open;
        its one-time prekey is deleted all the same (it is one-time)."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO rejected VALUES (?, ?, ?, ?)",
                (token_id, reason, detail, now),
            )
            db.execute("INSERT OR IGNORE INTO seen VALUES (?, 'token', ?)", (token_id, now))
            if token is not None:
                self._bump_counter(db, token)
            if consumed is not None:
                self._consume_prekey(db, consumed)
            for event in events:
                self._event(db, event)
        if token is not None:
            self._counter_seen(token)

    def _counter_seen(self, token: ReleaseToken) -> None:
        # After the step that bumped seen_counters: its value, if it is in memory.
        last = self._seen_last.get(token.originator)
        if last is not None and token.counter > last:
            self._seen_last[token.originator] = token.counter

    # --- prekeys -----------------------------------------------------------------------

    def add_prekeys(self, secrets: list[PrekeySecret]) -> None:
        """Keep new prekey secrets (committed with the batch, before they are published)."""
        with self.transaction(savepoint=False) as db:
            db.executemany(
                "INSERT INTO prekeys VALUES (?, ?, ?, ?, ?)",
                [(p.public, p.kind.value, p.secret, p.created, p.not_after) for p in secrets],
            )

    def _prekey(self, row: tuple[Any, ...]) -> PrekeySecret:
        return PrekeySecret(
            kind=PrekeyKind(row[0]), secret=bytes(row[1]), created=row[2], not_after=row[3]
        )

    def signed_prekey(self) -> PrekeySecret | None:
        """The newest signed prekey (the one published), or None before the first."""
        row = self._db.execute(
            "SELECT kind, secret, created, not_after FROM prekeys WHERE kind = 'signed'"
            " ORDER BY created DESC, not_after DESC LIMIT 1"
        ).fetchone()
        return None if row is None else self._prekey(row)

    def one_time_prekeys(self, *, now: int) -> list[PrekeySecret]:
        """The unused one-time prekeys still valid at ``now``, oldest first."""
        rows = self._db.execute(
            "SELECT kind, secret, created, not_after FROM prekeys WHERE kind = 'one_time'"
            " AND not_after > ? ORDER BY created, rowid",
            (now,),
        ).fetchall()
        return [self._prekey(row) for row in rows]

    def prekey_secret(self, kind: PrekeyKind, public: bytes) -> bytes:
        """The secret of this member's prekey ``public`` of ``kind``.

        Raises:
            Refused: ``replayed`` for a one-time prekey already used (its secret is
                gone), ``unknown_prekey`` for one this node does not hold (never made, or
                deleted after its grace window).
        """
        if kind is PrekeyKind.SIGNED:
            # The signed prekeys' secrets are kept in memory once read (a handful: one
            # per rotation within the grace window), until deleted.
            secret = self._signed_secrets.get(public)
            if secret is not None:
                return secret
        row = self._db.execute(
            "SELECT secret FROM prekeys WHERE public = ? AND kind = ?", (public, kind.value)
        ).fetchone()
        if row is not None:
            if kind is PrekeyKind.SIGNED:
                self._signed_secrets[public] = bytes(row[0])
            return bytes(row[0])
        used = self._db.execute("SELECT 1 FROM used_prekeys WHERE public = ?", (public,)).fetchone()
        if used is not None:
            raise Refused(Reason.REPLAYED, "this one-time prekey was used by an earlier token")
        raise Refused(Reason.UNKNOWN_PREKEY, f"no {kind.value} prekey {public.hex()[:16]} here")

    def delete_old_prekeys(self, *, now: int, grace: int) -> int:
        """Delete the prekey secrets whose ``not_after + grace`` has passed (and the
        used-prekey records as old); returns how many secrets were deleted."""
        self._signed_secrets.clear()  # read again from what is left
        with self.transaction(savepoint=False) as db:
            deleted = db.execute(
                "DELETE FROM prekeys WHERE not_after + ? <= ?", (grace, now)
            ).rowcount
            db.execute("DELETE FROM used_prekeys WHERE not_after + ? <= ?", (grace, now))
        return int(deleted)

    def _inbox(self, row: tuple[Any, ...]) -> InboxEntry:
        # A report this store object stored comes decoded from memory, once (taken out:
        # read again, as after a restart, it is decoded from its row).
        fresh = self._fresh_inbox.pop(row[1], None)
        if fresh is None:
            header = ReportHeader.decode(row[2])
            parts = None if row[7] is None else list(enc.unpack(row[7])["parts"])
        else:
            header, parts = fresh
        return InboxEntry(
            seq=row[0],
            token=row[1],
            header=header,
            dir=self.inbox_dir / row[3],
            handed=bool(row[4]),
            receipt=row[5],
            receipt_sent=bool(row[6]),
            parts=parts,
        )

    _INBOX_COLUMNS = "seq, token, header, dir, handed, receipt, receipt_sent, data"

    def inbox_after(self, seq: int, *, limit: int) -> list[InboxEntry]:
        """Reports the application has not acknowledged, after ``seq``, oldest first."""
        rows = self._db.execute(
            f"SELECT {self._INBOX_COLUMNS} FROM inbox WHERE handed = 0 AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [self._inbox(row) for row in rows]

    def inbox_all(self) -> list[tuple[InboxEntry, int]]:
        """Every report in the inbox, acknowledged or not, with its reception time
        (unix seconds), oldest first. Read only."""
        rows = self._db.execute(
            f"SELECT {self._INBOX_COLUMNS}, received FROM inbox ORDER BY seq"
        ).fetchall()
        return [(self._inbox(row[:-1]), int(row[-1])) for row in rows]

    def inbox_received(self, token: bytes) -> int | None:
        """When the report delivered under ``token`` was stored (unix seconds)."""
        row = self._db.execute("SELECT received FROM inbox WHERE token = ?", (token,)).fetchone()
        return int(row[0]) if row else None

    def inbox_entry(self, token: bytes) -> InboxEntry | None:
        row = self._db.execute(
            f"SELECT {self._INBOX_COLUMNS} FROM inbox WHERE token = ?", (token,)
        ).fetchone()
        return self._inbox(row) if row else None

    def mark_handed(self, token: bytes) -> bool:
        """The application acknowledged the report of ``token``: it is not handed over
        again. Returns False when no report of ``token`` is in the inbox."""
        self._fresh_inbox.pop(token, None)  # never read again
        with self.transaction(savepoint=False) as db:
            return db.execute("UPDATE inbox SET handed = 1 WHERE token = ?", (token,)).rowcount == 1

    def mark_handed_many(self, tokens: Iterable[bytes]) -> list[bytes]:
        """:meth:`mark_handed` for several reports, in one step: all of them or, when
        any is not in the inbox, none. Returns the tokens not in the inbox (empty when
        all were marked); a token given twice counts once."""
        unique = list(dict.fromkeys(tokens))
        if len(unique) == 1:
            return [] if self.mark_handed(unique[0]) else unique
        if not unique:
            return []
        chunks = [unique[i : i + _IN_CHUNK] for i in range(0, len(unique), _IN_CHUNK)]
        with self.transaction(savepoint=False) as db:
            # Every check before the first write (a step without a savepoint).
            found: set[bytes] = set()
            for chunk in chunks:
                marks = ",".join("?" * len(chunk))
                query = f"SELECT token FROM inbox WHERE token IN ({marks})"
                found.update(row[0] for row in db.execute(query, chunk))
            missing = [token for token in unique if token not in found]
            if missing:
                return missing
            for chunk in chunks:
                marks = ",".join("?" * len(chunk))
                db.execute(f"UPDATE inbox SET handed = 1 WHERE token IN ({marks})", chunk)
            for token in unique:
                self._fresh_inbox.pop(token, None)
        return []

    def receipts_to_send(self, *, after: int = 0) -> list[tuple[int, bytes, bytes]]:
        """(inbox seq, token id, receipt) of stored reports whose receipt the relay has
        not confirmed yet (they are sent on every connection until it does), oldest
        first; with ``after``, only those stored after inbox entry ``after``."""
        return list(
            self._db.execute(
                "SELECT seq, token, receipt FROM inbox WHERE seq > ? AND receipt_sent = 0"
                " ORDER BY seq",
                (after,),
            )
        )

    def mark_receipt_sent(self, token: bytes) -> None:
        """The relay confirmed it holds the receipt of ``token``."""
        with self.transaction(savepoint=False) as db:
            db.execute("UPDATE inbox SET receipt_sent = 1 WHERE token = ?", (token,))

    # --- consent: announcements, requests, answers ------------------------------------

    _CONSENT_COLUMNS = "seq, kind, ref, data, state, reason, detail"

    def _consent_out(self, row: tuple[Any, ...]) -> ConsentOut:
        return ConsentOut(
            seq=row[0],
            kind=row[1],
            ref=bytes(row[2]),
            data=bytes(row[3]),
            state=row[4],
            reason=row[5],
            detail=row[6],
        )

    def queue_consent(
        self,
        kind: str,
        ref: bytes,
        data: bytes,
        *,
        request: Request | None = None,
        denial: Answer | None = None,
    ) -> None:
        """Queue a signed announcement, request or denial for the relay. With
        ``request`` (this member's own), record it as open; with ``denial``, close the
        incoming request it answers, which must be open (else UsageError)."""
        with self.transaction() as db:
            self.wrote(CONSENT)
            db.execute(
                "INSERT INTO consent_out (kind, ref, data, state) VALUES (?, ?, ?, 'queued')",
                (kind, ref, data),
            )
            if request is not None:
                self._insert_request(db, request, "out")
            if denial is not None:
                cursor = db.execute(
                    "UPDATE requests SET state = 'denied', reason = ?, note = ?, answer = ?"
                    " WHERE id = ? AND direction = 'in' AND state = 'open'",
                    (denial.reason.value, denial.note, denial.encoded, denial.request),
                )
                if cursor.rowcount != 1:
                    raise UsageError("no open request with this id to this member")

    @staticmethod
    def _insert_request(db: sqlite3.Connection, request: Request, direction: str) -> None:
        db.execute(
            "INSERT INTO requests (id, direction, requester, originator, report, purpose,"
            " expires, encoded, state, created) VALUES (?,?,?,?,?,?,?,?,'open',?)",
            (
                request.id,
                direction,
                request.requester,
                request.originator,
                request.report,
                request.purpose,
                request.expires,
                request.encoded,
                request.time,
            ),
        )

    def consent_out(self, kind: str, ref: bytes) -> ConsentOut | None:
        """What this member queued of ``kind`` with id ``ref``, in its current state."""
        row = self._db.execute(
            f"SELECT {self._CONSENT_COLUMNS} FROM consent_out WHERE kind = ? AND ref = ?",
            (kind, ref),
        ).fetchone()
        return self._consent_out(row) if row else None

    def consent_to_send(self, *, after: int = 0) -> list[ConsentOut]:
        """Queued consent objects the relay has not acked, oldest first, after ``after``."""
        rows = self._db.execute(
            f"SELECT {self._CONSENT_COLUMNS} FROM consent_out"
            " WHERE seq > ? AND state = 'queued' ORDER BY seq",
            (after,),
        ).fetchall()
        return [self._consent_out(row) for row in rows]

    def consent_held(self, kind: str, ref: bytes) -> bool:
        """The relay acked it. False if nothing of that kind and id was queued."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE consent_out SET state = 'held'"
                " WHERE kind = ? AND ref = ? AND state = 'queued'",
                (kind, ref),
            )
            return cursor.rowcount > 0

    def consent_refused(self, ref: bytes, reason: str, detail: str, event: Event) -> bool:
        """The relay refused the queued object with id ``ref``: record it (a refused
        request of this member's is closed as refused) and ``event``. False if no
        queued object has that id."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT kind FROM consent_out WHERE ref = ? AND state = 'queued'", (ref,)
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "UPDATE consent_out SET state = 'refused', reason = ?, detail = ?"
                " WHERE ref = ? AND state = 'queued'",
                (reason, detail, ref),
            )
            if row[0] == "request":
                db.execute(
                    "UPDATE requests SET state = 'refused', reason = ?"
                    " WHERE id = ? AND direction = 'out' AND state = 'open'",
                    (reason, ref),
                )
            self._event(db, event)
        return True

    _REQUEST_COLUMNS = (
        "id, direction, requester, originator, report, purpose, expires, encoded, state,"
        " reason, note, token, created"
    )

    def _request(self, row: tuple[Any, ...]) -> RequestRecord:
        return RequestRecord(
            id=bytes(row[0]),
            direction=row[1],
            requester=row[2],
            originator=row[3],
            report=bytes(row[4]),
            purpose=row[5],
            expires=row[6],
            encoded=bytes(row[7]),
            state=row[8],
            reason=row[9],
            note=row[10],
            token=None if row[11] is None else bytes(row[11]),
            created=row[12],
        )

    def request(self, request_id: bytes, direction: str) -> RequestRecord | None:
        """This member's request (``direction`` "out") or one made to it ("in")."""
        row = self._db.execute(
            f"SELECT {self._REQUEST_COLUMNS} FROM requests WHERE id = ? AND direction = ?",
            (request_id, direction),
        ).fetchone()
        return self._request(row) if row else None

    def requests(self, direction: str | None = None) -> list[RequestRecord]:
        """Every request, or those of one ``direction``, oldest first."""
        rows = self._db.execute(
            f"SELECT {self._REQUEST_COLUMNS} FROM requests"
            " WHERE ? IS NULL OR direction = ? ORDER BY rowid",
            (direction, direction),
        ).fetchall()
        return [self._request(row) for row in rows]

    def denial_of(self, request_id: bytes) -> bytes | None:
        """The signed denial recorded for a request, or None."""
        row = self._db.execute("SELECT answer FROM requests WHERE id = ?", (request_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def add_incoming_request(self, request: Request, event: Event) -> None:
        """Record a checked request made to this member, with its event."""
        with self.transaction() as db:
            self._insert_request(db, request, "in")
            db.execute(
                "INSERT OR IGNORE INTO seen VALUES (?, 'request', ?)", (request.id, request.time)
            )
            self._event(db, event)

    def add_denial(self, answer: Answer, event: Event) -> None:
        """Close this member's open request as denied by a checked ``answer``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE requests SET state = 'denied', reason = ?, note = ?, answer = ?"
                " WHERE id = ? AND direction = 'out' AND state = 'open'",
                (answer.reason.value, answer.note, answer.encoded, answer.request),
            )
            self._event(db, event)

    def add_announcement(self, announcement: Announcement, now: int, event: Event) -> None:
        """Record a checked announcement made to this member, with its event."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO announcements (id, originator, report, encoded, received)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    announcement.id,
                    announcement.originator,
                    announcement.report,
                    announcement.encoded,
                    now,
                ),
            )
            self._event(db, event)

    def announcement_bytes(self, announcement_id: bytes) -> bytes | None:
        """The signed announcement recorded under this id, or None."""
        row = self._db.execute(
            "SELECT encoded FROM announcements WHERE id = ?", (announcement_id,)
        ).fetchone()
        return bytes(row[0]) if row else None

    def announcements(self) -> list[bytes]:
        """Announcements received, oldest first (signed encodings)."""
        return [
            bytes(r[0])
            for r in self._db.execute("SELECT encoded FROM announcements ORDER BY rowid")
        ]

    # --- audit -----------------------------------------------------------------------

    def audit_checkpoint(self) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT seq, head FROM audit WHERE id = 1").fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def audit_checkpoint_bytes(self) -> bytes | None:
        """The relay-signed checkpoint last verified, as received (None before any)."""
        row = self._db.execute("SELECT checkpoint FROM audit WHERE id = 1").fetchone()
        return bytes(row[0]) if row else None

    def set_audit_checkpoint(self, seq: int, head: bytes, checkpoint: bytes) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO audit VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " seq = excluded.seq, head = excluded.head, checkpoint = excluded.checkpoint",
                (seq, head, checkpoint),
            )

    # --- events ----------------------------------------------------------------------

    def events_after(self, seq: int, *, limit: int) -> list[tuple[int, str, bytes]]:
        return list(
            self._db.execute(
                "SELECT seq, kind, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
        )

    def drop_event(self, seq: int) -> None:
        """The application has taken event ``seq``: forget it."""
        with self.transaction(savepoint=False) as db:
            db.execute("DELETE FROM events WHERE seq = ?", (seq,))
