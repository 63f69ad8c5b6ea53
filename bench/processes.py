"""The benchmarks' processes: a world of keys on disk, child processes with their peak
memory and CPU time, the real relay started as ``python -m relay``.

Shared by :mod:`bench.nodes` and :mod:`bench.relay_load` (neither imports the other).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nacl.pwhash

from bench.world import bench_arrangement
from tisa.arrangement import Arrangement, SignedArrangement
from tisa.keys import MemberSecret

__all__ = [
    "PASSPHRASE",
    "Process",
    "commit_flushes",
    "cpu_seconds",
    "emit",
    "free_port",
    "load",
    "make_world",
    "profile",
    "relay_limits",
    "run_folder",
    "start_relay",
    "trace_env",
    "vm_hwm_mib",
    "wait_port",
]

PASSPHRASE = "bench"


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


# --- set-up ------------------------------------------------------------------------------


def make_world(folder: Path) -> None:
    secrets = {n: MemberSecret.generate() for n in ("seoul", "tokyo", "washington")}
    arrangement = bench_arrangement(secrets, created=int(time.time()))
    signed = SignedArrangement(arrangement)
    for name, secret in secrets.items():
        signed = signed.signed_by(secret, name)
        secret.save(
            folder / f"{name}.key",
            PASSPHRASE,
            name=name,
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN,
        )
    (folder / "arrangement.tisa").write_bytes(signed.encode())


def load(folder: Path, name: str) -> tuple[MemberSecret, Arrangement]:
    secret, _ = MemberSecret.load(folder / f"{name}.key", PASSPHRASE)
    arrangement = SignedArrangement.load_effective((folder / "arrangement.tisa").read_bytes())
    return secret, arrangement


def wait_port(path: Path, process: Process, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        if process.poll() is not None:
            raise RuntimeError(f"process exited early: {process.popen.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"no port in {path}")


def vm_hwm_mib(pid: int | str = "self") -> float:
    """A process's peak RSS (VmHWM) in MiB, nan if it cannot be read.

    Not ``ru_maxrss``: Linux carries the peak of the image a process replaced with
    ``execve`` into it, so a child started by a large orchestrator reports at least the
    orchestrator's size (every process showed 48 MiB once this process had run the
    in-process ceiling benchmark). VmHWM belongs to the process's own memory map.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Process:
    """A child process whose output goes to a file. Its peak RSS is read from /proc
    before :meth:`stop` ends it (a role that ends by itself emits its own)."""

    def __init__(
        self, folder: Path, label: str, args: list[str], env: dict[str, str] | None = None
    ):
        self.out = folder / f"{label}.out"
        self.err = folder / f"{label}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(
                [sys.executable, *args], stdout=out, stderr=err, env={**os.environ, **(env or {})}
            )
        self.peak_mib = float("nan")
        self.cpu_s = float("nan")  # user + system CPU seconds, start-up included

    def poll(self) -> int | None:
        return self.popen.poll()

    def reap(self) -> bool:
        """Whether the process has ended (its peak RSS and CPU seconds then read); raises
        if it failed."""
        if self.popen.returncode is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        if not pid:
            return False
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        if self.popen.returncode not in (0, -15):
            raise RuntimeError(f"{self.popen.args!r} failed:\n{self.err.read_text()[-3000:]}")
        return True

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reap():
                return
            time.sleep(0.01)
        self.popen.kill()
        raise TimeoutError(f"{self.popen.args!r} did not finish")

    def stop(self) -> None:
        if self.popen.returncode is None:
            self.peak_mib = vm_hwm_mib(self.popen.pid)
            self.popen.terminate()
            self.wait(30)

    def records(self) -> list[dict[str, Any]]:
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def run_folder(folder: Path) -> Path:
    """A fresh folder for one run, with the world's keys and arrangement linked in."""
    run = Path(tempfile.mkdtemp(dir=folder))
    for name in ("seoul.key", "tokyo.key", "washington.key", "arrangement.tisa"):
        (run / name).symlink_to(folder / name)
    return run


