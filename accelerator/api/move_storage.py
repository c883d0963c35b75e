"""`POST /move-storage` of Orthanc's object-storage plugins, over our MoveStorage job.

As the plugin (Common/StoragePlugin.cpp `MoveStorage`, and `OrthancJob::SubmitFromRestApiPost`
of its C++ wrapper):

- the route exists only in HybridMode: otherwise any request gets the 404 of an unknown URI;
  with it, a method other than POST gets 405 (Allow: POST);
- a body that is not JSON, not an object with a `Resources` array, a `TargetStorage` that is
  not "file-system" or "object-storage", an item of `Resources` that is not a string, an
  `Asynchronous`/`Synchronous` that is not a Boolean or a `Priority` that is not an integer:
  400 Bad file format (15);
- an ID that is no instance, series, study or patient (tried in that order), or an empty one:
  404 Unknown resource (17), and no job;
- synchronous by default: waits for the job and answers its Content as the plugin builds it,
  the IDs grouped by level (`{"Studies": [...], "Instances": [...]}`); a job that fails answers
  the job's ErrorCode and ErrorDescription (500, OrthancStatus 1), with the job's ErrorDetails
  (which name the instance) as Details where the plugin repeats the description;
- `Asynchronous: true` (or `Synchronous: false`) answers `{"ID", "Path"}` at once.

Unlike the plugin, `Priority` is the job's priority (the plugin's wrapper submits `!Priority`),
and a synchronous request waits while the job is paused (the plugin's wrapper fails it with
error code 0 as soon as it sees a state other than Running or Success, Pending included).
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api.http import json_answer, parse_json, read_body
from accelerator.jobs import move_storage
from accelerator.jobs.engine import ERROR_DESCRIPTIONS, FINISHED, SUCCESS
from accelerator.store.hybrid import HybridStorage
from protocol.errors import BadFileFormat, JobFailed, MethodNotAllowed, UnknownResource
from protocol.messages import Created

JSON_LIMIT = 64 * 1024 * 1024
RESOURCES, TARGET_STORAGE = "Resources", "TargetStorage"
SYNCHRONOUS, ASYNCHRONOUS, PRIORITY = "Synchronous", "Asynchronous", "Priority"
_ANY_METHOD = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]  # (HEAD comes with GET)


def _parse(body: Any) -> tuple[list[Any], str]:
    if not isinstance(body, dict) or not isinstance(body.get(RESOURCES), list):
        raise BadFileFormat(f'A request to the move-storage endpoint must provide a JSON object with the field '
                            f'"{RESOURCES}" containing an array of resources to be sent')
    target = body.get(TARGET_STORAGE)
    if target not in move_storage.TARGETS:
        raise BadFileFormat(f'A request to the move-storage endpoint must provide a JSON object with the field '
                            f'"{TARGET_STORAGE}" set to "{move_storage.TARGETS[0]}" or "{move_storage.TARGETS[1]}"')
    return body[RESOURCES], target


def _options(body: dict[str, Any]) -> tuple[bool, int]:
    """`Synchronous`/`Asynchronous` and `Priority`, checked after the resources, as the plugin."""
    synchronous = True
    for key, means_synchronous in ((SYNCHRONOUS, True), (ASYNCHRONOUS, False)):
        if key in body:
            if not isinstance(body[key], bool):
                raise BadFileFormat(f'Option "{key}" must be Boolean')
            synchronous = body[key] == means_synchronous
    priority = body.get(PRIORITY, 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadFileFormat(f'Option "{PRIORITY}" must be an integer')
    return synchronous, priority


async def move_storage_endpoint(request: Request) -> Response:
    store = request.app.state.store
    if not isinstance(store.area.storage, HybridStorage):
        raise UnknownResource()  # the plugin registers the route in HybridMode only
    if request.method != "POST":
        raise MethodNotAllowed(headers={"Allow": "POST"})
    body = parse_json(await read_body(request, JSON_LIMIT), error=BadFileFormat)
    resources, target = _parse(body)
    groups = await to_thread.run_sync(move_storage.resolve, store.index, resources)
    synchronous, priority = _options(body)
    engine = request.app.state.jobs
    job_id = await engine.submit(move_storage.JOB_TYPE, body, priority, {**groups, TARGET_STORAGE: target})
    if not synchronous:
        return json_answer(Created.job(job_id).to_json())
    job = await engine.wait(job_id, FINISHED)
    if job["State"] != SUCCESS:
        raise JobFailed(job.get("ErrorDetails") or job.get("ErrorDescription", ""),
                        code=job.get("ErrorCode", 1),
                        description=job.get("ErrorDescription") or ERROR_DESCRIPTIONS.get(job.get("ErrorCode", 1), "Error"))
    return json_answer(groups)


def routes() -> list[Route]:
    # Every method reaches the endpoint: without HybridMode even a GET must get the 404 of an
    # unknown URI, not a 405.
    return [Route("/move-storage", move_storage_endpoint, methods=_ANY_METHOD)]
