"""Node.withdraw, resume and drop against the real relay (in-process): a submission taken
back before the relay stored it never reaches it; one whose last byte went out is waited
for; one cut off mid-upload is discarded by the relay."""

from __future__ import annotations

import pathlib

import trio
from nodes.client_world import LEVEL, SCOPE
from test_three_nodes import World, world

from clients.node import Node
from tisa.audit import AuditEvent

__all__ = ["world"]  # the fixture, imported to be used here


async def stored_by_relay(node: Node) -> set[bytes]:
    return {e.report for e in await node.fetch_audit() if e.event is AuditEvent.STORED}


async def test_withdraw_after_the_last_byte_waits_for_the_relays_answer(world: World) -> None:
    with trio.fail_after(20):
        await world.published("tokyo")
        async with world.node("seoul") as seoul:
            await seoul.wait_connected()
            report = await seoul.submit(
                b"gone out", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            while report not in seoul._uploaded:  # the whole submission went out
                await trio.sleep(0)
            assert await seoul.withdraw(report) == "stored"
            assert seoul.store.submission(report).state == "stored"  # type: ignore[union-attr]
            assert report in await stored_by_relay(seoul)


async def test_withdraw_mid_upload_cuts_it_off_and_resume_sends_it(
    world: World, tmp_path: pathlib.Path
) -> None:
    body = tmp_path / "large.bin"
    body.write_bytes(b"\x00" * (32 * 1024 * 1024))
    with trio.fail_after(60):
        await world.published("tokyo")
        async with world.node("seoul") as seoul:
            await seoul.wait_connected()
            report = await seoul.submit(
                body, recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            while report not in seoul._uploading:
                await trio.sleep(0)
            # The sender is suspended in the middle of the 512 chunks: withdrawn at once.
            assert await seoul.withdraw(report) == "withdrawn"
            await seoul.wait_connected()  # a new connection: nothing of it is resent
            assert report not in await stored_by_relay(seoul)
            assert [s.report for s in seoul.store.unsent_submissions()] == [report]

            await seoul.resume(report)
            ack = await seoul.wait_stored(report)
            assert ack.report == report
        async with world.node("tokyo") as tokyo:
            async for delivered in tokyo.reports():
                assert delivered.header.id == report
                break


async def test_drop_deletes_a_withdrawn_submission(world: World) -> None:
    with trio.fail_after(20):
        assert world.relay_scope is not None
        world.relay_scope.cancel()  # the relay is down: nothing can go out
        await trio.sleep(0.1)
        async with world.node("seoul") as seoul:
            report = await seoul.submit(
                b"never", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            assert await seoul.withdraw(report) == "withdrawn"
            await world.start_relay(world.port)
            await seoul.wait_connected()
            assert report not in await stored_by_relay(seoul)  # withdrawn: not sent
            await seoul.drop(report)
            assert seoul.store.unsent_submissions() == []
            assert seoul.store.submission(report).state == "dropped"  # type: ignore[union-attr]
            # Offline, the release never became a token (no prekeys fetched): it ends with
            # the dropped submission, and nothing waits any more.
            assert seoul.store.releases_of(report) == [] and seoul.store.waiting_releases() == []
