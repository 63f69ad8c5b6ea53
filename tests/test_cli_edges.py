"""The edges of the ``tisa`` command line a user hits (issue 12, items 1 to 7): Ctrl-C
during send and the outbox, an unreachable relay, actions that do nothing useful,
receiving, feedback and wording, the per-home config file and the default home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from clients.node import Node
from tests.test_cli_nodes import ENV, TERMINAL, cli, homes, relay, send_to_tokyo
from tisa_cli.commands import tisa

__all__ = ["homes", "relay"]  # fixtures, imported to be used here

SEND = ["send", "--scope", "missile", "--level", "secret"]
TISA = [sys.executable, "-m", "tisa_cli.commands"]


def seoul(homes: Path) -> list[str]:
    return ["--home", str(homes / "seoul")]


def tokyo(homes: Path) -> list[str]:
    return ["--home", str(homes / "tokyo")]


def interrupt_me() -> None:
    """Ctrl-C, as the terminal would send it to this process."""
    os.kill(os.getpid(), signal.SIGINT)


def tokyo_inbox(homes: Path, relay: str, wait: str = "1") -> list[dict[str, Any]]:
    out = cli(homes, *tokyo(homes), "inbox", "--wait", wait, "--json", relay=relay).stdout
    value = json.loads(out)
    assert isinstance(value, list)
    return value


def stored_reports(homes: Path, relay: str) -> set[str]:
    """Reports the relay's audit log says it stored (seoul's view, from the start)."""
    audit = json.loads(cli(homes, *seoul(homes), "audit", "--all", "--json", relay=relay).stdout)
    return {e["report"] for e in audit["entries"] if e["event"] == "stored"}


def outbox(homes: Path) -> list[dict[str, Any]]:
    value = json.loads(cli(homes, *seoul(homes), "outbox", "--json").stdout)
    assert isinstance(value, list)
    return value


# --- 1. Ctrl-C during send; the outbox ----------------------------------------------------


def test_ctrl_c_while_sealing_keeps_and_sends_nothing(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tisa.report import ReportSealer

    start = ReportSealer.start

    def interrupted_start(self: ReportSealer) -> bytes:
        interrupt_me()
        return start(self)

    monkeypatch.setattr(ReportSealer, "start", interrupted_start)
    result = cli(homes, *seoul(homes), *SEND, "--to", "tokyo", "x", relay=relay, ok=False)
    assert result.exit_code == 130
    assert result.stderr == "Error: interrupted while sealing; nothing was kept or sent\n"
    monkeypatch.undo()
    assert outbox(homes) == []
    assert tokyo_inbox(homes, relay) == []


def test_ctrl_c_before_the_upload_withdraws_the_report_until_asked(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upload has not begun (a slow link: the node's sender is stuck) when Ctrl-C
    # comes: the report is withdrawn, and the next, unrelated command uploads nothing.
    async def stuck_sender(self: Node, session: Any) -> None:
        await trio.sleep_forever()

    wait_stored = Node.wait_stored

    async def interrupted_wait(self: Node, report_id: bytes) -> Any:
        interrupt_me()
        return await wait_stored(self, report_id)

    monkeypatch.setattr(Node, "_sender", stuck_sender)
    monkeypatch.setattr(Node, "wait_stored", interrupted_wait)
    result = cli(homes, *seoul(homes), *SEND, "--to", "tokyo", "aborted", relay=relay, ok=False)
    monkeypatch.undo()
    assert result.exit_code == 130
    [line] = result.stderr.splitlines()
    [pending] = outbox(homes)
    report = pending["report"]
    assert line.startswith(f"Error: interrupted; report {report} was withdrawn")
    assert f"tisa outbox send {report}" in line and f"tisa outbox drop {report}" in line
    assert pending["state"] == "withdrawn" and pending["release_to"] == ["tokyo"]

    # Unrelated commands connect (and would have uploaded it): nothing of it goes out.
    assert report not in stored_reports(homes, relay)
    assert tokyo_inbox(homes, relay) == []
    assert [item["report"] for item in outbox(homes)] == [report]
    listing = cli(homes, *seoul(homes), "outbox").stdout
    assert report in listing and "withdrawn" in listing

    # Asked to: sent, stored, released as `send` would have.
    sent = json.loads(
        cli(homes, *seoul(homes), "outbox", "send", report, "--json", relay=relay).stdout
    )
    assert sent["report"] == report
    assert [r["state"] for r in sent["released"]] == ["released"]
    assert outbox(homes) == []
    assert [item["text"] for item in tokyo_inbox(homes, relay, "5")] == ["aborted"]


def test_a_withdrawn_report_can_be_dropped(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck_sender(self: Node, session: Any) -> None:
        await trio.sleep_forever()

    async def interrupted_wait(self: Node, report_id: bytes) -> Any:
        interrupt_me()
        await trio.sleep_forever()

    monkeypatch.setattr(Node, "_sender", stuck_sender)
    monkeypatch.setattr(Node, "wait_stored", interrupted_wait)
    cli(homes, *seoul(homes), *SEND, "--hold", "tokyo", "dropped", relay=relay, ok=False)
    monkeypatch.undo()
    [pending] = outbox(homes)
    result = cli(homes, *seoul(homes), "outbox", "drop", pending["report"])
    assert result.stdout == f"dropped report {pending['report']} from the outbox\n"
    assert outbox(homes) == []
    assert pending["report"] not in stored_reports(homes, relay)
    again = cli(homes, *seoul(homes), "outbox", "drop", pending["report"], ok=False)
    assert again.exit_code == 1 and "dropped, not withdrawn" in again.stderr


def test_ctrl_c_after_the_relay_stored_it_says_how_to_revoke(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_stored = Node.wait_stored

    async def stored_then_interrupted(self: Node, report_id: bytes) -> Any:
        await wait_stored(self, report_id)
        interrupt_me()
        await trio.sleep_forever()

    monkeypatch.setattr(Node, "wait_stored", stored_then_interrupted)
    result = cli(homes, *seoul(homes), *SEND, "--to", "tokyo", "kept", relay=relay, ok=False)
    monkeypatch.undo()
    assert result.exit_code == 130
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: interrupted; the relay had already stored report ")
    report = line.split("report ")[1].split()[0]
    assert line.endswith(f"`tisa revoke {report}` takes it back")
    assert outbox(homes) == []
    assert report in stored_reports(homes, relay)


def test_a_send_that_times_out_withdraws_its_report(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck_sender(self: Node, session: Any) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(Node, "_sender", stuck_sender)
    result = cli(
        homes,
        *seoul(homes),
        *SEND,
        "--to",
        "tokyo",
        "late",
        "--timeout",
        "0.5",
        relay=relay,
        ok=False,
    )
    monkeypatch.undo()
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: timed out waiting for the relay at {relay} (--timeout 0.5); report "
    )
    assert "withdrawn" in result.stderr
    assert [item["state"] for item in outbox(homes)] == ["withdrawn"]
    assert tokyo_inbox(homes, relay) == []


# --- 2. An unreachable relay ---------------------------------------------------------------


def unused_address() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"  # closed again: connections refused


def test_a_refused_connection_fails_at_once_naming_the_address(homes: Path) -> None:
    # No --timeout given: the old code waited its 30 s default, then said "no answer".
    address = unused_address()
    result = cli(homes, *tokyo(homes), "inbox", relay=address, ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: cannot reach the relay at {address}: connection refused "
        "(--wait-relay SECONDS keeps trying)\n"
    )


def test_wait_relay_retries_and_says_so(homes: Path) -> None:
    address = unused_address()
    result = cli(homes, *tokyo(homes), "inbox", "--wait-relay", "0.5", relay=address, ok=False)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"relay at {address} unreachable (connection refused); retrying for up to 0.5 s",
        f"Error: cannot reach the relay at {address} after 0.5 s: connection refused",
    ]


def test_wait_relay_connects_once_the_relay_is_up(homes: Path, relay: str) -> None:
    # The relay answers: --wait-relay changes nothing, and prints nothing.
    result = cli(homes, *tokyo(homes), "inbox", "--wait-relay", "30", "--wait", "0", relay=relay)
    assert result.stdout == "no new reports\n" and result.stderr == ""


# --- 4. Actions that do nothing useful -----------------------------------------------------


def test_releasing_twice_to_one_recipient_is_refused_and_sends_nothing(
    homes: Path, relay: str
) -> None:
    report = send_to_tokyo(homes, relay, "once")
    result = cli(homes, *seoul(homes), "release", report, "--to", "tokyo", relay=relay, ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: refused (duplicate): already released to tokyo (")
    assert [item["text"] for item in tokyo_inbox(homes, relay, "3")] == ["once"]
    assert tokyo_inbox(homes, relay) == []


def test_revoking_twice_is_a_no_op_that_says_so(homes: Path, relay: str) -> None:
    held = json.loads(
        cli(homes, *seoul(homes), *SEND, "--hold", "tokyo", "held", "--json", relay=relay).stdout
    )["report"]
    first = cli(homes, *seoul(homes), "revoke", held, relay=relay)
    assert first.stdout == f"revoked report {held}\n"
    second = cli(homes, *seoul(homes), "revoke", held, relay=relay)
    assert second.exit_code == 0
    assert second.stdout == f"report {held} was already revoked; nothing to do\n"


def test_revoking_a_delivered_report_is_refused(homes: Path, relay: str) -> None:
    report = send_to_tokyo(homes, relay, "delivered")
    assert [item["report"] for item in tokyo_inbox(homes, relay, "3")] == [report]
    # The relay has the ack once Tokyo's inbox returned.
    result = cli(homes, *seoul(homes), "revoke", report, relay=relay, ok=False)
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: refused (replayed): already delivered to tokyo; nothing to withdraw\n"
    )


# --- 5. Receiving ---------------------------------------------------------------------------


def test_inbox_wait_returns_once_the_report_arrived(homes: Path, relay: str) -> None:
    # --wait 600: the old code always waited all of it; this returns with the report
    # (the subprocess's generous bound only catches a wait of the whole length).
    report = send_to_tokyo(homes, relay, "soon")
    result = subprocess.run(
        [*TISA, *tokyo(homes), "inbox", "--wait", "600", "--json"],
        env={**os.environ, **ENV, "TISA_RELAY": relay},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert [item["report"] for item in json.loads(result.stdout)] == [report]


def test_inbox_json_has_the_same_fields_with_and_without_all(homes: Path, relay: str) -> None:
    send_to_tokyo(homes, relay, "fields")
    new = tokyo_inbox(homes, relay, "3")
    listed = json.loads(
        cli(homes, *tokyo(homes), "inbox", "--all", "--wait", "0", "--json", relay=relay).stdout
    )
    assert len(new) == len(listed) == 1
    assert set(new[0]) == set(listed[0])
    assert new[0]["new"] is True and listed[0]["new"] is False
    assert new[0]["received"] == listed[0]["received"]


def test_inbox_shows_a_large_delivery_in_progress_on_a_terminal(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tisa_cli.commands.PROGRESS_MIN", 64 * 1024)  # "large" for a fast test
    body = homes / "large.bin"
    body.write_bytes(os.urandom(2 * 1024 * 1024))
    cli(homes, *seoul(homes), *SEND, "--to", "tokyo", "--file", str(body), relay=relay)
    result = cli(homes, *tokyo(homes), "inbox", "--wait", "5", relay=relay, env=TERMINAL)
    assert "receiving from seoul" in result.stderr
    assert "signature verified" in result.stdout
    plain = tokyo_inbox(homes, relay)  # nothing new; and no terminal: no bar
    assert plain == []


# --- 6. Feedback and wording ----------------------------------------------------------------


def test_receipts_prints_notices_in_words(homes: Path, relay: str) -> None:
    report = send_to_tokyo(homes, relay, "words")
    tokyo_inbox(homes, relay, "3")
    out = cli(homes, *seoul(homes), "receipts", "--wait", "1", relay=relay).stdout
    notices = [line for line in out.splitlines() if line.startswith("notice: ")]
    assert f"notice: the relay stored report {report}" in notices
    assert f"notice: the relay accepted the release of report {report} to tokyo" in notices
    assert not any("{" in line for line in notices)


def test_audit_all_lists_every_entry_again(homes: Path, relay: str) -> None:
    send_to_tokyo(homes, relay, "audited")
    first = json.loads(cli(homes, *seoul(homes), "audit", "--json", relay=relay).stdout)
    assert first["entries"]
    again = json.loads(cli(homes, *seoul(homes), "audit", "--json", relay=relay).stdout)
    assert again["entries"] == []
    every = json.loads(cli(homes, *seoul(homes), "audit", "--all", "--json", relay=relay).stdout)
    assert every["entries"][: len(first["entries"])] == first["entries"]
    assert every["verified"] is True


def test_a_bad_signature_in_an_arrangement_file_names_file_and_signer(homes: Path) -> None:
    from tisa import encoding as enc

    path = homes / "arrangement.tisa"
    outer = enc.unpack(path.read_bytes(), max_size=1 << 20)
    signature = bytearray(outer["signatures"]["tokyo"])
    signature[0] ^= 1
    outer["signatures"]["tokyo"] = bytes(signature)
    path.write_bytes(enc.pack(outer))
    result = CliRunner().invoke(tisa, ["arrangement", "show", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"Error: {path}: the signature of tokyo does not verify (the file was changed"
    )


def test_an_oversized_report_is_refused_in_mib(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from clients.node import open_node
    from tisa.limits import DEFAULT_LIMITS

    # The node's limit (the relay's is larger): crossed before anything is written.
    small = dataclasses.replace(DEFAULT_LIMITS, max_report_size=1024 * 1024)
    defaults = open_node.__wrapped__.__kwdefaults__  # type: ignore[attr-defined]
    monkeypatch.setitem(defaults, "limits", small)
    body = homes / "big.bin"
    body.write_bytes(b"x" * (3 * 1024 * 1024))
    result = cli(
        homes, *seoul(homes), *SEND, "--to", "tokyo", "--file", str(body), relay=relay, ok=False
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: the report is 3.")
    assert result.stderr.endswith(" MiB sealed, over the limit of 1.0 MiB (max_report_size)\n")


def test_send_reads_stdin_and_takes_attachments(homes: Path, relay: str) -> None:
    track = homes / "track.csv"
    track.write_bytes(b"1,2,3\n")
    result = CliRunner().invoke(
        tisa,
        [*seoul(homes), *SEND, "--to", "tokyo", "--file", "-", "--attach", str(track)],
        input="from a pipe\n",
        env={**ENV, "TISA_RELAY": relay},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    [item] = tokyo_inbox(homes, relay, "3")
    assert item["text"] == "from a pipe\n"
    assert item["attachments"] == ["track.csv"]
    saved = Path(item["saved"])
    assert (saved.parent / f"{item['report']}.attachments" / "track.csv").read_bytes() == (
        b"1,2,3\n"
    )
    assert not list((homes / "seoul").glob(".stdin-*"))  # the spooled copy is gone


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["x"], "name recipients with --to (release now) or --hold (release later)"),
        (["--to", "tokyo"], "give the report as TEXT or --file, not both or neither"),
    ],
)
def test_send_usage_mistakes_exit_2(tmp_path: Path, args: list[str], problem: str) -> None:
    result = CliRunner().invoke(tisa, ["--home", str(tmp_path), *SEND, *args], env=ENV)
    assert result.exit_code == 2
    assert result.stderr == f"Error: tisa send: {problem} (see 'tisa send --help')\n"


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "asyncio_client.py"


def run_example(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        env={**{k: v for k, v in os.environ.items() if k != "TISA_PASSPHRASE"}, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_asyncio_client_without_arguments_prints_its_usage() -> None:
    result = run_example()
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python examples/asyncio_client.py")
    assert "Traceback" not in result.stderr


def test_asyncio_client_with_an_unset_variable_says_so(homes: Path) -> None:
    args = ["--key", str(homes / "tokyo" / "identity.key")]
    args += ["--arrangement", str(homes / "arrangement.tisa"), "--passphrase-env", "NOPE"]
    result = run_example(*args)
    assert result.returncode == 2
    assert "environment variable NOPE is not set" in result.stderr
    assert "KeyError" not in result.stderr and "Traceback" not in result.stderr


def test_asyncio_client_runs_as_the_readme_shows(homes: Path, relay: str) -> None:
    # The client publishes prekeys of its own (kept in its memory), then waits: a token
    # must be wrapped to them, so Seoul sends once they are at the relay.
    process = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE),
            "--key",
            str(homes / "tokyo" / "identity.key"),
            "--arrangement",
            str(homes / "arrangement.tisa"),
            "--relay",
            relay,
        ],
        env={**{k: v for k, v in os.environ.items() if k != "TISA_PASSPHRASE"}, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    database = homes / "washington" / "store" / "relay.db"
    deadline = time.monotonic() + 60
    while _signed_prekeys(database, "tokyo") < 2:  # the CLI node's, then the client's
        assert process.poll() is None and time.monotonic() < deadline, process.stderr
        time.sleep(0.05)
    report = send_to_tokyo(homes, relay, "for the asyncio client")
    stdout, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seoul -> tokyo: missile/secret, ")
    assert "for the asyncio client" in result.stdout
    assert report


# --- the relay's log --------------------------------------------------------------------


@pytest.fixture
def logged_relay(homes: Path) -> Iterator[tuple[str, Path]]:
    """`tisa relay run -v` with its stderr in a file."""
    import time

    port_file = homes / "logged.port"
    log = homes / "relay.log"
    port_args = ["--port", "0", "--port-file", str(port_file)]
    with open(log, "w") as err:
        process = subprocess.Popen(
            [*TISA, "--home", str(homes / "washington"), "relay", "run", "-v", *port_args],
            env={**os.environ, **ENV},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text().strip()}", log
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)


def _signed_prekeys(database: Path, owner: str) -> int:
    import sqlite3

    if not database.exists():
        return 0
    db = sqlite3.connect(database)
    try:
        (count,) = db.execute(
            "SELECT count(*) FROM prekeys WHERE owner = ? AND kind = 'signed'", (owner,)
        ).fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()
    return int(count)


def test_the_relay_logs_connections_and_report_events_without_secrets(
    homes: Path, logged_relay: tuple[str, Path]
) -> None:
    address, log = logged_relay
    tokyo_inbox(homes, address, "2")  # Tokyo connects once: its prekeys are at the relay
    report = send_to_tokyo(homes, address, "not for the log")
    tokyo_inbox(homes, address, "3")
    text = log.read_text()
    assert f"stored report {report}" in text
    assert f"released report {report}" in text
    assert f"forwarded report {report}" in text
    assert "seoul from 127.0.0.1:" in text and "connection ended after" in text
    assert "connection from 127.0.0.1:" in text  # -v
    assert "not for the log" not in text and ENV["TISA_PASSPHRASE"] not in text


# --- 7. Config file and default home ------------------------------------------------------


def test_the_config_file_gives_the_relay_and_defaults(homes: Path, relay: str) -> None:
    (homes / "seoul" / "config.toml").write_text(
        f'relay = "{relay}"\n[send]\nscope = "missile"\nlevel = "secret"\nto = ["tokyo"]\n'
    )
    result = CliRunner().invoke(
        tisa, [*seoul(homes), "send", "configured", "--json"], env={**ENV, "TISA_RELAY": None}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["released"][0]["recipient"] == "tokyo"
    assert [item["text"] for item in tokyo_inbox(homes, relay, "3")] == ["configured"]


def test_a_config_file_with_an_unknown_option_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[send]\ncolour = "red"\n')
    result = CliRunner().invoke(tisa, ["--home", str(tmp_path), "outbox"])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {tmp_path / 'config.toml'}: [send] colour: no such option of that command\n"
    )


def test_the_default_home_follows_the_platform(tmp_path: Path) -> None:
    env = {**ENV, "TISA_HOME": None, "XDG_DATA_HOME": str(tmp_path / "data")}
    result = CliRunner().invoke(
        tisa, ["identity", "create", "seoul", "--insecure-fast-kdf"], env=env
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "tisa" / "identity.key").exists()
