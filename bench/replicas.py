"""Replicas benchmark (issue 13): what one hub component costs per GB, and what N replicas carry.

Three systems, each measured on the same CT study and from fresh, empty storage:

- ``sqlite-disk``: one daemon, SQLite index, attachments on the local disk (the default);
- ``pg-s3-1``: one replica, index in PostgreSQL, attachments in SeaweedFS (S3), no balancer;
- ``pg-s3-2``: two replicas on that PostgreSQL database and bucket, behind HAProxy in round robin
  with no stickiness (``http-reuse never``: every request may land on either replica).

Each run of a system starts its daemons on a fresh database and bucket, then measures the phases:

- ingest: POST /instances of every file of the study, ``--concurrency`` parallel clients (the
  measurement of bench/ingest.py, whose uploader is reused, answers checked);
- chunk serving: what a pulling peer asks (bench/chunks.py's lookup, planner and GETs, reused):
  POST /transfers/lookup then GET /transfers/chunks/... for every bucket with ``--workers``
  threads, the study pulled ``--pulls`` times in one window (so that the window is long enough
  to measure CPU), sizes checked and, on the first pull, every instance's MD5;
- push (on another fresh system): how a hub really receives a study from a site. A site's daemon
  (SQLite + disk, holding the study, on this machine too) sends it with POST /transfers/send to
  peer "hub" = the system's URL: push plan, bucket PUTs (round robin over the replicas), commit.
  On replicas each bucket's body goes to the object store when it lands and is read back at
  commit, so this costs the store more than POST /instances. The sender's CPU is its own column
  (the site's machine, not the hub's).

For every phase, the CPU seconds of each component are read from /proc around the window: the
daemon(s) with their children, PostgreSQL (postmaster + backends, with the CPU of the backends
that exited during the window, which the kernel adds to the postmaster's ``cutime``), SeaweedFS,
HAProxy, this client and (push) the sender. Dividing by the GB moved gives CPU s/GB, the number that transfers from
this shared 2-core machine to a hub's machines (the throughput itself is bounded by everything
sharing 2 cores, the client included). Peak RSS is VmHWM reset before each phase (PostgreSQL's
is a sum over its processes: an upper bound, shared buffers are counted in each).

The machine is shared: before each run we wait (bounded) for the 1-minute load average to drop
below ``--max-load``, and for each window we record the load and the CPU that processes other
than ours used (machine busy time from /proc/stat minus our components).

Runs are interleaved (run 1 of every system, then run 2, ...) so that a change in the
background load hits every system alike; the tables give medians of ``--runs`` runs. The
capacity section turns the medians into GB/hour, studies/hour and sites a hub of N replicas
serves (see ``capacity``).

    .venv/bin/python -m bench.replicas [--runs 3] [--instances 300] [--concurrency 8] [--workers 4]
                                       [--pulls 3] [--systems sqlite-disk,pg-s3-1,pg-s3-2]
                                       [--phases ingest,serve,push] [--max-load 1.5]
                                       [--out bench/results/replicas-<time>.md]
    .venv/bin/python -m bench.replicas --render bench/results/replicas-X.json [--target 0.7 ...]

Writes the markdown report and a JSON file beside it (same name, .json); ``--render`` writes the
markdown again from such a JSON with other planning assumptions, measuring nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

from bench.chunks import Md5Checker, check_lookup, lookup, pull
from bench.datasets import StudyManifest, ensure_study
from bench.harness import REPO_ROOT, Daemon, DaemonError, descendants, free_port
from bench.ingest import upload_all
from protocol.planner import plan_pull_buckets

DATA_DIR = REPO_ROOT / "bench" / "data"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SYSTEMS = ("sqlite-disk", "pg-s3-1", "pg-s3-2")
PHASES = ("ingest", "serve", "push")
COMPONENTS = ("daemons", "postgresql", "seaweedfs", "haproxy", "client", "sender")
HUB = ("daemons", "postgresql", "seaweedfs", "haproxy")       # what a hub runs (capacity)
_CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD_WAIT_MAX = 180.0     # seconds we wait at most for the load to drop before a run
LOAD_POLL = 5.0
RUN_TIMEOUT = 900.0       # seconds an HTTP phase may take at most (client timeouts bound each request)


# ---------------------------------------------------------------------------------------------
# Resource use from /proc


def tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    return [pid] + descendants(pid)


def tree_usage(pid: int) -> tuple[float, int]:
    """(CPU s, sum of VmHWM bytes) of a process tree, CPU of reaped children included.

    utime+stime+cutime+cstime of every live process: a PostgreSQL backend that exits during the
    window is reaped by the postmaster, and its CPU moves into the postmaster's cutime/cstime
    rather than vanishing (process_usage of bench/harness.py sums live processes only).
    """
    cpu, rss = 0.0, 0
    for p in tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            if p == pid:
                raise
            continue
        f = stat[stat.rindex(")") + 2:].split()
        cpu += sum(int(x) for x in f[11:15]) / _CLK_TCK      # utime stime cutime cstime
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                rss += int(line.split()[1]) * 1024
                break
    return cpu, rss


def reset_peaks(pid: int) -> None:
    """Reset VmHWM of every process of the tree, so a phase's peak is its own."""
    for p in tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            pass


