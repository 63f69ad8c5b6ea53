"""The relay's audit log: hash-chained entries, signed checkpoints, verifiable extracts.

Each entry is a canonical map (seq, time, event, report, token, parties, reason). Its
content hash is ``c_i = H_audit(entry_bytes)`` and the chain is
``h_i = H_chain(h_{i-1} || c_i)`` from ``h_0 = 32 zero bytes``. The relay signs a
:class:`Checkpoint` ``(arrangement, seq, head)`` in context ``audit``.

A member fetches an :class:`Extract`: from a point it already trusts (``start_seq``,
``start_head``), every entry that names it in full and, for every other entry, only its
content hash. That is enough to recompute the chain up to the signed checkpoint, so the
member knows that what it sees is one consistent, signed, append-only history, while
learning nothing of the others beyond their count (content hashes cover random ids).
It does not prove that the relay showed it every entry of its own: an entry sent as a
bare hash looks like anyone else's. Members who compare checkpoints (same seq, same
head) catch a relay that shows them different histories.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
from collections.abc import Iterable
from typing import Any, ClassVar

from tisa import encoding as enc
from tisa.arrangement import MAX_MEMBERS, Arrangement
from tisa.envelope import open_envelope, seal_envelope
from tisa.errors import Reason, Refused, UsageError, VerificationError
from tisa.keys import DIGEST_SIZE, Context, Hash, MemberSecret, verify
from tisa.limits import MAX_NAME

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditEvent",
    "Checkpoint",
    "Extract",
    "chain_next",
    "checkpoints_conflict",
    "content_hash_of",
    "entry_bytes",
    "sorted_parties",
    "verify_extract",
]

GENESIS = bytes(DIGEST_SIZE)
# Entries in one extract. A member that is further behind fetches again from the
# checkpoint it got; this bounds the frame and the verification work per fetch.
MAX_EXTRACT_ENTRIES = 2000
# An entry naming every member of a full arrangement (256 names of up to 128 bytes).
MAX_ENTRY_SIZE = 40 * 1024


class AuditEvent(enum.StrEnum):
    """What an audit entry records.

    * ``STORED``: the relay stored a submission.
    * ``RELEASED``: it accepted a release token.
    * ``FORWARDED``: a delivery went out in full.
    * ``ACKNOWLEDGED``: the recipient acknowledged a delivery.
    * ``RECEIPT``: a recipient's receipt was queued for the originator.
    * ``REFUSED``: the relay refused something a member sent (the entry has a ``reason``).
    * ``REVOKED``: a token, or a whole report, was revoked.
    * ``EXPIRED``: a held report or an undelivered token expired.
    * ``ANNOUNCED``: an originator announced a held report (parties: it and those told).
    * ``REQUESTED``: a member requested a report's release (``token``: the request id).
    * ``APPROVED``: a release token approved a request (``token``: the request id; the
      ``released`` entry just before names the token).
    * ``DENIED``: the originator denied a request (``token``: the request id,
      ``reason``: the denial code).
    """

    STORED = "stored"
    RELEASED = "released"
    FORWARDED = "forwarded"
    ACKNOWLEDGED = "acknowledged"
    RECEIPT = "receipt"
    REFUSED = "refused"
    REVOKED = "revoked"
    EXPIRED = "expired"
    ANNOUNCED = "announced"
    REQUESTED = "requested"
    APPROVED = "approved"
    DENIED = "denied"


_name = enc.text(MAX_NAME)
_ID_TYPES = (bytes, type(None))
_REASON_TYPES = (str, type(None))
_ENTRY_SCHEMA: dict[str, enc.Field] = {
    "v": enc.uint(1, 1),
    "seq": enc.uint(2**63, 1),
    "time": enc.uint(),
    "event": enc.one_of(*(e.value for e in AuditEvent)),
    "report": enc.optional(enc.bin_exact(16)),
    "token": enc.optional(enc.bin_exact(16)),
    # Originator plus every recipient of a report, so each finds the entry in its extract.
    "parties": enc.list_of(_name, max_items=MAX_MEMBERS, unique=True, sorted_=True),
    "reason": enc.optional(enc.text(64)),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One entry of the relay's audit log.

    Attributes:
        seq: its position in the log, from 1.
        time: unix time (seconds) at the relay.
        event: what happened.
        report, token: the ids it concerns, or None.
        parties: the members it concerns; each sees the entry in full in its extract.
        reason: the reason code of a refusal (``refused`` entries), else None.
    """

    seq: int
    time: int
    event: AuditEvent
    report: bytes | None
    token: bytes | None
    parties: tuple[str, ...]
    reason: str | None = None

    def encode(self) -> bytes:
        """The canonical encoding, which :attr:`content_hash` covers (``parties`` sorted)."""
        return entry_bytes(
            self.seq,
            self.time,
            self.event,
            self.report,
            self.token,
            sorted_parties(self.parties),
            self.reason,
        )

    @classmethod
    def built(
        cls,
        seq: int,
        time: int,
        event: AuditEvent,
        report: bytes | None,
        token: bytes | None,
        parties: tuple[str, ...],
        reason: str | None,
    ) -> AuditEntry:
        """The entry of these fields, as the constructor makes it, without its keyword
        handling: for the relay, which makes one for every step of every report (the
        fields as :meth:`encode` covers them, ``parties`` from :func:`sorted_parties`)."""
        entry = object.__new__(cls)
        put = object.__setattr__
        put(entry, "seq", seq)
        put(entry, "time", time)
        put(entry, "event", event)
        put(entry, "report", report)
        put(entry, "token", token)
        put(entry, "parties", parties)
        put(entry, "reason", reason)
        return entry

    @classmethod
    def decode(cls, data: bytes) -> AuditEntry:
        """Decode an entry from its canonical encoding.

        Raises:
            ProtocolError: not a canonical, valid entry of at most :data:`MAX_ENTRY_SIZE` bytes.
        """
        fields = enc.check_map(enc.unpack(data, max_size=MAX_ENTRY_SIZE), _ENTRY_SCHEMA, "entry")
        return cls(
            seq=fields["seq"],
            time=fields["time"],
            event=AuditEvent(fields["event"]),
            report=fields["report"],
            token=fields["token"],
            parties=tuple(fields["parties"]),
            reason=fields["reason"],
        )

    @property
    def content_hash(self) -> bytes:
        """The content hash ``c_i`` that the chain links: ``H_audit`` of :meth:`encode`."""
        return content_hash_of(self.encode())


