"""Chunk serving throughput: how fast one daemon serves a stored study to a puller.

One daemon is started, the study is uploaded once (POST /instances, 4 at a time), then for each
compression ("none", "gzip") and each run the client does what a real puller does: POST
/transfers/lookup for the study, plan the pull buckets with the protocol's planner (daemon URL +
"/" as base URL, ``--bucket-kib`` as Transfers.BucketSize), and GET every bucket with
``--workers`` threads sharing one keep-alive httpx client. Every answer is decoded and its size
checked; with ``--verify first`` (default) the first run of each compression also checks the MD5
of every reassembled instance against the lookup, hashing incrementally (only out-of-order pieces
wait in memory).

Throughput is DICOM bytes / wall time of the bucket GETs (the lookup is timed apart). The daemon's
CPU is read from /proc around each run and its peak RSS (VmHWM) is reset before each run, so it is
the run's own peak; the client's CPU and peak RSS are measured the same way. Client and daemon
share the machine's cores: the client's CPU (HTTP parsing, gzip inflate, MD5) competes with the
server's.

    python -m bench.chunks [--study ct] [--instances N] [--runs 3] [--workers 4] [--bucket-kib 4096]
                           [--storage object-storage]

``--storage object-storage`` keeps the attachments in a real S3 server (SeaweedFS, started for the
benchmark on loopback; see bench/s3.py): each bucket is then read from it with range GETs.

Prints a markdown table and writes bench/results/chunks-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.datasets import KINDS, StudyManifest, ensure_study
from bench.harness import REPO_ROOT, Daemon, DaemonError, process_usage
from bench.ingest import upload_all
from bench.s3 import BACKENDS, Backend, backend
from protocol import codecs
from protocol.chunks import chunk_uri, scatter_ranges
from protocol.messages import Bucket, InstanceInfo, LookupAnswer, bucket_size
from protocol.planner import plan_pull_buckets

DATA_DIR = REPO_ROOT / "bench" / "data"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
MIN_STUDY_BYTES = 200_000_000
#: instances giving >= 200 MB per kind (ct ~0.52 MB, small ~25 kB, large ~117 MB, jpeg ~150 kB)
DEFAULT_INSTANCES = {"ct": 400, "small": 8000, "large": 2, "jpeg": 1400}
COMPRESSIONS = ("none", "gzip")
SUMMARY_KEYS = ("wall_s", "raw_mb_per_s", "wire_mb_per_s", "ratio", "daemon_cpu_s",
                "daemon_peak_rss_bytes", "client_cpu_s", "client_peak_rss_bytes", "client_rss_growth_bytes")


class ChunksError(RuntimeError):
    pass


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, own processes); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Md5Checker:
    """Per-instance MD5 of pieces arriving in any order; a piece waits only until its turn."""

    def __init__(self, instances: tuple[InstanceInfo, ...]):
        self.info = {i.id: i for i in instances}
        self.state = {i.id: [hashlib.md5(), 0, {}, threading.Lock()] for i in instances}

    def add(self, instance_id: str, offset: int, data: memoryview) -> None:
        st = self.state[instance_id]
        with st[3]:
            st[2][offset] = data
            while st[1] in st[2]:
                piece = st[2].pop(st[1])
                st[0].update(piece)
                st[1] += len(piece)

    def problems(self) -> list[str]:
        out = []
        for iid, (md5, done, pending, _) in self.state.items():
            want = self.info[iid]
            if done != want.size or pending:
                out.append(f"{iid}: reassembled {done} of {want.size} bytes")
            elif md5.hexdigest() != want.md5:
                out.append(f"{iid}: MD5 {md5.hexdigest()} != lookup {want.md5}")
        return out


def lookup(client: httpx.Client, study_id: str) -> LookupAnswer:
    r = client.post("/transfers/lookup", json=[{"Level": "Study", "ID": study_id}])
    if r.status_code != 200:
        raise ChunksError(f"lookup: HTTP {r.status_code}: {r.text[:300]}")
    return LookupAnswer.from_json(r.json())


def pull(client: httpx.Client, buckets: list[Bucket], compression: str, workers: int,
         checker: Md5Checker | None) -> dict:
    """GET every bucket with ``workers`` threads; returns byte counts, latencies and problems."""
    problems: list[str] = []
    latencies: list[float] = []
    wire = raw = 0
    lock = threading.Lock()

    def fetch(bucket: Bucket) -> None:
        nonlocal wire, raw
        uri = chunk_uri(bucket, compression)
        t = time.perf_counter()
        try:
            r = client.get(uri)
            if r.status_code != 200:
                raise ChunksError(f"HTTP {r.status_code}: {r.text[:300]}")
            data = codecs.decode(r.content, compression, bucket_size(bucket))  # checks the size
        except Exception as e:  # noqa: BLE001 -- every failure is a finding to report
            with lock:
                problems.append(f"{uri[:120]}: {type(e).__name__}: {e}")
            return
        dt = time.perf_counter() - t
        if checker is not None:
            view = memoryview(data)
            for s in scatter_ranges(bucket):
                checker.add(s.instance_id, s.instance_offset, view[s.payload_offset:s.payload_offset + s.length])
        with lock:
            wire += len(r.content)
            raw += len(data)
            latencies.append(dt)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, buckets))
    if checker is not None and not problems:
        problems.extend(checker.problems())
    return {"wire": wire, "raw": raw, "latencies": sorted(latencies), "problems": problems}


def run_once(d: Daemon, client: httpx.Client, study_id: str, compression: str, *, workers: int,
             bucket_bytes: int, verify: bool, storage: Backend | None = None) -> dict:
    """One pull of the study; with an object-storage ``storage``, its server's CPU and peak RSS too."""
    reset_peak_rss(d.pid)
    reset_peak_rss()
    if storage:
        storage.reset_server_peak()
    rss0 = _rss_now()
    cpu0, _ = d.usage(include_descendants=True)
    s0 = storage.server_usage() if storage else None
    c0 = time.process_time()
    t0 = time.perf_counter()
    answer = lookup(client, study_id)
    t1 = time.perf_counter()
    buckets = plan_pull_buckets(answer.instances, bucket_bytes, d.url + "/", compression)
    res = pull(client, buckets, compression, workers, Md5Checker(answer.instances) if verify else None)
    wall = time.perf_counter() - t1
    client_cpu = time.process_time() - c0
    cpu1, peak = d.usage(include_descendants=True)
    s1 = storage.server_usage() if storage else None
    _, client_peak = process_usage(os.getpid())
    total = answer.total_size
    if res["raw"] != total and not res["problems"]:
        res["problems"].append(f"received {res['raw']} raw bytes, lookup announced {total}")
    lat = res["latencies"]
    return {
        "compression": compression, "instances": len(answer.instances), "bytes": total,
        "buckets": len(buckets), "lookup_s": t1 - t0, "wall_s": wall,
        "raw_mb_per_s": res["raw"] / 1e6 / wall, "wire_mb_per_s": res["wire"] / 1e6 / wall,
        "wire_bytes": res["wire"], "ratio": res["raw"] / res["wire"] if res["wire"] else float("nan"),
        "daemon_cpu_s": cpu1 - cpu0, "daemon_peak_rss_bytes": peak,
        "client_cpu_s": client_cpu, "client_peak_rss_bytes": client_peak,
        "client_rss_growth_bytes": max(0, client_peak - rss0),   # above the RSS at the start of the run
        "md5_checked": verify,
        "latency_ms": {"p50": 1000 * _pct(lat, 50), "p95": 1000 * _pct(lat, 95), "max": 1000 * lat[-1]} if lat else None,
        "problems": res["problems"][:20], "problem_count": len(res["problems"]),
        **({"storage": storage.name, "storage_server_cpu_s": s1[0] - s0[0] if s0 and s1 else None,
            "storage_server_peak_rss_bytes": s1[1] if s1 else None} if storage else {}),
    }


