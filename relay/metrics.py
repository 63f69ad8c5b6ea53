"""The relay's metrics (Prometheus text format) and health check, served over HTTP.

Off unless asked: ``python -m relay --metrics 127.0.0.1:9470`` (or ``tisa relay run
--metrics ...``) serves, on that address only:

* ``GET /metrics``: the figures below, in the Prometheus text exposition format
  (``prometheus-client``'s own encoder);
* ``GET /health``: ``200 ok`` when this process can reach its store, else ``503`` with
  one line saying why (a load balancer or an orchestrator's probe).

What is exported (no secret, no report or token id, no member data beyond the
arrangement's member names)::

    tisa_relay_reports_total{event}          stored, released, forwarded, acknowledged, revoked
    tisa_relay_refusals_total{reason}        refusals and closing errors by reason code
    tisa_relay_queue_depth{recipient}        deliveries owed, per recipient (read at scrape)
    tisa_relay_connections{state}            handshake, open (read at scrape)
    tisa_relay_commit_batch_steps            steps made durable by one flush (histogram)
    tisa_relay_commit_seconds                time of one flush to disk (histogram)
    tisa_relay_store_errors_total            store failures (unreachable database, commit)
    tisa_relay_store_up                      1 when the last look at the store worked

Events are counted when the relay takes the step (before its batch is on disk), so a batch
lost in a failed commit leaves them counted once too many; the store's error counter says
when that can have happened.

The HTTP side is a small trio server with named, configurable limits, each answered as
HTTP says (a request larger than :data:`MAX_REQUEST_BYTES`: 431; a request not complete
within :data:`REQUEST_TIMEOUT`: closed; more than :data:`MAX_SCRAPERS` at once: 503):
whoever can reach the address is an outsider to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tisa.arrangement import Arrangement, Role
from tisa.errors import Reason

__all__ = [
    "BUSY_PATIENCE",
    "EVENTS",
    "MAX_REQUEST_BYTES",
    "MAX_SCRAPERS",
    "REQUEST_TIMEOUT",
    "MetricsLimits",
    "RelayMetrics",
    "serve_metrics",
]

log = logging.getLogger("relay.metrics")

# The report events counted (tisa_relay_reports_total's label values).
EVENTS = ("stored", "released", "forwarded", "acknowledged", "revoked")
# A scrape request's head (request line and headers) may be at most this long.
MAX_REQUEST_BYTES = 8192
# Seconds a client has to send its request head, and to take the answer.
REQUEST_TIMEOUT = 5.0
# Scrapes served at once; one more is answered 503 at once.
MAX_SCRAPERS = 8
# Seconds a connection turned away (503) is given to take its answer.
BUSY_PATIENCE = 0.25


@dataclass(frozen=True)
class MetricsLimits:
    """The metrics endpoint's limits (see the module docstring)."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    request_timeout: float = REQUEST_TIMEOUT
    max_scrapers: int = MAX_SCRAPERS


