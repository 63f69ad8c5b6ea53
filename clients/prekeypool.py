"""An originator's prekey bundles fetched ahead, per recipient (issue 11: the prekey
round trip off a report's critical path).

A connected :meth:`clients.node.Node.submit` that releases at once needs, per recipient,
a signed prekey and a one-time prekey handed out by the relay: a ``prekeys_fetch``, a
commit (with its fsync) at the relay, and the answer, before the tokens can be issued.
The node keeps a few such bundles per recipient ready instead (:class:`PrekeyPool`,
``Limits.prekey_pool``), so a submit takes one without waiting; the node's pool keeper
refills the pool in the background, once fewer than half are left, up to full again:
at most ``Limits.max_prekey_fetches`` bundles in one write, one ``prekeys_fetch`` per
recipient for all of its bundles (protocol version 4: a fetch asks for ``count``
bundles, and the answer carries the signed prekey once and a list of one-time prekeys;
:func:`bundles_of` cuts it into bundles).

The rules, each for a reason:

- *Lazy.* A recipient gets a pool when a submit first releases to it (its prekeys
  then come from a direct fetch, as without a pool), for at most
  ``Limits.prekey_pool_recipients`` recipients; the others always fetch directly.
- *Only full bundles.* A pool holds bundles with a one-time prekey only. An answer
  without one (the recipient's supply is exhausted, or this originator had its
  ``max_one_time_prekeys_per_hour`` of them; an answer with fewer one-time prekeys than
  asked for is as many full bundles and, for the rest, as many without), a refusal, or
  a bundle that does not decode or is about to expire is not pooled, and stops the
  refills of that recipient
  (*dry*): its submits fetch directly, as without a pool, and each token says which
  keys it used (a weaker one a ``WeakerWrap`` event). A direct fetch that brings a
  one-time prekey again ends the dry spell. So the pool never hoards weaker bundles
  while a fresh fetch could get a one-time prekey, nor asks the relay again and again
  for what it cannot hand out.
- *Fresh at use.* A bundle is taken only while both its prekeys stay valid for
  ``clock_skew`` more seconds (any clock within the skew accepts it, and the recipient
  keeps the secret for the whole validity of a token issued now: see
  ``Limits.signed_prekey_grace``); older ones are dropped (:attr:`PrekeyPool.dropped`)
  and the next one tried, then a direct fetch. Everything else is checked at use exactly
  as for a fetched bundle: :func:`tisa.token.issue_token` verifies owner, kind,
  arrangement, expiry and signature.
- *Put back.* A bundle fetched or taken for a token that is then not issued (its
  submission not recorded, its release ended during the fetch) goes back to the front
  of the pool while it has room (:meth:`PrekeyPool.put_back`), so its one-time prekey
  is not handed out for nothing.
- *In memory.* Bundles left when the node stops are one-time prekeys handed out and
  never used: at most ``prekey_pool`` per recipient and restart. That costs no secrecy:
  the public halves reveal nothing, and the recipient deletes an unused one-time secret
  when it expires (``one_time_prekey_lifetime`` plus the grace), as it does one never
  handed out; it costs the recipient a top-up sooner. Persisting the pool would save
  those few prekeys at the price of a write per handout and per use, and a restarted
  node would hold bundles of uncertain age; it is not done.

Pure bookkeeping: no I/O, time passed in.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from tisa import messages as m
from tisa.errors import ProtocolError
from tisa.prekeys import Prekey

__all__ = ["PrekeyPool", "bundles_of"]


def bundles_of(answer: m.Message, count: int) -> list[m.Message]:
    """The relay's ``answer`` to a fetch of ``count`` bundles, as ``count`` answers of one
    bundle each, in order: a :class:`~tisa.messages.Prekeys` per one-time prekey it
    carries (newest first), then, for the bundles the relay did not hand out (fewer
    left, or the hourly allowance used up), the signed prekey alone; a refusal (or
    anything else) stands for each."""
    if not isinstance(answer, m.Prekeys) or (count == 1 and len(answer.one_time) <= 1):
        return [answer] * count
    full = [
        m.Prekeys(ref=answer.ref, member=answer.member, signed=answer.signed, one_time=[one])
        for one in answer.one_time[:count]
    ]
    if len(full) == count:
        return list(full)
    weaker = m.Prekeys(ref=answer.ref, member=answer.member, signed=answer.signed, one_time=[])
    return [*full, *[weaker] * (count - len(full))]


@dataclasses.dataclass(slots=True)
class _Pool:
    """One recipient's bundles, oldest first, and its refill state."""

    bundles: collections.deque[tuple[m.Prekeys, int]] = dataclasses.field(
        default_factory=collections.deque
    )
    # Fetches in flight for it (asked by the keeper, not answered yet).
    asked: int = 0
    # Below half full once, and not full again yet: the keeper tops it up.
    filling: bool = False
    # The relay's last answer was not a full bundle: no refills until a direct fetch
    # brings one.
    dry: bool = False


