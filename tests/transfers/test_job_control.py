"""Job control (pause, resume, cancel, resubmit, priorities) on real transfers between two
daemons, slowed by a proxy in front of B (A's peer `b-proxy`) that stalls every bucket request, so
that the jobs are surely running when they are controlled.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.harness import free_port
from tests.dicom_data import make_instance
from tests.faultproxy import Fault, FaultProxy
from tests.transfers.pair import Node, Pair

pytestmark = pytest.mark.slow

THREADS = 2
STALL = 0.15  # seconds per bucket request
OPTIONS = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 2, "Threads": THREADS}}
CHUNKS = "/transfers/chunks/"
PUSH = "/transfers/push/"


def dataset(study: str, ct: int = 12) -> list[bytes]:
    """`ct` CT instances of 39 kB: two buckets each at BucketSize 16 KiB."""
    return [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.1",
                          sop_uid=f"{study}.1.{i}", source="CT_small.dcm", InstanceNumber=i)
            for i in range(ct)]


def stall_buckets(method: str, path: str, attempt: int) -> Fault | None:
    if (method == "GET" and path.startswith(CHUNKS)) or (method == "PUT" and path.startswith(PUSH)):
        return Fault.stall(STALL)
    return None


@contextmanager
def proxied_pair(tmp_path: Path, storage: Callable[[], dict], a: dict | None = None) -> Iterator[tuple[FaultProxy, Pair]]:
    port_b = free_port()
    with FaultProxy(f"http://127.0.0.1:{port_b}", stall_buckets) as proxy, \
            Pair(tmp_path, a={**OPTIONS, **(a or {})}, b=OPTIONS, proxy_url=proxy.url, port_b=port_b,
                 storage=storage) as pair:
        yield proxy, pair


def study(uploaded: list[dict]) -> list[dict]:
    return [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}]


def action(node: Node, job_id: str, verb: str) -> int:
    answer = node.http.post(f"/jobs/{job_id}/{verb}", content=b"")
    if answer.status_code == 200:
        assert answer.json() == {}
    return answer.status_code


def completed(node: Node, job_id: str) -> int:
    return node.job(job_id)["Content"].get("CompletedHttpQueries", 0)


def wait_for_progress(node: Node, job_id: str, at_least: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while completed(node, job_id) < at_least:
        assert node.job(job_id)["State"] in ("Pending", "Running"), node.job(job_id)
        assert time.monotonic() < deadline, f"job {job_id}: no progress after {timeout} s"
        time.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def requests_of(proxy: FaultProxy, method: str, prefix: str, start: int = 0) -> list:
    return [e for e in proxy.exchanges[start:] if e.method == method and e.path.startswith(prefix)]


def pull_area(pair: Pair, job_id: str) -> Path:
    return pair.tmp_path / "a" / "storage" / ".transfers" / "pull" / job_id


def push_transactions(pair: Pair) -> list[str]:
    folder = pair.tmp_path / "b" / "storage" / ".transfers" / "push"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def stored(node: Node) -> int:
    return node.statistics()["CountInstances"]


def test_pause_and_resume_a_running_pull(tmp_path, storage_section):
    with proxied_pair(tmp_path, storage_section) as (proxy, pair):
        uploaded = pair.b.upload(dataset("3.1.1"))
        buckets = 2 * len(uploaded)
        job_id = pair.a.start("pull", "b-proxy", study(uploaded), "gzip")["ID"]
        wait_for_progress(pair.a, job_id, 6)

        assert action(pair.a, job_id, "pause") == 200
        job = pair.a.wait(job_id, timeout=10, states=("Paused",))
        done_at_pause = job["Content"]["CompletedHttpQueries"]
        assert done_at_pause < buckets, "the pull ended before the pause"
        time.sleep(0.5)  # requests already sent when the pause came have reached the proxy
        seen = len(requests_of(proxy, "GET", CHUNKS))
        time.sleep(1.0)
        assert len(requests_of(proxy, "GET", CHUNKS)) == seen, "chunk requests while paused"
        job = pair.a.job(job_id)
        assert job["State"] == "Paused"
        assert job["Content"]["CompletedHttpQueries"] == done_at_pause
        assert pull_area(pair, job_id).is_dir()  # kept for the resume
        assert stored(pair.a) == 0
        assert action(pair.a, job_id, "pause") == 200  # pausing a paused job: no-op
        assert pair.a.job(job_id)["State"] == "Paused"

        assert action(pair.a, job_id, "resume") == 200
        job = pair.a.wait(job_id, timeout=20)
        assert job["State"] == "Success", job
        assert job["Content"]["CompletedHttpQueries"] == buckets

        per_bucket = Counter(e.target for e in requests_of(proxy, "GET", CHUNKS))
        assert len(per_bucket) == buckets
        again = [t for t, n in per_bucket.items() if n > 1]
        assert len(again) <= THREADS, again  # only the ones interrupted by the pause
        assert sum(per_bucket.values()) <= buckets + THREADS
        assert proxy.count("POST", "/transfers/lookup") == 1  # resumed, not restarted
        assert pair.a.md5s() == pair.b.md5s()
        assert pair.a.statistics() == pair.b.statistics()
        assert not pull_area(pair, job_id).exists()


def test_cancel_a_running_pull_then_resubmit_it(tmp_path, storage_section):
    with proxied_pair(tmp_path, storage_section) as (proxy, pair):
        uploaded = pair.b.upload(dataset("3.2.1"))
        buckets = 2 * len(uploaded)
        job_id = pair.a.start("pull", "b-proxy", study(uploaded), "none")["ID"]
        wait_for_progress(pair.a, job_id, 4)
        assert pull_area(pair, job_id).is_dir()

        assert action(pair.a, job_id, "cancel") == 200
        job = pair.a.wait(job_id, timeout=10)
        assert job["State"] == "Failure", job
        assert job["ErrorCode"] == 37
        assert job["ErrorDescription"] == "This job was canceled"
        wait_until(lambda: not pull_area(pair, job_id).exists(), what="download area removed")
        time.sleep(0.5)
        seen = len(requests_of(proxy, "GET", CHUNKS))
        time.sleep(0.5)
        assert len(requests_of(proxy, "GET", CHUNKS)) == seen, "chunk requests after the cancel"
        assert stored(pair.a) == 0
        assert action(pair.a, job_id, "cancel") == 200  # canceling a finished job: no-op
        assert pair.a.job(job_id)["ErrorCode"] == 37

        cut = len(proxy.exchanges)
        assert action(pair.a, job_id, "resubmit") == 200
        job = pair.a.wait(job_id, timeout=20)
        assert job["State"] == "Success", job
        assert job["ErrorCode"] == 0
        assert job["Content"]["CompletedHttpQueries"] == buckets  # all of them, from scratch
        assert proxy.count("POST", "/transfers/lookup") == 2  # from the lookup again
        assert len({e.target for e in requests_of(proxy, "GET", CHUNKS, start=cut)}) == buckets
        assert pair.a.md5s() == pair.b.md5s()
        assert pair.a.statistics() == pair.b.statistics()
        assert not pull_area(pair, job_id).exists()


def test_cancel_a_running_push_deletes_the_remote_transaction(tmp_path, storage_section):
    with proxied_pair(tmp_path, storage_section) as (proxy, pair):
        uploaded = pair.a.upload(dataset("3.3.1"))
        job_id = pair.a.start("send", "b-proxy", study(uploaded), "gzip")["ID"]
        wait_for_progress(pair.a, job_id, 4)
        assert len(push_transactions(pair)) == 1
        tx = PUSH + push_transactions(pair)[0]

        assert action(pair.a, job_id, "cancel") == 200
        job = pair.a.wait(job_id, timeout=10)
        assert job["State"] == "Failure", job
        assert job["ErrorCode"] == 37
        wait_until(lambda: push_transactions(pair) == [], what="remote transaction deleted")
        assert proxy.count("DELETE", tx) == 1
        assert proxy.count("POST", f"{tx}/commit") == 0
        assert stored(pair.b) == 0


def test_actions_on_finished_and_running_jobs(tmp_path, storage_section):
    with proxied_pair(tmp_path, storage_section) as (_, pair):
        uploaded = pair.b.upload(dataset("3.4.1", ct=8))
        job_id = pair.a.start("pull", "b-proxy", study(uploaded), "gzip")["ID"]
        wait_for_progress(pair.a, job_id, 1)

        assert action(pair.a, job_id, "resume") == 400  # running: only a paused job resumes
        assert action(pair.a, job_id, "resubmit") == 400  # running: only a failed job
        assert pair.a.job(job_id)["State"] == "Running"

        job = pair.a.wait(job_id, timeout=20)
        assert job["State"] == "Success", job
        assert action(pair.a, job_id, "pause") == 200  # finished: no-op
        assert action(pair.a, job_id, "cancel") == 200  # finished: no-op
        assert action(pair.a, job_id, "resubmit") == 400  # only a failed job
        assert action(pair.a, job_id, "resume") == 400
        after = pair.a.job(job_id)
        assert (after["State"], after["ErrorCode"], after["CompletionTime"]) == \
            ("Success", 0, job["CompletionTime"])
        assert stored(pair.a) == len(uploaded)
        for verb in ("pause", "resume", "cancel", "resubmit"):
            assert action(pair.a, "0123-not-a-job", verb) == 400  # as tests/api/test_jobs.py


def test_higher_priority_job_submitted_later_runs_first(tmp_path, storage_section):
    with proxied_pair(tmp_path, storage_section, a={"ConcurrentJobs": 1}) as (proxy, pair):
        first = pair.b.upload(dataset("3.5.1", ct=6))
        low = pair.b.upload(dataset("3.5.2", ct=2))
        high = pair.b.upload(dataset("3.5.3", ct=2))

        first_id = pair.a.start("pull", "b-proxy", study(first), "gzip")["ID"]
        wait_for_progress(pair.a, first_id, 1)
        low_id = pair.a.start("pull", "b-proxy", study(low), "gzip", Priority=0)["ID"]
        high_id = pair.a.start("pull", "b-proxy", study(high), "gzip", Priority=10)["ID"]
        assert pair.a.job(low_id)["State"] == "Pending"
        assert pair.a.job(high_id)["State"] == "Pending"
        assert pair.a.job(high_id)["Priority"] == 10

        pair.a.wait(first_id, timeout=20)
        job = pair.a.wait(high_id, timeout=20, states=("Running", "Success", "Failure"))
        if job["State"] == "Running":  # caught while it runs: the other one must still wait
            assert pair.a.job(low_id)["State"] == "Pending", "two jobs at once, or the wrong one"
        jobs = {i: pair.a.wait(i, timeout=20) for i in (first_id, high_id, low_id)}
        assert all(j["State"] == "Success" for j in jobs.values()), jobs

        def first_chunk(uploaded: list[dict]) -> int:
            ids = {u["ID"] for u in uploaded}
            return min(n for n, e in enumerate(proxy.exchanges)
                       if e.path.startswith(CHUNKS) and e.path[len(CHUNKS):].split(".")[0] in ids)

        assert first_chunk(first) < first_chunk(high) < first_chunk(low)
        assert jobs[first_id]["CompletionTime"] < jobs[high_id]["CompletionTime"] < jobs[low_id]["CompletionTime"]
        assert stored(pair.a) == len(first) + len(low) + len(high)
