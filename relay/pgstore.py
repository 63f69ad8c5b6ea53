"""The relay's durable state in PostgreSQL (psycopg 3): the store several relay
processes can share.

Same interface and rules as the SQLite store (:mod:`relay.store`,
:class:`relay.storage.RelayStore`); what differs:

* **Where things live.** One database schema holds one relay store (the store address's
  ``search_path`` picks it; one schema per arrangement). Small ciphertexts are kept in
  their report's row (``reports.data``), larger ones in ``blob_chunks`` rows of
  :data:`BLOB_CHUNK` bytes each, written and read a chunk at a time (constant memory),
  so every relay process on the database can read them.
* **Schema.** Created and migrated by the relay when the store opens, under an advisory
  lock (two processes starting together do not race); ``tisa_schema`` holds the version
  (:data:`SCHEMA_VERSION`; a store of version 1 gains the consent tables in place).
* **Release requests** (announcements, requests, answers) follow the same rules as with
  SQLite, in the same code (:mod:`relay.consentstore`); a consent object queued for a
  member NOTIFYs the member's name like a delivery does, and the member's connections
  read the queue on from the last ``seq`` they sent: identity values are drawn in
  commit order, since every consent step (and every receipt, read the same way) takes
  the ordering lock (:meth:`PgStore._exclusive`, a transaction advisory lock) before
  its insert and holds it to its batch's COMMIT, so no row can appear later below one
  already read. The same lock keeps a consent step's checks from racing another
  process's (one answer per request, the hourly rate). Deliveries and notices need no
  such order: a member's connections look at them again from the start whenever
  another process tells of new ones (``NOTIFY``, the poll).
* **Group commit.** As with SQLite: every method is one step of the open batch (a
  savepoint, or none for a step that makes every check before its first write: a
  report's ``stored``, ``released``, ``forwarded`` and ``acknowledged`` steps; a
  failed statement spoils a PostgreSQL transaction, so such a step whose statement
  fails loses the whole batch, as a failed COMMIT does), one transaction on the
  store's connection. :meth:`PgStore.commit` COMMITs it
  with ``synchronous_commit = off``: the server writes the commit record into its WAL
  but does not wait for the flush (SQLite's ``synchronous=NORMAL`` COMMIT). A batch
  counts as durable only after :meth:`PgStore.fsync_wal`, which commits one tiny write
  (a row of ``wal_sync`` per store) on a second connection with ``synchronous_commit``
  at the server's setting: PostgreSQL flushes the WAL up to that commit's record, which
  lies after every batch COMMITted before, and with a synchronous standby configured
  waits for the standby as well. A transaction that wrote nothing is committed without
  a flush, hence the write. The second connection touches nothing of the first, so the
  event loop may go on using the store while a worker thread runs it, as with SQLite.
  If the server crashes between the two, the batch may be lost and so is the second
  connection: the flush fails, nothing of the batch was announced.
* **The server going away** (a crash, a restart, a failover) is survived: a lost
  connection or a failed flush marks every batch not yet durable lost (whoever waits on
  one closes its connection; members send again), and the store connects again on its
  next use (:meth:`PgStore._lose`, :meth:`PgStore._main`), at most once every
  :data:`RECONNECT_INTERVAL` seconds, raising :class:`relay.storage.StoreUnavailable`
  meanwhile (the relay closes that connection with ``busy``). Unlike SQLite after a
  failed fsync, nothing is poisoned: what the restarted server holds is what it has on
  disk.
* **The audit chain** is one hash chain per store: ``audit_head`` holds its last
  sequence number and head. A batch's entries wait in memory, unnumbered; right
  before its COMMIT the batch locks that row (``SELECT … FOR UPDATE``), numbers and
  chains the entries from it, appends them all and moves the head in one statement,
  and releases the row by committing (:meth:`PgStore._flush_audit`). Appends from
  several processes are serialized in commit order, and the row is held for three
  round trips per batch, not for the batch: another process's batch runs its steps
  meanwhile. Holding the head, a batch waits for nothing else, so no deadlock goes
  through it. (Reading the audit log inside an open batch appends its entries first,
  as SQLite does, and then holds the head to the COMMIT.)
* **Checks and writes of two processes.** Without a lock every batch takes, what one
  process's open batch is changing must be locked where another's check depends on it:
  a release locks its report's row (``FOR NO KEY UPDATE``), a revocation the report's
  and the token's, so a release never passes its checks against a report being
  revoked; an expiry skips rows another batch holds (``SKIP LOCKED``); a state change
  names the state it leaves (an ack updates only a delivery still owed). Such a wait
  lasts until the other batch commits (milliseconds); past :data:`LOCK_TIMEOUT_MS`,
  or when two batches wait for each other (PostgreSQL's deadlock detection picks one),
  the step is :class:`relay.storage.StoreBusy` and the member tries again.
* **Several processes.** A batch that queues something for a member NOTIFYs its name at
  COMMIT; :meth:`PgStore.watch` hears it and polls every :data:`POLL_INTERVAL` seconds
  besides. A delivery is claimed with a session advisory lock (:meth:`PgStore.claim`)
  before it is pushed. Rows read outside this process's batches are announced only after
  a flush of its own (:meth:`PgStore._seen`).
* **Tokens.** ``tokens.id`` is unique: a token is consumed once, whichever process sees
  it. A second process inserting the same id waits for the first's batch to end and
  then inserts nothing (``ON CONFLICT DO NOTHING``): refused as a replay.
* **Limits counted across processes** (a recipient's queue, a member's one-time
  prekeys) count what is committed plus the open batch's own rows: two processes'
  batches open at once may together pass one by what each adds before committing.
* **Ciphertext lifetime.** A large upload goes to a temporary file (:meth:`write` is
  cheap), then :meth:`PgBlobWriter.place`, in a worker thread, copies it into
  ``blobs``/``blob_chunks`` on a pooled connection and commits synchronously before the
  report's row is added. The chunks are deleted in the transaction that deletes their
  report. A placed blob whose row never came (its process died) is swept after
  :data:`ORPHAN_GRACE` seconds.

Blocking calls: the methods run their statements in the calling (trio) thread, as the
SQLite store does; each is one short statement on a local connection, and the event
loop would spend longer handing it to a thread and back (see
:data:`tisa_io.durable.INLINE_FSYNC_MAX_STEPS`) than waiting for it. The slow steps, the
WAL flush (:meth:`PgStore.fsync_wal`) and copying a large ciphertext in
(:meth:`PgBlobWriter.place`), run in worker threads, as with SQLite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, BinaryIO

import psycopg
import psycopg_pool
import trio
from psycopg.pq import TransactionStatus

from relay.prekeystore import PrekeyTables
from relay.store import (
    InlineBlob,
    ReportRow,
    StoreBusy,
    StoreUnavailable,
    TokenRow,
)
from relay.tokenstore import OWED, PENDING_COLUMNS, TokenTables, pending_values, release_refusal
from tisa.audit import (
    GENESIS,
    AuditEvent,
    chain_next,
    content_hash_of,
    entry_bytes,
    sorted_parties,
)
from tisa.errors import Reason, Refused, UsageError
from tisa.keys import Hash, Hasher, random_id
from tisa.prekeys import Prekey
from tisa.token import ReleaseToken
from tisa_io.durable import DurableStore

__all__ = [
    "BLOB_CHUNK",
    "POLL_INTERVAL",
    "LOCK_TIMEOUT_MS",
    "ORPHAN_GRACE",
    "StoreUnavailable",
    "SCHEMA_VERSION",
    "PgBlobWriter",
    "PgStore",
]

# 2: requests, announcements, consent_queue (release requests); 3: prekeys; 4:
# prekey_rate (relay.prekeystore). Each added new tables only, so a store of schema 1 to 3
# is upgraded in place.
SCHEMA_VERSION = 4

# Bytes of ciphertext per blob_chunks row: large enough that a report of many MiB is a
# few dozen rows, small enough that a reader holds little (one row at a time).
BLOB_CHUNK = 256 * 1024

# Seconds a placed blob may wait for its report's row before it counts as the leftover
# of a process that died between the two (the row follows within a batch, normally
# milliseconds; an hour leaves room for a stalled process without keeping junk long).
ORPHAN_GRACE = 3600

# Seconds to wait for the server when connecting.
CONNECT_TIMEOUT = 10

# Milliseconds a step waits for a lock (the audit chain head, held by another relay
# process while it commits; the ordering lock or a row, held by another process's open
# batch) before it fails: that process commits within a batch's time (milliseconds); a
# wait this long means it is stuck, and this process's event loop, which waits in
# line, must not hang with it.
LOCK_TIMEOUT_MS = 5000

# Seconds between looks at the store when no notification came: LISTEN/NOTIFY is only
# a hint (a notification is lost when the listening connection drops), the rows are the
# truth. Each look costs every connected member one query; a second bounds how late a
# delivery released through another relay process can be if its hint is lost.
POLL_INTERVAL = 1.0

# After the server went away: seconds between attempts to connect again (a store method
# called meanwhile raises StoreUnavailable at once), and the timeout of one attempt,
# short because it runs in the event loop's thread.
RECONNECT_INTERVAL = 1.0
RECONNECT_TIMEOUT = 2

# Connections for uploads being placed at once (worker threads copying into the
# database); a further one waits for a free connection.
UPLOAD_CONNECTIONS = 4

# Advisory lock taken while the schema is created or migrated.
_SCHEMA_LOCK = int.from_bytes(hashlib.blake2b(b"tisa-relay-schema", digest_size=8).digest()) >> 1
# Transaction advisory lock of PgStore._exclusive: receipts and consent objects (rows
# read on from the last seq sent) and the consent steps' check-then-write.
_ORDER_LOCK = int.from_bytes(hashlib.blake2b(b"tisa-relay-order", digest_size=8).digest()) >> 1


log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE tisa_schema (version integer NOT NULL);
CREATE TABLE reports (
    id bytea PRIMARY KEY,
    originator text NOT NULL,
    size bigint NOT NULL,
    digest bytea NOT NULL,
    state text NOT NULL CHECK (state IN ('held', 'released', 'deleted')),
    ended text,
    expires bigint NOT NULL,
    stored_at bigint NOT NULL,
    key_commit bytea,
    data bytea,                    -- the ciphertext of a small report
    blob bytea                     -- else the blobs row holding it in chunks
);
CREATE INDEX reports_expiry ON reports (state, expires);
CREATE INDEX reports_blob ON reports (blob);
CREATE TABLE blobs (
    id bytea PRIMARY KEY,
    placed bigint NOT NULL         -- unix time; for sweeping blobs whose row never came
);
CREATE TABLE blob_chunks (
    blob bytea NOT NULL REFERENCES blobs (id) ON DELETE CASCADE,
    n integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (blob, n)
);
CREATE TABLE tokens (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id bytea NOT NULL UNIQUE,
    report bytea NOT NULL,
    recipient text NOT NULL,
    originator text NOT NULL,
    token bytea NOT NULL,
    counter bigint NOT NULL,
    state text NOT NULL
        CHECK (state IN ('pending', 'delivered', 'acked', 'revoked', 'expired')),
    not_after bigint NOT NULL,
    keep_until bigint NOT NULL
);
CREATE INDEX tokens_recipient ON tokens (recipient, state, seq);
CREATE INDEX tokens_report ON tokens (report, state);
CREATE INDEX tokens_expiry ON tokens (state, not_after);
CREATE TABLE receipts (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    originator text NOT NULL,
    token bytea NOT NULL UNIQUE,
    receipt bytea NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'acked'))
);
CREATE INDEX receipts_originator ON receipts (originator, state, seq);
CREATE TABLE notices (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    member text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('expired', 'revoked')),
    report bytea NOT NULL,
    token bytea
);
CREATE INDEX notices_member ON notices (member, seq);
CREATE TABLE audit (
    seq bigint PRIMARY KEY,
    entry bytea NOT NULL,
    content bytea NOT NULL,
    head bytea NOT NULL
);
CREATE TABLE audit_head (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL,
    head bytea NOT NULL
);
CREATE TABLE wal_sync (
    slot bytea PRIMARY KEY,        -- one per open store
    n bigint NOT NULL,
    touched bigint NOT NULL
);
"""
# Schema 3: prekeys (tisa.prekeys); what a store of schema 1 or 2 gains when opened.
_PREKEY_SCHEMA = """
CREATE TABLE IF NOT EXISTS prekeys (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('signed', 'one_time')),
    key bytea NOT NULL UNIQUE,
    encoded bytea NOT NULL,
    not_after bigint NOT NULL,
    taken_by text,                 -- one-time: the originator it was handed out to
    used_by bytea                  -- one-time: the token id that used it
);
CREATE INDEX IF NOT EXISTS prekeys_owner ON prekeys (owner, kind, taken_by, seq);
"""
# Schema 4: one-time prekeys handed to each originator, per slot (relay.prekeystore).
_PREKEY_RATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS prekey_rate (
    owner text NOT NULL,
    taker text NOT NULL,
    slot bigint NOT NULL,
    handed bigint NOT NULL,
    PRIMARY KEY (owner, taker, slot)
);
"""

# Schema 2: release requests (relay.consentstore), in a store of schema 1 added as is.
_CONSENT_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id bytea PRIMARY KEY,
    requester text NOT NULL,
    originator text NOT NULL,
    report bytea NOT NULL,
    request bytea NOT NULL,        -- the signed request, as received
    state text NOT NULL CHECK (state IN ('open', 'approved', 'denied')),
    answer bytea,                  -- the signed denial, once denied
    expires bigint NOT NULL,
    received bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_rate ON requests (requester, received);
CREATE TABLE IF NOT EXISTS announcements (
    id bytea PRIMARY KEY,
    report bytea NOT NULL,
    announcement bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS announcements_report ON announcements (report);
CREATE TABLE IF NOT EXISTS consent_queue (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    member text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('announce', 'request', 'answer')),
    ref bytea NOT NULL,            -- announcement id, or request id (request, answer)
    data bytea NOT NULL,
    UNIQUE (member, kind, ref)
);
CREATE INDEX IF NOT EXISTS consent_member ON consent_queue (member, seq);
"""


