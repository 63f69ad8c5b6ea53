"""A throwaway PostgreSQL server for the tests and the benchmarks: found or installed,
started, stopped.

:class:`PgServer` brings one up: Debian's ``postgresql`` package is installed when no
``initdb`` is found under ``/usr/lib/postgresql/*/bin`` (only as root, with apt-get), a
cluster is made by ``initdb`` in a fresh temporary folder, and ``postgres`` listens on a
unix socket in that folder only (no TCP). ``initdb`` and ``postgres`` refuse to run as
root, so as root they run as the unprivileged ``postgres`` user (which the package
creates), and the folder belongs to that user.

``TISA_PG_DSN`` points the tests at an existing server instead (a ``postgresql://``
address of a role that may create schemas); nothing is installed or started then.

Every failure raises :class:`PgUnavailable` with what went wrong: the PostgreSQL tests
are never skipped, a machine that cannot run them fails them and says why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

__all__ = [
    "DSN_ENV",
    "PgServer",
    "PgUnavailable",
    "find_bindir",
    "postmaster_pid",
    "server_cpu_seconds",
    "with_schema",
]

DSN_ENV = "TISA_PG_DSN"
# The unprivileged user that runs the server when the tests run as root.
SERVER_USER = "postgres"
# Seconds pg_ctl waits for the server to start or stop.
PG_CTL_TIMEOUT = 60
# Seconds apt-get may take to install the package on a fresh machine.
INSTALL_TIMEOUT = 900


class PgUnavailable(RuntimeError):
    """No PostgreSQL server can be brought up for the tests; the message says why."""


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb, or None."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def _run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PgUnavailable(f"{argv[0]} failed: {exc}") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise PgUnavailable(f"{' '.join(argv[:3])} exited {done.returncode}: {' | '.join(output)}")


def _install() -> Path:
    """Install Debian's postgresql package (quietly); the bin folder it brings."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PgUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and this is"
            f" not root on Debian: install the postgresql package, or set {DSN_ENV}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], timeout=INSTALL_TIMEOUT, env=env)
    _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
        timeout=INSTALL_TIMEOUT,
        env=env,
    )
    bindir = find_bindir()
    if bindir is None:
        raise PgUnavailable("apt-get installed postgresql, yet no initdb is found")
    return bindir


class PgServer:
    """One PostgreSQL server for a test session (see the module docstring).

    :meth:`start` brings it up (or checks the ``dsn`` given, else ``TISA_PG_DSN``),
    :meth:`stop` stops it (one it started) and removes its folder, :meth:`new_schema`
    gives each test an empty schema of its own.
    """

    def __init__(self, dsn: str | None = None) -> None:
        # An existing server's address (as TISA_PG_DSN gives one), else None: bring one up.
        self._given = dsn
        self.folder: Path | None = None
        self.bindir: Path | None = None
        self.dsn = ""
        self._user: str | None = None
        self._options = ""
        self._schemas = 0

    def _as_user(self, argv: list[str]) -> list[str]:
        return argv if self._user is None else ["runuser", "-u", self._user, "--", *argv]

    def start(self) -> None:
        """Bring the server up. Raises: PgUnavailable, saying why."""
        existing = self._given or os.environ.get(DSN_ENV)
        if existing:
            self.dsn = existing
            self._check()
            return
        self.bindir = find_bindir() or _install()
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PgUnavailable(
                    f"running as root, and there is no {SERVER_USER!r} user to run PostgreSQL"
                ) from None
            self._user = SERVER_USER
        # Not under pytest's tmp folder: that one is private to root, and the server
        # user must reach its data folder and socket.
        self.folder = Path(tempfile.mkdtemp(prefix="tisa-pg-"))
        data = self.folder / "data"
        if self._user is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.folder.chmod(0o755)
        _run(
            self._as_user(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "tisa",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            timeout=PG_CTL_TIMEOUT,
        )
        # Unix socket only (listen_addresses empty). fsync off: a test can crash the
        # server process, never the kernel, which keeps what it was given either way.
        self._options = (
            f"-c listen_addresses='' -c unix_socket_directories={self.folder}"
            " -c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._pg_ctl("start")
        self.dsn = f"postgresql://tisa@/postgres?host={urllib.parse.quote(str(self.folder))}"
        self._check()

    def _pg_ctl(self, action: str, *options: str) -> None:
        assert self.folder is not None and self.bindir is not None
        data = self.folder / "data"
        logged = ["-l", str(self.folder / "server.log"), "-o", self._options]
        argv = [str(self.bindir / "pg_ctl"), "-D", str(data)]
        argv += [*(logged if action == "start" else ()), *options]
        argv += ["-t", str(PG_CTL_TIMEOUT), "-w", action]
        _run(self._as_user(argv), timeout=PG_CTL_TIMEOUT + 5)

    @property
    def restartable(self) -> bool:
        """Whether this started the server (so a test may stop and start it)."""
        return self.folder is not None

    def crash(self) -> None:
        """Stop the server hard (``pg_ctl stop -m immediate``: no shutdown checkpoint;
        it recovers from its WAL when started again)."""
        self._pg_ctl("stop", "-m", "immediate")

    def restart(self) -> None:
        """Start the server again after :meth:`crash`."""
        self._pg_ctl("start")

    def _check(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.dsn, connect_timeout=10) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise PgUnavailable(f"cannot connect to PostgreSQL at {self.dsn}: {exc}") from None

    def new_schema(self) -> str:
        """A store address of an empty schema of its own (a fresh relay store)."""
        import psycopg

        self._schemas += 1
        name = f"tisa_test_{os.getpid()}_{self._schemas}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            conn.execute(f"CREATE SCHEMA {name}")
        return with_schema(self.dsn, name)

    def stop(self) -> None:
        """Stop the server this started (not one named by TISA_PG_DSN); remove its folder."""
        if self.folder is None or self.bindir is None:
            return
        with contextlib.suppress(PgUnavailable):
            self._pg_ctl("stop", "-m", "fast")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def with_schema(dsn: str, schema: str) -> str:
    """``dsn`` with ``search_path`` set to ``schema`` (the store's tables go there)."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query)
    query = [(k, v) for k, v in query if k != "options"]
    query.append(("options", f"-c search_path={schema}"))
    # quote, not quote_plus: libpq reads a '+' as a plus sign, not a space.
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return urllib.parse.urlunsplit(parts._replace(query=encoded))


def postmaster_pid(dsn: str) -> int | None:
    """The process id of the server at ``dsn`` (its postmaster), when it runs on this
    machine and its processes can be read in /proc; else None."""
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        # Read while the connection is open: its backend ends with it (read after the
        # close, the process could be gone, and the answer None).
        stat = _stat_fields(int(row[0]))
    return None if stat is None else int(stat[1])


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def server_cpu_seconds(postmaster: int) -> float:
    """User + system CPU seconds the PostgreSQL server has used so far: its postmaster,
    the children it has reaped (backends of closed connections: the kernel adds their
    time to the postmaster's cutime and cstime) and its children still running (the
    backends, the WAL writer, the checkpointer, autovacuum). NaN when not readable.

    The difference of two readings is the server's CPU between them, whichever backends
    came and went meanwhile.
    """
    own = _stat_fields(postmaster)
    if own is None:
        return float("nan")
    ticks = sum(int(field) for field in own[11:15])  # utime stime cutime cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")
