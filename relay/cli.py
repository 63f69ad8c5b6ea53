"""The relay's command line: one click command behind ``python -m relay`` and ``tisa relay run``.

::

    python -m relay --home washington --port 7420
    tisa --home washington relay run --port 7420          # the same command

The relay's files come from its home folder (``--home DIR``, ``$TISA_HOME``, or the
``tisa`` group's ``--home``), each overridable: ``--key``, ``--arrangement``,
``--store``. The passphrase comes from ``--passphrase-env VAR``, else
``$TISA_PASSPHRASE``, else a prompt on a terminal; with none of them the command stops
with one line saying how to give one.

Serves until SIGINT (Ctrl-C) or SIGTERM. With ``--port-file`` the bound port is written
there (atomically) once the relay accepts connections, so scripts and tests using port 0
can find it.

Exit status: 0 after SIGINT or SIGTERM; 1 when the relay cannot start (a file that cannot
be read or is refused, a wrong passphrase, a key that is not the arrangement's relay, a
store of another version, an address that cannot be bound) or its store fails; 2 for a
usage error (a missing or malformed option, an unknown ``--limit``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import trio

from relay.server import EXPIRY_INTERVAL, MAX_HOLD, serve
from relay.store import EVENT_LINES
from tisa.errors import TisaError
from tisa.limits import Limits
from tisa_io.files import (
    ARRANGEMENT_FILE,
    IDENTITY_FILE,
    PASSPHRASE_ENV,
    STORE_DIR,
    atomic_text,
    default_home,
    load_home,
    resolve_passphrase,
)

__all__ = [
    "DEFAULT_PORT",
    "EventLinesFormatter",
    "LOG_FORMAT",
    "PASSPHRASE_ENV",
    "configure_logging",
    "main",
    "parse_limits",
    "parse_metrics_address",
    "read_passphrase",
    "run",
]

DEFAULT_PORT = 7420

log = logging.getLogger("relay")


def read_passphrase(env: str | None) -> str:
    """The passphrase from ``$env``, else ``$TISA_PASSPHRASE``, else asked on a terminal.

    Raises:
        UsageError: no passphrase (see :func:`tisa_io.files.resolve_passphrase`).
    """

    def ask() -> str:
        answer = click.prompt("Passphrase", hide_input=True, err=True)
        return answer if isinstance(answer, str) else ""

    return resolve_passphrase(env, ask if sys.stdin.isatty() else None)


def parse_limits(items: Sequence[str]) -> Limits:
    """``NAME=VALUE`` overrides of :class:`tisa.limits.Limits`.

    Raises:
        click.BadParameter: an unknown name, a value that is not a number, or a value the
            limits refuse.
    """
    fields = {field.name: field.type for field in dataclasses.fields(Limits)}
    values: dict[str, float | int] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise click.BadParameter(
                f"unknown limit {name!r}; known: {', '.join(sorted(fields))}",
                param_hint="'--limit'",
            )
        try:
            values[name] = float(text) if "float" in str(fields[name]) else int(text)
        except ValueError:
            raise click.BadParameter(
                f"{name}: {text!r} is not a number", param_hint="'--limit'"
            ) from None
    try:
        return Limits(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError, TisaError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--limit'") from None


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` for ``--metrics`` (HOST: 127.0.0.1).

    Raises:
        click.BadParameter: not a port number from 0 to 65535.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not host):
        raise click.BadParameter(f"{text!r}: expected [HOST:]PORT", param_hint="'--metrics'")
    return host, int(port)


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


async def _serve_until_signal(start: Any, port_file: Path | None, host: str) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(start)
            if port_file is not None:
                with atomic_text(port_file) as handle:
                    handle.write(f"{bound}\n")
            click.echo(f"relay listening on {host}:{bound}", err=True)
            async for signum in signals:
                log.info("signal %d: shutting down", signum)
                break
            nursery.cancel_scope.cancel()


def _home_default(ctx: click.Context) -> Path:
    """``--home`` of this command, else of an enclosing group (``tisa --home``), else the
    platform's default (:func:`tisa_io.files.default_home`)."""
    for current in (ctx, *_parents(ctx)):
        value = current.params.get("home")
        if value is not None:
            return Path(value)
    return default_home()


def _parents(ctx: click.Context) -> list[click.Context]:
    found = []
    parent = ctx.parent
    while parent is not None:
        found.append(parent)
        parent = parent.parent
    return found


