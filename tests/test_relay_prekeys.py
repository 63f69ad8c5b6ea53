"""The relay's prekey service: publish, status, one-time handout (atomic, durable, once),
the low-supply notice, and the checks of tokens that name one-time prekeys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from nodes.relay_harness import (
    Harness,
    expect,
    receive_delivery,
    running_relay,
    send_submission,
)
from nodes.relay_helpers import NOW, FakeClock, World, make_world, seal, token_for

import tisa_io.durable
from relay.prekeystore import PREKEY_RATE_WINDOW
from tisa import encoding as enc
from tisa.audit import AuditEvent
from tisa.errors import Reason
from tisa.keys import Context
from tisa.limits import Limits
from tisa.messages import (
    Ack,
    FetchPrekeys,
    Prekeys,
    PrekeyStatus,
    PublishPrekeys,
    Refusal,
    Release,
    Released,
    Stored,
)
from tisa.prekeys import Prekey, PrekeyKind, PrekeySecret
from tisa.token import ReleaseToken

LIMITS = Limits(handshake_timeout=5, frame_timeout=5, prekey_low_water=2, max_one_time_prekeys=5)


@pytest.fixture
def world() -> World:
    return make_world()


async def publish(h: Harness, name: str, signed: bytes | None, one_time: list[bytes]) -> object:
    link = await h.connect(name)
    await link.send(PublishPrekeys(signed=signed, one_time=one_time))
    reply = await link.receive()
    await link.aclose()
    return reply


async def fetch(h: Harness, member: str = "tokyo", by: str = "seoul") -> Prekeys | Refusal:
    link = await h.connect(by)
    await link.send(FetchPrekeys(ref=b"r" * 16, member=member))
    reply = await link.receive()
    await link.aclose()
    assert isinstance(reply, Prekeys | Refusal), reply
    return reply


async def test_publish_then_hand_out_each_one_time_prekey_once(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            signed = world.signed_prekey("tokyo")
            one_time = [world.prekey("tokyo") for _ in range(3)]
            status = await publish(h, "tokyo", signed, one_time)
            assert status == PrekeyStatus(
                signed_not_after=Prekey.decode(signed).not_after, one_time=3
            )
            # An empty publish only asks for the status.
            assert await publish(h, "tokyo", None, []) == status
            handed = []
            for _ in range(3):
                reply = await fetch(h)
                assert isinstance(reply, Prekeys)
                assert reply.signed == signed and len(reply.one_time) == 1
                handed.append(reply.one_time[0])
            assert sorted(handed) == sorted(one_time)  # each once, none twice
            # Exhausted: the signed prekey alone (the originator falls back and says so).
            reply = await fetch(h)
            assert isinstance(reply, Prekeys) and (reply.signed, reply.one_time) == (signed, [])
            # Publishing the same prekey again stores nothing twice.
            again = await publish(h, "tokyo", signed, one_time[:1])
            assert again == PrekeyStatus(signed_not_after=status.signed_not_after, one_time=0)


async def test_a_handout_survives_a_restart_and_is_not_repeated(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            await publish(h, "tokyo", world.signed_prekey("tokyo"), [world.prekey("tokyo")])
            first = await fetch(h)
            assert isinstance(first, Prekeys) and len(first.one_time) == 1
            await h.restart()
            second = await fetch(h)
            assert isinstance(second, Prekeys) and second.one_time == []


async def test_withheld_prekeys_answer_none(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            reply = await fetch(h)
            assert isinstance(reply, Prekeys)
            assert (reply.member, reply.signed, reply.one_time) == ("tokyo", None, [])


def foreign(world: World, owner: str, signer: str, **changes: object) -> bytes:
    """A prekey body of ``owner``'s, changed, signed by ``signer``."""
    body = enc.unpack(enc.unpack(world.prekey(owner))["body"])
    body.update(changes)
    data = enc.pack(body)
    return enc.pack({"body": data, "sig": world.secrets[signer].sign(Context.PREKEY, data)})


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        # Seoul publishes a prekey of Tokyo's, or one signed by Tokyo in Seoul's name.
        (lambda w: w.prekey("tokyo"), Reason.BAD_PREKEY),
        (lambda w: foreign(w, "seoul", "tokyo"), Reason.BAD_PREKEY),
        # A signed prekey offered as a one-time one.
        (lambda w: w.prekey("seoul", PrekeyKind.SIGNED), Reason.BAD_PREKEY),
        (lambda w: foreign(w, "seoul", "seoul", not_after=NOW - 1000, created=NOW - 2000),
         Reason.EXPIRED),
        (lambda w: foreign(w, "seoul", "seoul", key=bytes(32)), Reason.MALFORMED),
    ],
)  # fmt: skip
async def test_bad_publishes_are_refused_and_store_nothing(
    world: World, store_at: str | Path, make: object, reason: Reason
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            bad = make(world)  # type: ignore[operator]
            reply = await publish(h, "seoul", None, [world.prekey("seoul"), bad])
            assert isinstance(reply, Refusal) and reply.reason == reason.value
            assert await publish(h, "seoul", None, []) == PrekeyStatus(
                signed_not_after=0, one_time=0
            )


async def test_the_one_time_supply_is_capped(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            five = [world.prekey("tokyo") for _ in range(5)]
            assert await publish(h, "tokyo", None, five) == PrekeyStatus(
                signed_not_after=0, one_time=5
            )
            reply = await publish(h, "tokyo", None, [world.prekey("tokyo")])
            assert isinstance(reply, Refusal) and reply.reason == Reason.LIMIT.value
            assert await publish(h, "tokyo", None, []) == PrekeyStatus(
                signed_not_after=0, one_time=5
            )


async def test_fetch_refusals(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            reply = await fetch(h, member="washington")
            assert isinstance(reply, Refusal) and reply.reason == Reason.WRONG_ROLE.value
            assert reply.ref == b"r" * 16
            reply = await fetch(h, member="beijing")
            assert isinstance(reply, Refusal) and reply.reason == Reason.NOT_A_MEMBER.value
            reply = await fetch(h, member="seoul", by="seoul")
            assert isinstance(reply, Refusal) and reply.reason == Reason.WRONG_RECIPIENT.value


async def test_low_supply_is_told_to_the_owner(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            tokyo = await h.connect("tokyo")
            await tokyo.send(
                PublishPrekeys(
                    signed=world.signed_prekey("tokyo"),
                    one_time=[world.prekey("tokyo") for _ in range(3)],
                )
            )
            assert (await expect(tokyo, PrekeyStatus)).one_time == 3
            await fetch(h)  # 2 left: not below the low water mark of 2
            await fetch(h)  # 1 left: Tokyo hears of it at once
            notice = await expect(tokyo, PrekeyStatus)
            assert notice.one_time == 1


async def test_one_originator_gets_at_most_max_one_time_prekeys_per_hour_of_a_recipient(
    world: World, store_at: str | Path
) -> None:
    # Past the limit a fetch is still answered, with the signed prekey only (as when the
    # supply is exhausted: the token then says it used none); the relay logs it once per
    # pair and hour (refused, rate_limited, both parties); another pair has its own
    # allowance; an hour on, one-time prekeys again.
    limits = dataclasses.replace(LIMITS, max_one_time_prekeys_per_hour=2)
    clock = FakeClock()
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits, clock=clock) as h:
            signed = world.signed_prekey("tokyo")
            await publish(h, "tokyo", signed, [world.prekey("tokyo") for _ in range(5)])
            await publish(h, "seoul", world.signed_prekey("seoul"), [world.prekey("seoul")])
            before = h.relay.store.audit_seq
            answers = [await fetch(h) for _ in range(4)]
            assert all(isinstance(a, Prekeys) and a.signed == signed for a in answers)
            handed = [a.one_time for a in answers]  # type: ignore[union-attr]
            assert [len(h) for h in handed] == [1, 1, 0, 0]
            assert h.relay.store.prekey_status("tokyo", now=NOW)[1] == 3  # none taken past it
            other = await fetch(h, member="seoul", by="tokyo")
            assert isinstance(other, Prekeys) and len(other.one_time) == 1
            entries = [e for e, _, _ in h.relay.store.audit_entries(before, limit=10)]
            assert [(e.event, e.reason, e.parties) for e in entries] == [
                (AuditEvent.REFUSED, Reason.RATE_LIMITED.value, ("seoul", "tokyo"))
            ]
            clock.now = NOW + PREKEY_RATE_WINDOW
            later = await fetch(h)
            assert isinstance(later, Prekeys) and len(later.one_time) == 1


async def submitted(h: Harness, world: World) -> object:
    seoul = await h.connect("seoul")
    report = seal(world)
    await send_submission(seoul, report)
    await expect(seoul, Stored)
    await seoul.aclose()
    return report


async def release(h: Harness, token: bytes, by: str = "seoul") -> Released | Refusal:
    link = await h.connect(by)
    await link.send(Release(token=token))
    reply = await link.receive()
    await link.aclose()
    assert isinstance(reply, Released | Refusal), reply
    return reply


async def test_tokens_naming_one_time_prekeys(world: World, store_at: str | Path) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            signed = world.signed_prekey("tokyo")
            kept = world.prekey("tokyo")  # published to nobody
            await publish(h, "tokyo", signed, [world.prekey("tokyo")])
            handed = await fetch(h)
            assert isinstance(handed, Prekeys) and len(handed.one_time) == 1
            report = await submitted(h, world)
            # A one-time prekey the relay never handed out (a replayed or made-up one).
            stray = token_for(world, report, one_time_prekey=kept)  # type: ignore[arg-type]
            reply = await release(h, stray)
            assert isinstance(reply, Refusal) and reply.reason == Reason.UNKNOWN_PREKEY.value
            # The one handed to Seoul: accepted once; a second token naming it is a replay.
            first = token_for(world, report, one_time_prekey=handed.one_time[0])  # type: ignore[arg-type]
            assert isinstance(await release(h, first), Released)
            second = token_for(
                world,
                report,  # type: ignore[arg-type]
                one_time_prekey=handed.one_time[0],
                counter=2,
            )
            reply = await release(h, second)
            assert isinstance(reply, Refusal) and reply.reason == Reason.BAD_PREKEY.value


async def test_a_one_time_prekey_of_another_member_is_refused(
    world: World, store_at: str | Path
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=LIMITS) as h:
            await publish(h, "seoul", world.signed_prekey("seoul"), [world.prekey("seoul")])
            # Tokyo was handed Seoul's one-time prekey; Seoul names it in a token to Tokyo.
            handed = await fetch(h, member="seoul", by="tokyo")
            assert isinstance(handed, Prekeys) and len(handed.one_time) == 1
            report = await submitted(h, world)
            body = enc.unpack(enc.unpack(token_for(world, report))["body"])  # type: ignore[arg-type]
            body["wrap"]["mode"] = "one_time"
            body["wrap"]["opk"] = Prekey.decode(handed.one_time[0]).key
            data = enc.pack(body)
            token = enc.pack(
                {"body": data, "sig": world.secrets["seoul"].sign(Context.TOKEN, data)}
            )
            reply = await release(h, token)
            assert isinstance(reply, Refusal) and reply.reason == Reason.UNKNOWN_PREKEY.value


def test_prekey_secret_is_never_in_the_relay_store(world: World, tmp_path: Path) -> None:
    # Only the public halves ever reach the relay: the secret bytes appear nowhere.
    secret = PrekeySecret.generate(PrekeyKind.SIGNED, created=NOW - 1, not_after=NOW + 60)
    published = secret.publish(world.secrets["tokyo"], "tokyo", world.arrangement)
    assert secret.secret not in published and secret.public in published


@pytest.mark.parametrize("version", [4, 5, 6])  # 5: with the consent tables; 6: prekeys
def test_a_version_4_to_6_store_gains_the_prekey_tables(tmp_path: Path, version: int) -> None:
    import sqlite3

    from relay.store import SCHEMA_VERSION, Store

    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "relay.db")
    db.execute("DROP TABLE prekey_rate")
    if version < 6:
        db.execute("DROP TABLE prekeys")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()
    store = Store(tmp_path)
    try:
        assert store.prekey_status("tokyo", now=NOW) == (0, 0)
        assert store.take_prekeys("tokyo", taker="seoul", now=NOW, max_per_hour=1) == (
            None,
            None,
            0,
        )
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "relay.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 10
    db.close()


def test_a_handout_and_its_use_read_only_through_indexes(world: World, tmp_path: Path) -> None:
    # Every statement of a fetch (the allowance check, the handout, the supply left) and
    # of a token's use of its one-time prekey searches an index: none scans a table
    # that grows with every prekey ever handed out (the supply's count reads at most
    # count_to entries).
    from relay.store import Store

    store = Store(tmp_path)
    try:
        prekeys = [Prekey.decode(world.prekey("tokyo")) for _ in range(3)]
        signed = Prekey.decode(world.signed_prekey("tokyo"))
        store.publish_prekeys("tokyo", signed, prekeys, max_one_time=10)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        _, one_time, left = store.take_prekeys(
            "tokyo", taker="seoul", now=NOW, max_per_hour=5, count_to=2
        )
        assert one_time is not None and left == 2  # take_prekeys: one bundle
        report = seal(world)
        token = ReleaseToken.decode(token_for(world, report, one_time_prekey=one_time))
        store._use_one_time_prekey(token)
        store._db.set_trace_callback(None)
        plans = {
            sql: [row[3] for row in store._db.execute("EXPLAIN QUERY PLAN " + sql)]
            for sql in statements
            if sql.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT"))
        }
        assert len(plans) == 6, plans  # signed, allowance, handout, count, supply, use
        for sql, plan in plans.items():
            scans = [
                line
                for line in plan
                if line.startswith("SCAN") and "INDEX" not in line and line != "SCAN supply"
            ]
            assert not scans and "USE TEMP B-TREE FOR ORDER BY" not in plan, (sql, plan)
    finally:
        store.close()


async def test_a_low_supply_status_overtakes_the_next_deliveries_counted_when_sent(
    world: World, store_at: str | Path
) -> None:
    # Tokyo takes one delivery at a time (delivery_window 1) on a link whose writes wait
    # for its reads (lockstep, as a full TCP window): its first delivery is being written
    # when a burst of handouts drains its supply below the low water mark of 2.
    limits = dataclasses.replace(LIMITS, delivery_window=1)
    with trio.fail_after(10):
        async with running_relay(world, store_at, limits=limits) as h:
            tokyo = await h.connect("tokyo", lockstep=True)
            one_time = [world.prekey("tokyo") for _ in range(3)]
            await tokyo.send(PublishPrekeys(signed=world.signed_prekey("tokyo"), one_time=one_time))
            assert (await expect(tokyo, PrekeyStatus)).one_time == 3
            report = await submitted(h, world)
            for counter in (1, 2):
                granted = await release(h, token_for(world, report, counter=counter))
                assert isinstance(granted, Released)
            while not any(conn.in_flight for conn in h.relay._connections.get("tokyo", ())):
                await trio.sleep(0.01)  # the first delivery is claimed and being written
            for _ in range(3):
                assert isinstance(await fetch(h), Prekeys)  # 2, 1, 0 left
            first, _ = await receive_delivery(tokyo)
            # One status, counted when it went out (0 left), not one per handout (1, 0),
            # and ahead of the delivery pushed next.
            assert await expect(tokyo, PrekeyStatus) == PrekeyStatus(
                signed_not_after=Prekey.decode(world.signed_prekey("tokyo")).not_after,
                one_time=0,
            )
            await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(first).id))
            second, _ = await receive_delivery(tokyo)  # no status before it: none is due
            assert second != first
            # A handout below the mark with a delivery waiting: the status goes first.
            await tokyo.send(
                PublishPrekeys(signed=None, one_time=[world.prekey("tokyo") for _ in range(2)])
            )
            assert (await expect(tokyo, PrekeyStatus)).one_time == 2
            third = token_for(world, report, counter=3)
            assert isinstance(await release(h, third), Released)  # waits for the second's ack
            assert isinstance(await fetch(h), Prekeys)  # 1 left
            await tokyo.send(Ack(kind="delivery", token=ReleaseToken.decode(second).id))
            assert (await expect(tokyo, PrekeyStatus)).one_time == 1
            assert (await receive_delivery(tokyo))[0] == third


