"""POST /move-storage (the MoveStorage job) in HybridMode, against a real S3 server (SeaweedFS):
both directions, synchronous and asynchronous, Orthanc's errors, a study moved while it is being
read, a missing or corrupt source, and a daemon killed with SIGKILL in mid-move."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import obstore
import pytest
from anyio import to_thread

from accelerator.api.app import create_app
from accelerator.config import config_from_dict
from accelerator.store.index import INDEX_FILE
from accelerator.store.objects import object_name
from accelerator.store.storage import FILE_SYSTEM, OBJECT_STORAGE, FileSystemStorage
from bench.harness import Daemon
from tests.conftest import asgi_client, object_storage_section
from tests.dicom_data import make_instance

STUDY = "1.2.826.0.1.3680043.10.77"


def dataset(count: int, *, study: str = STUDY, big: bool = False) -> list[bytes]:
    """`count` CT instances of 39 kB in one series, and with `big` one of 6 MiB (a multipart
    upload, so its copy is verified by reading it back rather than by its ETag)."""
    files = [make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.1",
                           sop_uid=f"{study}.1.{i}", source="CT_small.dcm", InstanceNumber=i)
             for i in range(count)]
    if big:
        blob = random.Random(7).randbytes(6 * 1024 * 1024)
        files.append(make_instance(patient_id=f"P{study}", study_uid=study, series_uid=f"{study}.2",
                                   sop_uid=f"{study}.2.1", source="CT_small.dcm", EncapsulatedDocument=blob))
    return files


def hybrid_options(tmp_path: Path, s3, mode: str = "WriteToFileSystem") -> dict[str, Any]:
    return {"StorageDirectory": str(tmp_path / "storage"), **object_storage_section(s3, hybrid_mode=mode)}


class Site:
    """An in-process daemon (app, jobs engine and client) on a hybrid storage."""

    def __init__(self, app, client: httpx.AsyncClient):
        self.app, self.client = app, client
        self.store = app.state.store
        hybrid = getattr(self.store.area.storage, "side", None)
        self.fs = hybrid and hybrid(FILE_SYSTEM)
        self.objects = hybrid and hybrid(OBJECT_STORAGE)
        self.expected: dict[str, bytes] = {}  # instance ID -> DICOM bytes

    async def upload(self, files: list[bytes]) -> list[dict]:
        answers = []
        for data in files:
            answer = await self.client.post("/instances", content=data)
            assert answer.status_code == 200, answer.text
            answers.append(answer.json())
            self.expected[answer.json()["ID"]] = data
        return answers

    def uuid(self, instance: str) -> str:
        return self.store.attachment(instance).uuid

    def keys(self) -> set[str]:
        return {meta["path"] for page in obstore.list(self.objects.store) for meta in page}

    def where(self) -> dict[str, list[str]]:
        return {i: self.store.area.storage.where(self.uuid(i)) for i in self.expected}

    async def move(self, resources: list[str], target: str, **extra) -> httpx.Response:
        return await self.client.post("/move-storage", json={"Resources": resources, "TargetStorage": target,
                                                             **extra}, timeout=60)

    async def check_bytes(self) -> None:
        for instance, data in self.expected.items():
            answer = await self.client.get(f"/instances/{instance}/file")
            assert answer.status_code == 200 and answer.content == data, instance


def open_site(options: dict[str, Any]):
    app = create_app(config_from_dict(options))

    class _Running:
        async def __aenter__(self) -> Site:
            self._jobs = app.state.jobs.running()
            await self._jobs.__aenter__()
            self._client = asgi_client(app)
            return Site(app, await self._client.__aenter__())

        async def __aexit__(self, *exc) -> None:
            await self._client.__aexit__(*exc)
            await self._jobs.__aexit__(*exc)
            app.state.store.close()

    return _Running()


@pytest.mark.anyio
async def test_study_moves_to_object_storage_and_back(tmp_path, s3_server):
    async with open_site(hybrid_options(tmp_path, s3_server)) as site:
        uploaded = await site.upload(dataset(6, big=True))
        study, series = uploaded[0]["ParentStudy"], uploaded[0]["ParentSeries"]
        uuids = {i: site.uuid(i) for i in site.expected}
        assert all(w == [FILE_SYSTEM] for w in site.where().values())
        assert site.keys() == set()

        answer = await site.move([study], OBJECT_STORAGE)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"Studies": [study]}  # the plugin's job Content
        assert site.keys() == {object_name(u) for u in uuids.values()}  # Orthanc's names: <uuid>.dcm
        assert list(site.fs.list()) == [] and not any(site.fs.path_of(u).exists() for u in uuids.values())
        await site.check_bytes()

        again = await site.move([study], OBJECT_STORAGE)  # already there: nothing to do
        assert again.status_code == 200 and site.keys() == {object_name(u) for u in uuids.values()}

        big = uploaded[-1]["ID"]
        answer = await site.move([series, big], FILE_SYSTEM)  # levels mixed
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"Series": [series], "Instances": [big]}
        assert site.keys() == set()
        assert sorted(site.fs.list()) == sorted(uuids.values())
        assert {i: site.uuid(i) for i in site.expected} == uuids  # same attachments, same UUIDs
        await site.check_bytes()

        jobs = (await site.client.get("/jobs?expand")).json()
        moves = [j for j in jobs if j["Type"] == "MoveStorage"]
        assert len(moves) == 3 and all(j["State"] == "Success" and j["Progress"] == 100 for j in moves)
        sizes = sum(len(d) for d in site.expected.values())
        by_target = sorted((j["Content"]["TargetStorage"], j["Content"]["MovedInstances"], j["Content"]["MovedBytes"])
                           for j in moves)
        assert by_target == [(FILE_SYSTEM, 7, sizes), (OBJECT_STORAGE, 0, 0), (OBJECT_STORAGE, 7, sizes)]


@pytest.mark.anyio
async def test_asynchronous_move_answers_id_and_path(tmp_path, s3_server):
    async with open_site(hybrid_options(tmp_path, s3_server, "WriteToObjectStorage")) as site:
        uploaded = await site.upload(dataset(5))
        study = uploaded[0]["ParentStudy"]
        assert all(w == [OBJECT_STORAGE] for w in site.where().values())

        answer = await site.move([study], FILE_SYSTEM, Asynchronous=True, Priority=3)
        assert answer.status_code == 200, answer.text
        created = answer.json()
        assert created == {"ID": created["ID"], "Path": f"/jobs/{created['ID']}"}
        job = await site.app.state.jobs.wait(created["ID"])
        job = (await site.client.get(created["Path"])).json()
        assert (job["Type"], job["State"], job["Priority"], job["Progress"]) == ("MoveStorage", "Success", 3, 100)
        assert job["Content"] == {"Studies": [study], "TargetStorage": FILE_SYSTEM, "TotalInstances": 5,
                                  "CompletedInstances": 5, "MovedInstances": 5,
                                  "MovedBytes": sum(len(d) for d in site.expected.values())}
        assert site.keys() == set() and all(w == [FILE_SYSTEM] for w in site.where().values())
        await site.check_bytes()


@pytest.mark.anyio
async def test_bad_requests_get_the_plugins_errors(tmp_path, s3_server):
    async with open_site(hybrid_options(tmp_path, s3_server)) as site:
        study = (await site.upload(dataset(1)))[0]["ParentStudy"]
        client = site.client
        bad_format = [b"not json", b"[]", b"{}", b'{"Resources": "x", "TargetStorage": "file-system"}',
                      b'{"Resources": ["%s"]}' % study.encode(),
                      b'{"Resources": ["%s"], "TargetStorage": "disk"}' % study.encode(),
                      b'{"Resources": [5], "TargetStorage": "file-system"}',
                      b'{"Resources": ["%s"], "TargetStorage": "file-system", "Asynchronous": "yes"}' % study.encode(),
                      b'{"Resources": ["%s"], "TargetStorage": "file-system", "Priority": "high"}' % study.encode()]
        for body in bad_format:
            answer = await client.post("/move-storage", content=body)
            assert (answer.status_code, answer.json()["OrthancStatus"]) == (400, 15), body
        for resources in (["0" * 8], [""], [study, "unknown"], ["unknown", 5]):  # in order, as the plugin
            answer = await site.move(resources, FILE_SYSTEM)
            assert (answer.status_code, answer.json()["OrthancStatus"]) == (404, 17), resources
        answer = await client.get("/move-storage")
        assert answer.status_code == 405 and answer.headers["allow"] == "POST"
        assert (await client.get("/jobs")).json() == []  # no job for a refused request


@pytest.mark.anyio
async def test_without_hybrid_mode_the_route_does_not_exist(tmp_path, s3_server):
    for options in ({"StorageDirectory": str(tmp_path / "fs")},
                    {"StorageDirectory": str(tmp_path / "obj"), **object_storage_section(s3_server)}):
        async with open_site(options) as site:
            study = (await site.client.post("/instances", content=dataset(1)[0])).json()["ParentStudy"]
            answer = await site.client.post("/move-storage", json={"Resources": [study], "TargetStorage": FILE_SYSTEM})
            assert answer.status_code == 404
            assert (await site.client.get("/move-storage")).status_code == 404


@pytest.mark.anyio
async def test_readers_always_get_the_right_bytes_while_a_study_moves(tmp_path, s3_server):
    async with open_site(hybrid_options(tmp_path, s3_server)) as site:
        uploaded = await site.upload(dataset(8, big=True))
        study = uploaded[0]["ParentStudy"]
        store, expected = site.store, dict(site.expected)
        stop = threading.Event()
        errors: list[str] = []
        reads = [0, 0]

        def reader(seed: int) -> None:  # GET /instances/{id}/file and chunk serving, in their threads
            rng = random.Random(seed)
            while not stop.is_set():
                instance = rng.choice(list(expected))
                data = expected[instance]
                try:
                    if rng.random() < 0.3:
                        got = store.read_file(instance)
                        ok = got == data
                    else:
                        offset = rng.randrange(len(data))
                        length = rng.randint(1, min(256 * 1024, len(data) - offset))
                        got = store.read_range(store.attachment(instance), offset, length)
                        ok = got == data[offset:offset + length]
                    reads[0] += 1
                    if not ok:
                        errors.append(f"{instance}: wrong bytes")
                except Exception as exc:  # noqa: BLE001 - every failure is the test's news
                    errors.append(f"{instance}: {type(exc).__name__}: {exc}")

        async def http_reader() -> None:
            while not stop.is_set():
                for instance, data in expected.items():
                    answer = await site.client.get(f"/instances/{instance}/file")
                    reads[1] += 1
                    if answer.status_code != 200 or answer.content != data:
                        errors.append(f"GET {instance}: {answer.status_code}")

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(2)]
        for t in threads:
            t.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(http_reader)
                for target in (OBJECT_STORAGE, FILE_SYSTEM, OBJECT_STORAGE, FILE_SYSTEM):
                    answer = await site.move([study], target)
                    assert answer.status_code == 200, answer.text
                    assert all(w == [target] for w in site.where().values())
                stop.set()
        finally:
            stop.set()
            for t in threads:
                await to_thread.run_sync(t.join)
        assert errors == []
        assert reads[0] > 50 and reads[1] > 9, reads


@pytest.mark.anyio
async def test_a_missing_or_corrupt_source_fails_the_job_naming_the_instance(tmp_path, s3_server):
    async with open_site(hybrid_options(tmp_path, s3_server)) as site:
        uploaded = await site.upload(dataset(4))
        study = uploaded[0]["ParentStudy"]
        assert (await site.move([study], OBJECT_STORAGE)).status_code == 200
        missing, corrupt = uploaded[1]["ID"], uploaded[2]["ID"]
        obstore.delete(site.objects.store, object_name(site.uuid(missing)))

        answer = await site.move([missing], FILE_SYSTEM)
        assert answer.status_code == 500, answer.text
        assert answer.json()["OrthancStatus"] == 1 and missing in answer.json()["Details"]
        job = [j for j in (await site.client.get("/jobs?expand")).json() if j["State"] == "Failure"][0]
        assert job["Type"] == "MoveStorage" and missing in job["ErrorDetails"]

        data = site.expected[corrupt]
        flipped = bytes([data[0] ^ 0xFF]) + data[1:]
        obstore.put(site.objects.store, object_name(site.uuid(corrupt)), flipped)
        others = [uploaded[0]["ID"], uploaded[3]["ID"]]
        answer = await site.move([others[0], corrupt, others[1]], FILE_SYSTEM, Asynchronous=True)
        job = await site.app.state.jobs.wait(answer.json()["ID"])
        assert job["State"] == "Failure"
        assert corrupt in job["ErrorDetails"] and "MD5" in job["ErrorDetails"], job["ErrorDetails"]
        # nothing of the failing instances was removed nor copied; the others are whole, on one side
        assert site.keys() >= {object_name(site.uuid(corrupt))}
        assert not site.fs.exists(site.uuid(corrupt)) and not site.fs.exists(site.uuid(missing))
        assert obstore.get(site.objects.store, object_name(site.uuid(corrupt))).bytes() == flipped
        for instance in others:
            assert len(site.store.area.storage.where(site.uuid(instance))) == 1
            assert (await site.client.get(f"/instances/{instance}/file")).content == site.expected[instance]


# -- kill -9 in mid-move ------------------------------------------------------------------------

KILL_COUNT = 400  # a move of a few seconds: several checkpoints before the kill, even on a fast run


def saved_position(storage: Path, job_id: str) -> int:
    """The first instance not done according to the job's checkpoint in the daemon's index."""
    with contextlib.closing(sqlite3.connect(f"file:{storage / INDEX_FILE}?mode=ro", uri=True, timeout=10)) as db:
        row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    checkpoint = json.loads(row[0])["checkpoint"] if row else None
    return checkpoint["Next"] if checkpoint else 0


@pytest.mark.slow
def test_a_move_killed_with_sigkill_resumes_after_restart(tmp_path, s3_server):
    options = hybrid_options(tmp_path, s3_server)
    files = dataset(KILL_COUNT)
    daemon = Daemon(options, tmp_path / "daemon").start()
    try:
        with httpx.Client(base_url=daemon.url, timeout=30) as http:
            ids = {}
            for data in files:
                answer = http.post("/instances", content=data)
                assert answer.status_code == 200
                ids[answer.json()["ID"]] = data
            study = answer.json()["ParentStudy"]
            job_id = http.post("/move-storage", json={"Resources": [study], "TargetStorage": OBJECT_STORAGE,
                                                      "Asynchronous": True}).json()["ID"]
            deadline = time.monotonic() + 30
            while (saved := saved_position(tmp_path / "storage", job_id)) < 10:  # what a restart sees
                assert time.monotonic() < deadline
                time.sleep(0.002)
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.proc.wait(10)
        assert saved < KILL_COUNT - 10, f"the move was not mid-way at the kill ({saved} saved)"
    finally:
        daemon.stop()

    daemon = Daemon(options, tmp_path / "daemon").start()  # same configuration, storage and bucket
    try:
        with httpx.Client(base_url=daemon.url, timeout=30) as http:
            deadline = time.monotonic() + 30
            while (job := http.get(f"/jobs/{job_id}").json())["State"] not in ("Success", "Failure"):
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job["State"] == "Success", job
            assert job["Content"]["CompletedInstances"] == KILL_COUNT
            for instance, data in ids.items():
                assert hashlib.md5(http.get(f"/instances/{instance}/file").content).digest() == \
                    hashlib.md5(data).digest(), instance
            assert http.get("/statistics").json()["CountInstances"] == KILL_COUNT
        assert f"resuming at instance {saved} of {KILL_COUNT}" in daemon.stderr_tail(100_000)
    finally:
        daemon.stop()

    storage = tmp_path / "storage"
    assert list(FileSystemStorage(storage).list()) == []  # every attachment left the disk...
    section = options["AwsS3Storage"]
    from accelerator.store.objects import ObjectStorageSettings, make_store
    store = make_store(ObjectStorageSettings(bucket_name=section["BucketName"], region="us-east-1",
                                             access_key=section["AccessKey"], secret_key=section["SecretKey"],
                                             endpoint=section["Endpoint"], virtual_addressing=False))
    keys = [meta["path"] for page in obstore.list(store) for meta in page]
    assert len(keys) == len(set(keys)) == KILL_COUNT  # ...and is in the bucket once
    assert list((storage / ".staging").iterdir()) == []  # no temporary copy left
    assert list((storage / ".pending-objects").iterdir()) == []  # no staged object left
