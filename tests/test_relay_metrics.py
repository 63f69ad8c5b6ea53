"""The relay's metrics and health check (issue 13, observability): what they count, what
they never show, and the endpoint's limits, each crossed."""

from __future__ import annotations

import functools
import pathlib
import re
from collections.abc import AsyncIterator

import pytest
import trio
from nodes.client_world import LEVEL, SCOPE, make_world

from clients.node import open_node
from relay.cli import parse_metrics_address
from relay.metrics import MetricsLimits, RelayMetrics, serve_metrics
from relay.server import Relay
from tisa.errors import Reason, Refused

ARRANGEMENT, SECRETS = make_world()


async def http(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` raw; the status code and the body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def get(port: int, path: str) -> tuple[int, bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def value(text: bytes, name: str, **labels: str) -> float:
    """One sample of the exposition text."""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "(?m)^" + re.escape(name + (f"{{{inner}}}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern.encode(), text)
    assert found is not None, f"{name} {labels} not in the metrics"
    return float(found.group(1))


@pytest.fixture
async def relay(nursery: trio.Nursery, tmp_path: pathlib.Path) -> AsyncIterator[tuple[Relay, int]]:
    relay = Relay(SECRETS["washington"], ARRANGEMENT, tmp_path / "relay")
    port = await nursery.start(functools.partial(relay.serve_tcp, metrics=("127.0.0.1", 0)))
    assert relay.metrics_port is not None
    yield relay, port
    nursery.cancel_scope.cancel()


async def test_a_round_trip_is_counted_and_no_id_is_shown(
    relay: tuple[Relay, int], tmp_path: pathlib.Path
) -> None:
    server, port = relay
    address = ("127.0.0.1", port)
    with trio.fail_after(60):
        async with (
            open_node(SECRETS["seoul"], "seoul", ARRANGEMENT, address, tmp_path / "s") as seoul,
            open_node(SECRETS["tokyo"], "tokyo", ARRANGEMENT, address, tmp_path / "t") as tokyo,
        ):
            report_id = await seoul.submit(
                b"launch detected", recipients=["tokyo"], scope=SCOPE, level=LEVEL
            )
            await seoul.wait_stored(report_id)
            await seoul.release(report_id, "tokyo")
            async for report in tokyo.reports():
                await tokyo.ack(report)
                break
            # Revoking a delivered report is refused (replayed): a refusal to count.
            with pytest.raises(Refused):
                await seoul.revoke(report_id)
            assert server.metrics_port is not None
            while True:
                status, text = await get(server.metrics_port, "/metrics")
                assert status == 200
                if value(text, "tisa_relay_reports_total", event="acknowledged") >= 1:
                    break
                await trio.sleep(0.05)
            for event in ("stored", "released", "forwarded", "acknowledged"):
                assert value(text, "tisa_relay_reports_total", event=event) == 1
            assert value(text, "tisa_relay_reports_total", event="revoked") == 0
            assert value(text, "tisa_relay_refusals_total", reason="replayed") == 1
            assert value(text, "tisa_relay_queue_depth", recipient="tokyo") == 0
            assert value(text, "tisa_relay_connections", state="open") == 2
            assert value(text, "tisa_relay_store_up") == 1
            assert value(text, "tisa_relay_commit_batch_steps_count") >= 1
            assert value(text, "tisa_relay_commit_seconds_count") >= 1
    # Nothing that identifies a report, a token or a member beyond the arrangement's names.
    assert report_id.hex().encode() not in text
    names = set(re.findall(rb'recipient="([^"]*)"', text))
    assert names <= {m.name.encode() for m in ARRANGEMENT.members}
    assert b"launch" not in text


async def test_health_says_whether_the_store_answers(relay: tuple[Relay, int]) -> None:
    server, _ = relay
    assert server.metrics_port is not None
    assert await get(server.metrics_port, "/health") == (200, b"ok\n")

    def down() -> None:
        raise OSError("database is gone")

    server.store.ping = down  # type: ignore[method-assign]
    status, body = await get(server.metrics_port, "/health")
    assert status == 503 and b"database is gone" in body
    _, text = await get(server.metrics_port, "/metrics")
    assert value(text, "tisa_relay_store_errors_total") == 1


async def test_other_paths_and_methods(relay: tuple[Relay, int]) -> None:
    server, _ = relay
    assert server.metrics_port is not None
    assert (await get(server.metrics_port, "/secrets"))[0] == 404
    post = b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    assert (await http(server.metrics_port, post))[0] == 405


async def _endpoint(nursery: trio.Nursery, limits: MetricsLimits) -> int:
    metrics = RelayMetrics(ARRANGEMENT)
    port: int = await nursery.start(
        functools.partial(
            serve_metrics,
            metrics,
            scrape=lambda: metrics.render(queue_length=lambda _: 0, connections={}),
            health=lambda: None,
            limits=limits,
        )
    )
    return port


async def test_a_request_over_the_size_limit_gets_431(nursery: trio.Nursery) -> None:
    port = await _endpoint(nursery, MetricsLimits(max_request_bytes=256))
    fits = b"GET /health HTTP/1.1\r\nX: " + b"a" * 200 + b"\r\n\r\n"
    assert (await http(port, fits))[0] == 200
    over = b"GET /health HTTP/1.1\r\nX: " + b"a" * 300 + b"\r\n\r\n"
    assert (await http(port, over))[0] == 431


async def test_a_silent_client_is_closed_after_the_timeout(nursery: trio.Nursery) -> None:
    port = await _endpoint(nursery, MetricsLimits(request_timeout=0.2))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\n")  # never finished
            assert await stream.receive_some(1024) == b""


async def test_scrapers_over_the_limit_get_503(nursery: trio.Nursery) -> None:
    port = await _endpoint(nursery, MetricsLimits(max_scrapers=1, request_timeout=30))
    with trio.fail_after(10):
        holder = await trio.open_tcp_stream("127.0.0.1", port)
        async with holder:
            await trio.sleep(0.1)  # the endpoint took it: its one slot is in use
            assert (await get(port, "/health"))[0] == 503
        # The slot comes back once the holder leaves.
        while (await get(port, "/health"))[0] != 200:
            await trio.sleep(0.05)


def test_refusals_counted_by_reason_code() -> None:
    metrics = RelayMetrics(ARRANGEMENT)
    metrics.refusal(Reason.EXPIRED)
    metrics.refusal(Reason.EXPIRED)
    text = metrics.render(queue_length=lambda _: 3, connections={"open": 1})
    assert value(text, "tisa_relay_refusals_total", reason="expired") == 2
    assert value(text, "tisa_relay_queue_depth", recipient="canberra") == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("9470", ("127.0.0.1", 9470)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:80", ("::1", 80))],
)
def test_metrics_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["", "x", "host:", ":80", "1:70000", "-1"])
def test_bad_metrics_address(text: str) -> None:
    import click

    with pytest.raises(click.BadParameter):
        parse_metrics_address(text)
