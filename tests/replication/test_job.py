"""The Replicate driver in process, between two real stores: what happens to an instance that
changes or disappears on the source between the plan and the copy."""

from __future__ import annotations

from typing import Any

import pytest

from accelerator.jobs.base import JobFailure
from accelerator.replication.ends import Selection
from accelerator.replication.job import EndKinds, Progress, ReplicateDriver, levels
from accelerator.replication.local import LocalStore
from accelerator.store import Store
from protocol.resources import Level
from tests.replication.test_replicate import dataset

pytestmark = pytest.mark.anyio


class Context:
    """A job context kept in memory: what the engine would persist."""

    def __init__(self, query: dict[str, Any], checkpoint: dict[str, Any] | None = None):
        self.job_id = "job"
        self.query = query
        self.checkpoint = checkpoint
        self.content: dict[str, Any] = {}
        self.saves = 0

    async def save(self, checkpoint=None, *, content=None, progress=None) -> None:
        if checkpoint is not None:
            self.checkpoint = checkpoint
        self.content.update(content or {})
        self.saves += 1

    def report(self, *, content=None, progress=None) -> None:
        self.content.update(content or {})


@pytest.fixture
def stores(tmp_path):
    source, target = Store(tmp_path / "source"), Store(tmp_path / "target")
    for data in dataset():
        source.ingest_bytes(data)
    yield source, target
    source.close()
    target.close()


class CountingStore(LocalStore):
    """A real store as the target, counting what it is sent."""

    def __init__(self, store: Store):
        super().__init__(store)
        self.written: list[str] = []

    async def write(self, instance_id: str, data: bytes) -> None:
        self.written.append(instance_id)
        await super().write(instance_id, data)


def driver(source: Store, target: Store | LocalStore) -> ReplicateDriver:
    end = target if isinstance(target, LocalStore) else LocalStore(target)

    async def open_ends(query):  # per-instance copy, as between two plain Orthancs
        return LocalStore(source), end, EndKinds("Orthanc", "Orthanc")
    return ReplicateDriver(store=target, open_ends=open_ends, pull_driver=None, push_driver=None)


async def planned(source: Store) -> tuple[dict[str, Any], list]:
    entries = await LocalStore(source).entries(Selection())
    state = {"Entries": [e.to_json() for e in entries], "Skipped": [], "Copied": [], "Failed": {}, "Bytes": 0,
             "Levels": levels(entries)}
    return state, entries


async def test_an_instance_deleted_after_the_plan_is_reported_and_the_others_copied(stores):
    source, target = stores
    state, entries = await planned(source)
    source.delete(Level.INSTANCE, entries[0].id)
    ctx = Context({}, Progress(state).checkpoint())
    with pytest.raises(JobFailure, match="1 of 10 instances were not copied"):
        await driver(source, target).run(ctx)
    assert ctx.content["Copied"] == 9 and ctx.content["Failed"] == 1
    assert ctx.content["FailedInstances"] == [{"ID": entries[0].id,
                                               "Reason": "deleted from the source during the replication"}]
    assert await LocalStore(target).md5s(e.id for e in entries) == {e.id: e.md5 for e in entries[1:]}


async def test_an_instance_changed_after_the_plan_is_not_copied(stores):
    source, target = stores
    state, entries = await planned(source)
    state["Entries"][3]["MD5"] = "0" * 32  # the plan saw another file under this ID
    ctx = Context({}, Progress(state).checkpoint())
    with pytest.raises(JobFailure):
        await driver(source, target).run(ctx)
    (failed,) = ctx.content["FailedInstances"]
    assert failed["ID"] == entries[3].id and "changed on the source" in failed["Reason"]
    assert entries[3].id not in await LocalStore(target).md5s([entries[3].id])


async def test_a_resumed_copy_sends_nothing_the_target_got_before(stores):
    source, target = stores
    state, entries = await planned(source)
    for entry in entries[:6]:  # copied before an interruption, not yet in the checkpoint
        target.ingest_bytes(source.read_file(entry.id))
    ctx = Context({}, Progress(state).checkpoint())
    counting = CountingStore(target)
    await driver(source, counting).run(ctx)
    assert ctx.content["Copied"] == 10 and ctx.content["Verified"] == 10
    assert sorted(counting.written) == sorted(e.id for e in entries[6:])
