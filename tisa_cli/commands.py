"""The ``tisa`` command: identities, arrangements, a relay, and a member node from the shell.

Every command parses its arguments and calls the library (``tisa``, ``relay``,
``clients.node``); the few file formats that exist only for the command line (an exported
public identity, an arrangement file) are defined by the small functions in the first
section, which the demo and the tests use too.

Errors are one line on stderr and a non-zero exit status, never a traceback: a
:class:`tisa.errors.TisaError` or an :class:`OSError` raised anywhere below a command is
turned into ``Error: <what went wrong>`` (status 1), and a usage error (a missing
argument, an unknown option, a bad option value) into ``Error: <command>: <problem> (see
'<command> --help')`` (status 2), without click's usage block. Ctrl-C is ``Error:
interrupted...`` with status 130, saying what became of the work in progress.

Files a member keeps live in its home folder (``--home DIR`` or ``$TISA_HOME``; by
default the platform's user data folder, see :func:`default_home`)::

    HOME/identity.key       the passphrase-protected secret keys
    HOME/arrangement.tisa   the arrangement, with the signatures gathered so far
    HOME/store/             the node's durable state (outbox, seen reports, inbox)
    HOME/config.toml        optional defaults: the relay's address, options per command
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import click
from rich.console import Console
from rich.table import Table

from relay import cli as relay_cli
from tisa.arrangement import (
    Arrangement,
)
from tisa.consent import DENIAL_REASONS
from tisa.errors import Refused, TisaError
from tisa.keys import MemberSecret, PublicIdentity
from tisa_io.files import (
    ARRANGEMENT_FILE,
    IDENTITY_FILE,
    PASSPHRASE_ENV,
    STORE_DIR,
    arrangement_summary,
    atomic_text,
    create_identity,
    default_home,
    draft_arrangement,
    identity_to_json,
    merge_arrangements,
    read_arrangement,
    read_identity,
    resolve_passphrase,
    sign_arrangement,
    write_arrangement,
)

__all__ = ["CliError", "main", "tisa"]

DEFAULT_PORT = 7420
DEFAULT_RELAY = f"127.0.0.1:{DEFAULT_PORT}"
# A passphrase is looked up here when no --passphrase-env is given (terminal or not).


class CliError(TisaError):
    """A command-line mistake (missing file, bad option value) found by this module."""


# --- command-line plumbing --------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

_out = Console(highlight=False, soft_wrap=True)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        parts = [exc.strerror or type(exc).__name__]
        if exc.filename is not None:
            parts.append(str(exc.filename))
        return ": ".join(parts)
    if isinstance(exc, Refused):
        return f"refused ({exc.reason.value}){': ' + exc.detail if exc.detail else ''}"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else text


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside (nested) exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _UsageLine(click.UsageError):
    """A usage error shown as one line, ``Error: tisa send: missing argument 'TEXT' (see
    'tisa send --help')``, with exit status 2, instead of click's usage block."""

    def show(self, file: Any = None) -> None:
        click.ClickException.show(self, file)


# Raised by click >= 8.2 for a group run without a command, to print the group's help:
# left as it is.
_HELP_ERROR: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", _UsageLine)


def _usage_line(exc: click.UsageError, ctx: click.Context) -> click.UsageError:
    """``exc`` as one line naming its command (``ctx``'s if click left it out)."""
    if isinstance(exc, (_UsageLine, _HELP_ERROR)):
        return exc
    path = (exc.ctx or ctx).command_path
    text = " ".join(exc.format_message().split()).removesuffix(".")
    return _UsageLine(f"{path}: {text[:1].lower()}{text[1:]} (see '{path} --help')", ctx)


class _OneLineUsage(click.Command):
    """Usage errors found while parsing the command line become :class:`_UsageLine`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _usage_line(exc, ctx) from None


class _Command(_OneLineUsage):
    """A click command whose usage errors are one line."""


class _Group(_OneLineUsage, click.Group):
    """A click group that turns the toolkit's errors into one line and exit status 1, and
    click's usage errors (missing argument, unknown option or command, bad value) into one
    line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _usage_line(exc, ctx) from None
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except (TisaError, OSError, BaseExceptionGroup, KeyboardInterrupt) as exc:
            leaf = _leaf(exc)
            if isinstance(leaf, click.ClickException | click.exceptions.Exit | click.Abort):
                raise leaf from None
            if isinstance(leaf, KeyboardInterrupt):
                raise _Interrupted("interrupted") from None
            if not isinstance(leaf, TisaError | OSError):
                raise
            raise click.ClickException(_error_text(leaf)) from None


_Group.group_class = _Group
_Group.command_class = _Command


@dataclass
class _State:
    home: Path


def _home(ctx: click.Context) -> Path:
    state = ctx.find_object(_State)
    return state.home if state is not None else default_home()


def _can_prompt() -> bool:
    """True when a passphrase can be asked for: stdin is a terminal."""
    return sys.stdin.isatty()


def _passphrase(env: str | None, *, confirm: bool = False, prompt: str = "Passphrase") -> str:
    """The passphrase from ``$env`` (``--passphrase-env``), else ``$TISA_PASSPHRASE``, else
    asked on the terminal; with none of them, a one-line error saying how to give one."""

    def ask() -> str:
        value = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        return value if isinstance(value, str) else ""

    return resolve_passphrase(env, ask if _can_prompt() else None)


def _passphrase_option(func: _F) -> _F:
    return click.option(
        "--passphrase-env",
        metavar="VAR",
        help=f"Read the passphrase from environment variable VAR (default: "
        f"${PASSPHRASE_ENV} if set, else asked on the terminal).",
    )(func)


def _load_secret(path: Path, env: str | None) -> tuple[MemberSecret, str]:
    if not path.exists():
        raise CliError(f"no key file at {path} (create one with: tisa identity create NAME)")
    return MemberSecret.load(path, _passphrase(env))


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _fail(message: str) -> NoReturn:
    raise CliError(message)


# --- the command group ------------------------------------------------------------------


def _command_options(group: click.Group) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Every command's path and options by config key: ``{"send": (["send"], {"scope":
    "scope", ...}), "relay-run": (["relay", "run"], {...})}``; an option's key is its
    long name without the dashes, mapped to click's parameter name."""
    out: dict[str, tuple[list[str], dict[str, str]]] = {}

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
            return
        names: dict[str, str] = {}
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                for opt in param.opts:
                    if opt.startswith("--"):
                        names[opt[2:]] = param.name or opt[2:]
        out["-".join(path)] = (path, names)

    walk(group, [])
    return out


def _config_defaults(path: Path, group: click.Group) -> dict[str, Any] | None:
    """The default map click reads option defaults from, built from a config file.

    Top-level keys set an option for every command that has it (``relay``,
    ``timeout``, ``wait-relay``, ...); a table sets the options of one command
    (``[send]``, ``[inbox]``, ``[relay-run]``, ``[outbox-send]``) and wins over a
    top-level key. The command line and environment variables win over the file.
    None if there is no file.

    Raises:
        CliError: the file is not TOML, or names an unknown command or option.
    """
    import tomllib

    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{path}: not valid TOML ({exc})") from None
    commands = _command_options(group)
    defaults: dict[str, Any] = {}

    def put(command: str, key: str, value: Any) -> None:
        command_path, names = commands[command]
        node = defaults
        for part in command_path:
            node = node.setdefault(part, {})
        node[names[key]] = value

    for key, value in config.items():
        if isinstance(value, dict):
            if key not in commands:
                raise CliError(f"{path}: [{key}]: no such command")
            for option, item in value.items():
                if option not in commands[key][1]:
                    raise CliError(f"{path}: [{key}] {option}: no such option of that command")
                put(key, option, item)
        else:
            users = [c for c, (_, options) in commands.items() if key in options]
            if not users:
                raise CliError(f"{path}: {key}: no command has such an option")
            for command in users:
                table = config.get(command)
                if not (isinstance(table, dict) and key in table):
                    put(command, key, value)
    return defaults


