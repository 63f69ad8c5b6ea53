"""A reference recipient on the core alone, and release-counter gap detection.

:class:`CoreRecipient` is what a recipient must do with a delivery (token and
ciphertext), in the order ``docs/node-protocol.md`` gives: check the token, refuse a
token or report seen before, open and verify the report, then commit the report as
seen and hand it over in one step. Its durable state is a :class:`RecipientStore`
(seen token ids, seen report ids, counters); a "restart" is a new :class:`CoreRecipient`
on the same store. The stateful Dolev-Yao test drives it; another client can use it as
an oracle (same input, same verdict).

:class:`CounterGaps` tracks the per-(originator, recipient) release counters a recipient
has seen and names the values missing below the highest one: releases the relay may
have dropped. Counters may arrive out of order; a late arrival closes its gap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tisa.arrangement import Arrangement
from tisa.audit import checkpoints_conflict
from tisa.errors import Reason, Refused
from tisa.keys import MemberSecret
from tisa.prekeys import PrekeyKind
from tisa.report import OpenedReport, open_report
from tisa.token import check_for_recipient

__all__ = [
    "CoreRecipient",
    "CounterGaps",
    "Delivered",
    "RecipientStore",
    "checkpoints_conflict",
]


class CounterGaps:
    """Release counters seen from each originator, and the gaps below the highest.

    Counters start at 1 and each value is used once per (originator, recipient), so
    after values 1, 2 and 5 from Seoul the gaps are {3, 4}. Memory is bounded by the
    number of open gaps, not by the number of releases.
    """

    __slots__ = ("_high", "_missing")

    def __init__(self) -> None:
        self._high: dict[str, int] = {}
        self._missing: dict[str, set[int]] = {}

    def record(self, originator: str, counter: int) -> list[int]:
        """Note ``counter`` from ``originator``; returns the values it newly shows missing.

        A value seen before, or one filling an earlier gap, returns ``[]``.
        """
        high = self._high.get(originator, 0)
        missing = self._missing.setdefault(originator, set())
        if counter <= high:
            missing.discard(counter)
            return []
        new = list(range(high + 1, counter))
        missing.update(new)
        self._high[originator] = counter
        return new

    def gaps(self, originator: str) -> frozenset[int]:
        """Counter values below the highest seen from ``originator`` that never arrived."""
        return frozenset(self._missing.get(originator, ()))

    def highest(self, originator: str) -> int:
        """The highest counter seen from ``originator`` (0 before any)."""
        return self._high.get(originator, 0)

    def copy(self) -> CounterGaps:
        """An independent copy: recording in one does not change the other."""
        other = CounterGaps()
        other._high = dict(self._high)
        other._missing = {k: set(v) for k, v in self._missing.items()}
        return other


@dataclasses.dataclass
class RecipientStore:
    """What a recipient keeps durably: a model of its SQLite seen-set and counters."""

    seen_tokens: set[bytes] = dataclasses.field(default_factory=set)
    seen_reports: set[bytes] = dataclasses.field(default_factory=set)
    counters: CounterGaps = dataclasses.field(default_factory=CounterGaps)
    inbox: list[Delivered] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class Delivered:
    """A report handed to the application, with the token it came under."""

    token_id: bytes
    counter: int
    report: OpenedReport
    gaps: tuple[int, ...]


class CoreRecipient:
    """One recipient's handling of deliveries, on the core only.

    Args:
        arrangement: the effective arrangement.
        secret, name: the recipient's keys and name.
        store: its durable state; pass the same store again to model a restart.
        prekey_secret: its prekey secrets (see :func:`tisa.token.check_for_recipient`).
    """

    def __init__(
        self,
        arrangement: Arrangement,
        secret: MemberSecret,
        name: str,
        store: RecipientStore | None = None,
        prekey_secret: Callable[[PrekeyKind, bytes], bytes] | None = None,
    ) -> None:
        self.arrangement = arrangement
        self.secret = secret
        self.name = name
        self.prekey_secret = prekey_secret
        self.store = store if store is not None else RecipientStore()

    def receive(self, token: bytes, ciphertext: bytes, *, now: int) -> Delivered:
        """Check and open one delivery; commit it as seen and hand it over.

        Raises:
            ProtocolError: the token does not decode.
            VerificationError: anything cryptographic failed (opaque).
            Refused: a policy refusal; ``replayed`` for a token or report seen before.
        """
        release = check_for_recipient(
            token,
            self.arrangement,
            self.secret,
            self.name,
            now=now,
            prekey_secret=self.prekey_secret,
        )
        t = release.token
        store = self.store
        if t.id in store.seen_tokens or t.report in store.seen_reports:
            # Authentic, so the counter is real: it arrived, even if as a replay.
            store.counters.record(t.originator, t.counter)
            raise Refused(Reason.REPLAYED, "report seen before")
        opened = open_report(ciphertext, release.opener(self.arrangement))
        # The commit: seen-set, counter and inbox change together or not at all.
        gaps = store.counters.record(t.originator, t.counter)
        store.seen_tokens.add(t.id)
        store.seen_reports.add(t.report)
        delivered = Delivered(token_id=t.id, counter=t.counter, report=opened, gaps=tuple(gaps))
        store.inbox.append(delivered)
        return delivered
