"""One command line for the relay: ``python -m relay`` and ``tisa relay run`` are the same
click command, with the same options, help and exit codes; and ``load_home`` opens the
folders the ``tisa`` command writes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nacl.pwhash
import pytest

from relay import cli as relay_cli
from tests.conftest import make_trio
from tisa.arrangement import SignedArrangement
from tisa.keys import MemberSecret
from tisa_cli import commands
from tisa_io.files import ARRANGEMENT_FILE, IDENTITY_FILE, FileFormatError, load_home

ROOT = Path(__file__).resolve().parent.parent
PASS = "relay-cli-test"
PROGRAMS = {
    "python -m relay": [sys.executable, "-m", "relay"],
    "tisa relay run": [sys.executable, "-m", "tisa_cli.commands", "relay", "run"],
}


def _save(secret: MemberSecret, path: Path, name: str) -> None:
    secret.save(
        path,
        PASS,
        name=name,
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
    )


def make_homes(folder: Path) -> dict[str, Path]:
    """Three home folders as the ``tisa`` command leaves them."""
    arrangement, secrets = make_trio()
    signed = SignedArrangement(arrangement)
    for name, secret in secrets.items():
        signed = signed.signed_by(secret, name)
    homes = {}
    for name, secret in secrets.items():
        home = folder / name
        home.mkdir()
        _save(secret, home / IDENTITY_FILE, name)
        (home / ARRANGEMENT_FILE).write_bytes(signed.encode())
        homes[name] = home
    return homes


def _run(program: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        [*PROGRAMS[program], *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_both_entry_points_are_one_command() -> None:
    assert commands.relay.commands["run"] is relay_cli.run


def _options(help_text: str) -> list[str]:
    return [line.split()[0] for line in help_text.splitlines() if line.startswith("  -")]


def test_same_options_and_help() -> None:
    texts = {program: _run(program, "--help") for program in PROGRAMS}
    for result in texts.values():
        assert result.returncode == 0, result.stderr
    relay_help, tisa_help = (texts[p].stdout for p in PROGRAMS)
    assert _options(relay_help) == _options(tisa_help)
    for option in ("--home", "--key", "--port-file", "--limit", "--verbose", "--max-hold"):
        assert option in relay_help
    # Everything but the usage line is the same text.
    assert relay_help.splitlines()[1:] == tisa_help.splitlines()[1:]


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "70000"], "--port"),
        (["--limit", "no_such_limit=1"], "unknown limit"),
        (["--limit", "idle_timeout=soon"], "not a number"),
        (["--no-such-option"], "no-such-option"),
        (["--metrics", "somewhere"], "expected [HOST:]PORT"),
    ],
)
def test_usage_errors_exit_2(program: str, args: list[str], words: str, tmp_path: Path) -> None:
    result = _run(program, "--home", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_start_failures_exit_1_in_one_line(program: str, tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    env = {"TISA_PASSPHRASE": PASS}
    # No home at all: the missing file is named.
    missing = _run(program, "--home", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 1, missing.stderr
    assert missing.stderr.strip().startswith("Error:")
    assert "arrangement.tisa" in missing.stderr
    # A member's key is not the relay's.
    wrong = _run(program, "--home", str(homes["seoul"]), "--port", "0", env=env)
    assert wrong.returncode == 1, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr
    assert "Traceback" not in wrong.stderr
    # A wrong passphrase.
    bad = _run(program, "--home", str(homes["washington"]), env={"TISA_PASSPHRASE": "nope"})
    assert bad.returncode == 1, bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_no_passphrase_and_no_terminal_is_one_line(program: str, tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TISA_PASSPHRASE"}
    result = subprocess.run(
        [*PROGRAMS[program], "--home", str(homes["washington"])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: no passphrase: set $TISA_PASSPHRASE, or give --passphrase-env VAR, "
        "or run on a terminal to be asked"
    ]


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_relay_with_status_0(
    program: str, signum: signal.Signals, tmp_path: Path
) -> None:
    homes = make_homes(tmp_path)
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            *PROGRAMS[program],
            "--home",
            str(homes["washington"]),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--passphrase-env",
            "RELAY_PASS",
        ],
        cwd=ROOT,
        env={**os.environ, "RELAY_PASS": PASS},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the relay did not start"
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert f"listening on 127.0.0.1:{int(port_file.read_text())}" in err
    assert "Traceback" not in err
    assert (homes["washington"] / "store").is_dir()


def test_load_home_opens_what_the_cli_writes(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    home = load_home(homes["tokyo"], PASS)
    assert home.name == "tokyo"
    assert home.store == homes["tokyo"] / "store"
    assert home.secret.public == home.arrangement.member("tokyo").identity


def test_load_home_refuses_a_key_of_no_member(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    (homes["tokyo"] / IDENTITY_FILE).unlink()
    _save(MemberSecret.generate(), homes["tokyo"] / IDENTITY_FILE, "tokyo")
    with pytest.raises(FileFormatError, match="not the key of any member"):
        load_home(homes["tokyo"], PASS)


def test_load_home_refuses_a_key_saved_under_another_name(tmp_path: Path) -> None:
    homes = make_homes(tmp_path)
    _, secrets = make_trio()
    (homes["tokyo"] / IDENTITY_FILE).unlink()
    _save(secrets["seoul"], homes["tokyo"] / IDENTITY_FILE, "tokyo")
    with pytest.raises(FileFormatError, match="key of member 'seoul'"):
        load_home(homes["tokyo"], PASS)


def test_the_relays_log_records_gather_no_thread_or_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The relay logs a line per report event; its format names no thread or process,
    # so the records do not gather them (a quarter of each line's cost).
    for switch in ("logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, switch, True)
    relay_cli.configure_logging("INFO")
    # Made as Logger.info makes it (whatever state other tests left the loggers in).
    record = logging.getLogger("relay.events").makeRecord(
        "relay.events", logging.INFO, __file__, 1, "%s report %s", ("stored", "00ff"), None
    )
    assert (record.thread, record.threadName, record.process, record.processName) == (
        None,
        None,
        None,
        None,
    )
    line = logging.Formatter(relay_cli.LOG_FORMAT).format(record)
    assert line.endswith(" relay.events INFO stored report 00ff")
