"""Orthanc's /peers routes (accelerator.api.peers): listing against the real Orthanc's answer
(capture 01-plugins-and-peers), /system through the peer client, and /peers/{name}/store to a
plain Orthanc look-alike (one POST /instances per instance: the OrthancPeerStore job) in process,
and to a second daemon that speaks the transfers protocol (our PushTransfer job), on loopback."""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from accelerator.api.app import create_app, open_store
from accelerator.config import config_from_dict
from accelerator.peers import Peers
from tests.conftest import asgi_client
from tests.dicom_data import make_instance
from tests.transfers.pair import Pair
from tests.wire_samples import exchange

pytestmark = pytest.mark.anyio

PLAIN_URL = "http://plain.invalid:8042/"
AUTH = "Basic " + base64.b64encode(b"alice:secret").decode()
UNKNOWN_ID = "00000000-00000000-00000000-00000000-00000000"


class PlainOrthanc:
    """An Orthanc without the transfers plugin: /plugins, /system and POST /instances (Basic
    auth alice/secret). `failures` answers 503 to that many uploads first; `broken` to all."""

    def __init__(self) -> None:
        self.stored: dict[str, bytes] = {}  # MD5 -> DICOM bytes, as received (decompressed)
        self.encodings: list[str] = []
        self.failures = 0
        self.broken = False

    def app(self) -> Starlette:
        def authorized(request: Request) -> bool:
            return request.headers.get("authorization") == AUTH

        async def plugins(request: Request) -> Response:
            return JSONResponse(["explorer.js"]) if authorized(request) else Response(status_code=401)

        async def system(request: Request) -> Response:
            return JSONResponse({"Name": "plain", "Version": "1.12.4"}) if authorized(request) \
                else Response(status_code=401)

        async def instances(request: Request) -> Response:
            if not authorized(request):
                return Response(status_code=401)
            if self.broken or self.failures > 0:
                self.failures -= 1
                return Response(status_code=503)
            body = await request.body()
            encoding = request.headers.get("content-encoding", "")
            self.encodings.append(encoding)
            data = gzip.decompress(body) if encoding == "gzip" else body
            self.stored[hashlib.md5(data).hexdigest()] = data
            return JSONResponse({"ID": "x", "Path": "/instances/x", "Status": "Success"})

        return Starlette(routes=[Route("/plugins", plugins), Route("/system", system),
                                 Route("/instances", instances, methods=["POST"])])


@pytest.fixture
async def site(tmp_path) -> AsyncIterator[tuple]:
    plain = PlainOrthanc()
    config = config_from_dict({
        "StorageDirectory": str(tmp_path / "storage"),
        "OrthancPeers": {
            "plain": {"Url": PLAIN_URL, "Username": "alice", "Password": "secret"},
            "plain-headers": {"Url": PLAIN_URL, "HttpHeaders": {"Authorization": AUTH, "X-Site": "a"}},
            "unreachable": {"Url": "http://127.0.0.1:9/"},
        },
        "Transfers": {"PeerConnectivityTimeout": 2},
    })
    transport = httpx.ASGITransport(app=plain.app())
    peers = Peers(config, backoff_base=0.005, backoff_cap=0.02,
                  transport_factory=lambda peer: transport if peer.url == PLAIN_URL else None)
    store = open_store(config)
    app = create_app(config, store, peers_=peers)
    async with asgi_client(app) as client, app.state.jobs.running():
        yield client, plain, store
    await peers.aclose()
    store.close()


async def _upload(client, files: list[bytes]) -> list[dict]:
    answers = [await client.post("/instances", content=data) for data in files]
    assert all(a.status_code == 200 for a in answers)
    return [a.json() for a in answers]


