"""accelerator.api.jobs: the /jobs routes over the jobs engine, compared with a real Orthanc
(capture folder 07-jobs)."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from accelerator.api import jobs as jobs_api
from accelerator.api.http import handle_http_exception, handle_orthanc_error, handle_unexpected
from accelerator.api.middleware import NormalisePath
from accelerator.jobs.base import JobContext, JobFailure
from accelerator.jobs.engine import FAILURE, PAUSED, RUNNING, SUCCESS, JobsEngine
from protocol.errors import OrthancError
from tests.conftest import asgi_client
from tests.jobs.fakes import WAIT, wait_state
from tests.wire_samples import RANDOM_KEYS, assert_json_matches, exchanges

pytestmark = pytest.mark.anyio

FOLDER = "07-jobs"
UNKNOWN = "00000000-0000-0000-0000-000000000000"
TYPES = ("PullTransfer", "PushTransfer")


class ReplayDriver:
    """query["outcome"]: "success", "failure" or "wait" (until interrupted; a resubmitted job,
    i.e. one that ran before and starts again from no checkpoint, succeeds). Before that, the
    driver shows query["content"] and query["progress"] (0..1) if given."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.waiting: dict[str, anyio.Event] = {}

    def factory(self, ctx: JobContext) -> "ReplayDriver":
        return self

    async def run(self, ctx: JobContext) -> None:
        query = ctx.query
        resubmitted = ctx.checkpoint is None and ctx.job_id in self.runs
        self.runs[ctx.job_id] = self.runs.get(ctx.job_id, 0) + 1
        await ctx.save({"run": self.runs[ctx.job_id]}, content=query.get("content"), progress=query.get("progress"))
        if query["outcome"] == "failure":
            raise JobFailure(f"peer {query.get('Peer')!r} has no such study")
        if query["outcome"] == "wait" and not resubmitted:
            self.waiting.setdefault(ctx.job_id, anyio.Event()).set()
            await anyio.sleep_forever()

    async def discard(self, ctx: JobContext) -> None:
        pass

    async def entered(self, job_id: str) -> None:
        with anyio.fail_after(WAIT):
            await self.waiting.setdefault(job_id, anyio.Event()).wait()
        del self.waiting[job_id]


