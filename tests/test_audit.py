"""The audit chain: signed checkpoints, per-member extracts, and every way to cheat them."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from conftest import make_trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tisa import encoding as enc
from tisa.arrangement import Arrangement
from tisa.audit import (
    GENESIS,
    MAX_EXTRACT_ENTRIES,
    AuditEntry,
    AuditEvent,
    Checkpoint,
    Extract,
    chain_next,
    content_hash_of,
    entry_bytes,
    sorted_parties,
    verify_extract,
)
from tisa.errors import ProtocolError, Reason, Refused, VerificationError
from tisa.keys import Context, Hash, MemberSecret, digest

ARRANGEMENT, SECRETS = make_trio()
RELAY = SECRETS["washington"]
NOW = 1_420_000_000
MEMBERS = ("seoul", "tokyo")


@dataclasses.dataclass
class Log:
    """A relay's log: entries with their content hashes, and the head after each."""

    entries: list[AuditEntry]
    hashes: list[bytes]
    heads: list[bytes]  # heads[i] is the head after i entries; heads[0] is GENESIS

    def checkpoint(self, seq: int, arrangement: Arrangement = ARRANGEMENT) -> bytes:
        return Checkpoint.issue(
            RELAY, arrangement, seq=seq, head=self.heads[seq], time=NOW + seq
        ).encoded

    def extract(self, member: str, start: int = 0, end: int | None = None) -> Extract:
        end = len(self.entries) if end is None else end
        return Extract.build(
            zip(self.entries[start:end], self.hashes[start:end], strict=True),
            member,
            start_seq=start,
            start_head=self.heads[start],
            checkpoint=self.checkpoint(end),
        )


def make_log(count: int, seed: int = 0) -> Log:
    rng = random.Random(seed)
    entries: list[AuditEntry] = []
    hashes: list[bytes] = []
    heads = [GENESIS]
    events = list(AuditEvent)
    for seq in range(1, count + 1):
        event = rng.choice(events)
        parties = tuple(sorted(rng.sample(MEMBERS, rng.randint(0, 2))))
        entry = AuditEntry(
            seq=seq,
            time=NOW + seq,
            event=event,
            report=rng.randbytes(16),
            token=rng.randbytes(16) if rng.random() < 0.7 else None,
            parties=parties,
            reason="expired" if event is AuditEvent.REFUSED else None,
        )
        entries.append(entry)
        hashes.append(entry.content_hash)
        heads.append(chain_next(heads[-1], entry.content_hash))
    return Log(entries, hashes, heads)


LOG = make_log(400)


def mine(log: Log, member: str, start: int = 0, end: int | None = None) -> list[AuditEntry]:
    return [e for e in log.entries[start:end] if member in e.parties]


# --- the honest case ---------------------------------------------------------------------


@pytest.mark.parametrize("member", MEMBERS)
def test_extract_per_member_verifies(member: str) -> None:
    extract = LOG.extract(member)
    entries, checkpoint = verify_extract(extract.encode(), ARRANGEMENT, member)
    assert entries == mine(LOG, member)
    assert entries, "the log names every member somewhere"
    assert (checkpoint.seq, checkpoint.head) == (len(LOG.entries), LOG.heads[-1])
    # The member sees its own entries in full and only hashes of the others.
    full = [item for item in extract.items if isinstance(item, AuditEntry)]
    assert all(member in item.parties for item in full)
    assert len(extract.items) == len(LOG.entries)


def test_extract_encoding_round_trip() -> None:
    extract = LOG.extract("seoul")
    assert Extract.decode(extract.encode()) == extract
    assert verify_extract(extract, ARRANGEMENT, "seoul") == verify_extract(
        extract.encode(), ARRANGEMENT, "seoul"
    )


def test_incremental_extracts_from_the_last_checkpoint() -> None:
    first, checkpoint = verify_extract(LOG.extract("tokyo", 0, 150), ARRANGEMENT, "tokyo")
    known = (checkpoint.seq, checkpoint.head)
    assert known == (150, LOG.heads[150])
    second, checkpoint = verify_extract(
        LOG.extract("tokyo", 150).encode(), ARRANGEMENT, "tokyo", known=known
    )
    assert first + second == mine(LOG, "tokyo")
    assert checkpoint.seq == len(LOG.entries)


def test_empty_extract() -> None:
    entries, checkpoint = verify_extract(LOG.extract("seoul", 0, 0), ARRANGEMENT, "seoul")
    assert entries == [] and (checkpoint.seq, checkpoint.head) == (0, GENESIS)
    entries, _ = verify_extract(
        LOG.extract("seoul", 400, 400), ARRANGEMENT, "seoul", known=(400, LOG.heads[400])
    )
    assert entries == []


