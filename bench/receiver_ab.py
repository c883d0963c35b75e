"""A/B of two source trees of the daemon on the same study, link and machine, runs interleaved.

    python -m bench.receiver_ab --tree old=/tmp/accel-baseline --tree new=. \
        --profile loopback --systems accel-pull-none accel-push-none --runs 5

Each tree gets its own testbed (two daemons started from that tree), kept up for the whole run;
the runs alternate between trees (old, new, old, new...) so that load from elsewhere on the
machine hits both alike. Prints every run and the medians (wall time, goodput, % of the link's
limit, receiver CPU seconds); `--json` writes the records.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench import harness, report
from bench.datasets import ensure_study
from bench.link import PROFILES, EmulatedLink
from bench.run import DATA_DIR, transfer_timeout
from bench.systems import ACCEL_SYSTEMS, Testbed, run_system


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree (repeat)")
    p.add_argument("--profile", default="loopback", choices=["loopback", *PROFILES])
    p.add_argument("--systems", nargs="+", default=["accel-pull-none", "accel-push-none"], choices=ACCEL_SYSTEMS)
    p.add_argument("--kind", default="ct")
    p.add_argument("--instances", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--daemon-config", default="{}")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in a.tree]
    manifest = ensure_study(a.kind, DATA_DIR / f"{a.kind}-{a.instances}-seed1", instances=a.instances, seed=1)
    ids = [f.orthanc_ids()["instance"] for f in manifest.files]
    study_id = manifest.files[0].orthanc_ids()["study"]
    rate = PROFILES[a.profile].rate_bps if a.profile in PROFILES else None
    timeout = transfer_timeout(manifest.total_bytes, a.profile, None)
    print(f"{a.kind}-{a.instances}: {manifest.total_bytes / 1e6:.1f} MB, profile {a.profile}", flush=True)
    records = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="receiver-ab-") as work:
        link = stack.enter_context(EmulatedLink(a.profile)) if a.profile in PROFILES else None
        beds = {}
        for name, root in trees:
            harness.REPO_ROOT = root  # Daemon.start runs `python -m accelerator` from this tree
            bed = Testbed(Path(work) / name, link, json.loads(a.daemon_config))
            stack.callback(bed.stop)
            bed.start()
            bed.upload(manifest)
            beds[name] = bed
        for run in range(1, a.runs + 1):
            for system in a.systems:
                for name, _ in trees:
                    out = run_system(beds[name], system, manifest, ids, study_id,
                                     Path(work) / name / "runs" / f"{system}-{run}", timeout)
                    record = {"tree": name, "system": system, "run": run, **out}
                    m = report.derive(record, manifest.total_bytes, rate)
                    rx = out["usage"]["daemon-b"]["cpu_s"]
                    records.append({"tree": name, "system": system, "run": run, "wall_s": m["wall_s"],
                                    "goodput_mb_s": m["goodput_mb_s"], "of_limit": m.get("of_limit"),
                                    "receiver_cpu_s": rx, "sender_cpu_s": out["usage"]["daemon-a"]["cpu_s"]})
                    lim = f", {m['of_limit'] * 100:.1f} % of limit" if m.get("of_limit") else ""
                    print(f"run {run} {system:16} {name:6}: {m['wall_s']:.2f} s, {m['goodput_mb_s']:.1f} MB/s{lim}, "
                          f"receiver CPU {rx:.2f} s", flush=True)
                    time.sleep(0.5)
    print("\nmedians:")
    for system in a.systems:
        base = None
        for name, _ in trees:
            rs = [r for r in records if r["tree"] == name and r["system"] == system]
            g = statistics.median(r["goodput_mb_s"] for r in rs)
            w = statistics.median(r["wall_s"] for r in rs)
            cpu = statistics.median(r["receiver_cpu_s"] for r in rs)
            lim = [r["of_limit"] for r in rs if r["of_limit"]]
            base = base or g
            extra = f", {statistics.median(lim) * 100:.1f} % of limit" if lim else ""
            print(f"  {system:16} {name:6}: {w:.2f} s, {g:.1f} MB/s ({g / base:.2f}x){extra}, receiver CPU {cpu:.2f} s")
    if a.json:
        a.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
