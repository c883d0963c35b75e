"""Our pull job against a peer that answers exactly what the real plugin answered (03a-03d).

The mock peer only knows the recorded exchanges, so the job must ask for exactly the chunk URIs
the plugin asked for (same bucket plan, same URL-length rule with the recorded peer URL), and our
store must end with the dataset's instances, byte for byte.
"""

from __future__ import annotations

import hashlib

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api.app import create_app, open_store
from accelerator.peers import Peers
from tests.conftest import asgi_client
from tests.wire_samples import dataset, exchanges

pytestmark = pytest.mark.anyio

SCENARIOS = {  # folder -> BucketSize (KiB) of the capture
    "03a-pull-64k-gzip": 64,
    "03b-pull-64k-none": 64,
    "03c-pull-4m-small-none": 4096,
    "03d-pull-4m-large-gzip": 4096,
}
RECORDED_PEER_URL = "http://127.0.0.1:18043/"  # peer b-via-proxy of the capture


def _normalise(target: str) -> str:
    return "/" + target.lstrip("/")


def recorded_peer(folder: str) -> tuple[Starlette, list[str]]:
    """An app answering the recorded plugin-originated requests; unknown ones get 404."""
    answers = {}
    for ex in exchanges(folder):
        if ex.record["channel"] == "a-b":
            content_type = ex.response_header("Content-Type")
            answers[(ex.method, _normalise(ex.target))] = (ex.status, ex.response_body(), content_type)
    asked: list[str] = []

    async def answer(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        asked.append(f"{request.method} {target}")
        found = answers.get((request.method, _normalise(target)))
        if found is None:
            return Response(b"not recorded", status_code=404)
        status, body, content_type = found
        return Response(body, status_code=status, media_type=content_type)

    app = Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])
    return app, asked


@pytest.mark.parametrize("folder", list(SCENARIOS))
async def test_pull_from_the_recorded_plugin_stores_identical_instances(folder, make_config, tmp_path_factory):
    records = exchanges(folder)
    out = tmp_path_factory.getbasetemp() / "wire-samples-dataset"
    manifest = dataset(str(out))
    query = records[0].record["request"]["body"]["json"]  # the client's POST /transfers/pull
    peer_app, asked = recorded_peer(folder)
    config = make_config({"Transfers": {"BucketSize": SCENARIOS[folder], "MaxHttpRetries": 0,
                                        "AdaptiveBucketSize": False},
                          "OrthancPeers": {"b": {"Url": RECORDED_PEER_URL}}})
    store = open_store(config)
    peers = Peers(config, transport_factory=lambda peer: httpx.ASGITransport(app=peer_app))
    app = create_app(config, store, peers_=peers)
    async with app.state.jobs.running(), asgi_client(app) as client:
        created = await client.post("/transfers/pull", json=dict(query, Peer="b"))
        assert created.status_code == 200, created.text
        with anyio.fail_after(60):
            while (job := (await client.get(f"/jobs/{created.json()['ID']}")).json())["State"] not in (
                    "Success", "Failure"):
                await anyio.sleep(0.05)
        assert job["State"] == "Success", (job, asked)
        recorded_gets = sorted(_normalise(e.target) for e in records
                               if e.record["channel"] == "a-b" and e.method == "GET")
        assert sorted(a.split(" ", 1)[1] for a in asked if a.startswith("GET")) == recorded_gets
        stored = {i: hashlib.md5((await client.get(f"/instances/{i}/file")).content).hexdigest()
                  for i in (await client.get("/instances")).json()}
    store.close()
    lookup = next(e for e in records if e.record["channel"] == "a-b" and e.method == "POST")
    expected_ids = {i["ID"] for i in lookup.response_json()["Instances"]}
    expected = {f["orthanc"]["instance"]: f["md5"] for f in manifest["files"]
                if f["orthanc"]["instance"] in expected_ids}
    assert stored == expected and len(expected) == len(expected_ids)
