"""relay.tokenstore: the ack of a delivery this process marked forwarded is an UPDATE
without RETURNING (its originator and report kept in memory, ``FORWARDED_KEPT`` at
most); every ack answers and logs exactly what the RETURNING path does, on both stores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nodes.relay_helpers import NOW, World, make_world, released

import relay.tokenstore
from relay.storage import RelayStore, open_store
from relay.store import Store


@pytest.fixture
def world() -> World:
    return make_world()


def _logged(
    store: RelayStore, after: int
) -> list[tuple[str, bytes | None, bytes | None, tuple[str, ...]]]:
    return [
        (entry.event.value, entry.report, entry.token, entry.parties)
        for entry, _, _ in store.audit_entries(after, limit=100)
    ]


def test_the_ack_of_a_delivery_marked_forwarded_returns_nothing(
    tmp_path: Path, world: World
) -> None:
    store = Store(tmp_path, group_commit=True)
    try:
        (token,) = released(store, world, 1)
        store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        seen: list[str] = []
        store._db.set_trace_callback(seen.append)
        assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        store._db.set_trace_callback(None)
        updates = [s for s in seen if s.startswith("UPDATE")]
        assert len(updates) == 1 and "RETURNING" not in updates[0]
        assert store._forwarded == {}
        assert store.token(token.id).state == "acked"  # type: ignore[union-attr]
    finally:
        store.close()


@pytest.mark.parametrize("kept", [True, False])
def test_an_ack_logs_the_same_whether_its_row_was_kept_or_returned(
    store_at: str | Path, world: World, kept: bool
) -> None:
    store = open_store(store_at)
    try:
        tokens = released(store, world, 3)
        store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        store.commit_durably()
        if not kept:
            store._forwarded.clear()  # type: ignore[attr-defined]
        seq = store.audit_seq
        # Another member's ack of it is refused, and leaves the right one's ack alone.
        assert not store.ack_delivery(tokens[0].id, recipient="washington", now=NOW)
        for token in tokens:
            assert store.ack_delivery(token.id, recipient="tokyo", now=NOW + 1)
            assert store.ack_delivery(token.id, recipient="tokyo", now=NOW + 2)  # again: True
        store.commit_durably()
        assert _logged(store, seq) == [
            ("acknowledged", token.report, token.id, ("seoul", "tokyo")) for token in tokens
        ]
        assert store.outstanding("tokyo") == []
        assert store._forwarded == {}  # type: ignore[attr-defined]
    finally:
        store.close()


def test_a_forward_rolled_back_is_logged_by_the_ack_as_before(
    store_at: str | Path, world: World
) -> None:
    store = open_store(store_at)
    try:
        (token,) = released(store, world, 1)
        store.commit_durably()
        seq = store.audit_seq
        store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        store._abandon_batch()  # type: ignore[attr-defined]  # as a failed COMMIT does
        assert token.id in store._forwarded  # type: ignore[attr-defined]  # kept: still true
        assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        store.commit_durably()
        # Still pending when acked: the ack logs the forward itself, as without the entry.
        assert _logged(store, seq) == [
            ("forwarded", token.report, token.id, ("seoul", "tokyo")),
            ("acknowledged", token.report, token.id, ("seoul", "tokyo")),
        ]
    finally:
        store.close()


def test_at_most_forwarded_kept_deliveries_are_kept(
    store_at: str | Path, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.tokenstore, "FORWARDED_KEPT", 2)
    store = open_store(store_at)
    try:
        tokens = released(store, world, 3)
        store.mark_forwarded_many(store.outstanding("tokyo"), now=NOW)
        store.commit_durably()
        # The oldest was dropped when the third came.
        assert list(store._forwarded) == [tokens[1].id, tokens[2].id]  # type: ignore[attr-defined]
        seq = store.audit_seq
        for token in tokens:
            assert store.ack_delivery(token.id, recipient="tokyo", now=NOW)
        store.commit_durably()
        assert _logged(store, seq) == [
            ("acknowledged", token.report, token.id, ("seoul", "tokyo")) for token in tokens
        ]
    finally:
        store.close()
