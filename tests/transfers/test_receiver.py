"""The push receiver under races and abuse: commits racing PUTs, DELETE during a PUT, plans too
big to hold, a commit that must not freeze the daemon, abandoned transactions (issue: hold under
abuse, items 1, 2 and 7). In-process app; the races are made to happen with held request bodies
and a commit held inside the store."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.store.store import Store
from protocol.messages import Chunk, InstanceInfo, PushTransaction
from tests.api.test_transfers import _study
from tests.conftest import asgi_client

pytestmark = pytest.mark.anyio

TIB = 1 << 40


class HeldBody:
    """A request body sent in two halves, the second only once `release` is set."""

    def __init__(self, data: bytes):
        self.data = data
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.answer: httpx.Response | None = None

    async def __aiter__(self):
        yield self.data[: len(self.data) // 2]
        self.started.set()
        await self.release.wait()
        yield self.data[len(self.data) // 2:]


@contextlib.asynccontextmanager
async def held_put(client, url: str, data: bytes) -> AsyncIterator[HeldBody]:
    """A PUT in flight: half its body is received, the rest waits for `release` (at the latest
    when the block ends); its answer is in `.answer` after the block."""
    body = HeldBody(data)

    async def put():
        body.answer = await client.put(url, content=body)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(put)
        with anyio.fail_after(5):
            await body.started.wait()
        try:
            yield body
        finally:
            body.release.set()


async def _in_background(tasks, answers: dict, key: str, request) -> None:
    async def run():
        answers[key] = await request
    tasks.start_soon(run)


@pytest.fixture
async def app_client(make_config):
    """(app, client) with a per-test configuration: `app_client(options)`."""
    stores = []

    def make(options=None):
        config = make_config(options)
        store = open_store(config)
        stores.append(store)
        app = create_app(config, store)
        return app, asgi_client(app)

    yield make
    for store in stores:
        store.close()


def _one_instance_plan(buckets: int = 1):
    """One real instance cut into `buckets` equal buckets (no compression)."""
    files = _study(1)
    (instance_id, data), = files.items()
    step = -(-len(data) // buckets)
    cuts = [(offset, min(step, len(data) - offset)) for offset in range(0, len(data), step)]
    info = InstanceInfo(instance_id, len(data), hashlib.md5(data).hexdigest())
    plan = PushTransaction((info,), tuple((Chunk(instance_id, o, n),) for o, n in cuts), "none")
    return data, plan, [data[o:o + n] for o, n in cuts]


def _push_folder(app):
    return app.state.receiver.folder


async def _stored_bytes(client, instance_id: str) -> bytes:
    answer = await client.get(f"/instances/{instance_id}/file")
    assert answer.status_code == 200
    return answer.content


# -- item 1: commit and DELETE racing a PUT ---------------------------------------------------

async def test_commit_waits_for_a_put_in_flight_and_stores_the_checked_bytes(app_client):
    app, client = app_client()
    data, plan, payloads = _one_instance_plan()
    other = bytes(b ^ 0xFF for b in payloads[0])  # same size, other bytes
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        assert (await client.put(f"{path}/0", content=payloads[0])).status_code == 200
        answers = {}
        async with held_put(client, f"{path}/0", other) as put, anyio.create_task_group() as tasks:
            await _in_background(tasks, answers, "commit", client.post(f"{path}/commit"))
            await anyio.sleep(0.3)
            assert "commit" not in answers  # the commit waits for the PUT in flight
            put.release.set()
        assert put.answer.status_code == 200  # its bytes are not written: the instance was verified
        assert answers["commit"].status_code == 200
        stored = await _stored_bytes(client, plan.instances[0].id)
        assert hashlib.md5(stored).hexdigest() == plan.instances[0].md5 and stored == data


async def test_a_verified_instance_does_not_change_when_its_bucket_comes_again(app_client):
    app, client = app_client()
    data, plan, payloads = _one_instance_plan(buckets=2)
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        for index, payload in enumerate(payloads):
            assert (await client.put(f"{path}/{index}", content=payload)).status_code == 200
        garbage = bytes(len(payloads[0]))
        assert (await client.put(f"{path}/0", content=garbage)).status_code == 200
        assert (await client.post(f"{path}/commit")).status_code == 200
        assert await _stored_bytes(client, plan.instances[0].id) == data


async def test_a_bucket_is_received_by_one_request_at_a_time(app_client):
    app, client = app_client()
    data, plan, payloads = _one_instance_plan(buckets=2)
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        async with held_put(client, f"{path}/0", payloads[0]) as first:
            second = await client.put(f"{path}/0", content=payloads[0])
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
            assert second.json()["OrthancStatus"] == 36
        assert first.answer.status_code == 200
        assert (await client.put(f"{path}/1", content=payloads[1])).status_code == 200
        assert (await client.post(f"{path}/commit")).status_code == 200
        assert await _stored_bytes(client, plan.instances[0].id) == data


async def test_delete_during_a_put_ends_the_put_with_404_and_cleans_up(app_client, caplog):
    app, client = app_client()
    data, plan, payloads = _one_instance_plan()
    async with client:
        created = (await client.post("/transfers/push", json=plan.to_json())).json()
        path = created["Path"]
        async with held_put(client, f"{path}/0", payloads[0]) as held:
            assert (await client.delete(path)).status_code == 200
            assert (_push_folder(app) / created["ID"]).exists()  # the PUT still writes there
        put = held.answer
        assert put.status_code == 404 and put.json()["OrthancStatus"] == 17
        assert "discarded" in put.json()["Details"]
        assert list(_push_folder(app).iterdir()) == []  # the last request out removed the files
        assert (await client.post(f"{path}/commit")).status_code == 404
        assert (await client.get("/instances")).json() == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_put_during_a_commit_is_refused_and_so_is_a_second_commit(app_client, monkeypatch):
    app, client = app_client()
    data, plan, payloads = _one_instance_plan(buckets=2)
    inside, leave = threading.Event(), threading.Event()
    ingest = Store.ingest_files

    def held_ingest(self, files, **kwargs):
        inside.set()
        assert leave.wait(10)
        return ingest(self, files, **kwargs)

    monkeypatch.setattr(Store, "ingest_files", held_ingest)
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        for index, payload in enumerate(payloads):
            assert (await client.put(f"{path}/{index}", content=payload)).status_code == 200
        answers = {}
        async with anyio.create_task_group() as tasks:
            await _in_background(tasks, answers, "commit", client.post(f"{path}/commit"))
            with anyio.fail_after(5):
                await anyio.to_thread.run_sync(inside.wait, 5)
            put = await client.put(f"{path}/0", content=bytes(len(payloads[0])))
            assert put.status_code == 400 and put.json()["OrthancStatus"] == 6
            again = await client.post(f"{path}/commit")
            assert again.status_code == 503 and again.headers["retry-after"] == "1"
            assert (await client.delete(path)).status_code == 400
            leave.set()
        assert answers["commit"].status_code == 200
        assert await _stored_bytes(client, plan.instances[0].id) == data
        assert (await client.post(f"{path}/commit")).status_code == 404


async def test_a_commit_gives_up_on_a_put_that_never_ends_and_the_transaction_stays(app_client):
    app, client = app_client({"HttpRequestTimeout": 1})
    data, plan, payloads = _one_instance_plan()
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        async with held_put(client, f"{path}/0", payloads[0]) as put:
            commit = await client.post(f"{path}/commit")
            assert commit.status_code == 503 and "still running" in commit.json()["Details"]
            assert commit.headers["retry-after"] == "1"
        assert put.answer.status_code == 200
        assert (await client.post(f"{path}/commit")).status_code == 200
        assert await _stored_bytes(client, plan.instances[0].id) == data


async def test_many_commits_of_one_transaction_do_not_tie_up_the_worker_threads(app_client, monkeypatch):
    """Before, each waited on the transaction's lock in a worker thread until none was left."""
    app, client = app_client()
    data, plan, payloads = _one_instance_plan()
    inside, leave = threading.Event(), threading.Event()
    ingest = Store.ingest_files

    def held_ingest(self, files, **kwargs):
        inside.set()
        assert leave.wait(20)
        return ingest(self, files, **kwargs)

    monkeypatch.setattr(Store, "ingest_files", held_ingest)
    async with client:
        path = (await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
        assert (await client.put(f"{path}/0", content=payloads[0])).status_code == 200
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client.post, f"{path}/commit")
            await anyio.to_thread.run_sync(inside.wait, 5)
            started = time.monotonic()
            statuses = []

            async def commit():
                statuses.append((await client.post(f"{path}/commit")).status_code)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as others:
                    for _ in range(60):  # more than anyio's 40 worker threads
                        others.start_soon(commit)
                system = await client.get("/system")
            assert system.status_code == 200 and statuses == [503] * 60
            assert time.monotonic() - started < 5
            leave.set()
        assert await _stored_bytes(client, plan.instances[0].id) == data


