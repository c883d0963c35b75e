"""Abuse: how the daemon holds when clients misbehave (a slowloris flood, oversized push plans).

Each run starts a fresh daemon (bench/harness.py: a subprocess on a free loopback port, its own
temporary storage, ``HttpRequestTimeout`` 2 s, ``HttpMaxConnections`` 256) and measures:

1. slowloris: ``--connections`` raw TCP connections each send half a request line and stall;
   then the latency and status of a new client's ``GET /system`` (an immediate 503 from the
   connection limit), the time from the flood's start until a new client gets 200 again (the
   stalled ones are cut after HttpRequestTimeout), and how many of them the server closed by then;
2. a push plan declaring ``--oversize-instances`` tiny instances, beyond MaxTransferInstances:
   time to the 400;
3. a push plan of ``--plan-instances`` instances of 1 KiB (at MaxTransferInstances): creation
   (200), commit with no bucket sent (500, no file hashed), DELETE (200), and the worst
   ``GET /system`` latency seen by a concurrent poller meanwhile;
4. a push plan declaring one 1 TiB instance, the size limits raised above it: time to the 507
   (free space check), and what is left in the storage's ``.transfers/push`` afterwards.

    python -m bench.abuse [--connections 1000] [--runs 3]

Prints a markdown table (median, min and max of the runs); ``--json PATH`` also writes the runs.
Exits 1 when a status or a count is not the expected one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import orjson

from bench.harness import Daemon, DaemonError

KIB, MIB, TIB = 1024, 1024 * 1024, 1024 ** 4
CHUNKS_PER_BUCKET = 1000       # 1 KiB instances: ~1 MiB buckets, about the plugin's BucketSize
TINY_SIZE = 16                 # bytes of each instance of the oversized plan
POLL_INTERVAL = 0.01           # seconds between two GET /system of the poller / recovery probe
HTTP_TIMEOUT = 120.0


# -- plans -------------------------------------------------------------------------------------

def orthanc_id(seed: str) -> str:
    """An identifier shaped as Orthanc's: 5 groups of 8 lowercase hex digits (a SHA-1)."""
    h = hashlib.sha1(seed.encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def plan_body(count: int, size: int, tag: str) -> bytes:
    """A consistent push plan (every instance covered exactly once), as POST /transfers/push wants."""
    md5 = hashlib.md5(tag.encode()).hexdigest()   # never checked: no bucket is ever sent
    instances, buckets, bucket = [], [], []
    for i in range(count):
        iid = orthanc_id(f"{tag}-{i}")
        instances.append({"ID": iid, "Size": str(size), "MD5": md5})
        bucket.append({"ID": iid, "Offset": "0", "Size": str(size)})
        if len(bucket) == CHUNKS_PER_BUCKET:
            buckets.append(bucket)
            bucket = []
    if bucket:
        buckets.append(bucket)
    return orjson.dumps({"Instances": instances, "Buckets": buckets, "Compression": "none"})


def timed(client: httpx.Client, method: str, path: str, body: bytes | None = None) -> tuple[int, float]:
    """(status, milliseconds) of one request; the answer is read completely."""
    headers = {"Content-Type": "application/json"} if body is not None else None
    t = time.perf_counter()
    r = client.request(method, path, content=body, headers=headers)
    return r.status_code, 1000 * (time.perf_counter() - t)


# -- slowloris ---------------------------------------------------------------------------------

def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else hard
    if target < needed:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _closed(sock: socket.socket, answers: dict[int, bytes]) -> bool:
    """True once the server closed ``sock`` (EOF or reset); what it sent is kept in ``answers``."""
    for _ in range(64):                                  # bounded: answers are a few hundred bytes
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:                                  # reset: closed too
            return True
        if not data:
            return True
        answers[sock.fileno()] = answers.get(sock.fileno(), b"")[:64] + data[:64]
    return False


def slowloris(url: str, port: int, connections: int, request_timeout: float) -> dict:
    socks: list[socket.socket] = []
    answers: dict[int, bytes] = {}
    failed = 0
    deadline = time.monotonic() + 60
    fresh = httpx.Client(base_url=url, trust_env=False, timeout=HTTP_TIMEOUT,
                         limits=httpx.Limits(max_keepalive_connections=0))   # a new connection each time
    try:
        t_start = time.perf_counter()
        for _ in range(connections):
            if time.monotonic() > deadline:
                break
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /sys")
                s.setblocking(False)
                socks.append(s)
            except OSError:
                failed += 1
        opened_s = time.perf_counter() - t_start
        try:
            busy_status, busy_ms = timed(fresh, "GET", "/system")
        except httpx.HTTPError as e:                     # reset instead of an answer: reported
            busy_status, busy_ms = type(e).__name__, None

        recovered_s, status = None, None
        end = time.monotonic() + 5 * request_timeout + 10
        while time.monotonic() < end:
            try:
                status = fresh.get("/system").status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                recovered_s = time.perf_counter() - t_start
                break
            time.sleep(POLL_INTERVAL)
        closed_then = sum(_closed(s, answers) for s in socks)

        all_closed_s = None
        end = time.monotonic() + request_timeout + 5
        while time.monotonic() < end:
            if all(_closed(s, answers) for s in socks):
                all_closed_s = time.perf_counter() - t_start
                break
            time.sleep(0.05)
        refused = sum(a.startswith(b"HTTP/1.1 503") for a in answers.values())
    finally:
        fresh.close()
        for s in socks:
            s.close()
    return {"opened": len(socks), "connect_failures": failed, "open_s": opened_s,
            "busy_status": busy_status, "busy_ms": busy_ms, "recovered_s": recovered_s,
            "closed_at_recovery": closed_then, "all_closed_s": all_closed_s, "refused_503": refused}


# -- push plans ---------------------------------------------------------------------------------

class Poller:
    """GET /system every POLL_INTERVAL on a kept-alive connection, from a thread; keeps the worst."""

    def __init__(self, url: str):
        self.url, self.worst_ms, self.count, self.errors = url, 0.0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, trust_env=False, timeout=HTTP_TIMEOUT) as c:
            while True:  # at least one poll, however quick the steps under watch
                try:
                    status, ms = timed(c, "GET", "/system")
                    self.errors += status != 200
                except httpx.HTTPError:
                    self.errors += 1
                    ms = HTTP_TIMEOUT * 1000
                self.worst_ms, self.count = max(self.worst_ms, ms), self.count + 1
                if self._stop.wait(POLL_INTERVAL):
                    break

    def __enter__(self) -> "Poller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(HTTP_TIMEOUT + 5)


