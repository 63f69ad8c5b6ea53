"""relay.store: the statements a report's steps cost, and what a failed step leaves.

Steps that make every check before their first write run without a savepoint; the
audit entries of a batch are written by one ``executemany`` before its COMMIT, still in
the same transaction as the changes they record.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.store import _INSERT_RELEASED_REPORT, SCHEMA_VERSION, Store
from tisa.audit import GENESIS, AuditEntry, chain_next
from tisa.errors import Reason, Refused
from tisa.keys import Hash, digest
from tisa.receipt import Receipt
from tisa.report import SealedReport
from tisa.token import MAX_VALIDITY, ReleaseToken
from tisa_testing.world import NOW, World, make_world


@pytest.fixture
def world() -> World:
    return make_world()


def _statements(store: Store) -> list[str]:
    seen: list[str] = []
    store._db.set_trace_callback(seen.append)
    return seen


def _chain_ok(store: Store) -> int:
    """Check the stored chain from GENESIS; returns the number of entries."""
    head = GENESIS
    rows = store._db.execute("SELECT seq, entry, content, head FROM audit ORDER BY seq").fetchall()
    for expected_seq, (seq, entry, content, stored_head) in enumerate(rows, start=1):
        assert seq == expected_seq == AuditEntry.decode(bytes(entry)).seq
        assert bytes(content) == digest(Hash.AUDIT, bytes(entry))
        head = chain_next(head, bytes(content))
        assert head == bytes(stored_head)
    return len(rows)


def _add_report(store: Store, world: World, *, expires: int, now: int = NOW) -> SealedReport:
    report = world.seal()
    store.add_report(
        report.report_id,
        originator="seoul",
        size=report.size,
        digest=report.digest,
        expires=expires,
        now=now,
        data=report.ciphertext,
    )
    return report


def _store_and_release(store: Store, world: World, now: int = NOW) -> ReleaseToken:
    report = _add_report(store, world, expires=now + 3600, now=now)
    token = ReleaseToken.decode(world.token(report))
    store.release(token, now=now, max_queue=100)
    return token


def test_a_reports_steps_take_no_savepoint_and_one_audit_statement_per_batch(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        seen = _statements(store)
        tokens = [_store_and_release(store, world) for _ in range(3)]
        for token in tokens:
            store.mark_forwarded(token.id, now=NOW)
            assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        assert not any("SAVEPOINT" in s or "RELEASE" in s for s in seen)
        # Nothing of the audit log is written before the commit ...
        assert not any("INSERT INTO audit" in s for s in seen)
        assert store._db.execute("SELECT count(*) FROM audit").fetchone()[0] == 0
        store.commit_durably()
        # ... then the 12 entries (stored, released, forwarded, acknowledged per report)
        # go in with the batch, in one executemany (one statement, stepped per row).
        inserts = [s for s in seen if s.startswith("INSERT INTO audit")]
        assert len(inserts) == 12 and len(set(inserts)) == 12
        assert _chain_ok(store) == 12 == store.audit_seq
    finally:
        store.close()


def test_a_refused_step_without_savepoint_leaves_the_batch_whole(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        token = _store_and_release(store, world)
        batch = store.barrier
        with pytest.raises(Refused) as refused:
            store.release(token, now=NOW, max_queue=100)  # a replay, refused before writing
        assert refused.value.reason is Reason.REPLAYED
        assert not store.lost(batch)
        store.commit_durably()
        assert store.committed >= batch
        assert store.token(token.id) is not None
        assert _chain_ok(store) == 2
    finally:
        store.close()


def test_a_savepoint_step_rolled_back_drops_its_buffered_audit_entries(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        token = _store_and_release(store, world)
        seq, head = store.audit_seq, store.audit_head
        real_audit = store._audit

        def audit_then_fail(*args: object, **kwargs: object) -> None:
            real_audit(*args, **kwargs)  # type: ignore[arg-type]
            raise RuntimeError("fails after buffering its entry")

        # revoke keeps its savepoint: a failure inside it undoes its writes and entries,
        # and the rest of the batch stays.
        store._audit = audit_then_fail  # type: ignore[assignment,method-assign]
        with pytest.raises(RuntimeError):
            store.revoke(token.report, token.id, by="seoul", now=NOW)
        store._audit = real_audit  # type: ignore[method-assign]
        assert (store.audit_seq, store.audit_head) == (seq, head)
        assert len(store._audit_rows) == 2
        row = store.token(token.id)
        assert row is not None and row.state == "pending"
        store.revoke(token.report, token.id, by="seoul", now=NOW)
        store.commit_durably()
        assert _chain_ok(store) == 3
    finally:
        store.close()


def test_a_step_without_savepoint_failing_after_a_write_loses_the_whole_batch(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        first = _store_and_release(store, world)
        batch = store.barrier
        report = world.seal()
        # The step fails after its row is written, as an unexpected SQLite error would.
        real_audit = store._audit

        def broken_audit(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        store._audit = broken_audit  # type: ignore[assignment,method-assign]
        with pytest.raises(sqlite3.OperationalError):
            store.add_report(
                report.report_id,
                originator="seoul",
                size=report.size,
                digest=report.digest,
                expires=NOW + 3600,
                now=NOW,
                data=report.ciphertext,
            )
        store._audit = real_audit  # type: ignore[method-assign]
        # Half a step cannot be committed: the batch is gone, and counts as lost, so
        # nothing that depends on it is ever announced.
        assert store.lost(batch)
        assert store.report(first.report) is None and store.report(report.report_id) is None
        assert store.audit_seq == 0 and store.audit_head == GENESIS
        # The store goes on with a fresh batch.
        again = _store_and_release(store, world)
        store.commit_durably()
        assert store.token(again.id) is not None
        assert _chain_ok(store) == 2
    finally:
        store.close()


def test_audit_reads_see_the_open_batchs_entries(tmp_path: Path, world: World) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        _store_and_release(store, world)
        entries = store.audit_entries(0, limit=10)
        assert [entry.seq for entry, _, _ in entries] == [1, 2]
        assert store.audit_point(2) == store.audit_head
        assert len(store.audit_entry_sizes(0, limit=10)) == 2
        store.commit_durably()
        assert _chain_ok(store) == 2
    finally:
        store.close()


def _plan(store: Store, sql: str) -> str:
    # ``sql`` as traced: its parameters already expanded into it.
    rows = store._db.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    return " | ".join(str(row[-1]) for row in rows)


def test_owed_deliveries_are_found_through_the_partial_indexes(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        token = _store_and_release(store, world)
        seen = _statements(store)
        assert [row.id for row in store.outstanding("tokyo")] == [token.id]
        store.expire(now=NOW, clock_skew=0)
        plans = [
            _plan(store, sql)
            for sql in seen
            # the expiry: one UPDATE whose sub-SELECT finds the tokens run out
            if sql.startswith(("SELECT", "UPDATE tokens SET state = 'expired'"))
            and "FROM tokens" in sql
            and "WHERE id =" not in sql
        ]
        assert any("tokens_owed " in plan or "tokens_owed (" in plan for plan in plans)
        assert any("tokens_owed_expiry" in plan for plan in plans)
        # Acked, the token leaves the indexes: nothing owed is found any more.
        store.mark_forwarded(token.id, now=NOW)
        assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        assert store.outstanding("tokyo") == [] and store.queue_length("tokyo") == 0
    finally:
        store.close()


def test_a_schema_3_store_gets_the_partial_indexes(tmp_path: Path, world: World) -> None:
    store = Store(tmp_path)
    token = _store_and_release(store, world)
    # Make it what a schema-3 relay left: the indexes of every token.
    for index in ("tokens_owed", "tokens_owed_report", "tokens_owed_expiry"):
        store._db.execute(f"DROP INDEX {index}")
    store._db.executescript(
        "CREATE INDEX tokens_recipient ON tokens (recipient, state, seq);"
        "CREATE INDEX tokens_report ON tokens (report, state);"
        "CREATE INDEX tokens_expiry ON tokens (state, not_after);"
        "PRAGMA user_version=3;"
    )
    store.close()
    store = Store(tmp_path)
    try:
        indexes = {
            str(row[0])
            for row in store._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tokens'"
                " AND sql IS NOT NULL"
            )
        }
        assert indexes == {"tokens_owed", "tokens_owed_report", "tokens_owed_expiry"}
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [row.id for row in store.outstanding("tokyo")] == [token.id]
    finally:
        store.close()


def test_the_expiry_sweep_finds_live_reports_by_expiry_and_scans_no_reports(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        _store_and_release(store, world)
        seen = _statements(store)
        store.expire(now=NOW, clock_skew=0)
        plans = [_plan(store, sql) for sql in seen if "FROM reports" in sql]
        assert any("reports_live" in plan for plan in plans)
        # The state is in the index's condition, not its key: a release rewrites its
        # entry in place (one page), and no statement of the sweep reads every report.
        assert not any("SCAN reports" in plan for plan in plans), plans
        (index,) = store._db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'reports'"
            " AND sql IS NOT NULL"
        ).fetchall()
        assert "(expires)" in index[0] and "WHERE state IN ('held', 'released')" in index[0]
    finally:
        store.close()


def test_a_schema_7_store_gets_the_live_reports_index(tmp_path: Path, world: World) -> None:
    store = Store(tmp_path)
    report = _add_report(store, world, expires=NOW + 10)
    # Make it what a schema-7 relay left: the expiry index of every report.
    store._db.executescript(
        "DROP INDEX reports_live;"
        "CREATE INDEX reports_expiry ON reports (state, expires);"
        "PRAGMA user_version=7;"
    )
    store.close()
    store = Store(tmp_path)
    try:
        indexes = {
            str(row[0])
            for row in store._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'reports'"
                " AND sql IS NOT NULL"
            )
        }
        assert indexes == {"reports_live"}
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
        # The held report past its time is found and expired through it.
        assert store.expire(now=NOW + 11, clock_skew=0) == {"seoul"}
        report_row = store.report(report.report_id)
        assert report_row is not None and report_row.state == "deleted"
    finally:
        store.close()


def _receipt(world: World, token: ReleaseToken) -> Receipt:
    return Receipt.issue(
        world.secrets["tokyo"],
        world.arrangement,
        report=token.report,
        token=token.id,
        originator="seoul",
        recipient="tokyo",
        digest=b"\x00" * 32,
        received=NOW,
    )


def _indexes(store: Store, *tables: str) -> set[str]:
    """The names of the indexes made on ``tables`` (not SQLite's own)."""
    marks = ", ".join("?" * len(tables))
    return {
        str(row[0])
        for row in store._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
            f" AND tbl_name IN ({marks}) AND sql IS NOT NULL",
            tables,
        )
    }


