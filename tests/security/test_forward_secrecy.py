"""Forward secrecy, end to end: real member nodes and the real relay (through
:mod:`tisa_testing.relay`, recording or misbehaving around prekeys).

The proof: record everything the relay stores and forwards; once the recipient has
opened the report and deleted the prekey secrets, its long-term secrets plus that record
open nothing. The same record with the prekey secrets kept does open the report, so
what protects it is the deletion.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import trio

from clients.events import Event, PrekeysLow, RefusedEvent, WeakerWrap
from clients.node import Node
from tisa.errors import Reason, Refused, VerificationError
from tisa.limits import Limits
from tisa.messages import Deliver, FetchPrekeys, Message, Prekeys, PublishPrekeys, Release
from tisa.prekeys import PrekeyKind, PrekeySecret, WrapMode
from tisa.token import ReleaseToken, check_for_recipient
from tisa_io.link import connect_member
from tisa_testing import hostile
from tisa_testing import relay as hr
from tisa_testing.secrecy import held_prekey_secrets, open_record, used_one_time_prekeys
from tisa_testing.world import LEVEL, SCOPE, World, make_world

TIMEOUT = 15
BODY = b"launch detected at 04:00; trajectory toward the Sea of Japan"
# A recipient never seen by the relay is waited for this long, not the default 30 s.
LIMITS = Limits(prekey_wait=0.5)


async def network(
    nursery: trio.Nursery, tmp: pathlib.Path, behaviour: hr.Behaviour, world: World
) -> tuple[hr.HostileRelay, Callable[[str], Any]]:
    relay, port = await hr.start_hostile_relay(
        nursery, world, tmp / "washington", behaviour, limits=LIMITS
    )

    def node(name: str) -> Any:
        return hr.open_member(world, name, port, tmp / name, limits=LIMITS)

    return relay, node


async def until_published(relay: hr.HostileRelay, name: str = "tokyo") -> None:
    while relay.store.prekey_status(name, now=relay.now())[1] == 0:
        await trio.sleep(0.02)


async def next_event(node: Node, kind: type[Event]) -> Any:
    async for event in node.events():
        if isinstance(event, kind):
            return event
    raise AssertionError("unreachable")


def prekey_rows(root: pathlib.Path) -> dict[bytes, PrekeySecret]:
    """Every prekey secret in a member's store, read from its database file."""
    return {p.public: p for p in held_prekey_secrets(root)}


def every_token(record: hr.Record, relay: hr.HostileRelay) -> list[bytes]:
    tokens = [item.token for _, item in record.sent if isinstance(item, hr.Delivery)]
    tokens += [m.token for d, _, m in relay.log if d == "received" and isinstance(m, Release)]
    return tokens


def try_open(
    world: World,
    token: bytes,
    ciphertexts: list[bytes],
    prekeys: dict[bytes, PrekeySecret],
) -> bytes | None:
    """What Tokyo's long-term keys and ``prekeys`` make of ``token``: the body of the
    recorded report it opens, or None (:func:`tisa_testing.secrecy.open_record`, every
    held prekey secret tried in every place)."""
    try:
        opened = open_record(
            token, ciphertexts, world.arrangement, world.secrets["tokyo"], "tokyo", prekeys.values()
        )
    except VerificationError:
        return None
    return opened.body


