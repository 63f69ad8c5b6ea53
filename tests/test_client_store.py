"""The member node's durable store: what survives a reopen, counters, debris."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
from nodes.client_world import LEVEL, SCOPE, make_world

import tisa_io.durable
from clients import store as rows
from clients.events import (
    ExpiredEvent,
    RefusedEvent,
    Released,
    Stored,
    decode_event,
    encode_event,
)
from clients.store import MemberStore
from tisa.errors import Reason, Refused, UsageError
from tisa.prekeys import PrekeyKind, PrekeySecret
from tisa.receipt import StoredAck
from tisa.token import ReleaseToken, issue_token

ARRANGEMENT, SECRETS = make_world()
NOW = 1_700_000_000


def _queue(store: MemberStore, report: bytes = b"r" * 16, *, data: bytes | None = None) -> None:
    # In a file, or with ``data`` a small report kept in its row.
    if data is None:
        (store.outbox_dir / "r.sealed").write_bytes(b"ciphertext")
    store.record_submission(
        report=report,
        file="r.sealed" if data is None else "",
        data=data,
        size=2000,
        digest=b"d" * 32,
        content_key=b"k" * 32,
        scope=SCOPE,
        level=LEVEL,
        recipients=("tokyo",),
        expires=NOW + 60,
        created=NOW,
    )


SIGNED_SECRET = PrekeySecret(
    kind=PrekeyKind.SIGNED, secret=bytes(range(32)), created=NOW - 60, not_after=NOW + 3600
)
SIGNED_PREKEY = SIGNED_SECRET.publish(SECRETS["tokyo"], "tokyo", ARRANGEMENT)
REPORT = b"r" * 16


def _stored_ack() -> StoredAck:
    """The relay's ack of REPORT (digest d*32, size 2000, as _queue records it)."""
    return StoredAck.issue(
        SECRETS["washington"],
        ARRANGEMENT,
        report=REPORT,
        originator="seoul",
        digest=b"d" * 32,
        size=2000,
        stored=NOW,
    )


def _token(counter: int, report: bytes = b"r" * 16) -> bytes:
    return issue_token(
        SECRETS["seoul"],
        "seoul",
        ARRANGEMENT,
        recipient="tokyo",
        report_id=report,
        digest=b"d" * 32,
        size=2000,
        content_key=b"k" * 32,
        scope=SCOPE,
        level=LEVEL,
        not_before=NOW,
        not_after=NOW + 60,
        counter=counter,
        signed_prekey=SIGNED_PREKEY,
    )


def test_outbox_and_counters_survive_reopen(tmp_path: pathlib.Path) -> None:
    store = MemberStore(tmp_path, "seoul")
    _queue(store)
    first = store.issue_release(b"r" * 16, "tokyo", _token, NOW)
    store.close()

    store = MemberStore(tmp_path, "seoul")
    [queued] = store.queued_submissions()
    assert queued.report == b"r" * 16 and queued.path is not None and queued.path.exists()
    assert store.releases_to_send() == []  # not before the relay stored the report
    second = store.issue_release(b"r" * 16, "tokyo", _token, NOW)
    assert [r.counter for r in store.releases_of(b"r" * 16)] == [1, 2]
    assert first != second

    ack = StoredAck.issue(
        SECRETS["washington"],
        ARRANGEMENT,
        report=b"r" * 16,
        originator="seoul",
        digest=b"d" * 32,
        size=2000,
        stored=NOW,
    )
    stored = Stored(report=b"r" * 16, ack=ack)
    # Another digest or size than the submission's: nothing written.
    assert not store.mark_stored(b"r" * 16, ack.encoded, stored, digest=b"e" * 32, size=2000)
    assert not store.mark_stored(b"r" * 16, ack.encoded, stored, digest=b"d" * 32, size=2001)
    assert queued.path.exists()
    assert store.mark_stored(b"r" * 16, ack.encoded, stored, digest=b"d" * 32, size=2000)
    assert not store.mark_stored(b"r" * 16, ack.encoded, stored, digest=b"d" * 32, size=2000)
    assert not queued.path.exists()  # the relay holds it now
    assert [r.token for r in store.releases_to_send()] == [first, second]
    [(seq, kind, data)] = store.events_after(0, limit=10)
    assert decode_event(kind, data, arrangement=ARRANGEMENT) == Stored(report=b"r" * 16, ack=ack)
    store.drop_event(seq)
    assert store.events_after(0, limit=10) == []
    store.close()


