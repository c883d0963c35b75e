"""The transfer benchmark: accelerator push and pull against per-instance HTTP and DICOM C-STORE,
on the same study and the same emulated link, in one run.

    python -m bench                      # every profile, the "ct" study, every system, 3 runs
    python -m bench --quick              # 40 CT instances, loopback + 100mbit-20ms, < 3 minutes
    python -m bench --profiles loopback 20mbit-50ms-0.5loss --datasets ct,jpeg --runs 5
    python -m bench --old-tree /tmp/accel-old    # + old-{push,pull}-{gzip,none} from that tree

For each link profile (``loopback``: both daemons on 127.0.0.1; the others: two network
namespaces joined by bench/link's forwarder, which needs root) and each dataset, two daemons are
started (a: source, b: receiver), the study is uploaded to a once, then every run does every
system in turn (so that a drift of the machine hits all systems alike); before each run b is
emptied, after it b must hold exactly the study with the right MD5s (for dcmtk: storescp's files
must carry the same data sets), else the run counts as failed and is not measured. See
bench/systems.py for the systems and bench/report.py for the figures.

Dataset sizes: by default each study has its kind's default size (bench/datasets.py: ct 300
instances, small 2000, large 3 x 117 MB, jpeg 80), capped on slow links so that moving it at the
link's rate takes at most ~75 s (10mbit-100ms-1loss: 170 CT instances; large: 1 instance on
the 20 and 10 Mbit/s profiles). ``--instances N`` sets every study to N instances.

``--old-tree DIR`` (e.g. ``git worktree add /tmp/accel-old <commit>``) starts a second pair of
daemons from that source tree on the same link, with the same Python, and adds its systems
(old-push-gzip, old-pull-gzip, old-push-none, old-pull-none) to every run, interleaved with
ours: the old figure of the comparison is measured on the same machine load as the new one.
The profiles run in the order given (daemons are started when their profile begins, so the
code a profile measures is the tree as it was then: its fingerprint is kept per profile).

Writes results.json, results.md (the table, also printed), goodput.png and progress.png into
bench/results/<timestamp>/ (or --results-dir). Without root, says why and runs loopback only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

from bench import plots, report
from bench.datasets import DEFAULTS, KINDS, ensure_study
from bench.harness import REPO_ROOT, DaemonError
from bench.link import PROFILES, EmulatedLink, LinkError, unavailable_reason
from bench.systems import ABORT, OLD_SYSTEMS, SYSTEMS, RunFailed, Testbed, dcmtk_missing, run_system

DATA_DIR = REPO_ROOT / "bench" / "data"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
LOOPBACK = "loopback"
ALL_PROFILES = (LOOPBACK, *PROFILES)
QUICK_PROFILES = (LOOPBACK, "100mbit-20ms")
QUICK_INSTANCES = {"ct": 40, "small": 300, "large": 1, "jpeg": 80, "mr": 80}
#: rough bytes per instance, to size the default studies on slow links
SIZE_HINT = {"ct": 0.53e6, "small": 25e3, "large": 117.5e6, "jpeg": 155e3, "mr": 0.135e6}
BUDGET_S = 75


def default_instances(kind: str, profile: str, quick: bool) -> int:
    if quick:
        return QUICK_INSTANCES[kind]
    n = DEFAULTS[kind]["instances"]
    rate = PROFILES[profile].rate_bps if profile in PROFILES else 0
    if rate:
        cap = int(BUDGET_S * rate / 8 / SIZE_HINT[kind])
        if cap < n:
            n = max(1, cap - cap % 10 if cap >= 20 else cap)
    return n


def transfer_timeout(nbytes: int, profile: str, given: float | None) -> float:
    """Per transfer: 20 x the time at the link's rate (loopback: at 1 MB/s), at least 120 s."""
    if given:
        return given
    rate = PROFILES[profile].rate_bps if profile in PROFILES else 0
    return max(120.0, 20 * nbytes / (rate / 8 if rate else 1e6))


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.split(",") if v]


