"""Orthanc's `/attachments/{name}/info` and `/verify-md5`, and our `GET /storage`, in process, on
the file system, on object storage and in HybridMode (a real S3 server: SeaweedFS)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import obstore
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.config import config_from_dict
from accelerator.store.hybrid import HybridStorage
from accelerator.store.storage import FILE_SYSTEM, OBJECT_STORAGE, FileSystemStorage, Storage
from tests.conftest import asgi_client, object_storage_section
from tests.dicom_data import make_instance

pytestmark = pytest.mark.anyio

LAYOUTS = ("file-system", "object-storage", "hybrid")
INFO_KEYS = {"Uuid", "ContentType", "UncompressedSize", "UncompressedMD5", "CompressedSize", "CompressedMD5",
             "Storage"}


class Daemon:
    def __init__(self, client, store, options: dict[str, Any]):
        self.client, self.store, self.options = client, store, options

    async def upload(self, count: int) -> list[tuple[str, bytes]]:
        uploaded = []
        for i in range(count):
            data = make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1234.3.{i + 1}")
            answer = await self.client.post("/instances", content=data)
            assert answer.status_code == 200, answer.text
            uploaded.append((answer.json()["ID"], data))
        return uploaded

    async def info(self, instance: str, name: str = "dicom") -> dict[str, Any]:
        answer = await self.client.get(f"/instances/{instance}/attachments/{name}/info")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def side(self, kind: str) -> Storage:
        storage = self.store.area.storage
        return storage.side(kind) if isinstance(storage, HybridStorage) else storage


def corrupt(side: Storage, uuid: str) -> None:
    """Flip one byte of a stored attachment, in place, on that side."""
    if isinstance(side, FileSystemStorage):
        path = side.path_of(uuid)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        data = bytearray(side.read(uuid))
        data[len(data) // 2] ^= 0xFF
        obstore.put(side.store, side.key(uuid), bytes(data))


def copy_to(target: Storage, uuid: str, data: bytes) -> None:
    target.stage(uuid, data)
    target.publish(uuid)


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


def options_for(layout: str, tmp_path, request, **extra) -> dict[str, Any]:
    options: dict[str, Any] = {"StorageDirectory": str(tmp_path / "storage"), **extra}
    if layout != "file-system":
        s3 = request.getfixturevalue("s3_server")
        mode = "WriteToFileSystem" if layout == "hybrid" else "Disabled"
        options.update(object_storage_section(s3, hybrid_mode=mode))
    return options


@pytest.fixture
async def daemon(layout, tmp_path, request) -> AsyncIterator[Daemon]:
    compression = getattr(request, "param", False)
    options = options_for(layout, tmp_path, request, StorageCompression=compression)
    config = config_from_dict(options)
    store = open_store(config)
    try:
        async with asgi_client(create_app(config, store)) as client:
            yield Daemon(client, store, options)
    finally:
        store.close()


def written_side(layout: str) -> str:
    return OBJECT_STORAGE if layout == "object-storage" else FILE_SYSTEM


# -- info --------------------------------------------------------------------------------------

async def test_info_has_orthancs_fields_and_the_sides(daemon, layout):
    [(instance, data)] = await daemon.upload(1)
    info = await daemon.info(instance)
    assert set(info) == INFO_KEYS
    md5 = hashlib.md5(data).hexdigest()
    assert info["ContentType"] == 1
    assert info["UncompressedSize"] == info["CompressedSize"] == len(data)
    assert info["UncompressedMD5"] == info["CompressedMD5"] == md5
    assert info["Storage"] == [written_side(layout)]
    assert daemon.side(written_side(layout)).read(info["Uuid"]) == data
    answer = await daemon.client.get(f"/instances/{instance}/attachments/dicom/info")
    assert answer.headers["ETag"] == f'"0-{md5}"'  # Orthanc's "<revision>-<md5>"
    assert await daemon.info(instance, "1") == info  # an attachment's index is its name too
    assert await daemon.info(instance, "01") == info


@pytest.mark.parametrize("layout", ["file-system"], indirect=True)
async def test_names_and_ids_orthanc_does_not_know(daemon):
    [(instance, _)] = await daemon.upload(1)
    study = (await daemon.client.get(f"/instances/{instance}/study")).json()["ID"]
    client = daemon.client

    answer = await client.get(f"/instances/{instance}/attachments/DICOM/info")  # names are case-sensitive
    assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 7  # InexistentItem
    for name in ("2", "dicom-as-json", "1024"):  # known names, but no such attachment here
        answer = await client.get(f"/instances/{instance}/attachments/{name}/info")
        assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17, name
        answer = await client.post(f"/instances/{instance}/attachments/{name}/verify-md5")
        assert (answer.status_code, answer.content) == (400, b""), name
    answer = await client.get("/instances/nope/attachments/dicom/info")
    assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17
    answer = await client.post("/instances/nope/attachments/dicom/verify-md5")
    assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17
    # a study has no DICOM attachment: 404 for info; verify-md5 answers nothing, i.e. a bare 400
    answer = await client.get(f"/studies/{study}/attachments/dicom/info")
    assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17
    answer = await client.post(f"/studies/{study}/attachments/dicom/verify-md5")
    assert (answer.status_code, answer.content) == (400, b"")
    answer = await client.get(f"/instances/{instance}/attachments/dicom/verify-md5")
    assert answer.status_code == 405


# -- verify-md5 --------------------------------------------------------------------------------

@pytest.mark.parametrize("daemon", [False, True], indirect=True, ids=["plain", "compressed"])
async def test_verify_md5_passes_then_fails_on_a_flipped_byte(daemon, layout):
    (first, data), (second, _) = await daemon.upload(2)
    for instance in (first, second):
        answer = await daemon.client.post(f"/instances/{instance}/attachments/dicom/verify-md5")
        assert (answer.status_code, answer.json()) == (200, {})
    info = await daemon.info(first)
    if daemon.options["StorageCompression"]:
        assert info["CompressedSize"] != info["UncompressedSize"] == len(data)
        assert info["CompressedMD5"] != info["UncompressedMD5"]
    corrupt(daemon.side(written_side(layout)), info["Uuid"])
    answer = await daemon.client.post(f"/instances/{first}/attachments/dicom/verify-md5")
    assert (answer.status_code, answer.content) == (400, b"")  # Orthanc: a POST that answered nothing
    answer = await daemon.client.post(f"/instances/{second}/attachments/1/verify-md5")
    assert (answer.status_code, answer.json()) == (200, {})


async def test_verify_md5_of_vanished_bytes_is_corrupted_file(daemon, layout):
    [(instance, _)] = await daemon.upload(1)
    info = await daemon.info(instance)
    daemon.side(written_side(layout)).remove(info["Uuid"])
    assert (await daemon.info(instance))["Storage"] == []
    answer = await daemon.client.post(f"/instances/{instance}/attachments/dicom/verify-md5")
    assert answer.status_code == 500 and answer.json()["OrthancStatus"] == 20


# -- /storage ----------------------------------------------------------------------------------

async def test_storage_summary_and_counts(daemon, layout):
    await daemon.upload(3)
    summary = (await daemon.client.get("/storage")).json()
    expected_sides = {"file-system": {FILE_SYSTEM}, "object-storage": {OBJECT_STORAGE},
                      "hybrid": {FILE_SYSTEM, OBJECT_STORAGE}}[layout]
    assert set(summary["Sides"]) == expected_sides
    assert summary["WriteTo"] == written_side(layout)
    assert summary["HybridMode"] == {"hybrid": "WriteToFileSystem"}.get(layout, "Disabled")
    assert summary["StorageCompression"] is False
    assert "CountInstances" not in summary and all("Count" not in s for s in summary["Sides"].values())
    if FILE_SYSTEM in expected_sides:
        assert summary["Sides"][FILE_SYSTEM]["Root"] == str((daemon.side(FILE_SYSTEM).root).resolve())
    if OBJECT_STORAGE in expected_sides:
        section = daemon.options["AwsS3Storage"]
        side = summary["Sides"][OBJECT_STORAGE]
        assert side["Bucket"] == section["BucketName"] and side["Endpoint"] == section["Endpoint"]
        assert side["StorageStructure"] == "flat" and side["Backend"] == "AWS S3 storage"
        text = (await daemon.client.get("/storage?count")).text
        assert section["SecretKey"] not in text and section["AccessKey"] not in text

    counted = (await daemon.client.get("/storage", params={"count": ""})).json()
    assert counted["CountInstances"] == 3
    assert {k: s["Count"] for k, s in counted["Sides"].items()} == {
        k: (3 if k == written_side(layout) else 0) for k in expected_sides}
    assert "CountInstances" not in (await daemon.client.get("/storage?count=false")).json()


@pytest.mark.parametrize("layout", ["hybrid"], indirect=True)
async def test_hybrid_sides_of_each_attachment(daemon):
    (both, data), (moved, moved_data), (local, _) = await daemon.upload(3)
    fs, objects = daemon.side(FILE_SYSTEM), daemon.side(OBJECT_STORAGE)
    both_uuid = (await daemon.info(both))["Uuid"]
    moved_uuid = (await daemon.info(moved))["Uuid"]
    copy_to(objects, both_uuid, data)
    copy_to(objects, moved_uuid, moved_data)
    fs.remove(moved_uuid)

    assert (await daemon.info(both))["Storage"] == [FILE_SYSTEM, OBJECT_STORAGE]  # primary first
    assert (await daemon.info(moved))["Storage"] == [OBJECT_STORAGE]
    assert (await daemon.info(local))["Storage"] == [FILE_SYSTEM]
    counted = (await daemon.client.get("/storage?count")).json()
    assert {k: s["Count"] for k, s in counted["Sides"].items()} == {FILE_SYSTEM: 2, OBJECT_STORAGE: 2}
    assert counted["CountInstances"] == 3
    for instance in (both, moved, local):  # a read falls back to the other side: so does the check
        answer = await daemon.client.post(f"/instances/{instance}/attachments/dicom/verify-md5")
        assert answer.status_code == 200, instance

    corrupt(objects, moved_uuid)  # the only copy
    answer = await daemon.client.post(f"/instances/{moved}/attachments/dicom/verify-md5")
    assert (answer.status_code, answer.content) == (400, b"")
    corrupt(objects, both_uuid)  # not the copy a read gets (the file system is the primary side)
    answer = await daemon.client.post(f"/instances/{both}/attachments/dicom/verify-md5")
    assert answer.status_code == 200