def sorted_parties(parties: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``parties`` without repeats, in the order of their UTF-8 bytes (the canonical
    order of an entry's ``parties``); one or two names (nearly every entry) without
    a general sort."""
    if len(parties) == 1:
        return (parties[0],)
    if len(parties) == 2:
        first, second = parties
        if first == second:
            return (first,)
        return (first, second) if first.encode() < second.encode() else (second, first)
    return tuple(sorted(set(parties), key=str.encode))


def entry_bytes(
    seq: int,
    time: int,
    event: AuditEvent,
    report: bytes | None,
    token: bytes | None,
    parties: tuple[str, ...],
    reason: str | None,
) -> bytes:
    """The canonical encoding of the entry of these fields, ``parties`` already as
    :func:`sorted_parties` gives them (what :meth:`AuditEntry.encode` returns)."""
    if (
        type(seq) is int
        and type(time) is int
        and type(report) in _ID_TYPES
        and type(token) in _ID_TYPES
        and type(reason) in _REASON_TYPES
        and all(type(party) is str for party in parties)
    ):
        # The relay writes an entry for every step of every report: with the field
        # types known, pack_checked gives the canonical bytes without pack's walk (a
        # test checks this against enc.pack for arbitrary entries).
        return enc.pack_checked(
            {
                "event": event._value_,
                "parties": parties,
                "reason": reason,
                "report": report,
                "seq": seq,
                "time": time,
                "token": token,
                "v": 1,
            }
        )
    return enc.pack(
        {
            "v": 1,
            "seq": seq,
            "time": time,
            "event": event.value,
            "report": report,
            "token": token,
            "parties": list(parties),
            "reason": reason,
        }
    )


# H_audit and H_chain (tisa.keys.digest's BLAKE2b-256 with their personalisations),
# each state made once and copied per hash: a copy costs less than making the state
# with its parameter block, twice for every entry the relay writes (a test compares
# both with tisa.keys.digest).
_AUDIT_STATE = hashlib.blake2b(digest_size=DIGEST_SIZE, person=Hash.AUDIT._value_)
_CHAIN_STATE = hashlib.blake2b(digest_size=DIGEST_SIZE, person=Hash.AUDIT_CHAIN._value_)


def content_hash_of(encoded: bytes) -> bytes:
    """``H_audit(encoded)``: the content hash of the entry whose encoding is ``encoded``."""
    state = _AUDIT_STATE.copy()
    state.update(encoded)
    return state.digest()


def chain_next(head: bytes, content_hash: bytes) -> bytes:
    """The chain value after appending an entry with ``content_hash``."""
    state = _CHAIN_STATE.copy()
    state.update(head)
    state.update(content_hash)
    return state.digest()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The relay's signed statement that its log's first ``seq`` entries end in chain head ``head``.

    Make one with :meth:`issue` (signing) or :meth:`verify` (checking received bytes); both
    set ``encoded``.

    Attributes:
        arrangement: the arrangement id.
        seq: the number of entries covered (0 for none).
        head: the chain value after entry ``seq`` (:data:`GENESIS` for 0).
        time: unix time (seconds) at the relay when it signed.
        encoded: the signed envelope.
    """

    arrangement: bytes
    seq: int
    head: bytes
    time: int
    encoded: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    _SCHEMA: ClassVar[dict[str, enc.Field]] = {
        "v": enc.uint(1, 1),
        "arrangement": enc.bin_exact(DIGEST_SIZE),
        "seq": enc.uint(2**63),
        "head": enc.bin_exact(DIGEST_SIZE),
        "time": enc.uint(),
    }

    @classmethod
    def issue(
        cls, secret: MemberSecret, arrangement: Arrangement, *, seq: int, head: bytes, time: int
    ) -> Checkpoint:
        """Sign a checkpoint as the arrangement's relay."""
        if secret.public != arrangement.member(arrangement.relay).identity:
            raise UsageError("this key is not the relay's key in the arrangement")
        body = {"v": 1, "arrangement": arrangement.id, "seq": seq, "head": head, "time": time}
        return cls.verify(seal_envelope(secret, Context.AUDIT, body), arrangement)

    @classmethod
    def verify(cls, data: bytes, arrangement: Arrangement) -> Checkpoint:
        """Decode a checkpoint and verify the relay's signature on it.

        Args:
            data: the encoded checkpoint (at most 512 bytes).
            arrangement: gives the relay's key and the arrangement id the checkpoint must name.

        Returns:
            The checkpoint, with ``encoded`` set to ``data``.

        Raises:
            ProtocolError: malformed.
            VerificationError: the signature is not the relay's.
            Refused: WRONG_ARRANGEMENT, signed for another arrangement.
        """
        body, fields, signature = open_envelope(data, max_size=512, what="checkpoint")
        fields = enc.check_map(fields, cls._SCHEMA, "checkpoint")
        verify(
            arrangement.member(arrangement.relay).identity.signing, Context.AUDIT, body, signature
        )
        if fields["arrangement"] != arrangement.id:
            raise Refused(Reason.WRONG_ARRANGEMENT, "checkpoint of another arrangement")
        fields.pop("v")
        return cls(**fields, encoded=bytes(data))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Extract:
    """What the relay sends a member: its entries, others' hashes, a checkpoint."""

    start_seq: int
    start_head: bytes
    items: tuple[bytes | AuditEntry, ...]  # content hash of another's entry, or an entry
    checkpoint: bytes

    def encode(self) -> bytes:
        """The canonical encoding (entries as ``{"e": entry}``, hashes as ``{"h": hash}``)."""
        return enc.pack(
            {
                "start_seq": self.start_seq,
                "start_head": self.start_head,
                "items": [
                    {"e": item.encode()} if isinstance(item, AuditEntry) else {"h": item}
                    for item in self.items
                ],
                "checkpoint": self.checkpoint,
            }
        )

    @classmethod
    def build(
        cls,
        entries: Iterable[tuple[AuditEntry, bytes]],
        member: str,
        *,
        start_seq: int,
        start_head: bytes,
        checkpoint: bytes,
    ) -> Extract:
        """From (entry, content hash) pairs after ``start_seq``, keep ``member``'s."""
        items: list[bytes | AuditEntry] = [
            entry if member in entry.parties else content for entry, content in entries
        ]
        return cls(
            start_seq=start_seq, start_head=start_head, items=tuple(items), checkpoint=checkpoint
        )

    @classmethod
    def decode(cls, data: bytes) -> Extract:
        """Decode an extract without verifying it (see :func:`verify_extract`).

        Raises:
            ProtocolError: malformed, or more than :data:`MAX_EXTRACT_ENTRIES` items.
        """

        def item(value: Any, path: str) -> bytes | AuditEntry:
            if isinstance(value, dict) and set(value) == {"e"}:
                return AuditEntry.decode(enc.bin_max(MAX_ENTRY_SIZE)(value["e"], path))
            fields = enc.check_map(value, {"h": enc.bin_exact(DIGEST_SIZE)}, path)
            return bytes(fields["h"])

        fields = enc.check_map(
            enc.unpack(data),
            {
                "start_seq": enc.uint(2**63),
                "start_head": enc.bin_exact(DIGEST_SIZE),
                "items": enc.list_of(item, max_items=MAX_EXTRACT_ENTRIES),
                "checkpoint": enc.bin_max(512),
            },
            "extract",
        )
        return cls(
            start_seq=fields["start_seq"],
            start_head=fields["start_head"],
            items=tuple(fields["items"]),
            checkpoint=fields["checkpoint"],
        )


def verify_extract(
    data: bytes | Extract,
    arrangement: Arrangement,
    member: str,
    *,
    known: tuple[int, bytes] = (0, GENESIS),
) -> tuple[list[AuditEntry], Checkpoint]:
    """Verify an extract against the member's last verified point ``known``.

    Returns:
        (the member's entries in order, the verified checkpoint to remember).

    Raises:
        ProtocolError: malformed. VerificationError: the chain or signature does not
            check out, the extract does not start where the member left off, or an
            entry is out of sequence or does not name the member.

    An entry hidden behind its hash cannot be told from another member's: what the
    chain proves is that the history the member saw is one consistent, signed sequence
    (members comparing checkpoints catch a relay that shows them different ones).
    """
    extract = data if isinstance(data, Extract) else Extract.decode(data)
    checkpoint = Checkpoint.verify(extract.checkpoint, arrangement)
    if (extract.start_seq, extract.start_head) != tuple(known):
        raise VerificationError()
    head = extract.start_head
    mine: list[AuditEntry] = []
    seq = extract.start_seq
    for item in extract.items:
        seq += 1
        if isinstance(item, AuditEntry):
            if item.seq != seq or member not in item.parties:
                raise VerificationError()
            mine.append(item)
            head = chain_next(head, item.content_hash)
        else:
            head = chain_next(head, item)
    if seq != checkpoint.seq or head != checkpoint.head:
        raise VerificationError()
    return mine, checkpoint


def checkpoints_conflict(first: bytes, second: bytes, arrangement: Arrangement) -> bool:
    """Whether two signed audit checkpoints prove that the relay equivocated.

    Two members who compare the checkpoints they verified catch a relay that showed
    them different histories: the relay signed two different chain heads for the same
    sequence number, and the two signatures are the proof.

    Returns:
        True if both verify, name the same ``seq`` and differ in ``head``. Checkpoints
        at different ``seq`` prove nothing alone (one history may extend the other).

    Raises:
        VerificationError, ProtocolError, Refused: a checkpoint does not verify.
    """
    a = Checkpoint.verify(first, arrangement)
    b = Checkpoint.verify(second, arrangement)
    return a.seq == b.seq and a.head != b.head
