"""Orthanc's /jobs routes over the jobs engine (`request.app.state.jobs`, spec 9).

As a real Orthanc: GET of an unknown job is 404, an action on an unknown job or an action the
job's state refuses (resume of a job that is not paused, resubmit of a job that has not failed)
is 400; pause/cancel of a finished job are accepted no-ops. Actions answer `{}`. Replicas
sharing an index answer the same: the engine reads jobs held elsewhere from the index.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api.core import route
from accelerator.api.http import json_answer
from accelerator.jobs.engine import JobsEngine


def _engine(request: Request) -> JobsEngine:
    return request.app.state.jobs


async def list_jobs(request: Request) -> Response:
    engine = _engine(request)
    if "expand" in request.query_params:
        return json_answer(await engine.fetch_all())
    return json_answer(await engine.fetch_ids())


async def get_job(request: Request) -> Response:
    return json_answer(await _engine(request).fetch(request.path_params["id"]))


async def pause_job(request: Request) -> Response:
    await _engine(request).pause(request.path_params["id"])
    return json_answer({}, compact=True)


async def resume_job(request: Request) -> Response:
    await _engine(request).resume(request.path_params["id"])
    return json_answer({}, compact=True)


async def cancel_job(request: Request) -> Response:
    await _engine(request).cancel(request.path_params["id"])
    return json_answer({}, compact=True)


async def resubmit_job(request: Request) -> Response:
    await _engine(request).resubmit(request.path_params["id"])
    return json_answer({}, compact=True)


def routes() -> list[Route]:
    return [
        route("/jobs", GET=list_jobs),
        route("/jobs/{id}", GET=get_job),
        route("/jobs/{id}/pause", POST=pause_job),
        route("/jobs/{id}/resume", POST=resume_job),
        route("/jobs/{id}/cancel", POST=cancel_job),
        route("/jobs/{id}/resubmit", POST=resubmit_job),
    ]