def _limit(limit: int) -> int | None:
    # -1 means all (the SQLite store's LIMIT -1); PostgreSQL spells it LIMIT NULL.
    return None if limit < 0 else limit


def _unavailable(exc: BaseException) -> StoreUnavailable:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreUnavailable(f"cannot reach the relay's PostgreSQL store: {detail}")


def _connect(
    dsn: str, *, timeout: int = CONNECT_TIMEOUT, **options: Any
) -> psycopg.Connection[tuple[Any, ...]]:
    try:
        return psycopg.connect(dsn, connect_timeout=timeout, **options)
    except psycopg.Error as exc:
        raise _unavailable(exc) from None


class _Session:
    """The store's connection as its methods use it: opened again after the server went
    away (:meth:`PgStore._lose`), and a lost connection raised as StoreUnavailable."""

    def __init__(self, store: PgStore) -> None:
        self._store = store

    def execute(self, query: str, params: Any = None) -> psycopg.Cursor[tuple[Any, ...]]:
        conn = self._store._main()
        try:
            cursor = conn.execute(query, params)
            if cursor.rowcount > 0 and not query.startswith("SELECT"):
                # A step's write (see PgStore._changes); an INSERT that met its
                # conflict (ON CONFLICT DO NOTHING) wrote nothing.
                self._store._writes += 1
            return cursor
        except psycopg.errors.LockNotAvailable:
            # lock_timeout: another relay process held what this needs too long (the
            # audit chain head while it commits, the ordering lock, or a row).
            raise StoreBusy(
                "another relay process holds the audit chain or a row too long"
            ) from None
        except psycopg.errors.DeadlockDetected:
            # Two processes' open batches waited for each other's rows: one is told.
            raise StoreBusy("another relay process holds a row this step needs") from None
        except psycopg.OperationalError as exc:
            if not (conn.broken or conn.closed):
                raise
            self._store._lose(exc)
            raise _unavailable(exc) from None

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        return self._store._main().transaction()


