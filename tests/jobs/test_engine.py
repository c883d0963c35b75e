"""accelerator.jobs.engine with fake drivers: scheduling, states, control, history, persistence."""

from __future__ import annotations

import re

import anyio
import pytest

from accelerator.jobs.engine import (
    FAILURE,
    PAUSED,
    PENDING,
    RUNNING,
    SUCCESS,
    JobsEngine,
)
from accelerator.store.index import Index
from protocol.errors import BadRequest, InternalError, UnknownResource
from tests.jobs.fakes import TYPE, WAIT, FakeDriver, make_engine, wait_state

pytestmark = pytest.mark.anyio

ISO = re.compile(r"^\d{8}T\d{6}\.\d{6}$")


@pytest.fixture
def index(tmp_path):
    index = Index(tmp_path / "index")
    yield index
    index.close()


async def _submit(engine, do="wait", priority=0, **query):
    return await engine.submit(TYPE, {"do": do, **query}, priority, {"Peer": "b", "Compression": "gzip"})


def _rows(index) -> dict[str, tuple[str, dict]]:
    return {row[0]: (row[3], row[4]) for row in index.jobs()}


# -- outcomes ----------------------------------------------------------------------------------

async def test_success_json():
    engine, driver = make_engine()
    async with engine.running():
        job_id = await _submit(engine, "succeed", priority=3)
        job = await wait_state(engine, job_id, SUCCESS)
    assert job["ID"] == job_id and job["Type"] == TYPE and job["Priority"] == 3
    assert (job["State"], job["Progress"], job["ErrorCode"], job["ErrorDescription"], job["ErrorDetails"]) == (
        "Success", 100, 0, "Success", "")
    assert job["Content"] == {"Peer": "b", "Compression": "gzip", "CompletedHttpQueries": 1}
    for key in ("CreationTime", "Timestamp", "CompletionTime"):
        assert ISO.match(job[key]), (key, job[key])
    assert isinstance(job["EffectiveRuntime"], float)
    assert "EstimatedTimeOfArrival" not in job
    assert driver.discards == []


@pytest.mark.parametrize("do, details", [
    ("fail", "peer 'b' has no study 1.2.3"),
    ("orthanc", "peer 'b' answered HTTP 500 to the lookup"),
    ("crash", "KeyError: 'boom'"),
])
async def test_failure_details_and_discard(do, details):
    engine, driver = make_engine()
    async with engine.running():
        job_id = await _submit(engine, do)
        job = await wait_state(engine, job_id, FAILURE)
        with anyio.fail_after(WAIT):
            while not driver.discards:
                await anyio.sleep(0.001)
    assert (job["ErrorCode"], job["ErrorDescription"], job["ErrorDetails"]) == (
        1, "Error encountered within the plugin engine", details)
    assert job["Progress"] == 0 and "CompletionTime" in job
    assert driver.discards == [(job_id, None)]


async def test_unknown_job_type_is_refused():
    engine, _ = make_engine()
    with pytest.raises(InternalError):
        await engine.submit("Nope", {}, 0)


# -- scheduling --------------------------------------------------------------------------------

async def test_higher_priority_first_fifo_among_equals():
    engine, driver = make_engine(concurrent_jobs=1)
    async with engine.running():
        blocker = await _submit(engine, "wait")
        await driver.entered(blocker)
        ids = {}
        for name, priority in [("low", 0), ("high", 10), ("mid", 5), ("high2", 10), ("low2", 0), ("neg", -3)]:
            ids[name] = await _submit(engine, "succeed", priority)
        assert all(engine.state(i) == PENDING for i in ids.values())
        driver.release(blocker)
        for job_id in ids.values():
            await wait_state(engine, job_id, SUCCESS)
    names = {v: k for k, v in ids.items()}
    assert [names.get(i, "blocker") for i, _ in driver.starts] == [
        "blocker", "high", "high2", "mid", "low", "low2", "neg"]


async def test_at_most_concurrent_jobs_run():
    engine, driver = make_engine(concurrent_jobs=2)
    async with engine.running():
        ids = [await _submit(engine) for _ in range(5)]
        await driver.entered(ids[0])
        await driver.entered(ids[1])
        assert [engine.state(i) for i in ids] == [RUNNING, RUNNING, PENDING, PENDING, PENDING]
        for i, job_id in enumerate(ids):
            driver.release(job_id)
            await wait_state(engine, job_id, SUCCESS)
            if i + 2 < len(ids):
                await driver.entered(ids[i + 2])
                assert sum(engine.state(j) == RUNNING for j in ids) == min(2, len(ids) - i - 1)
    assert driver.max_running == 2
    assert [i for i, _ in driver.starts] == ids