CONFIG_FILE = "config.toml"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TISA_HOME",
    help="This member's folder (identity.key, arrangement.tisa, store/, config.toml). "
    "Env: TISA_HOME. Default: the platform's user data folder for tisa "
    "(~/.local/share/tisa on Linux).",
)
@click.version_option(package_name="tisa-relay", prog_name="tisa")
@click.pass_context
def tisa(ctx: click.Context, home: Path | None) -> None:
    """End-to-end encrypted reports through a relay that forwards and never reads.

    \b
    A deployment's life, one member at a time:
      tisa --home seoul identity create seoul
      tisa --home seoul identity export --out seoul.id.json
      tisa arrangement draft --name tisa-2014 --member seoul.id.json:originator,recipient ...
      tisa --home seoul arrangement sign arrangement.tisa
      tisa --home washington relay run
      tisa --home seoul send --scope missile --level secret --to tokyo "launch detected"
      tisa --home tokyo inbox
    Run `tisa demo` to see three nodes do all of it.

    \b
    HOME/config.toml holds defaults (the command line and environment win):
      relay = "relay.example.org:7420"   # every command with --relay
      [send]
      scope = "missile"
      level = "secret"
    """
    home = home if home is not None else default_home()
    ctx.obj = _State(home=home)
    ctx.default_map = _config_defaults(home / CONFIG_FILE, tisa)


# --- identity ---------------------------------------------------------------------------


@tisa.group()
def identity() -> None:
    """Create a member identity and export its public part."""


@identity.command("create")
@click.argument("name")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key file to write (default: HOME/identity.key). Never overwritten.",
)
@_passphrase_option
@click.option(
    "--insecure-fast-kdf",
    is_flag=True,
    help="Minimum argon2id cost, for demos and tests only: a stolen file is cheap to crack.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the public identity as JSON.")
@click.pass_context
def identity_create(
    ctx: click.Context,
    name: str,
    out: Path | None,
    passphrase_env: str | None,
    insecure_fast_kdf: bool,
    as_json: bool,
) -> None:
    """Generate signing and encryption keys for member NAME, protected by a passphrase.

    \b
    Example:
      TISA_PASS=... tisa --home seoul identity create seoul --passphrase-env TISA_PASS
    """
    path = out or _home(ctx) / IDENTITY_FILE
    if path.exists():
        _fail(f"{path} exists; not overwriting a key file")
    passphrase = _passphrase(passphrase_env, confirm=True, prompt="New passphrase")
    secret = create_identity(path, name, passphrase, insecure_fast_kdf=insecure_fast_kdf)
    if as_json:
        _print_json({**identity_to_json(name, secret.public), "key_file": str(path)})
    else:
        _out.print(f"created [bold]{name}[/] in {path}")
        _out.print(f"fingerprint {secret.public.fingerprint}")


@identity.command("export")
@click.argument("key_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the public identity here (JSON); default: print it.",
)
@_passphrase_option
@click.pass_context
def identity_export(
    ctx: click.Context, key_file: Path | None, out: Path | None, passphrase_env: str | None
) -> None:
    """Export the public part of a key file (name, public keys, fingerprint) as JSON.

    Give the file to whoever drafts the arrangement; every member should compare the
    fingerprint with its owner before signing.

    \b
    Example:
      tisa --home seoul identity export --out seoul.id.json
    """
    secret, name = _load_secret(key_file or _home(ctx) / IDENTITY_FILE, passphrase_env)
    exported = identity_to_json(name, secret.public)
    if out is None:
        _print_json(exported)
        return
    with atomic_text(out) as handle:
        json.dump(exported, handle, indent=2, sort_keys=True)
        handle.write("\n")
    _out.print(f"wrote {out} ({name}, fingerprint {secret.public.fingerprint})")


@identity.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def identity_show(file: Path, as_json: bool) -> None:
    """Check an exported identity file and print its name and fingerprint.

    \b
    Example:
      tisa identity show tokyo.id.json
    """
    name, public = read_identity(file)
    if as_json:
        _print_json(identity_to_json(name, public))
    else:
        _out.print(f"{name}  fingerprint {public.fingerprint}")


# --- arrangement ------------------------------------------------------------------------


@tisa.group()
def arrangement() -> None:
    """Draft an arrangement, sign it (each member separately), show who signed."""


def _parse_member(spec: str) -> tuple[str, PublicIdentity, list[str]]:
    path, sep, roles = spec.rpartition(":")
    if not sep or not path or not roles:
        _fail(f"--member {spec!r}: expected FILE:ROLE[,ROLE]")
    name, public = read_identity(Path(path))
    return name, public, [r.strip() for r in roles.split(",") if r.strip()]


@arrangement.command("draft")
@click.option("--name", "arrangement_name", required=True, help="The arrangement's name.")
@click.option(
    "--member",
    "member_specs",
    multiple=True,
    required=True,
    metavar="FILE:ROLES",
    help="An exported identity and its roles (originator, recipient, relay), comma-separated. "
    "Repeat for each member.",
)
@click.option("--scope", "scopes", multiple=True, required=True, help="A scope; repeat.")
@click.option(
    "--level", "levels", multiple=True, required=True, help="A level, lowest first; repeat."
)
@click.option("--relay", help="The relay's member name (default: the member with role relay).")
@click.option(
    "--amends",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draft a new version of this arrangement file (an amendment, signed anew).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ARRANGEMENT_FILE,
    show_default=True,
    help="Arrangement file to write.",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def arrangement_draft(
    arrangement_name: str,
    member_specs: tuple[str, ...],
    scopes: tuple[str, ...],
    levels: tuple[str, ...],
    relay: str | None,
    amends: Path | None,
    out: Path,
    force: bool,
    as_json: bool,
) -> None:
    """Write an unsigned arrangement from the members' exported identities.

    \b
    Example:
      tisa arrangement draft --name tisa-2014 \\
        --member seoul.id.json:originator,recipient \\
        --member washington.id.json:relay \\
        --member tokyo.id.json:originator,recipient \\
        --scope missile --scope nuclear \\
        --level restricted --level confidential --level secret \\
        --out arrangement.tisa
    """
    members = [_parse_member(spec) for spec in member_specs]
    previous = read_arrangement(amends) if amends is not None else None
    signed = draft_arrangement(
        name=arrangement_name,
        members=members,
        scopes=scopes,
        levels=levels,
        relay=relay,
        previous=previous,
    )
    write_arrangement(out, signed, overwrite=force)
    if as_json:
        _print_json(arrangement_summary(signed))
    else:
        a = signed.arrangement
        _out.print(
            f"drafted {a.name} v{a.version} ({len(a.members)} members) in {out}; "
            f"needs signatures from {', '.join(signed.missing)}"
        )


@arrangement.command("sign")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key file (default: HOME/identity.key).",
)
@click.option("--as", "as_name", help="Member name to sign as (default: found from the key).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the signed copy here (default: back to FILE).",
)
@_passphrase_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def arrangement_sign(
    ctx: click.Context,
    file: Path,
    key: Path | None,
    as_name: str | None,
    out: Path | None,
    passphrase_env: str | None,
    as_json: bool,
) -> None:
    """Add your signature to an arrangement file. Members sign separately, in any order.

    \b
    Example:
      tisa --home tokyo arrangement sign arrangement.tisa
    """
    signed = read_arrangement(file)
    secret, _ = _load_secret(key or _home(ctx) / IDENTITY_FILE, passphrase_env)
    signed, name = sign_arrangement(signed, secret, as_name)
    write_arrangement(out or file, signed)
    if as_json:
        _print_json(arrangement_summary(signed))
    elif signed.is_effective:
        _out.print(f"signed as {name}; every member has signed: the arrangement is effective")
    else:
        _out.print(f"signed as {name}; still missing: {', '.join(signed.missing)}")


