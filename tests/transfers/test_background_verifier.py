"""A receiver that never waits on itself (issue 12): the worker that lands a bucket (a pull's
fetcher, a push PUT) does not verify, parse or fsync what it completes; the background verifier
does, and the commit waits for it; the store makes a whole transfer durable in one batch before
its index commit. The verifier is held by filling its threads with tasks that wait for an event
(the real pool, nothing replaced)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio import to_thread

from accelerator.store import FileToIngest
from accelerator.store.storage import FileSystemStorage
from accelerator.store.store import Store
from accelerator.transfers import download
from accelerator.transfers.download import Assembly, DownloadArea, LandedLog
from accelerator.transfers.pull import Plan, _Download
from protocol.chunks import scatter_ranges
from protocol.messages import Chunk, InstanceInfo, PushTransaction
from tests.api.test_transfers import _study
from tests.transfers.test_receiver import app_client  # noqa: F401 - the fixture


@contextlib.contextmanager
def held_verifier() -> Iterator[threading.Event]:
    """Every thread of the background verifier busy until the event is set (at the latest when
    the block ends)."""
    release = threading.Event()
    started = threading.Barrier(download.VERIFIER_THREADS + 1)

    def occupy():
        started.wait(5)
        release.wait(30)

    futures = [download.verifier().submit(occupy) for _ in range(download.VERIFIER_THREADS)]
    started.wait(5)
    try:
        yield release
    finally:
        release.set()
        for future in futures:
            future.result(10)


def _plan(files: dict[str, bytes], per_instance: int = 2):
    """Every instance cut into `per_instance` buckets of one chunk."""
    infos, buckets, payloads = [], [], []
    for instance_id, data in files.items():
        infos.append(InstanceInfo(instance_id, len(data), hashlib.md5(data).hexdigest()))
        step = -(-len(data) // per_instance)
        for offset in range(0, len(data), step):
            n = min(step, len(data) - offset)
            buckets.append((Chunk(instance_id, offset, n),))
            payloads.append(data[offset:offset + n])
    return infos, buckets, payloads


def _fetched(tmp_path: Path, files: dict[str, bytes], payloads_of=None) -> tuple[_Download, list[bytes]]:
    infos, buckets, payloads = _plan(files)
    area = DownloadArea(tmp_path / "job", infos).create()
    return _Download(Plan(infos, buckets), area, Assembly(area, buckets), LandedLog(area.folder)), payloads


def _land(dl: _Download, index: int, payload: bytes) -> None:
    """What a pull's fetching worker does with a bucket's body."""
    bucket = dl.plan.buckets[index]
    writer = dl.area.payload_writer(scatter_ranges(bucket), "none", len(payload), spool=False)
    writer.feed(payload)
    writer.finish()
    dl.landed(index, writer)


def test_a_fetching_worker_lands_buckets_without_verifying_and_settle_waits_for_the_verifier(tmp_path):
    files = _study(3)
    dl, payloads = _fetched(tmp_path, files)
    try:
        with held_verifier() as release:
            for index, payload in enumerate(payloads):
                _land(dl, index, payload)  # returns although nothing can be verified now
            assert dl.assembly.ready == {}
            assert dl.log.read()[0] == set(range(len(payloads)))  # the buckets are logged as landed
            settled: list[list[str]] = []
            settling = threading.Thread(target=lambda: settled.append(dl.assembly.settle()))
            settling.start()
            time.sleep(0.3)
            assert settled == []  # the commit's settle waits for the verifier
            release.set()
            settling.join(10)
        assert settled == [[]]
        ready = dl.assembly.files()
        assert [f.path.name for f in ready] == sorted(files)
        for f in ready:
            assert f.parsed is not None and f.parsed.ids.instance == f.path.name  # parsed off the path
            assert not f.synced  # made durable by the store, in one batch at the commit
    finally:
        dl.log.close()


def test_an_instance_failing_its_md5_in_the_background_is_reported_by_settle(tmp_path):
    files = _study(2)
    dl, payloads = _fetched(tmp_path, files)
    bad = sorted(files)[0]
    try:
        for index, payload in enumerate(payloads):
            if dl.plan.buckets[index][0].instance_id == bad and index % 2:
                payload = bytes(b ^ 0x55 for b in payload)  # same size, other bytes
            _land(dl, index, payload)
        assert dl.assembly.settle() == [bad]
        assert dl.assembly.refetch([bad]) == {i for i, b in enumerate(dl.plan.buckets) if b[0].instance_id == bad}
        for index in dl.assembly.refetch([bad]):
            _land(dl, index, payloads[index])
        assert dl.assembly.settle() == []
    finally:
        dl.log.close()


def test_a_discarded_download_area_does_not_break_the_verifier(tmp_path):
    files = _study(2)
    dl, payloads = _fetched(tmp_path, files)
    try:
        with held_verifier():
            for index, payload in enumerate(payloads):
                _land(dl, index, payload)
            dl.area.remove()  # the job was canceled and discarded while verifications waited
        dl.assembly.drain()
        assert dl.assembly.ready == {}
        assert download.verifier().submit(lambda: 42).result(5) == 42  # the pool still works
    finally:
        dl.log.close()


# -- the push receiver -------------------------------------------------------------------------

@pytest.mark.anyio
async def test_a_put_is_answered_before_its_instances_are_verified_and_the_commit_waits(app_client):
    app, client = app_client()
    files = _study(2)
    infos, buckets, payloads = _plan(files)
    plan = PushTransaction(tuple(infos), tuple(buckets), "none")
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        tx = app.state.receiver.get(path.rsplit("/", 1)[1])
        with held_verifier() as release:
            for index, payload in enumerate(payloads):
                with anyio.fail_after(5):
                    assert (await client.put(f"{path}/{index}", content=payload)).status_code == 200
            assert tx.assembly.ready == {}  # answered once staged: nothing verified yet
            # a bucket sent again now leaves the bytes queued for verification alone
            assert (await client.put(f"{path}/0", content=bytes(len(payloads[0])))).status_code == 200
            answers = {}

            async def commit():
                answers["commit"] = await client.post(f"{path}/commit")

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(commit)
                await anyio.sleep(0.3)
                assert "commit" not in answers  # the commit waits for the verifier
                release.set()
        assert answers["commit"].status_code == 200
        for instance_id, data in files.items():
            stored = await client.get(f"/instances/{instance_id}/file")
            assert stored.status_code == 200 and stored.content == data


@pytest.mark.anyio
async def test_a_commit_reports_an_instance_that_failed_its_background_check(app_client):
    app, client = app_client()
    files = _study(1)
    infos, buckets, payloads = _plan(files)
    plan = PushTransaction(tuple(infos), tuple(buckets), "none")
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        assert (await client.put(f"{path}/0", content=payloads[0])).status_code == 200
        assert (await client.put(f"{path}/1", content=bytes(len(payloads[1])))).status_code == 200
        answer = await client.post(f"{path}/commit")
        assert answer.status_code == 500 and "Bad MD5" in answer.json()["Details"]
        assert (await client.get("/instances")).json() == []
        assert (await client.put(f"{path}/1", content=payloads[1])).status_code == 200  # fixed
        assert (await client.post(f"{path}/commit")).status_code == 200
        (instance_id, data), = files.items()
        assert (await client.get(f"/instances/{instance_id}/file")).content == data


# -- durability in one batch, before the index commit --------------------------------------------

class RecordingStorage(FileSystemStorage):
    """The file-system storage, noting which files each `sync_sources` batch held and whether
    the index knew any of their instances at that moment."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.store: Store | None = None
        self.batches: list[list[str]] = []
        self.indexed_at_sync: list[bool] = []
        self.unsynced_stagings = 0

    def sync_sources(self, sources):
        self.batches.append([Path(s).name for s in sources])
        self.indexed_at_sync.extend(self.store.index.exists(Path(s).name) for s in sources)
        return super().sync_sources(sources)

    def stage_file(self, uuid, source, *, synced=False):
        self.unsynced_stagings += not synced
        return super().stage_file(uuid, source, synced=synced)