def machine_busy() -> tuple[float, float]:
    """(CPU seconds the whole machine spent busy since boot, of which in interrupts), all cores,
    from /proc/stat. Interrupt time (loopback TCP runs in softirq) is charged to no process."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK, (irq + softirq) / _CLK_TCK


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, log) -> tuple[float, float]:
    """Wait (at most LOAD_WAIT_MAX s) until the 1-minute load average is below ``max_load``.

    Returns (load when we started measuring, seconds waited). Our own previous run raises the
    load average too; it decays in about a minute.
    """
    t0 = time.monotonic()
    while load1() >= max_load and time.monotonic() - t0 < LOAD_WAIT_MAX:
        time.sleep(LOAD_POLL)
    waited = time.monotonic() - t0
    if load1() >= max_load:
        log(f"  load still {load1():.2f} after {waited:.0f} s: measuring anyway (noted)")
    return load1(), waited


# ---------------------------------------------------------------------------------------------
# The systems


@dataclass
class System:
    """One running system: where clients go, and the PIDs of each component to measure."""
    name: str
    url: str
    pids: dict[str, list[int]] = field(default_factory=dict)   # component -> root PIDs
    daemons: list[Daemon] = field(default_factory=list)

    def usage(self) -> dict[str, tuple[float, int]]:
        out = {}
        for comp, pids in self.pids.items():
            cpu = rss = 0
            for p in pids:
                c, r = tree_usage(p)
                cpu, rss = cpu + c, rss + r
            out[comp] = (cpu, rss)
        out["client"] = (time.process_time(), _own_hwm())
        return out

    def reset_peaks(self) -> None:
        for pids in self.pids.values():
            for p in pids:
                reset_peaks(p)
        reset_peaks(os.getpid())

    def stderr_tails(self) -> str:
        return "\n".join(f"--- {d.workdir.name}\n{d.stderr_tail(1500)}" for d in self.daemons)


def _own_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Servers:
    """PostgreSQL and SeaweedFS, started once (lazily) for every run that needs them.

    Each run gets a fresh database and bucket, so it starts from empty storage as the SQLite run
    does; starting the servers once keeps their start-up out of the measurements.
    """

    def __init__(self, workroot: Path):
        self.workroot = workroot
        self.postgres = None
        self.s3 = None
        self._s3_folder: Path | None = None

    def ensure(self) -> None:
        from bench.postgres import start_postgres
        from bench.seaweedfs import start_s3_server

        if self.postgres is None:
            # in the system's temporary folder: the postgres OS user must reach it (pytest's
            # temporary root is private to root)
            self.postgres = start_postgres()
        if self.s3 is None:
            # in the system's temporary folder too: its Unix sockets live there, and a socket
            # path may not exceed 107 bytes
            self._s3_folder = Path(tempfile.mkdtemp(prefix="bench-replicas-s3-"))
            self.s3 = start_s3_server(self._s3_folder)

    def sections(self) -> dict:
        pg, s3 = self.postgres, self.s3
        return {
            "PostgreSQL": {"EnableIndex": True, "Lock": False, "Host": pg.host, "Port": pg.port,
                           "Database": pg.create_database(), "Username": pg.user,
                           "MaximumConnectionRetries": 0, "IndexConnectionsCount": 8},
            "AwsS3Storage": {"BucketName": s3.create_bucket(), "Region": "us-east-1",
                             "AccessKey": s3.access_key, "SecretKey": s3.secret_key,
                             "Endpoint": s3.endpoint, "VirtualAddressing": False, "HybridMode": "Disabled"},
        }

    def stop(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None
        if self._s3_folder is not None:
            shutil.rmtree(self._s3_folder, ignore_errors=True)
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


@contextlib.contextmanager
def running(name: str, servers: Servers, workdir: Path, base_config: dict) -> Iterator[System]:
    """Start system ``name`` on fresh storage; stop every process it started, by PID, after."""
    from bench.haproxy import start_haproxy

    with contextlib.ExitStack() as stack:
        if name == "sqlite-disk":
            d = stack.enter_context(Daemon({**base_config, "HttpPort": free_port()}, workdir / "daemon"))
            yield System(name, d.url, {"daemons": [d.pid]}, [d])
            return
        servers.ensure()
        shared = servers.sections()
        count = 2 if name == "pg-s3-2" else 1
        daemons = [stack.enter_context(Daemon({**base_config, **shared, "HttpPort": free_port(),
                                               "Name": f"replica{i}"}, workdir / f"replica{i}"))
                   for i in range(count)]
        pids = {"daemons": [d.pid for d in daemons], "postgresql": [servers.postgres.process.pid],
                "seaweedfs": [servers.s3.process.pid]}
        url = daemons[0].url
        if count > 1:
            lb = start_haproxy(workdir / "haproxy", [d.url for d in daemons], mode="round-robin")
            stack.callback(lb.stop)
            pids["haproxy"] = [lb.process.pid]
            url = lb.url
        yield System(name, url, pids, daemons)


# ---------------------------------------------------------------------------------------------
# The phases


def _window(system: System, work) -> dict:
    """Run ``work()`` and measure every component over it."""
    system.reset_peaks()
    u0, busy0, l0 = system.usage(), machine_busy(), load1()
    t0 = time.perf_counter()
    out = work()
    wall = time.perf_counter() - t0
    u1, busy1 = system.usage(), machine_busy()
    cpu = {c: u1[c][0] - u0[c][0] for c in u1}
    ours = sum(cpu.values())
    irq = busy1[1] - busy0[1]
    busy0, busy1 = busy0[0], busy1[0]
    out.update({
        "wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": {c: u1[c][1] for c in u1},
        "load_start": l0, "load_end": load1(),
        "machine_busy_cores": (busy1 - busy0) / wall,
        "irq_cores": irq / wall,
        "others_cores": max(0.0, (busy1 - busy0 - irq - ours) / wall),   # processes not ours
    })
    return out


def ingest(system: System, manifest: StudyManifest, concurrency: int, preloaded: list[bytes]) -> dict:
    def work() -> dict:
        res = asyncio.run(asyncio.wait_for(upload_all(system.url, manifest, concurrency, preloaded), RUN_TIMEOUT))
        return {"problems": res["problems"][:10], "problem_count": len(res["problems"])}

    r = _window(system, work)
    n, total = len(manifest.files), manifest.total_bytes
    with httpx.Client(base_url=system.url, timeout=60, trust_env=False) as c:
        stored = c.get("/statistics").json().get("CountInstances")
    if stored != n:
        r["problems"].append(f"/statistics: {stored} instances, uploaded {n}")
        r["problem_count"] += 1
    r.update({"instances": n, "bytes": total, "mb_per_s": total / 1e6 / r["wall_s"],
              "instances_per_s": n / r["wall_s"]})
    return r


def serve(system: System, manifest: StudyManifest, workers: int, pulls: int, bucket_kib: int) -> dict:
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with httpx.Client(base_url=system.url, limits=limits, trust_env=False, timeout=httpx.Timeout(120.0)) as client:
        study_id = check_lookup(client, manifest)      # also proves the ingest stored the right bytes

        def work() -> dict:
            problems: list[str] = []
            raw = 0
            for i in range(pulls):
                answer = lookup(client, study_id)
                buckets = plan_pull_buckets(answer.instances, bucket_kib * 1024, system.url + "/", "none")
                res = pull(client, buckets, "none", workers, Md5Checker(answer.instances) if i == 0 else None)
                raw += res["raw"]
                problems += res["problems"]
                if res["raw"] != answer.total_size and not res["problems"]:
                    problems.append(f"pull {i + 1}: {res['raw']} bytes, lookup says {answer.total_size}")
            return {"bytes": raw, "problems": problems[:10], "problem_count": len(problems),
                    "buckets_per_pull": len(buckets)}

        r = _window(system, work)
    r.update({"pulls": pulls, "mb_per_s": r["bytes"] / 1e6 / r["wall_s"]})
    return r


def push(system: System, sender: Daemon, manifest: StudyManifest, compression: str) -> dict:
    """A site's daemon (``sender``, holding the study) pushes it to the system through the
    transfers protocol (POST /transfers/send, peer "hub"): plan, bucket PUTs, commit. The
    sender's CPU is measured as its own component (it is the site's, not the hub's)."""
    study_id = manifest.files[0].orthanc_ids()["study"]
    system.pids["sender"] = [sender.pid]
    n = len(manifest.files)

    def work() -> dict:
        with httpx.Client(base_url=sender.url, timeout=60, trust_env=False) as c:
            r = c.post("/transfers/send", json={"Resources": [{"Level": "Study", "ID": study_id}],
                                                "Peer": "hub", "Compression": compression})
            if r.status_code != 200:
                return {"problems": [f"send: HTTP {r.status_code}: {r.text[:300]}"], "problem_count": 1}
            job_id = r.json()["ID"]
            deadline = time.monotonic() + RUN_TIMEOUT
            while True:
                job = c.get(f"/jobs/{job_id}").json()
                if job.get("State") in ("Success", "Failure"):
                    break
                if time.monotonic() > deadline:
                    return {"problems": [f"job {job_id} still {job.get('State')}"], "problem_count": 1}
                time.sleep(0.05)
        problems = [] if job["State"] == "Success" else [f"job {job_id}: {str(job)[:300]}"]
        return {"problems": problems, "problem_count": len(problems)}

    try:
        r = _window(system, work)
    finally:
        del system.pids["sender"]
    with httpx.Client(base_url=system.url, timeout=60, trust_env=False) as c:
        stored = c.get("/statistics").json().get("CountInstances")
        if stored != n:
            r["problems"].append(f"/statistics: {stored} instances, pushed {n}")
        else:
            check_lookup(c, manifest)                   # the bytes that landed are the study's
    r["problem_count"] = len(r["problems"])
    total = manifest.total_bytes
    r.update({"instances": n, "bytes": total, "mb_per_s": total / 1e6 / r["wall_s"],
              "instances_per_s": n / r["wall_s"], "compression": compression})
    return r