async def test_jobs_submitted_before_start_run_at_start():
    engine, driver = make_engine()
    job_id = await _submit(engine, "succeed")
    assert engine.state(job_id) == PENDING
    async with engine.running():
        await wait_state(engine, job_id, SUCCESS)


# -- pause / resume ----------------------------------------------------------------------------

async def test_pause_and_resume_pending_job():
    engine, driver = make_engine(concurrent_jobs=1)
    async with engine.running():
        blocker = await _submit(engine)
        await driver.entered(blocker)
        job_id = await _submit(engine, "succeed")
        await engine.pause(job_id)
        assert engine.get(job_id)["State"] == PAUSED
        driver.release(blocker)
        await wait_state(engine, blocker, SUCCESS)
        await anyio.sleep(0.01)
        assert engine.state(job_id) == PAUSED  # not scheduled
        await engine.resume(job_id)
        await wait_state(engine, job_id, SUCCESS)
    assert [i for i, _ in driver.starts] == [blocker, job_id]


async def test_pause_running_job_keeps_its_checkpoint_and_resume_continues():
    engine, driver = make_engine()
    async with engine.running():
        job_id = await _submit(engine)
        await driver.entered(job_id)
        await engine.pause(job_id)
        job = await wait_state(engine, job_id, PAUSED)
        assert "EstimatedTimeOfArrival" not in job and "CompletionTime" not in job
        assert job["Content"]["Step"] == 1
        await engine.pause(job_id)  # again: no-op
        assert engine.state(job_id) == PAUSED
        assert driver.discards == []
        await engine.resume(job_id)
        await driver.entered(job_id)
        driver.release(job_id)
        job = await wait_state(engine, job_id, SUCCESS)
    assert driver.starts == [(job_id, None), (job_id, {"step": 1})]
    assert job["Content"]["Step"] == 2
    assert driver.discards == []


async def test_pause_reads_running_until_the_driver_has_returned():
    engine, driver = make_engine()
    async with engine.running():
        job_id = await _submit(engine, slow_stop=True)
        await driver.entered(job_id)
        await engine.pause(job_id)
        await anyio.sleep(0.02)
        assert engine.state(job_id) == RUNNING  # like the plugin joining its HTTP threads
        with pytest.raises(BadRequest):
            await engine.resume(job_id)
        driver.let_stop(job_id)
        await wait_state(engine, job_id, PAUSED)


async def test_resume_refused_unless_paused():
    engine, driver = make_engine(concurrent_jobs=1)
    async with engine.running():
        running = await _submit(engine)
        pending = await _submit(engine)
        await driver.entered(running)
        done = None
        for job_id in (running, pending):
            with pytest.raises(BadRequest):
                await engine.resume(job_id)
        with pytest.raises(BadRequest):
            await engine.resume("00000000-0000-0000-0000-000000000000")
        driver.release(running)
        driver.release(pending)
        done = (await wait_state(engine, pending, SUCCESS))["ID"]
        with pytest.raises(BadRequest):
            await engine.resume(done)


# -- cancel ------------------------------------------------------------------------------------

async def _wait_discards(driver, count):
    with anyio.fail_after(WAIT):
        while len(driver.discards) < count:
            await anyio.sleep(0.001)


async def test_cancel_running_pending_and_paused_jobs():
    engine, driver = make_engine(concurrent_jobs=1)
    async with engine.running():
        running = await _submit(engine, progress=9 / 11)
        await driver.entered(running)
        pending = await _submit(engine)
        paused = await _submit(engine)
        await engine.pause(paused)
        for job_id in (running, pending, paused):
            await engine.cancel(job_id)
        jobs = [await wait_state(engine, j, FAILURE) for j in (running, pending, paused)]
        await _wait_discards(driver, 3)
    for job in jobs:
        assert (job["ErrorCode"], job["ErrorDescription"], job["ErrorDetails"]) == (37, "This job was canceled", "")
        assert "CompletionTime" in job
    assert jobs[0]["Progress"] == 82  # as it was when canceled
    assert sorted(driver.discards) == sorted([(running, {"step": 1}), (pending, None), (paused, None)])
    assert [i for i, _ in driver.starts] == [running]


async def test_cancel_or_pause_of_a_finished_job_is_a_no_op():
    engine, driver = make_engine()
    async with engine.running():
        ok = await _submit(engine, "succeed")
        failed = await _submit(engine, "fail")
        await wait_state(engine, ok, SUCCESS)
        before = await wait_state(engine, failed, FAILURE)
        await _wait_discards(driver, 1)
        for job_id in (ok, failed):
            await engine.cancel(job_id)
            await engine.pause(job_id)
        assert engine.state(ok) == SUCCESS
        after = engine.get(failed)
        assert (after["ErrorCode"], after["ErrorDetails"]) == (before["ErrorCode"], before["ErrorDetails"])
        assert len(driver.discards) == 1
        with pytest.raises(BadRequest):
            await engine.cancel("00000000-0000-0000-0000-000000000000")
        with pytest.raises(BadRequest):
            await engine.pause("00000000-0000-0000-0000-000000000000")
        with pytest.raises(UnknownResource):
            engine.get("00000000-0000-0000-0000-000000000000")