@arrangement.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Arrangement file to write with every signature found.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def arrangement_merge(files: tuple[Path, ...], out: Path, as_json: bool) -> None:
    """Gather signatures from copies of one arrangement that members signed apart.

    \b
    Example:
      tisa arrangement merge seoul-signed.tisa tokyo-signed.tisa --out arrangement.tisa
    """
    signed = merge_arrangements([read_arrangement(f) for f in files])
    write_arrangement(out, signed)
    if as_json:
        _print_json(arrangement_summary(signed))
    else:
        state = "effective" if signed.is_effective else "missing " + ", ".join(signed.missing)
        _out.print(f"merged {len(files)} copies into {out}: {state}")


@arrangement.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def arrangement_show(ctx: click.Context, file: Path | None, as_json: bool) -> None:
    """Show an arrangement: members, roles, scopes, levels, who signed, whether effective.

    The exit status is 0 either way; script on the "effective" field of --json.

    \b
    Example:
      tisa arrangement show arrangement.tisa --json
    """
    signed = read_arrangement(file or _home(ctx) / ARRANGEMENT_FILE)
    summary = arrangement_summary(signed)
    if as_json:
        _print_json(summary)
        return
    a = signed.arrangement
    _out.print(f"[bold]{a.name}[/] version {a.version}  id {summary['id'][:16]}…")
    _out.print(f"relay {a.relay}; scopes {', '.join(a.scopes)}; levels {' < '.join(a.levels)}")
    table = Table(show_edge=False)
    for column in ("member", "roles", "fingerprint", "signed"):
        table.add_column(column)
    for m in summary["members"]:
        table.add_row(
            m["name"],
            ", ".join(m["roles"]),
            m["fingerprint"],
            "[green]yes[/]" if m["signed"] else "[red]no[/]",
        )
    _out.print(table)
    if signed.is_effective:
        _out.print("[green]effective[/]: every member has signed")
    else:
        _out.print(f"[yellow]not effective[/]: missing {', '.join(signed.missing)}")


# --- running nodes ---------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) as a (host, port) pair. Raises CliError."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"relay address {text!r}: expected HOST:PORT")
    return host, int(port)


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]``: relay processes serving one arrangement, tried in
    turn (docs/deployment.md). Raises CliError."""
    return [parse_address(part.strip()) for part in text.split(",")]


@dataclass
class _Member:
    """What a node command needs: keys, name, arrangement, relay, store, and how long to
    keep trying an unreachable relay (0: fail at the first failed attempt)."""

    secret: MemberSecret
    name: str
    arrangement: Arrangement
    relay: list[tuple[str, int]]
    store: Path
    wait_relay: float = 0.0

    @property
    def addresses(self) -> str:
        """The relay addresses as the user gave them: ``HOST:PORT[, HOST:PORT...]``."""
        return ", ".join(f"{host}:{port}" for host, port in self.relay)


@dataclass(frozen=True)
class _NodeOptions:
    """The options every node command takes, loaded only when the command needs them
    (so a bad argument is reported before any passphrase prompt)."""

    key: Path | None
    arrangement_path: Path | None
    relay_addr: str
    store: Path | None
    passphrase_env: str | None
    wait_relay: float = 0.0

    def load(self, ctx: click.Context) -> _Member:
        home = _home(ctx)
        relay = parse_addresses(self.relay_addr)
        arrangement = read_arrangement(
            self.arrangement_path or home / ARRANGEMENT_FILE
        ).require_effective()
        secret, name = _load_secret(self.key or home / IDENTITY_FILE, self.passphrase_env)
        return _Member(
            secret, name, arrangement, relay, self.store or home / STORE_DIR, self.wait_relay
        )

    def run(self, ctx: click.Context, timeout: float, call: Callable[[Any], Awaitable[_T]]) -> _T:
        """Load the member (:meth:`load`), run its node and return ``await call(node)``.

        ``call`` must end within ``timeout`` seconds, as must the first connection to
        the relay (see :func:`_run_node`).

        Raises:
            CliError: the relay cannot be reached, or the time is up (one line).
            Whatever :meth:`load` and ``call`` raise.
        """
        member = self.load(ctx)

        async def job(node: Any) -> _T:
            import trio

            with trio.fail_after(timeout):
                return await call(node)

        result: _T = _run_node(member, job, connect_timeout=timeout)
        return result


_store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    help="The node's store directory (default: HOME/store).",
)


def _node_options(func: _F) -> _F:
    """Add --key, --arrangement, --relay, --store, --passphrase-env and --wait-relay,
    handed to the command as one ``node_options`` argument."""

    @functools.wraps(func)
    def command(
        *args: Any,
        key: Path | None,
        arrangement_path: Path | None,
        relay_addr: str,
        store: Path | None,
        passphrase_env: str | None,
        wait_relay: float,
        **kwargs: Any,
    ) -> Any:
        options = _NodeOptions(key, arrangement_path, relay_addr, store, passphrase_env, wait_relay)
        return func(*args, node_options=options, **kwargs)

    wrapped = cast(_F, command)
    wrapped = _passphrase_option(wrapped)
    wrapped = click.option(
        "--wait-relay",
        type=click.FloatRange(min=0),
        default=0.0,
        metavar="SECONDS",
        help="Keep trying an unreachable relay for up to SECONDS (default: fail at once).",
    )(wrapped)
    wrapped = _store_option(wrapped)
    wrapped = click.option(
        "--relay",
        "relay_addr",
        envvar="TISA_RELAY",
        default=DEFAULT_RELAY,
        show_default=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="The relay's address, or several relay processes' (tried in turn). Env: TISA_RELAY.",
    )(wrapped)
    wrapped = click.option(
        "--arrangement",
        "arrangement_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The signed arrangement (default: HOME/arrangement.tisa).",
    )(wrapped)
    wrapped = click.option(
        "--key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Key file (default: HOME/identity.key).",
    )(wrapped)
    return wrapped


# Without --wait-relay, how long the first connection attempt may take before the
# command gives up (a refused connection fails at once; this bounds a silent one).
CONNECT_TIMEOUT = 10.0


def _connect_error_text(exc: BaseException) -> str:
    """Why a connection attempt failed, in a few words ("connection refused")."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return (os.strerror(cause.errno) or str(cause)).lower()
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        else:
            cause = cause.__cause__
    if isinstance(exc, Refused):
        return _error_text(exc)
    return str(exc) or type(exc).__name__


async def _connect(node: Any, member: _Member, connect_timeout: float) -> None:
    """Wait for the node's first connection to the relay.

    Without ``member.wait_relay`` the first failed attempt is an error; with it, one
    line on stderr says the relay is being retried, until it answers or the time is up.
    """
    import trio

    address = member.addresses
    patience = member.wait_relay
    error: BaseException | None = None
    with trio.move_on_after(patience or min(connect_timeout, CONNECT_TIMEOUT)):
        error = await node.wait_connect_attempt()
        if error is None:
            return
        if not patience:
            raise CliError(
                f"cannot reach the relay at {address}: {_connect_error_text(error)} "
                "(--wait-relay SECONDS keeps trying)"
            )
        click.echo(
            f"relay at {address} unreachable ({_connect_error_text(error)}); "
            f"retrying for up to {patience:g} s",
            err=True,
        )
        await node.wait_connected()
        return
    error = node.connect_error
    why = f": {_connect_error_text(error)}" if error is not None else ""
    if patience:
        raise CliError(f"cannot reach the relay at {address} after {patience:g} s{why}")
    raise CliError(f"no answer from the relay at {address}{why}")


