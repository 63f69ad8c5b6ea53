"""The three-node demo: Seoul, the Washington relay and Tokyo, as three processes.

:func:`run_demo` generates keys and a fully signed arrangement into a folder, starts the
relay (``python -m relay``) and one :mod:`tisa_cli.demo_member` process per member, all on
127.0.0.1, and walks through the story of the 2014 trilateral arrangement, checking at
every step that the system did what it should:

1. Seoul seals a missile-test report for Tokyo and holds it.
2. Washington holds only ciphertext: the demo reads the relay's store and shows the
   digest and size bucket, and that neither the text nor the content key is in it.
3. Tokyo cannot read it: nothing is delivered while Seoul holds it.
4. Seoul releases it to Tokyo; Washington checks the token, consumes it, forwards.
5. Tokyo opens it and verifies Seoul's signature; Seoul gets Tokyo's signed receipt.
6. An out-of-scope report is refused by Seoul's own node, and a crafted out-of-scope
   token sent straight to the relay is refused by the relay.
7. A forged token and a replayed token are refused by the relay.
8. Seoul and Tokyo fetch their part of the audit log and verify it.
9. The other direction: Tokyo originates a report for Seoul.
10. On request: Seoul holds two reports and announces them to Tokyo; Tokyo requests
    both; Seoul approves one (a token naming the request) and denies the other with a
    reason code, which Tokyo sees.
11. Forward secrecy: while Tokyo is offline Seoul releases a report to it, and the demo
    copies what Washington queues (the token and the ciphertext); Tokyo comes back and
    opens it, its node deletes the one-time prekey's secret, and then Tokyo's key file
    plus every secret it still holds open nothing from that copy, while the same copy
    with the deleted secret (kept aside by the demo) opens it.
12. A large report goes through, with a progress bar.

It ends with a summary table; :func:`run_demo` returns False when any check failed, and
``tisa demo`` then exits non-zero, so the demo doubles as a smoke test.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import queue
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tisa.arrangement import SignedArrangement
from tisa.errors import KeyFileError, TisaError
from tisa.keys import Hash, Hasher, MemberSecret
from tisa.limits import CHUNK_SIZE
from tisa.prekeys import PrekeyKind, PrekeySecret, WrapMode
from tisa.report import ABYTES, HEADER_BYTES, OpenedReport
from tisa.token import ReleaseToken
from tisa_cli.demo_trace import TraceEvent, TraceWriter, render_html
from tisa_io.files import (
    ARRANGEMENT_FILE,
    IDENTITY_FILE,
    create_identity,
    draft_arrangement,
    read_arrangement,
    sign_arrangement,
    write_arrangement,
)
from tisa_testing.secrecy import held_prekey_secrets, open_record, used_one_time_prekeys

__all__ = ["DEMO_MEMBERS", "Deployment", "prepare_deployment", "run_demo"]

PASSPHRASE_ENV = "TISA_DEMO_PASSPHRASE"
# The demo's key files are protected by this fixed passphrase and the cheapest argon2id
# cost: they are throwaway keys in a throwaway folder, never a deployment's.
DEMO_PASSPHRASE = "tisa-demo-only"
DEMO_MEMBERS: dict[str, tuple[str, ...]] = {
    "seoul": ("originator", "recipient"),
    "washington": ("relay",),
    "tokyo": ("originator", "recipient"),
}
SCOPES = ("missile", "nuclear")
LEVELS = ("restricted", "confidential", "secret")
# Seconds to wait for a process to start (relay port file, member handshake).
START_TIMEOUT = 30.0
# Seconds Tokyo watches for a delivery while Seoul still holds the report.
HOLD_WATCH = 1.5
# Where the forward-secrecy step keeps its copy of what the relay queued (in the folder).
RECORD_DIR = "washington-record"
REPORT_TEXT = (
    "SEOUL/JCS 2014-12-29 0412 KST. North Korea launched two short-range ballistic "
    "missiles from near Sukchon toward the East Sea; flight about 500 km, apogee 130 km. "
    "Assessed: Scud-ER class. Releasable to Tokyo via Washington on Seoul's approval."
)

TOKYO_TEXT = (
    "TOKYO/JSO 2014-12-30 0930 JST. SPY-1 radar tracks of yesterday's launches from "
    "the Sea of Japan: impact points 35 km apart. Releasable to Seoul via Washington on "
    "Tokyo's approval."
)
# Two reports Seoul holds and announces, for Tokyo to request: one approved, one denied.
ON_REQUEST = (
    ("Sukchon launch: imagery assessment", "SEOUL/NIS 2014-12-30. Imagery of the Sukchon site."),
    ("Sinpo: submarine activity", "SEOUL/NIS 2014-12-30. Activity at the Sinpo shipyard."),
)

FS_TEXT = (
    "SEOUL/JCS 2014-12-31 1100 KST. Transporter-erector-launchers moved at Sukchon "
    "overnight. Releasable to Tokyo via Washington on Seoul's approval."
)

COLORS = {
    "seoul": "cyan",
    "washington": "yellow",
    "tokyo": "magenta",
    "demo": "white",
    "adversary": "red",
}


class DemoError(Exception):
    """A step of the demo could not be carried out (a process died, an answer was late)."""


@dataclass
class Deployment:
    """Key files and the effective arrangement of a demo, in ``folder``."""

    folder: Path
    keys: dict[str, Path]
    arrangement_path: Path
    signed: SignedArrangement

    def store(self, name: str) -> Path:
        """The store directory of member ``name`` (the relay is ``washington``)."""
        return self.folder / name / "store"


def prepare_deployment(
    folder: Path, *, announce: Callable[[str], None] | None = None
) -> Deployment:
    """Create (or reuse) the demo's keys and fully signed arrangement in ``folder``.

    Keys and the arrangement are kept when they are already there and fit together, so
    a named folder can be run again; the nodes' stores are always started afresh.

    Raises:
        KeyFileError: a key file in the folder is not a demo key (its path is named).
        OSError: the folder cannot be created or written.
    """
    say = announce or (lambda text: None)
    folder.mkdir(parents=True, exist_ok=True)
    keys = {name: folder / name / IDENTITY_FILE for name in DEMO_MEMBERS}
    secrets: dict[str, MemberSecret] = {}
    for name, path in keys.items():
        if path.exists():
            try:
                secrets[name] = MemberSecret.load(path, DEMO_PASSPHRASE)[0]
            except KeyFileError as exc:
                # A folder a new user pointed --dir at: say which file, and the way out.
                raise KeyFileError(
                    f"{path}: {exc} (not a demo key: remove it, or choose another --dir)"
                ) from None
        else:
            secrets[name] = create_identity(path, name, DEMO_PASSPHRASE, insecure_fast_kdf=True)
            say(f"{name} generated its keys, fingerprint {secrets[name].public.fingerprint}")
    arrangement_path = folder / ARRANGEMENT_FILE
    signed: SignedArrangement | None = None
    if arrangement_path.exists():
        with contextlib.suppress(Exception):
            signed = read_arrangement(arrangement_path)
            members = signed.arrangement.members
            if not signed.is_effective or any(
                m.identity != secrets[m.name].public for m in members
            ):
                signed = None
    if signed is None:
        signed = draft_arrangement(
            name="tisa-2014",
            members=[(n, secrets[n].public, roles) for n, roles in DEMO_MEMBERS.items()],
            scopes=SCOPES,
            levels=LEVELS,
        )
        write_arrangement(arrangement_path, signed)
        say(
            f"drafted arrangement tisa-2014: scopes {', '.join(SCOPES)}; "
            f"levels {' < '.join(LEVELS)}"
        )
        # Each party signs on its own, in its own time: no joint ceremony.
        for name in ("washington", "tokyo", "seoul"):
            signed, _ = sign_arrangement(signed, secrets[name], name)
            write_arrangement(arrangement_path, signed)
            missing = ", ".join(signed.missing) or "nobody: effective at once"
            say(f"{name} signed separately; missing {missing}")
    for name in DEMO_MEMBERS:
        shutil.rmtree(folder / name / "store", ignore_errors=True)
    for debris in ("relay.port", "seoul.log", "tokyo.log", "relay.log", "large-report.bin"):
        with contextlib.suppress(FileNotFoundError):
            (folder / debris).unlink()
    shutil.rmtree(folder / RECORD_DIR, ignore_errors=True)
    return Deployment(folder=folder, keys=keys, arrangement_path=arrangement_path, signed=signed)


# --- child processes --------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env[PASSPHRASE_ENV] = DEMO_PASSPHRASE
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])
    return ""


class Agent:
    """A member process (:mod:`tisa_cli.demo_member`) and its JSON-lines conversation."""

    def __init__(
        self,
        name: str,
        deployment: Deployment,
        relay: str,
        on_trace: Callable[[dict[str, Any]], None],
    ) -> None:
        self.name = name
        self.log_path = deployment.folder / f"{name}.log"
        # Appended to: a member restarted in the demo keeps the log of its first run.
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tisa_cli.demo_member",
                "--key",
                str(deployment.keys[name]),
                "--passphrase-env",
                PASSPHRASE_ENV,
                "--arrangement",
                str(deployment.arrangement_path),
                "--relay",
                relay,
                "--store",
                str(deployment.store(name)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=_child_env(),
            text=True,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._on_trace = on_trace
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def _next_line(self, deadline: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise DemoError(f"{self.name} did not answer {what} in time") from None
        if line is None:
            raise DemoError(f"{self.name} process ended: {_tail(self.log_path)}")
        return line

    def wait_ready(self) -> None:
        """Wait until the member process says it is connected to the relay.

        Raises:
            DemoError: no ``ready`` line within :data:`START_TIMEOUT` seconds, or the process
                ended.
        """
        deadline = time.monotonic() + START_TIMEOUT
        while "ready" not in self._next_line(deadline, "start-up"):
            pass

    def request(
        self,
        op: str,
        *,
        timeout: float = 30.0,
        on_progress: Callable[[int, int], None] | None = None,
        **args: Any,
    ) -> dict[str, Any]:
        """Send a command and wait for its answer; trace and progress lines are passed on.

        Raises:
            DemoError: no answer within ``timeout``, or the process died.
        """
        self._next_id += 1
        request_id = self._next_id
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"id": request_id, "op": op, **args}) + "\n")
            self.process.stdin.flush()
        except OSError:
            raise DemoError(f"{self.name} process is gone: {_tail(self.log_path)}") from None
        deadline = time.monotonic() + timeout
        while True:
            line = self._next_line(deadline, op)
            if "trace" in line:
                self._on_trace(line["trace"])
            elif "progress" in line:
                if on_progress is not None:
                    on_progress(int(line["progress"]), int(line["total"]))
            elif line.get("id") == request_id:
                return line

    def close(self) -> None:
        """Ask the process to quit, then stop it and close its log.

        The quit answer is awaited 5 s (a failed request is ignored); a process still
        running after that is terminated, and killed if it has not ended 5 s later.
        """
        with contextlib.suppress(Exception):
            self.request("quit", timeout=5)
        _stop(self.process)
        self._log.close()


def _stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def _relay(deployment: Deployment) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port_file = deployment.folder / "relay.port"
    log_path = deployment.folder / "relay.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "--key",
                str(deployment.keys["washington"]),
                "--passphrase-env",
                PASSPHRASE_ENV,
                "--arrangement",
                str(deployment.arrangement_path),
                "--store",
                str(deployment.store("washington")),
                "--port",
                "0",
                "--port-file",
                str(port_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_child_env(),
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not port_file.exists():
                if process.poll() is not None:
                    raise DemoError(f"the relay did not start: {_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise DemoError("the relay did not report its port in time")
                time.sleep(0.05)
            yield process, int(port_file.read_text().strip())
        finally:
            _stop(process)


# --- the relay's holdings ---------------------------------------------------------------


def _relay_db(store: Path, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """One row of the relay's database, read-only (the relay keeps running), or None."""
    if not (store / "relay.db").exists():
        return None
    try:
        db = sqlite3.connect(f"file:{store / 'relay.db'}?mode=ro", uri=True)
        try:
            row: tuple[Any, ...] | None = db.execute(sql, args).fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise OSError(f"cannot read the relay's store: {exc}") from None
    return row


