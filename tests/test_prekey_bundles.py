"""Protocol version 4: several prekey bundles of one member in one ``prekeys_fetch``.

A fetch asks for ``count`` bundles (at most ``MAX_PREKEY_BUNDLES``); the answer carries
the signed prekey once and up to ``count`` one-time prekeys, newest first, each taken by
the asker in the same step, as far as the supply and the asker's hourly allowance
(``Limits.max_one_time_prekeys_per_hour``) go. The originator's pool keeper asks for a
recipient's missing bundles in one fetch and cuts the answer into bundles
(``clients.prekeypool.bundles_of``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import trio
from nodes.relay_harness import Harness, expect, running_relay
from nodes.relay_helpers import NOW, FakeClock, World, make_world

from clients.prekeypool import PrekeyPool, bundles_of
from relay.prekeystore import PREKEY_RATE_WINDOW
from tisa.audit import AuditEvent
from tisa.errors import Reason
from tisa.limits import Limits
from tisa.messages import (
    MAX_PREKEY_BUNDLES,
    ErrorMessage,
    FetchPrekeys,
    Prekeys,
    PrekeyStatus,
    PublishPrekeys,
    Refusal,
)
from tisa.prekeys import Prekey

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, prekey_low_water=2, max_one_time_prekeys=60)


async def _publish(h: Harness, world: World, count: int) -> tuple[bytes, list[bytes]]:
    """Tokyo publishes its signed prekey and ``count`` one-time prekeys (in that order:
    the last is the newest)."""
    signed = world.signed_prekey("tokyo")
    one_time = [world.prekey("tokyo") for _ in range(count)]
    link = await h.connect("tokyo")
    await link.send(PublishPrekeys(signed=signed, one_time=one_time))
    assert (await expect(link, PrekeyStatus)).one_time == count
    await link.aclose()
    return signed, one_time


async def _fetch(h: Harness, count: int, by: str = "seoul") -> Prekeys:
    link = await h.connect(by)
    await link.send(FetchPrekeys(ref=b"r" * 16, member="tokyo", count=count))
    reply = await expect(link, Prekeys)
    await link.aclose()
    assert reply.ref == b"r" * 16 and reply.member == "tokyo"
    return reply


async def test_one_fetch_hands_out_several_bundles_then_what_is_left(
    store_at: str | Path,
) -> None:
    world = make_world()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            signed, published = await _publish(h, world, 5)
            first = await _fetch(h, 3)
            # The signed prekey once, three one-time prekeys, newest first.
            assert first.signed == signed and first.one_time == published[::-1][:3]
            # Two left: a partial answer, with every one of them.
            second = await _fetch(h, 3)
            assert second.signed == signed and second.one_time == published[::-1][3:]
            # None left: the signed prekey alone (the originator falls back, and says so).
            third = await _fetch(h, 3)
            assert (third.signed, third.one_time) == (signed, [])
            # Each handed out once, to the asker, durably (across a restart).
            await h.restart()
            assert (await _fetch(h, 1)).one_time == []
            assert h.relay.store.prekey_status("tokyo", now=NOW)[1] == 0


async def test_a_fetch_of_more_than_max_prekey_bundles_closes_malformed(
    store_at: str | Path,
) -> None:
    world = make_world()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            await _publish(h, world, MAX_PREKEY_BUNDLES + 1)
            at_limit = await _fetch(h, MAX_PREKEY_BUNDLES)
            assert len(at_limit.one_time) == MAX_PREKEY_BUNDLES
            # A peer that does not build its message with the checked constructor.
            over = object.__new__(FetchPrekeys)
            for key, value in {
                "ref": b"r" * 16,
                "member": "tokyo",
                "count": MAX_PREKEY_BUNDLES + 1,
            }.items():
                object.__setattr__(over, key, value)
            seoul = await h.connect("seoul")
            await seoul.send(over)
            assert (await expect(seoul, ErrorMessage)).reason == Reason.MALFORMED
            # Nothing more was handed out.
            assert h.relay.store.prekey_status("tokyo", now=NOW)[1] == 1


async def test_a_fetch_of_several_stops_at_the_hourly_allowance(store_at: str | Path) -> None:
    # max_one_time_prekeys_per_hour counts one-time prekeys, not fetches: a fetch of 5
    # with an allowance of 3 gets 3, the next none (logged once: refused, rate_limited,
    # both parties); another originator has its own allowance; an hour on, more again.
    world = make_world()
    limits = dataclasses.replace(LIMITS, max_one_time_prekeys_per_hour=3)
    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=clock) as h:
            signed, _ = await _publish(h, world, 20)
            before = h.relay.store.audit_seq
            assert len((await _fetch(h, 5)).one_time) == 3
            again = await _fetch(h, 5)
            assert (again.signed, again.one_time) == (signed, [])
            assert h.relay.store.prekey_status("tokyo", now=NOW)[1] == 17
            entries = [e for e, _, _ in h.relay.store.audit_entries(before, limit=10)]
            assert [(e.event, e.reason, e.parties) for e in entries] == [
                (AuditEvent.REFUSED, Reason.RATE_LIMITED.value, ("seoul", "tokyo"))
            ]
            clock.now = NOW + PREKEY_RATE_WINDOW
            assert len((await _fetch(h, 2)).one_time) == 2


async def test_a_handout_of_several_below_low_water_tells_the_owner(
    store_at: str | Path,
) -> None:
    world = make_world()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            await _publish(h, world, 4)
            tokyo = await h.connect("tokyo")
            assert len((await _fetch(h, 3)).one_time) == 3
            # One left (< prekey_low_water, 2): one status, pushed unasked.
            assert (await expect(tokyo, PrekeyStatus)).one_time == 1


async def test_a_refused_fetch_of_several_is_refused_once(store_at: str | Path) -> None:
    world = make_world()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            await _publish(h, world, 4)
            tokyo = await h.connect("tokyo")
            await tokyo.send(FetchPrekeys(ref=b"q" * 16, member="tokyo", count=4))
            refusal = await expect(tokyo, Refusal)
            assert (refusal.ref, refusal.reason) == (b"q" * 16, Reason.WRONG_RECIPIENT.value)
            assert h.relay.store.prekey_status("tokyo", now=NOW)[1] == 4


def test_an_answer_of_several_is_cut_into_bundles_the_pool_takes() -> None:
    world = make_world()
    signed = world.signed_prekey("tokyo")
    one_time = [world.prekey("tokyo") for _ in range(3)]
    answer = Prekeys(ref=b"r" * 16, member="tokyo", signed=signed, one_time=one_time)
    # Asked for five, handed three: three full bundles, then two with the signed prekey
    # alone (which the pool takes as "dry": no refills until a direct fetch brings one).
    bundles = bundles_of(answer, 5)
    assert [b.one_time for b in bundles] == [[o] for o in one_time] + [[], []]  # type: ignore[attr-defined]
    assert all(b.signed == signed for b in bundles)  # type: ignore[attr-defined]
    pool = PrekeyPool(size=8, recipients=4, margin=120)
    pool.fetched("tokyo", bundles[0], now=NOW)
    asks = pool.asks(5)
    assert asks == ["tokyo"] * 5
    pool.answered(asks, bundles, now=NOW)
    assert pool.held("tokyo") == 3 and not pool.wants()
    taken = pool.take("tokyo", now=NOW)
    assert taken is not None and Prekey.decode(taken.one_time[0]).key == (  # type: ignore[attr-defined]
        Prekey.decode(one_time[0]).key
    )
    # A refusal stands for every bundle asked.
    refusal = Refusal(ref=b"r" * 16, reason=Reason.WRONG_ROLE.value)
    assert bundles_of(refusal, 3) == [refusal] * 3