# -- item 2: plans beyond what can be held --------------------------------------------------

def _plan_json(instances: list[InstanceInfo], buckets=None) -> dict:
    buckets = buckets if buckets is not None else [[Chunk(i.id, 0, i.size)] for i in instances]
    return PushTransaction(tuple(instances), tuple(tuple(b) for b in buckets), "none").to_json()


def _ids(count: int) -> list[str]:
    return ["-".join(f"{n:08x}" for n in (k, k, k, k, k)) for k in range(1, count + 1)]


@pytest.mark.parametrize("size, option", [(TIB, "MaxInstanceSize"), (16 * TIB, "MaxInstanceSize"),
                                          (2**63 - 1, "MaxInstanceSize")])
async def test_huge_instances_are_refused_at_creation(app_client, size, option):
    app, client = app_client()
    async with client:
        with anyio.fail_after(5):
            answer = await client.post("/transfers/push", json=_plan_json([InstanceInfo(_ids(1)[0], size, "0" * 32)]))
        assert answer.status_code == 400 and answer.json()["OrthancStatus"] == 3
        assert option in answer.json()["Details"]
        assert list(_push_folder(app).iterdir()) == []


async def test_a_plan_bigger_than_the_free_space_is_507_and_leaves_nothing(app_client):
    app, client = app_client({"Transfers": {"MaxInstanceSize": 1 << 30, "MaxTransferSize": 1 << 30}})
    async with client:
        plan = _plan_json([InstanceInfo(_ids(1)[0], TIB, "0" * 32)])
        with anyio.fail_after(5):
            answer = await client.post("/transfers/push", json=plan)
        assert answer.status_code == 507
        assert answer.json()["OrthancStatus"] == 14 and answer.json()["HttpError"] == "Insufficient Storage"
        assert list(_push_folder(app).iterdir()) == []
        assert (await client.get("/system")).status_code == 200