# -- resubmit ----------------------------------------------------------------------------------

async def test_resubmit_restarts_from_no_checkpoint_with_stale_content():
    engine, driver = make_engine()
    async with engine.running():
        job_id = await _submit(engine, progress=9 / 11)
        await driver.entered(job_id)
        await engine.cancel(job_id)
        canceled = await wait_state(engine, job_id, FAILURE)
        await _wait_discards(driver, 1)
        await engine.resubmit(job_id)
        job = engine.get(job_id)
        assert job["State"] in (PENDING, RUNNING)
        assert (job["ErrorCode"], job["ErrorDescription"]) == (0, "Success")
        assert job["Content"] == canceled["Content"] and job["Progress"] == 82  # stale, like the plugin
        await driver.entered(job_id)
        assert engine.get(job_id)["EffectiveRuntime"] < canceled["EffectiveRuntime"] + 0.5
        driver.release(job_id)
        await wait_state(engine, job_id, SUCCESS)
    assert driver.starts == [(job_id, None), (job_id, None)]


async def test_resubmit_refused_unless_failed():
    engine, driver = make_engine(concurrent_jobs=1)
    async with engine.running():
        ok = await _submit(engine, "succeed")
        await wait_state(engine, ok, SUCCESS)
        running = await _submit(engine)
        await driver.entered(running)
        pending = await _submit(engine)
        paused = await _submit(engine)
        await engine.pause(paused)
        for job_id in (ok, running, pending, paused, "00000000-0000-0000-0000-000000000000"):
            with pytest.raises(BadRequest):
                await engine.resubmit(job_id)


async def test_resubmit_of_a_failed_job_waits_for_its_discard():
    engine, driver = make_engine()
    driver.discard_gate = anyio.Event()
    async with engine.running():
        job_id = await _submit(engine)
        await driver.entered(job_id)
        await engine.cancel(job_id)
        await wait_state(engine, job_id, FAILURE)
        await _wait_discards(driver, 1)  # discard started, blocked
        await engine.resubmit(job_id)
        await anyio.sleep(0.02)
        assert engine.state(job_id) == PENDING and len(driver.starts) == 1
        driver.discard_gate.set()
        await wait_state(engine, job_id, RUNNING)
        await driver.entered(job_id)
    assert driver.discards == [(job_id, {"step": 1})]  # the discard saw what it had to release
    assert driver.starts == [(job_id, None), (job_id, None)]


# -- history -----------------------------------------------------------------------------------

async def test_history_keeps_the_most_recent_finished_jobs(index):
    engine, driver = make_engine(index, history_size=2)
    async with engine.running():
        running = await _submit(engine)
        await driver.entered(running)
        finished = []
        for do in ("succeed", "fail", "succeed", "fail"):
            job_id = await _submit(engine, do)
            finished.append(job_id)
            await wait_state(engine, job_id, SUCCESS, FAILURE)
        expected = {running, *finished[2:]}
        with anyio.fail_after(WAIT):
            while set(engine.list_ids()) != expected or set(_rows(index)) != expected:
                await anyio.sleep(0.001)
        with pytest.raises(UnknownResource):
            engine.get(finished[0])
        assert finished[1] in {j for j, _ in driver.discards}  # discarded before forgotten


async def test_history_size_zero_forgets_at_once():
    engine, driver = make_engine(history_size=0)
    async with engine.running():
        job_id = await _submit(engine, "succeed")
        with anyio.fail_after(WAIT):
            while job_id in engine.list_ids():
                await anyio.sleep(0.001)
    assert driver.starts == [(job_id, None)]


# -- persistence -------------------------------------------------------------------------------