def _relay_ciphertext(store: Path, report_hex: str) -> tuple[str, BinaryIO] | None:
    """Where the relay keeps one report's ciphertext, and a reader over it; or None.

    A large report is a file under ``blobs/``; a small one is kept in its row of the
    relay's database (``reports.data``).
    """
    for path in sorted(store.rglob(f"*{report_hex}*")):
        if path.is_file():
            return str(path.relative_to(store)), open(path, "rb")
    row = _relay_db(store, "SELECT data FROM reports WHERE id = ?", (bytes.fromhex(report_hex),))
    if row is not None and row[0] is not None:
        return "relay.db (inline row)", io.BytesIO(bytes(row[0]))
    return None


def relay_holdings(
    store: Path, report_hex: str, plaintext: bytes, content_key: bytes
) -> dict[str, Any]:
    """What the relay's store holds for one report, read from its files.

    Returns the ciphertext file's size and digest, the padded size it reveals, and
    whether the plaintext or the content key occurs anywhere in the store's files.
    """
    found_plain = found_key = False
    for path in sorted(store.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found_plain = found_plain or plaintext in data
        found_key = found_key or content_key in data
    result: dict[str, Any] = {"plaintext_found": found_plain, "key_found": found_key}
    source = _relay_ciphertext(store, report_hex)
    if source is not None:
        where, handle = source
        hasher = Hasher(Hash.CIPHERTEXT)
        size = 0
        with handle:
            while data := handle.read(1024 * 1024):
                hasher.update(data)
                size += len(data)
        chunks = -(-(size - HEADER_BYTES) // (CHUNK_SIZE + ABYTES))
        result.update(
            file=where,
            size=size,
            digest=hasher.finish().hex(),
            padded=size - HEADER_BYTES - ABYTES * chunks,
        )
    return result


@dataclass(frozen=True)
class RelayRecord:
    """What the relay holds, and forwards, for one queued delivery: the encoded release
    token and the report's ciphertext, byte for byte as in its store.

    Attributes:
        token: the encoded token (its key wrap included).
        ciphertext: the whole ciphertext.
        where: where the ciphertext is kept (a file under the store, or its database row).
    """

    token: bytes
    ciphertext: bytes
    where: str


def relay_record(store: Path, token_id: bytes, report_hex: str) -> RelayRecord:
    """Copy, from the relay's store, the token ``token_id`` it queues and the ciphertext of
    report ``report_hex``: what anyone who records the relay's disk or traffic keeps.

    Raises:
        DemoError: the relay holds no such token (or has already dropped it, once the
            recipient acknowledged it), or no ciphertext for the report.
        OSError: the store cannot be read.
    """
    row = _relay_db(store, "SELECT token FROM tokens WHERE id = ?", (token_id,))
    if row is None or not row[0]:
        raise DemoError(f"the relay holds no token {token_id.hex()[:8]}")
    source = _relay_ciphertext(store, report_hex)
    if source is None:
        raise DemoError(f"the relay holds no ciphertext for {report_hex[:8]}")
    where, handle = source
    with handle:
        ciphertext = handle.read()
    return RelayRecord(token=bytes(row[0]), ciphertext=ciphertext, where=where)


# --- the story --------------------------------------------------------------------------


@dataclass
class Check:
    """One verdict of the demo.

    Attributes:
        step: what was checked.
        expected, observed: what should have happened and what did.
        ok: whether the step passed.
    """

    step: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Demo:
    """The story as it runs: timeline output, trace, member processes and verdicts.

    Attributes:
        console: where the timeline goes.
        trace: every event, for the JSON trace and the diagram.
        deployment: keys, arrangement and stores (:func:`run_demo` sets it once prepared).
        large_mib: size of the large report of step 8, in MiB.
        start: the monotonic time the timeline counts from.
        checks: the verdicts so far, in order.
        agents: the member processes by name.
        facts: what a step learns for a later one (``report``, ``token``).
        relay_address: the relay's HOST:PORT, once it runs (for :meth:`start_agent`).
    """

    console: Console
    trace: TraceWriter
    deployment: Deployment
    large_mib: int
    start: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    agents: dict[str, Agent] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    relay_address: str = ""

    # --- member processes ---------------------------------------------------------------

    def start_agent(self, name: str) -> Agent:
        """Start member ``name``'s process and wait until it is connected to the relay.

        The agent is in :attr:`agents` (so :meth:`close_agents` stops it) even when it
        does not get ready.

        Raises:
            DemoError: it did not get ready within :data:`START_TIMEOUT` seconds, or ended.
            OSError: the process could not be started.
        """
        agent = Agent(name, self.deployment, self.relay_address, self.on_trace)
        self.agents[name] = agent
        agent.wait_ready()
        return agent

    def close_agents(self) -> None:
        """Stop every member process (:meth:`Agent.close`), the last started first.

        Each is closed even when closing another raised (a second Ctrl-C, say): that
        exception is raised once all were tried.
        """
        agents = list(self.agents.values())
        self.agents.clear()
        with contextlib.ExitStack() as stack:
            for agent in agents:
                stack.callback(agent.close)

    # --- output -------------------------------------------------------------------------

    def _t(self) -> float:
        return time.monotonic() - self.start

    def _line(self, actor: str, text: str, style: str = "") -> None:
        color = COLORS.get(actor, "white")
        self.console.print(
            f"[dim]{self._t():6.2f}s[/] [bold {color}]{actor.capitalize():<11}[/]"
            f"{f'[{style}]' if style else ''}{text}{'[/]' if style else ''}",
            highlight=False,
        )

    def say(self, actor: str, text: str) -> None:
        """A line of the story; also a note in the trace."""
        self._line(actor, text)
        self.trace.add(TraceEvent(t=self._t(), kind="note", label=text, source=actor))

    def on_trace(self, value: dict[str, Any]) -> None:
        """Record a trace line from a member process, timed now, and print it on the timeline.

        Raises:
            ValueError: ``value`` is not a trace event.
        """
        event = TraceEvent.from_json({**value, "t": self._t()})
        self.trace.add(event)
        if event.kind == "message":
            style = "dim" if event.status == "ok" else "bold red"
            arrow = f"→ {event.target.capitalize()}"
            self._line(event.source, f"{arrow:<13} {event.label}", style)
        else:
            self._line(event.source, event.label, "dim")

    def heading(self, text: str) -> None:
        """Print ``text`` as a heading rule on the console (it is not traced)."""
        self.console.print()
        self.console.rule(f"[bold]{text}", align="left")

    def check(self, step: str, expected: str, observed: str, ok: bool) -> bool:
        """Record a verdict: print it, trace it as a step and keep it for the summary.

        Returns:
            ``ok``, so a step can go on only when its check passed.
        """
        self.checks.append(Check(step, expected, observed, ok))
        status = "ok" if ok else "fail"
        mark = "[green]✓[/]" if ok else "[bold red]✗[/]"
        self.console.print(f"         {mark} {step}: {observed}", highlight=False)
        self.trace.add(
            TraceEvent(
                t=self._t(),
                kind="step",
                label=f"{'✓' if ok else '✗'} {step}",
                status=status,
                detail={"expected": expected, "observed": observed},
            )
        )
        return ok

    # --- steps --------------------------------------------------------------------------

    def step(self, title: str, func: Callable[[], None]) -> None:
        """Run one step; a step that cannot be carried out is a failed check."""
        self.heading(title)
        try:
            func()
        except (DemoError, KeyError, OSError, ValueError, TisaError) as exc:
            self.check(title, "the step runs", f"could not run it: {exc}", False)

    def seal_and_hold(self) -> None:
        """Step 1: Seoul submits :data:`REPORT_TEXT` for Tokyo without releasing it.

        Checks that the relay stored it (Seoul's node verified the signed ack) and keeps
        Seoul's answer in ``facts["report"]``.

        Raises:
            DemoError: Seoul did not answer in time, or its process ended.
        """
        self.say("seoul", "seals a missile-test report for Tokyo (scope missile, level secret)")
        answer = self.seoul_holds(REPORT_TEXT, refused_ok=True)
        ok = bool(answer.get("ok"))
        if ok:
            self.facts["report"] = answer
        self.check(
            "Seoul seals and submits, holding the release",
            "the relay stores it and signs an acknowledgement",
            f"stored, report {answer['report'][:16]}…, ack verified"
            if ok
            else f"refused: {answer.get('error')}",
            ok,
        )

    def relay_holds_ciphertext(self) -> None:
        """Step 2: reads the relay's store (:func:`relay_holdings`) for the report of step 1.

        Checks that it holds the ciphertext with the digest Seoul computed, and neither the
        text nor the content key anywhere.

        Raises:
            KeyError: step 1 stored no report.
            DemoError: the store holds no ciphertext for the report.
            OSError: the store cannot be read.
        """
        report = self.facts["report"]
        held = relay_holdings(
            self.deployment.store("washington"),
            report["report"],
            REPORT_TEXT.encode(),
            bytes.fromhex(report["content_key"]),
        )
        if "digest" not in held:
            raise DemoError("no ciphertext file for the report in the relay's store")
        self.say(
            "washington",
            f"holds {held['file']}: {held['size']} bytes, digest {held['digest'][:16]}…",
        )
        self.say(
            "washington",
            f"size bucket {held['padded']} bytes (the text is {len(REPORT_TEXT)} bytes; "
            "every report under 1 KiB looks the same)",
        )
        ok = (
            held["digest"] == report["digest"]
            and not held["plaintext_found"]
            and not held["key_found"]
        )
        self.check(
            "Washington holds only ciphertext",
            "digest matches; no plaintext and no content key anywhere in its store",
            f"digest {'matches' if held['digest'] == report['digest'] else 'DIFFERS'}; "
            f"plaintext {'FOUND' if held['plaintext_found'] else 'absent'}; "
            f"content key {'FOUND' if held['key_found'] else 'absent'}",
            ok,
        )

    def tokyo_cannot_read(self) -> None:
        """Step 3: checks that Tokyo gets nothing within :data:`HOLD_WATCH` seconds.

        Raises:
            DemoError: Tokyo did not answer in time, or its process ended.
        """
        self.say("tokyo", f"is connected and waits {HOLD_WATCH:.1f} s for anything from Seoul")
        answer = self.agents["tokyo"].request("expect_report", timeout=30, wait=HOLD_WATCH)
        ok = answer.get("ok") and answer.get("report") is None
        self.check(
            "Tokyo cannot read it while Seoul holds it",
            "nothing delivered",
            "nothing delivered" if ok else f"got {answer.get('report')}",
            bool(ok),
        )

    def release_and_deliver(self) -> None:
        """Step 4: Seoul releases the report of step 1 to Tokyo.

        Checks that the relay accepts the token, that Tokyo opens the same text from Seoul,
        and that Seoul gets Tokyo's signed receipt for it; keeps the token id in
        ``facts["token"]``.

        Raises:
            KeyError: step 1 stored no report.
            DemoError: a member did not answer in time, or its process ended.
        """
        report = self.facts["report"]
        self.say(
            "seoul", "approves: issues a release token for Tokyo (content key sealed to Tokyo)"
        )
        released = self.agents["seoul"].request("release", report=report["report"], to="tokyo")
        self.check(
            "Seoul releases to Tokyo; Washington checks and consumes the token",
            "released",
            "released" if released.get("ok") else f"refused: {released.get('error')}",
            bool(released.get("ok")),
        )
        if released.get("ok"):
            self.facts["token"] = released["token"]
        got = self.agents["tokyo"].request("expect_report", timeout=30, wait=20)
        ok = (
            got.get("report") == report["report"]
            and got.get("originator") == "seoul"
            and got.get("sha256") == report["sha256"]
        )
        if got.get("text"):
            self.say("tokyo", f"reads: “{got['text'][:90]}…”")
        self.check(
            "Tokyo opens it and verifies Seoul's signature",
            "the same text, signed by Seoul, scope missile, level secret",
            f"from {got.get('originator')}, {got.get('scope')}/{got.get('level')}, "
            f"text {'identical' if got.get('sha256') == report['sha256'] else 'DIFFERENT'}"
            if got.get("report")
            else "nothing delivered",
            ok,
        )
        receipt = self.agents["seoul"].request("expect_receipt", timeout=30, wait=20)
        ok = (
            receipt.get("report") == report["report"]
            and receipt.get("recipient") == "tokyo"
            and receipt.get("digest") == report["digest"]
        )
        self.check(
            "Seoul gets Tokyo's signed receipt",
            "a receipt signed by Tokyo for this report and ciphertext",
            f"receipt from {receipt.get('recipient')}, verified" if ok else "no valid receipt",
            ok,
        )

    def out_of_scope(self) -> None:
        """Step 5: a share of scope ``cyber``, which the arrangement lacks.

        Checks that Seoul's node refuses the report itself, and that the relay refuses a
        token for that scope sent on a raw connection (both ``out_of_scope``).

        Raises:
            DemoError: Seoul did not answer in time, or its process ended.
        """
        self.say("seoul", "tries to share a cyber report: not in the arrangement's scopes")
        local = self.agents["seoul"].request(
            "try_seal",
            text="cyber intrusion report",
            recipients=["tokyo"],
            scope="cyber",
            level="secret",
        )
        self.check(
            "Out-of-scope report refused by the originator's node",
            "refused out_of_scope before anything is sent",
            f"refused {local.get('refused')}" if local.get("refused") else "NOT refused",
            local.get("refused") == "out_of_scope",
        )
        self.say("seoul", "(crafted) sends the relay a token for scope cyber, signed by Seoul")
        remote = self.agents["seoul"].request("raw_out_of_scope", scope="cyber", to="tokyo")
        self.check(
            "Out-of-scope token refused by the relay",
            "refused out_of_scope",
            f"refused {remote.get('refused')}" if remote.get("refused") else str(remote),
            remote.get("refused") == "out_of_scope",
        )

    def forged_and_replayed(self) -> None:
        """Step 6: checks that the relay refuses a token with a forged signature
        (``bad_signature``) and the token of step 4 sent again (``replayed``).

        Raises:
            KeyError: step 4 released no token.
            DemoError: Seoul did not answer in time, or its process ended.
        """
        self.say("seoul", "(crafted) sends the relay a token with a forged signature")
        forged = self.agents["seoul"].request("raw_forged", to="tokyo")
        self.check(
            "Forged token refused by the relay",
            "refused (bad signature)",
            f"refused {forged.get('refused')}" if forged.get("refused") else str(forged),
            forged.get("refused") == "bad_signature",
        )
        token = self.facts["token"]
        self.say("seoul", f"(crafted) sends the relay token {token[:8]}… again")
        replay = self.agents["seoul"].request("raw_replay", token=token)
        self.check(
            "Replayed token refused by the relay",
            "refused replayed",
            f"refused {replay.get('refused')}" if replay.get("refused") else str(replay),
            replay.get("refused") == "replayed",
        )

    def other_direction(self) -> None:
        """Step 8: Tokyo originates a report for Seoul, through the same relay.

        Checks that Seoul opens Tokyo's text and that Tokyo gets Seoul's signed receipt.

        Raises:
            DemoError: a member did not answer in time, or its process ended.
        """
        self.say("tokyo", "seals a radar report for Seoul and releases it (scope missile)")
        sent = self.agents["tokyo"].request(
            "submit",
            text=TOKYO_TEXT,
            recipients=["seoul"],
            scope="missile",
            level="confidential",
            release_to=["seoul"],
        )
        got = self.agents["seoul"].request("expect_report", timeout=30, wait=20)
        ok = (
            bool(sent.get("ok"))
            and got.get("report") == sent.get("report")
            and got.get("originator") == "tokyo"
            and got.get("sha256") == sent.get("sha256")
        )
        if got.get("text"):
            self.say("seoul", f"reads: “{got['text'][:90]}…”")
        self.check(
            "Tokyo → Washington → Seoul: Seoul opens Tokyo's report",
            "the same text, signed by Tokyo",
            f"from {got.get('originator')}, text "
            f"{'identical' if got.get('sha256') == sent.get('sha256') else 'DIFFERENT'}"
            if got.get("report")
            else f"nothing delivered ({sent.get('error', 'sent')})",
            ok,
        )
        receipt = self.agents["tokyo"].request("expect_receipt", timeout=30, wait=20)
        ok = receipt.get("report") == sent.get("report") and receipt.get("recipient") == "seoul"
        self.check(
            "Tokyo gets Seoul's signed receipt",
            "a receipt signed by Seoul",
            f"receipt from {receipt.get('recipient')}, verified" if ok else "no valid receipt",
            ok,
        )

    def seoul_holds(self, text: str, *, refused_ok: bool = False) -> dict[str, Any]:
        """Seoul seals ``text`` for Tokyo (missile, secret) and submits it, held.

        Returns:
            Seoul's answer (``report``, ``digest``, ``sha256``...; with ``refused_ok``,
            ``ok`` False and ``error`` for a refusal).

        Raises:
            DemoError: the submission was refused (unless ``refused_ok``), Seoul did not
                answer, or it ended.
        """
        held = self.agents["seoul"].request(
            "submit",
            text=text,
            recipients=["tokyo"],
            scope="missile",
            level="secret",
            release_to=[],
        )
        if not held.get("ok") and not refused_ok:
            raise DemoError(f"Seoul could not submit: {held.get('error')}")
        return held

    def on_request(self) -> None:
        """Step 9: Seoul holds two reports and announces them; Tokyo requests both;
        Seoul approves one and denies the other with a reason.

        Checks that each request reaches Seoul, that the approved report reaches Tokyo
        under a token naming the request, and that Tokyo gets the signed denial with its
        reason code and note.

        Raises:
            DemoError: a member did not answer in time, or its process ended.
        """
        seoul, tokyo = self.agents["seoul"], self.agents["tokyo"]
        reports = []
        for title, text in ON_REQUEST:
            held = self.seoul_holds(text)
            seoul.request("announce", report=held["report"], to=["tokyo"], title=title)
            reports.append(held)
            self.say("seoul", f"holds and announces to Tokyo: “{title}”")
        requests = {}
        for held in reports:
            asked = tokyo.request(
                "request",
                report=held["report"],
                originator="seoul",
                purpose="joint assessment of the 29 December launches",
            )
            requests[held["report"]] = asked.get("request")
        seen = [seoul.request("expect_request", timeout=30, wait=20) for _ in reports]
        arrived = {r.get("report"): r.get("request") for r in seen}
        ok = arrived == requests and all(r.get("requester") == "tokyo" for r in seen)
        self.check(
            "Tokyo requests both; Washington forwards to Seoul",
            "two signed requests from Tokyo, each for one announced report",
            f"{sum(1 for r in seen if r.get('request'))} request(s) from "
            f"{', '.join(sorted({str(r.get('requester')) for r in seen}))}",
            ok,
        )
        first, second = (requests[held["report"]] for held in reports)
        self.say("seoul", "approves the first: a release token that names Tokyo's request")
        approved = seoul.request("approve", request=first)
        self.say("seoul", "denies the second: level_not_allowed, “not before consultations”")
        denied = seoul.request(
            "deny", request=second, reason="level_not_allowed", note="not before consultations"
        )
        got = tokyo.request("expect_report", timeout=30, wait=20)
        answers = [tokyo.request("expect_answer", timeout=30, wait=20) for _ in reports]
        outcome = {a.get("request"): a for a in answers}
        ok = (
            bool(approved.get("ok"))
            and got.get("report") == reports[0]["report"]
            and got.get("sha256") == reports[0]["sha256"]
            and outcome.get(first, {}).get("outcome") == "approved"
        )
        self.check(
            "Seoul approves one: Tokyo reads it",
            "the report, under a token naming the request",
            f"report {'delivered' if got.get('report') else 'missing'}, answer "
            f"{outcome.get(first, {}).get('outcome')}",
            ok,
        )
        denial = outcome.get(second, {})
        ok = (
            bool(denied.get("ok"))
            and denial.get("outcome") == "denied"
            and denial.get("reason") == "level_not_allowed"
        )
        self.check(
            "Seoul denies the other: Tokyo sees why",
            "a denial signed by Seoul, reason level_not_allowed",
            f"{denial.get('outcome')}: {denial.get('reason')} “{denial.get('note')}”",
            ok,
        )

    def forward_secrecy(self) -> None:
        """Step 10: a report that cannot be opened once Tokyo's one-time prekey is gone.

        Tokyo goes offline; Seoul releases a report to it, and the demo copies what
        Washington queues for Tokyo from Washington's store (:func:`relay_record`: the
        token and the ciphertext it then forwards). Tokyo comes back and opens it. Checks
        that the record is the real one (its key wrapped to a one-time prekey of Tokyo's,
        the ciphertext's digest Seoul's), that Tokyo opens the report, that Tokyo's store
        on disk no longer holds that prekey's secret, that Tokyo's key file plus every
        prekey secret left in its store open nothing from the record
        (:func:`tisa_testing.secrecy.open_record` raises VerificationError), and that the
        same record with the deleted secret, copied before by the demo, does open it: so
        the refusal is the deletion's doing, not a gap in the record.

        Raises:
            DemoError: a member did not answer in time, a process ended, or the relay's
                store holds no such delivery.
            OSError: a store or the key file cannot be read.
        """
        seoul = self.agents["seoul"]
        tokyo_store = self.deployment.store("tokyo")
        self.say("tokyo", "goes offline: its node stops, so Washington queues what comes for it")
        # Closed before it leaves agents: a close cut short (Ctrl-C) is retried at the end.
        self.agents["tokyo"].close()
        del self.agents["tokyo"]
        # Demo only: the secrets Tokyo holds now, kept in this process's memory, to show
        # below that the record is complete (with the right secret it opens).
        before = {p.public: p for p in held_prekey_secrets(tokyo_store)}
        self.say(
            "demo",
            f"copies the {len(before)} prekey secrets in Tokyo's store (demo only: the proof "
            "that the record below suffices, given the secret)",
        )
        self.say(
            "seoul", "seals a report for Tokyo and releases it: the key goes to Tokyo's prekeys"
        )
        sent = self.seoul_holds(FS_TEXT)
        released = seoul.request("release", report=sent["report"], to="tokyo")
        if not released.get("ok"):
            raise DemoError(f"Seoul could not release: {released.get('error')}")
        record = relay_record(
            self.deployment.store("washington"), bytes.fromhex(released["token"]), sent["report"]
        )
        wrap = ReleaseToken.decode(record.token).wrap
        opk = wrap.opk or b""
        copy = self.deployment.folder / RECORD_DIR
        copy.mkdir(exist_ok=True)
        (copy / "token.bin").write_bytes(record.token)
        (copy / "ciphertext.bin").write_bytes(record.ciphertext)
        self.say(
            "washington",
            f"queues for Tokyo token {released['token'][:8]}… ({len(record.token)} bytes: key "
            f"wrapped, mode {wrap.mode.value}, one-time prekey {opk.hex()[:8]}…) and "
            f"{len(record.ciphertext)} bytes of ciphertext ({record.where})",
        )
        self.on_trace(
            {
                "kind": "message",
                "from": "washington",
                "to": "adversary",
                "label": "copy of the queued token + ciphertext",
                "detail": {"token": released["token"], "saved": str(copy)},
            }
        )
        hasher = Hasher(Hash.CIPHERTEXT)
        hasher.update(record.ciphertext)
        digest_ok = hasher.finish().hex() == sent["digest"]
        ok = wrap.mode is WrapMode.ONE_TIME and opk in before and digest_ok
        self.check(
            "Washington's record of the queued delivery",
            "the token, its key wrapped to a one-time prekey of Tokyo's, and Seoul's ciphertext",
            f"token {len(record.token)} bytes, mode {wrap.mode.value}, prekey "
            f"{'Tokyo' if opk in before else 'NOT Tokyo'}'s; ciphertext digest "
            f"{'matches' if digest_ok else 'DIFFERS'}; copied to {RECORD_DIR}/",
            ok,
        )
        agent = self.start_agent("tokyo")
        self.say("tokyo", f"back online (pid {agent.process.pid}), handshake done")
        got = agent.request("expect_report", timeout=30, wait=20)
        ok = got.get("report") == sent["report"] and got.get("sha256") == sent["sha256"]
        if got.get("text"):
            self.say("tokyo", f"reads: “{got['text'][:90]}…”")
        self.check(
            "Tokyo opens the queued report",
            "the same text, signed by Seoul",
            f"from {got.get('originator')}, text "
            f"{'identical' if got.get('sha256') == sent['sha256'] else 'DIFFERENT'}"
            if got.get("report")
            else "nothing delivered",
            ok,
        )
        after = {p.public: p for p in held_prekey_secrets(tokyo_store)}
        used = opk in used_one_time_prekeys(tokyo_store)
        self.say(
            "tokyo",
            f"its store on disk, read by the demo: no secret for prekey {opk.hex()[:8]}…, "
            f"{len(after)} prekey secrets left",
        )
        ok = opk not in after and used
        self.check(
            "Tokyo's node deleted that one-time prekey's secret",
            "gone from its store (committed), its public key kept as used",
            f"secret {'STILL THERE' if opk in after else 'gone'}; "
            f"{'marked used' if used else 'NOT marked used'}",
            ok,
        )
        secret, _ = MemberSecret.load(self.deployment.keys["tokyo"], DEMO_PASSPHRASE)
        arrangement = self.deployment.signed.arrangement
        kinds = [p.kind for p in after.values()]
        self.say(
            "adversary",
            f"takes Tokyo's key file and passphrase, the {kinds.count(PrekeyKind.SIGNED)} "
            f"signed and {kinds.count(PrekeyKind.ONE_TIME)} one-time prekey secrets still in "
            "its store, and Washington's record",
        )

        def attempt(prekeys: list[PrekeySecret]) -> tuple[str, OpenedReport | None]:
            # Each held secret is tried in the token's slot of its kind (kinds are public).
            try:
                opened = open_record(
                    record.token,
                    [record.ciphertext],
                    arrangement,
                    secret,
                    "tokyo",
                    prekeys,
                    every_place=False,
                )
            except TisaError as exc:
                return f"{type(exc).__name__}: {exc}", None
            return "OPENED", opened

        outcome, opened = attempt(list(after.values()))
        self.check(
            "Tokyo's key file + the record open nothing",
            "the key wrap does not open: VerificationError",
            outcome,
            outcome.startswith("VerificationError") and opened is None,
        )
        self.say(
            "demo",
            f"tries the same with the secret of prekey {opk.hex()[:8]}… copied before it was "
            "deleted",
        )
        outcome, opened = attempt([*after.values(), *([before[opk]] if opk in before else [])])
        same = opened is not None and hashlib.sha256(opened.body).hexdigest() == sent["sha256"]
        self.check(
            "The same record with the deleted secret opens",
            "the report: what protects it is the deletion",
            f"opened, signed by {opened.header.originator}, text "
            f"{'identical' if same else 'DIFFERENT'}"
            if opened is not None
            else outcome,
            same,
        )

    def audit(self) -> None:
        """Step 7: checks that Seoul and Tokyo each fetch and verify a non-empty part of the
        audit log.

        Raises:
            DemoError: a member did not answer in time, or its process ended.
        """
        for name in ("seoul", "tokyo"):
            answer = self.agents[name].request("audit")
            entries = answer.get("entries") or []
            events: dict[str, int] = {}
            for entry in entries:
                label = entry["event"] + (f" ({entry['reason']})" if entry.get("reason") else "")
                events[label] = events.get(label, 0) + 1
            summary = ", ".join(f"{n} {e}" for e, n in events.items())
            ok = bool(answer.get("ok") and answer.get("verified") and entries)
            self.check(
                f"{name.capitalize()} verifies its part of the audit log",
                "hash chain and Washington's signed checkpoint verify",
                f"{len(entries)} entries verified: {summary}"
                if ok
                else f"failed: {answer.get('error')}",
                ok,
            )

    def large_report(self) -> None:
        """Step 8: Seoul submits :attr:`large_mib` MiB of random data, released to Tokyo at once.

        Shows a progress bar while Seoul seals, and checks that Tokyo opens the same bytes.

        Raises:
            DemoError: the submission failed, or a member did not answer in time.
        """
        mib = self.large_mib
        self.say("seoul", f"seals a {mib} MiB report (imagery) and releases it to Tokyo at once")
        with Progress(
            TextColumn("         [cyan]Seoul seals[/]"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        ) as progress:
            task = progress.add_task("seal", total=mib * 1024 * 1024)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            answer = self.agents["seoul"].request(
                "submit",
                size_mib=mib,
                recipients=["tokyo"],
                scope="missile",
                level="confidential",
                release_to=["tokyo"],
                timeout=120 + mib,
                on_progress=update,
            )
        if not answer.get("ok"):
            raise DemoError(f"submission refused: {answer.get('error')}")
        with self.console.status(f"Tokyo receives {mib} MiB through Washington…"):
            got = self.agents["tokyo"].request("expect_report", timeout=120 + mib, wait=60 + mib)
        ok = got.get("report") == answer["report"] and got.get("sha256") == answer["sha256"]
        self.check(
            f"A {mib} MiB report goes through",
            "Tokyo opens the same bytes",
            f"{answer['size'] / 2**20:.1f} MiB ciphertext; Tokyo's copy "
            f"{'identical' if got.get('sha256') == answer['sha256'] else 'DIFFERENT'}"
            if got.get("report")
            else "nothing delivered",
            ok,
        )

    def summary(self) -> bool:
        """Print the table of every verdict; returns True when all passed."""
        table = Table(title="tisa demo: what happened", show_lines=False)
        table.add_column("#", justify="right")
        table.add_column("step")
        table.add_column("expected")
        table.add_column("observed")
        table.add_column("", justify="center")
        for i, check in enumerate(self.checks, 1):
            table.add_row(
                str(i),
                check.step,
                check.expected,
                check.observed,
                "[green]✓[/]" if check.ok else "[bold red]✗[/]",
            )
        self.console.print()
        self.console.print(table)
        failed = [c for c in self.checks if not c.ok]
        if failed:
            self.console.print(f"[bold red]{len(failed)} of {len(self.checks)} checks failed[/]")
        else:
            self.console.print(f"[bold green]all {len(self.checks)} checks passed[/]")
        return not failed


def _check_writable(path: Path) -> None:
    """Raise now, not after the whole run, when ``path`` cannot be written.

    Raises:
        FileNotFoundError: its folder does not exist.
        PermissionError: the file, or its folder for a new file, is not writable.
        IsADirectoryError: it is a folder.
    """
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def run_demo(
    *,
    folder: Path | None = None,
    large_mib: int = 200,
    trace_path: Path | None = None,
    diagram_path: Path | None = None,
    console: Console | None = None,
) -> bool:
    """Run the demo; returns True when every check passed.

    Args:
        folder: where keys, arrangement, stores and logs go; a temporary folder (removed
            afterwards) when None.
        large_mib: size of the large report in MiB (0 skips that step).
        trace_path: write every event as a JSON line here.
        diagram_path: draw the exchange as a sequence diagram (HTML with SVG) here.
        console: where the timeline goes (stdout by default).

    Raises:
        OSError: the folder, the trace or the diagram file cannot be written (the
            diagram's is checked before anything runs).
        KeyFileError: a key file in ``folder`` is not a demo key.
    """
    console = console or Console()
    if diagram_path is not None:
        _check_writable(diagram_path)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tisa-demo-")))
        handle: TextIO | None = None
        if trace_path is not None:
            handle = stack.enter_context(open(trace_path, "w", encoding="utf-8"))
        trace = TraceWriter(handle)
        demo = Demo(console=console, trace=trace, deployment=None, large_mib=large_mib)  # type: ignore[arg-type]
        console.rule("[bold]tisa demo: Seoul → Washington → Tokyo, Seoul's approval required")
        demo.heading("The arrangement: each party signs separately, no joint ceremony")
        demo.deployment = prepare_deployment(folder, announce=lambda t: demo.say("demo", t))
        demo.say("demo", f"keys, arrangement and stores in {folder}")
        try:
            relay_process, port = stack.enter_context(_relay(demo.deployment))
            demo.relay_address = f"127.0.0.1:{port}"
            demo.say(
                "washington", f"relay running (pid {relay_process.pid}) on {demo.relay_address}"
            )
            # Registered after the relay: the members stop first, the relay last.
            stack.callback(demo.close_agents)
            for name in ("seoul", "tokyo"):
                agent = demo.start_agent(name)
                demo.say(name, f"node running (pid {agent.process.pid}), handshake done")
        except (DemoError, OSError) as exc:
            demo.check("Start the three nodes", "all three running", str(exc), False)
        else:
            demo.check("Start the three nodes", "all three running", "relay, Seoul, Tokyo up", True)
            demo.step("1. Seoul seals a report and holds it", demo.seal_and_hold)
            demo.step("2. What Washington holds", demo.relay_holds_ciphertext)
            demo.step("3. Tokyo, before Seoul approves", demo.tokyo_cannot_read)
            demo.step(
                "4. Seoul approves; Washington forwards; Tokyo reads", demo.release_and_deliver
            )
            demo.step("5. Out of scope: refused twice", demo.out_of_scope)
            demo.step("6. Forged and replayed tokens", demo.forged_and_replayed)
            demo.step("7. The audit log", demo.audit)
            demo.step("8. The other direction: Tokyo to Seoul", demo.other_direction)
            demo.step("9. On request: Seoul announces, Tokyo asks", demo.on_request)
            demo.step("10. Forward secrecy: after the prekey is gone", demo.forward_secrecy)
            if large_mib > 0:
                demo.step(f"11. A large report ({large_mib} MiB)", demo.large_report)
        ok = demo.summary()
    if diagram_path is not None:
        diagram_path.write_text(render_html(trace.events), encoding="utf-8")
        console.print(f"sequence diagram written to {diagram_path}")
    if trace_path is not None:
        console.print(f"trace written to {trace_path}")
    return ok
