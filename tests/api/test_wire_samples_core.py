"""Replay of the core Orthanc API exchanges captured from a real Orthanc (folder 08)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest

from accelerator.api.app import create_app, open_store
from tests.conftest import asgi_client
from tests.wire_samples import assert_json_matches, dataset, exchange, exchanges

FOLDER = "08-core-orthanc-api"
POSTED = "small/p1-study1/series2-mr/mr12.dcm"


@pytest.fixture
def dataset_dir(tmp_path_factory) -> Path:
    exchanges(FOLDER)  # skips when the samples are absent
    out = tmp_path_factory.getbasetemp() / "wire-samples-dataset"
    dataset(str(out))
    return out


@pytest.fixture
async def server_a(make_config, dataset_dir):
    """Our daemon in the state of server A in the capture."""
    config = make_config({"OverwriteInstances": True})
    store = open_store(config)
    manifest = dataset(str(dataset_dir))
    for entry in manifest["files"]:
        if entry["set"] == "small" and entry["file"] != POSTED:
            store.ingest_bytes((dataset_dir / entry["file"]).read_bytes())
    async with asgi_client(create_app(config, store)) as client:
        yield client
    store.close()


async def _replay(client, ex):
    return await client.request(ex.method, ex.target, headers=ex.request_headers(),
                                content=ex.request_body() or None)


@pytest.mark.anyio
async def test_replay_core_exchanges_of_server_a(server_a):
    replayed = 0
    for ex in exchanges(FOLDER):
        if ex.record["channel"] != "client-a":
            continue
        ours = await _replay(server_a, ex)
        assert ours.status_code == ex.status, f"[{ex.seq}] {ex.method} {ex.target}: {ours.text}"
        recorded = ex.response_json()
        if ex.status == 200 and recorded is not None:
            assert ours.headers["content-type"].startswith("application/json")
            assert_json_matches(recorded, orjson.loads(ours.content))
        elif ex.status == 200:
            assert ours.content == ex.response_body(), f"[{ex.seq}] body differs"
            media_type = ours.headers["content-type"].split(";")[0]
            assert media_type == ex.response_header("Content-Type").split(";")[0]
        elif ex.status == 405:
            assert ours.headers["allow"] == ex.response_header("Allow")
            assert ours.content == b""
        elif recorded is not None:  # error JSON: same Orthanc error
            body = orjson.loads(ours.content)
            for key in ("HttpStatus", "OrthancStatus", "Message", "Method", "Uri"):
                assert body[key] == recorded[key], f"[{ex.seq}] {key}"
        replayed += 1
    assert replayed >= 14


@pytest.mark.anyio
async def test_statistics_after_posting_equal_the_capture(server_a):
    await _replay(server_a, exchange(FOLDER, 1))
    ours = (await server_a.get("/statistics")).json()
    assert ours == exchange(FOLDER, 5).response_json()


@pytest.mark.anyio
async def test_already_stored_without_overwrite_like_plain_orthanc(make_config, dataset_dir):
    config = make_config({"OverwriteInstances": False})
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        first, second = exchange(FOLDER, 3), exchange(FOLDER, 4)
        for ex in (first, second):
            ours = await client.post("/instances", content=ex.request_body())
            assert_json_matches(ex.response_json(), ours.json())
        downloaded = await client.get(f"/instances/{ours.json()['ID']}/file")
        assert hashlib.md5(downloaded.content).hexdigest() == first.record["request"]["body"]["md5"]
    store.close()


@pytest.mark.anyio
async def test_401_like_the_plain_server(make_config):
    ex = exchange(FOLDER, 19)
    config = make_config({"AuthenticationEnabled": True, "RegisteredUsers": {"alice": "orthanctest"}})
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        ours = await client.get(ex.target)
        assert ours.status_code == 401
        assert ours.headers["www-authenticate"] == ex.response_header("WWW-Authenticate")
        ok = await client.get(ex.target, auth=("alice", "orthanctest"))
        assert ok.status_code == 200
    store.close()
