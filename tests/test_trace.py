"""The tracer (tisa_io.trace) and its analysis (bench.tracing).

Off, it writes nothing and leaves the nodes as they are; on, a relay and two nodes in
one process stamp every step of a report's path, in an order the protocol makes
necessary, and the links count the messages both sides see; the analysis of a written
trace gives the figures its stamps and snapshots imply; every limit is crossed.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from nodes.client_world import LEVEL, SCOPE, make_world

from bench import tracing
from clients.node import Backoff, open_node
from relay.server import serve
from tisa.errors import UsageError
from tisa_io import trace

ARRANGEMENT, SECRETS = make_world()
FAST = Backoff(initial=0.01, maximum=0.1)
ROOT = pathlib.Path(__file__).resolve().parent.parent
REPORTS = 6


@pytest.fixture(autouse=True)
def _tracing_off() -> Iterator[None]:
    # Every test starts and ends with tracing off in this process.
    assert not trace.enabled, "TISA_TRACE_DIR is set for the test run"
    yield
    trace.disable()


async def _three_nodes(tmp: pathlib.Path, count: int) -> list[bytes]:
    """A relay, Seoul and Tokyo in this process; Seoul submits ``count`` reports one
    after the other, each released to Tokyo, whose application takes each (stamping
    ``T_app`` as bench.nodes does) and acks it. Returns the report ids."""
    submitted: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def relay(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(SECRETS["washington"], ARRANGEMENT, tmp / "washington",
                        task_status=task_status)  # fmt: skip

        port = await nursery.start(relay)
        address = ("127.0.0.1", port)
        async with (
            open_node(SECRETS["seoul"], "seoul", ARRANGEMENT, address, tmp / "seoul",
                      backoff=FAST) as seoul,
            open_node(SECRETS["tokyo"], "tokyo", ARRANGEMENT, address, tmp / "tokyo",
                      backoff=FAST) as tokyo,
        ):  # fmt: skip
            with trio.fail_after(30):
                await seoul.wait_connected()
                await tokyo.wait_connected()
                reports = tokyo.reports()
                for n in range(count):
                    report_id = await seoul.submit(
                        b"report %d" % n, recipients=["tokyo"], scope=SCOPE, level=LEVEL,
                        release_to=["tokyo"],
                    )  # fmt: skip
                    submitted.append(report_id)
                    report = await reports.__anext__()
                    if trace.enabled:
                        trace.mark("T_app", report.report_id)
                    assert report.report_id == report_id
                    await tokyo.ack(report)
                for report_id in submitted:
                    await seoul.wait_stored(report_id)
        nursery.cancel_scope.cancel()
    return submitted


# --- off -------------------------------------------------------------------------------


async def test_off_writes_nothing_and_installs_nothing(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "trace"
    seen: list[object] = []
    with pytest.MonkeyPatch.context() as patch:
        # Were a hook to reach the tracer while off, it would be seen here.
        for name in ("mark", "mark_all", "begin", "count", "span_start", "span_end"):
            patch.setattr(trace, name, lambda *args, **kwargs: seen.append(args))
        patch.setattr(trace, "instrument", lambda: seen.append("instrument"))
        submitted = await _three_nodes(tmp_path, 2)
    assert len(submitted) == 2
    assert seen == []
    assert not folder.exists() and not list(tmp_path.rglob("*.trace"))
    # The calls themselves, made while off, record nothing and create nothing.
    trace.mark("S0", b"\x01")
    trace.begin("S0")
    trace.count("in:stored")
    trace.span_start("commit")
    trace.span_end("commit")
    trace.flush()
    trace.snapshot()
    assert trace._tracer is None and not trace.enabled
    assert not list(tmp_path.rglob("*.trace"))


def test_off_unless_the_environment_says(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TISA_TRACE")}
    script = "from tisa_io import trace; print(trace.enabled)"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "False"
    env |= {trace.ENV_DIR: str(tmp_path / "t"), trace.ENV_NAME: "relay"}
    script = "from tisa_io import trace; print(trace.enabled); trace.mark('R_recv', b'\\x02')"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "True"
    (path,) = (tmp_path / "t").glob("relay-*.trace")
    found = trace.read(path)
    assert found.name == "relay" and [(s.label, s.key) for s in found.stamps] == [("R_recv", "02")]
    assert len(found.snapshots) == 2  # when enabled, and at exit


def test_a_bad_size_limit_in_the_environment_is_refused(tmp_path: pathlib.Path) -> None:
    env = {**os.environ, trace.ENV_DIR: str(tmp_path), trace.ENV_MAX_BYTES: "lots"}
    done = subprocess.run([sys.executable, "-c", "import tisa_io.trace"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "UsageError: TISA_TRACE_MAX_BYTES must be a number of bytes" in done.stderr


# --- on: the path of a report in three nodes ----------------------------------------------


@pytest.fixture
async def traced_run(tmp_path: pathlib.Path) -> AsyncIterator[tuple[trace.TraceFile, list[bytes]]]:
    path = trace.enable(tmp_path / "trace", "all")
    submitted = await _three_nodes(tmp_path, REPORTS)
    trace.disable()
    yield trace.read(path), submitted


# Orders the protocol makes necessary (not the nominal order of bench.tracing.PATH: a
# stamp taken when a write returns may follow the peer's stamp of reading it).
NECESSARY = [
    # Seoul's submit call, one task.
    ("S0", "S_sealed"), ("S_sealed", "S_pre"), ("S_pre", "S_issued"),
    ("S_issued", "S_durable"), ("S_durable", "S_ret"),
    # Recorded before it is sent; sent before the relay reads it.
    ("S_issued", "S_sent"), ("S_issued", "R_recv"),
    ("R_recv", "R_handled"), ("R_recv", "R_deliver"),
    # The relay's pusher: the delivery, then its write; Tokyo reads it after.
    ("R_deliver", "R_sent"), ("R_deliver", "T_recv"),
    ("T_recv", "T_stored"), ("T_stored", "T_app"),
]  # fmt: skip


async def test_every_stamp_of_the_path_in_order(
    traced_run: tuple[trace.TraceFile, list[bytes]],
) -> None:
    found, submitted = traced_run
    stamps = tracing.paths([found])
    labels = {label for label, _, _ in tracing.PATH} | {"S_ret"}
    for report_id in submitted:
        mine = stamps[report_id.hex()]
        assert set(mine) == labels, report_id
        for before, after in NECESSARY:
            assert mine[before] <= mine[after], (before, after)
    # Each stamp once per report (the relay's R_sent through the token id's alias).
    for label in labels:
        assert sum(stamp.label == label for stamp in found.stamps) == REPORTS, label
    assert len(found.aliases) == REPORTS


async def test_counts_match_the_messages_sent(
    traced_run: tuple[trace.TraceFile, list[bytes]],
) -> None:
    found, _ = traced_run
    last = found.snapshots[-1]
    counts = last.counters
    # One submit_inline per report; one stored answer; one deliver_inline: each sent
    # once and read once (both ends are in this process).
    for kind in ("submit_inline", "stored", "deliver_inline"):
        assert counts[f"out:{kind}"] == counts[f"in:{kind}"] == REPORTS, kind
    # Nothing read that was not sent (a message may be in flight when the nodes close).
    for name, value in counts.items():
        direction, _, kind = name.partition(":")
        if direction == "in":
            assert value <= counts[f"out:{kind}"], kind
    # COMMITs and WAL fsyncs: at least one durable batch per report in each of the
    # three stores, each with its CPU and wall time.
    for span in ("commit", "fsync"):
        number, cpu, wall = last.spans[span]
        assert number >= 3 * REPORTS and cpu > 0 and wall >= cpu / 2
    # CPU per task, the guarded tasks under the name of the function they run.
    for task in ("Node._sender", "Node._reader", "Node._receiver", "Relay._pusher",
                 "<scheduler>"):  # fmt: skip
        assert last.tasks[task][0] > 0, task
    assert "Node._guard" not in last.tasks


async def test_the_analysis_of_a_traced_run_lists_every_step(
    traced_run: tuple[trace.TraceFile, list[bytes]],
) -> None:
    found, _ = traced_run
    result = tracing.analyse_files([found])
    assert result["reports"] == result["complete"] == REPORTS
    assert [(s["from"], s["to"]) for s in result["segments"]] == [
        (a, b) for (a, _, _), (b, _, _) in zip(tracing.PATH, tracing.PATH[1:], strict=False)
    ]
    assert result["path"]["p50"] > 0 and result["submit_call"]["p50"] > 0
    costs = result["processes"]["all"]
    assert costs["cpu_us"] > 0 and costs["messages"]["out"]["submit_inline"] > 0
    printed = "\n".join(tracing.lines(result))
    assert "S_durable -> S_sent" in printed and "WAL fsyncs" in printed


# --- the analysis on a synthetic trace ----------------------------------------------------

MS = 1_000_000


def _synthetic(folder: pathlib.Path) -> None:
    """Ten reports, one second apart; report i takes k + i ms for step k of the path (so
    over the kept reports 2..8 each step's p50 is k + 5, its p90 k + 7.4, its p99 k + 7.94,
    its max k + 8, its mean k + 5).
    Each process snapshots before the window and after it: Seoul spent 7 ms of CPU,
    3.5 ms of it in Node._sender's 14 steps, 7 COMMITs of 100 µs CPU (200 µs wall) and 14
    WAL fsyncs, and sent 7 submit_inline."""
    base = 10_000 * MS
    labels = [label for label, _, _ in tracing.PATH]
    files = {"seoul": ["tisa-trace 1 seoul 11\n"], "relay": ["tisa-trace 1 relay 12\n"],
             "tokyo": ["tisa-trace 1 tokyo 13\n"]}  # fmt: skip
    for i in range(10):
        t = base + i * 1000 * MS
        for k, label in enumerate(labels):
            if k:
                t += (k - 1 + i) * MS
            key = f"{i:02x}"
            if label == "R_deliver":
                files["relay"].append(f"a {key} t{i}\n")
            if label == "R_sent":
                key = f"t{i}"  # by token id
            files[{"S": "seoul", "R": "relay", "T": "tokyo"}[label[0]]].append(
                f"m {label} {key} {t}\n"
            )
    start = base + 2000 * MS - 1  # the S0 of report 2, less 1 ns
    end = base + 8000 * MS + 200 * MS  # after the T_app of report 8, before report 9
    for name, lines in files.items():
        lines += [f"s {start} 1000000\n", "c Node._sender 0 0\n", "n out:submit_inline 3\n",
                  "p commit 1 100000 200000\n"]  # fmt: skip
        lines += [f"s {end} 8000000\n", "c Node._sender 3500000 14\n",
                  "c <scheduler> 700000 0\n", "n out:submit_inline 10\n",
                  "p commit 8 800000 1600000\n", "p fsync 14 1400000 14000000\n",
                  "p checkpoint 7 7000000 14000000\n"]  # fmt: skip
        (folder / f"{name}-1.trace").write_text("".join(lines))


def test_segments_of_a_synthetic_trace(tmp_path: pathlib.Path) -> None:
    _synthetic(tmp_path)
    result = tracing.analyse(tmp_path)
    assert (result["reports"], result["complete"], result["kept"]) == (10, 10, 7)
    for k, step in enumerate(result["segments"]):
        assert step["p50"] == pytest.approx(k + 5)
        assert step["p90"] == pytest.approx(k + 7.4)
        assert step["mean"] == pytest.approx(k + 5)
        assert step["p99"] == pytest.approx(k + 7.94) and step["max"] == pytest.approx(k + 8)
    assert result["segments"][8]["to"] == "R_sent"  # found through the token's alias
    # The whole path: the sum of the 12 steps, 66 + 12 i ms; over i = 2..8.
    assert result["path"]["p50"] == pytest.approx(66 + 12 * 5)
    assert result["path"]["p90"] == pytest.approx(66 + 12 * 7.4)
    assert result["path"]["max"] == pytest.approx(66 + 12 * 8)
    # Over every report, the warm-up (0, 1) and the wind-down (9) too: the tail shows.
    every = result["path_every"]
    assert every["p50"] == pytest.approx(66 + 12 * 4.5)
    assert every["p99"] == pytest.approx(66 + 12 * 8.91)
    assert every["max"] == pytest.approx(66 + 12 * 9)
    assert "submit_call" not in result  # no S_ret stamped


def test_costs_per_report_of_a_synthetic_trace(tmp_path: pathlib.Path) -> None:
    _synthetic(tmp_path)
    result = tracing.analyse(tmp_path)
    for name in ("seoul", "relay", "tokyo"):
        costs = result["processes"][name]
        # Reports 2..8 entered each process between the two snapshots.
        assert costs["reports"] == 7
        assert costs["cpu_us"] == pytest.approx(1000)  # 7 ms over 7 reports
        assert costs["tasks"]["Node._sender"] == {"cpu_us": pytest.approx(500), "steps": 2}
        assert costs["tasks"]["<scheduler>"]["cpu_us"] == pytest.approx(100)
        assert costs["trio_thread_us"] == pytest.approx(600)
        assert costs["other_threads_us"] == pytest.approx(400)
        assert costs["spans"]["commit"] == {
            "per_report": 1, "cpu_us_each": pytest.approx(100), "wall_us_each": pytest.approx(200)
        }  # fmt: skip
        assert costs["spans"]["fsync"]["per_report"] == 2
        assert costs["spans"]["fsync"]["wall_us_each"] == pytest.approx(1000)
        assert costs["messages"] == {"in": {}, "out": {"submit_inline": 1}}
    printed = "\n".join(tracing.lines(result))
    assert "seoul: CPU 1000 µs (7 reports in 6.2 s)" in printed
    assert "COMMITs 1.00 (each CPU 100 µs, wall 200 µs); WAL fsyncs 2.00" in printed
    assert "S0 -> T_app, the whole path" in printed
    assert "S0 -> T_app, every report of the run" in printed
    # The in-line checkpoints (on the event loop), one per report here: 1 ms CPU, 2 ms wall.
    assert "; in-line checkpoints 1.00 (each CPU 1000 µs, wall 2000 µs)" in printed


def test_the_command_prints_a_folder(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _synthetic(tmp_path)
    assert tracing.main([str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    assert "tokyo: CPU 1000 µs (7 reports in 6.2 s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "out.json").read_text())["kept"] == 7
    assert tracing.main([str(tmp_path / "out.json")]) == 2  # not a folder of traces
    assert "no .trace file" in capsys.readouterr().err


def test_no_complete_report_is_said(tmp_path: pathlib.Path) -> None:
    (tmp_path / "seoul-1.trace").write_text("tisa-trace 1 seoul 1\nm S0 aa 5\n")
    result = tracing.analyse(tmp_path)
    assert (result["reports"], result["complete"], result["kept"]) == (1, 0, 0)
    assert tracing.lines(result)[-1] == "    no report has every stamp of the path"


# --- the writer: blocks, limits, stamps waiting for their key, threads, signals ---------


def test_lines_go_out_in_blocks(tmp_path: pathlib.Path) -> None:
    path = trace.enable(tmp_path, "p", limits=trace.TraceLimits(block_lines=10))
    # The header and the first snapshot are held with the stamps.
    held = len(trace._tracer.lines) if trace._tracer else 0
    for n in range(40):
        trace.mark("S0", n)
        assert trace._tracer is not None and len(trace._tracer.lines) < 10
        if n == 10 - held - 1:
            assert path.read_text().count("\n") == 10  # the first block, written
    trace.disable()
    assert [s.key for s in trace.read(path).stamps] == [str(n) for n in range(40)]


def test_the_file_stops_at_its_size_limit(tmp_path: pathlib.Path) -> None:
    limits = trace.TraceLimits(block_lines=7, max_bytes=1000)
    path = trace.enable(tmp_path, "p", limits=limits)
    for n in range(200):
        trace.mark("R_recv", n)
    assert not trace.enabled  # tracing stopped in this process
    size = path.stat().st_size
    assert 1000 - 40 < size <= 1000
    assert path.read_text().endswith("\nx truncated\n")
    found = trace.read(path)
    assert found.truncated and 0 < len(found.stamps) < 200
    trace.disable()  # nothing more is written
    assert path.stat().st_size == size


@pytest.mark.parametrize(
    "limits",
    [{"block_lines": 0}, {"max_bytes": 255}, {"snapshot_interval": 0.0}],
)
def test_limits_out_of_range_are_refused(limits: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        trace.TraceLimits(**limits)  # type: ignore[arg-type]


def test_a_name_with_a_space_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UsageError):
        trace.enable(tmp_path, "two words")
    assert not trace.enabled


async def test_begin_waits_for_the_next_mark_of_its_task(tmp_path: pathlib.Path) -> None:
    path = trace.enable(tmp_path, "p")

    async def submit(key: bytes) -> None:
        trace.begin("S0")
        await trio.sleep(0.01)  # the other task marks meanwhile
        trace.mark("S_sealed", key)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, b"\xaa")
        nursery.start_soon(submit, b"\xbb")
    trace.mark_all("S_sent", [b"\xaa", b"\xbb"])
    trace.mark("T_recv", "two words")
    trace.disable()
    stamps = trace.read(path).stamps
    for key in ("aa", "bb"):
        mine = [s for s in stamps if s.key == key]
        assert [s.label for s in mine] == ["S0", "S_sealed", "S_sent"]
        assert mine[0].t < mine[1].t
    assert len({s.t for s in stamps if s.label == "S_sent"}) == 1
    assert stamps[-1] == trace.Stamp("T_recv", "two_words", stamps[-1].t)


def test_spans_are_timed_in_their_own_thread(tmp_path: pathlib.Path) -> None:
    path = trace.enable(tmp_path, "p")

    def fsync() -> None:
        trace.span_start("fsync")
        sum(range(200_000))  # some CPU
        trace.span_end("fsync")

    trace.span_start("fsync")  # this thread's, never ended: not counted
    worker = threading.Thread(target=fsync)
    worker.start()
    worker.join()
    trace.span_end("commit")  # never started: not counted
    trace.disable()
    spans = trace.read(path).snapshots[-1].spans
    assert set(spans) == {"fsync"}
    number, cpu, wall = spans["fsync"]
    assert number == 1 and cpu > 0 and wall > 0


def test_sigterm_writes_the_file_out(tmp_path: pathlib.Path) -> None:
    script = (
        "import sys, time\n"
        "from tisa_io import trace\n"
        f"trace.enable({str(tmp_path)!r}, 'seoul')\n"
        "trace.mark('S0', b'\\x01')\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM  # ended by the signal, as before
    (path,) = tmp_path.glob("seoul-*.trace")
    assert [s.label for s in trace.read(path).stamps] == ["S0"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("something else\n", "not a version 1 trace file"),
        ("tisa-trace 1 p 1\nm S0 aa\n", "line 2"),
        ("tisa-trace 1 p 1\nc task 1 2\n", "line 2: totals before a snapshot"),
        ("tisa-trace 1 p 1\ns 1 2\nq\n", "line 3: unknown record 'q'"),
    ],
)
def test_a_malformed_file_is_refused(tmp_path: pathlib.Path, text: str, said: str) -> None:
    (tmp_path / "p-1.trace").write_text(text)
    with pytest.raises(UsageError, match=said):
        trace.read(tmp_path / "p-1.trace")


def test_bench_trace_needs_the_latency_part(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import nodes

    with pytest.raises(SystemExit) as exited:
        nodes.main(["--only", "large", "--trace"])
    assert exited.value.code == 2
    assert "--trace traces the latency runs: it needs the latency part" in capsys.readouterr().err
