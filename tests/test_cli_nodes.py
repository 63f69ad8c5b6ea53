"""The node commands of ``tisa`` (send, release, inbox, receipts, audit) against a relay."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tisa_cli.commands import tisa

ENV = {"TISA_PASSPHRASE": "walkthrough", "TISA_RELAY": ""}
ROLES = {"seoul": "originator,recipient", "washington": "relay", "tokyo": "originator,recipient"}


def cli(
    root: Path, *args: str, relay: str = "", ok: bool = True, env: dict[str, str] | None = None
) -> Result:
    result = CliRunner().invoke(
        tisa, [*args], env={**ENV, "TISA_RELAY": relay, **(env or {})}, catch_exceptions=False
    )
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def homes(tmp_path: Path) -> Path:
    for name in ROLES:
        home = str(tmp_path / name)
        cli(tmp_path, "--home", home, "identity", "create", name, "--insecure-fast-kdf")
        cli(tmp_path, "--home", home, "identity", "export", "--out", f"{tmp_path}/{name}.id.json")
    members = [a for n, r in ROLES.items() for a in ("--member", f"{tmp_path}/{n}.id.json:{r}")]
    arrangement = str(tmp_path / "arrangement.tisa")
    cli(
        tmp_path,
        "arrangement",
        "draft",
        "--name",
        "t",
        *members,
        "--scope",
        "missile",
        "--level",
        "secret",
        "--out",
        arrangement,
    )
    for name in ROLES:
        cli(tmp_path, "--home", str(tmp_path / name), "arrangement", "sign", arrangement)
    for name in ROLES:
        shutil.copy(arrangement, tmp_path / name / "arrangement.tisa")
    return tmp_path


@pytest.fixture
def relay(homes: Path) -> Iterator[str]:
    port_file = homes / "relay.port"
    home = homes / "washington"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "--key",
            str(home / "identity.key"),
            "--passphrase-env",
            "TISA_PASSPHRASE",
            "--arrangement",
            str(home / "arrangement.tisa"),
            "--store",
            str(home / "store"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
        ],
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        # Each member connects once, as it would on first use, so that the relay holds
        # its prekeys: a release to a member that never connected waits for them.
        for name in ("seoul", "tokyo"):
            cli(homes, "--home", str(homes / name), "inbox", "--wait", "2", relay=address)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_relay_run_on_an_unreachable_postgresql_store_is_one_line(homes: Path) -> None:
    store = f"postgresql://nobody@/none?host={homes}"
    home = ["--home", str(homes / "washington")]
    result = cli(homes, *home, "relay", "run", "--store", store, "--port", "0", ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot reach the relay's PostgreSQL store:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_hold_release_inbox_receipt_audit(homes: Path, relay: str) -> None:
    seoul, tokyo = ["--home", str(homes / "seoul")], ["--home", str(homes / "tokyo")]
    sent = cli(
        homes,
        *seoul,
        "send",
        "--scope",
        "missile",
        "--level",
        "secret",
        "--hold",
        "tokyo",
        "launch detected",
        "--json",
        relay=relay,
    )
    report = json.loads(sent.stdout)
    assert report["held"] == ["tokyo"] and report["released"] == []
    empty = cli(homes, *tokyo, "inbox", "--wait", "0.5", "--json", relay=relay)
    assert json.loads(empty.stdout) == []

    cli(homes, *seoul, "release", report["report"], "--to", "tokyo", relay=relay)
    got = json.loads(cli(homes, *tokyo, "inbox", "--wait", "3", "--json", relay=relay).stdout)
    assert [item["report"] for item in got] == [report["report"]]
    assert got[0]["text"] == "launch detected"
    assert got[0]["originator"] == "seoul"
    assert Path(got[0]["saved"]).read_bytes() == b"launch detected"

    receipts = json.loads(
        cli(homes, *seoul, "receipts", "--wait", "1", "--json", relay=relay).stdout
    )
    assert [r["recipient"] for r in receipts["receipts"]] == ["tokyo"]
    audit = json.loads(cli(homes, *tokyo, "audit", "--json", relay=relay).stdout)
    assert audit["verified"] is True
    assert {"released", "forwarded", "acknowledged"} <= {e["event"] for e in audit["entries"]}


def test_out_of_scope_send_is_refused_in_one_line(homes: Path, relay: str) -> None:
    result = cli(
        homes,
        "--home",
        str(homes / "seoul"),
        "send",
        "--scope",
        "cyber",
        "--level",
        "secret",
        "--to",
        "tokyo",
        "x",
        relay=relay,
        ok=False,
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: refused (out_of_scope): scope 'cyber' is not in the arrangement"
    )


@pytest.mark.parametrize(
    ("relay", "named"),
    [
        ("127.0.0.1:9", "127.0.0.1:9"),
        # Several relay processes: each is tried in turn, and the error names them all.
        ("127.0.0.1:9,127.0.0.1:7", "127.0.0.1:9, 127.0.0.1:7"),
    ],
)
def test_unreachable_relay_is_one_line(homes: Path, relay: str, named: str) -> None:
    result = cli(
        homes,
        "--home",
        str(homes / "tokyo"),
        "inbox",
        "--timeout",
        "0.5",
        relay=relay,
        ok=False,
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"Error: cannot reach the relay at {named}: connection refused "
        "(--wait-relay SECONDS keeps trying)"
    )


def send_to_tokyo(homes: Path, relay: str, text: str) -> str:
    sent = cli(
        homes,
        "--home",
        str(homes / "seoul"),
        "send",
        "--scope",
        "missile",
        "--level",
        "secret",
        "--to",
        "tokyo",
        text,
        "--json",
        relay=relay,
    )
    report = json.loads(sent.stdout)["report"]
    assert isinstance(report, str)
    return report


def test_inbox_shows_new_reports_once_and_every_report_with_all(homes: Path, relay: str) -> None:
    tokyo = ["--home", str(homes / "tokyo")]
    first = send_to_tokyo(homes, relay, "launch detected")
    second = send_to_tokyo(homes, relay, "second launch")
    got = json.loads(cli(homes, *tokyo, "inbox", "--wait", "3", "--json", relay=relay).stdout)
    assert [item["report"] for item in got] == [first, second]
    assert [item["new"] for item in got] == [True, True]  # the fields of --all too
    again = cli(homes, *tokyo, "inbox", "--wait", "0.5", "--json", relay=relay)
    assert json.loads(again.stdout) == []
    assert cli(homes, *tokyo, "inbox", "--wait", "0.5", relay=relay).stdout == "no new reports\n"

    listed = json.loads(
        cli(homes, *tokyo, "inbox", "--all", "--wait", "0.5", "--json", relay=relay).stdout
    )
    assert [item["report"] for item in listed] == [first, second]
    assert [item["text"] for item in listed] == ["launch detected", "second launch"]
    assert [item["new"] for item in listed] == [False, False]
    assert {item["token"] for item in listed} == {item["token"] for item in got}
    assert all(item["originator"] == "seoul" for item in listed)
    assert all(isinstance(item["received"], int) for item in listed)
    assert Path(listed[1]["saved"]).read_bytes() == b"second launch"

    table = cli(homes, *tokyo, "inbox", "--all", "--wait", "0.5", relay=relay).stdout
    assert first in table and second in table
    assert "2 reports in the store, 0 new" in table


def test_inbox_all_marks_the_new_reports_and_saves_missing_bodies(homes: Path, relay: str) -> None:
    tokyo = ["--home", str(homes / "tokyo")]
    first = send_to_tokyo(homes, relay, "launch detected")
    got = json.loads(cli(homes, *tokyo, "inbox", "--wait", "3", "--json", relay=relay).stdout)
    assert [item["report"] for item in got] == [first]
    Path(got[0]["saved"]).unlink()
    second = send_to_tokyo(homes, relay, "second launch")
    save = homes / "elsewhere"
    listed = json.loads(
        cli(
            homes,
            *tokyo,
            "inbox",
            "--all",
            "--wait",
            "3",
            "--save",
            str(save),
            "--json",
            relay=relay,
        ).stdout
    )
    assert [(item["report"], item["new"]) for item in listed] == [(first, False), (second, True)]
    assert (save / f"{first}.body").read_bytes() == b"launch detected"
    assert (save / f"{second}.body").read_bytes() == b"second launch"
    again = cli(homes, *tokyo, "inbox", "--wait", "0.5", "--json", relay=relay)
    assert json.loads(again.stdout) == []


SEND = ["send", "--scope", "missile", "--level", "secret", "--to", "tokyo", "launch detected"]
# What rich takes for a terminal (https://rich.readthedocs.io/en/latest/console.html).
TERMINAL = {"TTY_COMPATIBLE": "1", "TERM": "xterm-256color"}


def test_send_without_a_terminal_prints_the_result_and_no_spinner(homes: Path, relay: str) -> None:
    result = cli(homes, "--home", str(homes / "seoul"), *SEND, relay=relay)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("report ") and "stored by the relay" in lines[0]
    assert lines[1] == "  released to tokyo: released"
    assert result.stderr == ""
    assert "\x1b" not in result.stdout


def test_send_on_a_terminal_shows_the_upload_until_the_relay_stored_it(
    homes: Path, relay: str
) -> None:
    result = cli(homes, "--home", str(homes / "seoul"), *SEND, relay=relay, env=TERMINAL)
    assert "uploading to washington" in result.stderr
    assert "stored by the relay" in result.stdout
    assert "uploading" not in result.stdout


def test_send_json_on_a_terminal_shows_no_spinner(homes: Path, relay: str) -> None:
    seoul = ["--home", str(homes / "seoul")]
    result = cli(homes, *seoul, *SEND, "--json", relay=relay, env=TERMINAL)
    assert json.loads(result.stdout)["released"][0]["state"] == "released"
    assert result.stderr == ""


def test_send_that_times_out_waiting_for_stored_is_one_line(
    homes: Path, relay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio

    from clients.node import Node

    async def never_stored(self: Node, report_id: bytes) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(Node, "wait_stored", never_stored)
    seoul = ["--home", str(homes / "seoul")]
    result = cli(homes, *seoul, *SEND, "--timeout", "0.5", relay=relay, ok=False)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    # The relay stored it meanwhile (only the wait was stuck): said, with how to revoke.
    assert line.startswith(f"Error: timed out waiting for the relay at {relay} (--timeout 0.5); ")
    assert "the relay had already stored report" in line


def test_announce_request_approve_and_deny_from_the_shell(homes: Path, relay: str) -> None:
    seoul, tokyo = ["--home", str(homes / "seoul")], ["--home", str(homes / "tokyo")]
    held = ("send", "--scope", "missile", "--level", "secret", "--hold", "tokyo", "--json")
    first = json.loads(cli(homes, *seoul, *held, "first launch", relay=relay).stdout)["report"]
    second = json.loads(cli(homes, *seoul, *held, "second launch", relay=relay).stdout)["report"]
    for report in (first, second):
        cli(homes, *seoul, "announce", report, "--to", "tokyo", "--title", "Nodong", relay=relay)

    def listed(home: list[str], wait: str = "1") -> dict[str, Any]:
        out = cli(homes, *home, "requests", "--wait", wait, "--json", relay=relay).stdout
        result: dict[str, Any] = json.loads(out)
        return result

    seen = listed(tokyo)["announcements"]
    assert {(a["report"], a["originator"], a["title"]) for a in seen} == {
        (first, "seoul", "Nodong"),
        (second, "seoul", "Nodong"),
    }
    asked = {}
    for report in (first, second):
        out = cli(
            homes, *tokyo, "request", report, "--from", "seoul", "--purpose", "assess", relay=relay
        ).stdout
        asked[report] = out.split("request ")[-1].strip()
    incoming = {r["report"]: r for r in listed(seoul)["requests"]}
    assert {r["state"] for r in incoming.values()} == {"open"}
    assert incoming[first]["requester"] == "tokyo" and incoming[first]["direction"] == "in"

    cli(homes, *seoul, "approve", asked[first], relay=relay)
    cli(
        homes,
        *seoul,
        "deny",
        asked[second],
        "--reason",
        "level_not_allowed",
        "--note",
        "later",
        relay=relay,
    )
    bad = cli(homes, *seoul, "deny", asked[second], "--reason", "nope", relay=relay, ok=False)
    assert bad.exit_code == 2
    again = cli(homes, *seoul, "deny", asked[second], "--reason", "denied", relay=relay, ok=False)
    assert again.exit_code == 1 and "answered" in again.output

    got = json.loads(cli(homes, *tokyo, "inbox", "--wait", "3", "--json", relay=relay).stdout)
    assert [item["report"] for item in got] == [first]
    mine = {r["report"]: r for r in listed(tokyo, "0.5")["requests"]}
    assert mine[first]["state"] == "approved"
    assert (mine[second]["state"], mine[second]["reason"], mine[second]["note"]) == (
        "denied",
        "level_not_allowed",
        "later",
    )
    table = cli(homes, *tokyo, "requests", "--wait", "0", relay=relay).stdout
    assert "approved" in table and "denied" in table