def push_plans(d: Daemon, bodies: dict[str, bytes]) -> dict:
    out: dict = {}
    with httpx.Client(base_url=d.url, trust_env=False, timeout=HTTP_TIMEOUT) as c:
        out["oversize_status"], out["oversize_ms"] = timed(c, "POST", "/transfers/push", bodies["oversize"])

        with Poller(d.url) as poller:
            t = time.perf_counter()
            r = c.post("/transfers/push", content=bodies["full"], headers={"Content-Type": "application/json"})
            out["create_status"], out["create_ms"] = r.status_code, 1000 * (time.perf_counter() - t)
            path = r.json().get("Path") if r.status_code == 200 else None
            if path:
                out["commit_status"], out["commit_ms"] = timed(c, "POST", f"{path}/commit", b"")
                out["delete_status"], out["delete_ms"] = timed(c, "DELETE", path)
        out["poll_worst_ms"], out["polls"], out["poll_errors"] = poller.worst_ms, poller.count, poller.errors

        out["huge_status"], out["huge_ms"] = timed(c, "POST", "/transfers/push", bodies["huge"])
    push_dir = Path(d.config["StorageDirectory"]) / ".transfers" / "push"
    out["left_in_push"] = len(list(push_dir.iterdir())) if push_dir.is_dir() else 0
    return out


def run_once(a: argparse.Namespace, bodies: dict[str, bytes]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="bench-abuse-", dir=a.workdir))
    above_tib = 2 * TIB // MIB
    config = {
        "StorageDirectory": str(workdir / "storage"), "HttpBindAddress": "127.0.0.1",
        "HttpRequestTimeout": a.request_timeout, "HttpMaxConnections": a.max_connections,
        "Transfers": {"MaxTransferInstances": a.plan_instances,
                      "MaxInstanceSize": above_tib, "MaxTransferSize": above_tib},
    }
    try:
        with Daemon(config, workdir) as d:   # stopped (by its PID) when the block ends, error or not
            res = {"pid": d.pid}
            res.update(slowloris(d.url, d.port, a.connections, a.request_timeout))
            res.update(push_plans(d, bodies))
            res["daemon_alive"] = d.proc.poll() is None
            if not res["daemon_alive"]:
                res["stderr_tail"] = d.stderr_tail(2000)
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return res


# -- report -------------------------------------------------------------------------------------

EXPECTED = {"busy_status": 503, "oversize_status": 400, "create_status": 200, "commit_status": 500,
            "delete_status": 200, "huge_status": 507}


def problems(a: argparse.Namespace, r: dict) -> list[str]:
    out = [f"{k} = {r.get(k)}, expected {v}" for k, v in EXPECTED.items() if r.get(k) != v]
    if r["recovered_s"] is None:
        out.append("GET /system never answered 200 again after the flood")
    if r["opened"] != a.connections:
        out.append(f"only {r['opened']} of {a.connections} flood connections opened")
    if r["left_in_push"]:
        out.append(f"{r['left_in_push']} entries left in .transfers/push")
    if r["poll_errors"]:
        out.append(f"{r['poll_errors']} GET /system of the poller failed")
    if not r["daemon_alive"]:
        out.append("the daemon died")
    return out