def test_counter_is_not_reused_when_issuing_fails(tmp_path: pathlib.Path) -> None:
    store = MemberStore(tmp_path, "seoul")
    _queue(store)

    def broken(counter: int) -> bytes:
        raise UsageError("no")

    with pytest.raises(UsageError):
        store.issue_release(b"r" * 16, "tokyo", broken, NOW)
    store.issue_release(b"r" * 16, "tokyo", _token, NOW)
    assert [r.counter for r in store.releases_of(b"r" * 16)] == [1]
    store.close()


def test_store_belongs_to_one_member(tmp_path: pathlib.Path) -> None:
    MemberStore(tmp_path, "seoul").close()
    with pytest.raises(UsageError):
        MemberStore(tmp_path, "tokyo")


def test_debris_is_removed_on_open(tmp_path: pathlib.Path) -> None:
    store = MemberStore(tmp_path, "tokyo")
    (store.outbox_dir / "orphan.sealed").write_bytes(b"x")
    (store.inbox_dir / "orphan").mkdir()
    (store.tmp_dir / "half").write_bytes(b"x")
    store.close()
    store = MemberStore(tmp_path, "tokyo")
    assert not any(store.outbox_dir.iterdir())
    assert not any(store.inbox_dir.iterdir())
    assert not any(store.tmp_dir.iterdir())
    store.close()


def test_event_records_round_trip() -> None:
    event = RefusedEvent(ref=b"x" * 16, reason=Reason.OUT_OF_SCOPE, detail="no")
    kind, data = encode_event(event)
    assert decode_event(kind, data, arrangement=ARRANGEMENT) == event


