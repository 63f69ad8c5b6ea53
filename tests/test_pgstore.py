"""The relay's PostgreSQL store (relay/pgstore.py) on its own: schema, group commit and
the WAL flush, ciphertexts in chunks, the audit chain head, several stores on one
database. The relay's behaviour on it is tested with the SQLite store's, in
test_relay_server.py (the store_at fixture)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from nodes.relay_helpers import NOW, World, announce, ask, deny, make_world, seal, token_for

from relay.pgstore import (
    BLOB_CHUNK,
    ORPHAN_GRACE,
    SCHEMA_VERSION,
    PgBlobWriter,
    PgStore,
    StoreUnavailable,
)
from relay.storage import StoreBusy, open_store
from relay.store import InlineBlob
from tisa.audit import GENESIS, AuditEntry, chain_next
from tisa.errors import Reason, Refused, UsageError
from tisa.keys import Hash, digest
from tisa.report import SealedReport
from tisa.token import ReleaseToken


@pytest.fixture
def world() -> World:
    return make_world()


def _rows(dsn: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def _store_report(
    store: PgStore, world: World, body: bytes = b"report", *, inline: bool = False
) -> SealedReport:
    report = seal(world, body)
    writer = store.begin_upload(report.report_id, inline=inline)
    assert isinstance(writer, InlineBlob if inline else PgBlobWriter)
    writer.write(report.ciphertext)
    assert writer.digest() == report.digest
    writer.place()
    data = writer.data
    writer.abort()
    store.add_report(
        report.report_id,
        originator="seoul",
        size=report.size,
        digest=report.digest,
        expires=NOW + 3600,
        now=NOW,
        data=data,
    )
    return report


def test_a_postgresql_address_opens_the_postgresql_store(pg_dsn: str) -> None:
    store = open_store(pg_dsn, group_commit=False)
    try:
        assert isinstance(store, PgStore)
        assert _rows(pg_dsn, "SELECT version FROM tisa_schema") == [(SCHEMA_VERSION,)]
        assert _rows(pg_dsn, "SELECT seq, head FROM audit_head") == [(0, GENESIS)]
    finally:
        store.close()
    # Opened again: the schema is there, nothing is created twice.
    PgStore(pg_dsn).close()


def test_a_store_of_another_schema_version_is_refused(pg_dsn: str) -> None:
    PgStore(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE tisa_schema SET version = 99")
    with pytest.raises(UsageError, match="schema 99"):
        PgStore(pg_dsn)


@pytest.mark.parametrize("version", [1, 2, 3])  # 2: with the consent tables; 3: prekeys
def test_a_version_1_to_3_store_gains_the_prekey_tables(pg_dsn: str, version: int) -> None:
    PgStore(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("DROP TABLE prekey_rate")
        if version < 3:
            conn.execute("DROP TABLE prekeys")
        conn.execute("UPDATE tisa_schema SET version = %s", (version,))
    store = PgStore(pg_dsn)
    try:
        assert store.prekey_status("tokyo", now=NOW) == (0, 0)
        assert store.take_prekeys("tokyo", taker="seoul", now=NOW, max_per_hour=1) == (
            None,
            None,
            0,
        )
    finally:
        store.close()
    assert _rows(pg_dsn, "SELECT version FROM tisa_schema") == [(SCHEMA_VERSION,)] == [(4,)]


def test_two_relay_processes_never_hand_out_one_one_time_prekey_twice(
    pg_dsn: str, world: World
) -> None:
    # Two stores on one database (two relay processes). A handout is taken in the batch
    # that answers it (the row locked, others skip it): what one process handed out, the
    # other never hands out again.
    from tisa.prekeys import Prekey

    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        prekeys = [Prekey.decode(world.prekey("tokyo")) for _ in range(2)]
        first.publish_prekeys("tokyo", None, prekeys, max_one_time=10)
        first.commit_durably()
        _, a, left = first.take_prekeys("tokyo", taker="seoul", now=NOW)
        first.commit_durably()
        assert a is not None and left == 1
        _, b, left = second.take_prekeys("tokyo", taker="seoul", now=NOW)
        second.commit_durably()
        assert b is not None and b != a and left == 0
        _, none, left = first.take_prekeys("tokyo", taker="seoul", now=NOW)
        first.commit_durably()
        assert none is None and left == 0
    finally:
        first.close()
        second.close()


def test_the_handout_limit_of_one_pair_counts_across_processes_one_batch_at_a_time(
    pg_dsn: str, world: World
) -> None:
    # The one-time prekeys handed to an originator are counted under a lock of the
    # (recipient, originator) pair held to the batch's end: a second process waits for
    # the first's batch, then reads the count it committed, so the two never both hand
    # out the last one allowed (without the lock the second read 0, handed one out, and
    # the pair had 2 of a limit of 1). Another pair is not held up.
    from tisa.prekeys import Prekey

    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        prekeys = [Prekey.decode(world.prekey("tokyo")) for _ in range(4)]
        first.publish_prekeys("tokyo", None, prekeys, max_one_time=10)
        first.commit_durably()
        row = second._conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        waiting_pid = int(row[0])
        _, a, _ = first.take_prekeys("tokyo", taker="seoul", now=NOW, max_per_hour=1)
        assert a is not None  # first's batch open, the pair's count 1 in it
        got: list[tuple[bytes | None, bytes | None, int]] = []
        taker = threading.Thread(
            target=lambda: got.append(
                second.take_prekeys("tokyo", taker="seoul", now=NOW, max_per_hour=1)
            )
        )
        taker.start()
        deadline = time.monotonic() + 10
        while _rows(
            pg_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            waiting_pid,
        ) == [] and time.monotonic() < deadline:  # fmt: skip
            time.sleep(0.01)
        third = PgStore(pg_dsn, group_commit=True)
        try:  # another pair meanwhile: not held up
            _, other, _ = third.take_prekeys("tokyo", taker="washington", now=NOW, max_per_hour=1)
            third.commit_durably()
        finally:
            third.close()
        assert other is not None and other != a
        first.commit_durably()
        taker.join(10)
        second.commit_durably()
        assert len(got) == 1
        _, past, left = got[0]
        assert past is None and left == 2  # the limit, not the supply
    finally:
        first.close()
        second.close()


def test_an_unreachable_server_is_one_clear_error(tmp_path: object) -> None:
    with pytest.raises(StoreUnavailable) as info:
        PgStore(f"postgresql://nobody@/none?host={tmp_path}")
    assert "cannot reach the relay's PostgreSQL store" in str(info.value)
    assert "\n" not in str(info.value)


def test_commit_writes_and_the_wal_flush_makes_durable(pg_dsn: str) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    try:
        assert store._conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        # The flush commits on its own connection at the server's setting.
        assert store._sync.execute("SHOW synchronous_commit").fetchone() == ("on",)
        store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
        batch = store.barrier
        # The open batch is invisible to others until COMMIT.
        assert _rows(pg_dsn, "SELECT count(*) FROM audit") == [(0,)]
        store.commit()
        assert _rows(pg_dsn, "SELECT count(*) FROM audit") == [(1,)]
        assert store.written == batch and store.committed < batch and store.pending
        store.fsync_wal()
        assert _rows(pg_dsn, "SELECT n FROM wal_sync WHERE slot = %s", store._slot) == [(1,)]
        assert store.committed < batch  # only mark_durable makes it count
        store.mark_durable(batch)
        assert store.committed == batch and not store.pending
    finally:
        store.close()


def test_a_failed_flush_loses_what_it_covered_and_the_store_connects_again(
    pg_dsn: str,
) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    try:
        store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
        store.commit()
        batch = store.written
        assert store._sync is not None
        store._sync.close()  # as if the server went away
        with pytest.raises(StoreUnavailable):
            store.fsync_wal()
        # Never counted as durable, nothing of it may be announced; but the store is not
        # poisoned (unlike SQLite after a failed fsync): it connects again when used.
        assert store.lost(batch) and store.failed is None
        store.log_refusal(member="tokyo", reason=Reason.MALFORMED, now=NOW)
        assert store.lost(batch) and not store.lost(store.barrier)
        store.commit_durably()
        assert store.committed == store.written and store.committed > batch
        assert store.lost(batch)  # still: a later batch on disk does not make it so
        # The lost batch's entry had been committed; the flush alone failed.
        entries = [e for e, _, _ in store.audit_entries(0, limit=10)]
        assert [(e.seq, e.parties) for e in entries] == [(1, ("seoul",)), (2, ("tokyo",))]
    finally:
        store.close()


def test_a_lost_connection_is_store_unavailable_then_opened_again(pg_dsn: str) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    try:
        store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
        batch = store.barrier
        # The server ends the store's session (as a restart would).
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'tisa-relay'"
            )
        with pytest.raises(StoreUnavailable):
            store.commit()
        assert store.lost(batch)
        # The next use connects again (the open batch was rolled back with the session).
        store.log_refusal(member="tokyo", reason=Reason.MALFORMED, now=NOW)
        store.commit_durably()
        assert [e.parties for e, _, _ in store.audit_entries(0, limit=10)] == [("tokyo",)]
    finally:
        store.close()


def test_a_refused_step_leaves_no_trace_and_the_chain_goes_on(pg_dsn: str, world: World) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    try:
        report = seal(world)
        token = ReleaseToken.decode(token_for(world, report))
        with pytest.raises(Refused) as info:
            store.release(token, now=NOW, max_queue=10)  # no such report
        assert info.value.reason == Reason.UNKNOWN_REPORT
        store.log_refusal(member="seoul", reason=Reason.UNKNOWN_REPORT, now=NOW)
        store.log_refusal(member="tokyo", reason=Reason.MALFORMED, now=NOW)
        assert store.audit_seq == 2  # read in the open batch: its entries written first
        store.commit_durably()
        head = GENESIS
        for entry, content, after in store.audit_entries(0, limit=10):
            assert content == digest(Hash.AUDIT, entry.encode())
            head = chain_next(head, content)
            assert after == head
        assert _rows(pg_dsn, "SELECT seq, head FROM audit_head") == [(2, head)]
        assert (store.audit_seq, store.audit_head) == (2, head)
    finally:
        store.close()


def test_a_large_ciphertext_is_kept_in_chunks_and_streamed_back(pg_dsn: str, world: World) -> None:
    store = PgStore(pg_dsn)
    try:
        body = os.urandom(2 * BLOB_CHUNK + 1000)
        report = _store_report(store, world, body)
        report_id, ciphertext = report.report_id, report.ciphertext
        chunks = _rows(
            pg_dsn,
            "SELECT octet_length(c.data) FROM blob_chunks c JOIN reports r ON r.blob = c.blob"
            " WHERE r.id = %s ORDER BY c.n",
            report_id,
        )
        assert [size for (size,) in chunks][:-1] == [BLOB_CHUNK] * (len(chunks) - 1)
        assert store.inline_data(report_id) is None
        with store.open_ciphertext(report_id) as stream:
            parts = []
            while data := stream.read(70_000):
                assert len(data) <= 70_000
                parts.append(data)
        assert b"".join(parts) == ciphertext
        # Revoked: the row is deleted, and its chunks with it, in the same transaction.
        store.revoke(report_id, None, by="seoul", now=NOW)
        assert _rows(pg_dsn, "SELECT count(*) FROM blob_chunks") == [(0,)]
        with pytest.raises(FileNotFoundError):
            store.open_ciphertext(report_id)
    finally:
        store.close()


def test_a_blob_whose_row_never_came_is_swept_after_the_grace(pg_dsn: str, world: World) -> None:
    store = PgStore(pg_dsn)
    report = seal(world, os.urandom(BLOB_CHUNK))
    writer = store.begin_upload(report.report_id)
    writer.write(report.ciphertext)
    writer.place()  # ... and the process dies before add_report
    kept_id = _store_report(store, world, os.urandom(BLOB_CHUNK)).report_id
    store.close()
    PgStore(pg_dsn).close()  # within the grace: another process may be about to add it
    assert _rows(pg_dsn, "SELECT count(*) FROM blobs") == [(2,)]
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE blobs SET placed = placed - %s", (ORPHAN_GRACE + 1,))
    PgStore(pg_dsn).close()
    assert _rows(pg_dsn, "SELECT r.id FROM blobs b JOIN reports r ON r.blob = b.id") == [(kept_id,)]
    assert _rows(pg_dsn, "SELECT count(*) FROM blobs") == [(1,)]


def test_two_stores_on_one_database_share_one_chain_and_consume_a_token_once(
    pg_dsn: str, world: World
) -> None:
    # Two relay processes, as two stores: the token consumed by one is replayed on the
    # other, and their audit entries form one chain in commit order.
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = _store_report(first, world, inline=True)
        first.commit_durably()
        token = ReleaseToken.decode(token_for(world, report))
        second.release(token, now=NOW, max_queue=10)
        second.commit_durably()
        with pytest.raises(Refused) as info:
            first.release(token, now=NOW, max_queue=10)
        assert info.value.reason == Reason.REPLAYED
        first.log_refusal(member="seoul", reason=Reason.REPLAYED, now=NOW)
        first.commit_durably()
        assert [e.seq for e, _, _ in second.audit_entries(0, limit=10)] == [1, 2, 3]
        assert first.audit_head == second.audit_head
        assert [row.id for row in first.outstanding("tokyo")] == [token.id]
    finally:
        first.close()
        second.close()


def _released(store: PgStore, world: World, *, commit: bool = True) -> bytes:
    """A report stored and released to Tokyo through ``store``; the token id."""
    report = _store_report(store, world, inline=True)
    token = ReleaseToken.decode(token_for(world, report))
    store.release(token, now=NOW, max_queue=10)
    if commit:
        store.commit_durably()
    return token.id


def test_a_delivery_is_claimed_by_one_process_at_a_time(pg_dsn: str, world: World) -> None:
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        token_id = _released(first, world)
        assert first.claim(token_id) and first.claim(token_id)  # again: still ours
        assert not second.claim(token_id)
        first.unclaim([token_id])
        assert second.claim(token_id) and not first.claim(token_id)
        second.close()  # the process holding it dies: the claim dies with it
        # (once the server has ended the closed session, which it does on its own time)
        deadline = time.monotonic() + 10
        while not first.claim(token_id):
            assert time.monotonic() < deadline, "the claim outlived its session"
            time.sleep(0.01)
        # An ack ends the delivery, and its claim.
        assert first.ack_delivery(token_id, recipient="tokyo", now=NOW)
        first.commit_durably()
        third = PgStore(pg_dsn)
        try:
            assert third.claim(token_id)
        finally:
            third.close()
    finally:
        first.close()
        second.close()


def test_rows_of_another_process_are_announced_only_after_a_flush(
    pg_dsn: str, world: World
) -> None:
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        first.commit_durably()
        second.commit_durably()
        assert not second.pending
        _released(first, world)
        assert len(second.outstanding("tokyo")) == 1
        # The read counts as a batch written: the barrier waits for a flush after it.
        assert second.barrier > second.committed and second.pending
        assert second.outstanding("nobody") == []  # nothing read: nothing to wait for
    finally:
        first.close()
        second.close()


async def test_another_process_hears_of_a_release_at_commit(pg_dsn: str, world: World) -> None:
    import trio

    listening, releasing = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    woken: list[str | None] = []
    heard = trio.Event()

    def wake(member: str | None) -> None:
        woken.append(member)
        if member == "tokyo":
            heard.set()

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listening.watch, wake)
                while not woken:  # the first poll: the listener is up
                    await trio.sleep(0.05)
                _released(releasing, world)
                await heard.wait()
                nursery.cancel_scope.cancel()
    finally:
        listening.close()
        releasing.close()


def _chain(dsn: str) -> list[tuple[int, tuple[str, ...]]]:
    """The stored chain checked from GENESIS: (seq, parties) of each entry."""
    head, found = GENESIS, []
    rows = _rows(dsn, "SELECT seq, entry, content, head FROM audit ORDER BY seq")
    for expected, (seq, entry, content, after) in enumerate(rows, start=1):
        decoded = AuditEntry.decode(bytes(entry))  # type: ignore[arg-type]
        assert seq == expected == decoded.seq
        assert content == digest(Hash.AUDIT, bytes(entry))  # type: ignore[arg-type]
        head = chain_next(head, bytes(content))  # type: ignore[arg-type]
        assert after == head
        found.append((decoded.seq, decoded.parties))
    assert _rows(dsn, "SELECT seq, head FROM audit_head") == [(len(rows), head)]
    return found


def test_an_open_batch_leaves_the_chain_head_to_other_processes(pg_dsn: str, world: World) -> None:
    # The chain head is taken for a batch's audit appends and its COMMIT only: while one
    # process's batch is open (written, its entries waiting), another's appends and
    # commits, and a third connection can lock the head row at once. Then the first
    # commits after it, in one chain.
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        token_id = _released(first, world)
        assert first.mark_forwarded(token_id, now=NOW) is None  # a write ...
        first.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)  # ... an entry
        assert first.in_transaction
        with psycopg.connect(pg_dsn) as other:
            other.execute("SET lock_timeout = 50")
            assert other.execute("SELECT seq FROM audit_head FOR UPDATE").fetchone() == (2,)
            other.rollback()
        second._conn.execute("SET lock_timeout = 50")  # not LOCK_TIMEOUT_MS, for speed
        second.log_refusal(member="tokyo", reason=Reason.MALFORMED, now=NOW)
        second.commit_durably()
        first.commit_durably()
        # stored, released (first's first batch), tokyo's refusal, then forwarded and
        # seoul's refusal: sequence numbers in commit order.
        assert [parties for _, parties in _chain(pg_dsn)] == [
            ("seoul",),
            ("seoul", "tokyo"),
            ("tokyo",),
            ("seoul", "tokyo"),
            ("seoul",),
        ]
        assert first.audit_head == second.audit_head
    finally:
        first.close()
        second.close()


def test_a_chain_head_held_too_long_by_another_process_is_busy(pg_dsn: str) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    try:
        store._conn.execute("SET lock_timeout = 50")  # not LOCK_TIMEOUT_MS, for speed
        with psycopg.connect(pg_dsn) as holder:
            holder.execute("SELECT seq FROM audit_head FOR UPDATE")  # as a batch commits
            store.log_refusal(member="seoul", reason=Reason.MALFORMED, now=NOW)
            batch = store.barrier
            with pytest.raises(StoreBusy, match="audit chain"):
                store.commit()
            assert store.lost(batch) and not store.in_transaction
            holder.execute("UPDATE audit_head SET seq = 0")  # ... and appends nothing
        store.log_refusal(member="tokyo", reason=Reason.MALFORMED, now=NOW)
        store.commit_durably()
        assert _chain(pg_dsn) == [(1, ("tokyo",))]
    finally:
        store.close()


def _statements(store: PgStore) -> list[str]:
    """The statements ``store`` runs from now on, as they are sent."""
    seen: list[str] = []
    execute = store._conn.execute

    def traced(query: str, params: object = None) -> psycopg.Cursor[tuple[object, ...]]:
        seen.append(query)
        return execute(query, params)

    store._conn.execute = traced  # type: ignore[method-assign]
    return seen


def test_a_reports_steps_take_no_savepoint_and_the_chain_head_once_per_batch(
    pg_dsn: str, world: World
) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    seen = _statements(store)
    try:
        tokens = [_released(store, world, commit=False) for _ in range(3)]
        for token_id in tokens:
            store.mark_forwarded(token_id, now=NOW)
            assert store.ack_delivery(token_id, recipient="tokyo", now=NOW)
        # Per report: the report's INSERT; the release's check and its INSERT (with
        # the report's pin); the forward's UPDATE; the ack's UPDATE. No savepoint, and
        # nothing of the audit chain yet.
        kinds = [query.split()[0] for query in seen]
        assert kinds == ["BEGIN"] + ["INSERT", "SELECT", "WITH"] * 3 + ["UPDATE", "UPDATE"] * 3
        assert not any("audit" in query for query in seen)
        seen.clear()
        store.commit_durably()
        # Then the head, locked; the 12 entries and the head's update in one statement
        # with the notification for tokyo in one more; COMMIT.
        assert [query.split()[0] for query in seen] == ["SELECT", "SELECT", "WITH", "COMMIT"]
        assert "pg_notify" in seen[0]
        assert seen[1].endswith("FROM audit_head FOR UPDATE")
        assert "INSERT INTO audit" in seen[2] and "UPDATE audit_head" in seen[2]
        assert [seq for seq, _ in _chain(pg_dsn)] == list(range(1, 13))
    finally:
        store.close()


def test_a_release_waits_for_a_revocation_in_another_processs_open_batch(
    pg_dsn: str, world: World
) -> None:
    # Without the chain head held by every batch, the report's row lock orders them: the
    # release sees the revocation once it commits, never a report it is about to lose.
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = _store_report(first, world, inline=True)
        first.commit_durably()
        first.revoke(report.report_id, None, by="seoul", now=NOW)  # batch open
        token = ReleaseToken.decode(token_for(world, report))
        second._conn.execute("SET lock_timeout = 50")
        with pytest.raises(StoreBusy):
            second.release(token, now=NOW, max_queue=10)
        first.commit_durably()
        with pytest.raises(Refused) as refused:
            second.release(token, now=NOW, max_queue=10)
        assert refused.value.reason is Reason.REVOKED
        second.commit_durably()
        assert second.token(token.id) is None
    finally:
        first.close()
        second.close()


def test_the_ordering_lock_of_a_refused_step_is_taken_again(pg_dsn: str, world: World) -> None:
    # A consent step refused inside its savepoint gives up the lock it took (PostgreSQL
    # releases a subtransaction's locks with it): a later step of the batch takes it
    # again, so another process still waits for the batch.
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = _store_report(first, world, inline=True)
        first.commit_durably()
        one, two = ask(world, report.report_id), ask(world, report.report_id)
        with pytest.raises(Refused):
            first.add_request(one, now=NOW, max_per_hour=0)  # rate: refused, rolled back
        assert first.add_request(one, now=NOW, max_per_hour=5)  # batch open
        second._conn.execute("SET lock_timeout = 50")
        with pytest.raises(StoreBusy):
            second.add_request(two, now=NOW, max_per_hour=5)
        first.commit_durably()
    finally:
        first.close()
        second.close()


def test_a_token_another_processs_open_batch_consumed_is_a_replay_once_it_commits(
    pg_dsn: str, world: World
) -> None:
    # The second process waits (for the report's row) until the first's batch commits,
    # then finds the token id taken: refused as a replay, before writing anything, so
    # the rest of its batch stays.
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = _store_report(first, world, inline=True)
        first.commit_durably()
        token = ReleaseToken.decode(token_for(world, report))
        first.release(token, now=NOW, max_queue=10)  # batch open
        second.log_refusal(member="tokyo", reason=Reason.MALFORMED, now=NOW)
        batch = second.barrier
        refused: list[Reason] = []

        def release() -> None:
            try:
                second.release(token, now=NOW, max_queue=10)
            except Refused as exc:
                refused.append(exc.reason)

        thread = threading.Thread(target=release)
        thread.start()
        deadline = time.monotonic() + 10
        while _rows(
            pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ) == [(0,)]:
            assert time.monotonic() < deadline, "the second release never waited"
            time.sleep(0.01)
        first.commit_durably()
        thread.join(timeout=10)
        assert refused == [Reason.REPLAYED]
        assert not second.lost(batch) and second.in_transaction
        second.commit_durably()
        assert [parties for _, parties in _chain(pg_dsn)] == [
            ("seoul",),
            ("seoul", "tokyo"),
            ("tokyo",),
        ]
        assert _rows(pg_dsn, "SELECT count(*) FROM tokens") == [(1,)]
    finally:
        first.close()
        second.close()


def test_consent_steps_of_two_processes_run_one_after_the_other(pg_dsn: str, world: World) -> None:
    # A consent step (and a receipt) takes the ordering lock to its batch's end: checks
    # cannot race, and the queued rows' seq commit in order.
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = _store_report(first, world, inline=True)
        first.commit_durably()
        one, two = ask(world, report.report_id), ask(world, report.report_id)
        assert first.add_request(one, now=NOW, max_per_hour=5)  # batch open
        second._conn.execute("SET lock_timeout = 50")
        with pytest.raises(StoreBusy):
            second.add_request(two, now=NOW, max_per_hour=5)
        first.commit_durably()
        assert second.add_request(two, now=NOW, max_per_hour=5)
        second.commit_durably()
        assert [row.ref for row in first.queued_consent("seoul")] == [one.id, two.id]
    finally:
        first.close()
        second.close()


def test_one_report_uploaded_through_two_processes_is_stored_once(
    pg_dsn: str, world: World
) -> None:
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = seal(world, os.urandom(BLOB_CHUNK))
        writers = [store.begin_upload(report.report_id) for store in (first, second)]
        for writer in writers:
            writer.write(report.ciphertext)
            writer.place()
        for store in (first, second):
            store.commit_durably()
        stored = dict(originator="seoul", size=report.size, digest=report.digest)
        first.add_report(report.report_id, expires=NOW + 60, now=NOW, **stored)  # type: ignore[arg-type]
        first.commit_durably()
        with pytest.raises(StoreBusy, match="stored this report"):
            second.add_report(report.report_id, expires=NOW + 60, now=NOW, **stored)  # type: ignore[arg-type]
        assert second.report(report.report_id) == first.report(report.report_id)
        with second.open_ciphertext(report.report_id) as stream:
            assert stream.read() == report.ciphertext
    finally:
        first.close()
        second.close()


# --- release requests (the rules themselves: test_relay_consent.py, on both stores) ------


@pytest.mark.parametrize("version", [1, 2])  # 2: a store with the prekey table
def test_a_schema_1_or_2_store_gains_the_consent_tables_in_place(
    pg_dsn: str, world: World, version: int
) -> None:
    store = PgStore(pg_dsn)
    report = _store_report(store, world, inline=True)
    store.close()
    with psycopg.connect(pg_dsn) as conn:
        for table in ("requests", "announcements", "consent_queue"):
            conn.execute(f"DROP TABLE {table}")  # type: ignore[arg-type]
        conn.execute("UPDATE tisa_schema SET version = %s", (version,))
    store = PgStore(pg_dsn)
    try:
        assert _rows(pg_dsn, "SELECT version FROM tisa_schema") == [(SCHEMA_VERSION,)]
        assert store.report(report.report_id) is not None  # what it held is kept
        request = ask(world, report.report_id)
        assert store.add_request(request, now=NOW, max_per_hour=5)
        assert [row.ref for row in store.queued_consent("seoul")] == [request.id]
        assert store.request_state(request.id) == "open"
    finally:
        store.close()
    PgStore(pg_dsn).close()  # opened again: nothing to migrate


def test_the_request_rate_counts_requests_through_every_process(pg_dsn: str, world: World) -> None:
    first, second = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    try:
        report = _store_report(first, world, inline=True)
        first.commit_durably()
        one, two, three = (ask(world, report.report_id) for _ in range(3))
        assert first.add_request(one, now=NOW, max_per_hour=2)
        first.commit_durably()
        assert second.add_request(two, now=NOW, max_per_hour=2)
        # A resend through the other process: not new, not counted, not queued again.
        assert not second.add_request(one, now=NOW, max_per_hour=2)
        second.commit_durably()
        with pytest.raises(Refused) as refused:
            first.add_request(three, now=NOW, max_per_hour=2)
        assert refused.value.reason is Reason.RATE_LIMITED
        first.commit_durably()
        assert [row.ref for row in second.queued_consent("seoul")] == [one.id, two.id]
        assert second.ack_consent("seoul", "request", one.id)
        assert not second.ack_consent("seoul", "request", one.id)  # acked before
        second.commit_durably()
        assert [row.ref for row in first.queued_consent("seoul")] == [two.id]
    finally:
        first.close()
        second.close()


async def test_another_process_hears_of_consent_for_whom_it_is_for(
    pg_dsn: str, world: World
) -> None:
    import trio

    listening, sending = PgStore(pg_dsn, group_commit=True), PgStore(pg_dsn, group_commit=True)
    woken: list[str | None] = []

    async def woken_by(queue: Callable[[], object]) -> list[str]:
        woken.clear()
        queue()
        sending.commit_durably()
        while not [member for member in woken if member]:
            await trio.sleep(0.01)
        await trio.sleep(0.1)  # room for a wrong wake-up to come too
        return [member for member in woken if member]

    try:
        report = _store_report(sending, world, inline=True)
        sending.commit_durably()
        request = ask(world, report.report_id)
        answer, announcement = deny(world, request), announce(world, report)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listening.watch, woken.append)
                while not woken:  # the first poll: the listener is up
                    await trio.sleep(0.05)
                assert await woken_by(
                    lambda: sending.add_request(request, now=NOW, max_per_hour=5)
                ) == ["seoul"]
                assert await woken_by(lambda: sending.add_denial(answer, now=NOW)) == ["tokyo"]
                assert await woken_by(lambda: sending.add_announcement(announcement, now=NOW)) == [
                    "tokyo"
                ]
                nursery.cancel_scope.cancel()
    finally:
        listening.close()
        sending.close()


def test_deliveries_sent_together_are_marked_forwarded_in_one_statement(
    pg_dsn: str, world: World
) -> None:
    store = PgStore(pg_dsn, group_commit=True)
    try:
        token_ids = [_released(store, world) for _ in range(3)]
        rows = store.outstanding("tokyo")
        assert store.ack_delivery(token_ids[1], recipient="tokyo", now=NOW)  # overtook
        store.commit_durably()
        seen = _statements(store)
        store.mark_forwarded_many([*rows, rows[0]], now=NOW)
        assert [query.split()[0] for query in seen if "tokens" in query] == ["UPDATE"]
        store.commit_durably()
        events = [
            (AuditEntry.decode(bytes(entry)).event.value, AuditEntry.decode(bytes(entry)).token)  # type: ignore[arg-type]
            for (entry,) in _rows(pg_dsn, "SELECT entry FROM audit ORDER BY seq")
        ][6:]
        assert events == [
            ("forwarded", token_ids[1]),
            ("acknowledged", token_ids[1]),
            ("forwarded", token_ids[0]),
            ("forwarded", token_ids[2]),
        ]
        assert [row.state for row in store.outstanding("tokyo")] == ["delivered"] * 2
    finally:
        store.close()