def _table_sql(store: Store, name: str) -> str:
    row = store._db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return str(row[0])


def _sequence_rows(store: Store) -> set[str]:
    return {str(r[0]) for r in store._db.execute("SELECT name FROM sqlite_sequence")}


def test_tokens_and_receipts_are_numbered_without_a_counter_row(
    tmp_path: Path, world: World
) -> None:
    # Schema 9: a release inserts the token's row and no counter row (sqlite_sequence).
    store = Store(tmp_path, group_commit=True)
    try:
        tokens = [_store_and_release(store, world) for _ in range(3)]
        store.mark_forwarded(tokens[0].id, now=NOW)
        assert store.ack_delivery(tokens[0].id, recipient="tokyo", now=NOW)
        assert store.add_receipt(_receipt(world, tokens[0]), now=NOW)
        store.commit_durably()
        assert "AUTOINCREMENT" not in _table_sql(store, "tokens")
        assert "AUTOINCREMENT" not in _table_sql(store, "receipts")
        assert not _sequence_rows(store) & {"tokens", "receipts"}
        assert [row.seq for row in store.outstanding("tokyo")] == [2, 3]
        assert [r.seq for r in store.queued_receipts("seoul")] == [1]
    finally:
        store.close()


def test_the_newest_token_row_outlives_its_keep_time_so_no_seq_is_given_twice(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        first, newest = _store_and_release(store, world), _store_and_release(store, world)
        for token in (first, newest):
            assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        newest_row = store.token(newest.id)
        assert newest_row is not None and newest_row.seq == 2
        # Long past both ids' keep time: the older row goes, the newest stays ...
        later = newest.not_after + MAX_VALIDITY + 1
        store.expire(now=later, clock_skew=0)
        assert store.token(first.id) is None
        assert store.token(newest.id) is not None
        # ... so the next token's seq is past every seq given before (a pusher that sent
        # seq 2 reads on from seq > 2 and finds it).
        again = _store_and_release(store, world, now=later)  # the store does not check time
        again_row = store.token(again.id)
        assert again_row is not None and again_row.seq == 3
        assert [row.id for row in store.outstanding("tokyo", after=2)] == [again.id]
    finally:
        store.close()


# The tokens' indexes as schemas 8 and 9 had them (and 10 has them).
_TOKEN_INDEXES = (
    "CREATE INDEX tokens_owed ON tokens (recipient, seq)"
    " WHERE state IN ('pending', 'delivered');"
    "CREATE INDEX tokens_owed_report ON tokens (report)"
    " WHERE state IN ('pending', 'delivered');"
    "CREATE INDEX tokens_owed_expiry ON tokens (not_after)"
    " WHERE state IN ('pending', 'delivered');"
)


def _make_schema_8(store: Store) -> None:
    """Turn ``store`` into what a schema-8 relay left: tokens and receipts numbered by
    AUTOINCREMENT (their counter rows in sqlite_sequence)."""
    for name, columns in (
        ("tokens", "seq, id, report, recipient, originator, token, counter, state, not_after,"
         " keep_until"),
        ("receipts", "seq, originator, token, receipt, state"),
    ):  # fmt: skip
        table = (
            _table_sql(store, name)
            .replace("seq INTEGER PRIMARY KEY", "seq INTEGER PRIMARY KEY AUTOINCREMENT")
            .replace(f"CREATE TABLE {name}", f"CREATE TABLE {name}_8", 1)
        )
        store._db.executescript(
            f"{table};"
            f"INSERT INTO {name}_8 ({columns}) SELECT {columns} FROM {name};"
            f"DROP TABLE {name};"
            f"ALTER TABLE {name}_8 RENAME TO {name};"
        )
    store._db.executescript(
        _TOKEN_INDEXES + "CREATE INDEX receipts_originator ON receipts (originator, state, seq);"
        "PRAGMA user_version=8;"
    )


def test_a_schema_8_store_opens_at_the_current_schema_with_nothing_lost(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path)
    tokens = [_store_and_release(store, world) for _ in range(4)]
    store.mark_forwarded(tokens[0].id, now=NOW)
    assert store.ack_delivery(tokens[0].id, recipient="tokyo", now=NOW)
    store.mark_forwarded(tokens[1].id, now=NOW)
    store.revoke(tokens[2].report, tokens[2].id, by="seoul", now=NOW)
    assert store.add_receipt(_receipt(world, tokens[0]), now=NOW)
    _make_schema_8(store)
    assert "AUTOINCREMENT" in _table_sql(store, "tokens")
    tokens_before = store._db.execute("SELECT * FROM tokens ORDER BY seq").fetchall()
    receipts_before = store._db.execute("SELECT * FROM receipts ORDER BY seq").fetchall()
    head = store.audit_head
    store.close()
    store = Store(tmp_path)
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
        assert "AUTOINCREMENT" not in _table_sql(store, "tokens")
        assert "AUTOINCREMENT" not in _table_sql(store, "receipts")
        # Every row, with its seq and state, and the indexes of _SCHEMA.
        assert store._db.execute("SELECT * FROM tokens ORDER BY seq").fetchall() == tokens_before
        assert store._db.execute("SELECT * FROM receipts ORDER BY seq").fetchall() == (
            receipts_before
        )
        assert _indexes(store, "tokens", "receipts") == {
            "tokens_owed",
            "tokens_owed_report",
            "tokens_owed_expiry",
            "receipts_originator",
        }
        assert store.audit_head == head and _chain_ok(store) == store.audit_seq
        # The deliveries still owed are found as before (forwarded, and pending), the
        # replay of a consumed token is still refused, and a new token comes after.
        assert [(row.id, row.state) for row in store.outstanding("tokyo")] == [
            (tokens[1].id, "delivered"),
            (tokens[3].id, "pending"),
        ]
        with pytest.raises(Refused) as refused:
            store.release(tokens[0], now=NOW, max_queue=100)
        assert refused.value.reason is Reason.REPLAYED
        newer = _store_and_release(store, world)
        newer_row = store.token(newer.id)
        assert newer_row is not None and newer_row.seq == 5
        assert [r.token for r in store.queued_receipts("seoul")] == [tokens[0].id]
    finally:
        store.close()


def test_deliveries_sent_together_are_marked_forwarded_in_one_statement(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        tokens = [_store_and_release(store, world) for _ in range(5)]
        rows = store.outstanding("tokyo")
        # The ack of one overtook its forward (it logged forwarded itself).
        assert store.ack_delivery(tokens[1].id, recipient="tokyo", now=NOW)
        store.commit_durably()
        seq = store.audit_seq
        seen = _statements(store)
        store.mark_forwarded_many([*rows, rows[0]], now=NOW + 1)
        updates = [s for s in seen if s.startswith("UPDATE tokens")]
        assert len(updates) == 1 and seen == ["BEGIN IMMEDIATE", *updates]
        # Logged once each, in the order sent, but for the one acked before.
        entries = [entry for entry, _, _ in store.audit_entries(seq, limit=10)]
        assert [(e.event.value, e.token, e.report) for e in entries] == [
            ("forwarded", token.id, token.report) for i, token in enumerate(tokens) if i != 1
        ]
        assert all(e.parties == ("seoul", "tokyo") and e.time == NOW + 1 for e in entries)
        assert [row.state for row in store.outstanding("tokyo")] == ["delivered"] * 4
        # Marked again (a rescan sent them again): nothing changes, nothing is logged.
        store.mark_forwarded_many(rows, now=NOW + 2)
        assert store.audit_seq == seq + 4
        # Longer lists: one statement per 64, the rest padded to one of a few sizes.
        more = [_store_and_release(store, world) for _ in range(70)]
        seen.clear()
        owed = store.outstanding("tokyo", after=rows[-1].seq)
        store.mark_forwarded_many(owed, now=NOW)
        updates = [s for s in seen if s.startswith("UPDATE tokens")]
        assert len(updates) == 2 and updates[1].count("x'") == 16
        assert [row.id for row in owed] == [token.id for token in more]
        assert {row.state for row in store.outstanding("tokyo")} == {"delivered"}
        store.commit_durably()
        assert _chain_ok(store) == store.audit_seq == 5 * 2 + 1 + 1 + 4 + 70 * 3
    finally:
        store.close()


def test_the_sources_of_deliveries_pushed_together_are_read_in_one_query(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        tokens = [_store_and_release(store, world) for _ in range(3)]
        assert store.ack_delivery(tokens[1].id, recipient="tokyo", now=NOW)
        ids = [token.id for token in tokens] + [b"\x00" * 16]
        seen = _statements(store)
        sources = store.delivery_sources(ids)
        assert len(seen) == 1 and seen[0].startswith("SELECT t.id, t.state, r.data")
        # Each as delivery_source reads it; an unknown id is left out.
        assert sources == {token.id: store.delivery_source(token.id) for token in tokens}
        assert [sources[token.id][0] for token in tokens] == [True, False, True]
        assert sources[tokens[0].id][1] == store.inline_data(tokens[0].report) is not None
    finally:
        store.close()


def test_a_second_release_of_a_report_leaves_its_row_alone(tmp_path: Path) -> None:
    # The first release marks the report released and pins its key commitment; a later
    # token for it finds both done and writes its own row only.
    world = make_world(third_party=True)  # canberra, a second recipient
    store = Store(tmp_path, group_commit=True)
    try:
        report = _add_report(store, world, expires=NOW + 3600)
        first = ReleaseToken.decode(world.token(report))
        seen = _statements(store)
        store.release(first, now=NOW, max_queue=100)
        assert sum(s.startswith("UPDATE reports") for s in seen) == 1
        assert store.queue_length("canberra") == 0  # counted now, not in the release
        seen.clear()
        second = ReleaseToken.decode(world.token(report, "canberra"))
        store.release(second, now=NOW, max_queue=100)
        assert [s.split()[0] for s in seen] == ["SELECT", "INSERT"]
        row = store.report(report.report_id)
        assert row is not None and row.state == "released"
        pinned = store._db.execute(
            "SELECT key_commit FROM reports WHERE id = ?", (report.report_id,)
        ).fetchone()[0]
        assert pinned == first.key_commit == second.key_commit
        assert [r.id for r in store.outstanding("canberra")] == [second.id]
    finally:
        store.close()


_IN_CHECKS = {
    "tokens": "CHECK (state IN ('pending', 'delivered', 'acked', 'revoked', 'expired'))",
    "reports": "CHECK (state IN ('held', 'released', 'deleted'))",
}


def _make_schema_9(store: Store) -> None:
    """Turn ``store`` into what a schema-9 relay left: the states of tokens and reports
    checked by an IN list (its indexes made again as schema 9 had them)."""
    for name, columns in (
        ("tokens", "seq, id, report, recipient, originator, token, counter, state, not_after,"
         " keep_until"),
        ("reports", "rowid, id, originator, size, digest, path, state, ended, expires,"
         " stored_at, key_commit, data"),
    ):  # fmt: skip
        table = _table_sql(store, name)
        start = table.index("CHECK (state =")
        end = table.index("),", start) + 1
        table = (table[:start] + _IN_CHECKS[name] + table[end:]).replace(
            f"CREATE TABLE {name}", f"CREATE TABLE {name}_old", 1
        )
        store._db.executescript(
            f"{table};"
            f"INSERT INTO {name}_old ({columns}) SELECT {columns} FROM {name};"
            f"DROP TABLE {name};"
            f"ALTER TABLE {name}_old RENAME TO {name};"
        )
    store._db.executescript(
        _TOKEN_INDEXES
        + "CREATE INDEX reports_live ON reports (expires) WHERE state IN ('held', 'released');"
        "PRAGMA user_version=9;"
    )


def _temporary_tables(store: Store, sql: str) -> int:
    # The temporary tables a statement opens (SQLite's OpenEphemeral; an IN list of
    # three or more constants in a CHECK opens one at every row written).
    program = store._db.execute("EXPLAIN " + sql, (b"",) * sql.count("?")).fetchall()
    return sum(row[1] == "OpenEphemeral" for row in program)


_STATE_WRITES = (
    "UPDATE tokens SET state = 'acked', token = ? WHERE id = ? AND state = 'delivered'",
    "UPDATE reports SET state = 'released' WHERE id = ?",
)


def test_a_schema_9_store_opens_at_10_with_nothing_lost_and_states_checked_as_before(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path)
    tokens = [_store_and_release(store, world) for _ in range(3)]
    store.mark_forwarded(tokens[0].id, now=NOW)
    assert store.ack_delivery(tokens[0].id, recipient="tokyo", now=NOW)
    held = _add_report(store, world, expires=NOW + 60)
    _make_schema_9(store)
    assert "state IN" in _table_sql(store, "tokens") and "state IN" in _table_sql(store, "reports")
    assert all(_temporary_tables(store, sql) == 1 for sql in _STATE_WRITES)
    before = {
        name: store._db.execute(f"SELECT rowid, * FROM {name} ORDER BY rowid").fetchall()
        for name in ("tokens", "reports")
    }
    head = store.audit_head
    store.close()
    store = Store(tmp_path)
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
        # Every row with its rowid (a token's seq), the indexes, the audit chain.
        for name, rows in before.items():
            assert store._db.execute(f"SELECT rowid, * FROM {name} ORDER BY rowid").fetchall() == (
                rows
            )
        assert _indexes(store, "tokens", "reports") == {
            "tokens_owed",
            "tokens_owed_report",
            "tokens_owed_expiry",
            "reports_live",
        }
        assert store.audit_head == head and _chain_ok(store) == store.audit_seq
        # No temporary table per row written now, and the states are checked as before.
        assert "state IN" not in _table_sql(store, "tokens") + _table_sql(store, "reports")
        assert all(_temporary_tables(store, sql) == 0 for sql in _STATE_WRITES)
        for sql, params in (
            ("UPDATE tokens SET state = ? WHERE id = ?", ("forwarded", tokens[1].id)),
            ("UPDATE reports SET state = ? WHERE id = ?", ("gone", held.report_id)),
            ("UPDATE reports SET state = ? WHERE id = ?", (None, held.report_id)),
        ):
            with pytest.raises(sqlite3.IntegrityError):
                store._db.execute(sql, params)
        # The store goes on: owed deliveries found, a replay refused, a new token after.
        assert [row.id for row in store.outstanding("tokyo")] == [tokens[1].id, tokens[2].id]
        with pytest.raises(Refused) as refused:
            store.release(tokens[0], now=NOW, max_queue=100)
        assert refused.value.reason is Reason.REPLAYED
        newer = _store_and_release(store, world)
        assert store.token(newer.id).seq == 4  # type: ignore[union-attr]
        assert store.report(held.report_id).state == "held"  # type: ignore[union-attr]
    finally:
        store.close()


def test_a_fresh_stores_writes_of_a_state_open_no_temporary_table(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        assert all(_temporary_tables(store, sql) == 0 for sql in _STATE_WRITES)
        assert _temporary_tables(store, _INSERT_RELEASED_REPORT) == 0
    finally:
        store.close()