def test_sqlite_is_wal_and_normal_sync_with_wal_fsync(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # synchronous=NORMAL: COMMIT does not fsync; a batch counts as on disk only after
    # an fsync of the WAL file made after its COMMIT (the node then sends its acks).
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    # The WAL is flushed with fdatasync where there is one (tisa_io.durable).
    monkeypatch.setattr(tisa_io.durable, "sync_data", fsync)
    store.add_event(RefusedEvent(ref=b"", reason=Reason.BUSY, detail=""))
    batch = store.barrier
    store.commit()
    assert synced == [] and store.written == batch and store.committed < batch
    store.fsync_wal()
    assert synced == [os.stat(tmp_path / "member.db-wal").st_ino]
    store.mark_durable(batch)
    assert store.committed == batch and not store.pending
    # Without group commit a transaction is fsynced before it returns.
    monkeypatch.setattr(store, "group_commit", False)
    store.add_event(RefusedEvent(ref=b"", reason=Reason.BUSY, detail=""))
    assert len(synced) == 2
    store.close()


def test_a_failed_wal_fsync_poisons_the_store(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    store.add_event(RefusedEvent(ref=b"", reason=Reason.BUSY, detail=""))
    batch = store.barrier
    store.commit()

    def fail(fd: int) -> None:
        raise OSError(5, "EIO")

    # The WAL is flushed with fdatasync where there is one (tisa_io.durable).
    monkeypatch.setattr(tisa_io.durable, "sync_data", fail)
    with pytest.raises(OSError):
        store.fsync_wal()
    store.mark_durable(batch)  # never counts, nor any later batch
    assert store.committed < batch and store.lost(batch)
    store.add_event(RefusedEvent(ref=b"", reason=Reason.BUSY, detail=""))
    with pytest.raises(OSError):
        store.commit()
    store._db.close()


def test_missing_release_counters(tmp_path: pathlib.Path) -> None:
    store = MemberStore(tmp_path / "tokyo", "tokyo")

    class _Token:
        def __init__(self, counter: int) -> None:
            self.originator, self.counter = "seoul", counter

    def receive(counter: int) -> None:
        with store.transaction() as db:
            MemberStore._bump_counter(db, _Token(counter))  # type: ignore[arg-type]
        store.commit()

    assert store.missing_counters("seoul") == []
    for counter in (1, 4, 7):
        receive(counter)
    assert store.missing_counters("seoul") == [2, 3, 5, 6]
    assert store.missing_counters("seoul", limit=3) == [2, 3, 5]
    receive(3)  # a late arrival closes its gap
    assert store.missing_counters("seoul") == [2, 5, 6]
    assert store.missing_counters("busan") == []
    store.close()


def test_releases_go_right_behind_their_submission(tmp_path: pathlib.Path) -> None:
    # A release may go out once its report's submission went out on the connection
    # (the relay handles a connection's messages in order), before the relay's `stored`.
    store = MemberStore(tmp_path, "seoul")
    _queue(store, b"a" * 16)
    first = store.issue_release(b"a" * 16, "tokyo", lambda c: _token(c, b"a" * 16), NOW)
    _queue(store, b"b" * 16)
    second = store.issue_release(b"b" * 16, "tokyo", lambda c: _token(c, b"b" * 16), NOW)
    third = store.issue_release(b"a" * 16, "tokyo", lambda c: _token(c, b"a" * 16), NOW)
    assert store.releases_to_send() == []
    # Only a's submission went out: the list stops before b's release, so a caller that
    # remembers the last seq it got never skips one.
    assert [r.token for r in store.releases_to_send(submitted={b"a" * 16})] == [first]
    sendable = store.releases_to_send(submitted={b"a" * 16, b"b" * 16})
    assert [r.token for r in sendable] == [first, second, third]
    assert [r.seq for r in sendable] == sorted(r.seq for r in sendable)
    after = store.releases_to_send(after=sendable[0].seq, submitted={b"a" * 16, b"b" * 16})
    assert [r.token for r in after] == [second, third]
    # The queued submissions read the same way, after the last one sent.
    queued = store.queued_submissions()
    assert [q.report for q in queued] == [b"a" * 16, b"b" * 16]
    assert [q.report for q in store.queued_submissions(after=queued[0].seq)] == [b"b" * 16]
    assert store.queued_submissions(after=queued[1].seq) == []
    store.close()


def test_stored_events_are_bounded_by_max_stored_events(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Crossing the bound drops the oldest notifications; the newest ones stay, in order.
    import clients.store

    monkeypatch.setattr(clients.store, "MAX_STORED_EVENTS", 5)
    store = MemberStore(tmp_path, "seoul")
    try:
        for i in range(8):
            store.add_event(ExpiredEvent(report=bytes([i]) * 16, token=None))
        kept = store.events_after(0, limit=100)
        assert [(kind, data) for _, kind, data in kept] == [
            encode_event(ExpiredEvent(report=bytes([i]) * 16, token=None)) for i in range(3, 8)
        ]
        assert [seq for seq, _, _ in kept] == [4, 5, 6, 7, 8]
    finally:
        store.close()


def test_consent_events_round_trip_and_are_verified_again() -> None:
    from clients.events import ConsentRejected, DeniedEvent, RequestEvent
    from tisa.consent import Answer, Request
    from tisa.errors import Refused, VerificationError

    request = Request.issue(
        SECRETS["tokyo"],
        "tokyo",
        ARRANGEMENT,
        originator="seoul",
        report=b"r" * 16,
        purpose="p",
        now=NOW,
        valid_for=60,
    )
    answer = Answer.deny(SECRETS["seoul"], "seoul", ARRANGEMENT, request, reason="denied", now=NOW)
    rejected = ConsentRejected(
        kind="answer", ref=request.id, error=Refused(Reason.REFLECTED, "came back")
    )
    for event in (RequestEvent(request=request), DeniedEvent(answer=answer), rejected):
        kind, data = encode_event(event)
        again = decode_event(kind, data, arrangement=ARRANGEMENT)
        assert type(again) is type(event)
        assert encode_event(again) == (kind, data)
    # A stored record whose signed object was altered does not come back.
    kind, data = encode_event(RequestEvent(request=request))
    tampered = data.replace(b"tokyo", b"tokyx")
    with pytest.raises(VerificationError):
        decode_event(kind, tampered, arrangement=ARRANGEMENT)


@pytest.mark.parametrize("schema", ["2", "3"])  # 3: a store with the prekey tables
def test_schema_2_or_3_store_gains_the_consent_tables(tmp_path: pathlib.Path, schema: str) -> None:
    import sqlite3

    MemberStore(tmp_path, "seoul").close()
    db = sqlite3.connect(tmp_path / "member.db")
    for table in ("consent_out", "requests", "announcements"):
        db.execute(f"DROP TABLE {table}")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (schema,))
    db.commit()
    db.close()
    store = MemberStore(tmp_path, "seoul")
    try:
        assert store.requests() == [] and store.announcements() == []
        assert store.consent_to_send() == []
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "member.db")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("4",)
    db.close()


def test_an_approval_issues_nothing_once_its_request_was_closed(tmp_path: pathlib.Path) -> None:
    # Approving waits for the requester's prekeys; a denial recorded meanwhile closes the
    # request, and the approving token is then not issued at all: no counter taken, no
    # release recorded, the wanted release still waiting (its issuer records the refusal).
    from clients.events import RequestEvent
    from tisa.consent import Answer, Request
    from tisa.errors import Refused

    request = Request.issue(
        SECRETS["tokyo"],
        "tokyo",
        ARRANGEMENT,
        originator="seoul",
        report=b"r" * 16,
        purpose="p",
        now=NOW,
        valid_for=60,
    )
    store = MemberStore(tmp_path, "seoul")
    _queue(store)
    store.add_incoming_request(request, RequestEvent(request=request))
    wanted = store.want_release(b"r" * 16, "tokyo", 60, approves=request.id)
    assert store.wanted_release(wanted).approves == request.id  # type: ignore[union-attr]
    denial = Answer.deny(SECRETS["seoul"], "seoul", ARRANGEMENT, request, reason="denied", now=NOW)
    store.queue_consent("answer", request.id, denial.encoded, denial=denial)
    with pytest.raises(Refused) as info:
        store.issue_release(b"r" * 16, "tokyo", _token, NOW, wanted=wanted, approves=request.id)
    assert info.value.reason is Reason.ANSWERED
    assert store.releases_of(b"r" * 16) == []
    assert store.wanted_release(wanted).state == "waiting"  # type: ignore[union-attr]
    assert store.request(request.id, "in").state == "denied"  # type: ignore[union-attr]
    # An open request is approved by the token in the same transaction.
    again = Request.issue(
        SECRETS["tokyo"],
        "tokyo",
        ARRANGEMENT,
        originator="seoul",
        report=b"r" * 16,
        purpose="again",
        now=NOW,
        valid_for=60,
    )
    store.add_incoming_request(again, RequestEvent(request=again))
    second = store.want_release(b"r" * 16, "tokyo", 60, approves=again.id)
    token_id = store.issue_release(
        b"r" * 16, "tokyo", _token, NOW, wanted=second, approves=again.id
    )
    assert [r.counter for r in store.releases_of(b"r" * 16)] == [1]
    record = store.request(again.id, "in")
    assert record is not None and (record.state, record.token) == ("approved", token_id)
    assert store.wanted_release(second).token == token_id  # type: ignore[union-attr]
    store.close()


def test_savepoint_free_steps_that_refuse_leave_the_batch_whole(tmp_path: pathlib.Path) -> None:
    # Issue 11: the per-report steps run without a savepoint; each makes its checks
    # before its first write, so one that refuses (or fails on its first write) leaves
    # the other steps of the open batch to commit with it.
    import sqlite3

    store = MemberStore(tmp_path, "seoul", group_commit=True)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    _queue(store)
    assert not store.mark_stored(
        b"x" * 16,
        b"ack",
        RefusedEvent(ref=b"", reason=Reason.BUSY, detail=""),
        digest=b"d" * 32,
        size=2000,
    )
    assert not store.set_release_state(b"t" * 16, "released", None)
    assert not store.mark_handed(b"t" * 16)
    with pytest.raises(sqlite3.IntegrityError):
        _queue(store)  # the same report again: refused by its first write
    batch = store.barrier
    store.commit()
    store.fsync_wal()
    store.mark_durable(batch)
    assert not store.lost(batch)
    assert [s.report for s in store.queued_submissions()] == [b"r" * 16]
    assert not any(s.startswith("SAVEPOINT") for s in statements)
    store.close()


def test_each_kind_names_the_batch_that_last_wrote_it(tmp_path: pathlib.Path) -> None:
    # Issue 11: a reader of one kind of row waits for the batch that wrote it, not for
    # a batch unrelated steps opened since; it skips a query when the kind's change
    # count did not move.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    assert store.batch_of(rows.SUBMISSIONS) == 0
    _queue(store, b"a" * 16)
    first = store.barrier
    assert store.batch_of(rows.SUBMISSIONS) == first
    counted = store.kind_changes[rows.SUBMISSIONS]
    store.commit()
    # The stored answer of a (outbox state, an event) opens the next batch: the queued
    # submissions still come from the first.
    assert store.mark_stored(
        b"a" * 16, b"ack", RefusedEvent(ref=b"", reason=Reason.BUSY), digest=b"d" * 32, size=2000
    )
    assert store.barrier == first + 1
    assert store.batch_of(rows.SUBMISSIONS) == first
    # (A queued submission stored is a change of STORED, not of OUTBOX_STATE.)
    assert store.batch_of(rows.STORED) == store.batch_of(rows.EVENTS) == first + 1
    assert store.batch_of(rows.OUTBOX_STATE) == 0
    assert store.batch_of(rows.SUBMISSIONS, rows.STORED) == first + 1
    assert store.kind_changes[rows.SUBMISSIONS] == counted  # taking one out: no change
    _queue(store, b"b" * 16)
    assert store.batch_of(rows.SUBMISSIONS) == first + 1
    assert store.kind_changes[rows.SUBMISSIONS] == counted + 1
    store.close()


def test_a_lost_batch_is_never_named_for_a_kind(tmp_path: pathlib.Path) -> None:
    # A batch rolled back whole (its COMMIT failed) never reaches the disk: what a
    # reader sees of a kind it wrote comes from an earlier batch, so a reader must not
    # wait for (and fail on) the lost one.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    _queue(store, b"a" * 16)
    kept = store.barrier
    store.commit_durably()
    _queue(store, b"b" * 16)
    lost = store.barrier
    store._abandon_batch()
    assert store.lost(lost)
    assert store.batch_of(rows.SUBMISSIONS) == kept
    assert [s.report for s in store.queued_submissions()] == [b"a" * 16]
    store.close()


def test_without_group_commit_every_kind_is_on_disk(tmp_path: pathlib.Path) -> None:
    # Each transaction is fsynced before it returns: nothing to wait for.
    store = MemberStore(tmp_path, "seoul")
    _queue(store)
    assert store.batch_of(rows.SUBMISSIONS) == 0
    assert store.kind_changes[rows.SUBMISSIONS] == 1
    store.close()


# --- issue 11: what the store keeps in memory beside its rows ---------------------


def _counters(store: MemberStore) -> list[int]:
    return [r.counter for r in store.releases_of(REPORT)]


def test_the_counter_kept_in_memory_is_read_again_after_a_lost_batch(
    tmp_path: pathlib.Path,
) -> None:
    # The last counter issued is kept in memory (no SELECT per token). A batch lost
    # whole (a failed COMMIT) takes its counters with it: the next token takes the
    # counter after the last one on disk, not after the lost one (no gap), and never
    # one on disk.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    _queue(store)
    store.issue_release(REPORT, "tokyo", _token, NOW)
    store.commit_durably()
    store.issue_release(REPORT, "tokyo", _token, NOW)
    assert _counters(store) == [1, 2]
    store._abandon_batch()  # as a failed COMMIT does
    assert _counters(store) == [1]
    store.issue_release(REPORT, "tokyo", _token, NOW)
    assert _counters(store) == [1, 2]
    store.commit_durably()
    store.close()
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    store.issue_release(REPORT, "tokyo", _token, NOW)
    assert _counters(store) == [1, 2, 3]
    store.close()


def test_a_token_refused_at_its_first_write_leaves_the_counter_and_batch(
    tmp_path: pathlib.Path,
) -> None:
    # Issuing writes the end of its release request first: one ended meanwhile refuses
    # before any write (no savepoint), the batch keeps its other steps, and the counter
    # is not taken.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    _queue(store)
    wanted = store.want_release(REPORT, "tokyo", 60)
    store.refuse_wanted(wanted, "expired", "", RefusedEvent(ref=b"", reason=Reason.BUSY))
    with pytest.raises(Refused) as refused:
        store.issue_release(REPORT, "tokyo", _token, NOW, wanted=wanted)
    assert refused.value.reason is Reason.EXPIRED
    store.issue_release(REPORT, "tokyo", _token, NOW)
    store.commit_durably()
    assert _counters(store) == [1]
    assert [s.report for s in store.queued_submissions()] == [REPORT]
    assert sum(s.startswith("SAVEPOINT") for s in statements) == 1  # refuse_wanted's
    store.close()


def test_the_tokens_in_memory_follow_their_releases(tmp_path: pathlib.Path) -> None:
    # The sender takes a queued submission's tokens from memory (fresh_tokens) instead
    # of reading them back; memory holds only tokens still pending, and says "not
    # known" (None) whenever it may not hold all this process issued.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    _queue(store)
    assert store.fresh_tokens(REPORT) is None
    first = store.issue_release(REPORT, "tokyo", _token, NOW)
    second = store.issue_release(REPORT, "tokyo", _token, NOW)
    [r1, r2] = store.releases_of(REPORT)
    # The id read from the token issued (without decoding it whole) is its id.
    assert [ReleaseToken.decode(r.encoded).id for r in (r1, r2)] == [first, second]
    assert store.fresh_tokens(REPORT) == [(first, r1.encoded), (second, r2.encoded)]
    assert store.mark_released(first, REPORT)
    assert not store.mark_released(first, REPORT)  # not pending any more: no event
    assert store.fresh_tokens(REPORT) == [(second, r2.encoded)]
    [(_, kind, data)] = store.events_after(0, limit=10)
    event = decode_event(kind, data, arrangement=ARRANGEMENT)
    assert isinstance(event, Released) and (event.token, event.recipient) == (first, "tokyo")
    # A refusal of a release: forgotten, read from the rows again.
    assert store.set_release_state(second, "refused", None, reason="expired")
    assert store.fresh_tokens(REPORT) is None
    third = store.issue_release(REPORT, "tokyo", _token, NOW)
    assert [t for t, _ in store.fresh_tokens(REPORT) or []] == [third]
    # A rollback forgets them all.
    store._abandon_batch()
    assert store.fresh_tokens(REPORT) is None
    _queue(store)
    fourth = store.issue_release(REPORT, "tokyo", _token, NOW)
    assert [t for t, _ in store.fresh_tokens(REPORT) or []] == [fourth]
    store.commit_durably()
    store.close()
    # A new store object knows none.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    assert store.fresh_tokens(REPORT) is None
    store.close()


def test_a_receipt_is_recorded_only_for_a_release_of_ours(tmp_path: pathlib.Path) -> None:
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    _queue(store)
    token = store.issue_release(REPORT, "tokyo", _token, NOW)
    event = RefusedEvent(ref=b"", reason=Reason.BUSY)

    def add(token: bytes, report: bytes, recipient: str) -> bool:
        return store.add_receipt(
            token=token,
            report=report,
            recipient=recipient,
            encoded=b"receipt",
            now=NOW,
            event=event,
            of_release=True,
        )

    assert not add(b"x" * 16, REPORT, "tokyo")
    assert not add(token, b"s" * 16, "tokyo")
    assert not add(token, REPORT, "seoul")
    assert store.receipts() == []
    assert add(token, REPORT, "tokyo")
    assert not add(token, REPORT, "tokyo")  # a copy: no second event
    assert store.receipts() == [b"receipt"]
    assert len(store.events_after(0, limit=10)) == 1
    store.close()


def test_a_delivered_counter_and_signed_prekey_kept_in_memory_follow_the_rows(
    tmp_path: pathlib.Path,
) -> None:
    # Tokyo keeps the last counter seen per originator and its signed prekeys'
    # secrets in memory: a deleted prekey's secret is gone from memory as well, and a
    # lost batch's counter is read again.
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    store.add_prekeys([SIGNED_SECRET])
    store.commit_durably()
    assert store.prekey_secret(PrekeyKind.SIGNED, SIGNED_SECRET.public) == SIGNED_SECRET.secret
    assert store.prekey_secret(PrekeyKind.SIGNED, SIGNED_SECRET.public) == SIGNED_SECRET.secret
    store.delete_old_prekeys(now=SIGNED_SECRET.not_after + 10, grace=0)
    store.commit_durably()
    with pytest.raises(Refused) as refused:
        store.prekey_secret(PrekeyKind.SIGNED, SIGNED_SECRET.public)
    assert refused.value.reason is Reason.UNKNOWN_PREKEY
    # A prekey added in a batch that is then lost: not served from memory.
    store.add_prekeys([SIGNED_SECRET])
    assert store.prekey_secret(PrekeyKind.SIGNED, SIGNED_SECRET.public) == SIGNED_SECRET.secret
    store._abandon_batch()
    with pytest.raises(Refused):
        store.prekey_secret(PrekeyKind.SIGNED, SIGNED_SECRET.public)
    assert store.last_counter("seoul") == 0
    token = ReleaseToken.decode(_token(5))
    store.reject_delivery(
        token_id=token.id, token=token, reason="expired", detail="", now=NOW, events=[]
    )
    assert store.last_counter("seoul") == 5
    store._abandon_batch()
    assert store.last_counter("seoul") == 0
    store.reject_delivery(
        token_id=token.id, token=token, reason="expired", detail="", now=NOW, events=[]
    )
    store.commit_durably()
    store.close()
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    assert store.last_counter("seoul") == 5
    store.close()


def test_seen_delivery_reads_both_ids_at_once(tmp_path: pathlib.Path) -> None:
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    with store.transaction() as db:
        db.execute("INSERT INTO seen VALUES (?, 'token', 0), (?, 'report', 0)", (b"t", b"r"))
    assert store.seen_delivery(b"t", b"r") == (True, True)
    assert store.seen_delivery(b"t", b"x") == (True, False)
    assert store.seen_delivery(b"r", b"t") == (False, False)  # each id under its kind
    assert store.seen_delivery(b"x", b"r") == (False, True)
    store.close()


def test_events_with_a_signed_part_are_handed_over_from_memory(tmp_path: pathlib.Path) -> None:
    # The event feed takes an event whose record carries a signed object (a stored
    # ack, a receipt, consent) from memory as recorded, its signature verified once;
    # after a rollback, beyond MAX_FRESH_EVENTS, or in a reopened store, it decodes
    # the record (and verifies again).
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    ack = _stored_ack()
    event = Stored(report=REPORT, ack=ack)
    store.add_event(event)
    store.add_event(RefusedEvent(ref=b"", reason=Reason.BUSY))  # decoded: nothing signed
    [(first, _, _), (second, _, _)] = store.events_after(0, limit=10)
    assert store.fresh_event(first) is event
    assert store.fresh_event(first) is None  # taken out
    assert store.fresh_event(second) is None
    store.add_event(event)
    [*_, (third, _, _)] = store.events_after(0, limit=10)
    store._abandon_batch()
    assert store.fresh_event(third) is None
    for _ in range(rows.MAX_FRESH_EVENTS + 1):
        store.add_event(event)
    held = [seq for seq, _, _ in store.events_after(0, limit=rows.MAX_FRESH_EVENTS + 1)]
    assert store.fresh_event(held[0]) is None  # the oldest let go
    assert store.fresh_event(held[-1]) is event
    store.commit_durably()
    store.close()
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    assert store.fresh_event(held[1]) is None
    store.close()


def test_mark_handed_many_marks_all_in_one_step_or_none(tmp_path: pathlib.Path) -> None:
    # Node.ack_many's store step: more reports than one statement names (_IN_CHUNK),
    # all marked by one step of the open batch, or none when one is not in the inbox;
    # lost with the batch when the process dies before its commit.
    from clients.store import _IN_CHUNK

    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    tokens = [i.to_bytes(16, "big") for i in range(_IN_CHUNK * 2 + 7)]
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO inbox (token, report, originator, header, dir, received, receipt)"
            " VALUES (?, ?, 'seoul', x'', '', 0, x'')",
            [(token, b"r" + token) for token in tokens],
        )
    store.commit_durably()

    def handed() -> list[int]:
        return [row[0] for row in store._db.execute("SELECT handed FROM inbox ORDER BY seq")]

    assert store.mark_handed_many(tokens) == [] and handed() == [1] * len(tokens)
    store._db.close()  # killed before the batch holding the marks was committed
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    assert handed() == [0] * len(tokens)  # none of them on disk

    stranger = b"s" * 16
    ops = store.ops
    assert store.mark_handed_many([*tokens, stranger, stranger]) == [stranger]
    assert handed() == [0] * len(tokens)  # none marked
    assert store.mark_handed_many([]) == []
    assert store.mark_handed_many([*tokens, tokens[0]]) == []  # twice: once
    assert handed() == [1] * len(tokens) and store.ops == ops + 2
    store.close()
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    assert handed() == [1] * len(tokens)
    store.close()