def test_a_transfer_is_made_durable_in_one_batch_before_its_index_commit(tmp_path):
    storage = RecordingStorage(tmp_path / "storage")
    store = Store(tmp_path / "storage", tmp_path / "index", storage=storage)
    storage.store = store
    try:
        files = _study(4)
        dl, payloads = _fetched(tmp_path / "storage", files)
        try:
            for index, payload in enumerate(payloads):
                _land(dl, index, payload)
            assert dl.assembly.settle() == []
        finally:
            dl.log.close()
        outcomes = store.ingest_files(dl.assembly.files())
        assert [o.status for o in outcomes] == ["Success"] * 4
        assert storage.batches == [sorted(files)]  # one batch: every file of the transfer
        assert storage.indexed_at_sync == [False] * 4  # durable before any of them is indexed
        assert storage.unsynced_stagings == 0  # and no fsync per file when staged
        for instance_id, data in files.items():
            assert store.read_file(instance_id) == data
    finally:
        store.close()


def test_files_already_synced_are_not_synced_again(tmp_path):
    storage = RecordingStorage(tmp_path / "storage")
    store = Store(tmp_path / "storage", tmp_path / "index", storage=storage)
    storage.store = store
    try:
        (instance_id, data), = _study(1).items()
        path = tmp_path / "storage" / "upload"
        path.write_bytes(data)
        store.ingest_files([FileToIngest(path, len(data), hashlib.md5(data).hexdigest(), synced=True)])
        assert storage.batches == [] and storage.unsynced_stagings == 0
        assert store.read_file(instance_id) == data
    finally:
        store.close()


@pytest.mark.anyio
async def test_settle_in_a_worker_thread_does_not_block_the_event_loop(tmp_path):
    files = _study(1)
    dl, payloads = _fetched(tmp_path, files)
    try:
        with held_verifier() as release:
            for index, payload in enumerate(payloads):
                _land(dl, index, payload)
            ticks = 0
            async with anyio.create_task_group() as tasks:
                async def settle():
                    assert await to_thread.run_sync(dl.assembly.settle) == []
                tasks.start_soon(settle)
                for _ in range(5):
                    await anyio.sleep(0.02)
                    ticks += 1
                release.set()
            assert ticks == 5
    finally:
        dl.log.close()