@pytest.mark.parametrize("count", [100_000, 200_000])
async def test_too_many_instances_are_refused_at_creation(app_client, count):
    app, client = app_client()
    ids = _ids(count)
    instances = [InstanceInfo(i, 1, "0" * 32) for i in ids]
    async with client:
        with anyio.fail_after(20):
            answer = await client.post("/transfers/push", json=_plan_json(instances, buckets=[]))
        assert answer.status_code == 400 and "MaxTransferInstances" in answer.json()["Details"]
        assert list(_push_folder(app).iterdir()) == []


async def test_the_total_size_is_bounded(app_client):
    app, client = app_client({"Transfers": {"MaxTransferSize": 1}})  # 1 MiB
    instances = [InstanceInfo(i, 400_000, "0" * 32) for i in _ids(3)]
    async with client:
        answer = await client.post("/transfers/push", json=_plan_json(instances))
        assert answer.status_code == 400 and "MaxTransferSize" in answer.json()["Details"]


async def test_committing_a_plan_whose_buckets_never_came_reads_nothing(app_client, monkeypatch):
    app, client = app_client()
    instances = [InstanceInfo(i, 1000, "0" * 32) for i in _ids(2000)]
    from accelerator.transfers.download import DownloadArea

    def no_reading(self, instance_id):
        raise AssertionError("a file whose buckets never landed was hashed")

    monkeypatch.setattr(DownloadArea, "md5_of", no_reading)
    async with client:
        path = (await client.post("/transfers/push", json=_plan_json(instances))).json()["Path"]
        with anyio.fail_after(10):
            answer = await client.post(f"{path}/commit")
        assert answer.status_code == 500 and "2000 transferred" in answer.json()["Details"]
        assert (await client.delete(path)).status_code == 200