def test_entry_encoding_round_trip() -> None:
    for entry in LOG.entries[:50]:
        assert AuditEntry.decode(entry.encode()) == entry
        assert entry.content_hash == digest(Hash.AUDIT, entry.encode())


def test_chain_is_domain_separated() -> None:
    content = LOG.hashes[0]
    assert chain_next(GENESIS, content) == digest(Hash.AUDIT_CHAIN, GENESIS + content)
    assert chain_next(GENESIS, content) != digest(Hash.AUDIT, GENESIS + content)


# --- every way to cheat ------------------------------------------------------------------


def with_items(extract: Extract, items: list[bytes | AuditEntry], **changes: Any) -> Extract:
    return dataclasses.replace(extract, items=tuple(items), **changes)


def fails(extract: Extract, member: str = "seoul", **kwargs: Any) -> None:
    with pytest.raises(VerificationError):
        verify_extract(extract, ARRANGEMENT, member, **kwargs)
    with pytest.raises(VerificationError):
        verify_extract(extract.encode(), ARRANGEMENT, member, **kwargs)


EXTRACT = LOG.extract("seoul")
ITEMS = list(EXTRACT.items)
MINE_AT = [i for i, item in enumerate(ITEMS) if isinstance(item, AuditEntry)]
HIDDEN_AT = [i for i, item in enumerate(ITEMS) if not isinstance(item, AuditEntry)]


@pytest.mark.parametrize("index", [0, MINE_AT[0], HIDDEN_AT[0], MINE_AT[-1], len(ITEMS) - 1])
def test_dropping_an_entry_fails(index: int) -> None:
    fails(with_items(EXTRACT, ITEMS[:index] + ITEMS[index + 1 :]))


def test_dropping_an_entry_and_renumbering_fails() -> None:
    # Drop one of the member's entries and shift the later ones down, so the sequence
    # numbers still count up: the chain still breaks.
    drop = MINE_AT[3]
    items: list[bytes | AuditEntry] = []
    for item in ITEMS[:drop] + ITEMS[drop + 1 :]:
        if isinstance(item, AuditEntry) and item.seq > drop:
            item = dataclasses.replace(item, seq=item.seq - 1)
        items.append(item)
    fails(with_items(EXTRACT, items))


@pytest.mark.parametrize(
    ("first", "second"),
    [(MINE_AT[0], MINE_AT[1]), (HIDDEN_AT[0], HIDDEN_AT[1]), (MINE_AT[2], HIDDEN_AT[2])],
    ids=["mine-mine", "hidden-hidden", "mine-hidden"],
)
def test_reordering_fails(first: int, second: int) -> None:
    items = list(ITEMS)
    items[first], items[second] = items[second], items[first]
    fails(with_items(EXTRACT, items))


def test_reordering_with_swapped_sequence_numbers_fails() -> None:
    a, b = MINE_AT[0], MINE_AT[1]
    items = list(ITEMS)
    entry_a, entry_b = items[a], items[b]
    assert isinstance(entry_a, AuditEntry) and isinstance(entry_b, AuditEntry)
    items[a] = dataclasses.replace(entry_b, seq=entry_a.seq)
    items[b] = dataclasses.replace(entry_a, seq=entry_b.seq)
    fails(with_items(EXTRACT, items))


ALTERATIONS: list[tuple[str, Callable[[AuditEntry], AuditEntry]]] = [
    ("time", lambda e: dataclasses.replace(e, time=e.time + 1)),
    (
        "event",
        lambda e: dataclasses.replace(
            e,
            event=AuditEvent.REVOKED if e.event is not AuditEvent.REVOKED else AuditEvent.STORED,
        ),
    ),
    ("reason", lambda e: dataclasses.replace(e, reason="other")),
    ("report", lambda e: dataclasses.replace(e, report=bytes(16))),
    ("token", lambda e: dataclasses.replace(e, token=None if e.token else bytes(16))),
    ("parties", lambda e: dataclasses.replace(e, parties=("seoul", "tokyo"))),
]


@pytest.mark.parametrize("alter", [a for _, a in ALTERATIONS], ids=[n for n, _ in ALTERATIONS])
def test_altering_an_entry_fails(alter: Callable[[AuditEntry], AuditEntry]) -> None:
    for index in MINE_AT[:5]:
        items = list(ITEMS)
        entry = items[index]
        assert isinstance(entry, AuditEntry)
        altered = alter(entry)
        if altered == entry:
            continue
        items[index] = altered
        fails(with_items(EXTRACT, items))


def test_altering_a_hidden_hash_fails() -> None:
    items = list(ITEMS)
    hidden = items[HIDDEN_AT[0]]
    assert isinstance(hidden, bytes)
    items[HIDDEN_AT[0]] = bytes([hidden[0] ^ 1]) + hidden[1:]
    fails(with_items(EXTRACT, items))


