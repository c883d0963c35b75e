"""OverwriteInstances under contention: many uploads of one instance at once, through the app.

Each upload stages its own file and replaces the previous copy; the store's blocking work runs in
worker threads, so the commits, publications and removals of the replaced files really interleave.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from accelerator.api.app import create_app, open_store
from accelerator.store.area import STAGING
from accelerator.store.storage import FileSystemStorage
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

pytestmark = pytest.mark.anyio

ROUNDS = 12
UPLOADS = 50


def _instance_files(root) -> set[str]:
    """Every file of the storage area outside staging (index files and folders excluded)."""
    return {p.name for p in root.rglob("*") if p.is_file() and len(p.name) == 36 and STAGING not in p.parts}


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compressed"])
async def test_parallel_overwrites_of_one_instance(make_config, compression):
    config = make_config({"OverwriteInstances": True, "StorageCompression": compression})
    store = open_store(config)
    versions = [make_instance(sop_uid="1.2.826.0.77", InstanceNumber=n) for n in range(1, UPLOADS + 1)]
    try:
        async with asgi_client(create_app(config, store), timeout=120) as client:
            for round_ in range(ROUNDS):
                answers = await asyncio.wait_for(asyncio.gather(*(
                    client.post("/instances", content=data) for data in versions)), 120)
                failed = [(a.status_code, a.text[:300]) for a in answers if a.status_code != 200]
                assert not failed, f"round {round_}: {len(failed)} failed, first: {failed[0]}"
                assert {a.json()["Status"] for a in answers} == {"Success"}
                instance = answers[0].json()["ID"]
                attachment = store.attachment(instance)
                assert set(store.area.storage.list()) == {attachment.uuid}, f"round {round_}"
                assert not store.area.storage.staged(), f"round {round_}"
                assert not list(store.area.work.iterdir()), f"round {round_}"
                if isinstance(store.area.storage, FileSystemStorage):
                    assert _instance_files(store.area.storage.root) == {attachment.uuid}, f"round {round_}"
                assert store.index.trash() == []
                stored = (await client.get(f"/instances/{instance}/file")).content
                assert hashlib.md5(stored).hexdigest() == attachment.md5
                assert stored in versions
                assert store.statistics()["instances"] == 1
    finally:
        store.close()
