"""The pytest plugin's fixtures, used as another client's suite would use them, and the
isolation rules of tisa_testing."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import trio

from tisa_testing.plugin import HostileRelayFactory, NodeFactory
from tisa_testing.relay import SwapRecipients
from tisa_testing.world import LEVEL, SCOPE, World

ROOT = pathlib.Path(__file__).resolve().parents[2]


async def test_three_nodes_in_a_few_lines(tisa_relay: int, tisa_node: NodeFactory) -> None:
    with trio.fail_after(10):
        async with tisa_node("seoul") as seoul, tisa_node("tokyo") as tokyo:
            await seoul.submit(
                b"through the plugin",
                recipients=["tokyo"],
                scope=SCOPE,
                level=LEVEL,
                release_to=["tokyo"],
            )
            async for report in tokyo.reports():
                assert report.read_body() == b"through the plugin"
                break


async def test_hostile_relay_in_a_few_lines(
    tisa_world: World, hostile_relay: HostileRelayFactory, tisa_node: NodeFactory
) -> None:
    from clients.events import DeliveryRejected

    with trio.fail_after(10):
        await hostile_relay(SwapRecipients({"tokyo": "canberra"}))
        async with (
            tisa_node("seoul") as seoul,
            tisa_node("tokyo"),  # the relay pushes Tokyo's deliveries when it connects
            tisa_node("canberra") as canberra,
        ):
            await seoul.submit(
                b"x", recipients=["tokyo"], scope=SCOPE, level=LEVEL, release_to=["tokyo"]
            )
            async for event in canberra.events():
                if isinstance(event, DeliveryRejected):
                    break
        assert hostile_relay.relay.log


def test_tisa_trio_fixture(tisa_world: World, tisa_trio: tuple[object, dict[str, object]]) -> None:
    arrangement, secrets = tisa_trio
    assert arrangement is tisa_world.arrangement
    assert set(secrets) == {"seoul", "tokyo", "washington", "canberra"}


def test_the_plugin_is_registered() -> None:
    from importlib.metadata import entry_points

    names = {e.name: e.value for e in entry_points(group="pytest11")}
    assert names.get("tisa") == "tisa_testing.plugin"


def test_no_core_module_imports_tisa_testing() -> None:
    for path in (ROOT / "tisa").glob("*.py"):
        text = path.read_text()
        assert "tisa_testing" not in text and "from tisa import testing" not in text, path


def test_core_and_hostile_tools_import_no_io() -> None:
    # tisa_testing itself and its core-level tools stay free of trio, so a client on
    # another event loop can use the hostile member tools and the fuzz targets.
    code = (
        "import sys, tisa_testing, tisa_testing.hostile, tisa_testing.model,"
        " tisa_testing.world, tisa_testing.fuzzing;"
        "print(sorted({'trio', 'socket', 'asyncio', 'relay', 'clients'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert result.stdout.strip() == b"[]"
