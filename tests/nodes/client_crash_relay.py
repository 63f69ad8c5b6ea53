"""Run the test world's relay in its own process, for the crash tests.

    python tests/nodes/client_crash_relay.py STORE PORT_FILE [PORT]

STORE is a directory (the SQLite store) or a ``postgresql://`` address.

With ``TISA_CRASH_AT=<point>`` in the environment the process kills itself (SIGKILL)
the first time it reaches that point, so a test can crash it at an exact step:

* ``after_store_before_ack``: the submission is committed, ``stored`` not yet sent.
* ``after_consume_before_forward``: the token is consumed and the delivery pending
  (one transaction), neither ``released`` sent nor anything forwarded.
* ``during_forward``: ``deliver`` and every chunk went out, ``deliver_end`` did not (a
  streamed delivery: a report over MAX_INLINE_CIPHERTEXT; a ``deliver_inline`` is one
  frame, there is no "during" to it).
* ``after_forward``: the whole delivery went out (its ``deliver_end``, or its
  ``deliver_inline``); the recipient's ack is not in.
* ``mid_batch``: the first group commit of three or more steps is about to run: every
  step of the batch is in the database's open transaction, nothing of it on disk and
  no answer sent.
* ``after_batch``: that commit is done; none of the batch's answers is sent.
* ``receipt_before_commit``: the first ``send_receipt`` was handled (the receipt queued
  and, protocol version 4, its delivery acked, both in the open batch); nothing of that
  batch is on disk.
* ``receipt_after_commit``: the same, and then that batch committed; the relay's ``ack``
  of the receipt is not sent.

The points are installed here by wrapping the relay's own functions, so the relay code
carries no test hooks.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import trio
from client_world import make_world

from relay import server
from relay.storage import is_postgresql
from relay.store import Store
from tisa import messages as m
from tisa_io.link import Link


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, Store: Any = Store) -> None:
    if point == "after_store_before_ack":
        add_report = Store.add_report

        def add_report_then_die(self: Store, *args: Any, **kwargs: Any) -> Any:
            add_report(self, *args, **kwargs)
            self.commit()
            _die()

        Store.add_report = add_report_then_die  # type: ignore[method-assign]
    elif point == "after_consume_before_forward":
        release = Store.release

        def release_then_die(self: Store, *args: Any, **kwargs: Any) -> Any:
            release(self, *args, **kwargs)
            self.commit()
            _die()

        Store.release = release_then_die  # type: ignore[method-assign]
    elif point in ("during_forward", "after_forward"):
        send_many = Link.send_many

        async def send_and_die(self: Link, messages: Iterable[m.Message]) -> None:
            messages = list(messages)
            ends = [
                i
                for i, message in enumerate(messages)
                if isinstance(message, m.DeliverEnd)
                or (isinstance(message, m.DeliverInline) and point == "after_forward")
            ]
            if ends and point == "during_forward":
                await send_many(self, messages[: ends[0]])
                await trio.sleep(0.05)  # let the frames leave the socket buffer
                _die()
            await send_many(self, messages)
            if ends:
                await trio.sleep(0.05)  # let the frames leave the socket buffer
                _die()

        # send() goes through send_many().
        Link.send_many = send_and_die  # type: ignore[method-assign]
    elif point in ("mid_batch", "after_batch"):
        commit = Store.commit

        def commit_and_die(self: Store) -> None:
            big = self.ops >= 3
            if big and point == "mid_batch":
                _die()
            commit(self)
            if big:
                _die()

        Store.commit = commit_and_die  # type: ignore[method-assign]
    elif point in ("receipt_before_commit", "receipt_after_commit"):
        handle_receipt = server.Relay._receipt

        async def receipt_then_die(self: server.Relay, *args: Any) -> None:
            await handle_receipt(self, *args)
            if point == "receipt_after_commit":
                self.store.commit()
            _die()

        server.Relay._receipt = receipt_then_die  # type: ignore[method-assign]
    elif point:
        raise SystemExit(f"unknown crash point {point!r}")


async def main(store: str, port_file: Path, port: int) -> None:
    arrangement, secrets = make_world()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await server.serve(
            secrets["washington"],
            arrangement,
            store,
            port=port,
            expiry_interval=0.5,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(run)
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(bound))
        os.replace(tmp, port_file)


if __name__ == "__main__":
    if is_postgresql(sys.argv[1]):
        from relay.pgstore import PgStore

        install(os.environ.get("TISA_CRASH_AT", ""), PgStore)
    else:
        install(os.environ.get("TISA_CRASH_AT", ""))
    trio.run(main, sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if sys.argv[3:] else 0)
