"""A full disk, for real: small tmpfs mounts as the storage area or the index of an in-process app.

An upload that meets a full disk answers what Orthanc answers (507, FullStorage = 14) without a
traceback, leaves no partial file and no index change, and once space is freed the next upload
succeeds without a restart.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from accelerator.api.app import create_app, open_store
from protocol.resources import Level
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"),
]

FILLER = "filler"
PAGE = 4096  # tmpfs counts its size in pages


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size) -> a fresh tmpfs folder under tmp_path, unmounted at teardown."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "4m") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], timeout=30).returncode:
            subprocess.run(["umount", "-l", str(folder)], check=True, timeout=30)


def _fill(folder: Path, room: int = 0) -> Path:
    """Fill the filesystem of `folder` but `room` bytes (rounded up to pages); returns the file
    whose removal frees it."""
    filler = folder / FILLER
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        for _ in range(1000):  # at most 64 MiB: far above the mounts here
            try:
                f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        else:
            raise AssertionError(f"{folder} never filled")
    pages = -(-filler.stat().st_size // PAGE) - -(-room // PAGE)
    os.truncate(filler, pages * PAGE)
    return filler


def _instance(n: int) -> bytes:
    return make_instance(sop_uid=f"1.2.826.0.99.{n}", InstanceNumber=n)


async def _upload(client, data: bytes, streamed: bool):
    """POST /instances; `streamed` sends it chunked (no length), which takes the file path."""
    if not streamed:
        return await client.post("/instances", content=data)

    async def chunks():
        for start in range(0, len(data), 16384):
            yield data[start : start + 16384]

    return await client.post("/instances", content=chunks())


def _state(store) -> tuple:
    """Every path of the storage area (but the filler) and what the index holds."""
    root = store.area.storage.root
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != FILLER)
    return paths, store.statistics(), store.index.list_ids(Level.INSTANCE), store.index.trash()


def _assert_full_storage(answer) -> None:
    assert answer.status_code == 507, answer.text
    body = answer.json()
    assert (body["HttpStatus"], body["OrthancStatus"]) == (507, 14)
    assert (body["HttpError"], body["Message"]) == ("Insufficient Storage", "The file storage is full")
    assert "Traceback" not in body["Details"] and len(body["Details"]) < 200, body["Details"]


async def _fail_then_recover(store, client, full_folder: Path, streamed: bool, room: int = 0) -> None:
    """Fill `full_folder` but `room` bytes, check that two uploads fail cleanly, free the space,
    check that the next upload succeeds."""
    assert (await _upload(client, _instance(1), streamed)).status_code == 200
    filler = _fill(full_folder, room)
    before = _state(store)
    for n in (2, 3):
        _assert_full_storage(await _upload(client, _instance(n), streamed))
        assert _state(store) == before
    filler.unlink()
    answer = await _upload(client, _instance(2), streamed)
    assert answer.status_code == 200 and answer.json()["Status"] == "Success", answer.text
    assert store.statistics()["instances"] == 2
    assert (await client.get(f"/instances/{answer.json()['ID']}/file")).content == _instance(2)


@pytest.mark.parametrize("room", ["none", "body"])
@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compressed"])
@pytest.mark.file_system_only
async def test_full_storage_area(make_config, mount_tmpfs, streamed, compression, room):
    """The index shares the mount. With room for the body only, the write that fails is a later
    one: the compressed copy of a streamed body, or the index's commit."""
    storage = mount_tmpfs("storage")
    config = make_config({"StorageDirectory": str(storage), "StorageCompression": compression})
    store = open_store(config)
    try:
        async with asgi_client(create_app(config, store)) as client:
            room_bytes = len(_instance(2)) if room == "body" else 0
            await _fail_then_recover(store, client, storage, streamed, room_bytes)
    finally:
        store.close()


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.file_system_only
async def test_full_index(make_config, mount_tmpfs, streamed):
    """The file is staged, then SQLite answers "database or disk is full": nothing is stored."""
    index = mount_tmpfs("index", "1m")
    config = make_config({"IndexDirectory": str(index)})
    store = open_store(config)
    try:
        async with asgi_client(create_app(config, store)) as client:
            await _fail_then_recover(store, client, index, streamed)
    finally:
        store.close()