def _tool_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def code_fingerprint(tree: Path = REPO_ROOT) -> str:
    """SHA-256 of the code under test (accelerator/ and protocol/ sources): the working tree can
    change between two benchmark runs, and results only compare on the same code."""
    h = hashlib.sha256()
    for root in ("accelerator", "protocol"):
        for path in sorted((tree / root).rglob("*.py")):
            h.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="profiles: " + ", ".join(ALL_PROFILES) + "; systems: " + ", ".join(SYSTEMS))
    ap.add_argument("--quick", action="store_true",
                    help="small data (40 CT instances), loopback + 100mbit-20ms, 2 runs: under 3 minutes")
    ap.add_argument("--profiles", nargs="+", metavar="P", help=f"default: all ({', '.join(ALL_PROFILES)})")
    ap.add_argument("--datasets", nargs="+", metavar="KIND", help=f"comma/space separated among {','.join(KINDS)}; "
                    "default: ct")
    ap.add_argument("--systems", nargs="+", metavar="S", help="default: all (with --old-tree: and its systems)")
    ap.add_argument("--old-tree", type=Path, metavar="DIR",
                    help="a second source tree (e.g. a git worktree of an older commit) whose daemons run the "
                         f"systems {', '.join(OLD_SYSTEMS)} in the same runs")
    ap.add_argument("--runs", type=int, help="runs per system (default 3; --quick: 2)")
    ap.add_argument("--instances", type=int, help="instances of every study (default: see above)")
    ap.add_argument("--seed", type=int, default=1, help="dataset and link loss seed")
    ap.add_argument("--timeout", type=float, help="seconds per transfer (default: 20x its time at the link rate)")
    ap.add_argument("--results-dir", type=Path, help="where to write (default: bench/results/<timestamp>)")
    ap.add_argument("--workdir", type=Path, help="parent of the daemons' storage (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' storage and logs")
    ap.add_argument("--daemon-config", type=json.loads, metavar="JSON", default={},
                    help='options merged into both daemons\' configuration, e.g. \'{"Transfers": {"Threads": 8}}\'')
    a = ap.parse_args(argv)
    a.profiles = _split(a.profiles) or list(QUICK_PROFILES if a.quick else ALL_PROFILES)
    a.datasets = _split(a.datasets) or ["ct"]
    known_systems = SYSTEMS + (OLD_SYSTEMS if a.old_tree else ())
    a.systems = _split(a.systems) or list(known_systems)
    a.runs = a.runs or (2 if a.quick else 3)
    if a.old_tree is not None:
        a.old_tree = a.old_tree.resolve()
        if not (a.old_tree / "accelerator" / "__main__.py").is_file():
            ap.error(f"--old-tree {a.old_tree}: no accelerator/__main__.py there")
    for name, values, known in (("profile", a.profiles, ALL_PROFILES), ("dataset", a.datasets, KINDS),
                                ("system", a.systems, known_systems)):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"unknown {name}(s) {', '.join(bad)}; known: {', '.join(known)}")
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    return a


