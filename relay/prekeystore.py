"""Prekey handouts in the relay's store: the rules both backends share
(:class:`relay.store.Store`, :class:`relay.pgstore.PgStore`), as :mod:`relay.consentstore`
for release requests: handing out a recipient's prekeys (:meth:`PrekeyTables.take_prekeys`),
a token's one-time prekey used once (:meth:`PrekeyTables._use_one_time_prekey`), and how
many one-time prekeys one originator of one recipient is handed.

A handout is one step of the store's open batch, committed before the answer is sent:
the one-time prekey is marked taken by the asker in one statement (``UPDATE`` of the
newest available one, ``RETURNING`` it; on PostgreSQL ``FOR UPDATE SKIP LOCKED``, so
another process handing out a prekey of the same owner takes another one), so it is
handed out once, and a token naming it is accepted only from that asker, once.

``Limits.max_one_time_prekeys_per_hour`` caps the one-time prekeys of a recipient that one
originator is handed in an hour, so a greedy or hostile originator cannot drain a
recipient's supply (and make it generate, sign and publish prekeys without end) through
``prekeys_fetch``. Past it the fetch is still answered, with the signed prekey only, as
when the supply is exhausted: the token then says it used no one-time prekey.

The count is kept per (recipient, originator) in slots of :data:`PREKEY_RATE_SLOT` seconds
(table ``prekey_rate``, one row per slot with handouts): a check reads the slots of the
last :data:`PREKEY_RATE_WINDOW` seconds (at most six rows, the current one included, so
the window is between 50 and 60 minutes long) and a handout adds one to the current
slot. Counting the handed-out rows themselves (as the release-request rate does, whose
limit is 60) would read every handout of the hour on every fetch: a thousand index
entries per fetch at the default limit. Like every store method, the check and the
count run in the step that takes the prekey, and on PostgreSQL under a transaction
advisory lock of the (recipient, originator) pair (:meth:`PrekeyTables._pair_lock`), so
two relay processes never both see the last one allowed.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from tisa.errors import Reason, Refused
from tisa.token import ReleaseToken

__all__ = ["PREKEY_RATE_SLOT", "PREKEY_RATE_WINDOW", "PrekeyTables"]

# Seconds over which Limits.max_one_time_prekeys_per_hour counts, and the slots it is
# counted in (six: a check reads at most six rows).
PREKEY_RATE_WINDOW = 3600
PREKEY_RATE_SLOT = 600


class PrekeyTables:
    """The prekey handouts of a relay store (see the module docstring)."""

    # What the select of the one-time prekey to hand out adds (PostgreSQL: lock it, and
    # pass over one another process is handing out).
    _HANDOUT_SKIP_LOCKED = ""

    if TYPE_CHECKING:
        # Supplied by the backend (as for relay.consentstore.ConsentTables).
        def _sql(self, query: str, params: tuple[Any, ...] = ()) -> Any: ...

        def _sql_limit(self, limit: int) -> int | None: ...

    def _handout_step(self) -> contextlib.AbstractContextManager[Any]:
        """The step a handout runs in (it checks nothing after its first write)."""
        raise NotImplementedError

    def _pair_lock(self, owner: str, taker: str) -> None:
        """Inside a handout's step, before the count is read: serialise the handouts of
        ``owner``'s prekeys to ``taker`` among relay processes (PostgreSQL: a transaction
        advisory lock; SQLite has one writer)."""

    def take_prekeys(
        self,
        owner: str,
        *,
        taker: str,
        now: int,
        max_per_hour: int | None = None,
        count_to: int | None = None,
    ) -> tuple[bytes | None, bytes | None, int]:
        """One bundle of :meth:`take_prekey_bundles`: (signed envelope or None, one
        one-time envelope or None, one-time prekeys of ``owner`` left)."""
        signed, one_time, left = self.take_prekey_bundles(
            owner, taker=taker, now=now, count=1, max_per_hour=max_per_hour, count_to=count_to
        )
        return signed, one_time[0] if one_time else None, left

    def take_prekey_bundles(
        self,
        owner: str,
        *,
        taker: str,
        now: int,
        count: int,
        max_per_hour: int | None = None,
        count_to: int | None = None,
    ) -> tuple[bytes | None, list[bytes], int]:
        """Hand out ``owner``'s latest published valid signed prekey and up to ``count``
        of its newest available one-time prekeys (the latest publish first: the member's
        current store holds it), the latter marked taken by ``taker`` in the same step,
        as far as ``taker``'s allowance of ``max_per_hour`` of ``owner``'s in the last
        hour goes (None: no limit; see the module docstring).

        Returns:
            (signed envelope or None, the one-time envelopes, newest first: fewer than
            ``count`` when fewer are left or allowed, one-time prekeys of ``owner``
            left, counted up to ``count_to``: all when None). Fewer one-time prekeys
            than ``count`` while some are left: ``taker``'s allowance is used up.
        """
        with self._handout_step():
            # taken_by IS NULL (always so for a signed prekey): the newest is read from
            # the index in order, with no sort.
            signed = self._sql(
                "SELECT encoded FROM prekeys WHERE owner = ? AND kind = 'signed'"
                " AND taken_by IS NULL AND not_after > ? ORDER BY seq DESC LIMIT 1",
                (owner, now),
            ).fetchone()
            allowed = count
            if max_per_hour is not None:
                self._pair_lock(owner, taker)
                allowed = min(
                    count, self._prekeys_allowed(owner, taker, now=now, max_per_hour=max_per_hour)
                )
            one_time: list[tuple[int, bytes]] = []
            if allowed > 0:
                # One statement marks them all taken; RETURNING gives no order.
                one_time = sorted(
                    (
                        (int(row[1]), bytes(row[0]))
                        for row in self._sql(
                            "UPDATE prekeys SET taken_by = ? WHERE seq IN (SELECT seq FROM"
                            " prekeys WHERE owner = ? AND kind = 'one_time' AND taken_by IS NULL"
                            " AND not_after > ? ORDER BY seq DESC LIMIT ?"
                            f"{self._HANDOUT_SKIP_LOCKED}) RETURNING encoded, seq",
                            (taker, owner, now, allowed),
                        ).fetchall()
                    ),
                    reverse=True,
                )
                if one_time:
                    self._count_handout(owner, taker, now=now, handed=len(one_time))
            left = self._one_time_left(owner, now=now, count_to=count_to)
        return (
            None if signed is None else bytes(signed[0]),
            [encoded for _, encoded in one_time],
            left,
        )

    def _one_time_left(self, owner: str, *, now: int, count_to: int | None = None) -> int:
        """``owner``'s one-time prekeys still to hand out, counted up to ``count_to``
        (None: all): a handout needs to know only whether fewer than the low-water mark
        are left, not to count a supply of hundreds."""
        (left,) = self._sql(
            "SELECT count(*) FROM (SELECT 1 FROM prekeys WHERE owner = ?"
            " AND kind = 'one_time' AND taken_by IS NULL AND not_after > ? LIMIT ?) AS supply",
            (owner, now, self._sql_limit(-1 if count_to is None else count_to)),
        ).fetchone()
        return int(left)

    def _use_one_time_prekey(self, token: ReleaseToken) -> None:
        """Inside a release's step, before its first write: the token's one-time prekey
        was handed to its originator as its recipient's, and no token used it; now this
        one has (one statement when it is so).

        Raises:
            Refused: UNKNOWN_PREKEY (not handed to this originator as the recipient's),
                BAD_PREKEY (used by another token).
        """
        used = self._sql(
            "UPDATE prekeys SET used_by = ? WHERE key = ? AND kind = 'one_time'"
            " AND owner = ? AND taken_by = ? AND used_by IS NULL",
            (token.id, token.wrap.opk, token.recipient, token.originator),
        )
        if used.rowcount == 1:
            return
        row = self._sql(
            "SELECT owner, taken_by FROM prekeys WHERE key = ? AND kind = 'one_time'",
            (token.wrap.opk,),
        ).fetchone()
        if row is None or (row[0], row[1]) != (token.recipient, token.originator):
            raise Refused(Reason.UNKNOWN_PREKEY, "a one-time prekey this relay did not hand you")
        # Not "replayed": that code means a token id seen before, which an originator's
        # node takes as its own earlier release of the same token.
        raise Refused(Reason.BAD_PREKEY, "this one-time prekey was used by another token")

    def _prekeys_allowed(self, owner: str, taker: str, *, now: int, max_per_hour: int) -> int:
        """How many more one-time prekeys of ``owner`` ``taker`` may be handed now."""
        slot = now // PREKEY_RATE_SLOT
        (handed,) = self._sql(
            "SELECT COALESCE(SUM(handed), 0) FROM prekey_rate"
            " WHERE owner = ? AND taker = ? AND slot > ?",
            (owner, taker, slot - PREKEY_RATE_WINDOW // PREKEY_RATE_SLOT),
        ).fetchone()
        return max(0, max_per_hour - int(handed))

    def _count_handout(self, owner: str, taker: str, *, now: int, handed: int = 1) -> None:
        """Count ``handed`` one-time prekeys of ``owner`` handed to ``taker`` now."""
        self._sql(
            "INSERT INTO prekey_rate (owner, taker, slot, handed) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (owner, taker, slot)"
            " DO UPDATE SET handed = prekey_rate.handed + excluded.handed",
            (owner, taker, now // PREKEY_RATE_SLOT, handed),
        )

    def _prune_prekey_rate(self, *, now: int) -> None:
        """Inside the expiry step: drop the slots no check reads any more."""
        self._sql(
            "DELETE FROM prekey_rate WHERE slot <= ?",
            (now // PREKEY_RATE_SLOT - PREKEY_RATE_WINDOW // PREKEY_RATE_SLOT,),
        )