# ---------------------------------------------------------------------------------------------
# Report


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict], systems: list[str]) -> dict:
    """Medians per system and phase: throughput, CPU s/GB per component, peak RSS."""
    out = {}
    for s in systems:
        out[s] = {}
        for phase in PHASES:
            rs = [r[phase] for r in runs if r["system"] == s and phase in r]
            if not rs:
                continue
            comps = [c for c in COMPONENTS if c in rs[0]["cpu_s"]]
            out[s][phase] = {
                "runs": len(rs), "mb_per_s": med([r["mb_per_s"] for r in rs]),
                "mb_per_s_range": (min(r["mb_per_s"] for r in rs), max(r["mb_per_s"] for r in rs)),
                "instances_per_s": med([r.get("instances_per_s", 0) for r in rs]),
                "cpu_s_per_gb": {c: med([r["cpu_s"][c] / (r["bytes"] / 1e9) for r in rs]) for c in comps},
                "peak_rss_mib": {c: med([r["peak_rss_bytes"][c] / 2**20 for r in rs]) for c in comps},
                "load": med([r["load_start"] for r in rs]),
                "others_cores": med([r["others_cores"] for r in rs]),
                "problems": sum(r["problem_count"] for r in rs),
            }
    return out


def capacity(summary: dict, study_bytes: int, *, cores: int, replicas: tuple[int, ...],
             studies_per_site_day: int, busy_hours: int, target: float,
             link_gbit: float = 0.0, ingest_phase: str = "ingest") -> tuple[list[dict], dict]:
    """On paper: GB/hour each component of a hub sustains, from the medians of ``pg-s3-2``
    (the multi-replica configuration; ``pg-s3-1`` if it is missing).

    Model: every study is ingested once and served once (pulled by one destination), so one GB
    through the hub costs ingest + serve CPU s/GB on each component. Each replica, the
    PostgreSQL server, the SeaweedFS server and the balancer get a machine of this kind
    (``cores`` cores) of their own, used at ``target`` of their CPU. Daemons scale with N;
    PostgreSQL, SeaweedFS and HAProxy are one machine each, so the first of them to fill is the
    ceiling. Sites send ``studies_per_site_day`` studies over ``busy_hours`` hours a day.

    With ``link_gbit`` > 0, the network is a component too: the balancer's link carries each GB
    twice each way (ingest: in from the site, out to a replica; serving: in from a replica, out
    to the puller), the SeaweedFS machine's once each way; full duplex, at ``target`` of the line
    rate. Replicas' links scale with N.

    ``ingest_phase``: how studies arrive, "ingest" (POST /instances) or "push" (the transfers
    protocol, what a site's daemon or plugin does).
    """
    base = "pg-s3-2" if "pg-s3-2" in summary else "pg-s3-1"
    s = summary[base]
    per_gb = {c: s[ingest_phase]["cpu_s_per_gb"].get(c, 0.0) + s["serve"]["cpu_s_per_gb"].get(c, 0.0)
              for c in HUB}
    budget = cores * 3600 * target                                   # CPU s per hour per machine
    rows = []
    study_gb = study_bytes / 1e9
    for n in replicas:
        gbh = {"daemons": n * budget / per_gb["daemons"] if per_gb["daemons"] else float("inf")}
        for c in ("postgresql", "seaweedfs", "haproxy"):
            gbh[c] = budget / per_gb[c] if per_gb[c] > 0 else float("inf")
        if link_gbit > 0:
            gbh["balancer link"] = link_gbit / 8 * 3600 * target / 2      # GB/h, 2 GB each way per GB
        first = min(gbh, key=gbh.get)
        hub = gbh[first]
        studies_h = hub / study_gb
        # SeaweedFS here is one all-in-one process; an object store scales out (more volume servers
        # and S3 gateways, or a managed service): the ceiling once it is no longer one machine
        rest = {k: v for k, v in gbh.items() if k != "seaweedfs"}
        then = min(rest, key=rest.get)
        rows.append({"replicas": n, "gb_per_hour": gbh, "saturates": first, "hub_gb_per_hour": hub,
                     "studies_per_hour": studies_h,
                     "sites": studies_h * busy_hours / studies_per_site_day,
                     "scaled_s3": {"saturates": then, "hub_gb_per_hour": rest[then],
                                   "studies_per_hour": rest[then] / study_gb,
                                   "sites": rest[then] / study_gb * busy_hours / studies_per_site_day}})
    return rows, {"base": base, "cpu_s_per_gb_ingest_plus_serve": per_gb, "budget_cpu_s_per_hour": budget,
                  "link_gbit": link_gbit, "ingest_phase": ingest_phase}


