"""Transfers through a fault-injecting proxy: two real daemons (one pair for the module, emptied
before each test), A reaching B only through the proxy (peer `b-proxy`). A pulls from B (route
`pull`) and pushes to B (route `send`).

(a) transient faults (dropped connections, 503, short stalls, truncated or flipped answers, lost
    answers, corrupted request bodies) are retried: the job succeeds, the receiver ends with
    byte-identical instances and the same /statistics as the sender, and the proxy's records show
    every fault and its successful retry;
(b) a bucket that fails every time fails the job (ErrorCode 1) with ErrorDetails naming the peer,
    the request and the cause, and the receiver keeps nothing (download area / remote
    transaction removed);
(c) flipped bytes that only the MD5 check can see: a pull fetches the bad instances' buckets
    again; a push whose PUT body was corrupted fails at commit with clear details.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.harness import free_port
from tests.dicom_data import make_instance
from tests.faultproxy import Fault, FaultProxy
from tests.transfers.pair import Pair

pytestmark = pytest.mark.slow

RETRIES = 2  # Transfers.MaxHttpRetries: 3 attempts per request
OPTIONS = {"HttpTimeout": 10, "Transfers": {"BucketSize": 16, "MaxHttpRetries": RETRIES}}
CHUNKS = "/transfers/chunks/"
PUSH = "/transfers/push/"
COMPRESSIONS = ["gzip", "none"]


# -- helpers -----------------------------------------------------------------------------------

def dataset(study: str, ct: int = 12, mr: int = 4) -> list[bytes]:
    """`ct` CT instances of 39 kB (two buckets each at BucketSize 16 KiB) and `mr` MR instances of
    10 kB (grouped two per bucket), all in one study."""
    files = [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.1",
                           sop_uid=f"{study}.1.{i}", source="CT_small.dcm", InstanceNumber=i)
             for i in range(ct)]
    files += [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.2",
                            sop_uid=f"{study}.2.{i}", InstanceNumber=i) for i in range(mr)]
    return files


def no_fault(method: str, path: str, attempt: int) -> None:
    return None


@pytest.fixture(scope="module")
def shared(tmp_path_factory, daemon_storage) -> Iterator[tuple[FaultProxy, Pair]]:
    """One proxy in front of B (B's port chosen first) and one pair for the module; A's peer
    `b-proxy` goes through the proxy."""
    port_b = free_port()
    with FaultProxy(f"http://127.0.0.1:{port_b}", no_fault) as proxy, \
            Pair(tmp_path_factory.mktemp("faults"), a=OPTIONS, b=OPTIONS, proxy_url=proxy.url,
                 port_b=port_b, storage=daemon_storage) as pair:
        yield proxy, pair


@pytest.fixture
def proxied_pair(shared) -> Iterator[Callable[[Callable], tuple[FaultProxy, Pair]]]:
    """`proxied_pair(rule)`: both daemons emptied, no push transaction left on B, the proxy's
    records cleared and its rule set."""
    proxy, pair = shared
    proxy.rule = no_fault
    for node in (pair.a, pair.b):
        for patient in node.http.get("/patients").json():
            assert node.http.delete(f"/patients/{patient}").status_code == 200
        assert_empty(node)
    wait_until(lambda: push_transactions(pair) == [], what="no push transaction left on B")

    def use(rule: Callable) -> tuple[FaultProxy, Pair]:
        proxy.reset()
        proxy.rule = rule
        return proxy, pair

    yield use
    proxy.rule = no_fault


def study_of(uploaded: list[dict]) -> list[dict]:
    return [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}]


class FirstTimeFaults:
    """The rule: the first request of each new `method` path under `prefix` gets the next fault
    of `kinds` (in turn); `extra(method, path, attempt)` may fault other requests."""

    def __init__(self, method: str, prefix: str, kinds: list[Fault | None],
                 extra: Callable[[str, str, int], Fault | None] = lambda *_: None):
        self.method, self.prefix, self.kinds, self.extra = method, prefix, kinds, extra
        self.assigned: dict[str, Fault | None] = {}

    def __call__(self, method: str, path: str, attempt: int) -> Fault | None:
        if method == self.method and path.startswith(self.prefix) and attempt == 1:
            fault = self.kinds[len(self.assigned) % len(self.kinds)]
            self.assigned[path] = fault
            return fault
        return self.extra(method, path, attempt)


def assert_faults_retried(proxy: FaultProxy, expected_kinds: set[str]) -> None:
    """Every fault kind happened, and every failed request (same target: bucket paths can be
    shared by the buckets of one split instance, the query tells them apart) was later answered
    200 without a fault; a stalled one was simply answered late."""
    faults = [e for e in proxy.exchanges if e.fault is not None]
    assert {e.fault.kind for e in faults} == expected_kinds, proxy.faults()
    for bad in faults:
        if bad.fault.kind == "stall":  # slower, not failed: answered, and not asked again
            assert bad.sent_status == 200
            assert sum(e.target == bad.target for e in proxy.exchanges) == 1, bad.target
            continue
        retried = [e for e in proxy.exchanges if e.method == bad.method and e.target == bad.target
                   and e.fault is None and e.sent_status == 200 and e.attempt > bad.attempt]
        assert retried, f"{bad.fault.kind} on {bad.method} {bad.target} was never retried with success"


def requests_of(proxy: FaultProxy, method: str, prefix: str) -> list:
    return [e for e in proxy.exchanges if e.method == method and e.path.startswith(prefix)]


def wait_until(predicate: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def pull_area(pair: Pair, job_id: str) -> Path:
    return pair.tmp_path / "a" / "storage" / ".transfers" / "pull" / job_id


def push_transactions(pair: Pair) -> list[str]:
    folder = pair.tmp_path / "b" / "storage" / ".transfers" / "push"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


EMPTY = {"CountInstances": 0, "CountPatients": 0, "CountSeries": 0, "CountStudies": 0}


def assert_empty(node) -> None:
    stats = node.statistics()
    assert {k: stats[k] for k in EMPTY} == EMPTY, stats
    assert stats["TotalDiskSize"] == "0", stats


# -- (a) transient faults are retried ----------------------------------------------------------

@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_pull_survives_transient_faults(proxied_pair, compression):
    kinds = [Fault.drop(), Fault.status(503), Fault.stall(0.3), Fault.truncate(0.5), Fault.flip(3),
             Fault.drop(after_upstream=True), None]
    lookup_503 = lambda m, p, a: Fault.status(503) if (m, p, a) == ("POST", "/transfers/lookup", 1) else None
    rule = FirstTimeFaults("GET", CHUNKS, kinds, extra=lookup_503)
    proxy, pair = proxied_pair(rule)
    uploaded = pair.b.upload(dataset("1.3.1"))
    job = pair.a.transfer("pull", "b-proxy", study_of(uploaded), compression)

    assert job["State"] == "Success", job
    assert pair.a.md5s() == pair.b.md5s()
    assert len(pair.a.md5s()) == len(uploaded)
    assert pair.a.statistics() == pair.b.statistics()
    assert_faults_retried(proxy, {"drop", "status", "stall", "truncate", "flip"})
    assert proxy.count("POST", "/transfers/lookup") == 2  # the 503, then the good one
    buckets = {e.target for e in requests_of(proxy, "GET", CHUNKS)}
    assert len(buckets) == 12 * 2 + 4 // 2
    assert job["Content"]["CompletedHttpQueries"] >= len(buckets)
    assert not pull_area(pair, job["ID"]).exists()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_push_survives_transient_faults(proxied_pair, compression):
    kinds = [Fault.drop(), Fault.status(503), Fault.stall(0.3), Fault.truncate(0.5),
             Fault.drop(after_upstream=True), None]
    expected = {"drop", "status", "stall", "truncate"}
    if compression == "gzip":  # a corrupted gzip body is refused by the receiver (500): retried
        kinds.insert(4, Fault.corrupt_request(3))
        expected.add("corrupt_request")

    def extra(method, path, attempt):
        if attempt == 1 and method == "POST" and path == "/transfers/push":
            return Fault.status(503)
        if attempt == 1 and method == "POST" and path.endswith("/commit"):
            return Fault.drop()  # before B sees it: the commit is simply sent again
        return None

    rule = FirstTimeFaults("PUT", PUSH, kinds, extra=extra)
    proxy, pair = proxied_pair(rule)
    uploaded = pair.a.upload(dataset("1.3.2"))
    job = pair.a.transfer("send", "b-proxy", study_of(uploaded), compression)

    assert job["State"] == "Success", job
    assert pair.b.md5s() == pair.a.md5s()
    assert len(pair.b.md5s()) == len(uploaded)
    assert pair.b.statistics() == pair.a.statistics()
    assert_faults_retried(proxy, expected)
    assert proxy.count("POST", "/transfers/push") == 2  # one transaction: the 503 made none
    puts = requests_of(proxy, "PUT", PUSH)
    assert len({e.path for e in puts}) == 12 * 2 + 4 // 2
    commits = [e for e in proxy.exchanges if e.method == "POST" and e.path.endswith("/commit")]
    assert [e.sent_status for e in commits] == [None, 200]
    assert push_transactions(pair) == []


def test_push_commit_answer_lost(proxied_pair):
    """B commits, but its answer is lost: the retried commit meets 404 (the transaction is gone
    because it was committed). The data is on B; the job must not report a failure for it."""
    def rule(method, path, attempt):
        if method == "POST" and path.endswith("/commit") and attempt == 1:
            return Fault.drop(after_upstream=True)
        return None

    proxy, pair = proxied_pair(rule)
    uploaded = pair.a.upload(dataset("1.3.3", ct=2, mr=2))
    job = pair.a.transfer("send", "b-proxy", study_of(uploaded), "gzip")

    assert pair.b.md5s() == pair.a.md5s()  # B did commit everything
    commits = [(e.upstream_status, e.sent_status) for e in proxy.exchanges if e.path.endswith("/commit")]
    assert commits[0] == (200, None)
    assert job["State"] == "Success", (job, commits)


# -- (b) a bucket that always fails ------------------------------------------------------------

PERMANENT = {  # fault on every request of the victim -> words expected in ErrorDetails
    "503": (lambda: Fault.status(503), ["HTTP 503", f"failed after {RETRIES + 1} attempts"]),
    "drop": (lambda: Fault.drop(), ["connection", f"failed after {RETRIES + 1} attempts"]),
    "truncate": (lambda: Fault.truncate(0.5), ["connection", f"failed after {RETRIES + 1} attempts"]),
    "404": (lambda: Fault.status(404, b'{"Message": "gone"}'), ["HTTP 404", "failed after 1 attempt:"]),
}


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("kind", list(PERMANENT))
def test_pull_fails_cleanly_when_a_bucket_always_fails(proxied_pair, compression, kind):
    make_fault, words = PERMANENT[kind]
    victim: list[str] = []  # the chunk path of one CT instance (its two buckets)

    def rule(method, path, attempt):
        return make_fault() if method == "GET" and victim and path == victim[0] else None

    proxy, pair = proxied_pair(rule)
    uploaded = pair.b.upload(dataset("1.4.1", ct=6, mr=2))
    victim.append(CHUNKS + uploaded[3]["ID"])
    job = pair.a.wait(pair.a.start("pull", "b-proxy", study_of(uploaded), compression)["ID"])

    assert job["State"] == "Failure", job
    assert job["ErrorCode"] == 1
    assert job["ErrorDescription"] == "Error encountered within the plugin engine"
    details = job["ErrorDetails"]
    for word in ["'b-proxy'", "GET bucket", victim[0], *words]:
        assert word in details, details
    attempts = {}
    for e in requests_of(proxy, "GET", victim[0]):
        attempts[e.target] = attempts.get(e.target, 0) + 1
    assert max(attempts.values()) == (1 if kind == "404" else RETRIES + 1), attempts
    assert_empty(pair.a)
    wait_until(lambda: not pull_area(pair, job["ID"]).exists(), what="download area removed")


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("kind", ["503", "drop"])
def test_push_fails_cleanly_when_a_bucket_always_fails(proxied_pair, compression, kind):
    make_fault, words = PERMANENT[kind]

    def rule(method, path, attempt):
        return make_fault() if method == "PUT" and path.startswith(PUSH) and path.endswith("/3") else None

    proxy, pair = proxied_pair(rule)
    uploaded = pair.a.upload(dataset("1.4.2", ct=6, mr=2))
    job = pair.a.wait(pair.a.start("send", "b-proxy", study_of(uploaded), compression)["ID"])

    assert job["State"] == "Failure", job
    assert job["ErrorCode"] == 1
    details = job["ErrorDetails"]
    for word in ["'b-proxy'", "PUT bucket 3", *words]:
        assert word in details, details
    created = [e for e in proxy.exchanges if (e.method, e.path) == ("POST", "/transfers/push")]
    assert len(created) == 1
    tx = next(e.path for e in requests_of(proxy, "PUT", PUSH)).rsplit("/", 1)[0]
    assert proxy.count("PUT", f"{tx}/3") == RETRIES + 1
    wait_until(lambda: proxy.count("DELETE", tx) == 1, what="DELETE of the remote transaction")
    wait_until(lambda: push_transactions(pair) == [], what="transaction removed on B")
    assert proxy.count("POST", f"{tx}/commit") == 0
    assert_empty(pair.b)


# -- (c) corruption only the MD5 can see -------------------------------------------------------

def test_pull_refetches_instances_whose_md5_fails(proxied_pair):
    """compression none: flipped bytes keep the size, only the MD5 check sees them. Both buckets
    of every CT instance (one chunk path each) are flipped the first time."""
    def rule(method, path, attempt):
        return Fault.flip(5) if method == "GET" and path.startswith(CHUNKS) and attempt <= 2 else None

    proxy, pair = proxied_pair(rule)
    uploaded = pair.b.upload(dataset("1.5.1", ct=8, mr=0))
    job = pair.a.transfer("pull", "b-proxy", study_of(uploaded), "none")

    assert job["State"] == "Success", job
    assert pair.a.md5s() == pair.b.md5s()
    assert pair.a.statistics() == pair.b.statistics()
    gets = requests_of(proxy, "GET", CHUNKS)
    per_bucket: dict[str, list] = {}
    for e in gets:
        per_bucket.setdefault(e.target, []).append(e)
    assert len(per_bucket) == 16
    for target, seen in per_bucket.items():  # flipped once, fetched again once
        assert [e.fault.kind if e.fault else None for e in seen] == ["flip", None], target
    assert job["Content"]["CompletedHttpQueries"] == 32


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_pull_gives_up_when_a_bucket_is_always_corrupt(proxied_pair, compression):
    """Every answer for one CT instance (two buckets) has a flipped byte. gzip: its CRC tells at
    once and the bucket is fetched again, then the job fails; none: only the MD5 check tells,
    the instance's buckets are fetched again twice, then the job fails."""
    victim: list[str] = []

    def rule(method, path, attempt):
        return Fault.flip(1) if method == "GET" and victim and path == victim[0] else None

    proxy, pair = proxied_pair(rule)
    uploaded = pair.b.upload(dataset("1.5.2", ct=4, mr=0))
    victim.append(CHUNKS + uploaded[1]["ID"])
    job = pair.a.wait(pair.a.start("pull", "b-proxy", study_of(uploaded), compression)["ID"])

    assert job["State"] == "Failure", job
    assert job["ErrorCode"] == 1
    details = job["ErrorDetails"]
    per_bucket: dict[str, int] = {}
    for e in requests_of(proxy, "GET", victim[0]):
        per_bucket[e.target] = per_bucket.get(e.target, 0) + 1
    if compression == "gzip":
        words = ["'b-proxy'", "bucket", "is corrupt", "payload"]
        assert max(per_bucket.values()) == RETRIES + 1, per_bucket
    else:
        words = ["'b-proxy'", "MD5", uploaded[1]["ID"]]
        assert list(per_bucket.values()) == [3, 3], per_bucket  # first fetch + 2 re-fetches
    for word in words:
        assert word in details, details
    assert_empty(pair.a)
    wait_until(lambda: not pull_area(pair, job["ID"]).exists(), what="download area removed")


def test_push_resends_the_buckets_a_failed_commit_names(proxied_pair):
    """compression none: B cannot tell a corrupted PUT body (same size) until the commit's MD5
    check. The commit's 500 names the bad instance; the push driver sends its bucket again and
    commits again, in the same transaction, and B ends with byte-identical instances."""
    def rule(method, path, attempt):
        if method == "PUT" and path.startswith(PUSH) and path.endswith("/3") and attempt == 1:
            return Fault.corrupt_request(3)
        return None

    proxy, pair = proxied_pair(rule)
    uploaded = pair.a.upload(dataset("1.5.3", ct=4, mr=2))
    job = pair.a.wait(pair.a.start("send", "b-proxy", study_of(uploaded), "none")["ID"])

    assert ("PUT", "corrupt_request") in {(m, k) for m, _, _, k in proxy.faults()}
    assert job["State"] == "Success", job
    tx = next(e.path for e in requests_of(proxy, "PUT", PUSH)).rsplit("/", 1)[0]
    # Sent again after the refused commit; once more at most when the bucket re-sent with it
    # completed the instance first and its background check ran with the bad bytes still in.
    assert proxy.count("PUT", f"{tx}/3") in (2, 3)
    assert proxy.count("POST", f"{tx}/commit") == proxy.count("PUT", f"{tx}/3")
    assert proxy.count("POST", "/transfers/push") == 1  # same transaction
    assert pair.b.md5s() == {u["ID"]: pair.a.md5s()[u["ID"]] for u in uploaded}
    wait_until(lambda: push_transactions(pair) == [], what="transaction removed on B")
