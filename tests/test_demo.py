"""The three-process demo, end to end, with a small large report; its trace and diagram."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from tisa.errors import KeyFileError, ProtocolError, VerificationError
from tisa.keys import MemberSecret
from tisa_cli.commands import tisa
from tisa_cli.demo import DEMO_PASSPHRASE, Demo, prepare_deployment, run_demo
from tisa_cli.demo_trace import TraceEvent, TraceWriter, read_trace, render_html, render_svg
from tisa_io.files import ARRANGEMENT_FILE, IDENTITY_FILE, read_arrangement
from tisa_testing.secrecy import held_prekey_secrets, open_record


def test_demo_runs_and_every_check_passes(tmp_path: Path) -> None:
    out = io.StringIO()
    trace = tmp_path / "trace.jsonl"
    diagram = tmp_path / "exchange.html"
    ok = run_demo(
        folder=tmp_path / "demo",
        large_mib=2,
        trace_path=trace,
        diagram_path=diagram,
        console=Console(file=out, width=120),
    )
    text = out.getvalue()
    assert ok, text
    assert "checks passed" in text
    assert "✗" not in text

    events = read_trace(trace)
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) >= 14
    assert all(e.status == "ok" for e in steps)
    refusals = {e.detail.get("refused") for e in events if e.status == "refused"}
    assert {"out_of_scope", "bad_signature", "replayed"} <= refusals
    # Forward secrecy: the record fails to open after the deletion, and opens with the
    # deleted secret, each a step of its own (so the first cannot pass vacuously).
    verdicts = {e.label[2:]: e.detail["observed"] for e in steps}
    assert verdicts["Tokyo's key file + the record open nothing"].startswith("VerificationError")
    assert verdicts["The same record with the deleted secret opens"].startswith("opened")
    assert "gone; marked used" in verdicts["Tokyo's node deleted that one-time prekey's secret"]
    copied = [e for e in events if e.kind == "message" and e.target == "adversary"]
    assert copied and copied[0].source == "washington"
    # Every line of the trace is a JSON object.
    for line in trace.read_text().splitlines():
        assert isinstance(json.loads(line), dict)

    html = diagram.read_text()
    assert html.startswith("<!doctype html>")
    assert "<svg" in html and "<script" not in html
    assert "Washington" in html and "Adversary" in html

    # The copy of Washington's record is kept in the folder: after the demo (every node
    # stopped), Tokyo's key file and every prekey secret left in its store open nothing.
    record = tmp_path / "demo" / "washington-record"
    with pytest.raises(VerificationError):
        open_record(
            (record / "token.bin").read_bytes(),
            [(record / "ciphertext.bin").read_bytes()],
            read_arrangement(tmp_path / "demo" / ARRANGEMENT_FILE).arrangement,
            MemberSecret.load(tmp_path / "demo" / "tokyo" / IDENTITY_FILE, DEMO_PASSPHRASE)[0],
            "tokyo",
            held_prekey_secrets(tmp_path / "demo" / "tokyo" / "store"),
            every_place=False,
        )

    # The folder is kept and can be run again (keys and arrangement reused).
    keys = (tmp_path / "demo" / "seoul" / "identity.key").read_bytes()
    again = run_demo(folder=tmp_path / "demo", large_mib=0, console=Console(file=io.StringIO()))
    assert again
    assert (tmp_path / "demo" / "seoul" / "identity.key").read_bytes() == keys

    # The trace can be drawn again from the command line.
    redrawn = tmp_path / "redrawn.html"
    result = CliRunner().invoke(tisa, ["trace-diagram", str(trace), "--out", str(redrawn)])
    assert result.exit_code == 0, result.output
    assert "<svg" in redrawn.read_text()


def test_diagram_escapes_text_and_marks_refusals() -> None:
    events = [
        TraceEvent(t=0.0, kind="step", label="a <step>"),
        TraceEvent(t=0.1, kind="message", label="submit", source="seoul", target="washington"),
        TraceEvent(
            t=0.2,
            kind="message",
            label="refused: replayed",
            source="washington",
            target="seoul",
            status="refused",
        ),
        TraceEvent(t=0.3, kind="note", label="<script>x</script>", source="tokyo"),
    ]
    svg = render_svg(events)
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg
    assert "arrow-refused" in svg
    assert "<script" not in render_html(events)


def test_trace_diagram_refuses_a_bad_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "nonsense"}\n')
    result = CliRunner().invoke(tisa, ["trace-diagram", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error: ")
    assert len(result.stderr.strip().splitlines()) == 1


# --- a new user's mistakes and Ctrl-C ----------------------------------------------------

TISA = [sys.executable, "-m", "tisa_cli.commands"]


def _group_alive(pgid: int) -> list[str]:
    """The processes of group ``pgid`` still running (zombies, waiting to be reaped by
    whoever adopted them, do not count), as ``pid command`` lines."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(f"{stat.parent.name} {text[: text.rindex(')') + 1]}")
    return alive


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(
    ("moment", "whole_group"),
    [
        # A terminal's Ctrl-C reaches every process of the foreground group...
        ("relay running", True),
        # ...a `kill -INT` only the demo, here while Tokyo's node is being stopped.
        ("goes offline", False),
    ],
)
def test_ctrl_c_mid_demo_is_one_line_and_leaves_no_process(
    tmp_path: Path, moment: str, whole_group: bool
) -> None:
    process = subprocess.Popen(
        [*TISA, "demo", "--dir", str(tmp_path / "demo"), "--large-mib", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a shell's job: killpg reaches only it
        env={**os.environ, "COLUMNS": "200"},
        # Ctrl-C as at a terminal, even when this suite runs as a background job (a
        # shell starts those with SIGINT ignored, and a child inherits that).
        preexec_fn=_sigint_default,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if moment in line:
                break
        else:
            pytest.fail(f"the demo ended before {moment!r}: {''.join(seen)}")
        if whole_group:
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr
    assert stderr == "Error: interrupted\n"
    assert _group_alive(process.pid) == []


def test_a_diagram_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    out = io.StringIO()
    with pytest.raises(FileNotFoundError):
        run_demo(
            folder=tmp_path / "demo",
            large_mib=0,
            diagram_path=tmp_path / "missing" / "exchange.html",
            console=Console(file=out),
        )
    assert out.getvalue() == "" and not (tmp_path / "demo").exists()
    missing = tmp_path / "missing" / "exchange.html"
    result = CliRunner().invoke(
        tisa, ["demo", "--dir", str(tmp_path / "demo"), "--diagram", str(missing)]
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and str(missing) in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_damaged_key_file_in_the_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "tokyo").mkdir(parents=True)
    damaged = tmp_path / "tokyo" / IDENTITY_FILE
    damaged.write_bytes(b"not a key")
    with pytest.raises(KeyFileError, match="not a demo key") as info:
        prepare_deployment(tmp_path)
    assert str(damaged) in str(info.value)
    result = CliRunner().invoke(tisa, ["demo", "--dir", str(tmp_path), "--large-mib", "0"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and str(damaged) in result.stderr
    assert len(result.stderr.splitlines()) == 1


def _bare_demo() -> Demo:
    """A demo with no deployment and no process, for its own bookkeeping."""
    return Demo(
        console=Console(file=io.StringIO()),
        trace=TraceWriter(),
        deployment=None,  # type: ignore[arg-type]
        large_mib=0,
    )


class _Closing:
    def __init__(self, closed: list[str], name: str, interrupt: bool = False) -> None:
        self.closed, self.name, self.interrupt = closed, name, interrupt

    def close(self) -> None:
        self.closed.append(self.name)
        if self.interrupt:
            raise KeyboardInterrupt


def test_closing_the_members_goes_on_past_an_interrupted_close() -> None:
    closed: list[str] = []
    demo = _bare_demo()
    demo.agents = {
        "seoul": _Closing(closed, "seoul"),  # type: ignore[dict-item]
        "tokyo": _Closing(closed, "tokyo", interrupt=True),  # type: ignore[dict-item]
    }
    with pytest.raises(KeyboardInterrupt):
        demo.close_agents()
    assert closed == ["tokyo", "seoul"]  # the last started first, and both
    assert demo.agents == {}


def test_a_step_that_raises_a_typed_error_is_a_failed_check() -> None:
    demo = _bare_demo()

    def undecodable() -> None:
        raise ProtocolError("token: not a map")

    demo.step("10. A step", undecodable)
    assert [(c.step, c.ok) for c in demo.checks] == [("10. A step", False)]
    assert "token: not a map" in demo.checks[0].observed
