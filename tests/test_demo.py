"""The three-process demo, end to end, with a small large report; its trace and diagram."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from tisa.errors import VerificationError
from tisa.keys import MemberSecret
from tisa_cli.commands import tisa
from tisa_cli.demo import DEMO_PASSPHRASE, run_demo
from tisa_cli.demo_trace import TraceEvent, read_trace, render_html, render_svg
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
