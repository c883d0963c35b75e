"""Ingest throughput: how fast a fresh daemon stores a CT study uploaded with POST /instances.

Each run starts a new daemon on empty storage (so every upload is a real first store, as when
a study arrives), uploads every file of a deterministic "ct" study with ``--concurrency``
parallel requests over keep-alive connections, and checks each answer (HTTP 200, Status
"Success", the Orthanc ID we expect). Throughput is DICOM bytes / wall time of the uploads;
the daemon's CPU is measured over the same window from /proc, its peak RSS is VmHWM.

    python -m bench.ingest [--instances 300] [--runs 3] [--concurrency 4] [--storage object-storage]

``--storage object-storage`` keeps the attachments in a real S3 server (SeaweedFS, started for the
benchmark on loopback, a fresh bucket per run; see bench/s3.py); its CPU is reported too.

Prints a markdown table and writes bench/results/ingest-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.datasets import StudyManifest, ensure_study
from bench.harness import REPO_ROOT, Daemon, DaemonError
from bench.s3 import BACKENDS, Backend, backend

DATA_DIR = REPO_ROOT / "bench" / "data"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PRELOAD_LIMIT = 2 << 30      # above this, files are read during the upload instead of before


class IngestError(RuntimeError):
    pass


async def upload_all(url: str, manifest: StudyManifest, concurrency: int,
                     preloaded: list[bytes] | None) -> dict:
    """Upload every file of ``manifest``; returns timings and the list of problems found."""
    files = manifest.files
    paths = manifest.paths()
    latencies: list[float] = [0.0] * len(files)
    problems: list[str] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Content-Type": "application/dicom"}

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(300.0),
                                 trust_env=False) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(files):
                i = next_index
                next_index += 1
                body = preloaded[i] if preloaded is not None else paths[i].read_bytes()
                t = time.perf_counter()
                try:
                    r = await client.post("/instances", content=body, headers=headers)
                except httpx.HTTPError as e:
                    problems.append(f"{files[i].path}: {type(e).__name__}: {e}")
                    continue
                latencies[i] = time.perf_counter() - t
                problem = _check(r, files[i].orthanc_ids()["instance"])
                if problem:
                    problems.append(f"{files[i].path}: {problem}")

        t0 = time.perf_counter()
        c0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        client_cpu = time.process_time() - c0
    return {"wall": wall, "client_cpu": client_cpu, "latencies": latencies, "problems": problems}


def _check(r: httpx.Response, expected_id: str) -> str | None:
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    try:
        answer = r.json()
    except ValueError:
        return f"answer is not JSON: {r.text[:200]}"
    if not isinstance(answer, dict) or answer.get("Status") != "Success":
        return f"unexpected answer {str(answer)[:200]}"
    if "ID" in answer and answer["ID"] != expected_id:
        return f"ID {answer['ID']} != expected {expected_id}"
    return None


def _count_instances(client: httpx.Client) -> int | None:
    try:
        r = client.get("/statistics")
        if r.status_code == 200:
            return int(r.json()["CountInstances"])
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    return None


def ingest_into(d: Daemon, manifest: StudyManifest, *, concurrency: int, preloaded: list[bytes] | None,
                storage: Backend | None = None) -> dict:
    """Upload ``manifest`` into the running daemon ``d`` and measure it (CPU over the uploads,
    peak RSS since the daemon started; with an object-storage ``storage``, its server's CPU too)."""
    cpu0, _ = d.usage(include_descendants=True)
    if storage:
        storage.reset_server_peak()
    s0 = storage.server_usage() if storage else None
    res = asyncio.run(upload_all(d.url, manifest, concurrency, preloaded))
    cpu1, peak = d.usage(include_descendants=True)
    s1 = storage.server_usage() if storage else None
    with httpx.Client(base_url=d.url, timeout=30, trust_env=False) as c:
        stored = _count_instances(c)
    n, total = len(manifest.files), manifest.total_bytes
    if stored is not None and stored != n and not res["problems"]:
        res["problems"].append(f"/statistics reports {stored} instances, uploaded {n}")
    lat = sorted(x for x in res["latencies"] if x > 0)
    return {
        "instances": n, "bytes": total, "wall_s": res["wall"],
        "instances_per_s": n / res["wall"], "mb_per_s": total / 1e6 / res["wall"],
        "daemon_cpu_s": cpu1 - cpu0, "daemon_peak_rss_bytes": peak,
        "client_cpu_s": res["client_cpu"],
        "latency_ms": {"p50": 1000 * _pct(lat, 50), "p95": 1000 * _pct(lat, 95), "max": 1000 * lat[-1]} if lat else None,
        "stored_instances": stored, "problems": res["problems"][:20], "problem_count": len(res["problems"]),
        **({"storage": storage.name, "storage_server_cpu_s": s1[0] - s0[0] if s0 and s1 else None,
            "storage_server_peak_rss_bytes": s1[1] if s1 else None} if storage else {}),
    }


def run_once(manifest: StudyManifest, *, concurrency: int, config: dict, workroot: Path | None,
             preloaded: list[bytes] | None, keep: bool = False, storage: Backend | None = None) -> dict:
    """One fresh daemon on empty storage (``storage``'s, default its folder), one upload."""
    tmp = tempfile.mkdtemp(prefix="bench-ingest-", dir=workroot)
    workdir = Path(tmp)
    if storage is not None:
        config = {**config, **storage.config()}
    try:
        with Daemon(config, workdir) as d:
            r = ingest_into(d, manifest, concurrency=concurrency, preloaded=preloaded, storage=storage)
            stderr_tail = d.stderr_tail(2000)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    r["workdir"] = str(workdir) if keep else None
    r["daemon_stderr_tail"] = stderr_tail if r["problem_count"] else None
    return r


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def _summary(runs: list[dict], key: str) -> dict:
    vals = [r[key] for r in runs]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def markdown(params: dict, manifest: StudyManifest, runs: list[dict]) -> str:
    lines = [
        f"Ingest: {len(manifest.files)} CT instances, {manifest.total_bytes / 1e6:.1f} MB, "
        f"concurrency {params['concurrency']}, {len(runs)} run(s)",
        "",
        "| run | wall s | instances/s | MB/s | daemon CPU s | daemon peak RSS MB | client CPU s | p50 ms | p95 ms | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(runs, 1):
        lat = r["latency_ms"] or {"p50": float("nan"), "p95": float("nan")}
        lines.append(f"| {i} | {r['wall_s']:.2f} | {r['instances_per_s']:.1f} | {r['mb_per_s']:.1f} | "
                     f"{r['daemon_cpu_s']:.2f} | {r['daemon_peak_rss_bytes'] / 2**20:.0f} | {r['client_cpu_s']:.2f} | "
                     f"{lat['p50']:.1f} | {lat['p95']:.1f} | {r['problem_count']} |")
    for name in ("median", "min", "max"):
        s = {k: _summary(runs, k)[name] for k in ("wall_s", "instances_per_s", "mb_per_s", "daemon_cpu_s",
                                                   "daemon_peak_rss_bytes", "client_cpu_s")}
        lines.append(f"| **{name}** | {s['wall_s']:.2f} | {s['instances_per_s']:.1f} | {s['mb_per_s']:.1f} | "
                     f"{s['daemon_cpu_s']:.2f} | {s['daemon_peak_rss_bytes'] / 2**20:.0f} | {s['client_cpu_s']:.2f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", type=json.loads, default={},
                    help='extra daemon configuration as JSON, e.g. \'{"StorageCompression": true}\'')
    ap.add_argument("--workdir", type=Path, help="where the daemons' temporary storage goes (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep each run's storage and logs")
    ap.add_argument("--storage", choices=BACKENDS, default="file-system",
                    help="where the daemon keeps attachments (object-storage: SeaweedFS on loopback)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    a = ap.parse_args(argv)
    if a.instances < 1 or a.runs < 1 or a.concurrency < 1:
        ap.error("--instances, --runs and --concurrency must be >= 1")

    t = time.perf_counter()
    manifest = ensure_study("ct", DATA_DIR / f"ct-{a.instances}-seed{a.seed}", instances=a.instances, seed=a.seed)
    prep = time.perf_counter() - t
    print(f"dataset {manifest.root} ({len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB, "
          f"ready in {prep:.1f} s)", file=sys.stderr)
    preloaded = [p.read_bytes() for p in manifest.paths()] if manifest.total_bytes <= PRELOAD_LIMIT else None

    runs = []
    with backend(a.storage, a.workdir) as storage:
        for i in range(a.runs):
            try:
                r = run_once(manifest, concurrency=a.concurrency, config=a.config, workroot=a.workdir,
                             preloaded=preloaded, keep=a.keep, storage=storage)
            except DaemonError as e:
                print(f"run {i + 1}: {e}", file=sys.stderr)
                return 2
            runs.append(r)
            print(f"run {i + 1}: {r['instances_per_s']:.1f} instances/s, {r['mb_per_s']:.1f} MB/s, "
                  f"{r['problem_count']} problem(s)", file=sys.stderr)
            for p in r["problems"][:5]:
                print(f"  {p}", file=sys.stderr)

    params = {"instances": a.instances, "runs": a.runs, "concurrency": a.concurrency, "seed": a.seed,
              "config": a.config, "storage": a.storage}
    print(markdown(params, manifest, runs))
    if a.storage == "object-storage":
        cpu = [r["storage_server_cpu_s"] for r in runs]
        print(f"\nstorage: SeaweedFS S3 on loopback, CPU s during the uploads: median "
              f"{statistics.median(cpu):.2f} (min {min(cpu):.2f}, max {max(cpu):.2f})")
    result = {
        "benchmark": "ingest", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": params,
        "dataset": {"kind": manifest.kind, "dir": str(manifest.root), "files": len(manifest.files),
                    "bytes": manifest.total_bytes, "StudyInstanceUID": manifest.StudyInstanceUID},
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpus": os.cpu_count(), "httpx": httpx.__version__},
        "runs": runs,
        "summary": {k: _summary(runs, k) for k in ("instances_per_s", "mb_per_s", "wall_s", "daemon_cpu_s",
                                                   "daemon_peak_rss_bytes", "client_cpu_s")},
    }
    a.results_dir.mkdir(parents=True, exist_ok=True)
    out = a.results_dir / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {out}")
    return 1 if any(r["problem_count"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