def upload(d: Daemon, client: httpx.Client, manifest: StudyManifest) -> dict:
    """Store the study once and check the lookup matches the manifest (IDs, sizes, MD5s)."""
    t = time.perf_counter()
    res = asyncio.run(upload_all(d.url, manifest, 4, None))
    wall = time.perf_counter() - t
    if res["problems"]:
        raise ChunksError("upload failed: " + "; ".join(res["problems"][:5]))
    study_id = check_lookup(client, manifest)
    return {"study_id": study_id, "upload_s": wall, "upload_mb_per_s": manifest.total_bytes / 1e6 / wall}


def check_lookup(client: httpx.Client, manifest: StudyManifest) -> str:
    """The study's Orthanc ID, once its lookup matches the manifest (IDs, sizes, MD5s)."""
    study_id = manifest.files[0].orthanc_ids()["study"]
    answer = lookup(client, study_id)
    want = {f.orthanc_ids()["instance"]: (f.size, f.md5) for f in manifest.files}
    got = {i.id: (i.size, i.md5) for i in answer.instances}
    if got != want:
        bad = [k for k in want.keys() | got.keys() if want.get(k) != got.get(k)]
        raise ChunksError(f"lookup differs from the uploaded files for {len(bad)} instance(s), e.g. "
                          f"{bad[0]}: uploaded {want.get(bad[0])}, lookup {got.get(bad[0])}")
    return study_id