def markdown(params: dict, dataset: dict, runs: list[dict], summary: dict,
             caps: list[tuple[list[dict], dict]], env: dict) -> str:
    L = []
    add = L.append
    add(f"# Replicas benchmark ({env['timestamp']})\n")
    files, total = dataset["files"], dataset["bytes"]
    add(f"Study: {files} CT instances, {total / 1e6:.1f} MB "
        f"({total / files / 1e6:.2f} MB each). Machine: {env['cpus']} CPUs "
        f"shared by client, daemons and servers (and other people's work), Python {env['python']}.")
    add(f"Ingest: POST /instances, {params['concurrency']} parallel clients. Serve: lookup + GET "
        f"/transfers/chunks of every {params['bucket_kib']} KiB bucket, {params['workers']} workers, "
        f"no compression, study pulled {params['pulls']}x per window. "
        + (f"Push: a site's daemon (SQLite + disk, same machine) sends the study with POST /transfers/send, "
           f"compression {params.get('push_compression', 'none')}, {params['workers']} threads. "
           if "push" in params.get("phases", ()) else "")
        + f"Medians of {params['runs']} runs "
        f"(interleaved); each run on fresh daemons, database and bucket.\n")
    add("Command: `" + params["command"] + "`\n")
    for phase, title in (("ingest", "Ingest (POST /instances)"), ("serve", "Chunk serving (GET /transfers/chunks)"),
                         ("push", "Push from a site (POST /transfers/send to the system: push, PUT buckets, commit)")):
        if not any(phase in summary.get(n, {}) for n in params["systems"]):
            continue
        add(f"## {title}\n")
        add("| system | MB/s (min–max) | inst/s | CPU s/GB daemons | PostgreSQL | SeaweedFS | HAProxy | client "
            "| sender | peak RSS MiB daemons | PostgreSQL | SeaweedFS | HAProxy | load1 | others' cores | errors |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for sname in params["systems"]:
            s = summary.get(sname, {}).get(phase)
            if not s:
                continue
            c, m = s["cpu_s_per_gb"], s["peak_rss_mib"]
            f = lambda d, k, fmt: (fmt.format(d[k]) if k in d else "–")   # noqa: E731
            lo, hi = s["mb_per_s_range"]
            add(f"| {sname} | {s['mb_per_s']:.1f} ({lo:.1f}–{hi:.1f}) | "
                f"{s['instances_per_s']:.1f} | " if phase != "serve" else
                f"| {sname} | {s['mb_per_s']:.1f} ({lo:.1f}–{hi:.1f}) | – | ")
            L[-1] += (" | ".join(f(c, k, "{:.1f}") for k in COMPONENTS) + " | "
                      + " | ".join(f(m, k, "{:.0f}") for k in ("daemons", "postgresql", "seaweedfs", "haproxy"))
                      + f" | {s['load']:.2f} | {s['others_cores']:.2f} | {s['problems']} |")
        add("")
    add("CPU s/GB: CPU seconds of the component during the window / GB moved (1 GB = 10^9 bytes). "
        "Daemons: all replicas summed. PostgreSQL: postmaster + backends (exited ones included). "
        "Peak RSS: VmHWM reset before each window; PostgreSQL's and two replicas' are sums (upper bounds). "
        "load1: 1-minute load average when the window started; others' cores: machine busy time during "
        "the window not spent by our processes nor in interrupts (loopback TCP is softirq time, charged "
        "to no process).\n")
    add("## Per run\n")
    add("| run | system | phase | wall s | MB/s | CPU s: daemons | PostgreSQL | SeaweedFS | HAProxy | client "
        "| sender | load1 | others' cores | interrupts' cores | errors |")
    add("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        for phase in PHASES:
            p = r.get(phase)
            if not p:
                continue
            add(f"| {r['run']} | {r['system']} | {phase} | {p['wall_s']:.2f} | {p['mb_per_s']:.1f} | "
                + " | ".join(f"{p['cpu_s'][k]:.2f}" if k in p["cpu_s"] else "–" for k in COMPONENTS)
                + f" | {p['load_start']:.2f} | {p['others_cores']:.2f} | {p.get('irq_cores', float('nan')):.2f} "
                f"| {p['problem_count']} |")
    add("")
    if caps:
        add("## Capacity on paper\n")
        first_info = caps[0][1]
        add(f"From the medians of `{first_info['base']}`. Model: every study is received once and served "
            f"once (one pull), so a GB through the hub costs receive + serve CPU s/GB on each component. "
            f"Each component on a machine of this kind ({params['cores']} cores) of its own, used at "
            f"{params['target']:.0%}: {first_info['budget_cpu_s_per_hour']:.0f} CPU s per hour each; replicas "
            f"scale with N, PostgreSQL, SeaweedFS and HAProxy are one machine each. A study = this CT study, "
            f"{total / 1e6:.0f} MB; a site sends {params['studies_per_site_day']} studies a day over "
            f"{params['busy_hours']} busy hours.\n")
    for cap_rows, cap_info in caps:
        pg = cap_info["cpu_s_per_gb_ingest_plus_serve"]
        how = {"ingest": "studies arrive by POST /instances",
               "push": "studies arrive by a site's push (transfers protocol)"}[cap_info["ingest_phase"]]
        add(f"### {how[0].upper() + how[1:]}\n")
        add(f"Receive + serve, CPU s/GB: daemons {pg['daemons']:.1f}, PostgreSQL {pg['postgresql']:.1f}, "
            f"SeaweedFS {pg['seaweedfs']:.1f}, HAProxy {pg['haproxy']:.1f}.\n")
        link = cap_info.get("link_gbit") or 0
        add("| replicas | GB/h daemons | GB/h PostgreSQL | GB/h SeaweedFS | GB/h HAProxy "
            + (f"| GB/h balancer link ({link:g} Gbit/s) " if link else "")
            + "| hub GB/h | saturates first | studies/h | sites | with S3 scaled out: saturates | GB/h | studies/h | sites |")
        add("|---:|---:|---:|---:|---:|" + ("---:|" if link else "") + "---:|---|---:|---:|---|---:|---:|---:|")
        for row in cap_rows:
            g = row["gb_per_hour"]
            add(f"| {row['replicas']} | {g['daemons']:.0f} | {g['postgresql']:.0f} | {g['seaweedfs']:.0f} | "
                f"{g['haproxy']:.0f} | " + (f"{g['balancer link']:.0f} | " if link else "")
                + f"{row['hub_gb_per_hour']:.0f} | {row['saturates']} | "
                f"{row['studies_per_hour']:.0f} | {row['sites']:.0f} | {row['scaled_s3']['saturates']} | "
                f"{row['scaled_s3']['hub_gb_per_hour']:.0f} | {row['scaled_s3']['studies_per_hour']:.0f} | "
                f"{row['scaled_s3']['sites']:.0f} |")
        add("")
    if caps:
        per_gb = files / (total / 1e9)
        add(f"- PostgreSQL's work is per instance, not per byte: here {per_gb:.0f} instances per GB "
            f"({total / files / 1e6:.2f} MB each). Smaller instances (MR slices of 0.13 MB: ~4x as many per "
            "GB) cost it about 4x as much per GB, and the daemons' per-request share grows likewise.")
        add("- The network: a 1 Gbit/s link carries 450 GB/h each way at full rate. Each GB through the hub "
            "crosses the balancer's link twice each way (receive: site → balancer → replica; serving: "
            "replica → balancer → puller) and the SeaweedFS machine's once each way, so at "
            f"{params['target']:.0%} a 1 Gbit/s balancer caps the hub at ~{450 * params['target'] / 2:.0f} GB/h "
            f"and a 10 Gbit/s one at ~{4500 * params['target'] / 2:.0f} GB/h, whatever N is"
            + (" (the link column above)." if caps[0][1].get("link_gbit") else "."))
        add("- SeaweedFS is one `weed server` process here (master, volume server, filer and S3 gateway in "
            "one); an object store scales out (more volume servers and S3 gateways, or a managed S3), so "
            "the right-hand columns give the ceiling once it is not one machine.")
        add("- The throughputs above are of everything sharing this 2-core machine (client and sender "
            "included), so two replicas cannot be faster here than one; the CPU s/GB are what carries "
            "over to a hub whose components have machines of their own.")
        add("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------


def capacities(summary: dict, study_bytes: int, a: argparse.Namespace) -> list[tuple[list[dict], dict]]:
    """One capacity table per way studies arrive that was measured (POST /instances, push)."""
    out = []
    for phase in ("ingest", "push"):
        if any(s in summary and {phase, "serve"} <= summary[s].keys() for s in ("pg-s3-1", "pg-s3-2")):
            out.append(capacity(summary, study_bytes, cores=a.cores,
                                replicas=tuple(int(x) for x in a.replicas.split(",")),
                                studies_per_site_day=a.studies_per_site_day, busy_hours=a.busy_hours,
                                target=a.target, link_gbit=a.link_gbit, ingest_phase=phase))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, among {', '.join(SYSTEMS)}")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--instances", type=int, default=300, help="CT instances in the study (~0.52 MB each)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=8, help="parallel POST /instances")
    ap.add_argument("--workers", type=int, default=4, help="parallel chunk GETs (and each daemon's Transfers.Threads)")
    ap.add_argument("--pulls", type=int, default=3, help="pulls of the study per serving window")
    ap.add_argument("--bucket-kib", type=int, default=4096)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="among ingest,serve (one fresh system for both) and push (another fresh system)")
    ap.add_argument("--push-compression", default="none", choices=("none", "gzip"))
    ap.add_argument("--max-load", type=float, default=1.5, help="wait for the 1-minute load below this before a run")
    ap.add_argument("--cores", type=int, default=2, help="cores of each hub machine, for the capacity")
    ap.add_argument("--target", type=float, default=0.7, help="CPU fraction a hub machine is planned at")
    ap.add_argument("--studies-per-site-day", type=int, default=20)
    ap.add_argument("--busy-hours", type=int, default=10, help="hours a day over which sites send")
    ap.add_argument("--replicas", default="1,2,4,8", help="N replicas for the capacity table")
    ap.add_argument("--link-gbit", type=float, default=10.0,
                    help="the balancer's link for the capacity (Gbit/s each way; 0: CPU only)")
    ap.add_argument("--workdir", type=Path, help="parent of the temporary folders (default: system temp)")
    ap.add_argument("--out", type=Path, help="markdown output (default bench/results/replicas-<time>.md)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="measure nothing: write the markdown again from a JSON this benchmark wrote "
                         "(with the capacity options given now)")
    a = ap.parse_args(argv)
    if a.render:
        return render(a)
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if not systems or any(s not in SYSTEMS for s in systems):
        ap.error(f"--systems: among {', '.join(SYSTEMS)}")
    phases = [p.strip() for p in a.phases.split(",") if p.strip()]
    if not phases or any(p not in PHASES for p in phases) or ("serve" in phases and "ingest" not in phases):
        ap.error(f"--phases: among {', '.join(PHASES)} (serve needs ingest)")
    if min(a.runs, a.instances, a.concurrency, a.workers, a.pulls, a.bucket_kib) < 1:
        ap.error("--runs, --instances, --concurrency, --workers, --pulls, --bucket-kib must be >= 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    manifest = ensure_study("ct", DATA_DIR / f"ct-{a.instances}-seed{a.seed}", instances=a.instances, seed=a.seed)
    preloaded = [p.read_bytes() for p in manifest.paths()]
    log(f"dataset {manifest.root}: {len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB")
    base_config = {"Transfers": {"Threads": a.workers, "BucketSize": a.bucket_kib}}

    workroot = Path(tempfile.mkdtemp(prefix="bench-replicas-", dir=a.workdir))
    servers = Servers(workroot)
    runs: list[dict] = []
    failed = False
    try:
        for run in range(1, a.runs + 1):
            for sname in systems:
                load, waited = wait_for_quiet(a.max_load, log)
                log(f"run {run} {sname}: load1 {load:.2f} (waited {waited:.0f} s)")
                workdir = workroot / f"run{run}-{sname}"
                record = {"run": run, "system": sname, "waited_s": waited}
                try:
                    if "ingest" in phases:
                        with running(sname, servers, workdir, base_config) as system:
                            record["ingest"] = ingest(system, manifest, a.concurrency, preloaded)
                            if "serve" in phases:
                                record["serve"] = serve(system, manifest, a.workers, a.pulls, a.bucket_kib)
                            if any(record[p]["problem_count"] for p in ("ingest", "serve") if p in record):
                                record["stderr"] = system.stderr_tails()
                    if "push" in phases:
                        if "ingest" in phases:
                            wait_for_quiet(a.max_load, log)
                        with running(sname, servers, workdir / "push", base_config) as system, \
                                Daemon({**base_config, "HttpPort": free_port(),
                                        "OrthancPeers": {"hub": {"Url": system.url}}}, workdir / "sender") as sender:
                            res = asyncio.run(upload_all(sender.url, manifest, a.concurrency, preloaded))
                            if res["problems"]:
                                raise RuntimeError("sender upload: " + "; ".join(res["problems"][:3]))
                            record["push"] = push(system, sender, manifest, a.push_compression)
                            if record["push"]["problem_count"]:
                                record["stderr_push"] = system.stderr_tails() + "\n--- sender\n" + sender.stderr_tail(1500)
                except (DaemonError, RuntimeError, httpx.HTTPError, asyncio.TimeoutError, OSError,
                        subprocess.SubprocessError) as e:
                    log(f"  failed: {type(e).__name__}: {e}")
                    record["error"] = f"{type(e).__name__}: {e}"
                    failed = True
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                runs.append(record)
                for phase in PHASES:
                    p = record.get(phase)
                    if p:
                        log(f"  {phase}: {p['mb_per_s']:.1f} MB/s, CPU s "
                            + ", ".join(f"{k} {v:.2f}" for k, v in p["cpu_s"].items())
                            + f", others {p['others_cores']:.2f} cores, {p['problem_count']} problem(s)")
                        for prob in p["problems"][:3]:
                            log(f"    {prob}")
    finally:
        servers.stop()
        shutil.rmtree(workroot, ignore_errors=True)

    good = [r for r in runs if "error" not in r]
    summary = summarize(good, systems)
    caps = capacities(summary, manifest.total_bytes, a)
    env = {"timestamp": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": sys.version.split()[0],
           "platform": platform.platform(), "cpus": os.cpu_count(), "httpx": httpx.__version__}
    params = {k: v for k, v in vars(a).items() if k not in ("workdir", "out")}
    params.update(systems=systems, phases=phases, command=" ".join([".venv/bin/python -m bench.replicas", *(argv if argv is not None else sys.argv[1:])]))
    dataset = {"files": len(manifest.files), "bytes": manifest.total_bytes, "dir": str(manifest.root)}
    text = markdown(params, dataset, good, summary, caps, env)
    out = a.out or RESULTS_DIR / f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"benchmark": "replicas", "params": params, "environment": env,
         "dataset": dataset,
         "runs": runs, "summary": summary, "capacity": [{"rows": r, "basis": i} for r, i in caps]},
        indent=1, default=str) + "\n")
    print(text)
    log(f"results: {out} and {out.with_suffix('.json')}")
    problems = sum(r[p]["problem_count"] for r in good for p in PHASES if p in r)
    return 2 if failed else (1 if problems else 0)


def render(a: argparse.Namespace) -> int:
    """The markdown of a saved JSON, the capacity recomputed with today's options (to change the
    planning assumptions without measuring again)."""
    saved = json.loads(a.render.read_text())
    params = {**saved["params"], **{k: getattr(a, k) for k in
                                    ("cores", "target", "studies_per_site_day", "busy_hours", "replicas",
                                              "link_gbit")}}
    good = [r for r in saved["runs"] if "error" not in r]
    summary = summarize(good, params["systems"])
    caps = capacities(summary, saved["dataset"]["bytes"], a)
    text = markdown(params, saved["dataset"], good, summary, caps, saved["environment"])
    out = a.out or a.render.with_suffix(".md")
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
