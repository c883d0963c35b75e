"""The replicas benchmark (python -m bench.replicas) end to end at a tiny size, and its capacity model.

Run so that the benchmark behind issue 13's closing note cannot rot: every system (SQLite + disk,
one and two PostgreSQL + S3 replicas behind HAProxy) must have ingested the study, served it back
with MD5s checked, received it again from a site's push, and measured every component it runs.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.harness import REPO_ROOT
from bench.replicas import PHASES, SYSTEMS, capacity


def test_capacity_names_the_first_component_to_fill():
    """Daemons scale with N, the shared servers do not: the ceiling moves from them to PostgreSQL."""
    summary = {"pg-s3-2": {
        "ingest": {"cpu_s_per_gb": {"daemons": 60.0, "postgresql": 6.0, "seaweedfs": 10.0, "haproxy": 1.0}},
        "serve": {"cpu_s_per_gb": {"daemons": 12.0, "postgresql": 0.0, "seaweedfs": 2.0, "haproxy": 1.0}},
    }}
    rows, info = capacity(summary, 500_000_000, cores=2, replicas=(1, 8), studies_per_site_day=20,
                          busy_hours=10, target=1.0)
    assert info["cpu_s_per_gb_ingest_plus_serve"]["daemons"] == 72.0
    one, eight = rows
    assert one["saturates"] == "daemons" and one["hub_gb_per_hour"] == pytest.approx(7200 / 72)
    assert eight["saturates"] == "seaweedfs" and eight["hub_gb_per_hour"] == pytest.approx(7200 / 12)
    assert eight["studies_per_hour"] == pytest.approx(600 / 0.5)
    assert eight["sites"] == pytest.approx(1200 * 10 / 20)


@pytest.mark.slow
def test_tiny_run_every_system(tmp_path):
    from bench.haproxy import haproxy_binary
    from bench.postgres import postgres_bin_dir
    from bench.s3 import weed_binary

    if postgres_bin_dir() is None or weed_binary() is None or haproxy_binary() is None:
        pytest.skip("needs PostgreSQL server binaries, SeaweedFS (weed) and HAProxy")
    out = tmp_path / "replicas.md"
    proc = subprocess.run([sys.executable, "-m", "bench.replicas", "--runs", "1", "--instances", "4",
                           "--pulls", "1", "--max-load", "1000", "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["system"] for r in result["runs"]] == list(SYSTEMS)
    for r in result["runs"]:
        for phase in PHASES:
            p = r[phase]
            assert p["problem_count"] == 0, (r["system"], phase, p["problems"])
            assert p["mb_per_s"] > 0 and p["cpu_s"]["daemons"] >= 0, (r["system"], phase)
        assert r["ingest"]["instances"] == 4 and r["ingest"]["cpu_s"]["daemons"] > 0
        assert r["serve"]["bytes"] == r["ingest"]["bytes"]      # one pull of the whole study
        if r["system"] != "sqlite-disk":
            assert r["ingest"]["cpu_s"]["postgresql"] >= 0 and r["ingest"]["cpu_s"]["seaweedfs"] > 0
        assert ("haproxy" in r["serve"]["cpu_s"]) == (r["system"] == "pg-s3-2")
        assert r["push"]["instances"] == 4 and "sender" in r["push"]["cpu_s"]   # the site's daemon, apart
    # one capacity table per way studies arrive: POST /instances, and a site's push
    assert [c["basis"]["ingest_phase"] for c in result["capacity"]] == ["ingest", "push"]
    assert [row["replicas"] for row in result["capacity"][0]["rows"]] == [1, 2, 4, 8]
    assert "## Capacity on paper" in out.read_text()