def _run_node(member: _Member, job: Callable[[Any], Any], *, connect_timeout: float) -> Any:
    """Run ``job(node)`` inside ``open_node`` under trio, once the relay answered (see
    :func:`_connect`).

    A job's ``trio.fail_after(timeout)`` that expires is an error of one line."""
    import trio

    from clients.node import open_node

    where = member.addresses

    async def main() -> Any:
        async with open_node(
            member.secret, member.name, member.arrangement, member.relay, member.store
        ) as node:
            await _connect(node, member, connect_timeout)
            return await job(node)

    try:
        return trio.run(main)
    except (trio.TooSlowError, BaseExceptionGroup) as exc:
        if not isinstance(_leaf(exc), trio.TooSlowError):
            raise
        raise CliError(
            f"timed out waiting for the relay at {where} (--timeout {connect_timeout:g})"
        ) from None


def _timeout_option(default: float) -> Callable[[_F], _F]:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=default,
        show_default=True,
        help="Seconds to wait for the relay.",
    )


def _node_command(timeout: float) -> Callable[[_F], _F]:
    """What every command that runs the member's node takes, composed once: ``--timeout``
    (``timeout`` seconds by default), the node's options (:func:`_node_options`, one
    ``node_options`` argument) and the click context (the first argument)."""

    def decorate(func: _F) -> _F:
        return _timeout_option(timeout)(_node_options(cast(_F, click.pass_context(func))))

    return decorate


def _watch_options(what: str) -> Callable[[_F], _F]:
    """``--wait`` (seconds to wait for ``what`` after connecting) and ``--json``."""

    def decorate(func: _F) -> _F:
        func = click.option("--json", "as_json", is_flag=True, help="Print as JSON.")(func)
        return click.option(
            "--wait",
            type=click.FloatRange(min=0),
            default=2.0,
            show_default=True,
            help=f"Seconds to wait for {what} after connecting.",
        )(func)

    return decorate


# The request a consent answer (approve, deny) is about: its id, as `tisa requests` shows.
_request_argument = click.argument("request_id", metavar="REQUEST")


def _hex_id(text: str, what: str = "report id") -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise CliError(f"{what} must be hex") from None
    if len(raw) != 16:
        raise CliError(f"{what} is 32 hex digits")
    return raw


@tisa.group()
def relay() -> None:
    """Run the relay (the member holding the relay role)."""


# The relay's own command (relay.cli), the same one `python -m relay` runs.
relay.add_command(relay_cli.run)


def _mib(size: int) -> str:
    """A size in MiB, as a user reads it: ``1.5 MiB``."""
    return f"{size / (1024 * 1024):,.1f} MiB"


class _Interrupted(click.ClickException):
    """Ctrl-C: one line saying what became of the work in progress, exit status 130
    (128 + SIGINT, as a shell reports it)."""

    exit_code = 130


class _SealingInterrupted(Exception):
    """Raised from the sealing progress callback to stop sealing on Ctrl-C."""


class _Interrupt:
    """Ctrl-C caught as a flag while a command runs under trio (instead of trio's
    KeyboardInterrupt, which could land anywhere), so the command can settle what it
    started: the flag is set at once, and ``scope`` (if set) is cancelled."""

    def __init__(self) -> None:
        self.caught = False
        self.scope: Any = None

    @contextlib.contextmanager
    def installed(self) -> Any:
        import signal

        import trio

        token = trio.lowlevel.current_trio_token()

        def on_sigint(signum: int, frame: Any) -> None:
            self.caught = True
            if self.scope is not None:
                token.run_sync_soon(self.scope.cancel)

        try:
            previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread: Ctrl-C stays trio's KeyboardInterrupt
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


async def _withdrawn_text(node: Any, report_id: bytes, why: str) -> str:
    """Withdraw ``report_id`` (see :meth:`clients.node.Node.withdraw`) and say in one line
    what became of it, starting with ``why``."""
    report = report_id.hex()
    state = await node.withdraw(report_id)
    if state == "withdrawn":
        return (
            f"{why}; report {report} was withdrawn before the relay stored it and stays in "
            f"the outbox: `tisa outbox send {report}` sends it, `tisa outbox drop {report}` "
            "deletes it"
        )
    if state == "stored":
        return (
            f"{why}; the relay had already stored report {report} (with the releases "
            f"given): `tisa revoke {report}` takes it back"
        )
    if state == "uncertain":
        return (
            f"{why}; report {report} was uploaded but the relay did not answer, so it may "
            f"hold it: `tisa revoke {report}` takes it back if so"
        )
    submission = node.store.submission(report_id)
    reason = f" ({submission.reason})" if submission is not None and submission.reason else ""
    return f"{why}; report {report} was {state}{reason}"


async def _wait_sent(
    node: Any, report_id: bytes, *, interactive: bool, relay_name: str, timeout: float
) -> dict[str, Any]:
    """Wait until the relay stored ``report_id`` and answered its pending releases; on a
    terminal a spinner with the elapsed time (the node reports no upload progress, so
    there is no percentage to show)."""
    import trio
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    waiting = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        disable=not interactive,
        console=Console(stderr=True),
        transient=True,
    )
    with waiting, trio.fail_after(timeout):
        task = waiting.add_task(f"uploading to {relay_name}…", total=None)
        ack = await node.wait_stored(report_id)
        released = []
        for release in node.store.releases_of(report_id):
            waiting.update(
                task, description=f"stored by {relay_name}; releasing to {release.recipient}…"
            )
            while (state := node.store.release(release.token).state) == "pending":
                await trio.sleep(0.05)
            released.append(
                {"recipient": release.recipient, "token": release.token.hex(), "state": state}
            )
    submission = node.store.submission(report_id)
    held = [r for r in submission.recipients if r not in {x["recipient"] for x in released}]
    return {
        "report": report_id.hex(),
        "size": ack.size,
        "digest": ack.digest.hex(),
        "stored": ack.stored,
        "released": released,
        "held": held,
    }


async def _settle_send(
    node: Any,
    report_id: bytes,
    interrupt: _Interrupt,
    *,
    interactive: bool,
    relay_name: str,
    timeout: float,
    address: str,
) -> dict[str, Any]:
    """:func:`_wait_sent`, except that Ctrl-C or the timeout withdraws the report (a
    send that did not finish leaves nothing for a later command to upload)."""
    import trio

    if not interrupt.caught:
        try:
            with trio.CancelScope() as scope:
                interrupt.scope = scope
                return await _wait_sent(
                    node, report_id, interactive=interactive, relay_name=relay_name, timeout=timeout
                )
        except trio.TooSlowError:
            text = await _withdrawn_text(
                node,
                report_id,
                f"timed out waiting for the relay at {address} (--timeout {timeout:g})",
            )
            raise CliError(text) from None
        finally:
            interrupt.scope = None
    raise _Interrupted(await _withdrawn_text(node, report_id, "interrupted"))


def _print_sent(result: dict[str, Any]) -> None:
    _out.print(f"report {result['report']} stored by the relay ({result['size']} bytes sealed)")
    for release in result["released"]:
        _out.print(f"  released to {release['recipient']}: {release['state']}")
    for name in result["held"]:
        _out.print(f"  held for {name}: tisa release {result['report']} --to {name}")