def markdown(a: argparse.Namespace, runs: list[dict]) -> str:
    def stat(key: str, fmt: str = "{:.1f}") -> str:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            return "| – | – | – |"
        return "| " + " | ".join(fmt.format(f(vals)) for f in (statistics.median, min, max)) + " |"

    def status(key: str) -> str:
        return "/".join(str(s) for s in sorted({r.get(key) for r in runs}, key=str))

    n, p, o = a.connections, a.plan_instances, a.oversize_instances
    rows = [
        (f"slowloris: new `GET /system` while {n} connections stall", status("busy_status"), "ms", stat("busy_ms")),
        ("slowloris: from flood start until a new client gets 200", "200" if all(r["recovered_s"] for r in runs) else "none",
         "s", stat("recovered_s", "{:.2f}")),
        (f"slowloris: of the {n} connections, closed by the server by then", "", "count", stat("closed_at_recovery", "{:.0f}")),
        (f"push plan of {o:,} tiny instances (> MaxTransferInstances)", status("oversize_status"), "ms", stat("oversize_ms")),
        (f"push plan of {p:,} × 1 KiB: create", status("create_status"), "ms", stat("create_ms")),
        ("… commit, no bucket sent", status("commit_status"), "ms", stat("commit_ms")),
        ("… DELETE", status("delete_status"), "ms", stat("delete_ms")),
        ("… worst concurrent `GET /system` during the three", "200" if not any(r["poll_errors"] for r in runs) else "errors",
         "ms", stat("poll_worst_ms")),
        ("push plan of one 1 TiB instance (free space check)", status("huge_status"), "ms", stat("huge_ms")),
        ("… entries left in `.transfers/push`", "", "count", stat("left_in_push", "{:.0f}")),
    ]
    lines = [f"Abuse: HttpRequestTimeout {a.request_timeout} s, HttpMaxConnections {a.max_connections}, "
             f"{len(runs)} run(s)", "",
             "| measure | status | unit | median | min | max |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {m} | {s} | {u} {v}" for m, s, u, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=1000, help="stalled connections of the slowloris flood")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-connections", type=int, default=256, help="the daemon's HttpMaxConnections")
    ap.add_argument("--request-timeout", type=int, default=2, help="the daemon's HttpRequestTimeout (s)")
    ap.add_argument("--plan-instances", type=int, default=50_000,
                    help="instances of the 1 KiB plan, also the daemon's Transfers.MaxTransferInstances")
    ap.add_argument("--oversize-instances", type=int, default=200_000,
                    help="instances of the plan beyond the limit (must exceed --plan-instances)")
    ap.add_argument("--workdir", type=Path, help="where the daemons' temporary storage goes (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep each run's storage and logs")
    ap.add_argument("--json", type=Path, help="also write the runs and the table to this file")
    a = ap.parse_args(argv)
    if min(a.connections, a.runs, a.max_connections, a.request_timeout, a.plan_instances) < 1:
        ap.error("counts and timeouts must be >= 1")
    if a.oversize_instances <= a.plan_instances:
        ap.error("--oversize-instances must exceed --plan-instances")

    raise_nofile(a.connections + 2 * a.max_connections + 256)   # before the daemon starts: it inherits it
    t = time.perf_counter()
    bodies = {"oversize": plan_body(a.oversize_instances, TINY_SIZE, "oversize"),
              "full": plan_body(a.plan_instances, KIB, "full"),
              "huge": plan_body(1, TIB, "huge")}
    print(f"plans built in {time.perf_counter() - t:.1f} s ({len(bodies['oversize']) / 1e6:.1f} MB and "
          f"{len(bodies['full']) / 1e6:.1f} MB of JSON)", file=sys.stderr)

    runs, bad = [], []
    for i in range(a.runs):
        try:
            r = run_once(a, bodies)
        except (DaemonError, httpx.HTTPError, OSError) as e:
            print(f"run {i + 1}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        r["problems"] = problems(a, r)
        runs.append(r)
        bad += r["problems"]
        print(f"run {i + 1}: 503 in {r['busy_ms']:.1f} ms, 200 again after {r['recovered_s'] or float('nan'):.2f} s, "
              f"{len(r['problems'])} problem(s)", file=sys.stderr)
        for p in r["problems"]:
            print(f"  {p}", file=sys.stderr)
    table = markdown(a, runs)
    print(table)
    if a.json:
        a.json.write_text(json.dumps({"benchmark": "abuse", "params": {k: str(v) for k, v in vars(a).items()},
                                      "runs": runs, "table": table}, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