def _pct(sorted_values: list[float], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def _summary(runs: list[dict]) -> dict:
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k in SUMMARY_KEYS for v in [[r[k] for r in runs]]}


def _row(label: str, c: str, r: dict, extra: str) -> str:
    mb = 2**20
    return (f"| {label} | {c} | {r['wall_s']:.2f} | {r['raw_mb_per_s']:.0f} | {r['wire_mb_per_s']:.0f} | "
            f"{r['ratio']:.2f} | {r['daemon_cpu_s']:.2f} | {r['daemon_peak_rss_bytes'] / mb:.0f} | "
            f"{r['client_cpu_s']:.2f} | {r['client_peak_rss_bytes'] / mb:.0f} "
            f"(+{r['client_rss_growth_bytes'] / mb:.0f}) | {extra}")


def markdown(params: dict, manifest: StudyManifest, runs: list[dict]) -> str:
    first = runs[0]
    lines = [
        f"Chunks: {first['instances']} {manifest.kind} instances, {first['bytes'] / 1e6:.1f} MB, "
        f"{first['buckets']} buckets of {params['bucket_kib']} KiB, {params['workers']} workers, "
        f"{params['runs']} run(s) per compression, {os.cpu_count()} CPUs shared by client and daemon",
        "",
        "| run | compression | wall s | raw MB/s | wire MB/s | ratio | daemon CPU s | daemon peak RSS MiB "
        "| client CPU s | client peak RSS MiB (+in run) | p50 ms | p95 ms | MD5 | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in COMPRESSIONS:
        mine = [r for r in runs if r["compression"] == c]
        for i, r in enumerate(mine, 1):
            lat = r["latency_ms"] or {"p50": float("nan"), "p95": float("nan")}
            lines.append(_row(str(i), c, r, f"{lat['p50']:.0f} | {lat['p95']:.0f} | "
                              f"{'yes' if r['md5_checked'] else '-'} | {r['problem_count']} |"))
        s = _summary(mine)
        for name in ("median", "min", "max"):
            lines.append(_row(f"**{name}**", c, {k: v[name] for k, v in s.items()}, " | | | |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chunks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", choices=KINDS, default="ct")
    ap.add_argument("--instances", type=int, help="default: enough for >= 200 MB (ct: 400)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="parallel GETs (also the daemon's Transfers.Threads)")
    ap.add_argument("--bucket-kib", type=int, default=4096, help="Transfers.BucketSize of the puller and daemon")
    ap.add_argument("--verify", choices=("first", "all", "none"), default="first",
                    help="check instance MD5s in the first run of each compression, every run, or never")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--config", type=json.loads, default={}, help="extra daemon configuration as JSON")
    ap.add_argument("--workdir", type=Path, help="where the daemon's temporary storage goes")
    ap.add_argument("--keep", action="store_true", help="keep the daemon's storage and logs")
    ap.add_argument("--storage", choices=BACKENDS, default="file-system",
                    help="where the daemon keeps attachments (object-storage: SeaweedFS on loopback)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    a = ap.parse_args(argv)
    n = a.instances or DEFAULT_INSTANCES[a.study]
    if min(n, a.runs, a.workers, a.bucket_kib) < 1:
        ap.error("--instances, --runs, --workers and --bucket-kib must be >= 1")

    t = time.perf_counter()
    manifest = ensure_study(a.study, DATA_DIR / f"{a.study}-{n}-seed{a.seed}", instances=n, seed=a.seed)
    print(f"dataset {manifest.root} ({len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB, "
          f"ready in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    if manifest.total_bytes < MIN_STUDY_BYTES:
        print(f"warning: study below {MIN_STUDY_BYTES / 1e6:.0f} MB", file=sys.stderr)

    config = {**a.config, "Transfers": {"Threads": a.workers, "BucketSize": a.bucket_kib,
                                        **a.config.get("Transfers", {})}}
    workdir = Path(tempfile.mkdtemp(prefix="bench-chunks-", dir=a.workdir))
    runs: list[dict] = []
    limits = httpx.Limits(max_connections=a.workers, max_keepalive_connections=a.workers)
    try:
        with backend(a.storage, a.workdir) as storage, \
                Daemon({**config, **storage.config()}, workdir) as d, httpx.Client(base_url=d.url, limits=limits, trust_env=False,
                                                         timeout=httpx.Timeout(300.0)) as client:
            try:
                setup = upload(d, client, manifest)
                print(f"uploaded in {setup['upload_s']:.1f} s ({setup['upload_mb_per_s']:.1f} MB/s), "
                      f"daemon pid {d.pid}", file=sys.stderr)
                for c in COMPRESSIONS:
                    for i in range(a.runs):
                        verify = a.verify == "all" or (a.verify == "first" and i == 0)
                        r = run_once(d, client, setup["study_id"], c, workers=a.workers,
                                     bucket_bytes=a.bucket_kib * 1024, verify=verify, storage=storage)
                        runs.append(r)
                        print(f"{c} run {i + 1}: {r['raw_mb_per_s']:.0f} MB/s raw, {r['wire_mb_per_s']:.0f} MB/s "
                              f"wire, {r['problem_count']} problem(s)", file=sys.stderr)
                        for p in r["problems"][:5]:
                            print(f"  {p}", file=sys.stderr)
                        if r["problem_count"]:
                            r["daemon_stderr_tail"] = d.stderr_tail(4000)
            except (ChunksError, httpx.HTTPError) as e:
                print(f"error: {e}\ndaemon stderr tail:\n{d.stderr_tail()}", file=sys.stderr)
                return 2
    except (DaemonError, OSError, RuntimeError) as e:    # daemon or S3 server did not start
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    params = {"study": a.study, "instances": n, "runs": a.runs, "workers": a.workers,
              "bucket_kib": a.bucket_kib, "verify": a.verify, "seed": a.seed, "config": config,
              "storage": a.storage}
    print(markdown(params, manifest, runs))
    if a.storage == "object-storage":
        for c in COMPRESSIONS:
            cpu = [r["storage_server_cpu_s"] for r in runs if r["compression"] == c]
            print(f"\n{c}: SeaweedFS S3 CPU s: median {statistics.median(cpu):.2f} "
                  f"(min {min(cpu):.2f}, max {max(cpu):.2f})")
    result = {
        "benchmark": "chunks", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": params,
        "dataset": {"kind": manifest.kind, "dir": str(manifest.root), "files": len(manifest.files),
                    "bytes": manifest.total_bytes, "StudyInstanceUID": manifest.StudyInstanceUID},
        "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpus": os.cpu_count(), "httpx": httpx.__version__, "codec": codecs.BACKEND},
        "setup": setup, "runs": runs,
        "summary": {c: _summary([r for r in runs if r["compression"] == c]) for c in COMPRESSIONS},
    }
    a.results_dir.mkdir(parents=True, exist_ok=True)
    out = a.results_dir / f"chunks-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {out}")
    return 1 if any(r["problem_count"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
