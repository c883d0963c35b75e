"""Replication routes (ours; a real Orthanc and the real plugin have none of them):

- `POST /replicate`: submit a Replicate job. Body: `Source`, `Target` (see
  `accelerator.replication.sides`), optional `Selection` (a study-level `/tools/find` Query),
  `Follow`, `Compression` ("gzip" or "none", for the buckets of a push or pull) and `Priority`.
  Answers `{"ID", "Path"}` as any job creation.
- `POST /replication/entries` `{"Query": {...}}`: every instance of the selected studies with
  its size, MD5 and parents, in one answer (`{"Instances": [...]}`) — what a replication from
  this daemon needs to plan, without one request per instance.
- `POST /replication/md5s` `{"Instances": [IDs], "Settled": bool}`: the MD5 of each instance
  held (`{"Instances": {ID: MD5}}`), absent ones left out.

In gateway mode, entries and MD5s are those of the Orthanc behind this daemon (plus, unless
`Settled`, what this daemon has received and not yet forwarded).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api.core import route
from accelerator.api.http import json_answer, parse_json, read_body
from accelerator.replication import job as replicate
from accelerator.replication.ends import Selection
from accelerator.replication.local import LocalStore
from accelerator.replication.sides import MAX_IDS, describe, parse_side
from protocol.errors import BadRequest
from protocol.messages import COMPRESSIONS, Created, Resource

BODY_LIMIT = 16 * 1024 * 1024  # bytes of a request body (MAX_IDS instance IDs fit in 5 MB)
_ID_LENGTH = 44  # an Orthanc ID: 5 groups of 8 hex digits and 4 dashes


async def gateway_fetch(request: Request, resources: Iterable[Resource]) -> None:
    """Gateway mode: bring the named resources our store lacks from the Orthanc behind us."""
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        await gateway.ensure_local(resources)


def parse_replicate(body: Any, config) -> dict[str, Any]:
    """The job query of a `POST /replicate` body, normalised; `BadRequest` says what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object")
    for name in ("Source", "Target"):
        if name not in body:
            raise BadRequest(f'Field "{name}" is missing')
    source, target = parse_side(body["Source"], "Source", config), parse_side(body["Target"], "Target", config)
    if source == target:
        raise BadRequest("The source and the target are the same")
    selection = body.get("Selection", {})
    if not isinstance(selection, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in selection.items()):
        raise BadRequest('Field "Selection" must be an object of strings (a /tools/find Query)')
    follow = body.get("Follow", False)
    if not isinstance(follow, bool):
        raise BadRequest('Field "Follow" must be a Boolean')
    if follow and source["Type"] == "Folder":
        raise BadRequest("A storage folder has no changes log to follow")
    compression = body.get("Compression", "gzip")
    if compression not in COMPRESSIONS:
        raise BadRequest(f'Field "Compression" must be one of {", ".join(COMPRESSIONS)}')
    priority = body.get("Priority", 0)
    if type(priority) is not int:
        raise BadRequest('Field "Priority" must be an integer')
    return {"Source": source, "Target": target, "Selection": selection, "Follow": follow,
            "Compression": compression, "Priority": priority,
            "SourceName": describe(source), "TargetName": describe(target)}


async def post_replicate(request: Request) -> Response:
    body = parse_json(await read_body(request, BODY_LIMIT), error=BadRequest)
    query = parse_replicate(body, request.app.state.config)
    content = {"Source": query["SourceName"], "Target": query["TargetName"], "Selection": query["Selection"],
               "Follow": query["Follow"], "Phase": "Pending"}
    job_id = await request.app.state.jobs.submit(replicate.JOB_TYPE, query, query["Priority"], content)
    return json_answer(Created.job(job_id).to_json())


def _holder(request: Request):
    """Who answers for what this daemon holds: the gateway's Orthanc, or our store."""
    return getattr(request.app.state, "gateway", None) or LocalStore(request.app.state.store)


async def post_entries(request: Request) -> Response:
    body = parse_json(await read_body(request, BODY_LIMIT), error=BadRequest)
    query = body.get("Query", {}) if isinstance(body, dict) else None
    if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
        raise BadRequest('The body must be {"Query": {...}}, a study-level /tools/find Query')
    entries = await _holder(request).entries(Selection(query))
    return json_answer({"Instances": [e.to_json() for e in entries]}, compact=True)


async def post_md5s(request: Request) -> Response:
    body = parse_json(await read_body(request, BODY_LIMIT), error=BadRequest)
    ids = body.get("Instances") if isinstance(body, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_IDS or not all(
            isinstance(i, str) and len(i) <= _ID_LENGTH for i in ids):
        raise BadRequest(f'The body must be {{"Instances": [...]}}, at most {MAX_IDS} Orthanc IDs')
    settled = body.get("Settled", False) is True
    found = await _holder(request).md5s(ids, settled=settled)
    return json_answer({"Instances": found}, compact=True)


def routes() -> list[Route]:
    return [
        route("/replicate", POST=post_replicate),
        route("/replication/entries", POST=post_entries),
        route("/replication/md5s", POST=post_md5s),
    ]
