"""kill -9 of the daemon that drives a transfer, in mid-transfer, then a restart on the same
storage: the job resumes by itself from its checkpoint and completes, without asking again for
the buckets that had landed before the kill (the proxy in front of B counts every request), and
the receiver ends with byte-identical instances, each stored once.

A reaches B only through a proxy (peer `b-proxy`) that stalls every bucket request, so the
transfer is clearly half-way when A is killed.
"""

from __future__ import annotations

import os
import signal
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
CT_COUNT = 20  # 39 kB each: two buckets at BucketSize 16 KiB, so 40 buckets
BUCKETS = 2 * CT_COUNT
STALL = 0.15  # seconds per bucket request: 40 buckets / 2 workers = 3 s
OPTIONS = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 2, "Threads": THREADS}}
CHUNKS = "/transfers/chunks/"
PUSH = "/transfers/push/"


def dataset(study: str) -> list[bytes]:
    return [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.1",
                          sop_uid=f"{study}.1.{i}", source="CT_small.dcm", InstanceNumber=i)
            for i in range(CT_COUNT)]


@contextmanager
def proxied_pair(tmp_path: Path, rule: Callable, storage: Callable[[], dict]) -> Iterator[tuple[FaultProxy, Pair]]:
    port_b = free_port()
    with FaultProxy(f"http://127.0.0.1:{port_b}", rule) as proxy, \
            Pair(tmp_path, a=OPTIONS, b=OPTIONS, proxy_url=proxy.url, port_b=port_b, storage=storage) as pair:
        yield proxy, pair


def stall_all(method: str, prefix: str):
    def rule(m, path, attempt):
        return Fault.stall(STALL) if m == method and path.startswith(prefix) else None
    return rule


def completed(node: Node, job_id: str) -> int:
    return node.job(job_id)["Content"].get("CompletedHttpQueries", 0)


def wait_for_progress(node: Node, job_id: str, at_least: int, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while (done := completed(node, job_id)) < at_least:
        assert node.job(job_id)["State"] == "Running", node.job(job_id)
        assert time.monotonic() < deadline, f"job {job_id}: only {done} buckets after {timeout} s"
        time.sleep(0.02)
    return done


def kill_a(pair: Pair) -> None:
    """SIGKILL A's whole process group (as a crash would)."""
    old = pair.a.daemon
    os.killpg(old.pid, signal.SIGKILL)
    old.proc.wait(10)
    assert old.proc.returncode == -signal.SIGKILL
    pair.a.close()


def restart_a(pair: Pair) -> Node:
    """A new daemon on A's configuration, port and storage."""
    return pair.start_a()


def requests_of(proxy: FaultProxy, method: str, prefix: str, start: int = 0, end: int | None = None) -> list:
    return [e for e in proxy.exchanges[start:end] if e.method == method and e.path.startswith(prefix)]


def test_pull_resumes_after_kill_9_without_fetching_finished_buckets(tmp_path, storage_section):
    with proxied_pair(tmp_path, stall_all("GET", CHUNKS), storage_section) as (proxy, pair):
        uploaded = pair.b.upload(dataset("2.1.1"))
        job_id = pair.a.start("pull", "b-proxy", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}], "gzip")["ID"]

        done_before = wait_for_progress(pair.a, job_id, BUCKETS // 2 - 4)
        kill_a(pair)
        time.sleep(2 * STALL)  # requests in flight at the kill reach the proxy before the cut
        cut = len(proxy.exchanges)  # every request after this one comes from the new daemon
        a = restart_a(pair)
        assert done_before < BUCKETS - 8, "the transfer was not mid-way at the kill"

        job = a.wait(job_id, timeout=30)
        assert job["State"] == "Success", job
        assert job["Content"]["CompletedHttpQueries"] == BUCKETS  # checkpoint + the rest, once each

        before = Counter(e.target for e in requests_of(proxy, "GET", CHUNKS, end=cut))
        after = Counter(e.target for e in requests_of(proxy, "GET", CHUNKS, start=cut))
        assert len(before | after) == BUCKETS
        assert all(n == 1 for n in before.values()), before  # no fault: one request per bucket
        assert all(n == 1 for n in after.values()), after
        again = set(before) & set(after)  # only the buckets in flight at the kill
        assert len(again) <= THREADS, again
        assert len(after) <= BUCKETS - done_before + THREADS
        assert proxy.count("POST", "/transfers/lookup") == 1  # resumed from the checkpoint

        assert a.md5s() == pair.b.md5s()
        assert a.statistics() == pair.b.statistics()  # each instance stored once
        assert not (tmp_path / "a" / "storage" / ".transfers" / "pull" / job_id).exists()


def test_push_resumes_after_kill_9_without_resending_finished_buckets(tmp_path, storage_section):
    with proxied_pair(tmp_path, stall_all("PUT", PUSH), storage_section) as (proxy, pair):
        uploaded = pair.a.upload(dataset("2.1.2"))
        job_id = pair.a.start("send", "b-proxy", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}], "gzip")["ID"]

        done_before = wait_for_progress(pair.a, job_id, BUCKETS // 2 - 4)
        kill_a(pair)
        time.sleep(2 * STALL)
        cut = len(proxy.exchanges)
        a = restart_a(pair)
        assert done_before < BUCKETS - 8, "the transfer was not mid-way at the kill"
        transactions = sorted(p.name for p in (tmp_path / "b" / "storage" / ".transfers" / "push").iterdir())
        assert len(transactions) == 1  # B keeps the transaction meanwhile

        job = a.wait(job_id, timeout=30)
        assert job["State"] == "Success", job
        assert job["Content"]["CompletedHttpQueries"] == BUCKETS

        tx = f"{PUSH}{transactions[0]}"
        before = Counter(e.path for e in requests_of(proxy, "PUT", tx + "/", end=cut))
        after = Counter(e.path for e in requests_of(proxy, "PUT", tx + "/", start=cut))
        assert set(before | after) == {f"{tx}/{i}" for i in range(BUCKETS)}
        assert all(n == 1 for n in before.values()), before
        assert all(n == 1 for n in after.values()), after
        again = set(before) & set(after)
        assert len(again) <= THREADS, again
        assert len(after) <= BUCKETS - done_before + THREADS
        assert proxy.count("POST", "/transfers/push") == 1  # the same transaction, resumed
        assert proxy.count("POST", f"{tx}/commit") == 1

        assert pair.b.md5s() == a.md5s()
        assert pair.b.statistics() == a.statistics()
        assert list((tmp_path / "b" / "storage" / ".transfers" / "push").iterdir()) == []
