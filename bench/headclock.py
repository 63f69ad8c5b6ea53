"""The audit chain head's holds, clocked inside the relay processes of a benchmark run.

``python -m bench.headclock FILE ARGS...`` runs the relay exactly as ``python -m relay
ARGS...`` does, with a clock around the statements that bound its hold of the audit
chain's head row on PostgreSQL (relay/pgstore.py, "The audit chain"): a batch takes the
row with ``SELECT … FROM audit_head FOR UPDATE`` and keeps it to its ``COMMIT`` (or
``ROLLBACK``; a connection closed meanwhile lets it go too). For each hold, one line is
appended to FILE::

    <asked> <taken> <released>

in CLOCK_MONOTONIC nanoseconds (one clock for every process on the machine, the one the
benchmark's load source and sink stamp the run's window with): when the statement that
takes the row was sent, when its answer came back, and when the answer to the batch's
COMMIT came back. The server locks the row half a round trip before ``taken`` and lets it
go half a round trip before ``released``, so ``released - taken`` is the hold, shifted by
that much; ``taken - asked`` is the wait for it (another process holding it) and the
statement's round trip.

Nothing is sampled: every hold of every batch is on record, however loaded the machine.
The clock wraps :meth:`psycopg.Connection.execute` in the relay's process (the store runs
each of its statements through it, BEGIN and COMMIT included, on connections in
autocommit mode) and :meth:`psycopg.Connection.close`. Its cost to the relay: a look at
each statement's text, and for each hold two more clock reads and one ``write(2)``, made
after the release.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

__all__ = ["ENDS", "TAKES", "Hold", "clocked", "main", "read_holds"]

# The statement that takes the head row (how it ends: relay.pgstore.PgStore._load_head).
TAKES = "FROM audit_head FOR UPDATE"
# The statements that end a batch, and so its hold.
ENDS = frozenset({"COMMIT", "ROLLBACK"})

Hold = tuple[int, int, int]  # asked, taken, released (CLOCK_MONOTONIC ns)


@contextmanager
def clocked(path: Path) -> Iterator[None]:
    """Within the block, every hold of the head row by a connection of this process is
    appended to ``path`` (created if need be)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # id(connection) -> (asked, taken) of the hold it is in.
    holding: dict[int, tuple[int, int]] = {}
    execute, close = psycopg.Connection.execute, psycopg.Connection.close

    def ended(conn: psycopg.Connection[Any]) -> None:
        started = holding.pop(id(conn), None)
        if started is not None:
            released = time.monotonic_ns()
            os.write(fd, f"{started[0]} {started[1]} {released}\n".encode())

    def clocked_execute(
        self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if not isinstance(query, str):
            return execute(self, query, *args, **kwargs)
        if query.endswith(TAKES):
            asked = time.monotonic_ns()
            cursor = execute(self, query, *args, **kwargs)  # raised: not taken
            # Taken again within its hold (read inside a batch, then at COMMIT): one hold.
            holding.setdefault(id(self), (asked, time.monotonic_ns()))
            return cursor
        if query in ENDS:
            try:
                return execute(self, query, *args, **kwargs)
            finally:
                ended(self)  # committed, rolled back, or the transaction is gone
        return execute(self, query, *args, **kwargs)

    def clocked_close(self: psycopg.Connection[Any]) -> None:
        try:
            close(self)
        finally:
            ended(self)

    setattr(psycopg.Connection, "execute", clocked_execute)  # noqa: B010
    setattr(psycopg.Connection, "close", clocked_close)  # noqa: B010
    try:
        yield
    finally:
        setattr(psycopg.Connection, "execute", execute)  # noqa: B010
        setattr(psycopg.Connection, "close", close)  # noqa: B010
        os.close(fd)


def read_holds(path: Path) -> list[Hold]:
    """The holds ``path`` records (none when the file is missing: no hold was made)."""
    if not path.exists():
        return []
    holds: list[Hold] = []
    for line in path.read_text().splitlines():
        asked, taken, released = (int(field) for field in line.split())
        holds.append((asked, taken, released))
    return holds


def main(argv: list[str]) -> None:
    """``python -m bench.headclock FILE ARGS...``: the relay, clocked (see above)."""
    from relay.cli import main as relay_main

    path, *relay_args = argv
    with clocked(Path(path)):
        relay_main(relay_args)


if __name__ == "__main__":
    main(sys.argv[1:])
