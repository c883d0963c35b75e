"""bench.abuse: its quick mode end to end against a real daemon, and its plans."""
from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest

from bench.abuse import CHUNKS_PER_BUCKET, orthanc_id, plan_body
from bench.harness import REPO_ROOT
from protocol.messages import PushTransaction, validate_push_plan


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    out = tmp_path / "abuse.json"
    args = [sys.executable, "-m", "bench.abuse", "--connections", "50", "--runs", "1",
            "--max-connections", "20", "--plan-instances", "300", "--oversize-instances", "1200",
            "--workdir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    [r] = json.loads(out.read_text())["runs"]
    assert r["problems"] == [] and r["daemon_alive"]
    # slowloris: 20 held, 30 refused at once; a new client is refused fast, then served after the cut
    assert r["opened"] == 50 and r["busy_status"] == 503 and 0 < r["busy_ms"] < 1000
    assert r["refused_503"] == 30
    assert 1.5 < r["recovered_s"] < 6                     # HttpRequestTimeout is 2 s
    assert 30 <= r["closed_at_recovery"] <= 50
    assert r["all_closed_s"] is not None and r["all_closed_s"] < 8
    # push plans
    assert (r["oversize_status"], r["create_status"], r["commit_status"], r["delete_status"],
            r["huge_status"]) == (400, 200, 500, 200, 507)
    for key in ("oversize_ms", "create_ms", "commit_ms", "delete_ms", "huge_ms"):
        assert 0 < r[key] < 30_000, key
    assert r["polls"] >= 1 and r["poll_errors"] == 0 and 0 < r["poll_worst_ms"] < 30_000
    assert r["left_in_push"] == 0
    assert list(tmp_path.glob("bench-abuse-*")) == []         # the run's storage is removed
    assert "| push plan of one 1 TiB instance (free space check) | 507 | ms |" in proc.stdout


def test_plans_are_what_the_daemon_parses():
    assert orthanc_id("x").count("-") == 4 and all(len(g) == 8 for g in orthanc_id("x").split("-"))
    plan = PushTransaction.from_json(orjson.loads(plan_body(2 * CHUNKS_PER_BUCKET + 1, 1024, "t")))
    validate_push_plan(plan)                               # consistent: refused only for its size
    assert len(plan.instances) == 2 * CHUNKS_PER_BUCKET + 1 and len(plan.buckets) == 3
    assert {i.size for i in plan.instances} == {1024} and plan.compression == "none"
    [huge] = PushTransaction.from_json(orjson.loads(plan_body(1, 1024 ** 4, "h"))).instances
    assert huge.size == 1024 ** 4