async def test_the_record_and_the_long_term_keys_open_nothing_after_deletion(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_world()
    record = hr.Record()
    with trio.fail_after(TIMEOUT):
        relay, node = await network(nursery, tmp_path, record, world)
        async with node("tokyo") as tokyo:
            await until_published(relay)
            # Everything Tokyo holds before the report comes, to show below that the
            # record is complete: with these secrets it opens the report.
            before = prekey_rows(tmp_path / "tokyo")
            async with node("seoul") as seoul:
                report_id = await seoul.submit(
                    BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
                )
                async for delivered in tokyo.reports():
                    assert delivered.report_id == report_id
                    assert delivered.body == BODY
                    token = ReleaseToken.decode(
                        next(item.token for _, item in record.sent if isinstance(item, hr.Delivery))
                    )
                    assert token.wrap.mode is WrapMode.ONE_TIME and token.wrap.opk
                    # Deleted before the application got the report.
                    with pytest.raises(Refused) as info:
                        tokyo.store.prekey_secret(PrekeyKind.ONE_TIME, token.wrap.opk)
                    assert info.value.reason is Reason.REPLAYED
                    break
            # Time passes beyond the signed prekey's life and grace: Tokyo rotates
            # and deletes the old secret (and every unused one-time secret as old).
            limits = Limits()
            world.now += 2 * limits.signed_prekey_rotation + limits.signed_prekey_grace + 1
            await tokyo.maintain_prekeys()
            with pytest.raises(Refused):
                tokyo.store.prekey_secret(PrekeyKind.SIGNED, token.wrap.spk or b"")
        after = prekey_rows(tmp_path / "tokyo")
    assert token.wrap.spk not in after and token.wrap.opk not in after
    assert token.wrap.opk in used_one_time_prekeys(tmp_path / "tokyo")  # kept as used

    tokens = every_token(record, relay)
    assert tokens and token.encoded in tokens
    ciphertexts = [item.ciphertext for _, item in record.sent if isinstance(item, hr.Delivery)]
    stored = b"".join(p.read_bytes() for p in (tmp_path / "washington").rglob("*") if p.is_file())
    # The relay's own files hold the ciphertext and the token too (the record is a superset).
    # The report's plaintext and content key appear nowhere in what the relay had.
    release_before = try_open(world, token.encoded, ciphertexts, before)
    assert release_before == BODY  # the record suffices, given the prekey secrets
    key = check_for_recipient(
        token.encoded,
        world.arrangement,
        world.secrets["tokyo"],
        "tokyo",
        now=token.not_before,
        prekey_secret=lambda kind, public: before[public].secret,
    ).content_key
    everything = stored + b"".join(
        item.ciphertext + item.token if isinstance(item, hr.Delivery) else _encoded(item)
        for _, item in record.sent
    )
    assert BODY not in everything and key not in everything
    # After deletion: Tokyo's long-term secret and whatever prekey secrets it still
    # holds open none of the recorded tokens.
    for recorded in tokens:
        assert try_open(world, recorded, ciphertexts, after) is None
    # Nor does the long-term key alone.
    for recorded in tokens:
        assert try_open(world, recorded, ciphertexts, {}) is None
    # And the deleted secrets left no copy in Tokyo's store files (secure_delete, and
    # the WAL checkpointed when the node closed).
    files = b"".join(p.read_bytes() for p in (tmp_path / "tokyo").rglob("*") if p.is_file())
    for public in (token.wrap.spk, token.wrap.opk):
        assert public is not None and before[public].secret not in files


def _encoded(message: Message) -> bytes:
    from tisa.messages import encode_message

    return encode_message(message)


async def test_exhausted_one_time_supply_falls_back_to_the_signed_prekey(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_world()
    with trio.fail_after(TIMEOUT):
        relay, node = await network(nursery, tmp_path, hr.WithholdPrekeys(), world)
        async with node("tokyo") as tokyo, node("seoul") as seoul:
            await until_published(relay)
            await seoul.submit(
                BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            weaker = await next_event(seoul, WeakerWrap)
            assert (weaker.recipient, weaker.mode) == ("tokyo", "signed")
            async for delivered in tokyo.reports():
                assert delivered.body == BODY
                break


async def test_withheld_signed_prekey_refuses_the_release(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_world()
    behaviour = hr.WithholdPrekeys(signed=True)
    with trio.fail_after(TIMEOUT):
        relay, node = await network(nursery, tmp_path, behaviour, world)
        async with node("tokyo"), node("seoul") as seoul:
            await until_published(relay)
            report_id = await seoul.submit(BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            with pytest.raises(Refused) as info:
                await seoul.release(report_id, "tokyo")
            assert info.value.reason is Reason.NO_PREKEY
            event = await next_event(seoul, RefusedEvent)
            assert event.reason is Reason.NO_PREKEY and event.ref == report_id
            assert behaviour.withheld >= 1
            assert seoul.store.releases_of(report_id) == []  # no token was issued


async def test_identity_fallback_only_where_the_arrangement_allows_it(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_world(identity_fallback=True)
    with trio.fail_after(TIMEOUT):
        _relay, node = await network(nursery, tmp_path, hr.WithholdPrekeys(signed=True), world)
        async with node("tokyo") as tokyo, node("seoul") as seoul:
            await seoul.submit(
                BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            weaker = await next_event(seoul, WeakerWrap)
            assert weaker.mode == "identity"  # said so, to the application
            async for delivered in tokyo.reports():
                assert delivered.body == BODY
                break


@pytest.mark.parametrize("mode", ["forge", "other"])
async def test_substituted_prekey_is_refused(
    nursery: trio.Nursery, tmp_path: pathlib.Path, mode: str
) -> None:
    world = make_world()
    with trio.fail_after(TIMEOUT):
        relay, node = await network(nursery, tmp_path, hr.SubstitutePrekeys(mode), world)
        async with node("tokyo"), node("seoul") as seoul:
            await until_published(relay)
            await until_published(relay, "seoul")
            report_id = await seoul.submit(BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            with pytest.raises(Refused) as info:
                await seoul.release(report_id, "tokyo")
            assert info.value.reason is Reason.BAD_PREKEY
            assert seoul.store.releases_of(report_id) == []


async def test_a_replayed_one_time_prekey_is_refused(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_world()
    with trio.fail_after(TIMEOUT):
        relay, node = await network(nursery, tmp_path, hr.ReplayPrekeys(), world)
        async with node("tokyo") as tokyo, node("seoul") as seoul:
            await until_published(relay)
            first = await seoul.submit(BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            await seoul.release(first, "tokyo")
            second = await seoul.submit(b"second", recipients=["tokyo"], scope=SCOPE, level=LEVEL)
            # The relay hands the used one-time prekey out again: the relay's own
            # record of it refuses the token that names it a second time.
            with pytest.raises(Refused) as info:
                await seoul.release(second, "tokyo")
            assert info.value.reason is Reason.BAD_PREKEY
            async for delivered in tokyo.reports():
                assert delivered.report_id == first
                break


async def test_a_recipient_refuses_a_token_naming_a_used_one_time_prekey(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    # A relay that skipped its own check (or lost its record) delivers a second report
    # under a fresh token naming a one-time prekey Tokyo already used: Tokyo refuses it.
    world = make_world()
    record = hr.Record()
    with trio.fail_after(TIMEOUT):
        relay, node = await network(nursery, tmp_path, record, world)
        async with node("tokyo") as tokyo, node("seoul") as seoul:
            await until_published(relay)
            first = await seoul.submit(
                BODY, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            async for delivered in tokyo.reports():
                assert delivered.report_id == first
                break
            used = next(
                ReleaseToken.decode(item.token).wrap.opk
                for _, item in record.sent
                if isinstance(item, hr.Delivery)
            )
            assert used is not None
            report = world.seal(b"second", originator="seoul", recipients=["tokyo"])
            signed = next(
                m.signed for _, m in record.sent if isinstance(m, Prekeys) and m.signed is not None
            )
            token = hostile.forge_token(
                world.secrets["seoul"],
                world.arrangement,
                recipient="tokyo",
                report_id=report.report_id,
                digest_=report.digest,
                size=report.size,
                content_key=report.content_key,
                scope=SCOPE,
                level=LEVEL,
                not_before=world.now - 10,
                not_after=world.now + 60,
                originator="seoul",
                counter=2,
                signed_prekey=hostile_key(signed),
                one_time_prekey=used,
            )
            await relay.send_to("tokyo", hr.Delivery.of(token, report.ciphertext))
            event = await next_event(tokyo, hr_rejected())
            assert isinstance(event.error, Refused)
            assert event.error.reason is Reason.REPLAYED


def hostile_key(prekey: bytes) -> bytes:
    from tisa.prekeys import Prekey

    return Prekey.decode(prekey).key


def hr_rejected() -> type[Event]:
    from clients.events import DeliveryRejected

    return DeliveryRejected


async def test_a_node_publishes_and_tops_up_its_prekeys(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    world = make_world()
    small = Limits(prekey_wait=0.5, one_time_prekeys=6, prekey_low_water=3)
    record = hr.Record()
    with trio.fail_after(TIMEOUT):
        relay, port = await hr.start_hostile_relay(
            nursery, world, tmp_path / "washington", record, limits=small
        )
        async with hr.open_member(world, "tokyo", port, tmp_path / "tokyo", limits=small) as tokyo:
            while relay.store.prekey_status("tokyo", now=world.now)[1] < 6:
                await trio.sleep(0.02)
            # Seoul fetches four: 2 left (< 3), so the relay tells Tokyo at once, and
            # Tokyo tops its supply up to 6 again.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            seoul = await connect_member(stream, world.secrets["seoul"], "seoul", world.arrangement)
            async with seoul:
                for i in range(4):
                    await seoul.send(FetchPrekeys(ref=bytes([i]) * 16, member="tokyo"))
                    answer = await seoul.receive()
                    assert isinstance(answer, Prekeys) and len(answer.one_time) == 1
            # (None at the first connection: nothing published yet is not "low".)
            low = await next_event(tokyo, PrekeysLow)
            assert low.one_time == 2
            while relay.store.prekey_status("tokyo", now=world.now)[1] < 6:
                await trio.sleep(0.02)
    publishes = [m for d, _, m in relay.log if d == "received" and isinstance(m, PublishPrekeys)]
    assert sum(len(p.one_time) for p in publishes) == 6 + 4
    assert not any(isinstance(m, Deliver) for _, m in record.sent)


# --- tisa_testing.secrecy on its own (no network) ---------------------------------------


def test_open_record_needs_the_one_time_secret_in_either_search() -> None:
    world = make_world()
    report = world.seal(BODY)
    token = world.token(report, one_time_prekey=world.prekey("tokyo"))
    held = list(world.prekey_secrets["tokyo"].values())
    decoy = PrekeySecret.generate(PrekeyKind.ONE_TIME, created=world.now, not_after=world.now + 9)
    for every_place in (True, False):
        opened = open_record(
            token,
            [b"not this one", report.ciphertext],
            world.arrangement,
            world.secrets["tokyo"],
            "tokyo",
            [decoy, *held],
            every_place=every_place,
        )
        assert opened.body == BODY and opened.header.originator == "seoul"
        # The one-time secret gone (the signed one and a decoy kept): nothing opens.
        kept = [decoy, *(p for p in held if p.kind is PrekeyKind.SIGNED)]
        with pytest.raises(VerificationError):
            open_record(
                token,
                [report.ciphertext],
                world.arrangement,
                world.secrets["tokyo"],
                "tokyo",
                kept,
                every_place=every_place,
            )
    # The key unwraps but the recorded ciphertext is another report's: nothing opens.
    other = world.seal(b"another report")
    with pytest.raises(VerificationError):
        open_record(
            token, [other.ciphertext], world.arrangement, world.secrets["tokyo"], "tokyo", held
        )
    # And a token for someone else is refused before any key is tried.
    with pytest.raises(Refused) as info:
        open_record(
            token, [report.ciphertext], world.arrangement, world.secrets["seoul"], "seoul", held
        )
    assert info.value.reason is Reason.WRONG_RECIPIENT


def test_held_prekey_secrets_of_a_missing_store_is_an_os_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(OSError, match="no member store"):
        held_prekey_secrets(tmp_path / "nowhere")
    (tmp_path / "member.db").write_bytes(b"not a database, but 32 bytes long")
    with pytest.raises(OSError, match="cannot read"):
        held_prekey_secrets(tmp_path)
