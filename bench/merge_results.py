"""Merge the results of several ``python -m bench`` invocations into one table.

    python -m bench.merge_results OUT_DIR RESULTS_DIR [RESULTS_DIR ...]

Why: a full comparison (every codec, new and old tree, four profiles) takes longer than one
sitting wants, and the slow links hardly depend on the receiver's CPU while loopback and
100 Mbit/s do; so the slow profiles can run first and the fast ones last, on the latest code,
as two invocations. Every comparison the report makes (× strict gzip, × old main, % of limit)
stays inside one profile and dataset, which each come from a single invocation: merging only
puts the tables side by side. Refuses inputs that measured the same profile and dataset twice.
Each input's start, load and code fingerprint are kept as notes above the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import report


def merge(inputs: list[dict]) -> dict:
    """One results dict whose profiles, datasets and runs are the union of the inputs'."""
    if not inputs:
        raise ValueError("nothing to merge")
    seen: set[tuple[str, str]] = set()
    out: dict = {"meta": dict(inputs[0]["meta"]), "profiles": {}, "datasets": {}, "runs": [], "notes": []}
    for res in inputs:
        meta = res["meta"]
        keys = {(r["profile"], r["dataset"]) for r in res["runs"]}
        if keys & seen:
            raise ValueError(f"{sorted(keys & seen)} measured by two inputs")
        seen |= keys
        out["profiles"].update(res["profiles"])
        out["datasets"].update(res["datasets"])
        out["runs"].extend(res["runs"])
        load_end = meta.get("load_end") or [float("nan")]
        out["notes"].append(
            f"{', '.join(res['profiles'])}: started {meta['started']}, {meta['runs']} run(s), load "
            f"{meta['load_start'][0]:.2f} → {load_end[0]:.2f}, code sha256 {str(meta.get('code_sha256'))[:12]}"
            + (f", old tree {meta.get('old_tree')} at {str(meta.get('old_tree_commit'))[:7]}"
               if meta.get("old_tree") else "") + f"; argv {' '.join(meta.get('argv') or [])}")
        out["notes"].extend(res.get("notes", []))
    out["meta"]["runs"] = "/".join(sorted({str(r["meta"]["runs"]) for r in inputs}))
    out["meta"]["load_end"] = inputs[-1]["meta"].get("load_end")
    out["meta"]["merged_from"] = len(inputs)
    out["summary"] = report.summarize(out["runs"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.merge_results", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("inputs", type=Path, nargs="+", help="results directories (holding results.json)")
    a = ap.parse_args(argv)
    merged = merge([json.loads((d / "results.json").read_text()) for d in a.inputs])
    a.out.mkdir(parents=True, exist_ok=True)
    table = report.markdown(merged)
    (a.out / "results.json").write_text(json.dumps(merged, indent=1, default=str) + "\n")
    (a.out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
