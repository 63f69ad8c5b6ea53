"""The ``tisa`` command line: identities, arrangements, and errors as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tisa.keys import MemberSecret
from tisa_cli.commands import tisa
from tisa_io.files import identity_from_json, identity_to_json, read_arrangement

PASS = {"TISA_TEST_PASS": "correct horse"}
TISA = [sys.executable, "-m", "tisa_cli.commands"]
MEMBERS = {
    "seoul": "originator,recipient",
    "washington": "relay",
    "tokyo": "originator,recipient",
}


def run(runner: CliRunner, *args: str | Path, ok: bool = True) -> Result:
    result = runner.invoke(tisa, [str(a) for a in args], env=PASS, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def one_line_error(result: Result) -> str:
    """The run failed with exactly one line on stderr and no traceback."""
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def words(text: str) -> str:
    return " ".join(text.replace("'", "").replace(":", "").split())


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def deployment(tmp_path: Path, runner: CliRunner) -> Path:
    """Three homes with identities, exported identities and a drafted arrangement."""
    for name in MEMBERS:
        run(
            runner,
            "--home",
            tmp_path / name,
            "identity",
            "create",
            name,
            "--passphrase-env",
            "TISA_TEST_PASS",
            "--insecure-fast-kdf",
        )
        run(
            runner,
            "--home",
            tmp_path / name,
            "identity",
            "export",
            "--out",
            tmp_path / f"{name}.id.json",
            "--passphrase-env",
            "TISA_TEST_PASS",
        )
    members = [
        arg for n, r in MEMBERS.items() for arg in ("--member", f"{tmp_path}/{n}.id.json:{r}")
    ]
    run(
        runner,
        "arrangement",
        "draft",
        "--name",
        "tisa-2014",
        *members,
        "--scope",
        "missile",
        "--scope",
        "nuclear",
        "--level",
        "restricted",
        "--level",
        "secret",
        "--out",
        tmp_path / "arrangement.tisa",
    )
    return tmp_path


def sign(runner: CliRunner, root: Path, name: str, *extra: str | Path) -> Result:
    return run(
        runner,
        "--home",
        root / name,
        "arrangement",
        "sign",
        root / "arrangement.tisa",
        "--passphrase-env",
        "TISA_TEST_PASS",
        *extra,
    )


def show(runner: CliRunner, path: Path) -> dict[str, object]:
    value = json.loads(run(runner, "arrangement", "show", path, "--json").stdout)
    assert isinstance(value, dict)
    return value


def test_identity_create_writes_a_protected_key_file(tmp_path: Path, runner: CliRunner) -> None:
    result = run(
        runner,
        "--home",
        tmp_path,
        "identity",
        "create",
        "seoul",
        "--passphrase-env",
        "TISA_TEST_PASS",
        "--insecure-fast-kdf",
        "--json",
    )
    key = tmp_path / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600
    secret, name = MemberSecret.load(key, "correct horse")
    assert name == "seoul"
    exported = json.loads(result.stdout)
    assert exported["fingerprint"] == secret.public.fingerprint
    assert identity_from_json(exported) == ("seoul", secret.public)


def test_identity_create_refuses_to_overwrite(tmp_path: Path, runner: CliRunner) -> None:
    args = ["--home", str(tmp_path), "identity", "create", "seoul"]
    args += ["--passphrase-env", "TISA_TEST_PASS", "--insecure-fast-kdf"]
    run(runner, *args)
    before = (tmp_path / "identity.key").read_bytes()
    line = one_line_error(run(runner, *args, ok=False))
    assert "not overwriting" in line
    assert (tmp_path / "identity.key").read_bytes() == before


def test_identity_create_prompts_for_the_passphrase_twice(
    tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tisa_cli.commands._can_prompt", lambda: True)  # as on a terminal
    result = runner.invoke(
        tisa,
        ["--home", str(tmp_path), "identity", "create", "tokyo", "--insecure-fast-kdf"],
        input="s3cret\ns3cret\n",
        env={"TISA_PASSPHRASE": None},
    )
    assert result.exit_code == 0, result.output
    assert MemberSecret.load(tmp_path / "identity.key", "s3cret")[1] == "tokyo"


def test_the_passphrase_variable_is_honoured_on_a_terminal(tmp_path: Path) -> None:
    # stdin is a terminal (a pseudo-terminal nobody types into): the variable is used,
    # no prompt waits for an answer that never comes.
    import pty

    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [*TISA, "--home", str(tmp_path), "identity", "create", "tokyo", "--insecure-fast-kdf"],
            stdin=terminal,
            capture_output=True,
            text=True,
            env={**os.environ, "TISA_PASSPHRASE": "from-env"},
            start_new_session=True,  # no controlling terminal to prompt on instead
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 0, result.stderr
    assert MemberSecret.load(tmp_path / "identity.key", "from-env")[1] == "tokyo"


def test_no_passphrase_and_no_terminal_is_one_line_saying_how(tmp_path: Path) -> None:
    # A real process with stdin from /dev/null: no GetPassWarning, no "Aborted!".
    env = {k: v for k, v in os.environ.items() if k != "TISA_PASSPHRASE"}
    result = subprocess.run(
        [*TISA, "--home", str(tmp_path), "identity", "create", "x"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "Error: no passphrase: set $TISA_PASSPHRASE, or give --passphrase-env VAR, "
        "or run on a terminal to be asked\n"
    )
    assert not (tmp_path / "identity.key").exists()


def test_identity_export_and_show(deployment: Path, runner: CliRunner) -> None:
    exported = json.loads((deployment / "tokyo.id.json").read_text())
    secret, _ = MemberSecret.load(deployment / "tokyo" / "identity.key", "correct horse")
    assert exported == identity_to_json("tokyo", secret.public)
    shown = run(runner, "identity", "show", deployment / "tokyo.id.json").stdout
    assert secret.public.fingerprint in shown


def test_identity_with_a_wrong_fingerprint_is_refused(deployment: Path, runner: CliRunner) -> None:
    path = deployment / "tokyo.id.json"
    value = json.loads(path.read_text())
    value["fingerprint"] = "aaaa-aaaa-aaaa-aaaa-aaaa-aaaa"
    path.write_text(json.dumps(value))
    line = one_line_error(run(runner, "identity", "show", path, ok=False))
    assert "fingerprint" in line


def test_arrangement_takes_effect_when_everyone_signed_in_any_order(
    deployment: Path, runner: CliRunner
) -> None:
    path = deployment / "arrangement.tisa"
    summary = show(runner, path)
    assert summary["effective"] is False
    assert summary["signed_by"] == []
    assert summary["missing"] == ["seoul", "tokyo", "washington"]
    for name in ("tokyo", "washington"):
        sign(runner, deployment, name)
    summary = show(runner, path)
    assert summary["signed_by"] == ["tokyo", "washington"]
    assert summary["missing"] == ["seoul"]
    assert "missing seoul" in run(runner, "arrangement", "show", path).stdout
    result = sign(runner, deployment, "seoul")
    assert "effective" in result.stdout
    summary = show(runner, path)
    assert summary["effective"] is True
    assert read_arrangement(path).require_effective().name == "tisa-2014"


def test_arrangement_signed_apart_and_merged(deployment: Path, runner: CliRunner) -> None:
    copies = []
    for name in MEMBERS:
        copy = deployment / f"{name}-signed.tisa"
        sign(runner, deployment, name, "--out", copy)
        copies.append(copy)
    assert show(runner, deployment / "arrangement.tisa")["signed_by"] == []
    merged = deployment / "merged.tisa"
    run(runner, "arrangement", "merge", *copies, "--out", merged)
    assert show(runner, merged)["effective"] is True


def test_arrangement_show_table(deployment: Path, runner: CliRunner) -> None:
    out = run(runner, "arrangement", "show", deployment / "arrangement.tisa").stdout
    for name in MEMBERS:
        assert name in out
    assert "not effective" in out


def test_signing_with_a_key_not_in_the_arrangement(
    deployment: Path, runner: CliRunner, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stranger = tmp_path_factory.mktemp("stranger")
    run(
        runner,
        "--home",
        stranger,
        "identity",
        "create",
        "pyongyang",
        "--passphrase-env",
        "TISA_TEST_PASS",
        "--insecure-fast-kdf",
    )
    line = one_line_error(
        run(
            runner,
            "--home",
            stranger,
            "arrangement",
            "sign",
            deployment / "arrangement.tisa",
            "--passphrase-env",
            "TISA_TEST_PASS",
            ok=False,
        )
    )
    assert "not_a_member" in line


def test_draft_needs_exactly_one_relay(deployment: Path, runner: CliRunner) -> None:
    result = run(
        runner,
        "arrangement",
        "draft",
        "--name",
        "no-relay",
        "--member",
        f"{deployment}/seoul.id.json:originator",
        "--member",
        f"{deployment}/tokyo.id.json:recipient",
        "--scope",
        "missile",
        "--level",
        "secret",
        "--out",
        deployment / "bad.tisa",
        ok=False,
    )
    assert "relay" in one_line_error(result)
    assert not (deployment / "bad.tisa").exists()


def test_draft_refuses_an_unknown_role(deployment: Path, runner: CliRunner) -> None:
    result = run(
        runner,
        "arrangement",
        "draft",
        "--name",
        "x",
        "--member",
        f"{deployment}/seoul.id.json:spy",
        "--member",
        f"{deployment}/washington.id.json:relay",
        "--scope",
        "missile",
        "--level",
        "secret",
        "--out",
        deployment / "bad.tisa",
        ok=False,
    )
    assert "roles are" in one_line_error(result)


def test_amendment_needs_every_signature_again(deployment: Path, runner: CliRunner) -> None:
    for name in MEMBERS:
        sign(runner, deployment, name)
    members = [
        arg for n, r in MEMBERS.items() for arg in ("--member", f"{deployment}/{n}.id.json:{r}")
    ]
    amended = deployment / "v2.tisa"
    run(
        runner,
        "arrangement",
        "draft",
        "--name",
        "tisa-2014",
        *members,
        "--scope",
        "missile",
        "--scope",
        "nuclear",
        "--scope",
        "cyber",
        "--level",
        "restricted",
        "--level",
        "secret",
        "--amends",
        deployment / "arrangement.tisa",
        "--out",
        amended,
    )
    summary = show(runner, amended)
    assert summary["version"] == 2
    assert summary["effective"] is False
    assert summary["previous"] == show(runner, deployment / "arrangement.tisa")["id"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["arrangement", "show", "/nonexistent/arrangement.tisa"], "No such file"),
        (["identity", "export", "--passphrase-env", "TISA_UNSET_VAR"], "no key file"),
        (["identity", "show", "/nonexistent.json"], "No such file"),
    ],
)
def test_errors_are_one_line(
    tmp_path: Path, runner: CliRunner, args: list[str], expected: str
) -> None:
    result = runner.invoke(tisa, ["--home", str(tmp_path), *args], env=PASS)
    assert expected in one_line_error(result)


def test_wrong_passphrase_is_one_line(deployment: Path, runner: CliRunner) -> None:
    result = runner.invoke(
        tisa,
        ["--home", str(deployment / "seoul"), "identity", "export", "--passphrase-env", "WRONG"],
        env={"WRONG": "not it"},
    )
    assert "wrong passphrase" in one_line_error(result)


def test_missing_passphrase_variable_is_one_line(deployment: Path, runner: CliRunner) -> None:
    result = runner.invoke(
        tisa,
        ["--home", str(deployment / "seoul"), "identity", "export", "--passphrase-env", "NOPE"],
    )
    assert "NOPE" in one_line_error(result)


def test_a_damaged_arrangement_file_is_one_line(deployment: Path, runner: CliRunner) -> None:
    path = deployment / "arrangement.tisa"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    result = runner.invoke(tisa, ["arrangement", "show", str(path)])
    one_line_error(result)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["identity", "create"],
        ["identity", "export"],
        ["arrangement", "draft"],
        ["arrangement", "sign"],
        ["arrangement", "show"],
        ["arrangement", "merge"],
        ["send"],
        ["inbox"],
        ["announce"],
        ["request"],
        ["requests"],
        ["approve"],
        ["deny"],
    ],
)
def test_help_has_an_example(runner: CliRunner, command: list[str]) -> None:
    result = runner.invoke(tisa, [*command, "--help"])
    assert result.exit_code == 0
    assert "tisa " in result.stdout
    if command:
        assert "Example" in result.stdout


@pytest.mark.parametrize(
    ("args", "command", "problem"),
    [
        (["identity", "create"], "tisa identity create", "missing argument 'NAME'"),
        (["identity", "show"], "tisa identity show", "missing argument 'FILE'"),
        (["release", "--to", "tokyo"], "tisa release", "missing argument 'REPORT'"),
        (["send", "--level", "secret", "x"], "tisa send", "missing option '--scope'"),
        (["send", "--bogus"], "tisa send", "no such option '--bogus'"),
        (["inbox", "--colour"], "tisa inbox", "no such option '--colour'"),
        (["--bogus", "inbox"], "tisa", "no such option '--bogus'"),
        (["inbox", "--wait", "-1"], "tisa inbox", "invalid value for '--wait'"),
        (["send", "--timeout", "soon"], "tisa send", "invalid value for '--timeout'"),
        (["relay", "run", "--port", "70000"], "tisa relay run", "invalid value for '--port'"),
        (["receipts", "--wait"], "tisa receipts", "option '--wait' requires an argument"),
        # The consent commands (their options composed once, shared with the others).
        (["announce", "ab"], "tisa announce", "missing option '--to'"),
        (["request", "ab", "--from", "seoul"], "tisa request", "missing option '--purpose'"),
        (["request", "ab", "--valid-for", "0"], "tisa request", "invalid value for '--valid-for'"),
        (["requests", "--wait", "-1"], "tisa requests", "invalid value for '--wait'"),
        (["approve"], "tisa approve", "missing argument 'REQUEST'"),
        (["approve", "ab", "--timeout", "0"], "tisa approve", "invalid value for '--timeout'"),
        (["deny", "ab"], "tisa deny", "missing option '--reason'"),
        (["deny", "ab", "--reason", "nope"], "tisa deny", "invalid value for '--reason'"),
        (["sned"], "tisa", "no such command 'sned'"),
        (["arrangement", "sgin"], "tisa arrangement", "no such command 'sgin'"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(
    tmp_path: Path, runner: CliRunner, args: list[str], command: str, problem: str
) -> None:
    result = runner.invoke(tisa, ["--home", str(tmp_path), *args], env=PASS)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    line = one_line_error(result)
    # click's own wording, less its capital and its full stop (some click versions quote
    # option names differently: compare without quotes and colons).
    assert line.startswith(f"Error: {command}: "), line
    assert words(problem) in words(line), line
    assert line.endswith(f"(see '{command} --help')"), line
    assert "Usage:" not in result.stderr


def test_a_group_without_a_command_still_shows_its_help(runner: CliRunner) -> None:
    result = runner.invoke(tisa, ["identity"])
    assert result.exit_code == 2
    assert "Usage:" in result.stderr
    assert "create" in result.stderr


def test_inbox_help_describes_all(runner: CliRunner) -> None:
    result = runner.invoke(tisa, ["inbox", "--help"])
    assert "--all" in result.stdout
    assert "every report" in result.stdout