def relay_limits(count: int) -> list[str]:
    """The relay limits a run of ``count`` reports sets (``--limit`` values), each above
    its default so that the run measures the normal path: a queue per recipient that
    holds every report, and an hourly allowance of one-time prekeys (one originator, one
    recipient) that covers every report (the default, 1,000, would wrap the reports past
    it to the signed prekey only)."""
    return [
        f"max_queue_per_recipient={max(count, 10) * 2}",
        f"max_one_time_prekeys_per_hour={max(count, 10) * 2}",
    ]


def start_relay(
    run: Path,
    count: int,
    store: str | None = None,
    label: str = "relay",
    metrics_port: int | None = None,
    env: dict[str, str] | None = None,
    head_holds: Path | None = None,
) -> Process:
    """The real relay (``python -m relay``) on a fresh store in ``run`` (or on ``store``, a
    ``postgresql://`` address: several relay processes may share one); its port is written
    to ``run / f"{label}.port"``. Its limits: :func:`relay_limits`. With ``metrics_port``
    it serves its metrics there on 127.0.0.1 (:func:`commit_flushes` reads them). ``env``:
    more environment variables for it (e.g. :func:`trace_env`). With ``head_holds`` (on
    PostgreSQL), it runs as ``python -m bench.headclock head_holds ...``, which records
    each of its holds of the audit chain's head row in that file (:mod:`bench.headclock`).

    With ``BENCH_PROFILE_RELAY`` set to a directory, ``py-spy record`` (installed
    separately, not a dependency) samples the relay until it ends, into a collapsed-stack
    file there (``relay-<pid>.txt``, one line per stack with its sample count)."""
    relay = Process(
        run, label,
        [*(("-m", "relay") if head_holds is None else ("-m", "bench.headclock", str(head_holds))),
         "--key", str(run / "washington.key"), "--passphrase-env", "BENCH_PASS",
         "--arrangement", str(run / "arrangement.tisa"), "--store", store or str(run / "relay"),
         "--port", "0", "--port-file", str(run / f"{label}.port"),
         *(arg for limit in relay_limits(count) for arg in ("--limit", limit)),
         *(() if metrics_port is None else ("--metrics", f"127.0.0.1:{metrics_port}"))],
        env={"BENCH_PASS": PASSPHRASE, **(env or {})},
    )  # fmt: skip
    profile(relay, "BENCH_PROFILE_RELAY", "relay")
    return relay


def trace_env(folder: Path | None, label: str) -> dict[str, str]:
    """The environment that turns :mod:`tisa_io.trace` on in a child process, into
    ``folder`` under the name ``label`` (nothing when ``folder`` is None)."""
    if folder is None:
        return {}
    return {"TISA_TRACE_DIR": str(folder), "TISA_TRACE_NAME": label}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a relay's ``--metrics``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def commit_flushes(port: int, timeout: float = 10.0) -> tuple[float, float]:
    """A relay's flushes to disk so far and the steps they made durable, from its metrics
    on 127.0.0.1:``port`` (``tisa_relay_commit_batch_steps``' count and sum); raises
    ``OSError`` if they cannot be read by ``timeout``."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("tisa_relay_commit_batch_steps_count", "tisa_relay_commit_batch_steps_sum"):
            found[name] = float(value)
    return (
        found["tisa_relay_commit_batch_steps_count"],
        found["tisa_relay_commit_batch_steps_sum"],
    )


def profile(process: Process, variable: str, label: str) -> None:
    """With the environment variable ``variable`` set to a directory, ``py-spy record``
    (installed separately, not a dependency) samples ``process`` until it ends, into a
    collapsed-stack file there (``<label>-<pid>.txt``, one line per stack with its sample
    count). ``BENCH_PROFILE_RELAY`` does it for every relay, ``BENCH_PROFILE_NODES`` for
    the member nodes Seoul and Tokyo (:mod:`bench.nodes`)."""
    folder = os.environ.get(variable)
    if folder:
        out = Path(folder) / f"{label}-{process.popen.pid}.txt"
        subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
             str(process.popen.pid), "--rate", "500", "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (Linux /proc; else NaN)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
