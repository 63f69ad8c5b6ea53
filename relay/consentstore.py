"""Release requests in the relay's store: the rules both backends share.

:class:`ConsentTables` holds the consent methods of :class:`relay.store.Store` (SQLite)
and :class:`relay.pgstore.PgStore` (PostgreSQL): the same refusals, reason codes and
audit entries whichever database keeps them. The tables (``requests``,
``announcements``, ``consent_queue``; see each backend's schema) are the same in both;
a backend supplies only how a statement runs (:meth:`ConsentTables._sql`, written with
``?`` placeholders), its steps and audit log (``_transaction``, ``_audit``), and what
it does when something is queued for a member (:meth:`ConsentTables._tell` counts it,
for :meth:`ConsentTables.changes`; the PostgreSQL store also NOTIFYs the other relay
processes), and how a step keeps other relay
processes' steps of its kind out until its batch commits (:meth:`ConsentTables._exclusive`).
The delivery rules are shared the same way (:mod:`relay.tokenstore`).

Every method is one step of the store's open batch, like every other store method: a
refused one leaves no trace, and its audit entry commits with the change it records.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

from tisa.audit import AuditEvent
from tisa.consent import Announcement, Answer, Request
from tisa.errors import Reason, Refused
from tisa.token import ReleaseToken

__all__ = [
    "CONSENT",
    "DELIVERIES",
    "NOTICES",
    "QUEUED_KINDS",
    "RECEIPTS",
    "REQUEST_RATE_WINDOW",
    "ConsentRow",
    "ConsentTables",
]

# Seconds over which Limits.max_requests_per_hour counts a requester's requests.
REQUEST_RATE_WINDOW = 3600

# The kinds of rows queued for a member that the relay pushes to its connections, each
# counted per member where a step queues one (ConsentTables._tell), so that a pusher
# reads a kind again only when its count moved (ConsentTables.changes).
DELIVERIES = "deliveries"  # a delivery made pending (a release)
RECEIPTS = "receipts"  # a receipt queued for its originator
CONSENT = "consent"  # an announcement, request or denial queued
NOTICES = "notices"  # an expiry notice queued for an originator
QUEUED_KINDS = (DELIVERIES, RECEIPTS, CONSENT, NOTICES)


@dataclasses.dataclass(frozen=True, slots=True)
class ConsentRow:
    """A consent object queued for a member: ``kind`` (announce, request, answer), its
    id (``ref``) and its signed encoding (``data``)."""

    seq: int
    kind: str
    ref: bytes
    data: bytes


class _Cursor(Protocol):
    # What both sqlite3's and psycopg's cursors offer.
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class ConsentTables:
    """The consent methods of a relay store (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # member -> kind (QUEUED_KINDS) -> steps of this process that queued rows of
        # that kind for the member; and the whole batches undone (see changes).
        self._queued_changes: dict[str, dict[str, int]] = {}
        self._batches_undone = 0

    if TYPE_CHECKING:
        # Supplied by the backend.
        def _transaction(
            self, *, savepoint: bool = True
        ) -> contextlib.AbstractContextManager[Any]: ...

        def _audit(
            self,
            event: AuditEvent,
            *,
            now: int,
            parties: tuple[str, ...],
            report: bytes | None = None,
            token: bytes | None = None,
            reason: str | None = None,
        ) -> object: ...

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> _Cursor:
        """Run ``query`` (``?`` placeholders) in the store's open step or batch."""
        raise NotImplementedError

    def _sql_limit(self, limit: int) -> int | None:
        """``limit`` as the backend's LIMIT parameter (-1: all)."""
        return limit

    def changes(self, member: str, kind: str) -> int:
        """A count that moves whenever this process may have queued rows of ``kind``
        (one of :data:`QUEUED_KINDS`) for ``member``: each step that queues one counts
        (:meth:`_tell`, inside the step, before the step's statements return), and so
        does every whole batch rolled back or lost (its rows are gone, and rows it had
        taken out may be back), for every member and kind. A reader that takes the
        count before its query and finds the same count later knows that no row of
        that kind was queued for ``member`` by this process since: it may skip the
        query. Rows other relay processes queue are not counted here (PostgreSQL: they
        arrive as a notification, :meth:`relay.pgstore.PgStore.watch`)."""
        counts = self._queued_changes.get(member)
        return self._batches_undone + (0 if counts is None else counts.get(kind, 0))

    def _tell(self, member: str, kind: str) -> None:
        """Rows of ``kind`` are queued for ``member`` in the running step: counted
        (:meth:`changes`); the PostgreSQL store also tells the other relay processes."""
        counts = self._queued_changes.get(member)
        if counts is None:
            counts = self._queued_changes[member] = {}
        counts[kind] = counts.get(kind, 0) + 1

    def _batch_undone(self) -> None:
        """A whole batch was rolled back or lost: every count of :meth:`changes` moves."""
        self._batches_undone += 1

    def _exclusive(self) -> None:
        """From here to the batch's COMMIT, no other relay process runs a step that
        takes this too: for a check whose write must not race another process's (a
        request answered twice, a rate counted twice), and for rows that members read
        on from the last ``seq`` they were sent (drawn in commit order). The PostgreSQL
        store takes a transaction lock; SQLite has one writer, and does nothing."""

    def _seen(self, found: Any) -> Any:
        """Rows read outside the open batch (see :meth:`relay.pgstore.PgStore._seen`)."""
        return found

    # --- used inside the backend's own steps -------------------------------------------

    def _approve(self, token: ReleaseToken, *, now: int, clock_skew: int) -> None:
        """Close the request ``token.request`` as approved: inside the release's step,
        before its first write, so a refused approval consumes nothing and an approval
        commits with the release it makes.

        Raises:
            Refused: UNSOLICITED (no such request from the recipient to the originator
                for this report), ANSWERED (approved or denied before), EXPIRED.
        """
        self._exclusive()
        row = self._sql(
            "SELECT requester, originator, report, state, expires FROM requests WHERE id = ?",
            (token.request,),
        ).fetchone()
        if row is None or (str(row[0]), str(row[1]), bytes(row[2])) != (
            token.recipient,
            token.originator,
            token.report,
        ):
            raise Refused(Reason.UNSOLICITED, "no such request from the recipient for this report")
        if row[3] != "open":
            raise Refused(Reason.ANSWERED, f"the request was {row[3]} before")
        if now - clock_skew >= int(row[4]):
            raise Refused(Reason.EXPIRED, "the request expired")
        self._sql("UPDATE requests SET state = 'approved' WHERE id = ?", (token.request,))
        self._audit(
            AuditEvent.APPROVED,
            now=now,
            parties=(token.originator, token.recipient),
            report=token.report,
            token=token.request,
        )

    def _prune_consent(self, *, now: int, clock_skew: int) -> None:
        """Inside the expiry step: drop what can never be used again."""
        # A lapsed request can be neither approved nor denied any more, and a resend
        # of it is refused as expired before its id is looked up: the row can go,
        # once it no longer counts against its requester's hourly rate either.
        self._sql(
            "DELETE FROM requests WHERE expires + ? <= ? AND received + ? <= ?",
            (clock_skew, now, REQUEST_RATE_WINDOW, now),
        )
        # One lookup of its report per announcement (few), never a scan of the reports.
        self._sql(
            "DELETE FROM announcements WHERE EXISTS (SELECT 1 FROM reports"
            " WHERE reports.id = announcements.report AND reports.state = 'deleted')"
        )

    def _held_report(self, report: bytes, originator: str) -> None:
        row = self._sql("SELECT originator, state FROM reports WHERE id = ?", (report,)).fetchone()
        if row is None or str(row[0]) != originator or row[1] == "deleted":
            # One answer for "none", "someone else's" and "gone": a member learns nothing
            # about reports it was not told of.
            raise Refused(Reason.UNKNOWN_REPORT, "no such report held for that originator")

    def _queue_consent(self, member: str, kind: str, ref: bytes, data: bytes) -> None:
        self._tell(member, CONSENT)
        self._sql(
            "INSERT INTO consent_queue (member, kind, ref, data) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (member, kind, ref) DO NOTHING",
            (member, kind, ref, data),
        )

    # --- the store's consent methods ---------------------------------------------------

    def add_announcement(self, announcement: Announcement, *, now: int) -> bool:
        """Queue a verified announcement for every member it names, and log it.

        Returns:
            False for a resend of one stored before (same bytes): nothing is queued again.

        Raises:
            Refused: DUPLICATE (another announcement has this id), UNKNOWN_REPORT (the
                originator holds no such report here).
        """
        with self._transaction():
            self._exclusive()
            row = self._sql(
                "SELECT announcement FROM announcements WHERE id = ?", (announcement.id,)
            ).fetchone()
            if row is not None:
                if bytes(row[0]) != announcement.encoded:
                    raise Refused(Reason.DUPLICATE, "another announcement has this id")
                return False
            self._held_report(announcement.report, announcement.originator)
            self._sql(
                "INSERT INTO announcements (id, report, announcement) VALUES (?, ?, ?)",
                (announcement.id, announcement.report, announcement.encoded),
            )
            for member in announcement.to:
                self._queue_consent(member, "announce", announcement.id, announcement.encoded)
            self._audit(
                AuditEvent.ANNOUNCED,
                now=now,
                parties=(announcement.originator, *announcement.to),
                report=announcement.report,
            )
        return True

    def add_request(self, request: Request, *, now: int, max_per_hour: int) -> bool:
        """Record a verified request, queue it for its originator, and log it.

        The rate is counted from the stored requests (so it holds across restarts and,
        on PostgreSQL, across relay processes: the step is :meth:`_exclusive`, so two
        steps counting the same requester's requests run one after the other).

        Returns:
            False for a resend of one stored before (same bytes): nothing is queued again
            and it does not count against the rate.

        Raises:
            Refused: DUPLICATE (another request has this id), UNKNOWN_REPORT (the
                originator holds no such report here), RATE_LIMITED (the requester sent
                ``max_per_hour`` requests in the last :data:`REQUEST_RATE_WINDOW`
                seconds).
        """
        with self._transaction():
            self._exclusive()
            row = self._sql("SELECT request FROM requests WHERE id = ?", (request.id,)).fetchone()
            if row is not None:
                if bytes(row[0]) != request.encoded:
                    raise Refused(Reason.DUPLICATE, "another request has this id")
                return False
            self._held_report(request.report, request.originator)
            (recent,) = self._sql(
                "SELECT COUNT(*) FROM requests WHERE requester = ? AND received > ?",
                (request.requester, now - REQUEST_RATE_WINDOW),
            ).fetchone()
            if recent >= max_per_hour:
                raise Refused(
                    Reason.RATE_LIMITED, f"{max_per_hour} requests in the last hour; later"
                )
            self._sql(
                "INSERT INTO requests (id, requester, originator, report, request, state,"
                " expires, received) VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
                (
                    request.id,
                    request.requester,
                    request.originator,
                    request.report,
                    request.encoded,
                    request.expires,
                    now,
                ),
            )
            self._queue_consent(request.originator, "request", request.id, request.encoded)
            self._audit(
                AuditEvent.REQUESTED,
                now=now,
                parties=(request.requester, request.originator),
                report=request.report,
                token=request.id,
            )
        return True

    def add_denial(self, answer: Answer, *, now: int) -> bool:
        """Close a request as denied with a verified answer, queue the answer for the
        requester, and log it.

        Returns:
            False for a resend of the same denial.

        Raises:
            Refused: UNSOLICITED (no request with that id from that requester to that
                originator for that report), ANSWERED (approved or denied before).
        """
        with self._transaction():
            self._exclusive()
            row = self._sql(
                "SELECT requester, originator, report, state, answer FROM requests WHERE id = ?",
                (answer.request,),
            ).fetchone()
            if row is None or (str(row[0]), str(row[1]), bytes(row[2])) != (
                answer.requester,
                answer.originator,
                answer.report,
            ):
                raise Refused(Reason.UNSOLICITED, "no such request to you")
            if row[3] == "denied" and row[4] is not None and bytes(row[4]) == answer.encoded:
                return False
            if row[3] != "open":
                # A denial is final, and an approval cannot be taken back by a denial.
                raise Refused(Reason.ANSWERED, f"the request was {row[3]} before")
            self._sql(
                "UPDATE requests SET state = 'denied', answer = ? WHERE id = ?",
                (answer.encoded, answer.request),
            )
            self._queue_consent(answer.requester, "answer", answer.request, answer.encoded)
            self._audit(
                AuditEvent.DENIED,
                now=now,
                parties=(answer.originator, answer.requester),
                report=answer.report,
                token=answer.request,
                reason=answer.reason.value,
            )
        return True

    def queued_consent(self, member: str, *, after: int = 0, limit: int = -1) -> list[ConsentRow]:
        """Consent objects queued for ``member`` with ``seq > after``, oldest first (at
        most ``limit``; -1 for all)."""
        rows = self._seen(
            self._sql(
                "SELECT seq, kind, ref, data FROM consent_queue"
                " WHERE member = ? AND seq > ? ORDER BY seq LIMIT ?",
                (member, after, self._sql_limit(limit)),
            ).fetchall()
        )
        return [ConsentRow(int(r[0]), str(r[1]), bytes(r[2]), bytes(r[3])) for r in rows]

    def ack_consent(self, member: str, kind: str, ref: bytes) -> bool:
        """``member`` holds the queued object of ``kind`` with id ``ref``: drop it. False
        if none was queued (a second ack of a copy)."""
        with self._transaction():
            cursor = self._sql(
                "DELETE FROM consent_queue WHERE member = ? AND kind = ? AND ref = ?",
                (member, kind, ref),
            )
            return cursor.rowcount > 0

    def request_state(self, request_id: bytes) -> str | None:
        """``open``, ``approved`` or ``denied``; None for an unknown (or pruned) request."""
        row = self._seen(
            self._sql("SELECT state FROM requests WHERE id = ?", (request_id,)).fetchone()
        )
        return None if row is None else str(row[0])
