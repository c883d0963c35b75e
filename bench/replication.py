"""The replication scenario: one plain Orthanc copied into another across the emulated WAN, through
two gateway daemons (`POST /replicate`) vs Orthanc's own sequential one-request-per-instance copy.

    python -m bench replicate --profile 20mbit-50ms-0.5loss [--instances 100] [--runs 3]
    python -m bench replicate --quick          # loopback, 12 CT instances, 1 run (the test suite's)

Two sites, one per network namespace of an EmulatedLink (loopback: both on 127.0.0.1):

    site 1 (a): Orthanc A (holds the CT study) + daemon GA ("Gateway" -> A, peer "gb" -> GB)
    site 2 (b): Orthanc B (empty)              + daemon GB ("Gateway" -> B, KeepCopies false)

A-GA and GB-B talk over their namespace's loopback (the LAN); only GA-GB crosses the link. Every
run does each system in turn on an emptied B, then checks that B holds every instance of the
study with the MD5 that A holds (else the run is failed, not measured):

- ``replicate-gzip``: ``POST GA/replicate {"Source": A, "Target": "gb", "Compression": "gzip"}``
  with GA's ``Transfers.NegotiatedCodecs`` false, so the buckets really are gzip (the "gzip limit"
  is about gzip); timed from the POST to the poll that sees Success, which the job reaches only
  once B holds everything with the right MD5 (it waits for GB's forwarding);
- ``replicate-negotiated``: the same with the default settings (two of our daemons then agree on
  a better codec than gzip when they have one);
- ``sequential-copy``: what Orthanc's ``Replicate.py`` does, written here: list A's instances,
  then for each one ``GET A/instances/{id}/file`` and ``POST B/instances``, one at a time, from
  a client at site 1 (keep-alive connections, which the script's HTTP library also keeps).

GA and GB are fresh daemons (empty storage) for every replicate run, so that no run finds the
study already fetched into GA's store by the previous one.

Figures per system (medians over the verified runs, [min-max]): wall time, goodput (DICOM bytes /
wall, MB = 10^6 B), ``of gzip limit`` = goodput / (link rate / 8 x the study's gzip ratio, that
of gzip at the daemon's level over 4 MiB buckets, computed from the files), the bench's own
``of limit`` (bench/report.py: ratio measured on the wire for ``-gzip`` systems), link use, and
``x sequential`` = goodput / the sequential copy's goodput of the same run set.
Writes results.json and results.md into bench/results/replication-<timestamp>/ (or --results-dir).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from bench import report
from bench.datasets import ensure_study
from bench.harness import DaemonError
from bench.link import PROFILES, EmulatedLink, LinkError, unavailable_reason
from bench.replication_sites import SYSTEMS, Sites, gzip_ratio
from bench.run import DATA_DIR, LOOPBACK, RESULTS_DIR, code_fingerprint, default_instances
from bench.systems import ABORT, RunFailed

QUICK_INSTANCES = 12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench replicate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, choices=(LOOPBACK, *PROFILES),
                    help="link between the sites (default: 20mbit-50ms-0.5loss; --quick: loopback)")
    ap.add_argument("--instances", type=int, help="CT instances (default: the transfer bench's for the profile)")
    ap.add_argument("--runs", type=int, help="runs per system (default 3; --quick: 1)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma separated among {','.join(SYSTEMS)}")
    ap.add_argument("--quick", action="store_true", help=f"loopback, {QUICK_INSTANCES} instances, 1 run")
    ap.add_argument("--seed", type=int, default=1, help="dataset and link loss seed")
    ap.add_argument("--timeout", type=float, help="seconds per copy (default: 20x its time at the link rate, >= 120)")
    ap.add_argument("--results-dir", type=Path)
    ap.add_argument("--workdir", type=Path, help="parent of the servers' storage (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the servers' storage and logs")
    a = ap.parse_args(argv)
    a.profile = a.profile or (LOOPBACK if a.quick else "20mbit-50ms-0.5loss")
    a.runs = a.runs or (1 if a.quick else 3)
    a.instances = a.instances or (QUICK_INSTANCES if a.quick else default_instances("ct", a.profile, False)
                                  if a.profile != LOOPBACK else 100)
    a.systems = [s for s in a.systems.split(",") if s]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad or not a.systems or a.runs < 1 or a.instances < 1:
        ap.error(f"bad --systems {bad or a.systems}, --runs or --instances")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started = datetime.now()
    if a.profile != LOOPBACK and (reason := unavailable_reason()):
        print(f"bench replicate: {reason}", file=sys.stderr)
        return 2
    manifest = ensure_study("ct", DATA_DIR / f"ct-{a.instances}-seed{a.seed}", instances=a.instances, seed=a.seed)
    total = manifest.total_bytes
    rate = PROFILES[a.profile].rate_bps if a.profile in PROFILES else None
    timeout = a.timeout or max(120.0, 20 * total / (rate / 8 if rate else 1e6))
    ratio = gzip_ratio(manifest)
    out_dir = a.results_dir or RESULTS_DIR / f"replication-{started:%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="accel-bench-repl-", dir=a.workdir))
    args = sys.argv[1:] if argv is None else argv
    results = {"meta": {"started": started.isoformat(timespec="seconds"), "argv": args,
                        "profile": a.profile, "runs": a.runs, "seed": a.seed, "cpus": os.cpu_count(),
                        "load_start": list(os.getloadavg()), "code_sha256": code_fingerprint()},
               "dataset": {"kind": "ct", "instances": len(manifest.files), "bytes": total,
                           "gzip_ratio": ratio, "path": str(manifest.root)},
               "link": None, "runs": [], "summary": [], "notes": []}
    print(f"bench replicate: {a.profile}, {len(manifest.files)} CT instances ({total / 1e6:.1f} MB, gzip "
          f"ratio {ratio:.2f}), systems {', '.join(a.systems)}, {a.runs} run(s); writing to {out_dir}", flush=True)
    link = sites = None
    code = 1
    try:
        if a.profile != LOOPBACK:
            link = EmulatedLink(a.profile, seed=a.seed).start()
            results["link"] = link.info()
        sites = Sites(work, link, manifest)
        sites.start()
        print(f"bench replicate: A holds the study (uploaded in {sites.upload_s:.1f} s)", flush=True)
        for run in range(1, a.runs + 1):
            for system in a.systems:
                results["runs"].append(_one(sites, system, run, total, rate, ratio, timeout))
                _write(results, out_dir)
        code = 0 if all(r["ok"] for r in results["runs"]) else 1
    except KeyboardInterrupt:
        ABORT.set()          # the sites' threads stop waiting, so that they can be stopped
        code = 130
    except (RunFailed, DaemonError, LinkError, OSError, RuntimeError) as e:     # TimeoutError is an OSError
        print(f"bench replicate: setup failed: {type(e).__name__}: {e}", flush=True)
        results["notes"].append(f"setup failed: {e}")
    finally:
        if sites is not None:
            sites.stop()
        if link is not None:
            link.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        results["meta"]["load_end"] = list(os.getloadavg())
        if code_fingerprint() != results["meta"]["code_sha256"]:     # gateways start per run: new code
            results["notes"].append("the code under test (accelerator/, protocol/) changed during the run")
        table = _write(results, out_dir)
    print("\n" + table + (f"\nkept: {work}" if a.keep else ""), flush=True)
    return code


def _one(sites: Sites, system: str, run: int, total: int, rate: float | None, ratio: float,
         timeout: float) -> dict:
    record: dict = {"system": system, "run": run}
    try:
        record.update(sites.measure(system, timeout), ok=True, error=None)
        m = report.derive(record, total, rate)
        m["gzip_limit_mb_s"] = rate / 8 * ratio / 1e6 if rate else None
        m["of_gzip_limit"] = m["goodput_mb_s"] / m["gzip_limit_mb_s"] if rate else None
        record["metrics"] = m
        extra = f", {m['of_gzip_limit'] * 100:.0f}% of gzip limit" if rate else ""
        print(f"run {run} {system}: {m['wall_s']:.2f} s, {m['goodput_mb_s']:.2f} MB/s{extra}", flush=True)
    except RunFailed as e:
        record.update(e.partial or {}, ok=False, error=str(e))
        print(f"run {run} {system}: FAILED: {e}", flush=True)
    except Exception as e:  # noqa: BLE001 -- one broken run (a gateway that did not start...) must not end the bench
        record.update(ok=False, error=f"{type(e).__name__}: {e}")
        print(f"run {run} {system}: ERROR: {type(e).__name__}: {e}", flush=True)
    return record


COLUMNS = ("wall_s", "goodput_mb_s", "of_gzip_limit", "of_limit", "link_use", "payload_ratio",
           "daemon_a_cpu_s", "daemon_b_cpu_s")


def summarize(runs: list[dict]) -> list[dict]:
    """Per system: medians [min, max] of COLUMNS over the verified runs, and x sequential."""
    out = []
    for system in dict.fromkeys(r["system"] for r in runs):
        rs = [r for r in runs if r["system"] == system]
        ok = [r for r in rs if r["ok"]]
        stats = {}
        for k in COLUMNS:
            vals = [r["metrics"][k] for r in ok if r["metrics"].get(k) is not None]
            stats[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else None
        out.append({"system": system, "runs": len(rs), "ok_runs": len(ok), "metrics": stats,
                    "errors": [r["error"] for r in rs if not r["ok"]][:3]})
    base = next((e["metrics"]["goodput_mb_s"] for e in out if e["system"] == "sequential-copy"), None)
    for e in out:
        g = e["metrics"]["goodput_mb_s"]
        e["vs_sequential"] = g["median"] / base["median"] if g and base else None
    return out


def markdown(results: dict) -> str:
    meta, d = results["meta"], results["dataset"]
    link = results["link"]
    cond = "loopback (no emulation)" if not link else (
        f"{link['profile']['rate_bps'] / 1e6:g} Mbit/s, RTT {link['profile']['rtt_ms']:g} ms, loss "
        f"{link['profile']['loss'] * 100:g}%, congestion control {link['congestion']['a']}")
    lines = [f"# Replication benchmark {meta['started']}", "",
             f"Profile **{meta['profile']}**: {cond}. CT study: {d['instances']} instances, {d['bytes'] / 1e6:.1f} MB, "
             f"gzip ratio {d['gzip_ratio']:.2f}. {meta['cpus']} CPUs, load {meta['load_start'][0]:.2f} at start"
             + (f" / {meta['load_end'][0]:.2f} at end" if meta.get("load_end") else "")
             + f"; {meta['runs']} run(s) per system; cells median [min–max]; code sha256 {meta['code_sha256'][:12]}.",
             "", "Plain Orthanc A -> Orthanc B (Debian Orthanc 1.10.1, no plugin). replicate-*: POST /replicate on "
             "gateway GA (-> A) to peer gb (gateway -> B) across the link; sequential-copy: GET A/instances/{id}/file "
             "+ POST B/instances one at a time from site 1. Every run verified on B (MD5 of every instance = "
             "A's). of gzip limit: goodput / (rate / 8 × the study's gzip ratio); of limit (bench): bench/report.py's "
             "(-gzip systems: the ratio measured on the wire, others: the raw rate); link use: IP bits a→b / "
             "(rate × wall); wire ratio: DICOM bytes / TCP payload a→b.",
             "", "| system | ok | wall s | goodput MB/s | × sequential | of gzip limit | of limit (bench) "
             "| link use | wire ratio | GA CPU s | GB CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results["summary"]:
        m = e["metrics"]
        if not e["ok_runs"]:
            err = (e["errors"] or ["?"])[0].replace("|", "/").replace("\n", " ")[:150]
            lines.append(f"| {e['system']} | 0/{e['runs']} | failed: {err} |" + " |" * 8)
            continue
        vs = f"{e['vs_sequential']:.1f}×" if e["vs_sequential"] else "–"
        pct = lambda s: f"{report._mm(s, 0, 100)}%" if s else "–"  # noqa: E731
        lines.append(f"| {e['system']} | {e['ok_runs']}/{e['runs']} | {report._mm(m['wall_s'], 2)} | "
                     f"{report._mm(m['goodput_mb_s'], 2)} | {vs} | {pct(m['of_gzip_limit'])} | {pct(m['of_limit'])} | "
                     f"{report._med(m['link_use'], 0, 100)}{'%' if m['link_use'] else ''} | "
                     f"{report._med(m['payload_ratio'], 2)} | {report._med(m['daemon_a_cpu_s'])} | "
                     f"{report._med(m['daemon_b_cpu_s'])} |")
    lines += [f"\nNote: {n}." for n in results.get("notes", [])]
    lines += ["", f"Command: `python -m bench replicate {' '.join(meta['argv'])}`"]
    return "\n".join(lines) + "\n"


def _write(results: dict, out_dir: Path) -> str:
    results["summary"] = summarize(results["runs"])
    table = markdown(results) if results["runs"] else "(no results)\n"
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