def _git_head(tree: Path) -> str | None:
    """The commit a tree is at (its working files may differ: see the fingerprints)."""
    return _tool_version(["git", "-C", str(tree), "rev-parse", "HEAD"])


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.monotonic()
    started = datetime.now()
    notes: list[str] = []

    reason = unavailable_reason()
    if reason and any(p != LOOPBACK for p in a.profiles):
        _log(f"bench: {reason}")
        notes.append(f"emulated profiles skipped: {reason}")
        a.profiles = [LOOPBACK]
    missing = dcmtk_missing()
    if missing and "dcmtk-cstore" in a.systems:
        _log(f"bench: dcmtk-cstore skipped: {missing}")
        notes.append(f"dcmtk-cstore skipped: {missing}")
        a.systems.remove("dcmtk-cstore")
    plot_problem = plots.available()
    if plot_problem:
        _log(f"bench: {plot_problem}")
        notes.append(plot_problem)

    out_dir = a.results_dir or RESULTS_DIR / started.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="accel-bench-", dir=a.workdir))
    results: dict = {
        "meta": {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:] if argv is None else argv,
                 "quick": a.quick, "runs": a.runs, "seed": a.seed, "cpus": os.cpu_count(),
                 "daemon_config": a.daemon_config, "code_sha256": code_fingerprint(),
                 "old_tree": str(a.old_tree) if a.old_tree else None,
                 "old_tree_commit": _git_head(a.old_tree) if a.old_tree else None,
                 "old_code_sha256": code_fingerprint(a.old_tree) if a.old_tree else None,
                 "commit": _git_head(REPO_ROOT),
                 "load_start": list(os.getloadavg()), "load_end": None, "duration_s": None,
                 "python": sys.version.split()[0], "platform": platform.platform(),
                 "storescu": _tool_version(["storescu", "--version"]) if not missing else None},
        "profiles": {}, "datasets": {}, "runs": [], "summary": [], "notes": notes,
    }
    _log(f"bench: profiles {', '.join(a.profiles)}; datasets {', '.join(a.datasets)}; systems "
         f"{', '.join(a.systems)}; {a.runs} run(s); load {os.getloadavg()[0]:.2f}; writing to {out_dir}")
    failed_setup = interrupted = False
    try:
        for profile in a.profiles:
            link = None
            try:
                if profile != LOOPBACK:
                    link = EmulatedLink(profile, seed=a.seed).start()
                    results["profiles"][profile] = {"link": link.info()}
                else:
                    results["profiles"][profile] = {"link": None,
                                                    "note": "both daemons on 127.0.0.1, no emulation, no wire counters"}
                for kind in a.datasets:
                    n = a.instances or default_instances(kind, profile, a.quick)
                    if not _run_dataset(a, results, profile, link, kind, n, work):
                        failed_setup = True
                    _write(results, out_dir, final=False)
            except (LinkError, OSError) as e:
                _log(f"bench: profile {profile} could not be set up: {e}")
                notes.append(f"{profile}: not run: {e}")
                failed_setup = True
            finally:
                if link is not None:
                    link.close()
    except KeyboardInterrupt:
        interrupted = True
        notes.append("interrupted (SIGINT): the run in progress is not recorded, later ones never ran")
        _log(f"bench: {notes[-1]}")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        results["meta"]["load_end"] = list(os.getloadavg())
        if code_fingerprint() != results["meta"]["code_sha256"]:
            notes.append("the code under test (accelerator/, protocol/) changed during the run: daemons "
                         "started after the change ran the new code")
            _log(f"bench: {notes[-1]}")
        results["meta"]["duration_s"] = time.monotonic() - t_start
        table = _write(results, out_dir, final=True)
    print()
    print(table)
    _log(f"bench: done in {results['meta']['duration_s']:.0f} s; results in {out_dir}")
    bad = [e for e in results["summary"] if e["ok_runs"] < e["runs"]]
    if interrupted:
        return 130
    return 1 if failed_setup or bad or not results["summary"] else 0


