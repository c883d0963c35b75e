"""What a pull writes while it runs: its plan once (131,072 buckets for 1 TiB), then one line of
the `LandedLog` per bucket, instead of the whole plan rewritten to the index after every bucket.
(Resuming from the log after kill -9 is tests/transfers/test_restart.py.)"""

from __future__ import annotations

import anyio
import orjson
import pytest

from accelerator.api.app import create_app, open_store
from bench.harness import Daemon
from tests.conftest import asgi_client
from tests.transfers.pair import Node
from tests.transfers.test_restart import dataset

pytestmark = pytest.mark.anyio


async def test_a_pull_saves_its_plan_once_not_after_every_bucket(make_config, tmp_path):
    """40 buckets from a real daemon: the job's row is written a handful of times (Running, the
    plan, Success), not once per bucket; the instances arrive intact."""
    with Daemon({}, tmp_path / "b") as b_daemon:
        b = Node(b_daemon)
        uploaded = b.upload(dataset("2.9.1"))
        config = make_config({"OrthancPeers": {"b": {"Url": b.url}},
                              "Transfers": {"BucketSize": 16, "Threads": 2, "AdaptiveBucketSize": False}})
        store = open_store(config)
        writes: list[dict] = []
        update_job = store.index.update_job

        def spy(job_id: str, state: str, record: bytes) -> None:
            writes.append(orjson.loads(record))
            update_job(job_id, state, record)

        store.index.update_job = spy
        app = create_app(config, store)
        try:
            async with app.state.jobs.running(), asgi_client(app) as client:
                created = await client.post("/transfers/pull", json={
                    "Resources": [{"Level": "Study", "ID": uploaded[0]["ParentStudy"]}], "Peer": "b",
                    "Compression": "gzip"})
                with anyio.fail_after(30):
                    while (job := (await client.get(created.json()["Path"])).json())["State"] not in (
                            "Success", "Failure"):
                        await anyio.sleep(0.05)
                assert job["State"] == "Success", job
                assert job["Content"]["CompletedHttpQueries"] == 40
                assert sorted((await client.get("/instances")).json()) == sorted(u["ID"] for u in uploaded)
        finally:
            await app.state.peers.aclose()
            store.close()
            b.close()
    with_plan = [w for w in writes if w["checkpoint"] is not None]
    assert len(writes) <= 4 and len(with_plan) <= 2, [w["progress"] for w in writes]
    assert len(with_plan[0]["checkpoint"]["buckets"]) == 40