async def test_a_prekeys_answer_is_lazy_an_answer_queued_behind_it_commits(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The answer to a fetch (an originator's pool refill) forces no commit of its own;
    # an answer that does (a status) queued behind it is not held back by it: one commit
    # for both, long before the background commit (an hour here) would take them.
    monkeypatch.setattr(tisa_io.durable, "BACKGROUND_COMMIT_DELAY", 3600.0)
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            signed = world.signed_prekey("tokyo")
            await publish(h, "tokyo", signed, [world.prekey("tokyo") for _ in range(3)])
            committer = h.relay._group_commit
            link = await h.connect("seoul")
            commits = committer.commits
            await link.send(FetchPrekeys(ref=b"r" * 16, member="tokyo"))
            while not h.relay._connections.get("seoul"):
                await trio.sleep(0.01)
            (conn,) = h.relay._connections["seoul"]
            # The handout is in the open batch; the replier waits for it without a commit.
            while conn.lazy_wake is None:
                await trio.sleep(0.01)
            assert committer.commits == commits
            assert h.relay.store.committed < h.relay.store.barrier
            await link.send(PublishPrekeys(signed=None, one_time=[]))
            reply = await expect(link, Prekeys)
            assert len(reply.one_time) == 1
            await expect(link, PrekeyStatus)
            assert committer.commits == commits + 1
            await link.aclose()


async def test_a_lone_prekeys_answer_goes_out_with_the_background_commit(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(10):
        async with running_relay(world, tmp_path, limits=LIMITS) as h:
            signed = world.signed_prekey("tokyo")
            await publish(h, "tokyo", signed, [world.prekey("tokyo") for _ in range(3)])
            committer = h.relay._group_commit
            durable = committer.durable
            waiters: list[str] = []

            async def recording(barrier: int) -> None:
                waiters.append(trio.lowlevel.current_task().name)
                await durable(barrier)

            monkeypatch.setattr(committer, "durable", recording)
            commits = committer.commits
            reply = await fetch(h)
            assert isinstance(reply, Prekeys) and len(reply.one_time) == 1
            # Its batch was on disk when it went out, committed by the background pass,
            # the only one that waited on a commit.
            assert waiters and all("run_background_commits" in name for name in waiters)
            assert committer.commits == commits + 1
            assert h.relay.store.committed == h.relay.store.written