async def test_jobs_survive_a_restart(index):
    engine, driver = make_engine(index, concurrent_jobs=1)
    async with engine.running():
        done = await _submit(engine, "succeed", priority=1)
        finished = await wait_state(engine, done, SUCCESS)
        running = await _submit(engine)
        await driver.entered(running)
        pending = await _submit(engine, "succeed")
        paused = await _submit(engine)
        await engine.pause(paused)
        before = engine.get(running)
    rows = _rows(index)
    assert {k: v[0] for k, v in rows.items()} == {
        done: SUCCESS, running: RUNNING, pending: PENDING, paused: PAUSED}

    engine2, driver2 = make_engine(index, concurrent_jobs=1)
    async with engine2.running():
        await driver2.entered(running)
        assert driver2.starts == [(running, {"step": 1})]  # resumed from its checkpoint, first
        assert engine2.state(pending) == PENDING and engine2.state(paused) == PAUSED
        again = engine2.get(done)
        for key in ("CompletionTime", "CreationTime", "Content", "Priority", "Progress", "State", "EffectiveRuntime"):
            assert again[key] == finished[key], key
        resumed = engine2.get(running)
        assert resumed["CreationTime"] == before["CreationTime"]
        assert resumed["Content"]["Step"] == 2
        driver2.release(running)
        await wait_state(engine2, pending, SUCCESS)
        assert engine2.state(paused) == PAUSED
    assert driver2.discards == []
    assert _rows(index)[running][0] == SUCCESS


async def test_a_pause_or_cancel_asked_before_a_restart_is_honoured(index):
    engine, driver = make_engine(index, concurrent_jobs=2)

    async def let_stop_later(job_id):
        await anyio.sleep(0.05)
        driver.let_stop(job_id)

    async with anyio.create_task_group() as helpers:
        async with engine.running():
            to_pause = await _submit(engine, slow_stop=True)
            to_cancel = await _submit(engine, slow_stop=True)
            await driver.entered(to_pause)
            await driver.entered(to_cancel)
            await engine.pause(to_pause)
            await engine.cancel(to_cancel)
            assert engine.state(to_pause) == RUNNING and engine.state(to_cancel) == RUNNING
            driver.let_stop(to_pause)
            await wait_state(engine, to_pause, PAUSED)
            # the daemon stops while to_cancel's driver is still stopping
            helpers.start_soon(let_stop_later, to_cancel)
    state, record = _rows(index)[to_cancel]
    assert (state, record["stop"]) == (RUNNING, "cancel")
    assert driver.discards == []
    engine2, driver2 = make_engine(index)
    async with engine2.running():
        assert engine2.state(to_pause) == PAUSED
        job = await wait_state(engine2, to_cancel, FAILURE)
        assert job["ErrorCode"] == 37
        await _wait_discards(driver2, 1)
    assert driver2.discards == [(to_cancel, {"step": 1})]
    assert driver2.starts == []


async def test_an_interrupted_discard_is_done_again_at_start(index):
    engine, driver = make_engine(index)
    driver.discard_gate = anyio.Event()  # never set: the discard is cut by the shutdown
    async with engine.running():
        job_id = await _submit(engine, "fail")
        await wait_state(engine, job_id, FAILURE)
        await _wait_discards(driver, 1)
    engine2, driver2 = make_engine(index)
    async with engine2.running():
        await _wait_discards(driver2, 1)
    assert driver2.discards == [(job_id, None)]
    assert _rows(index)[job_id][1]["discard_pending"] is False


async def test_save_persists_report_does_not(index):
    engine, driver = make_engine(index)
    async with engine.running():
        job_id = await _submit(engine, progress=0.5)
        await driver.entered(job_id)
        job = engine.get(job_id)
        assert job["Progress"] == 50 and job["Content"]["Reported"] is True
        state, record = _rows(index)[job_id]
        assert state == RUNNING and record["checkpoint"] == {"step": 1}
        assert record["content"]["Step"] == 1 and "Reported" not in record["content"]
        assert record["progress"] == 0.0


async def test_save_jobs_false_keeps_jobs_in_memory_only(make_config, tmp_path):
    from accelerator.api.app import open_store

    config = make_config({"SaveJobs": False, "ConcurrentJobs": 3, "JobsHistorySize": 4})
    store = open_store(config)
    try:
        engine = JobsEngine.from_config(config, store.index)
        assert (engine._concurrent, engine._history, engine._index) == (3, 4, None)
        driver = FakeDriver()
        engine.register(TYPE, driver.factory)
        async with engine.running():
            job_id = await _submit(engine, "succeed")
            await wait_state(engine, job_id, SUCCESS)
        assert store.index.jobs() == []
        persisted = JobsEngine.from_config(make_config(), store.index)
        assert persisted._index is store.index
    finally:
        store.close()


async def test_running_jobs_json_has_an_eta():
    engine, driver = make_engine()
    async with engine.running():
        job_id = await _submit(engine, progress=5 / 11)
        await driver.entered(job_id)
        await anyio.sleep(0.01)
        job = engine.get(job_id)
        assert job["State"] == RUNNING and job["Progress"] == 45
        assert ISO.match(job["EstimatedTimeOfArrival"]) and "CompletionTime" not in job
        assert job["EstimatedTimeOfArrival"] > job["Timestamp"]
        pending = await _submit(engine)
        assert "EstimatedTimeOfArrival" not in engine.get(pending)