def test_a_token_id_the_caller_chose_is_recorded_without_reading_the_token(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 11: the node picks the token's id, so the store does not open the token's
    # envelope again to learn it; without one it still reads it from the token.
    from clients import store as member_store
    from tisa.keys import random_id

    store = MemberStore(tmp_path, "seoul")
    _queue(store)
    read = member_store.open_envelope
    opened: list[bytes] = []

    def counted(data: bytes, **kwargs: Any) -> Any:
        opened.append(data)
        return read(data, **kwargs)

    monkeypatch.setattr(member_store, "open_envelope", counted)
    chosen = random_id()

    def make(counter: int) -> bytes:
        return issue_token(
            SECRETS["seoul"], "seoul", ARRANGEMENT, recipient="tokyo", report_id=REPORT,
            digest=b"d" * 32, size=2000, content_key=b"k" * 32, scope=SCOPE, level=LEVEL,
            not_before=NOW, not_after=NOW + 60, counter=counter,
            signed_prekey=SIGNED_PREKEY, token_id=chosen,
        )  # fmt: skip

    assert store.issue_release(REPORT, "tokyo", make, NOW, token_id=chosen) == chosen
    assert opened == []
    other = store.issue_release(REPORT, "tokyo", _token, NOW)
    assert len(opened) == 1
    for release in store.releases_of(REPORT):
        assert ReleaseToken.decode(release.encoded).id == release.token
    assert [r.token for r in store.releases_of(REPORT)] == [chosen, other]
    store.close()


def test_a_report_stored_here_is_handed_over_decoded_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 11: the inbox hands the application a report this store object stored
    # with the header it verified, not decoded again from its row; read a second time
    # (a new reports() loop), after a rollback, or in a reopened store, from the row.
    from tisa.report import ReportHeader

    decoded: list[bytes] = []
    decode = ReportHeader.decode.__func__  # type: ignore[attr-defined]

    def counted(cls: type[ReportHeader], data: bytes) -> ReportHeader:
        decoded.append(data)
        return decode(cls, data)  # type: ignore[no-any-return]

    monkeypatch.setattr(ReportHeader, "decode", classmethod(counted))
    monkeypatch.setattr(rows, "MAX_FRESH_INBOX", 2)
    store = MemberStore(tmp_path, "tokyo", group_commit=True)

    def deliver(counter: int) -> ReportHeader:
        report = counter.to_bytes(16, "big")
        header = ReportHeader(
            id=report, arrangement=ARRANGEMENT.id, version=ARRANGEMENT.version,
            originator="seoul", recipients=("tokyo",), scope=SCOPE, level=LEVEL,
            created=NOW, body_size=4, attachments=(("a", 1),),
        )  # fmt: skip
        store.store_delivery(
            token=ReleaseToken.decode(_token(counter, report)), header=header, staged=None,
            receipt=b"receipt", now=NOW, events=[], parts=[b"body", b"a"],
        )  # fmt: skip
        return header

    headers = [deliver(counter) for counter in (1, 2, 3)]  # the third one beyond the bound
    first = store.inbox_after(0, limit=10)
    assert [entry.header for entry in first] == headers
    assert [entry.parts for entry in first] == [[b"body", b"a"]] * 3
    assert first[0].header is headers[0] and first[1].header is headers[1]
    assert len(decoded) == 1  # the third only
    again = store.inbox_after(0, limit=10)  # read again: from the rows
    assert [entry.header for entry in again] == headers and len(decoded) == 4
    assert [entry.parts for entry in again] == [[b"body", b"a"]] * 3
    store.commit_durably()
    # Stored, then the batch lost: nothing of it is handed over, from memory or rows.
    deliver(4)
    assert len(store._fresh_inbox) == 1
    store._abandon_batch()
    assert store._fresh_inbox == {} and store.inbox_after(3, limit=10) == []
    # Acknowledged before it was read: forgotten, never handed over.
    deliver(5)
    [token] = store._fresh_inbox
    assert store.mark_handed_many([token]) == []
    assert store._fresh_inbox == {} and store.inbox_after(3, limit=10) == []
    store.close()
    store = MemberStore(tmp_path, "tokyo", group_commit=True)
    assert [entry.header for entry in store.inbox_after(0, limit=10)] == headers
    store.close()


def test_a_stored_ack_marks_the_tokens_it_accepted_in_its_step_with_one_event_insert(
    tmp_path: pathlib.Path,
) -> None:
    # Issue 11: a `stored` that also accepts the submission's inline tokens records the
    # ack and marks each token released in one step, its events (the ack's, then each
    # release's, in that order) written by one INSERT; the stored ack's event is handed
    # over from memory as before. A token not pending any more gets no event.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    _queue(store)
    first = store.issue_release(REPORT, "tokyo", _token, NOW)
    second = store.issue_release(REPORT, "tokyo", _token, NOW)
    assert store.mark_released(second, REPORT)  # accepted earlier: not pending
    ack = _stored_ack()
    stored = Stored(report=REPORT, ack=ack)
    [(before, _, _)] = store.events_after(0, limit=10)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    assert store.mark_stored(
        REPORT, ack.encoded, stored, digest=b"d" * 32, size=2000, released=[first, second]
    )
    store._db.set_trace_callback(None)
    assert sum(s.startswith("INSERT INTO events") for s in statements) == 1
    assert [r.state for r in store.releases_of(REPORT)] == ["released", "released"]
    assert store.submission(REPORT).state == "stored"  # type: ignore[union-attr]
    events = store.events_after(before, limit=10)
    assert [seq for seq, _, _ in events] == [before + 1, before + 2]
    assert store.fresh_event(before + 1) is stored
    event = decode_event(events[1][1], events[1][2], arrangement=ARRANGEMENT)
    assert isinstance(event, Released) and (event.token, event.recipient) == (first, "tokyo")
    # A copy of the ack writes nothing, the tokens included (the node marks them).
    assert not store.mark_stored(
        REPORT, ack.encoded, stored, digest=b"d" * 32, size=2000, released=[first]
    )
    assert len(store.events_after(0, limit=10)) == 3
    store.commit_durably()
    store.close()


def test_a_queued_submission_stored_is_its_own_kind_a_withdrawn_one_a_state_change(
    tmp_path: pathlib.Path,
) -> None:
    # Issue 11: the sender is not woken by a queued submission stored (rows.STORED),
    # which makes nothing else sendable; one stored after it was withdrawn may make
    # its releases sendable, and counts as OUTBOX_STATE as before. Both for a small
    # report (kept in its row) and one in a file.
    store = MemberStore(tmp_path, "seoul", group_commit=True)
    ack = _stored_ack()
    stored = Stored(report=REPORT, ack=ack)
    for withdrawn in (False, True):
        for data in (None, b"ciphertext"):
            report = bytes([withdrawn * 2 + (data is not None)]) * 16
            _queue(store, report, data=data)
            if withdrawn:
                store.withdraw_submission(report)
            before = dict(store.kind_changes)
            assert store.mark_stored(report, ack.encoded, stored, digest=b"d" * 32, size=2000)
            moved = {k for k, v in store.kind_changes.items() if before.get(k, 0) != v}
            kind = rows.OUTBOX_STATE if withdrawn else rows.STORED
            assert moved == {kind, rows.EVENTS}, (withdrawn, data)
            assert store.submission(report).state == "stored"  # type: ignore[union-attr]
    store.commit_durably()
    store.close()
