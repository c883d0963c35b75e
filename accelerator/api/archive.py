"""Routes of the Orthanc REST API: ZIP archives of patients, studies and series
(OrthancRestArchive.cpp), and the ZIP flavour of POST /instances (OrthancRestApi.cpp).

An archive is a streamed answer (no Content-Length): the plan (which files, under which names) is
made before the answer starts, so that an unknown resource is still a 404; then each `next()` of
`accelerator.zipfiles.archive_chunks` runs in a worker thread and hands about a megabyte of ZIP to
the event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from accelerator import zipfiles
from accelerator.api.core import route, upload_answer
from accelerator.api.http import json_answer, read_body
from accelerator.store import Store
from protocol.errors import BadFileFormat, BadRequest, OrthancError

ZIP_MIME = "application/zip"
_BODY_LIMIT = 16 << 20  # bytes of the JSON body of an archive request


class NotImplementedYet(OrthancError):
    """Orthanc's ErrorCode_NotImplemented (2, HTTP 501)."""

    http_status, orthanc_status, message = 501, 2, "Not implemented yet"


def _store(request: Request) -> Store:
    return request.app.state.store


async def _zip_answer(request: Request, public_ids: list[str], filename: str) -> Response:
    store = _store(request)
    entries = await to_thread.run_sync(zipfiles.archive_plan, store, public_ids)
    chunks = zipfiles.archive_chunks(store, entries)
    return StreamingResponse(
        _drive(chunks), media_type=ZIP_MIME, headers={"Content-Disposition": f'filename="{filename}"'},
    )


async def _drive(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The blocking generator, one step per worker thread call; closed whatever happens (a
    client that goes away cancels us between two steps: a step in flight is waited for)."""
    done = object()
    try:
        while (chunk := await to_thread.run_sync(next, chunks, done)) is not done:
            if chunk:
                yield chunk  # type: ignore[misc]
    finally:
        chunks.close()  # type: ignore[attr-defined]


# -- request arguments -------------------------------------------------------------------------

async def _json_body(request: Request, error: str) -> Any:
    """Orthanc's `ParseJsonRequest`: a body that is not JSON is Bad file format."""
    body = await read_body(request, _BODY_LIMIT)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadFileFormat(error) from None


def _job_parameters(body: Any) -> tuple[bool, bool]:
    """GetJobParameters' type checks: (synchronous, transcode)."""
    if not isinstance(body, dict):
        return True, False
    synchronous = True
    if "Synchronous" in body:
        synchronous = _boolean(body, "Synchronous")
    elif "Asynchronous" in body:
        synchronous = not _boolean(body, "Asynchronous")
    if "Priority" in body and (not isinstance(body["Priority"], int) or isinstance(body["Priority"], bool)):
        raise BadFileFormat("The field \"Priority\" must be an integer")
    if "Transcode" in body and not isinstance(body["Transcode"], str):
        raise BadFileFormat("The field \"Transcode\" must be a string")
    return synchronous, "Transcode" in body


def _refuse_unsupported(synchronous: bool, transcode: bool) -> None:
    """Where Orthanc would start a job or transcode, we answer Orthanc's NotImplemented (501)
    rather than a ZIP that is not what was asked for."""
    if transcode:
        raise NotImplementedYet("Transcoding archives is not supported by accelerator: ask without \"Transcode\"")
    if not synchronous:
        raise NotImplementedYet("Asynchronous archives (jobs) are not supported by accelerator: "
                                "ask for a synchronous archive, which is streamed")


def _boolean(body: dict, field: str) -> bool:
    if not isinstance(body[field], bool):
        raise BadFileFormat(f"The field \"{field}\" must be a Boolean")
    return body[field]


def _resources(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadFileFormat("Expected a list of strings (Orthanc identifiers)")
    return value


def _no_transcode(request: Request) -> None:
    if "transcode" in request.query_params:
        raise NotImplementedYet("Transcoding archives is not supported by accelerator: ask without ?transcode")


# -- routes ------------------------------------------------------------------------------------

async def get_archive(request: Request) -> Response:
    """GET /{patients|studies|series}/{id}/archive: always synchronous, named "{id}.zip"."""
    _no_transcode(request)
    public_id = request.path_params["id"]
    return await _zip_answer(request, [public_id], f"{public_id}.zip")


async def post_archive(request: Request) -> Response:
    """POST /{patients|studies|series}/{id}/archive with the job parameters."""
    public_id = request.path_params["id"]
    body = await _json_body(request, "Expected a JSON body")
    _refuse_unsupported(*_job_parameters(body))
    return await _zip_answer(request, [public_id], f"{public_id}.zip")


async def post_create_archive(request: Request) -> Response:
    """POST /tools/create-archive: a list of IDs, or {"Resources": [...], ...}; "Archive.zip"."""
    body = await _json_body(request, "Expected a list of resources to archive in the body")
    parameters = _job_parameters(body)
    if isinstance(body, list):
        resources = _resources(body)
    elif isinstance(body, dict):
        if "Resources" not in body:
            raise BadFileFormat("Missing field Resources in the JSON body")
        resources = _resources(body["Resources"])
    else:
        raise BadFileFormat("Expected a list of resources to archive in the body")
    _refuse_unsupported(*parameters)
    return await _zip_answer(request, resources, "Archive.zip")


async def get_create_archive(request: Request) -> Response:
    """GET /tools/create-archive?resources=id1,id2 (Orthanc 1.12.2)."""
    _no_transcode(request)
    raw = request.query_params.get("resources", "")
    resources = [r for r in raw.split(",") if r]
    if not resources:
        raise BadRequest("Missing the \"resources\" argument: a comma-separated list of Orthanc identifiers")
    return await _zip_answer(request, resources, "Archive.zip")


async def post_zip_instances(request: Request, source: bytes | Path) -> Response:
    """POST /instances with a ZIP body (already received, in memory or in a file): Orthanc's
    answer, a JSON array with one entry per DICOM member (`accelerator.zipfiles.ingest_zip`)."""
    store = _store(request)
    config = request.app.state.config
    client = request.client.host if request.client else ""
    result = await to_thread.run_sync(lambda: zipfiles.ingest_zip(
        store, source, max_total=config.maximum_request_body_bytes,
        max_member=config.transfers.max_instance_bytes, remote_ip=client,
    ))
    return json_answer([upload_answer(outcome) for outcome in result.outcomes])


def routes() -> list[Route]:
    archive = {"GET": get_archive, "POST": post_archive}
    return [
        route("/patients/{id}/archive", **archive),
        route("/studies/{id}/archive", **archive),
        route("/series/{id}/archive", **archive),
        route("/tools/create-archive", GET=get_create_archive, POST=post_create_archive),
    ]
