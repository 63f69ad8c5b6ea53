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

import pytest
from click.testing import CliRunner, Result

from clients.cli import tisa

ENV = {"TISA_PASSPHRASE": "walkthrough", "TISA_RELAY": ""}
ROLES = {"seoul": "originator,recipient", "washington": "relay", "tokyo": "originator,recipient"}


def cli(root: Path, *args: str, relay: str = "", ok: bool = True) -> Result:
    result = CliRunner().invoke(
        tisa, [*args], env={**ENV, "TISA_RELAY": relay}, catch_exceptions=False
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
        yield f"127.0.0.1:{port_file.read_text().strip()}"
    finally:
        process.terminate()
        process.wait(timeout=10)


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


def test_unreachable_relay_is_one_line(homes: Path) -> None:
    result = cli(
        homes,
        "--home",
        str(homes / "tokyo"),
        "inbox",
        "--timeout",
        "0.5",
        relay="127.0.0.1:9",
        ok=False,
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: no answer from the relay at 127.0.0.1:9"
