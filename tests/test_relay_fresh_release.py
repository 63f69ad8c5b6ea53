"""The lean path of an inline submission at the relay's store: its report row is
inserted without being looked up first (``add_report(if_new=True)``), and its first
release is one guarded insert that reads neither the token's nor the report's state
(``release(fresh=row)``). Every refusal the full check makes is still made, with the
same reason, and leaves nothing behind; on both stores. (Statement counts: SQLite.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nodes.relay_helpers import NOW, World, make_world, same_id_other_bytes, seal, token_for

from relay.metrics import RelayMetrics
from relay.storage import RelayStore, open_store
from relay.store import Store
from tisa.errors import Reason, Refused
from tisa.prekeys import Prekey
from tisa.report import SealedReport
from tisa.token import ReleaseToken


@pytest.fixture
def world() -> World:
    return make_world()


def _add(store: RelayStore, report: SealedReport, *, if_new: bool = True) -> object:
    return store.add_report(
        report.report_id,
        originator="seoul",
        size=report.size,
        digest=report.digest,
        expires=NOW + 3600,
        now=NOW,
        data=report.ciphertext,
        if_new=if_new,
    )


def test_an_inline_reports_store_and_first_release_are_three_statements(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        report = seal(world)
        token = ReleaseToken.decode(token_for(world, report))
        store.queue_length("tokyo")  # counted once per recipient, then kept in memory
        seen: list[str] = []
        store._db.set_trace_callback(seen.append)
        row = _add(store, report)
        assert row is not None
        store.release(token, now=NOW, max_queue=100, fresh=row)  # type: ignore[arg-type]
        store._db.set_trace_callback(None)
        # The report's row, the token's row, the key pinned: no SELECT of either state
        # (the full path reads the report before storing and both states on release).
        assert [s.split()[0:3] for s in seen] == [
            ["BEGIN", "IMMEDIATE"],
            ["INSERT", "INTO", "reports"],
            ["INSERT", "INTO", "tokens"],
            ["UPDATE", "reports", "SET"],
        ]
        store.commit_durably()
        stored = store.report(report.report_id)
        assert stored is not None and stored.state == "released"
        pinned = store._db.execute(
            "SELECT key_commit FROM reports WHERE id = ?", (report.report_id,)
        ).fetchone()[0]
        assert bytes(pinned) == token.key_commit
        held = store.token(token.id)
        assert held is not None and held.state == "pending"
        assert store.audit_seq == 2
    finally:
        store.close()


def test_an_id_stored_before_is_left_alone_and_nothing_written(
    store_at: str | Path, world: World
) -> None:
    store = open_store(store_at, group_commit=True)
    try:
        report = seal(world)
        assert _add(store, report) is not None
        store.commit_durably()
        seq, batch = store.audit_seq, store.barrier
        forged = same_id_other_bytes(world, report)
        assert _add(store, forged) is None
        assert store.audit_seq == seq and not store.lost(batch)
        row = store.report(report.report_id)
        assert row is not None and row.digest == report.digest
        assert store.inline_data(report.report_id) == report.ciphertext
        store.commit_durably()
    finally:
        store.close()


def _published_prekey(store: RelayStore, world: World, *, taker: str | None) -> bytes:
    """A one-time prekey of Tokyo's stored at the relay (handed to ``taker`` if given);
    returns its encoding."""
    encoded = world.prekey("tokyo")
    store.publish_prekeys("tokyo", None, [Prekey.decode(encoded)], max_one_time=10)
    if taker is not None:
        _, handed, _ = store.take_prekeys("tokyo", taker=taker, now=NOW)
        assert handed == encoded
    return encoded


REFUSALS = {
    "replayed": Reason.REPLAYED,
    "revoked": Reason.REVOKED,
    "unknown_prekey": Reason.UNKNOWN_PREKEY,
    "bad_prekey": Reason.BAD_PREKEY,
    "full": Reason.QUEUE_FULL,
}


def _refused_case(
    store: RelayStore, world: World, case: str
) -> tuple[SealedReport, ReleaseToken, int]:
    """A report not stored yet and its token, which the store must refuse for
    ``case`` (a key of REFUSALS), and the queue limit; committed."""
    max_queue = 100
    opk: bytes | None = None
    if case == "unknown_prekey":
        opk = _published_prekey(store, world, taker=None)  # never handed to Seoul
    elif case == "bad_prekey":
        opk = _published_prekey(store, world, taker="seoul")
        # Another token (for another report) used it first.
        first = seal(world, b"first")
        first_row = _add(store, first)
        user = ReleaseToken.decode(token_for(world, first, one_time_prekey=opk))
        store.release(user, now=NOW, max_queue=max_queue, fresh=first_row)  # type: ignore[arg-type]
    elif case == "full":
        max_queue = 1
        earlier = seal(world, b"earlier")
        store.release(
            ReleaseToken.decode(token_for(world, earlier)),
            now=NOW,
            max_queue=max_queue,
            fresh=_add(store, earlier),  # type: ignore[arg-type]
        )
    report = seal(world)
    extra = {} if opk is None else {"one_time_prekey": opk}
    token = ReleaseToken.decode(token_for(world, report, **extra))
    if case in ("replayed", "revoked"):
        # The same token id used before, for another report (a token is single-use
        # whatever report it names): the id is taken, or revoked.
        earlier = seal(world, b"earlier")
        store.release(
            ReleaseToken.decode(token_for(world, earlier, token_id=token.id)),
            now=NOW,
            max_queue=max_queue,
            fresh=_add(store, earlier),  # type: ignore[arg-type]
        )
        if case == "revoked":
            store.revoke(earlier.report_id, token.id, by="seoul", now=NOW)
    store.commit_durably()
    return report, token, max_queue


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_fresh_release_refuses_as_the_full_check_does(
    store_at: str | Path, world: World, case: str
) -> None:
    store = open_store(store_at, group_commit=True)
    try:
        report, token, max_queue = _refused_case(store, world, case)
        row = _add(store, report)
        assert row is not None
        seq, batch = store.audit_seq, store.barrier
        with pytest.raises(Refused) as refused:
            store.release(token, now=NOW, max_queue=max_queue, fresh=row)  # type: ignore[arg-type]
        assert refused.value.reason is REFUSALS[case]
        # Nothing of the refused release was written; the batch (with the report's row)
        # is whole and commits.
        assert store.audit_seq == seq and not store.lost(batch)
        store.commit_durably()
        assert store.committed >= batch
        stored = store.report(report.report_id)
        assert stored is not None and stored.state == "held"
        if case not in ("replayed", "revoked"):
            assert store.token(token.id) is None
    finally:
        store.close()


def _add_released(
    store: RelayStore, report: SealedReport, token: ReleaseToken, max_queue: int = 100
) -> object:
    return store.add_released_report(
        report.report_id,
        originator="seoul",
        size=report.size,
        digest=report.digest,
        expires=NOW + 3600,
        now=NOW,
        data=report.ciphertext,
        token=token,
        max_queue=max_queue,
    )


def test_an_inline_report_and_its_token_stored_together_are_two_statements(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        opk = _published_prekey(store, world, taker="seoul")
        report = seal(world)
        token = ReleaseToken.decode(token_for(world, report, one_time_prekey=opk))
        store.queue_length("tokyo")  # counted once per recipient, then kept in memory
        store.commit_durably()
        seen: list[str] = []
        store._db.set_trace_callback(seen.append)
        assert _add_released(store, report, token) is not None
        store._db.set_trace_callback(None)
        # The token's row (guarded: no report under the id, the prekey handed out and
        # unused), the prekey marked used, the report's row released: no read, and no
        # rewrite of the report's row to pin its key.
        assert [s.split()[0:3] for s in seen] == [
            ["BEGIN", "IMMEDIATE"],
            ["INSERT", "INTO", "tokens"],
            ["UPDATE", "prekeys", "SET"],
            ["INSERT", "INTO", "reports"],
        ]
        store.commit_durably()
        stored = store.report(report.report_id)
        assert stored is not None and stored.state == "released"
        pinned = store._db.execute(
            "SELECT key_commit FROM reports WHERE id = ?", (report.report_id,)
        ).fetchone()[0]
        assert bytes(pinned) == token.key_commit
        assert store.inline_data(report.report_id) == report.ciphertext
        held = store.token(token.id)
        assert held is not None and held.state == "pending"
        entries = [entry.event.value for entry, _, _ in store.audit_entries(0, limit=10)]
        assert entries == ["stored", "released"]
        # The prekey is used: another token naming it is refused.
        other = seal(world, b"other")
        again = ReleaseToken.decode(token_for(world, other, one_time_prekey=opk))
        assert _add_released(store, other, again) is None
    finally:
        store.close()


@pytest.mark.parametrize("case", [*REFUSALS, "stored_before"])
def test_an_inline_report_with_its_token_in_the_way_writes_nothing(
    tmp_path: Path, world: World, case: str
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        if case == "stored_before":
            report = seal(world)
            token, max_queue = ReleaseToken.decode(token_for(world, report)), 100
            _add(store, report)
            store.commit_durably()
        else:
            report, token, max_queue = _refused_case(store, world, case)
        seq, batch, changes = store.audit_seq, store.barrier, store._db.total_changes
        assert _add_released(store, report, token, max_queue) is None
        assert store._db.total_changes == changes and store.audit_seq == seq
        assert not store.lost(batch)
        if case != "stored_before":
            assert store.report(report.report_id) is None
    finally:
        store.close()


def test_a_one_time_prekey_is_used_by_a_fresh_release(store_at: str | Path, world: World) -> None:
    store = open_store(store_at, group_commit=True)
    try:
        opk = _published_prekey(store, world, taker="seoul")
        report = seal(world)
        token = ReleaseToken.decode(token_for(world, report, one_time_prekey=opk))
        row = _add(store, report)
        store.release(token, now=NOW, max_queue=100, fresh=row)  # type: ignore[arg-type]
        store.commit_durably()
        # Used: a second token naming it (another report) is refused.
        other = seal(world, b"other")
        again = ReleaseToken.decode(token_for(world, other, one_time_prekey=opk))
        with pytest.raises(Refused) as refused:
            store.release(again, now=NOW, max_queue=100, fresh=_add(store, other))  # type: ignore[arg-type]
        assert refused.value.reason is Reason.BAD_PREKEY
    finally:
        store.close()


def test_report_events_reach_the_counters_at_scrape_not_per_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = RelayMetrics(world.arrangement)
    counter = metrics._events["stored"]
    calls: list[float] = []
    real_inc = counter.inc

    def counting_inc(amount: float = 1) -> None:
        calls.append(amount)
        real_inc(amount)

    monkeypatch.setattr(counter, "inc", counting_inc)
    for _ in range(1000):
        metrics.event("stored")
    assert calls == []  # counted in an int meanwhile
    text = metrics.render(queue_length=lambda name: 0, connections={}).decode()
    assert calls == [1000]
    assert 'tisa_relay_reports_total{event="stored"} 1000.0' in text
    metrics.event("stored")
    text = metrics.render(queue_length=lambda name: 0, connections={}).decode()
    assert 'tisa_relay_reports_total{event="stored"} 1001.0' in text