def _study(n: int, study: str = "1.2.3") -> list[bytes]:
    return [make_instance(patient_id="P1", study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.{i}")
            for i in range(n)]


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def test_peers_listing_matches_a_real_orthanc(tmp_path):
    recorded = exchange("01-plugins-and-peers", 11)
    peers = {"b": {"Url": "http://127.0.0.1:8043/"},
             "b-bidir": {"RemoteSelf": "a", "Url": "http://127.0.0.1:8043/"},
             "b-bidir-via-proxy": {"RemoteSelf": "a-via-proxy", "Url": "http://127.0.0.1:18043/"},
             "b-via-proxy": {"Url": "http://127.0.0.1:18043/"},
             "plain": {"Password": "orthanctest", "Url": "http://127.0.0.1:15001/", "Username": "alice"},
             "unreachable": {"Url": "http://127.0.0.1:9/"}}
    config = config_from_dict({"StorageDirectory": str(tmp_path / "s"), "OrthancPeers": peers})
    store = open_store(config)
    try:
        async with asgi_client(create_app(config, store)) as client:
            answer = await client.get(recorded.target)
            assert answer.status_code == recorded.status
            assert answer.json() == recorded.response_json()  # exactly the real Orthanc's
            assert (await client.get("/peers")).json() == sorted(peers)
    finally:
        store.close()


async def test_peer_operations_configuration_and_errors(site):
    client, _, _ = site
    assert (await client.get("/peers/plain")).json() == ["configuration", "store", "store-straight", "system"]
    assert (await client.get("/peers/plain-headers/configuration")).json() == {
        "HttpHeaders": ["Authorization", "X-Site"], "Pkcs11": False, "Timeout": 0, "Url": PLAIN_URL}
    for path in ("/peers/nope", "/peers/nope/configuration", "/peers/nope/system"):
        answer = await client.get(path)
        assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17, path
    assert (await client.delete("/peers/plain")).status_code == 405


async def test_peer_system_goes_through_the_peer_client(site):
    client, _, _ = site
    answer = await client.get("/peers/plain/system")
    assert answer.status_code == 200 and answer.json() == {"Name": "plain", "Version": "1.12.4"}
    assert (await client.get("/peers/plain-headers/system")).json()["Name"] == "plain"  # its own headers
    answer = await client.get("/peers/unreachable/system")
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == 9
    assert "unreachable" in answer.json()["Details"]


async def test_store_to_a_plain_orthanc_sends_each_instance_synchronously(site):
    client, plain, _ = site
    files = _study(3) + _study(1, "9.9")
    uploaded = await _upload(client, files)
    study = uploaded[0]["ParentStudy"]
    answer = await client.post("/peers/plain/store", json=[study])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "Compress": False, "Description": "REST API", "FailedInstancesCount": 0, "InstancesCount": 3,
        "ParentResources": [study], "Peer": [PLAIN_URL, "alice", ""],
        "Size": str(sum(len(f) for f in files[:3])), "SizeMB": 0}
    assert set(plain.stored) == {_md5(f) for f in files[:3]}
    assert plain.encodings == ["", "", ""]
    jobs = (await client.get("/jobs?expand")).json()
    assert [(j["Type"], j["State"]) for j in jobs] == [("OrthancPeerStore", "Success")]


async def test_store_accepts_orthancs_body_forms(site):
    client, plain, _ = site
    files = _study(2)
    uploaded = await _upload(client, files)
    instance, series = uploaded[0]["ID"], uploaded[1]["ParentSeries"]
    assert (await client.post("/peers/plain/store", content=f" {instance}\n")).json()["InstancesCount"] == 1
    assert (await client.post("/peers/plain/store", json=instance)).json()["ParentResources"] == [instance]
    answer = await client.post("/peers/plain/store", json={"Resources": [series], "Compress": True})
    assert answer.json()["Compress"] is True and answer.json()["InstancesCount"] == 2
    assert plain.encodings[-2:] == ["gzip", "gzip"]
    assert set(plain.stored) == {_md5(f) for f in files}
    created = (await client.post("/peers/plain/store", json={"Resources": [series], "Asynchronous": True})).json()
    assert set(created) == {"ID", "Path"} and created["Path"] == f"/jobs/{created['ID']}"
    job = await _wait(client, created["ID"])
    assert job["State"] == "Success" and job["Type"] == "OrthancPeerStore" and job["Content"]["InstancesCount"] == 2
    nothing = (await client.post("/peers/plain/store", json=[])).json()
    assert nothing["InstancesCount"] == 0 and "ParentResources" not in nothing
    headers = (await client.post("/peers/plain-headers/store", json=[series])).json()
    assert headers["Peer"] == {"HttpHeaders": {"Authorization": None, "X-Site": None}, "Pkcs11": False,
                               "Url": PLAIN_URL}


async def _wait(client, job_id: str) -> dict:
    import anyio

    with anyio.fail_after(30):
        while (job := (await client.get(f"/jobs/{job_id}")).json())["State"] not in ("Success", "Failure"):
            await anyio.sleep(0.02)
    return job


async def test_store_retries_as_the_peer_client_does_and_counts_retries(site):
    client, plain, _ = site
    uploaded = await _upload(client, _study(1))
    plain.failures = 2  # two 503 answers, then success (MaxHttpRetries is 3)
    answer = await client.post("/peers/plain/store", json=[uploaded[0]["ID"]])
    assert answer.status_code == 200 and answer.json()["FailedInstancesCount"] == 0
    metrics = (await client.get("/tools/metrics-prometheus")).text
    retries = {s.labels["peer"]: s.value for f in text_string_to_metric_families(metrics)
               if f.name == "accelerator_peer_http_retries" for s in f.samples if s.name.endswith("_total")}
    assert retries["plain"] >= 2