def test_adding_an_entry_fails() -> None:
    fails(with_items(EXTRACT, [*ITEMS, LOG.hashes[0]]))
    fails(with_items(EXTRACT, [LOG.hashes[0], *ITEMS]))


def test_entry_with_a_wrong_sequence_number_fails() -> None:
    items = list(ITEMS)
    entry = items[MINE_AT[0]]
    assert isinstance(entry, AuditEntry)
    for seq in (entry.seq - 1, entry.seq + 1, 1, len(ITEMS)):
        if seq not in (entry.seq, 0):
            items[MINE_AT[0]] = dataclasses.replace(entry, seq=seq)
            fails(with_items(EXTRACT, items))


def test_entry_not_naming_the_member_fails() -> None:
    # Another member's entry shown in full: the chain is right, but it is not seoul's.
    items = list(ITEMS)
    index = next(i for i in HIDDEN_AT if "tokyo" in LOG.entries[i].parties)
    items[index] = LOG.entries[index]
    fails(with_items(EXTRACT, items))


def test_changing_the_start_point_fails() -> None:
    later = LOG.extract("seoul", 100)
    known = (100, LOG.heads[100])
    verify_extract(later, ARRANGEMENT, "seoul", known=known)
    # The member last verified seq 100; an extract from anywhere else is refused.
    fails(later)  # known defaults to genesis
    fails(later, known=(99, LOG.heads[99]))
    fails(later, known=(100, LOG.heads[99]))
    fails(LOG.extract("seoul", 99), known=known)
    fails(LOG.extract("seoul", 101), known=known)
    # A start that agrees with the member's point but not with the chain.
    fails(dataclasses.replace(later, start_head=LOG.heads[99]), known=(100, LOG.heads[99]))
    fails(dataclasses.replace(later, start_seq=101), known=(101, LOG.heads[100]))


def test_checkpoint_for_another_point_fails() -> None:
    fails(dataclasses.replace(EXTRACT, checkpoint=LOG.checkpoint(399)))
    other = make_log(400, seed=1)
    fails(dataclasses.replace(EXTRACT, checkpoint=other.checkpoint(400)))
    forged_head = Checkpoint.issue(RELAY, ARRANGEMENT, seq=400, head=bytes(32), time=NOW).encoded
    fails(dataclasses.replace(EXTRACT, checkpoint=forged_head))


def test_checkpoint_from_another_arrangement_fails() -> None:
    # Another version with the same relay key: signature fine, arrangement wrong.
    amended = ARRANGEMENT.amend(scopes=(*ARRANGEMENT.scopes, "chemical"))
    foreign = dataclasses.replace(EXTRACT, checkpoint=LOG.checkpoint(400, amended))
    with pytest.raises(Refused) as info:
        verify_extract(foreign, ARRANGEMENT, "seoul")
    assert info.value.reason is Reason.WRONG_ARRANGEMENT
    verify_extract(foreign, amended, "seoul")
    # Another arrangement altogether, with another relay key.
    relay = MemberSecret.generate()
    members = tuple(
        dataclasses.replace(m, identity=relay.public) if m.name == "washington" else m
        for m in ARRANGEMENT.members
    )
    other = dataclasses.replace(ARRANGEMENT, members=members)
    assert other.id != ARRANGEMENT.id
    signed_elsewhere = Checkpoint.issue(
        relay, other, seq=400, head=LOG.heads[400], time=NOW
    ).encoded
    with pytest.raises(VerificationError):
        verify_extract(
            dataclasses.replace(EXTRACT, checkpoint=signed_elsewhere), ARRANGEMENT, "seoul"
        )


def test_checkpoint_signed_by_a_member_fails() -> None:
    envelope = enc.unpack(LOG.checkpoint(400))
    forged = enc.pack(
        {"body": envelope["body"], "sig": SECRETS["seoul"].sign(Context.AUDIT, envelope["body"])}
    )
    fails(dataclasses.replace(EXTRACT, checkpoint=forged))


# --- decoding ----------------------------------------------------------------------------


def test_extract_limit() -> None:
    too_many = Extract(
        start_seq=0,
        start_head=GENESIS,
        items=(GENESIS,) * (MAX_EXTRACT_ENTRIES + 1),
        checkpoint=LOG.checkpoint(0),
    )
    with pytest.raises(ProtocolError):
        Extract.decode(too_many.encode())