def _run_dataset(a, results: dict, profile: str, link, kind: str, n: int, work: Path) -> bool:
    t = time.monotonic()
    manifest = ensure_study(kind, DATA_DIR / f"{kind}-{n}-seed{a.seed}", instances=n, seed=a.seed)
    key = f"{kind}-{n}"
    ids = [f.orthanc_ids()["instance"] for f in manifest.files]
    study_id = manifest.files[0].orthanc_ids()["study"]
    results["datasets"].setdefault(key, {"kind": kind, "instances": len(manifest.files),
                                         "bytes": manifest.total_bytes, "seed": a.seed,
                                         "path": str(manifest.root), "study_id": study_id})
    rate = PROFILES[profile].rate_bps if profile in PROFILES else None
    timeout = transfer_timeout(manifest.total_bytes, profile, a.timeout)
    _log(f"[{profile}] {key}: {len(manifest.files)} instances, {manifest.total_bytes / 1e6:.1f} MB "
         f"(ready in {time.monotonic() - t:.1f} s); starting daemons")
    bed = Testbed(work / f"{profile}-{key}", link, a.daemon_config)
    old_bed = None
    if any(s in OLD_SYSTEMS for s in a.systems):
        old_bed = Testbed(work / f"{profile}-{key}-old", link, a.daemon_config, root=a.old_tree,
                          avoid_ports=(bed.site_a.port, bed.site_b.port))
    beds = [b for b in (bed, old_bed) if b is not None]
    # what the daemons of this profile run: the working tree may change between profiles
    results["profiles"][profile].setdefault("code_sha256", {})[key] = code_fingerprint()
    results["profiles"][profile].setdefault("started", {})[key] = datetime.now().isoformat(timespec="seconds")
    try:
        for b in beds:
            b.start()
            up = b.upload(manifest)
            _log(f"[{profile}] {key}: uploaded to a{' (old tree)' if b is old_bed else ''} in {up:.1f} s")
    except (DaemonError, RunFailed, OSError) as e:
        _log(f"[{profile}] {key}: setup failed: {e}")
        for b in beds:
            b.stop()
        for run in range(1, a.runs + 1):
            for system in a.systems:
                results["runs"].append({"profile": profile, "dataset": key, "system": system, "run": run,
                                        "ok": False, "error": f"setup failed: {e}"})
        return False
    try:
        for run in range(1, a.runs + 1):
            for system in a.systems:
                record = {"profile": profile, "dataset": key, "system": system, "run": run,
                          "time": datetime.now().isoformat(timespec="seconds")}
                this = old_bed if system in OLD_SYSTEMS else bed
                try:
                    if not this.alive():
                        raise RunFailed("a daemon is not running any more: "
                                        + (this.site_a.daemon.stderr_tail(600) + this.site_b.daemon.stderr_tail(600)))
                    out = run_system(this, system, manifest, ids, study_id,
                                     work / f"{profile}-{key}" / "runs" / f"{system}-{run}", timeout)
                    record.update(out, ok=True, error=None)
                    record["metrics"] = report.derive(record, manifest.total_bytes, rate)
                    m = record["metrics"]
                    extra = (f", {m['of_limit'] * 100:.0f}% of limit" if m.get("of_limit") is not None else "")
                    _log(f"[{profile}] {key} run {run} {system}: {m['wall_s']:.2f} s, "
                         f"{m['goodput_mb_s']:.2f} MB/s{extra}")
                except RunFailed as e:
                    record.update(e.partial or {}, ok=False, error=str(e))
                    _log(f"[{profile}] {key} run {run} {system}: FAILED: {e}")
                except Exception as e:  # noqa: BLE001 -- one broken run must not end the bench
                    record.update(ok=False, error=f"{type(e).__name__}: {e}")
                    _log(f"[{profile}] {key} run {run} {system}: ERROR: {e}\n{traceback.format_exc()}")
                results["runs"].append(record)
    except BaseException:
        ABORT.set()          # e.g. Ctrl-C: the hosts' threads stop waiting, so bed.stop() can run
        raise
    finally:
        for b in beds:
            b.stop()
    return True


def _write(results: dict, out_dir: Path, final: bool) -> str:
    results["summary"] = report.summarize(results["runs"])
    table = report.markdown(results) if results["summary"] else "(no results)\n"
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out_dir / "results.md").write_text(table)
    if final and results["summary"] and plots.available() is None:
        plots.plot_goodput(results, out_dir / "goodput.png")
        plots.plot_progress(results, out_dir / "progress.png")
    return table


if __name__ == "__main__":
    sys.exit(main())
