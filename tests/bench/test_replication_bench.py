"""The replication scenario of the benchmark (python -m bench replicate): its quick mode end to end.

Run so that the scenario cannot rot: on loopback, two real Orthancs and two gateway daemons, every
system must have copied the whole study and been verified on B by MD5 (a run that is not verified
is failed, and the bench then exits 1).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.harness import REPO_ROOT
from bench.orthanc import orthanc_binary
from bench.replication import markdown, parse_args, summarize
from bench.replication_sites import SYSTEMS


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package `orthanc`: /usr/sbin/Orthanc)")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "replicate", "--quick", "--results-dir", str(out),
                           "--workdir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["system"] for r in results["runs"]] == list(SYSTEMS)
    for r in results["runs"]:
        assert r["ok"] and r["problems"] == [], (r["system"], r.get("error"))
        assert r["verified_bytes"] == results["dataset"]["bytes"], r["system"]
        assert r["metrics"]["goodput_mb_s"] > 0
    copied = [r["job"]["content"] for r in results["runs"] if r["system"].startswith("replicate-")]
    n = results["dataset"]["instances"]
    assert all((c["Copied"], c["Verified"], c["Failed"]) == (n, n, 0) for c in copied)
    assert 1.2 < results["dataset"]["gzip_ratio"] < 3      # the CT study compresses ~1.65x
    assert "| sequential-copy | 1/1 |" in (out / "results.md").read_text()


def test_arguments_and_table():
    a = parse_args(["--quick"])
    assert (a.profile, a.instances, a.runs, a.systems) == ("loopback", 12, 1, list(SYSTEMS))
    assert parse_args([]).profile == "20mbit-50ms-0.5loss"
    with pytest.raises(SystemExit):
        parse_args(["--systems", "nope"])
    runs = [{"system": s, "run": 1, "ok": True, "metrics": {"wall_s": w, "goodput_mb_s": 10 / w}}
            for s, w in (("replicate-gzip", 2.0), ("sequential-copy", 10.0))]
    runs.append({"system": "replicate-negotiated", "run": 1, "ok": False, "error": "job failed: x|y"})
    summary = {e["system"]: e for e in summarize(runs)}
    assert summary["replicate-gzip"]["vs_sequential"] == pytest.approx(5.0)
    assert summary["replicate-negotiated"]["ok_runs"] == 0
    table = markdown({"meta": {"started": "now", "profile": "loopback", "cpus": 2, "load_start": [0.1],
                               "runs": 1, "code_sha256": "0" * 64, "argv": ["--quick"]},
                      "dataset": {"instances": 12, "bytes": 6e6, "gzip_ratio": 1.6}, "link": None,
                      "summary": list(summary.values())})
    assert "| replicate-gzip | 1/1 |" in table and "5.0×" in table and "failed: job failed: x/y" in table
