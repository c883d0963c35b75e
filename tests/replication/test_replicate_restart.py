"""kill -9 of the daemon that runs a replication, in mid-push, then a restart on the same
storage: the job resumes by itself and ends with the target identical (MD5s), without sending
again a bucket that had landed before the kill, nor an instance the target already had.

GA (gateway in front of Orthanc A) reaches GB (gateway in front of Orthanc B) through a proxy
that stalls every bucket PUT, so the kill lands clearly half-way.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import httpx
import pytest

from bench.harness import Daemon, free_port
from tests.dicom_data import make_instance
from tests.faultproxy import Fault, FaultProxy
from tests.replication.test_replicate import md5s, upload

pytestmark = pytest.mark.slow

CT_COUNT = 24  # 39 kB each: two buckets each at BucketSize 16 KiB
BUCKETS = 2 * CT_COUNT
STALL = 0.15  # seconds per bucket PUT: 48 buckets / 2 workers = 3.6 s
OPTIONS = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": 2, "Threads": 2,
                                            "AdaptiveBucketSize": False}}
PUSH = "/transfers/push/"


def bucket_puts(proxy: FaultProxy, start: int = 0, end: int | None = None) -> list:
    return [e for e in proxy.exchanges[start:end] if e.method == "PUT" and e.path.startswith(PUSH)]


def test_a_replication_killed_mid_push_resumes_and_sends_nothing_twice(orthanc_factory, tmp_path):
    a, b = orthanc_factory(name="a"), orthanc_factory(name="b")
    upload(a, [make_instance(patient_id="PK", study_uid="9.1", series_uid="9.1.1", sop_uid=f"9.1.1.{i}",
                             source="CT_small.dcm", InstanceNumber=i) for i in range(CT_COUNT)])
    port_gb, port_ga = free_port(), free_port()

    def stall(method, path, attempt):
        return Fault.stall(STALL) if method == "PUT" and path.startswith(PUSH) else None

    with Daemon({"HttpPort": port_gb, "Gateway": {"Url": b.url}, **OPTIONS}, tmp_path / "gb") as gb, \
            FaultProxy(gb.url, stall) as proxy:
        config = {"HttpPort": port_ga, "OrthancPeers": {"gb": {"Url": proxy.url}}, **OPTIONS}
        ga = Daemon(config, tmp_path / "ga").start()
        try:
            job_id = httpx.post(f"{ga.url}/replicate", json={"Source": a.url, "Target": "gb"}).json()["ID"]
            kill_after = random.Random().randint(6, BUCKETS - 12)  # a point at random, mid-push
            print(f"killing GA after {kill_after} bucket PUTs")
            deadline = time.monotonic() + 30
            while len(bucket_puts(proxy)) < kill_after:
                assert time.monotonic() < deadline, httpx.get(f"{ga.url}/jobs/{job_id}").json()
                time.sleep(0.02)
            os.killpg(ga.pid, signal.SIGKILL)
            ga.proc.wait(10)
            time.sleep(2 * STALL)  # requests in flight at the kill reach the proxy before the cut
            cut = len(proxy.exchanges)
            assert len(bucket_puts(proxy)) < BUCKETS - 8, "the push was not mid-way at the kill"
            ga = Daemon(config, tmp_path / "ga").start()
            deadline = time.monotonic() + 60
            while (job := httpx.get(f"{ga.url}/jobs/{job_id}").json())["State"] not in ("Success", "Failure"):
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
        finally:
            ga.stop()
        assert job["State"] == "Success", job
        assert job["Content"]["Copied"] == CT_COUNT and job["Content"]["Verified"] == CT_COUNT
        before = Counter(e.path for e in bucket_puts(proxy, end=cut))
        after = Counter(e.path for e in bucket_puts(proxy, start=cut))
        assert all(n == 1 for n in before.values()) and all(n == 1 for n in after.values())
        assert len(set(before) & set(after)) <= 2  # only the buckets in flight at the kill
        assert len(before | after) == BUCKETS
        assert proxy.count("POST", "/transfers/push") == 1  # the same transaction, resumed
    assert md5s(b) == md5s(a)