def _claim_key(token_id: bytes) -> int:
    # A bigint advisory lock key from the (random) token id.
    return int.from_bytes(token_id[:8], "big", signed=True)


def _listen(listener: psycopg.Connection[Any], stop: threading.Event, own: int) -> list[str]:
    """In a worker thread: the members named by the next notification of another
    process, or [] after POLL_INTERVAL without one. Closes ``listener`` if the waiting
    task was cancelled meanwhile (``stop``)."""
    try:
        return [
            notice.payload
            for notice in listener.notifies(timeout=POLL_INTERVAL, stop_after=1)
            if notice.pid != own
        ]
    finally:
        if stop.is_set():
            listener.close()


class PgBlobWriter:
    """One large upload in progress: a temporary file and a running digest; placed into
    the database by :meth:`place` (blocking: run it in a worker thread). Same interface
    as :class:`relay.store.BlobWriter`."""

    __slots__ = ("_blob", "_file", "_hasher", "_placed", "_report", "_store", "written")

    def __init__(self, store: PgStore, report_id: bytes) -> None:
        self._store = store
        self._report = report_id
        self._blob = random_id()
        self._file: IO[bytes] | None = tempfile.TemporaryFile()  # noqa: SIM115 - closed in abort
        self._hasher = Hasher(Hash.CIPHERTEXT)
        self._placed = False
        self.written = 0

    def write(self, data: bytes) -> None:
        """Add ``data`` to the temporary file (page cache; no waiting)."""
        if self._file is None or self._placed:
            raise UsageError("the upload is finished")
        self._file.write(data)
        self._hasher.update(data)
        self.written += len(data)

    def digest(self) -> bytes:
        """The ciphertext digest of everything written (call once, at the end)."""
        return self._hasher.finish()

    def place(self) -> None:
        """Copy the ciphertext into ``blobs``/``blob_chunks`` a chunk at a time and
        commit durably. Blocking."""
        if self._file is None or self._placed:
            raise UsageError("the upload is finished")
        file = self._file
        file.flush()
        file.seek(0)
        try:
            self._copy_in(file)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise _unavailable(exc) from None
        self._placed = True
        self._store._placed[self._report] = self._blob

    def _copy_in(self, file: IO[bytes]) -> None:
        with self._store._uploads.connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO blobs (id, placed) VALUES (%s, %s)", (self._blob, int(time.time()))
            )
            n = 0
            while data := file.read(BLOB_CHUNK):
                conn.execute(
                    "INSERT INTO blob_chunks (blob, n, data) VALUES (%s, %s, %s)",
                    (self._blob, n, data),
                )
                n += 1

    def abort(self) -> None:
        """Drop the temporary file; safe at any point, also after :meth:`place`."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def data(self) -> bytes | None:
        """None: the ciphertext is in the database, in chunks."""
        return None


class _ChunkReader(io.RawIOBase):
    """A report's ciphertext read from ``blob_chunks`` a row at a time."""

    def __init__(self, store: PgStore, blob: bytes) -> None:
        super().__init__()
        self._store = store
        self._blob = blob
        self._next = 0
        self._buffer = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._buffer and not self._done:
            row = self._store._conn.execute(
                "SELECT data FROM blob_chunks WHERE blob = %s AND n = %s", (self._blob, self._next)
            ).fetchone()
            if row is None:
                self._done = True
            else:
                self._buffer = memoryview(row[0])
                self._next += 1
        count = min(len(buffer), len(self._buffer))
        buffer[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count


class PgStore(TokenTables, PrekeyTables, DurableStore):
    """The relay's durable state in the PostgreSQL database at ``dsn``.

    Args:
        dsn: a ``postgresql://`` address; its ``search_path`` (``options=-c
            search_path=...``) picks the schema, else the role's default.
        group_commit: as for :class:`relay.store.Store`.

    Raises:
        StoreUnavailable: the server cannot be reached.
        UsageError: the schema holds a store of another version.
    """

    def __init__(self, dsn: str, *, group_commit: bool = False) -> None:
        super().__init__()
        self.dsn = dsn
        self.group_commit = group_commit
        # The audit chain head as last read or written (see _flush_audit).
        self._seq = 0
        self._head = GENESIS
        # Audit entries of the open batch, not yet numbered: (event, time, report, token,
        # parties, reason); chained and written by _flush_audit. _audit_mark: where the
        # current step's begin.
        self._audit_rows: list[
            tuple[AuditEvent, int, bytes | None, bytes | None, tuple[str, ...], str | None]
        ] = []
        self._audit_mark = 0
        # The open batch holds the audit_head row (it flushed its entries), and the
        # ordering lock (_exclusive).
        self._head_held = False
        self._ordered = self._ordered_before = False
        # Write statements run (see _changes).
        self._writes = 0
        # report id -> blob id, placed by a PgBlobWriter, awaiting add_report.
        self._placed: dict[bytes, bytes] = {}
        self._slot = random_id()
        # Members told (NOTIFY) when the open batch commits: something new is queued.
        self._notify: set[str] = set()
        # Deliveries this process claimed (session advisory locks; see claim).
        self._claimed: set[bytes] = set()
        # The connections: the store's own (_raw, through _conn) and the flush's (_sync,
        # guarded by _sync_lock: it is used from worker threads). None after _lose.
        self._raw: psycopg.Connection[tuple[Any, ...]] | None = None
        self._sync: psycopg.Connection[tuple[Any, ...]] | None = None
        self._sync_lock = threading.Lock()
        # Set (in any thread) when a flush failed: the batches it was to cover may be
        # lost; the event loop's thread handles it (_lose) on its next use of the store.
        self._sync_broken = False
        self._next_attempt = 0.0  # time.monotonic() of the next reconnection attempt
        self._conn = _Session(self)
        self._closed = False
        self._open_connections(CONNECT_TIMEOUT)
        try:
            self._migrate()
            row = self._conn.execute("SELECT current_schema()").fetchone()
            # NOTIFY channels are per database; one per store (schema).
            self.channel = (
                "tisa_relay_"
                + hashlib.blake2b(str(row[0] if row else "").encode(), digest_size=8).hexdigest()
            )
            self._sweep()
        except BaseException:
            self._close_connections()
            raise
        self._uploads: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            dsn,
            min_size=0,
            max_size=UPLOAD_CONNECTIONS,
            kwargs={"connect_timeout": CONNECT_TIMEOUT, "application_name": "tisa-relay-upload"},
            open=True,
        )

    def _open_connections(self, timeout: int) -> None:
        main = _connect(self.dsn, timeout=timeout, autocommit=True, application_name="tisa-relay")
        try:
            # COMMIT writes the batch into the WAL and does not wait for the flush;
            # fsync_wal makes it durable (see the module docstring).
            main.execute("SET synchronous_commit = off")
            main.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            sync = _connect(
                self.dsn, timeout=timeout, autocommit=True, application_name="tisa-relay-sync"
            )
        except BaseException:
            main.close()
            raise
        self._raw = main
        with self._sync_lock:
            self._sync = sync
            self._sync_broken = False

    def _close_connections(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()
        with self._sync_lock:
            sync, self._sync = self._sync, None
            if sync is not None:
                sync.close()

    def _main(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The store's connection, opened again if the server went away.

        Raises:
            StoreUnavailable: it cannot be opened (now, or in the last
                RECONNECT_INTERVAL seconds).
        """
        if self._sync_broken:
            self._lose(None)
        if self._raw is None:
            now = time.monotonic()
            if now < self._next_attempt:
                raise StoreUnavailable("the relay's PostgreSQL store is unreachable")
            self._next_attempt = now + RECONNECT_INTERVAL
            self._open_connections(RECONNECT_TIMEOUT)
            log.warning("connected to the relay's PostgreSQL store again")
        assert self._raw is not None
        return self._raw

    def _lose(self, exc: BaseException | None) -> None:
        """The server went away, or a flush failed: every batch not known to be durable
        may be lost. None of it was announced (answers wait for the flush); they are
        marked lost, so whoever waits on them closes its connection, and members send
        again. Both connections are closed; the next use of the store opens new ones.
        Claims (advisory locks) died with the old connection."""
        with self._sync_lock:
            for batch in range(self.committed + 1, self.generation + 1):
                self._lost.add(batch)
            self.generation += 1
            self.written = self.committed
            self.ops = self.unsynced_ops = 0
            self._notify.clear()
            self._claimed.clear()
            self._batch_ended()
            self._batch_undone()
        self._close_connections()
        log.warning("lost the relay's PostgreSQL store: %s", exc or "a WAL flush failed")

    def lost(self, batch: int) -> bool:
        """Batch ``batch`` will never be durable (see :meth:`_lose`)."""
        return super().lost(batch) or (self._sync_broken and batch > self.committed)

    def _migrate(self) -> None:
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            present = self._conn.execute("SELECT to_regclass('tisa_schema') IS NOT NULL").fetchone()
            if present is not None and present[0]:
                row = self._conn.execute("SELECT version FROM tisa_schema").fetchone()
                version = 0 if row is None else int(row[0])
                if version not in (1, 2, 3, SCHEMA_VERSION):
                    raise UsageError(
                        f"relay store schema {version}; this relay knows {SCHEMA_VERSION}"
                    )
                if version in (1, 2, 3):
                    # In place, in this one transaction (other processes see all of it
                    # or none); new tables only, which a relay of an older schema still
                    # running on the database never touches. IF NOT EXISTS: a store of
                    # schema 2 holds the consent tables, one of schema 3 the prekeys.
                    self._conn.execute(_CONSENT_SCHEMA)
                    self._conn.execute(_PREKEY_SCHEMA)
                    self._conn.execute(_PREKEY_RATE_SCHEMA)
                    self._conn.execute("UPDATE tisa_schema SET version = %s", (SCHEMA_VERSION,))
                return
            self._conn.execute(_SCHEMA)
            self._conn.execute(_CONSENT_SCHEMA)
            self._conn.execute(_PREKEY_SCHEMA)
            self._conn.execute(_PREKEY_RATE_SCHEMA)
            self._conn.execute("INSERT INTO tisa_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
            self._conn.execute(
                "INSERT INTO audit_head (one, seq, head) VALUES (true, 0, %s)", (GENESIS,)
            )

    def _sweep(self) -> None:
        cutoff = int(time.time()) - ORPHAN_GRACE
        with self._conn.transaction():
            self._conn.execute(
                "DELETE FROM blobs b WHERE b.placed < %s"
                " AND NOT EXISTS (SELECT 1 FROM reports r WHERE r.blob = b.id)",
                (cutoff,),
            )
            # wal_sync rows of stores closed or dead long ago.
            self._conn.execute("DELETE FROM wal_sync WHERE touched < %s", (cutoff,))

    def close(self) -> None:
        """Commit what is pending (durably) and close; a poisoned store is closed
        without committing (see :meth:`relay.store.Store.close`). Closing again does
        nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.failed is None and self._raw is not None:
                self.commit_durably()
        finally:
            self._uploads.close()
            self._close_connections()

    # --- group commit (see tisa_io.durable) ----------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """A batch (or single transaction) is open on the store's connection."""
        # UNKNOWN (a broken connection) counts as open: its batch must fail to commit.
        raw = self._raw
        return raw is not None and raw.info.transaction_status != TransactionStatus.IDLE

    def _execute(self, statement: str) -> None:
        # COMMIT or ROLLBACK of the open batch (the audit entries and the notifications
        # went in before, in _before_commit).
        try:
            self._conn.execute(statement)
        finally:
            self._batch_ended()

    def _batch_ended(self) -> None:
        self._notify.clear()
        self._audit_rows.clear()
        self._audit_mark = 0
        self._head_held = self._ordered = False

    def _before_commit(self) -> None:
        # Inside the batch's transaction, right before its COMMIT: the notifications
        # (PostgreSQL delivers them when the transaction commits, never before), then
        # the audit entries, which take the chain head and hold it through the COMMIT.
        members, self._notify = self._notify, set()
        if members:
            self._conn.execute(
                "SELECT pg_notify(%s, m) FROM unnest(%s::text[]) AS m",
                (self.channel, sorted(members)),
            )
        self._flush_audit(at_commit=True)

    def _tell(self, member: str, kind: str) -> None:
        # Something new is queued for ``member``: counted (changes), and the other
        # relay processes are told when this batch commits (see watch).
        super()._tell(member, kind)
        if member:
            self._notify.add(member)

    def _exclusive(self) -> None:
        """The rest of the open batch runs as the only one of its kind among the relay
        processes (see :meth:`relay.consentstore.ConsentTables._exclusive`): a
        transaction advisory lock, taken once per batch and released by its COMMIT."""
        if not self._ordered:
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ORDER_LOCK,))
            self._ordered = True

    def _seen(self, found: Any) -> Any:
        """Rows read outside this store's open batch may belong to another process's
        batch, committed (with ``synchronous_commit = off``) and perhaps not yet
        flushed. Counted as a batch written, so that whoever announces what it read
        waits (:attr:`barrier`) for a WAL flush that started after the read: that flush
        covers the other commit too, which came before the read."""
        if found and not self.in_transaction:
            self.written = self.generation
            self.generation += 1
        return found

    def _begin(self) -> None:
        # A batch begins without any lock: the chain head is taken by _flush_audit.
        self._conn.execute("BEGIN")

    def _load_head(self, *, lock: bool = False) -> None:
        row = self._conn.execute(
            "SELECT seq, head FROM audit_head" + (" FOR UPDATE" if lock else "")
        ).fetchone()
        assert row is not None  # inserted with the schema
        self._seq, self._head = int(row[0]), bytes(row[1])

    def _flush_audit(self, *, at_commit: bool = False) -> None:
        """Number, chain and write the open batch's audit entries: lock the chain head
        (``SELECT … FOR UPDATE``), then one statement appends every entry and moves the
        head. The lock is held to the batch's end, so the sequence numbers of all relay
        processes commit in order; a batch takes it only here (right before its COMMIT,
        or when the open batch's entries are read); at its COMMIT it waits for nothing
        else once it has it (no deadlock through the head)."""
        if not self._audit_rows:
            return
        if not (at_commit or self._head_held):
            # Lock order: the ordering lock before the head, never after: a batch that
            # takes the head before its COMMIT may still run steps that take it.
            self._exclusive()
        self._load_head(lock=True)
        self._head_held = True
        seqs: list[int] = []
        encoded: list[bytes] = []
        contents: list[bytes] = []
        heads: list[bytes] = []
        seq, head = self._seq, self._head
        for event, when, report, token, parties, reason in self._audit_rows:
            seq += 1
            data = entry_bytes(seq, when, event, report, token, parties, reason)
            content = content_hash_of(data)
            head = chain_next(head, content)
            seqs.append(seq)
            encoded.append(data)
            contents.append(content)
            heads.append(head)
        self._conn.execute(
            "WITH appended AS (INSERT INTO audit (seq, entry, content, head)"
            " SELECT * FROM unnest(%s::bigint[], %s::bytea[], %s::bytea[], %s::bytea[]))"
            " UPDATE audit_head SET seq = %s, head = %s",
            (seqs, encoded, contents, heads, seq, head),
        )
        self._seq, self._head = seq, head
        self._audit_rows.clear()
        self._audit_mark = 0

    def _changes(self) -> int:
        return self._writes + len(self._audit_rows)

    def _step_started(self) -> None:
        self._audit_mark = len(self._audit_rows)
        self._ordered_before = self._ordered

    def _rolled_back(self) -> None:
        if self.in_transaction:
            # One step rolled back: its buffered entries go with it, and a lock it took
            # (PostgreSQL releases what a subtransaction took when it is rolled back;
            # the head is taken only outside steps, so that one stays).
            del self._audit_rows[self._audit_mark :]
            self._ordered = self._ordered_before
        else:
            self._batch_ended()
            self._batch_undone()

    @contextlib.contextmanager
    def _single(self) -> Iterator[_Session]:  # type: ignore[override]
        # Without group commit: one transaction, durable on return.
        self._begin()
        self._step_started()
        try:
            yield self._conn
            self._before_commit()
        except BaseException:
            if self.in_transaction:
                self._execute("ROLLBACK")
            self._batch_ended()
            raise
        self._execute("COMMIT")
        self.fsync_wal()

    # The hooks of tisa_io.durable.DurableStore._step (one step of the open batch).

    def _session(self) -> _Session:
        return self._conn

    def _statement_spoiled(self) -> bool:
        raw = self._raw
        return raw is not None and raw.info.transaction_status == TransactionStatus.INERROR

    def _transaction(
        self, *, savepoint: bool = True
    ) -> contextlib.AbstractContextManager[_Session]:
        # savepoint=False: the step checks everything before its first write.
        return self._step(savepoint=savepoint) if self.group_commit else self._single()

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        # The shared statements of relay.consentstore, written with SQLite's "?"
        # placeholders (none of them has a "?" or "%" of its own).
        return self._conn.execute(query.replace("?", "%s"), params)

    def _sql_limit(self, limit: int) -> int | None:
        return _limit(limit)

    def manual_checkpoints(self) -> None:
        """Nothing to turn off: PostgreSQL's server runs its own checkpoints."""

    def checkpoint(self) -> tuple[int, int]:
        """Nothing to do: PostgreSQL's server checkpoints its WAL itself (its
        ``checkpoint_timeout`` and ``max_wal_size``). Returns ``(0, 0)``."""
        return 0, 0

    def fsync_wal(self) -> None:
        """Make every batch COMMITted before this call durable: commit a write on the
        second connection at the server's ``synchronous_commit`` (see the module
        docstring). Blocking; may run in a worker thread.

        Raises:
            StoreUnavailable: the flush failed (or the connection is gone): the batches
                not yet durable count as lost (:meth:`lost`), the store opens new
                connections on its next use (:meth:`_lose`). Unlike a failed fsync of
                SQLite's WAL this does not poison the store: what the server holds
                after it restarted is what it has on disk.
        """
        with self._sync_lock:
            sync = self._sync
            if sync is None or self._sync_broken:
                raise StoreUnavailable("the relay's PostgreSQL store is unreachable")
            try:
                now = int(time.time())
                sync.execute(
                    "INSERT INTO wal_sync (slot, n, touched) VALUES (%s, 1, %s)"
                    " ON CONFLICT (slot) DO UPDATE SET n = wal_sync.n + 1, touched = %s",
                    (self._slot, now, now),
                )
            except psycopg.Error as exc:
                self._sync_broken = True
                raise _unavailable(exc) from None

    # --- several relay processes ---------------------------------------------------------

    def claim(self, token_id: bytes) -> bool:
        """Claim a delivery for this process before pushing it: False if another relay
        process holds it. A session advisory lock on the store's connection, so the
        claim dies with the process (or its connection); the relay itself decides which
        of its connections pushes it. Released by :meth:`unclaim` or an ack."""
        if token_id in self._claimed:
            return True
        row = self._conn.execute(
            "SELECT pg_try_advisory_lock(%s)", (_claim_key(token_id),)
        ).fetchone()
        if row is None or not row[0]:
            return False
        self._claimed.add(token_id)
        return True

    def unclaim(self, token_ids: Iterable[bytes]) -> None:
        """Give up claims (a connection that pushed them ended): another process may
        push them now, and is told to look. Without the store's connection there is
        nothing to give up: the claims died with it."""
        token_ids = [token_id for token_id in token_ids if token_id in self._claimed]
        if self._raw is None:
            self._claimed.difference_update(token_ids)
            return
        try:
            self._unclaim(token_ids)
        except StoreUnavailable:
            self._claimed.difference_update(token_ids)  # lost with the connection

    def _unclaim(self, token_ids: list[bytes]) -> None:
        for token_id in token_ids:
            if token_id in self._claimed:
                self._claimed.discard(token_id)
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (_claim_key(token_id),))
                recipient = self._conn.execute(
                    "SELECT recipient FROM tokens WHERE id = %s", (token_id,)
                ).fetchone()
                if recipient is not None:
                    # Sent now, or with the open batch's COMMIT; if lost, the poll finds it.
                    self._conn.execute(
                        "SELECT pg_notify(%s, %s)", (self.channel, str(recipient[0]))
                    )

    async def watch(self, wake: Callable[[str | None], None]) -> None:
        """Until cancelled: ``wake(member)`` when another relay process queued something
        for ``member`` (a NOTIFY, a hint), and ``wake(None)`` after :data:`POLL_INTERVAL`
        seconds without one (look at everything: the rows are the truth, a hint can be
        lost). A lost connection is logged and opened again.

        The wait runs in a worker thread (psycopg has no trio path); cancelled, the
        thread ends within :data:`POLL_INTERVAL` and closes its connection.
        """
        own = self._main().info.backend_pid
        while True:
            try:
                listener = await trio.to_thread.run_sync(
                    lambda: _connect(self.dsn, autocommit=True, application_name="tisa-listen")
                )
            except StoreUnavailable as exc:
                log.warning("%s; looking again in %s s", exc, POLL_INTERVAL)
                await trio.sleep(POLL_INTERVAL)
                wake(None)
                continue
            stop = threading.Event()
            waiting = False
            try:
                listener.execute(f"LISTEN {self.channel}")
                while True:
                    waiting = True
                    members = await trio.to_thread.run_sync(
                        _listen, listener, stop, own, abandon_on_cancel=True
                    )
                    waiting = False
                    if not members:
                        wake(None)
                    for member in members:
                        wake(member)
            except psycopg.Error as exc:
                log.warning("listening for other relay processes failed: %s", exc)
                await trio.sleep(POLL_INTERVAL)
                wake(None)
            finally:
                stop.set()
                if not waiting:
                    listener.close()

    # --- audit ---------------------------------------------------------------------------

    def _audit(
        self,
        event: AuditEvent,
        *,
        now: int,
        parties: tuple[str, ...],
        report: bytes | None = None,
        token: bytes | None = None,
        reason: str | None = None,
    ) -> None:
        # Inside a step only: the entry joins the open batch, numbered and chained when
        # it commits (_flush_audit), in the same transaction as the change it records.
        self._audit_rows.append(
            (event, max(now, 0), report, token, sorted_parties(parties), reason)
        )

    def _audit_read(self) -> None:
        # Before the audit log is read: the open batch's entries are written first (the
        # chain head is then held to its COMMIT), so a read sees them, as with SQLite;
        # outside a batch, the head as committed.
        if self._audit_rows:
            self._flush_audit()
        elif not self._head_held:
            self._load_head()

    @property
    def audit_seq(self) -> int:
        """Sequence number of the last audit entry (0 when empty)."""
        self._audit_read()
        return self._seq

    @property
    def audit_head(self) -> bytes:
        """The audit chain's head after its last entry."""
        self._audit_read()
        return self._head

    # --- reports -------------------------------------------------------------------------

    def begin_upload(self, report_id: bytes, *, inline: bool = False) -> PgBlobWriter | InlineBlob:
        """A writer for a new ciphertext of ``report_id``: into ``blob_chunks`` once
        :meth:`PgBlobWriter.place` ran, or with ``inline`` into the row itself."""
        if inline:
            return InlineBlob()
        return PgBlobWriter(self, report_id)

    def inline_data(self, report_id: bytes) -> bytes | None:
        """The ciphertext of a report stored inline, or None (in chunks, or gone)."""
        row = self._conn.execute("SELECT data FROM reports WHERE id = %s", (report_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def open_ciphertext(self, report_id: bytes) -> BinaryIO:
        """A readable stream of a stored report's ciphertext (read a chunk row at a
        time). The caller closes it.

        Raises:
            FileNotFoundError: no such report, or its ciphertext was deleted.
        """
        row = self._conn.execute(
            "SELECT data, blob FROM reports WHERE id = %s", (report_id,)
        ).fetchone()
        if row is None or (row[0] is None and row[1] is None):
            raise FileNotFoundError(f"no ciphertext of report {report_id.hex()}")
        if row[0] is not None:
            return io.BytesIO(bytes(row[0]))
        return io.BufferedReader(_ChunkReader(self, bytes(row[1])), BLOB_CHUNK)

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
        """Record a placed upload (or, with ``data``, an inline ciphertext) as a held
        report and log ``stored``, in one step. ``if_new``: as
        :meth:`relay.store.Store.add_report` (a report of this id already stored, by
        this process or another, is left as it is and None returned).

        Raises:
            UsageError: no upload of ``report_id`` was placed (and ``data`` is None).
            StoreBusy: another relay process stored a report of this id meanwhile
                (without ``if_new``).
        """
        blob = None
        if data is None:
            blob = self._placed.get(report_id)
            if blob is None:
                raise UsageError("no placed upload of this report")
        with self._transaction(savepoint=False) as db:
            if (
                db.execute(
                    "INSERT INTO reports (id, originator, size, digest, state, expires,"
                    " stored_at, data, blob) VALUES (%s, %s, %s, %s, 'held', %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (report_id, originator, size, digest, expires, now, data, blob),
                ).rowcount
                == 0
            ):
                if if_new:
                    return None
                # The same upload through another relay process (a member that failed
                # over mid-upload) was stored first: sent again, it is answered as stored.
                raise StoreBusy("another relay process stored this report just now")
            self._audit(AuditEvent.STORED, now=now, parties=(originator,), report=report_id)
        self._placed.pop(report_id, None)
        return ReportRow(report_id, originator, size, digest, "held", None, expires, now)

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
        """None, always: this store stores, then releases (:meth:`add_report`,
        :meth:`release`), each step a round trip whose first statement also locks what
        other relay processes may change (see :meth:`relay.store.Store.add_released_report`
        for the SQLite store's one step)."""
        return None

    def _delete_ciphertext(self, report_id: bytes, ended: str) -> None:
        # Inside a step: the report's row and its chunks go in the same transaction.
        self._conn.execute(
            "DELETE FROM blobs WHERE id = (SELECT blob FROM reports WHERE id = %s)", (report_id,)
        )
        self._conn.execute(
            "UPDATE reports SET state = 'deleted', ended = %s, data = NULL, blob = NULL"
            " WHERE id = %s",
            (ended, report_id),
        )

    # --- tokens --------------------------------------------------------------------------

    def ping(self) -> None:
        """A trivial round trip to the server (the health check).

        Raises:
            StoreUnavailable: the server cannot be reached.
        """
        self._conn.execute("SELECT 1").fetchone()

    def queue_length(self, recipient: str) -> int:
        """Deliveries still owed to ``recipient``: counted every time (other relay
        processes change it; an index scan on ``tokens_recipient``)."""
        row = self._conn.execute(
            f"SELECT count(*) FROM tokens WHERE recipient = %s AND {OWED}", (recipient,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def release(
        self,
        token: ReleaseToken,
        *,
        now: int,
        max_queue: int,
        clock_skew: int = 0,
        fresh: ReportRow | None = None,
    ) -> TokenRow:
        """Consume ``token`` (already checked) and make its delivery pending, atomically;
        a token that names a request also closes it as approved, in the same step.
        ``fresh`` is taken for the same signature as :meth:`relay.store.Store.release`
        and not used: this store already checks and writes a release in two round
        trips, the first of which also locks the report's row and counts the queue.

        Raises:
            Refused: as :meth:`relay.store.Store.release`.
        """
        # As with SQLite, a plain release checks everything before its first write (no
        # savepoint); an approval writes the request's state first, so it keeps one.
        with self._transaction(savepoint=token.request is not None) as db:
            if token.request is not None:
                self._approve(token, now=now, clock_skew=clock_skew)
            # The report's row, locked until the batch ends: a revocation or expiry of
            # it in another relay process's open batch is waited for, and seen. With
            # it the token id's state and the recipient's queue, in one round trip.
            row = db.execute(
                "SELECT (SELECT state FROM tokens WHERE id = %s), r.id IS NOT NULL, r.state,"
                " r.ended, r.expires, r.key_commit, (SELECT count(*) FROM tokens"
                f" WHERE recipient = %s AND {OWED})"
                " FROM (SELECT 1) AS one LEFT JOIN LATERAL (SELECT id, state, ended, expires,"
                " key_commit FROM reports WHERE id = %s FOR NO KEY UPDATE) AS r ON true",
                (token.id, token.recipient, token.report),
            ).fetchone()
            assert row is not None
            # The first release pins the key commitment (the statement below).
            refusal = release_refusal(
                token, row[:6], now=now, queued=lambda: int(row[6]), max_queue=max_queue
            )
            if refusal is not None:
                raise refusal
            if token.wrap.opk is not None:
                self._check_one_time_prekey(db, token)
            # The token's row and the report's pin in one statement. ON CONFLICT: the
            # same token consumed by another relay process meanwhile (its open batch
            # held the id; this waited for its COMMIT) is a replay, refused before
            # anything was written.
            inserted = db.execute(
                f"WITH t AS (INSERT INTO tokens ({PENDING_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s)"
                " ON CONFLICT (id) DO NOTHING RETURNING seq),"
                " r AS (UPDATE reports SET key_commit = coalesce(key_commit, %s),"
                " state = CASE state WHEN 'held' THEN 'released' ELSE state END"
                " WHERE id = %s AND EXISTS (SELECT 1 FROM t))"
                " SELECT seq FROM t",
                (*pending_values(token), token.key_commit, token.report),
            ).fetchone()
            if inserted is None:
                raise Refused(Reason.REPLAYED, "this token was used before")
            if token.wrap.opk is not None:
                db.execute(
                    "UPDATE prekeys SET used_by = %s WHERE key = %s", (token.id, token.wrap.opk)
                )
            return self._released(token, int(inserted[0]), now=now)

    # --- the hooks of relay.tokenstore.TokenTables ------------------------------------

    # Another relay process's open batch may be changing a row a step checks: lock it
    # until the batch ends; an expiry skips what another batch holds.
    _FOR_UPDATE = " FOR UPDATE"
    _SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
    _HANDOUT_SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"

    def _acked(self, token_id: bytes, recipient: str) -> None:
        # No longer owed: nobody needs the claim, nor to be told to look.
        if token_id in self._claimed:
            self._claimed.discard(token_id)
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (_claim_key(token_id),))

    # --- prekeys (as relay.store.Store; see there) -------------------------------------

    def publish_prekeys(
        self, owner: str, signed: Prekey | None, one_time: list[Prekey], *, max_one_time: int
    ) -> None:
        """Store ``owner``'s verified prekeys (one already stored is ignored).

        Raises:
            Refused: LIMIT, the one-time prekeys would exceed ``max_one_time`` (nothing
                of this publish is stored then).
        """
        with self._transaction() as db:
            for prekey in ([signed] if signed is not None else []) + one_time:
                db.execute(
                    "INSERT INTO prekeys (owner, kind, key, encoded, not_after)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO NOTHING",
                    (owner, prekey.kind.value, prekey.key, prekey.encoded, prekey.not_after),
                )
            row = db.execute(
                "SELECT count(*) FROM prekeys WHERE owner = %s AND kind = 'one_time'"
                " AND taken_by IS NULL",
                (owner,),
            ).fetchone()
            if row is not None and int(row[0]) > max_one_time:
                raise Refused(
                    Reason.LIMIT, f"at most {max_one_time} one-time prekeys are stored per member"
                )

    def prekey_status(self, owner: str, *, now: int) -> tuple[int, int]:
        """(``not_after`` of the newest valid signed prekey or 0, one-time prekeys left)."""
        signed = self._conn.execute(
            "SELECT not_after FROM prekeys WHERE owner = %s AND kind = 'signed'"
            " AND not_after > %s ORDER BY seq DESC LIMIT 1",
            (owner, now),
        ).fetchone()
        return (0 if signed is None else int(signed[0])), self._one_time_left(owner, now=now)

    def _check_one_time_prekey(self, db: Any, token: ReleaseToken) -> None:
        # The row is locked until the batch ends; release writes used_by once its
        # token's row is in.
        row = db.execute(
            "SELECT owner, taken_by, used_by FROM prekeys WHERE key = %s AND kind = 'one_time'"
            " FOR UPDATE",
            (token.wrap.opk,),
        ).fetchone()
        if row is None or row[0] != token.recipient or row[1] != token.originator:
            raise Refused(Reason.UNKNOWN_PREKEY, "a one-time prekey this relay did not hand you")
        if row[2] is not None:
            raise Refused(Reason.BAD_PREKEY, "this one-time prekey was used by another token")

    def _handout_step(self) -> contextlib.AbstractContextManager[_Session]:
        return self._transaction()

    def _pair_lock(self, owner: str, taker: str) -> None:
        # Another relay process handing ``owner``'s prekeys to ``taker`` waits for this
        # batch's COMMIT, so the two never both count the last one allowed.
        # The two-key form: a lock space apart from the store's one-key locks.
        self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))", (owner, taker)
        )