class PrekeyPool:
    """The bundles of handed-out prekeys an originator holds, per recipient.

    Args:
        size: bundles kept per recipient (``Limits.prekey_pool``; 0: no pool at all).
        recipients: recipients with a pool at most (``Limits.prekey_pool_recipients``).
        margin: seconds both prekeys of a bundle must stay valid to be used
            (``Limits.clock_skew``).
    """

    def __init__(self, *, size: int, recipients: int, margin: int) -> None:
        self.size = size
        self.max_recipients = recipients
        self.margin = margin
        self._pools: dict[str, _Pool] = {}
        # Bundles taken for a token, and dropped unused (expired, or about to, before
        # they were taken).
        self.taken = 0
        self.dropped = 0
        # The last signed prekey decoded and its not_after: every bundle of a recipient
        # carries the same one until it rotates (about weekly), so it is decoded once.
        self._signed: tuple[bytes, int] = (b"", 0)

    def __len__(self) -> int:
        """Bundles held, over every recipient."""
        return sum(len(pool.bundles) for pool in self._pools.values())

    def held(self, recipient: str) -> int:
        """Bundles held for ``recipient``."""
        pool = self._pools.get(recipient)
        return 0 if pool is None else len(pool.bundles)

    def take(self, recipient: str, *, now: int) -> m.Prekeys | None:
        """A bundle of ``recipient``'s prekeys to issue a token with, removed from the
        pool (None: none fresh enough; fetch directly). Drops the stale ones on the way."""
        pool = self._pools.get(recipient)
        if pool is None:
            return None
        taken = None
        while pool.bundles and taken is None:
            answer, not_after = pool.bundles.popleft()
            if now + self.margin < not_after:
                taken = answer
                self.taken += 1
            else:
                self.dropped += 1
        self._check_level(pool)
        return taken

    def fetched(self, recipient: str, answer: m.Message | None, *, now: int) -> None:
        """The answer to a direct fetch of ``recipient``'s prekeys (None: none came):
        starts the recipient's pool if there is room; a full bundle (used for the token
        it was fetched for, not pooled) ends a dry spell, any other answer starts one."""
        if self.size == 0 or answer is None:
            return
        pool = self._pools.get(recipient)
        if pool is None:
            if len(self._pools) >= self.max_recipients:
                return
            pool = self._pools[recipient] = _Pool()
        pool.dry = self._not_after(recipient, answer, now=now) is None
        self._check_level(pool)

    def put_back(self, recipient: str, answer: m.Message, *, now: int) -> bool:
        """Keep a bundle handed out for a token that was not issued after all (its
        submission failed to be recorded, or its release ended during the fetch), to be
        taken first, rather than leave its one-time prekey unused. Only a full bundle of
        ``recipient``'s that stays fresh, into a pool that exists and has room; returns
        whether it was kept."""
        pool = self._pools.get(recipient)
        if pool is None or len(pool.bundles) >= self.size:
            return False
        not_after = self._not_after(recipient, answer, now=now)
        if not_after is None or not isinstance(answer, m.Prekeys):
            return False
        pool.bundles.appendleft((answer, not_after))
        self._check_level(pool)
        return True

    def wants(self) -> bool:
        """Whether :meth:`asks` has something to ask for."""
        return any(
            pool.filling and not pool.dry and len(pool.bundles) + pool.asked < self.size
            for pool in self._pools.values()
        )

    def asks(self, room: int) -> list[str]:
        """The recipients to fetch a bundle for now, one entry per fetch, at most
        ``room``; counted as in flight until :meth:`answered`."""
        asks: list[str] = []
        for recipient, pool in self._pools.items():
            if not pool.filling or pool.dry:
                continue
            count = min(self.size - len(pool.bundles) - pool.asked, room - len(asks))
            if count > 0:
                pool.asked += count
                asks.extend([recipient] * count)
        return asks

    def answered(
        self, recipients: list[str], answers: Sequence[m.Message] | None, *, now: int
    ) -> None:
        """The relay's answers to the fetches :meth:`asks` gave (None: the connection
        ended before all came; a later ask tries again)."""
        for n, recipient in enumerate(recipients):
            pool = self._pools[recipient]
            pool.asked -= 1
            if answers is None:
                continue
            answer = answers[n]
            not_after = self._not_after(recipient, answer, now=now)
            if not_after is None:
                pool.dry = True
            elif isinstance(answer, m.Prekeys):
                pool.bundles.append((answer, not_after))
        for pool in self._pools.values():
            self._check_level(pool)

    def _check_level(self, pool: _Pool) -> None:
        held = len(pool.bundles)
        if 2 * held < self.size:
            pool.filling = True
        elif held + pool.asked >= self.size:
            pool.filling = False

    def _not_after(self, recipient: str, answer: m.Message, *, now: int) -> int | None:
        """When the bundle ``answer`` stops being usable from a pool (the earlier
        ``not_after`` of its two prekeys), or None if it is not a full bundle of
        ``recipient``'s that stays fresh past ``now`` (unverified: checked at use)."""
        if (
            not isinstance(answer, m.Prekeys)
            or answer.member != recipient
            or answer.signed is None
            or len(answer.one_time) != 1
        ):
            return None
        try:
            signed, signed_not_after = self._signed
            if answer.signed != signed:
                signed_not_after = Prekey.decode(answer.signed).not_after
                self._signed = (answer.signed, signed_not_after)
            not_after = min(signed_not_after, Prekey.decode(answer.one_time[0]).not_after)
        except ProtocolError:
            return None
        return not_after if now + self.margin < not_after else None
