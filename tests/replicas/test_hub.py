"""Several replicas behind a round-robin load balancer with no stickiness (HAProxy, a real
PostgreSQL index shared with `Lock: false`, a real S3 bucket shared): any replica serves any
request, and transfers end byte-identical, also when a replica is killed mid-transfer and when
PostgreSQL restarts (issue 13)."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.dicom_data import make_instance
from tests.replicas.cluster import Cluster

pytestmark = pytest.mark.slow

CT_COUNT = 12  # 39 kB each: two buckets each at BucketSize 16 KiB


def dataset(study: str, count: int = CT_COUNT) -> list[bytes]:
    return [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{i}",
                          source="CT_small.dcm", InstanceNumber=i) for i in range(count)]


@pytest.fixture
def cluster(tmp_path, postgres_server, s3_server):
    with Cluster(tmp_path, postgres_server, s3_server) as cluster:
        yield cluster


def buckets_received(url: str) -> int:
    text = httpx.get(f"{url}/tools/metrics-prometheus").text
    found = re.search(r'^accelerator_transfer_buckets_total\{transfer="push-receiver"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def shared_push_objects(cluster: Cluster) -> list[str]:
    import obstore
    from obstore.store import S3Store

    section = cluster.shared["AwsS3Storage"]
    store = S3Store(section["BucketName"], endpoint=section["Endpoint"], access_key_id=section["AccessKey"],
                    secret_access_key=section["SecretKey"], region="us-east-1", client_options={"allow_http": True})
    return [m["path"] for page in obstore.list(store, prefix="transfers/") for m in page]


def test_the_rest_api_answers_the_same_on_every_replica(cluster):
    study = cluster.hub.upload(dataset("7.1"))[0]["ParentStudy"]
    for daemon in cluster.replicas:
        assert len(httpx.get(f"{daemon.url}/studies/{study}/instances").json()) == CT_COUNT


def test_a_push_spread_over_every_replica_ends_byte_identical(cluster):
    uploaded = cluster.sender.upload(dataset("7.2"))
    job = cluster.sender.transfer("send", "hub", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}])
    assert job["State"] == "Success", job
    assert cluster.hub.md5s() == cluster.sender.md5s()
    buckets = job["Content"]["CompletedHttpQueries"]
    received = [buckets_received(d.url) for d in cluster.replicas]
    assert sum(received) == buckets and all(n >= buckets // 3 - 2 for n in received), received  # round robin
    assert shared_push_objects(cluster) == []  # the shared transaction is gone with the commit


def test_a_push_survives_the_death_of_a_replica(cluster):
    uploaded = cluster.sender.upload(dataset("7.3", 40))
    job_id = cluster.sender.start("send", "hub", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}])["ID"]
    deadline = time.monotonic() + 30
    while sum(buckets_received(d.url) for d in cluster.replicas if d) < 20:
        assert time.monotonic() < deadline, cluster.sender.job(job_id)
        time.sleep(0.005)
    assert cluster.hub.statistics()["CountInstances"] == 0  # nothing visible before the commit
    cluster.kill_replica(1)
    job = cluster.sender.wait(job_id, timeout=90)
    assert job["State"] == "Success", job
    assert cluster.hub.md5s() == cluster.sender.md5s()


def test_two_pushes_of_one_study_to_two_replicas_at_once_end_with_one_copy(cluster, tmp_path):
    files = dataset("7.4")
    uploaded = cluster.sender.upload(files)
    resources = [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}]
    jobs = [cluster.sender.start("send", "hub", resources)["ID"] for _ in range(2)]
    assert all(cluster.sender.wait(j, timeout=60)["State"] == "Success" for j in jobs)
    assert cluster.hub.statistics()["CountInstances"] == CT_COUNT
    assert cluster.hub.md5s() == cluster.sender.md5s()


def test_a_push_waits_out_a_postgresql_restart(cluster, postgres_server):
    uploaded = cluster.sender.upload(dataset("7.5", 30))
    job_id = cluster.sender.start("send", "hub", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}])["ID"]
    answers: list[int] = []

    def outage() -> None:
        postgres_server.stop_server()
        try:
            stop = time.monotonic() + 3
            while time.monotonic() < stop:  # each waits up to 5 s for a connection, then 503
                answers.append(httpx.get(f"{cluster.balancer.url}/studies", timeout=30).status_code)
        finally:
            postgres_server.start()

    worker = threading.Thread(target=outage)
    worker.start()
    worker.join(60)
    assert 503 in answers, answers
    job = cluster.sender.wait(job_id, timeout=120)
    assert job["State"] == "Success", job
    assert cluster.hub.md5s() == cluster.sender.md5s()


def pulled_buckets(url: str) -> int:
    text = httpx.get(f"{url}/tools/metrics-prometheus").text
    found = re.search(r'^accelerator_transfer_buckets_total\{transfer="pull"\} (\S+)$', text, re.M)
    return int(float(found.group(1))) if found else 0


def test_a_pull_submitted_through_the_balancer_ends_byte_identical(cluster):
    uploaded = cluster.sender.upload(dataset("7.6"))
    job = cluster.hub.transfer("pull", "sender", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}])
    assert job["State"] == "Success", job  # followed through the balancer: every replica knows it
    assert cluster.hub.md5s() == cluster.sender.md5s()


@pytest.fixture
def slow_cluster(tmp_path, postgres_server, s3_server):
    """The replicas reach the sender through a proxy that stalls every chunk request."""
    from bench.harness import free_port as _free
    from tests.faultproxy import Fault, FaultProxy

    port = _free()

    def stall(method, path, attempt):
        return Fault.stall(0.1) if path.startswith("/transfers/chunks/") else None

    with FaultProxy(f"http://127.0.0.1:{port}", stall) as proxy:
        cluster = Cluster(tmp_path, postgres_server, s3_server, sender_url=proxy.url)
        cluster.sender_port = port
        with cluster:
            yield cluster


def test_a_pull_is_taken_over_when_the_replica_running_it_dies(slow_cluster):
    cluster = slow_cluster
    uploaded = cluster.sender.upload(dataset("7.7", 40))
    job_id = cluster.hub.start("pull", "sender", [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}])["ID"]
    deadline = time.monotonic() + 30
    while not (running := [n for n, d in enumerate(cluster.replicas) if pulled_buckets(d.url) >= 10]):
        assert time.monotonic() < deadline, cluster.hub.job(job_id)
        time.sleep(0.05)
    cluster.kill_replica(running[0])
    job = cluster.hub.wait(job_id, timeout=90)
    assert job["State"] == "Success", job
    assert cluster.hub.md5s() == cluster.sender.md5s()
    assert cluster.hub.statistics()["CountInstances"] == 40  # each stored once
