"""Run the relay: ``python -m relay --key FILE --passphrase-env VAR --arrangement FILE
--store DIR|postgresql://... [--host H] [--port N] [--port-file FILE]``.

Serves until SIGINT or SIGTERM. With ``--port-file`` the bound port is written there
(atomically) once the relay accepts connections, so scripts and tests using port 0 can
find it. Exit status: 0 after a signal, 2 for bad arguments or files.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from relay.server import EXPIRY_INTERVAL, MAX_HOLD, serve
from tisa.arrangement import MAX_ARRANGEMENT_SIZE, Arrangement, SignedArrangement
from tisa.errors import TisaError
from tisa.keys import MemberSecret
from tisa.limits import Limits

log = logging.getLogger("relay")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m relay", description=__doc__.split("\n")[0])
    parser.add_argument("--key", required=True, type=Path, help="the relay's key file")
    parser.add_argument(
        "--passphrase-env",
        required=True,
        metavar="VAR",
        help="environment variable holding the key file's passphrase",
    )
    parser.add_argument("--arrangement", required=True, type=Path, help="signed arrangement")
    parser.add_argument(
        "--store",
        required=True,
        help="store directory (SQLite), or a postgresql:// address (docs/deployment.md)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    parser.add_argument(
        "--max-hold", type=int, default=MAX_HOLD, help="seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--expiry-interval", type=float, default=EXPIRY_INTERVAL, help="seconds between sweeps"
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a limit of tisa.limits.Limits, e.g. idle_timeout=60 (repeatable)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _limits(items: Sequence[str]) -> Limits:
    fields = {field.name: field.type for field in dataclasses.fields(Limits)}
    values: dict[str, float | int] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"unknown limit {name!r}; known: {', '.join(sorted(fields))}")
        values[name] = float(text) if "float" in str(fields[name]) else int(text)
    return Limits(**values)  # type: ignore[arg-type]


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


async def _run(
    secret: MemberSecret, arrangement: Arrangement, args: argparse.Namespace, limits: Limits
) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            port = await nursery.start(
                lambda task_status: serve(
                    secret,
                    arrangement,
                    args.store,
                    host=args.host,
                    port=args.port,
                    limits=limits,
                    max_hold=args.max_hold,
                    expiry_interval=args.expiry_interval,
                    task_status=task_status,
                )
            )
            if args.port_file is not None:
                _write_port_file(args.port_file, port)
            print(f"relay listening on {args.host}:{port}", flush=True)
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                break
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay as the command line asks (see the module docstring).

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 after SIGINT or SIGTERM; 2 when the passphrase variable is not
        set, the key file, the arrangement file or a ``--limit`` cannot be read or is
        refused, or the relay cannot start (a key that is not the arrangement's relay, a
        store of another version, an address that cannot be bound).

    Raises:
        SystemExit: status 2, from argparse, for missing or malformed arguments.
        ValueError: an unknown ``--log-level``.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    passphrase = os.environ.get(args.passphrase_env)
    if passphrase is None:
        print(f"error: ${args.passphrase_env} is not set", file=sys.stderr)
        return 2
    try:
        limits = _limits(args.limit)
        secret, _ = MemberSecret.load(args.key, passphrase)
        with open(args.arrangement, "rb") as handle:
            arrangement = SignedArrangement.load_effective(handle.read(MAX_ARRANGEMENT_SIZE + 1))
    except (OSError, ValueError, TisaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_run, secret, arrangement, args, limits)
    except (TisaError, OSError, BaseExceptionGroup) as exc:
        # trio wraps what fails while the relay starts (a key that is not the relay's,
        # a store of another version, an address in use) in exception groups.
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            return 0
        if not isinstance(leaf, TisaError | OSError):
            raise
        print(f"error: {leaf}", file=sys.stderr)
        return 2
    return 0


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
