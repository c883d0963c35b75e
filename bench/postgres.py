"""A real PostgreSQL for the tests and the benchmarks: Debian's server binaries on loopback.

`start_postgres()` runs `initdb` in a fresh temporary folder, then the `postgres` server itself
(not through `pg_ctl`, so that the process we hold is the server and can be stopped by its PID)
on a free 127.0.0.1 port, without a Unix socket, with trust authentication for the `postgres`
role and durability off (a test database need not survive a power cut). initdb and the server
refuse to run as root: when we are root they run as the `postgres` OS user (`setpriv`, which
execs rather than forking, so the PID is the server's) in a folder that user owns. The folder is
not under pytest's temporary root, which is private to root.

`PostgresServer.stop()` asks for a fast shutdown (SIGINT: clients are disconnected, no wait for
them), then SIGKILL after a grace period; `restart()` stops it and starts it again on the same
port and data (fault tests: requests fail while it is away, then work again);
`create_database()` makes a fresh, empty database (a test's own: CREATE DATABASE is fast).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import stop_process
from bench.seaweedfs import free_ports

STOP_GRACE = 5.0  # seconds between SIGINT (fast shutdown) and SIGKILL
OS_USER = "postgres"  # runs initdb and the server when we are root


def postgres_bin_dir() -> Path | None:
    """The newest Debian server binaries (/usr/lib/postgresql/N/bin), else those on PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for folder in reversed(candidates):
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return Path(initdb).parent
    return None


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the postgres OS user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return command
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", "--", *command]


@dataclass
class PostgresServer:
    port: int
    folder: Path  # ours: removed by stop()
    bin_dir: Path
    process: subprocess.Popen | None = None
    started_in: float = 0.0  # seconds from spawn to an accepted connection
    _names: itertools.count = field(default_factory=itertools.count)

    user = "postgres"
    host = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def conninfo(self, database: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={database} connect_timeout=5"

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database (a fresh name unless one is given)."""
        import psycopg

        name = name or f"test_{next(self._names)}_{os.getpid()}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def start(self, timeout: float = 30.0) -> None:
        """Start the server on its data folder; return once it accepts a connection."""
        command = [
            str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={self.host}", "-c", "unix_socket_directories=",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=300", "-c", "deadlock_timeout=200ms",
        ]
        started = time.monotonic()
        with open(self.folder / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(_as_server_user(command), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.folder)
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.stop_server()
            raise
        self.started_in = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        import psycopg

        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                psycopg.connect(self.conninfo(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise TimeoutError(f"PostgreSQL on port {self.port} not ready: {last}\n{self.log_tail()}")

    def stop_server(self) -> None:
        """Stop the server by its PID (fast shutdown, then SIGKILL); the data stays."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                stop_process(self.process, 0)
        self.process = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay away `down_for` seconds, start again on the same port and data."""
        self.stop_server()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        self.stop_server()
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.folder / "postgres.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_postgres(*, timeout: float = 30.0, parent: str | None = None) -> PostgresServer:
    """initdb in a new temporary folder (under `parent`, default the system's temporary folder),
    then start the server on a free loopback port."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, postgres) are not installed")
    folder = Path(tempfile.mkdtemp(prefix="accelerator-postgres-", dir=parent))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(free_ports(1)[0], folder, bin_dir)
    try:
        subprocess.run(
            _as_server_user([str(bin_dir / "initdb"), "-D", str(server.data), "-U", server.user,
                             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"]),
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=folder, timeout=timeout,
        )
        server.start(timeout)
    except BaseException:
        server.stop()
        raise
    return server


if __name__ == "__main__":  # manual check: python -m bench.postgres
    t = time.monotonic()
    srv = start_postgres()
    print(f"PostgreSQL at {srv.uri()} ready in {time.monotonic() - t:.2f} s "
          f"(server {srv.started_in:.2f} s); database {srv.create_database()}")
    t = time.monotonic()
    srv.restart()
    print(f"restarted in {time.monotonic() - t:.2f} s")
    t = time.monotonic()
    srv.stop()
    print(f"stopped in {time.monotonic() - t:.2f} s")