# -- item 7: abandoned transactions ------------------------------------------------------------

async def test_an_abandoned_transaction_expires(app_client):
    app, client = app_client({"Transfers": {"PushTransactionTimeout": 1}})
    data, plan, payloads = _one_instance_plan(buckets=2)
    async with client:
        created = (await client.post("/transfers/push", json=plan.to_json())).json()
        assert (await client.put(f"{created['Path']}/0", content=payloads[0])).status_code == 200
        await anyio.sleep(1.1)
        assert app.state.receiver.expire() == [created["ID"]]
        assert (await client.put(f"{created['Path']}/1", content=payloads[1])).status_code == 404
        assert list(_push_folder(app).iterdir()) == []


async def test_the_daemon_expires_abandoned_transactions_by_itself(app_client):
    app, client = app_client({"Transfers": {"PushTransactionTimeout": 1}})
    data, plan, payloads = _one_instance_plan()
    async with client, app.router.lifespan_context(app):
        created = (await client.post("/transfers/push", json=plan.to_json())).json()
        with anyio.fail_after(5):
            while app.state.receiver.ids():
                await anyio.sleep(0.1)
        assert (await client.put(f"{created['Path']}/0", content=payloads[0])).status_code == 404
        assert list(_push_folder(app).iterdir()) == []


async def test_an_abandoned_transaction_expires_after_a_restart(make_config):
    config = make_config({"Transfers": {"PushTransactionTimeout": 1}})
    data, plan, payloads = _one_instance_plan(buckets=2)
    store = open_store(config)
    app = create_app(config, store)
    async with asgi_client(app) as client:
        created = (await client.post("/transfers/push", json=plan.to_json())).json()
        assert (await client.put(f"{created['Path']}/0", content=payloads[0])).status_code == 200
    store.close()
    await anyio.sleep(1.1)
    store = open_store(config)  # the transaction was idle for a second before this start
    try:
        app = create_app(config, store)
        assert app.state.receiver.expire() == [created["ID"]]
    finally:
        store.close()


async def test_full_slots_evict_the_least_recently_used_idle_transaction(app_client):
    """The real plugin sends no DELETE when its push job is canceled, and does not retry a 503
    on creation: the slots its abandoned transactions hold must not refuse its next push."""
    app, client = app_client({"Transfers": {"MaxPushTransactions": 2}})
    data, plan, payloads = _one_instance_plan(buckets=2)
    async with client:
        first, second = [(await client.post("/transfers/push", json=plan.to_json())).json()["Path"]
                         for _ in range(2)]
        assert (await client.put(f"{first}/0", content=payloads[0])).status_code == 200  # first: used last
        third = await client.post("/transfers/push", json=plan.to_json())
        assert third.status_code == 200
        assert (await client.put(f"{second}/0", content=payloads[0])).status_code == 404  # evicted
        assert (await client.put(f"{first}/1", content=payloads[1])).status_code == 200
        assert (await client.post(f"{first}/commit")).status_code == 200


async def test_transactions_with_a_put_in_flight_are_never_evicted(app_client):
    app, client = app_client({"Transfers": {"MaxPushTransactions": 2}})
    data, plan, payloads = _one_instance_plan()
    async with client:
        paths = [(await client.post("/transfers/push", json=plan.to_json())).json()["Path"] for _ in range(2)]
        async with held_put(client, f"{paths[0]}/0", payloads[0]) as one, \
                held_put(client, f"{paths[1]}/0", payloads[0]) as other:
            busy = await client.post("/transfers/push", json=plan.to_json())
            assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        assert one.answer.status_code == other.answer.status_code == 200
        assert (await client.post("/transfers/push", json=plan.to_json())).status_code == 200
