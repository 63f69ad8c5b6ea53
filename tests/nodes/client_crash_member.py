"""Run Tokyo's node in its own process as a tiny application, for the crash tests.

    python tests/nodes/client_crash_member.py STORE_DIR PORT LOG_FILE

The application writes ``start`` to LOG_FILE when it starts; then, for every report
the node hands it, it records the report (its hex id, one a line, fsynced), acknowledges
it (``Node.ack``) and writes ``ack <hex id>``. The process kills itself (SIGKILL) where
``TISA_CRASH_AT`` says:

* ``stored_before_ack``: right after the first delivery is committed to its store,
  before the ack goes to the relay;
* ``after_record``: right after recording the first report, before acknowledging it;
* ``after_ack``: right after the first report's acknowledgement returned, before it
  asks for the next report;
* ``in_ack_many``: the application records the first two reports, then acknowledges
  both with one ``Node.ack_many``; the process dies inside that call, right after the
  store marked both (in the open batch, before its commit).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio
from client_world import make_world

from clients.events import DeliveredReport
from clients.node import Backoff, open_node
from clients.store import MemberStore


def install(point: str) -> None:
    if point == "stored_before_ack":
        store_delivery = MemberStore.store_delivery

        def store_then_die(self: MemberStore, **kwargs: Any) -> None:
            store_delivery(self, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        MemberStore.store_delivery = store_then_die  # type: ignore[method-assign]
    elif point == "in_ack_many":
        mark_handed_many = MemberStore.mark_handed_many

        def mark_then_die(self: MemberStore, tokens: Any) -> list[bytes]:
            mark_handed_many(self, tokens)
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("not reached")

        MemberStore.mark_handed_many = mark_then_die  # type: ignore[method-assign]
    elif point not in ("", "after_record", "after_ack"):
        raise SystemExit(f"unknown crash point {point!r}")


def log_line(log: Path, line: str) -> None:
    with open(log, "a") as out:
        out.write(line + "\n")
        out.flush()
        os.fsync(out.fileno())


def die_at(point: str, here: str) -> None:
    if point == here:
        os.kill(os.getpid(), signal.SIGKILL)


async def main(store: Path, port: int, log: Path, point: str) -> None:
    arrangement, secrets = make_world()
    log_line(log, "start")
    backoff = Backoff(initial=0.01, maximum=0.1)
    async with open_node(
        secrets["tokyo"], "tokyo", arrangement, ("127.0.0.1", port), store, backoff=backoff
    ) as node:
        held: list[DeliveredReport] = []
        async for report in node.reports():
            log_line(log, report.report_id.hex())  # the application's record
            die_at(point, "after_record")
            if point == "in_ack_many":
                held.append(report)
                if len(held) == 2:
                    await node.ack_many(held)  # dies inside
                continue
            await node.ack(report)
            die_at(point, "after_ack")
            log_line(log, "ack " + report.report_id.hex())


if __name__ == "__main__":
    crash_at = os.environ.get("TISA_CRASH_AT", "")
    install(crash_at)
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), crash_at)
