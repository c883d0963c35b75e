"""Run the daemon under test as a real subprocess, the way an operator would.

Benchmarks go through ``python -m accelerator serve CONFIG`` and HTTP only, so they measure the
whole daemon (parsing, storage, index, server) and never import its internals. Resource use is
read from /proc while the process is still alive (afterwards the kernel has forgotten it).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["Daemon", "DaemonError", "free_port", "process_usage", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class DaemonError(RuntimeError):
    """The daemon did not start, or died; the message carries its stderr tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just considered free (small race, acceptable for benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def process_usage(pid: int, *, include_descendants: bool = False) -> tuple[float, int]:
    """(CPU seconds user+system, peak RSS bytes = VmHWM) of a live process.

    With ``include_descendants`` the live children (e.g. worker processes) are added: CPU summed,
    peak RSS summed too (an upper bound, since their peaks need not coincide).
    """
    pids = [pid] + (descendants(pid) if include_descendants else [])
    cpu, rss = 0.0, 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            status = Path(f"/proc/{p}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            if p == pid:
                raise
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # comm may contain spaces and ')'
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        cpu += (utime + stime) / _CLK_TCK
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                rss += int(line.split()[1]) * 1024
                break
    return cpu, rss


def descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class Daemon:
    """``with Daemon({...}, workdir) as d:`` runs one daemon on a free port until the block ends.

    ``workdir`` receives config.json, stdout.log, stderr.log and (unless the config names one)
    the storage directory. The daemon is started from the repository root with it on
    PYTHONPATH, so the code under test is the working tree, installed or not. ``root`` names
    another tree (e.g. a ``git worktree`` of an older commit) to start instead, with the same
    Python: the bench compares two versions of the daemon in one run that way.
    """

    def __init__(self, config: dict | None, workdir: Path, *, start_timeout: float = 30.0,
                 stop_timeout: float = 10.0, python: str = sys.executable, args: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 root: Path | None = None):
        self.args = tuple(args)
        self.root = Path(root).resolve() if root is not None else REPO_ROOT
        # ``prefix`` wraps the command line, e.g. ("ip", "netns", "exec", NS) (which execs in
        # place: the PID stays the daemon's); ``env`` adds variables to the daemon's environment.
        # The readiness probe goes to 127.0.0.1 from the calling thread, so a daemon in another
        # network namespace must be started from a thread in that namespace (bench/netns.py).
        self.prefix = tuple(map(str, prefix))
        self.extra_env = dict(env or {})
        self.workdir = Path(workdir)
        self.config = dict(config or {})
        self.start_timeout, self.stop_timeout, self.python = start_timeout, stop_timeout, python
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DaemonError("daemon not started")
        return self.proc.pid

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "stderr.log"

    def usage(self, include_descendants: bool = False) -> tuple[float, int]:
        return process_usage(self.pid, include_descendants=include_descendants)

    def start(self) -> "Daemon":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.config)
        self.port = cfg.setdefault("HttpPort", free_port())  # a given port lets peers point here
        cfg.setdefault("StorageDirectory", str(self.workdir / "storage"))
        cfg.setdefault("HttpBindAddress", "127.0.0.1")     # never expose a benchmark daemon
        config_path = self.workdir / "config.json"
        config_path.write_text(json.dumps(cfg, indent=2) + "\n")
        env = dict(os.environ)
        # The tree first on the path: it wins over the venv's editable install of /work/main.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        with open(self.workdir / "stdout.log", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([*self.prefix, self.python, "-m", "accelerator", "serve", str(config_path), *self.args],
                                         cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = "no answer"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DaemonError(f"daemon exited with code {self.proc.returncode} before answering "
                                      f"GET /system; stderr tail:\n{_tail(self.stderr_path)}")
                try:
                    r = client.get(self.url + "/system")
                    if r.status_code < 500:  # 401/403 too: the server is up, it just wants auth
                        return
                    last = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    last = type(e).__name__
                time.sleep(0.1)
        raise DaemonError(f"GET {self.url}/system did not answer within {self.start_timeout:g} s "
                          f"(last: {last}); stderr tail:\n{_tail(self.stderr_path)}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; returns the exit code."""
        p = self.proc
        if p is None or p.poll() is not None:
            self.returncode = p.returncode if p else None
            return self.returncode
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)     # its own session: takes workers along
            except ProcessLookupError:
                pass
            p.wait()
        self.returncode = p.returncode
        return self.returncode

    def stderr_tail(self, limit: int = 4000) -> str:
        return _tail(self.stderr_path, limit)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