class RelayMetrics:
    """The relay's figures, in a registry of their own (one per relay, so tests can run
    several relays in one process).

    The relay calls :meth:`event`, :meth:`refusal`, :meth:`store_error` and
    :meth:`flushed` as things happen; the gauges read at scrape time come from the
    callables given to :meth:`render`.
    """

    def __init__(self, arrangement: Arrangement) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reports = Counter(
            "tisa_relay_reports",
            "Report events taken by this relay process.",
            ["event"],
            registry=self.registry,
        )
        # Bound once. A report event is counted in a plain int (one dict update on the
        # hot path, four per report) and added to its counter when the figures are read
        # (render): the counters' lock and value objects cost more than the count.
        self._events = {event: reports.labels(event) for event in EVENTS}
        self._events_pending = dict.fromkeys(EVENTS, 0)
        refusals = Counter(
            "tisa_relay_refusals",
            "Refusals and closing errors sent, by reason code.",
            ["reason"],
            registry=self.registry,
        )
        self._refusals = {reason: refusals.labels(reason.value) for reason in Reason}
        self._queue = Gauge(
            "tisa_relay_queue_depth",
            "Deliveries owed to each recipient (read from the store at scrape).",
            ["recipient"],
            registry=self.registry,
        )
        self._recipients = tuple(
            member.name for member in arrangement.members if Role.RECIPIENT in member.roles
        )
        self._connections = Gauge(
            "tisa_relay_connections",
            "Connections of this relay process, by state.",
            ["state"],
            registry=self.registry,
        )
        self._batch = Histogram(
            "tisa_relay_commit_batch_steps",
            "Steps made durable by one flush of the store.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self._flush = Histogram(
            "tisa_relay_commit_seconds",
            "Seconds of one flush of the store to disk.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self._store_errors = Counter(
            "tisa_relay_store_errors",
            "Store failures: database unreachable, a failed commit or flush.",
            registry=self.registry,
        )
        self._store_up = Gauge(
            "tisa_relay_store_up",
            "1 when the last look at the store worked, else 0.",
            registry=self.registry,
        )
        self._store_up.set(1)

    def event(self, name: str) -> None:
        """Count report event ``name`` (one of :data:`EVENTS`); it shows in the next
        :meth:`render`."""
        self._events_pending[name] += 1

    def _flush_events(self) -> None:
        for name, count in self._events_pending.items():
            if count:
                self._events[name].inc(count)
                self._events_pending[name] = 0

    def refusal(self, reason: Reason) -> None:
        """Count a refusal (or a closing error) with ``reason``."""
        self._refusals[reason].inc()

    def store_error(self) -> None:
        """Count a store failure."""
        self._store_errors.inc()
        self._store_up.set(0)

    def flushed(self, steps: int, seconds: float) -> None:
        """A flush made ``steps`` steps durable in ``seconds``."""
        self._batch.observe(steps)
        self._flush.observe(seconds)

    def render(
        self,
        *,
        queue_length: Callable[[str], int],
        connections: dict[str, int],
    ) -> bytes:
        """The text exposition, with the gauges read now.

        Args:
            queue_length: deliveries owed to a recipient (the store's); if it raises,
                the store counts as down and the queue gauges keep their last values.
            connections: connection counts by state.
        """
        self._flush_events()
        for state, count in connections.items():
            self._connections.labels(state).set(count)
        try:
            for name in self._recipients:
                self._queue.labels(name).set(queue_length(name))
        except Exception as exc:
            log.warning("metrics: the store did not answer: %s", exc)
            self.store_error()
        else:
            self._store_up.set(1)
        return bytes(generate_latest(self.registry))


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _TooLarge(Exception):
    pass


async def _read_head(stream: trio.abc.Stream, limit: int) -> bytes | None:
    """The request head (up to the blank line), or None when the client closed first.

    Raises:
        _TooLarge: ``limit`` bytes came without the end of the head.
    """
    data = bytearray()
    while True:
        end = data.find(b"\r\n\r\n")
        if 0 <= end <= limit:
            return bytes(data[:end])
        if len(data) > limit:
            raise _TooLarge
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk


async def serve_metrics(
    metrics: RelayMetrics,
    *,
    scrape: Callable[[], bytes],
    health: Callable[[], str | None],
    host: str = "127.0.0.1",
    port: int = 0,
    limits: MetricsLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/health`` on ``host:port`` until cancelled; reports the
    bound port.

    Args:
        metrics: the relay's figures (for the logs only; ``scrape`` renders them).
        scrape: the exposition text, rendered when asked.
        health: None when the store is reachable, else why not (one line).
        host, port: where to listen (127.0.0.1 by default; port 0 picks a free one).
        limits: the endpoint's limits (:class:`MetricsLimits`).
    """
    limits = limits or MetricsLimits()
    slots = trio.CapacityLimiter(limits.max_scrapers)

    async def finish(stream: trio.SocketStream, answer: bytes, patience: float) -> None:
        # Answer, then end our side and read what the client still sends (a little, for
        # a moment): closing with unread bytes would reset the connection, and the
        # client could lose the answer.
        with trio.move_on_after(patience):
            if answer:
                await stream.send_all(answer)
            await stream.send_eof()
            drained = 0
            while drained <= limits.max_request_bytes:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                drained += len(chunk)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                # No slot: answered and let go at once (a flood holds nothing long).
                busy = _response("503 Service Unavailable", b"busy\n")
                await finish(stream, busy, min(BUSY_PATIENCE, limits.request_timeout))
                return
            try:
                answer = b""
                with trio.move_on_after(limits.request_timeout):
                    answer = await _answer(stream)
                await finish(stream, answer, limits.request_timeout)
            finally:
                slots.release()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(stream: trio.SocketStream) -> bytes:
        try:
            head = await _read_head(stream, limits.max_request_bytes)
        except _TooLarge:
            return _response("431 Request Header Fields Too Large", b"request too large\n")
        if head is None:
            return b""
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return _response("405 Method Not Allowed", b"GET only\n")
        if path == b"/metrics":
            return _response("200 OK", scrape(), CONTENT_TYPE_LATEST)
        if path == b"/health":
            problem = health()
            if problem is None:
                return _response("200 OK", b"ok\n")
            return _response("503 Service Unavailable", problem.encode() + b"\n")
        return _response("404 Not Found", b"/metrics or /health\n")

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        task_status.started(bound)
