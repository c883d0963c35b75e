"""Indexes written by each earlier schema version of ours (tests/store/fixtures/schema-vN, made
by the code of the commit that wrote that version: see the fixtures' README) upgrade in place
and keep every resource, attachment, metadata, label and job."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.config import config_from_dict, load_config
from accelerator.store import Store, schema
from accelerator.store.index import INDEX_FILE
from protocol.errors import IndexVersionError
from protocol.resources import Level
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = sorted(int(p.name.removeprefix("schema-v")) for p in FIXTURES.glob("schema-v*"))


def test_a_fixture_for_every_earlier_version():
    assert VERSIONS == list(range(1, schema.SCHEMA_VERSION))


def _copy(version: int, tmp_path: Path) -> tuple[Path, dict]:
    storage = tmp_path / "storage"
    shutil.copytree(FIXTURES / f"schema-v{version}", storage)
    expected = json.loads((storage / "expected.json").read_text())
    (storage / "expected.json").unlink()
    assert expected["schema_version"] == version
    return storage, expected


def _version(storage: Path) -> int:
    conn = sqlite3.connect(storage / INDEX_FILE)
    try:
        return schema.version_of(conn)
    finally:
        conn.close()


def _check_everything_kept(store: Store, expected: dict) -> None:
    index = store.index
    for level in Level:
        assert sorted(index.list_ids(level)) == expected["levels"][level.name], level
    assert len(expected["levels"]["INSTANCE"]) == 8
    assert any(i["compressed"] for i in expected["instances"].values())
    for public_id, info in expected["instances"].items():
        attachment = index.attachment(public_id)
        assert (attachment.uuid, attachment.size, attachment.md5, attachment.stored_size,
                attachment.stored_md5, attachment.compressed) == (
            info["uuid"], info["size"], info["md5"], info["stored_size"], info["stored_md5"],
            info["compressed"])
        data = store.read_file(public_id)
        assert len(data) == info["size"]
        assert hashlib.md5(data).hexdigest() == info["md5"] == attachment.md5
        assert index.metadata(index.resource(Level.INSTANCE, public_id)) == info["metadata"]
    labelled = {}
    for level in Level:
        for public_id in index.list_ids(level):
            labels = index.labels(index.resource(level, public_id))
            if labels:
                labelled[public_id] = labels
    assert labelled == expected["labels"]
    assert [list(j[:4]) for j in index.jobs()] == expected["jobs"]


@pytest.mark.parametrize("version", VERSIONS)
def test_refused_without_upgrade_untouched(version, tmp_path):
    storage, _ = _copy(version, tmp_path)
    before = (storage / INDEX_FILE).read_bytes()
    with pytest.raises(IndexVersionError, match=r"accelerator serve --upgrade"):
        Store(storage)
    assert _version(storage) == version
    assert (storage / INDEX_FILE).read_bytes() == before


@pytest.mark.anyio
@pytest.mark.parametrize("version", VERSIONS)
async def test_upgrade_keeps_every_resource(version, tmp_path):
    storage, expected = _copy(version, tmp_path)
    config = config_from_dict({"StorageDirectory": str(storage)})
    store = open_store(config, upgrade=True)
    try:
        assert _version(storage) == schema.SCHEMA_VERSION
        _check_everything_kept(store, expected)
        async with asgi_client(create_app(config, store)) as client:
            answer = await client.get("/changes")
            assert answer.status_code == 200
            assert answer.json()["Changes"] == []  # the log starts at the upgrade
            study = expected["levels"]["STUDY"][0]
            assert (await client.get(f"/studies/{study}")).status_code == 200
            new = make_instance(patient_id="AFTER-UPGRADE", study_uid="1.2.826.0.1.3680043.10.1234.99.1",
                                series_uid="1.2.826.0.1.3680043.10.1234.99.2",
                                sop_uid="1.2.826.0.1.3680043.10.1234.99.3")
            posted = await client.post("/instances", content=new)
            assert posted.status_code == 200, posted.text
            new_id = posted.json()["ID"]
            changes = (await client.get("/changes")).json()["Changes"]
            assert {"ChangeType": "NewInstance", "ID": new_id} in [
                {k: c[k] for k in ("ChangeType", "ID")} for c in changes]
            assert (await client.get(f"/instances/{new_id}/file")).content == new
            stats = (await client.get("/statistics")).json()
            assert stats["CountInstances"] == 9 and stats["CountPatients"] == 3
        study_level = expected["levels"]["STUDY"][0]
        store.index.set_label(Level.STUDY, study_level, "after-upgrade", True)
        assert "after-upgrade" in store.index.all_labels()
    finally:
        store.close()
    reopened = Store(storage)  # now opens without --upgrade
    try:
        assert len(reopened.index.list_ids(Level.INSTANCE)) == 9
    finally:
        reopened.close()


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_serve_upgrade_through_the_command_line(version, tmp_path):
    """`accelerator serve --upgrade CONFIG` as a process: refused without --upgrade, then
    answers with every instance of the old index, byte-identical."""
    from bench.harness import Daemon, DaemonError

    storage, expected = _copy(version, tmp_path)
    with pytest.raises(DaemonError, match="exited with code 2") as error:
        Daemon({"StorageDirectory": str(storage)}, tmp_path / "refused").start()
    assert "accelerator serve --upgrade" in str(error.value)
    assert _version(storage) == version
    with Daemon({"StorageDirectory": str(storage)}, tmp_path / "daemon", args=("--upgrade",)) as daemon:
        url = daemon.url
        assert httpx.get(f"{url}/system").json()["DatabaseVersion"] == schema.SCHEMA_VERSION
        assert sorted(httpx.get(f"{url}/patients").json()) == expected["levels"]["PATIENT"]
        assert sorted(httpx.get(f"{url}/studies").json()) == expected["levels"]["STUDY"]
        assert sorted(httpx.get(f"{url}/series").json()) == expected["levels"]["SERIES"]
        assert sorted(httpx.get(f"{url}/instances").json()) == expected["levels"]["INSTANCE"]
        for public_id, info in expected["instances"].items():
            data = httpx.get(f"{url}/instances/{public_id}/file").content
            assert hashlib.md5(data).hexdigest() == info["md5"]
        assert httpx.get(f"{url}/changes").status_code == 200
    assert _version(storage) == schema.SCHEMA_VERSION
    store = open_store(load_config(str(tmp_path / "daemon" / "config.json")))
    try:
        _check_everything_kept(store, expected)
    finally:
        store.close()