@tisa.command("send")
@click.argument("text", required=False)
@click.option(
    "--file",
    "file_path",
    metavar="FILE",
    help="Send this file's content as the report body (streamed; any size); "
    "'-' reads standard input.",
)
@click.option(
    "--attach",
    "attachments",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Attach this file (under its own name); repeat.",
)
@click.option("--scope", required=True, help="One of the arrangement's scopes.")
@click.option("--level", required=True, help="One of the arrangement's levels.")
@click.option(
    "--to",
    "release_to",
    multiple=True,
    help="A recipient to seal for and release to now; repeat.",
)
@click.option(
    "--hold",
    "hold_for",
    multiple=True,
    metavar="RECIPIENT",
    help="A recipient to seal for but not release to yet (see `tisa release`); repeat.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_node_command(60.0)
def send(
    ctx: click.Context,
    text: str | None,
    file_path: str | None,
    attachments: tuple[Path, ...],
    scope: str,
    level: str,
    release_to: tuple[str, ...],
    hold_for: tuple[str, ...],
    as_json: bool,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Seal TEXT (or --file, or standard input with --file -) as a report and hand it to
    the relay.

    Recipients named with --to get a release token at once; those named with --hold
    can read it only after `tisa release`. Waits until the relay has stored it (and
    accepted the releases). On a terminal it shows its progress: a bar while it seals a
    body of 8 MiB or more, then a spinner with the elapsed time until the relay has
    stored the report; none with --json or without a terminal.

    A send that does not finish (Ctrl-C, --timeout) withdraws its report: nothing of it
    reaches the relay later unless you ask (`tisa outbox`). If the relay had stored it
    already, one line says so and how to revoke it. Ctrl-C exits with status 130.

    \b
    Examples:
      tisa --home seoul send --scope missile --level secret --to tokyo "launch at 04:12"
      tisa --home seoul send --scope missile --level secret --hold tokyo --file imagery.tif
      gzip -dc track.csv.gz | tisa send --scope missile --level secret --to tokyo --file -
    """
    if (text is None) == (file_path is None):
        raise click.UsageError("give the report as TEXT or --file, not both or neither")
    if not release_to and not hold_for:
        raise click.UsageError("name recipients with --to (release now) or --hold (release later)")
    with _body_file(file_path, _home(ctx)) as body_path:
        body: bytes | Path = text.encode("utf-8") if text is not None else Path(str(body_path))
        if isinstance(body, Path) and not body.is_file():
            raise CliError(f"{body}: not a file")
        member = node_options.load(ctx)
        size = len(body) if isinstance(body, bytes) else body.stat().st_size
        # Progress goes to stderr, and only to a terminal (rich's test, which honours
        # TTY_COMPATIBLE, TTY_INTERACTIVE and TERM=dumb) without --json: a script or a log
        # gets the result alone.
        err = Console(stderr=True)
        interactive = not as_json and err.is_interactive
        relay_name = member.arrangement.relay
        address = member.addresses
        interrupt = _Interrupt()

        async def job(node: Any) -> dict[str, Any]:
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            from tisa.errors import LimitExceeded

            # Phase 1, sealing into the outbox: a bar, for a body of 8 MiB or more.
            sealing = Progress(
                "sealing",
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                disable=not (interactive and size >= 8 * 1024 * 1024),
                console=err,
            )

            def progress(done: int, total: int) -> None:
                if interrupt.caught:
                    raise _SealingInterrupted()
                sealing.update(task, completed=done)

            with interrupt.installed(), sealing:
                task = sealing.add_task("seal", total=size)
                try:
                    report_id = await node.submit(
                        body,
                        recipients=[*release_to, *hold_for],
                        scope=scope,
                        level=level,
                        attachments=[(path.name, path) for path in attachments],
                        release_to=release_to,
                        progress=progress,
                    )
                except _SealingInterrupted:
                    raise _Interrupted(
                        "interrupted while sealing; nothing was kept or sent"
                    ) from None
                except LimitExceeded as exc:
                    raise CliError(
                        f"the report is {_mib(exc.value)} sealed, over the limit of "
                        f"{_mib(exc.maximum)} (max_report_size)"
                    ) from None
                # Phase 2, the upload until the relay's signed "stored", then the releases.
                sealing.stop()
                return await _settle_send(
                    node,
                    report_id,
                    interrupt,
                    interactive=interactive,
                    relay_name=relay_name,
                    timeout=timeout,
                    address=address,
                )

        result = _run_node(member, job, connect_timeout=timeout)
        if as_json:
            _print_json(result)
            return
        _print_sent(result)


@contextlib.contextmanager
def _body_file(file_path: str | None, home: Path) -> Iterator[Path | None]:
    """``--file``'s path; for ``-``, standard input copied to a private file in
    ``home`` (the sealer must know the body's size before it starts), removed after."""
    import tempfile

    if file_path != "-":
        yield Path(file_path) if file_path is not None else None
        return
    home.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=home, prefix=".stdin-", suffix=".body")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(sys.stdin.buffer, out, 1024 * 1024)
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def _local_store(ctx: click.Context, store: Path | None) -> Iterator[Any]:
    """The member's store opened without the key or the relay (None if there is none
    yet): for what is only local, such as the outbox's list."""
    from clients.store import MemberStore, read_store_name

    path = store or _home(ctx) / STORE_DIR
    name = read_store_name(path)
    if name is None:
        yield None
        return
    opened = MemberStore(path, name)
    try:
        yield opened
    finally:
        opened.close()


@tisa.group("outbox", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@_store_option
@click.pass_context
def outbox(ctx: click.Context, as_json: bool, store: Path | None) -> None:
    """List reports sealed but not stored by the relay; send or drop them.

    A report is withdrawn when the `tisa send` that sealed it did not finish (Ctrl-C,
    --timeout): it stays here, and nothing of it goes to the relay until `tisa outbox
    send`. A report still queued goes out with the next command that connects.

    \b
    Examples:
      tisa --home seoul outbox
      tisa --home seoul outbox send 3f2a9c...e1
      tisa --home seoul outbox drop 3f2a9c...e1
    """
    if ctx.invoked_subcommand is not None:
        return
    items: list[dict[str, Any]] = []
    with _local_store(ctx, store) as member_store:
        for submission in member_store.unsent_submissions() if member_store else ():
            releases = member_store.releases_of(submission.report)
            items.append(
                {
                    "report": submission.report.hex(),
                    "state": submission.state,
                    "size": submission.size,
                    "scope": submission.scope,
                    "level": submission.level,
                    "created": submission.created,
                    "recipients": list(submission.recipients),
                    "release_to": [r.recipient for r in releases if r.state == "pending"],
                }
            )
    if as_json:
        _print_json(items)
        return
    if not items:
        _out.print("the outbox is empty")
        return
    for item in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item["created"]))
        to = ", ".join(item["release_to"]) or "nobody yet (held)"
        _out.print(
            f"[bold]{item['report']}[/] {item['state']}: {item['scope']}/{item['level']}, "
            f"{item['size']} bytes sealed {when} UTC, for {', '.join(item['recipients'])}, "
            f"release to {to}"
        )


@outbox.command("send")
@click.argument("report")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_node_command(60.0)
def outbox_send(
    ctx: click.Context, report: str, as_json: bool, timeout: float, node_options: _NodeOptions
) -> None:
    """Send a withdrawn REPORT (and its releases) now, as `tisa send` would have.

    \b
    Example:
      tisa --home seoul outbox send 3f2a9c...e1
    """
    report_id = _hex_id(report)
    member = node_options.load(ctx)
    interrupt = _Interrupt()
    interactive = not as_json and Console(stderr=True).is_interactive

    async def job(node: Any) -> dict[str, Any]:
        with interrupt.installed():
            if node.store.submission(report_id) is None:
                raise CliError(f"report {report} is not in this member's outbox")
            if node.store.submission(report_id).state == "withdrawn":
                await node.resume(report_id)
            return await _settle_send(
                node,
                report_id,
                interrupt,
                interactive=interactive,
                relay_name=member.arrangement.relay,
                timeout=timeout,
                address=member.addresses,
            )

    result = _run_node(member, job, connect_timeout=timeout)
    if as_json:
        _print_json(result)
    else:
        _print_sent(result)


@outbox.command("drop")
@click.argument("report")
@_store_option
@click.pass_context
def outbox_drop(ctx: click.Context, report: str, store: Path | None) -> None:
    """Delete a withdrawn REPORT from the outbox, with its pending releases. Nothing is
    sent; the relay never had it (or, if `tisa send` said it may, `tisa revoke` it).

    \b
    Example:
      tisa --home seoul outbox drop 3f2a9c...e1
    """
    report_id = _hex_id(report)
    submission = None
    with _local_store(ctx, store) as member_store:
        if member_store is not None:
            submission = member_store.submission(report_id)
            if submission is not None and submission.state == "withdrawn":
                member_store.set_submission_state(report_id, "dropped", None, reason="dropped")
    if submission is None:
        raise CliError(f"report {report} is not in this member's outbox")
    if submission.state != "withdrawn":
        raise CliError(
            f"report {report} is {submission.state}, not withdrawn: "
            + (
                "it goes out with the next command that connects"
                if submission.state == "queued"
                else f"`tisa revoke {report}` takes it back"
            )
        )
    _out.print(f"dropped report {report} from the outbox")


@tisa.command("release")
@click.argument("report")
@click.option("--to", "recipients", multiple=True, required=True, help="A recipient; repeat.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_node_command(60.0)
def release(
    ctx: click.Context,
    report: str,
    recipients: tuple[str, ...],
    as_json: bool,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Release a held REPORT (its id, as `tisa send` printed it) to recipients.

    Releasing again to a recipient whose token is pending or was accepted is refused
    (`duplicate`, status 1) with nothing sent: the relay would forward the report a
    second time and the recipient refuse it. After a token expired, was refused or
    revoked, a new release is made.

    \b
    Example:
      tisa --home seoul release 3f2a9c...e1 --to tokyo
    """
    report_id = _hex_id(report)
    member = node_options.load(ctx)

    async def job(node: Any) -> list[dict[str, str]]:
        import trio

        out = []
        with trio.fail_after(timeout):
            for recipient in recipients:
                token = await node.release(report_id, recipient)
                out.append({"recipient": recipient, "token": token.hex()})
        return out

    result = _run_node(member, job, connect_timeout=timeout)
    if as_json:
        _print_json({"report": report, "released": result})
    else:
        for item in result:
            _out.print(f"released {report} to {item['recipient']} (token {item['token']})")


@tisa.command("revoke")
@click.argument("report")
@click.option("--token", help="Withdraw only this token (default: the whole report).")
@_node_command(60.0)
def revoke(
    ctx: click.Context,
    report: str,
    token: str | None,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Withdraw a report (or one token of it) that has not been delivered yet.

    Revoking what is already revoked does nothing and says so (status 0). A report or
    token already delivered cannot be taken back: that is refused (`replayed`, status
    1) and nothing changes; a report delivered to some recipients only is revoked for
    the others.

    \b
    Example:
      tisa --home seoul revoke 3f2a9c...e1
    """
    report_id = _hex_id(report)
    token_id = _hex_id(token, "token id") if token else None
    revoked = node_options.run(ctx, timeout, lambda node: node.revoke(report_id, token_id))
    what = f"token {token}" if token else f"report {report}"
    if revoked:
        _out.print(f"revoked {what}")
    else:
        _out.print(f"{what} was already revoked; nothing to do")


# --- consent: announce, request, approve, deny ----------------------------------------


@tisa.command("announce")
@click.argument("report")
@click.option("--to", "recipients", multiple=True, required=True, help="A member; repeat.")
@click.option("--title", default="", help="A short title (at most 200 bytes) they will see.")
@_node_command(60.0)
def announce(
    ctx: click.Context,
    report: str,
    recipients: tuple[str, ...],
    title: str,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Tell members that you hold REPORT, so that they can request it.

    They learn its id, scope, level, a size bucket and the title; nothing else.

    \b
    Example:
      tisa --home seoul announce 3f2a9c...e1 --to tokyo --title "Nodong launches, 26 March"
    """
    report_id = _hex_id(report)
    announcement_id: bytes = node_options.run(
        ctx, timeout, lambda node: node.announce(report_id, recipients, title=title)
    )
    _out.print(f"announced {report} to {', '.join(recipients)} ({announcement_id.hex()})")


@tisa.command("request")
@click.argument("report")
@click.option("--from", "originator", required=True, help="The report's originator.")
@click.option("--purpose", required=True, help="Why you need it (1 to 1000 bytes).")
@click.option(
    "--valid-for",
    type=click.FloatRange(min=1),
    default=7 * 24 * 3600.0,
    show_default=True,
    help="Seconds the request stays open.",
)
@_node_command(60.0)
def request(
    ctx: click.Context,
    report: str,
    originator: str,
    purpose: str,
    valid_for: float,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Ask the originator to release REPORT to you; the answer comes later
    (see `tisa requests`, and `tisa inbox` for an approved report).

    \b
    Example:
      tisa --home tokyo request 3f2a9c...e1 --from seoul --purpose "assess the launch"
    """
    report_id = _hex_id(report)
    request_id: bytes = node_options.run(
        ctx, timeout, lambda node: node.request(report_id, originator, purpose, valid_for=valid_for)
    )
    _out.print(f"requested {report} from {originator}: request {request_id.hex()}")


@tisa.command("requests")
@_watch_options("new announcements, requests and answers")
@_node_command(30.0)
def requests(
    ctx: click.Context,
    wait: float,
    as_json: bool,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Show release requests made to you and by you, and announcements you received.

    \b
    Example:
      tisa --home seoul requests
    """
    member = node_options.load(ctx)

    async def job(node: Any) -> dict[str, Any]:
        import trio

        await trio.sleep(wait)
        return {
            "requests": [
                {
                    "request": r.id.hex(),
                    "direction": r.direction,
                    "requester": r.requester,
                    "originator": r.originator,
                    "report": r.report.hex(),
                    "purpose": r.purpose,
                    "state": r.state,
                    "reason": r.reason,
                    "note": r.note,
                    "token": None if r.token is None else r.token.hex(),
                    "expires": r.expires,
                }
                for r in node.requests()
            ],
            "announcements": [
                {
                    "announcement": a.id.hex(),
                    "originator": a.originator,
                    "report": a.report.hex(),
                    "scope": a.scope,
                    "level": a.level,
                    "size_at_most": 2**a.size_bucket,
                    "title": a.title,
                }
                for a in node.announcements()
            ],
        }

    result = _run_node(member, job, connect_timeout=timeout)
    if as_json:
        _print_json(result)
        return
    table = Table(show_edge=False, title="release requests")
    for column in ("request", "from -> to", "report", "state", "purpose"):
        table.add_column(column)
    for r in result["requests"]:
        state = r["state"] + (f" ({r['reason']})" if r["reason"] else "")
        table.add_row(
            r["request"], f"{r['requester']} -> {r['originator']}", r["report"], state, r["purpose"]
        )
    _out.print(table)
    for a in result["announcements"]:
        _out.print(
            f"announced by {a['originator']}: {a['report']} {a['scope']}/{a['level']}"
            f" <= {a['size_at_most']} bytes {a['title']!r}"
        )


@tisa.command("approve")
@_request_argument
@_node_command(60.0)
def approve(
    ctx: click.Context, request_id: str, timeout: float, node_options: _NodeOptions
) -> None:
    """Approve a request made to you: release the report to the requester.

    \b
    Example:
      tisa --home seoul approve 9b1c...07
    """
    raw = _hex_id(request_id, "request id")
    token: bytes = node_options.run(ctx, timeout, lambda node: node.approve(raw))
    _out.print(f"approved {request_id} (token {token.hex()})")


@tisa.command("deny")
@_request_argument
@click.option(
    "--reason",
    required=True,
    type=click.Choice(sorted(r.value for r in DENIAL_REASONS)),
    help="The reason code the requester sees.",
)
@click.option("--note", default="", help="A note for the requester (at most 500 bytes).")
@_node_command(60.0)
def deny(
    ctx: click.Context,
    request_id: str,
    reason: str,
    note: str,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Deny a request made to you, with a reason code; final for that request.

    \b
    Example:
      tisa --home seoul deny 9b1c...07 --reason level_not_allowed --note "after consultations"
    """
    raw = _hex_id(request_id, "request id")
    node_options.run(ctx, timeout, lambda node: node.deny(raw, reason, note))
    _out.print(f"denied {request_id}: {reason}")


def _report_json(header: Any, token_id: bytes, saved: Path, body: bytes | Path) -> dict[str, Any]:
    item = {
        "report": header.id.hex(),
        "token": token_id.hex(),
        "originator": header.originator,
        "recipients": list(header.recipients),
        "scope": header.scope,
        "level": header.level,
        "created": header.created,
        "size": header.body_size,
        "attachments": [name for name, _ in header.attachments],
        "saved": str(saved),
        # None when the body is too long to show, or not text.
        "text": _body_text(body),
    }
    return item


# A body up to this size is shown (and put in --json as "text").
_TEXT_MAX = 4096


async def _write_body(body: bytes | Path, target: Path) -> None:
    """Write a report's body (bytes, or the path of its inbox file) to ``target``."""
    import trio

    if isinstance(body, bytes):
        target.write_bytes(body)
    else:
        await trio.to_thread.run_sync(shutil.copyfile, body, target)


def _body_text(body: bytes | Path) -> str | None:
    """A report's body as text, if it is short enough to show."""
    if isinstance(body, Path):
        if body.stat().st_size > _TEXT_MAX:
            return None
        body = body.read_bytes()
    return body.decode("utf-8", "replace") if len(body) <= _TEXT_MAX else None


# Once a report has arrived, inbox returns when no further delivery has started for
# this long: the relay pushes what it holds back to back, so a pause means it is done.
INBOX_SETTLE = 0.5
# Deliveries of at least this size get a progress bar on a terminal.
PROGRESS_MIN = 8 * 1024 * 1024


async def _save_report(report: Any, folder: Path) -> Path:
    """Write a delivered report's body (and attachments, if any) under ``folder``.

    The body goes to ``REPORT-ID.body``, attachments to ``REPORT-ID.attachments/NAME``
    (a name that is not a plain file name is saved as ``a<i>``)."""
    report_hex = report.header.id.hex()
    target = folder / f"{report_hex}.body"
    await _write_body(report.body, target)
    if report.attachments:
        attached = folder / f"{report_hex}.attachments"
        attached.mkdir(exist_ok=True)
        for index, (name, data) in enumerate(report.attachments.items()):
            plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name
            await _write_body(data, attached / (name if plain else f"a{index}"))
    return target


async def _show_progress(node: Any, console: Console) -> None:
    """Bars for the deliveries of at least PROGRESS_MIN bytes in progress, until
    cancelled (transient: they vanish once done)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    bars = Progress(
        TextColumn("receiving from {task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[bytes, Any] = {}
    with bars:
        while True:
            for token, (done, size, originator) in list(node.receiving.items()):
                if size < PROGRESS_MIN:
                    continue
                if token not in tasks:
                    tasks[token] = bars.add_task(originator, total=size)
                bars.update(tasks[token], completed=done)
            for token in [t for t in tasks if t not in node.receiving]:
                bars.remove_task(tasks.pop(token))
            await node.wait_receiving()


@tisa.command("inbox")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds to wait for a first delivery after connecting. Once one arrived, "
    "inbox returns as soon as no other follows (a delivery in progress is waited for).",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="List every report this member has received, not only the new ones "
    '(each with its "new" and "received" fields, as without --all).',
)
@click.option(
    "--save",
    "save_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write each report's body here as REPORT-ID.body, its attachments in "
    "REPORT-ID.attachments/ (default: HOME/received).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@_node_command(30.0)
def inbox(
    ctx: click.Context,
    wait: float,
    show_all: bool,
    save_dir: Path | None,
    as_json: bool,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Receive reports released to you, verify them and show each one once.

    Each new report's body is saved under --save (the store keeps its own copy). With
    --all, every report in your store is listed after the new ones are received, oldest
    first; a body not under --save yet is saved there again from the store. On a
    terminal, a delivery of 8 MiB or more shows a progress bar while it arrives.
    With --json, each report has the same fields with and without --all.

    \b
    Examples:
      tisa --home tokyo inbox --wait 5 --json
      tisa --home tokyo inbox --all
    """
    member = node_options.load(ctx)
    folder = save_dir or _home(ctx) / "received"
    err = Console(stderr=True)
    interactive = not as_json and err.is_interactive

    async def job(node: Any) -> list[dict[str, Any]]:
        import trio

        folder.mkdir(parents=True, exist_ok=True)
        new: list[dict[str, Any]] = []
        waiting = trio.CancelScope(deadline=trio.current_time() + wait)

        async def while_receiving() -> None:
            # A delivery under way is waited for, not the clock: the wait is pushed
            # back while one is (and for INBOX_SETTLE after it, until it is handed over).
            while True:
                if node.receiving:
                    waiting.deadline = max(waiting.deadline, trio.current_time() + INBOX_SETTLE)
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(while_receiving)
            if interactive:
                nursery.start_soon(_show_progress, node, err)
            # The wait bounds the wait for the next report, never the saving of one: a
            # report is acknowledged (never shown as new again) only once its body is
            # saved, so a command interrupted in between shows it again next time.
            async with contextlib.aclosing(node.reports()) as reports:
                while True:
                    report = None
                    with waiting:
                        report = await anext(reports, None)
                    if report is None:
                        break
                    target = await _save_report(report, folder)
                    shown = _report_json(report.header, report.token_id, target, report.body)
                    received = node.store.inbox_received(report.token_id)
                    new.append({**shown, "new": True, "received": received})
                    await node.ack(report)
                    waiting = trio.CancelScope(deadline=trio.current_time() + INBOX_SETTLE)
            nursery.cancel_scope.cancel()
        if not show_all:
            return new
        handed = {item["token"]: item for item in new}
        listed = []
        for entry, received in node.store.inbox_all():
            item = handed.get(entry.token.hex())
            if item is None:
                target = folder / f"{entry.header.id.hex()}.body"
                body = entry.parts[0] if entry.parts is not None else entry.dir / "body"
                if not target.exists():
                    await _write_body(body, target)
                item = _report_json(entry.header, entry.token, target, body)
            listed.append({**item, "new": entry.token.hex() in handed, "received": received})
        return listed

    result = _run_node(member, job, connect_timeout=timeout)
    if as_json:
        _print_json(result)
        return
    if show_all:
        new_count = sum(1 for item in result if item["new"])
        plural = "" if len(result) == 1 else "s"
        _out.print(f"{len(result)} report{plural} in the store, {new_count} new")
    elif not result:
        _out.print("no new reports")
    for item in result:
        mark = "[bold green]new[/] " if show_all and item["new"] else ""
        received = ""
        if show_all and item["received"] is not None:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item["received"]))
            received = f", received {when} UTC"
        _out.print(
            f"{mark}[bold]{item['report']}[/] from {item['originator']} "
            f"({item['scope']}/{item['level']}, {item['size']} bytes{received}), "
            "signature verified"
        )
        if item["text"] is not None:
            _out.print(f"  {item['text']}")
        if item["attachments"]:
            _out.print(f"  attachments: {', '.join(item['attachments'])}")
        _out.print(f"  saved to {item['saved']}")


def _event_json(event: Any) -> dict[str, Any]:
    from clients.events import ReceiptEvent

    if isinstance(event, ReceiptEvent):
        r = event.receipt
        return {
            "event": "receipt",
            "report": r.report.hex(),
            "token": r.token.hex(),
            "recipient": r.recipient,
            "received": r.received,
        }
    value: dict[str, Any] = {"event": event.KIND}
    for name in (
        *("report", "token", "ref", "recipient", "originator", "expected", "got"),
        *("mode", "one_time", "signed_not_after"),  # WeakerWrap, PrekeysLow
    ):
        item = getattr(event, name, None)
        if item is not None:
            value[name] = item.hex() if isinstance(item, bytes) else item
    if getattr(event, "token_id", None) is not None:  # a rejected delivery's token
        value["token"] = event.token_id.hex()
    if hasattr(event, "reason"):
        value["reason"] = str(event.reason)
        value["detail"] = event.detail
    if hasattr(event, "error"):
        value["error"] = _error_text(event.error)
    return value


def _notice_text(notice: dict[str, Any]) -> str:
    """A notice (as :func:`_event_json` gives it) in words."""
    kind = notice["event"]
    report = notice.get("report")
    token = notice.get("token")
    if kind == "receipt":
        return f"{notice['recipient']} received report {report} (signed receipt)"
    if kind == "stored":
        return f"the relay stored report {report}"
    if kind == "released":
        return f"the relay accepted the release of report {report} to {notice['recipient']}"
    if kind == "expired":
        if token:
            return f"the release of report {report} (token {token}) expired undelivered"
        return f"report {report} expired at the relay before it was released"
    if kind == "revoked":
        if token:
            return f"the release of report {report} (token {token}) was revoked"
        return f"report {report} was revoked"
    if kind == "refused":
        about = f" (about {notice['ref']})" if notice.get("ref") else ""
        detail = f": {notice['detail']}" if notice.get("detail") else ""
        return f"the relay refused something{about}: {notice['reason']}{detail}"
    if kind == "release_gap":
        return (
            f"a release from {notice['originator']} never arrived: expected number "
            f"{notice['expected']}, got {notice['got']} (ask {notice['originator']} about it)"
        )
    if kind == "prekeys_low":
        return (
            f"the relay has {notice['one_time']} one-time prekeys of this member left; "
            "publishing more"
        )
    if kind == "weaker_wrap":
        return (
            f"the release of token {token} to {notice['recipient']} went without a one-time "
            f"prekey (mode {notice['mode']}): less forward secrecy for that report"
        )
    if kind == "delivery_rejected":
        return (
            f"a delivery (token {token}) was rejected here and not shown: {notice.get('error', '')}"
        )
    return json.dumps(notice, sort_keys=True)


@tisa.command("receipts")
@_watch_options("notices")
@_node_command(30.0)
def receipts(
    ctx: click.Context,
    wait: float,
    as_json: bool,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Show the signed receipts for your reports, and new notices (refusals, expiry).

    \b
    Example:
      tisa --home seoul receipts --json
    """
    member = node_options.load(ctx)

    async def job(node: Any) -> dict[str, Any]:
        import trio

        from tisa.receipt import Receipt

        notices: list[dict[str, Any]] = []
        with trio.move_on_after(wait):
            async for event in node.events():
                notices.append(_event_json(event))
        all_receipts = []
        for encoded in node.store.receipts():
            r = Receipt.verify(encoded, member.arrangement)
            all_receipts.append(
                {
                    "report": r.report.hex(),
                    "token": r.token.hex(),
                    "recipient": r.recipient,
                    "digest": r.digest.hex(),
                    "received": r.received,
                }
            )
        return {"receipts": all_receipts, "notices": notices}

    result = _run_node(member, job, connect_timeout=timeout)
    if as_json:
        _print_json(result)
        return
    table = Table(show_edge=False, title="receipts (each signed by its recipient, verified)")
    for column in ("report", "recipient", "received"):
        table.add_column(column)
    for r in result["receipts"]:
        table.add_row(
            r["report"],
            r["recipient"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["received"])),
        )
    _out.print(table)
    for notice in result["notices"]:
        if notice["event"] != "receipt":
            _out.print(f"notice: {_notice_text(notice)}")


@tisa.command("audit")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Every entry that concerns you since the log began, the chain verified from its "
    "start through the checkpoint verified before (default: the new entries only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@_node_command(30.0)
def audit(
    ctx: click.Context,
    show_all: bool,
    as_json: bool,
    timeout: float,
    node_options: _NodeOptions,
) -> None:
    """Fetch the relay's audit entries that concern you and verify them.

    The extract must continue the hash chain from the last checkpoint this node
    verified, up to a checkpoint the relay signed; any mismatch is an error.

    \b
    Examples:
      tisa --home tokyo audit
      tisa --home tokyo audit --all --json
    """
    member = node_options.load(ctx)

    async def job(node: Any) -> list[dict[str, Any]]:
        import trio

        with trio.fail_after(timeout):
            entries = await node.fetch_audit(from_start=show_all)
        return [
            {
                "seq": e.seq,
                "time": e.time,
                "event": e.event.value,
                "report": e.report.hex() if e.report else None,
                "token": e.token.hex() if e.token else None,
                "parties": list(e.parties),
                "reason": e.reason,
            }
            for e in entries
        ]

    entries = _run_node(member, job, connect_timeout=timeout)
    if as_json:
        _print_json({"verified": True, "entries": entries})
        return
    which = "entries" if show_all else "new entries"
    table = Table(show_edge=False, title=f"audit log: {len(entries)} {which}, verified")
    for column in ("seq", "event", "report", "parties", "reason"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            str(e["seq"]),
            e["event"],
            (e["report"] or "")[:16],
            ", ".join(e["parties"]),
            e["reason"] or "",
        )
    _out.print(table)


# --- demo ------------------------------------------------------------------------------


@tisa.command("demo")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep keys, arrangement, stores and logs in this folder (reused when run again); "
    "default: a temporary folder, removed afterwards.",
)
@click.option(
    "--large-mib",
    type=click.IntRange(min=0),
    default=200,
    show_default=True,
    help="Size of the large report in MiB (0 skips it).",
)
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every event of the exchange to this file as JSON lines.",
)
@click.option(
    "--diagram",
    "diagram_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Draw the exchange as a sequence diagram (HTML with SVG) into this file.",
)
def demo(
    folder: Path | None, large_mib: int, trace_path: Path | None, diagram_path: Path | None
) -> None:
    """Run Seoul, the Washington relay and Tokyo as three processes and tell the story.

    Every step is checked; the exit status is 1 if any check failed, so the demo is
    also a smoke test. Keys use a fixed passphrase and the cheapest key-file cost: they
    are demo keys, never use them for anything else.

    \b
    Example:
      tisa demo --large-mib 16 --trace t.jsonl --diagram exchange.html
    """
    from tisa_cli.demo import run_demo

    ok = run_demo(
        folder=folder, large_mib=large_mib, trace_path=trace_path, diagram_path=diagram_path
    )
    if not ok:
        raise click.exceptions.Exit(1)


@tisa.command("trace-diagram")
@click.argument("trace_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="HTML file to write (one self-contained SVG, no scripts).",
)
def trace_diagram(trace_file: Path, out: Path) -> None:
    """Draw a trace written by `tisa demo --trace` as a sequence diagram.

    \b
    Example:
      tisa trace-diagram t.jsonl --out exchange.html
    """
    from tisa_cli.demo_trace import read_trace, render_html

    try:
        events = read_trace(trace_file)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with atomic_text(out) as handle:
        handle.write(render_html(events))
    _out.print(f"wrote {out} ({len(events)} events)")


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point (``tisa``)."""
    tisa.main(args=list(argv) if argv is not None else None, prog_name="tisa")


if __name__ == "__main__":
    main()