def test_extract_item_shapes() -> None:
    base = enc.unpack(EXTRACT.encode())
    bad_items: list[Any] = [
        {"h": b"short"},
        {"e": LOG.entries[0].encode(), "h": LOG.hashes[0]},
        {"x": LOG.hashes[0]},
        {"e": b"not an entry"},
        LOG.hashes[0],
        {},
    ]
    for item in bad_items:
        with pytest.raises(ProtocolError):
            Extract.decode(enc.pack({**base, "items": [item]}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    for decode in (Extract.decode, AuditEntry.decode):
        with contextlib.suppress(ProtocolError):
            decode(data)
    with contextlib.suppress(ProtocolError, VerificationError):
        verify_extract(data, ARRANGEMENT, "seoul")


def test_flip_every_byte_of_a_small_extract() -> None:
    log = make_log(12, seed=3)
    data = log.extract("tokyo").encode()
    verify_extract(data, ARRANGEMENT, "tokyo")
    for position in range(len(data)):
        changed = bytearray(data)
        changed[position] ^= 0x01
        with pytest.raises((ProtocolError, VerificationError)):
            verify_extract(bytes(changed), ARRANGEMENT, "tokyo")


@given(
    seq=st.integers(1, 2**63),
    time=st.integers(0, 2**64 - 1),
    event=st.sampled_from(list(AuditEvent)),
    report=st.none() | st.binary(min_size=16, max_size=16),
    token=st.none() | st.binary(min_size=16, max_size=16),
    parties=st.lists(st.text(min_size=1, max_size=20), max_size=5),
    reason=st.none() | st.text(max_size=64),
)
def test_entry_fast_encoding_is_the_canonical_encoding(
    seq: int,
    time: int,
    event: AuditEvent,
    report: bytes | None,
    token: bytes | None,
    parties: list[str],
    reason: str | None,
) -> None:
    entry = AuditEntry(
        seq=seq,
        time=time,
        event=event,
        report=report,
        token=token,
        parties=tuple(parties),
        reason=reason,
    )
    canonical = enc.pack(
        {
            "v": 1,
            "seq": seq,
            "time": time,
            "event": event.value,
            "report": report,
            "token": token,
            "parties": sorted(set(parties), key=str.encode),
            "reason": reason,
        }
    )
    assert entry.encode() == canonical
    # Any other type takes the general path, which refuses what it cannot encode.
    if report is not None:
        with pytest.raises(ProtocolError):
            dataclasses.replace(entry, report=bytearray(report)).encode()


# Names whose order by code point differs from their order by UTF-8 bytes (U+FFFF sorts
# after U+10000 as a str, before it as UTF-8), and plain ones.
_names = st.sampled_from(["seoul", "tokyo", "a", "\uffff", "\U00010000", "\u00e9"]) | st.text(
    min_size=1, max_size=8
)


@given(parties=st.lists(_names, min_size=1, max_size=6))
def test_sorted_parties_is_the_canonical_order_without_repeats(parties: list[str]) -> None:
    want = tuple(sorted(set(parties), key=str.encode))
    assert sorted_parties(parties) == want
    assert sorted_parties(tuple(parties)) == want


def test_sorted_parties_orders_two_names_by_their_bytes() -> None:
    assert sorted_parties(("\U00010000", "\uffff")) == ("\uffff", "\U00010000")
    assert sorted_parties(("tokyo", "seoul")) == ("seoul", "tokyo")
    assert sorted_parties(("seoul", "seoul")) == ("seoul",)


_entries = st.builds(
    AuditEntry,
    seq=st.integers(1, 2**63),
    time=st.integers(0, 2**64 - 1),
    event=st.sampled_from(list(AuditEvent)),
    report=st.none() | st.binary(min_size=16, max_size=16),
    token=st.none() | st.binary(min_size=16, max_size=16),
    parties=st.lists(_names, max_size=5).map(tuple),
    reason=st.none() | st.text(max_size=64),
)


@given(entry=_entries)
def test_the_relays_entry_path_gives_the_entrys_bytes_and_hashes(entry: AuditEntry) -> None:
    # relay.store.Store._audit: sorted_parties, entry_bytes, content_hash_of,
    # chain_next and AuditEntry.built, against the entry made and hashed as before.
    seq, time, event, report, token, parties, reason = (
        entry.seq,
        entry.time,
        entry.event,
        entry.report,
        entry.token,
        entry.parties,
        entry.reason,
    )
    names = sorted_parties(parties)
    encoded = entry_bytes(seq, time, event, report, token, names, reason)
    assert encoded == entry.encode()
    assert content_hash_of(encoded) == digest(Hash.AUDIT, encoded) == entry.content_hash
    head = digest(Hash.CIPHERTEXT, encoded)  # any 32 bytes
    assert chain_next(head, entry.content_hash) == digest(
        Hash.AUDIT_CHAIN, head + entry.content_hash
    )
    built = AuditEntry.built(seq, time, event, report, token, names, reason)
    assert built == dataclasses.replace(entry, parties=names)
    assert built.encode() == encoded