async def test_store_failures(site):
    client, plain, _ = site
    uploaded = await _upload(client, _study(2))
    study = uploaded[0]["ParentStudy"]
    plain.broken = True
    answer = await client.post("/peers/plain/store", json=[study])
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == 9
    assert "503" in answer.json()["Details"]
    permissive = await client.post("/peers/plain/store", json={"Resources": [study], "Permissive": True})
    assert permissive.status_code == 200 and permissive.json()["FailedInstancesCount"] == 2
    answer = await client.post("/peers/unreachable/store", json=[study])  # not a transfers peer: per instance
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == 9


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, 15),
    (b"42", 400, 15),
    (b"[42]", 400, 15),
    (b'["not-an-orthanc-id"]', 400, 15),
    (b'{"Compress": true}', 400, 15),
    (b'{"Resources": "x"}', 400, 15),
    (f'["{UNKNOWN_ID}"]'.encode(), 404, 17),
])
async def test_store_bad_requests(site, body, status, code):
    client, plain, _ = site
    answer = await client.post("/peers/plain/store", content=body)
    assert answer.status_code == status and answer.json()["OrthancStatus"] == code, answer.text
    assert not plain.stored


async def test_store_bad_options_and_unknown_peer(site):
    client, _, _ = site
    study = (await _upload(client, _study(1)))[0]["ParentStudy"]
    for options, status in (({"Compress": "yes"}, 400), ({"Transcode": "1.2.840.10008.1.2.4.50"}, 400),
                            ({"Priority": "high"}, 400), ({"Asynchronous": 1}, 400), ({"Permissive": "no"}, 400)):
        answer = await client.post("/peers/plain/store", json={"Resources": [study], **options})
        assert answer.status_code == status, options
    answer = await client.post("/peers/nope/store", json=[study])
    assert answer.status_code == 404 and "nope" in answer.json()["Details"]
    assert (await client.get("/peers/plain/store")).status_code == 405


async def test_store_straight(site):
    client, plain, _ = site
    data = _study(1)[0]
    answer = await client.post("/peers/plain/store-straight", content=data)
    assert answer.status_code == 200 and answer.json()["Status"] == "Success"
    assert _md5(data) in plain.stored


@pytest.mark.slow
def test_store_to_a_transfers_peer_is_a_push(tmp_path):
    """Daemon A stores to daemon B (which speaks the transfers protocol): a PushTransfer job."""
    files = _study(5) + [make_instance(patient_id="P1", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="big",
                                       source="CT_small.dcm")]
    with Pair(tmp_path) as pair:
        uploaded = pair.a.upload(files)
        study = uploaded[0]["ParentStudy"]
        answer = pair.a.http.post("/peers/b/store", json=[study])
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["InstancesCount"] == 6 and body["FailedInstancesCount"] == 0 and body["Compress"] is True
        assert body["Peer"] == [f"http://127.0.0.1:{pair.port_b}/"] and body["Size"] == str(sum(map(len, files)))
        assert pair.b.md5s() == pair.a.md5s()
        assert [j["Type"] for j in pair.a.http.get("/jobs?expand").json()] == ["PushTransfer"]
        created = pair.a.http.post("/peers/b-bidir/store", json={"Resources": [study], "Asynchronous": True,
                                                                 "Compress": False}).json()
        job = pair.a.wait(created["ID"])
        assert job["State"] == "Success" and job["Type"] == "PushTransfer" and job["Content"]["Compression"] == "none"

        def metrics(node) -> dict:
            text = node.http.get("/tools/metrics-prometheus").text
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(text) for s in f.samples}

        b = metrics(pair.b)
        assert b[("orthanc_transfers_created_push_count", ())] == 2
        assert b[("orthanc_transfers_committed_push_count", ())] == 2
        assert b[("orthanc_transfers_push_total_received_bytes_count", ())] > 0
        assert b[("orthanc_count_instances", ())] == 6
        a = metrics(pair.a)
        assert a[("accelerator_transfer_bytes_total", (("direction", "sent"), ("transfer", "push")))] > 0
        assert a[("accelerator_jobs", (("state", "Success"), ("type", "PushTransfer")))] == 2
        assert a[("accelerator_transfer_buckets_in_flight", (("transfer", "push"),))] == 0