@click.command(
    "run",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TISA_HOME",
    help="The relay's folder (identity.key, arrangement.tisa, store/); default: the "
    "`tisa --home` value, else the platform's user data folder for tisa. Env: TISA_HOME.",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"The relay's key file (default: HOME/{IDENTITY_FILE}).",
)
@click.option(
    "--arrangement",
    "arrangement_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"The signed arrangement (default: HOME/{ARRANGEMENT_FILE}).",
)
@click.option(
    "--store",
    help=f"The relay's store: a directory (SQLite), or a postgresql:// address for several "
    f"relay processes on one database (docs/deployment.md) (default: HOME/{STORE_DIR}).",
)
@click.option(
    "--passphrase-env",
    metavar="VAR",
    help=f"Read the key file's passphrase from environment variable VAR (default: "
    f"${PASSPHRASE_ENV}, else a prompt on a terminal).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the bound port here once the relay accepts connections.",
)
@click.option(
    "--max-hold",
    type=click.IntRange(min=1),
    default=MAX_HOLD,
    show_default=True,
    help="Longest a report may be held before any release, in seconds.",
)
@click.option(
    "--expiry-interval",
    type=click.FloatRange(min=0.01),
    default=EXPIRY_INTERVAL,
    show_default=True,
    help="Seconds between sweeps for expired reports and tokens.",
)
@click.option(
    "--limit",
    "limit_items",
    multiple=True,
    metavar="NAME=VALUE",
    help="Override a limit of tisa.limits.Limits, e.g. idle_timeout=60 (repeatable).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="How much the relay logs (to stderr).",
)
@click.option(
    "--metrics",
    "metrics_addr",
    metavar="[HOST:]PORT",
    help="Serve Prometheus metrics (/metrics) and a health check (/health) here; "
    "HOST defaults to 127.0.0.1. Off unless given.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log everything (--log-level DEBUG).")
@click.pass_context
def run(
    ctx: click.Context,
    home: Path | None,
    key: Path | None,
    arrangement_path: Path | None,
    store: str | None,
    passphrase_env: str | None,
    host: str,
    port: int,
    port_file: Path | None,
    max_hold: int,
    expiry_interval: float,
    limit_items: tuple[str, ...],
    log_level: str,
    metrics_addr: str | None,
    verbose: bool,
) -> None:
    """Run the relay until interrupted (Ctrl-C or SIGTERM). It stores and forwards, never reads.

    \b
    Examples:
      python -m relay --home washington --port 7420
      tisa --home washington relay run --port 7420
    """
    configure_logging("DEBUG" if verbose else log_level.upper())
    limits = parse_limits(limit_items)
    metrics = parse_metrics_address(metrics_addr) if metrics_addr is not None else None
    folder = home if home is not None else _home_default(ctx)
    try:
        opened = load_home(
            folder,
            read_passphrase(passphrase_env),
            key=key,
            arrangement=arrangement_path,
        )
    except (OSError, TisaError) as exc:
        raise click.ClickException(_error_text(exc)) from None
    start = functools.partial(
        serve,
        opened.secret,
        opened.arrangement,
        store if store is not None else opened.store,
        host=host,
        port=port,
        limits=limits,
        max_hold=max_hold,
        expiry_interval=expiry_interval,
        metrics=metrics,
    )
    try:
        trio.run(_serve_until_signal, start, port_file, host)
    except (TisaError, OSError, BaseExceptionGroup) as exc:
        # trio wraps what fails while the relay starts (a key that is not the relay's, a
        # store of another version, an address in use) in exception groups.
        leaf = _leaf(exc)
        if not isinstance(leaf, TisaError | OSError):
            raise
        raise click.ClickException(_error_text(leaf)) from None


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class EventLinesFormatter(logging.Formatter):
    """:class:`logging.Formatter` that writes a record carrying a batch's event lines
    (:data:`relay.store.EVENT_LINES`) as one line per event, each with the prefix the
    format gives it (the time, the logger's name, the level), so every line reads as if
    logged alone. Other records are formatted as usual."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as text: its event lines, each with its own prefix, one per line
        (the time formatted once), or the usual line for any other record."""
        lines: list[str] | None = getattr(record, EVENT_LINES, None)
        if lines is None:
            return super().format(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)  # once for the batch
        out = []
        for line in lines:
            record.message = line
            out.append(self.formatMessage(record))
        record.message = record.getMessage()
        return "\n".join(out)


def configure_logging(level: str) -> None:
    """The relay's log: one line per event on standard error, in :data:`LOG_FORMAT`.

    The relay logs a line per report event (``relay.events``: stored, released,
    forwarded, acknowledged), four per report. They are written once the batch that
    records them is on disk, the lines of a batch together: one record (formatted by
    :class:`EventLinesFormatter`, a line per event), one write and one flush. The format
    names no thread, process or source line, so the records do not gather them (the
    ``logging`` module's documented switches): about a quarter of each record's cost,
    the same text."""
    handler = logging.StreamHandler()  # standard error
    handler.setFormatter(EventLinesFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m relay``: the :func:`run` command as a program of its own."""
    run.main(args=list(argv) if argv is not None else None, prog_name="python -m relay")