def make_app(engine: JobsEngine) -> Starlette:
    """The jobs routes with the daemon's middleware and error handlers (as accelerator.api.app)."""
    app = Starlette(
        routes=jobs_api.routes(),
        middleware=[Middleware(NormalisePath)],
        exception_handlers={
            OrthancError: handle_orthanc_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
    )
    app.state.jobs = engine
    app.state.describe_errors = True
    return app


@pytest.fixture
async def daemon():
    engine = JobsEngine(None)
    driver = ReplayDriver()
    for job_type in TYPES:
        engine.register(job_type, driver.factory)
    async with engine.running():
        async with asgi_client(make_app(engine)) as client:
            yield engine, driver, client


async def _submit(engine, outcome, job_type="PullTransfer", priority=0, content=None, progress=None) -> str:
    query: dict[str, Any] = {"outcome": outcome}
    if content is not None:
        query["content"] = content
    if progress is not None:
        query["progress"] = progress
    return await engine.submit(job_type, query, priority, {"Peer": "b"})


# -- routes ------------------------------------------------------------------------------------

async def test_list_get_and_actions(daemon):
    engine, driver, client = daemon
    ok = await _submit(engine, "success", priority=3)
    waiting = await _submit(engine, "wait", progress=0.5)
    await wait_state(engine, ok, SUCCESS)
    await driver.entered(waiting)

    answer = await client.get("/jobs")
    assert answer.status_code == 200 and answer.json() == sorted([ok, waiting])
    answer = await client.get("/jobs?expand")
    assert [j["ID"] for j in answer.json()] == sorted([ok, waiting])
    assert {j["ID"]: j["State"] for j in answer.json()} == {ok: SUCCESS, waiting: RUNNING}

    answer = await client.get(f"/jobs/{ok}")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json()["Priority"] == 3 and answer.json()["Progress"] == 100
    assert (await client.get(f"/jobs/{ok}/")).status_code == 200  # trailing slash, as Orthanc

    answer = await client.post(f"/jobs/{waiting}/pause")
    assert (answer.status_code, answer.content) == (200, b"{}")
    await wait_state(engine, waiting, PAUSED)
    assert (await client.post(f"/jobs/{waiting}/resume")).status_code == 200
    await driver.entered(waiting)
    assert (await client.post(f"/jobs/{waiting}/cancel")).status_code == 200
    job = await wait_state(engine, waiting, FAILURE)
    assert job["ErrorCode"] == 37
    assert (await client.post(f"/jobs/{waiting}/resubmit")).status_code == 200
    await wait_state(engine, waiting, SUCCESS)  # resubmitted: this driver then succeeds


async def test_error_answers(daemon):
    engine, driver, client = daemon
    ok = await _submit(engine, "success")
    await wait_state(engine, ok, SUCCESS)
    answer = await client.get(f"/jobs/{UNKNOWN}")
    assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17
    for action in ("pause", "resume", "cancel", "resubmit"):
        answer = await client.post(f"/jobs/{UNKNOWN}/{action}")
        assert answer.status_code == 400, action
    for action in ("resume", "resubmit"):
        answer = await client.post(f"/jobs/{ok}/{action}")
        assert answer.status_code == 400 and "Success" in answer.json()["Details"], action
    for action in ("pause", "cancel"):
        assert (await client.post(f"/jobs/{ok}/{action}")).status_code == 200
    answer = await client.get(f"/jobs/{ok}/pause")
    assert (answer.status_code, answer.headers["allow"]) == (405, "POST")
    answer = await client.post("/jobs")
    assert (answer.status_code, answer.headers["allow"]) == (405, "GET")
    answer = await client.delete(f"/jobs/{ok}")
    assert (answer.status_code, answer.headers["allow"]) == (405, "GET")
    assert (await client.post(f"/jobs/{ok}/nope")).status_code == 404


# -- against the capture -----------------------------------------------------------------------

def _captured_job(seq: int) -> dict:
    ex = next(e for e in exchanges(FOLDER) if e.seq == seq)
    assert ex.method == "GET" and ex.target.startswith("/jobs/"), ex.target
    return ex.response_json()


def _assert_same_shape(recorded: dict, ours: dict) -> None:
    assert set(ours) == set(recorded), f"keys: ours {sorted(ours)}, recorded {sorted(recorded)}"
    for key, value in recorded.items():
        assert type(ours[key]) is type(value), f"{key}: {ours[key]!r} vs recorded {value!r}"


# seq of the captured GET /jobs/{id} -> how to bring our job in the same state
SHAPES = {
    2: "success", 4: "success", 6: "failure", 8: "failure", 12: "running", 15: "paused",
    21: "canceled", 27: "running", 29: "paused", 31: "canceled",
}


@pytest.mark.parametrize("seq", sorted(SHAPES))
async def test_job_json_has_the_captured_shape(daemon, seq):
    engine, driver, client = daemon
    recorded = _captured_job(seq)
    how = SHAPES[seq]
    job_id = await _submit(
        engine, {"success": "success", "failure": "failure"}.get(how, "wait"), recorded["Type"],
        recorded["Priority"], content=recorded["Content"], progress=recorded["Progress"] / 100,
    )
    if how in ("success", "failure"):
        await wait_state(engine, job_id, recorded["State"])
    else:
        await driver.entered(job_id)
        await anyio.sleep(0.005)  # some runtime, so that a running job has an ETA
        if how == "paused":
            await engine.pause(job_id)
        elif how == "canceled":
            await engine.cancel(job_id)
        await wait_state(engine, job_id, recorded["State"])
    ours = (await client.get(f"/jobs/{job_id}")).json()
    _assert_same_shape(recorded, ours)
    if how == "failure":  # the plugin gives no details; we say what went wrong
        assert recorded["ErrorDetails"] == "" and ours["ErrorDetails"]
        recorded = {k: v for k, v in recorded.items() if k != "ErrorDetails"}
    assert_json_matches(recorded, ours)


async def test_replay_of_the_captured_job_control(daemon):
    """The capture's client traffic in order: same statuses, same states and JSON shapes."""
    engine, driver, client = daemon
    ours_of: dict[str, str] = {}  # captured job id -> ours
    checked = 0
    for ex in exchanges(FOLDER):
        if ex.record["channel"] != "client-a":
            continue
        label = ex.record["label"]
        if ex.method == "POST" and ex.target.startswith("/transfers/"):
            query = orjson.loads(ex.request_body())
            outcome = ("success" if "will succeed" in label else
                       "failure" if ("does not have" in label or "unreachable" in label) else "wait")
            job_type = "PullTransfer" if ex.target == "/transfers/pull" else "PushTransfer"
            ours_of[ex.response_json()["ID"]] = await _submit(
                engine, outcome, job_type, query.get("Priority", 0), progress=5 / 11)
            continue
        parts = ex.target.strip("/").split("/")
        assert parts[0] == "jobs", ex.target
        if len(parts) == 1:
            answer = await client.get("/jobs")
            assert answer.status_code == ex.status == 200
            assert answer.json() == sorted(answer.json()) and set(ours_of.values()) <= set(answer.json())
            continue
        job_id = ours_of.get(parts[1], parts[1])
        if len(parts) == 3:  # an action
            answer = await client.post(f"/jobs/{job_id}/{parts[2]}")
            assert answer.status_code == ex.status, f"[{ex.seq}] {label}: {answer.text}"
            if answer.status_code == 200:
                assert answer.json() == {}
            checked += 1
            continue
        recorded = ex.response_json()
        if ex.status != 200:
            assert (await client.get(f"/jobs/{job_id}")).status_code == ex.status
            continue
        if "right after" in label:
            continue  # a transient state of the plugin (stopping, or resubmitted and not yet run)
        if recorded["State"] == RUNNING:
            await driver.entered(job_id)
            await anyio.sleep(0.005)
        ours = await wait_state(engine, job_id, recorded["State"])
        ours = (await client.get(f"/jobs/{job_id}")).json()
        _assert_same_shape({k: v for k, v in recorded.items() if k != "Content"},
                           {k: v for k, v in ours.items() if k != "Content"})
        for key in ("State", "ErrorCode", "ErrorDescription", "Type", "Priority"):
            assert ours[key] == recorded[key], f"[{ex.seq}] {label}: {key}"
        checked += 1
    assert checked >= 20
    assert RANDOM_KEYS >= {"EstimatedTimeOfArrival", "CompletionTime"}
