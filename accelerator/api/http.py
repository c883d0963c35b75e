"""Small HTTP helpers shared by every route: JSON answers, bounded body reading, errors."""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any

from anyio import to_thread

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from accelerator.store.area import UPLOAD_PREFIX
from accelerator.store.storage import removed_on_failure
from protocol.errors import (
    BadRequest,
    BodyTooLarge,
    FullStorage,
    InternalError,
    MethodNotAllowed,
    OrthancError,
    ServiceBusy,
    UnknownResource,
    is_disk_full,
)

log = logging.getLogger(__name__)

_PRETTY = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
_WRITE_BLOCK = 1 << 20
_METHOD_ORDER = ("GET", "POST", "PUT", "DELETE")  # HEAD is implicit, as in Orthanc


def json_answer(value: Any, *, compact: bool = False, status: int = 200) -> Response:
    """A JSON answer; keys sorted like jsoncpp, pretty unless `compact` (lookup answers)."""
    body = orjson.dumps(value, option=orjson.OPT_SORT_KEYS if compact else _PRETTY)
    return Response(body, status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BodyTooLarge(f"The body has {declared} bytes, the limit is {limit} bytes")
        except ValueError:
            raise BadRequest(f"Bad Content-Length header: {declared!r}") from None
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(f"The body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_to_file(request: Request, limit: int, folder: Path) -> tuple[Path, int, str]:
    """Stream the request body into a new file under `folder`; returns (path, size, MD5).

    For bodies too large to hold in memory; the file is removed at once if anything goes wrong
    (a full disk answers 507, as Orthanc).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"The body has {declared} bytes, the limit is {limit} bytes")
    path = folder / f"{UPLOAD_PREFIX}{uuid.uuid4()}"
    digest = hashlib.md5()
    size = 0
    pending: list[bytes] = []

    def write(f, data: bytes) -> None:
        digest.update(data)
        f.write(data)

    with removed_on_failure(path), open(path, "xb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"The body exceeds the limit of {limit} bytes")
            pending.append(chunk)
            if sum(map(len, pending)) >= _WRITE_BLOCK:
                await to_thread.run_sync(write, f, b"".join(pending))
                pending.clear()
        await to_thread.run_sync(write, f, b"".join(pending))
    return path, size, digest.hexdigest()


def parse_json(body: bytes, error: type[OrthancError] = BadRequest) -> Any:
    """The body as JSON; the core answers Bad request for invalid JSON, the plugin Bad file format."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise error(f"The body is not valid JSON: {exc}") from None


ECHO_LIMIT = 1000  # characters of the request an error answer or a log line echoes at most


def _cut(text: str) -> str:
    """`text`, or its first ECHO_LIMIT characters and its length: error details and URIs echo the
    request, and a 30 MB ID must not make a 30 MB answer (or log line)."""
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"


def error_body(error: OrthancError, method: str, uri: str, describe: bool = True) -> bytes:
    """Orthanc's error JSON with `Details` and `Uri` cut; empty for a 405 (like the real server)
    or when `HttpDescribeErrors` is off. The HTTP server's own answers use it too."""
    if isinstance(error, MethodNotAllowed) or not describe:
        return b""
    body = error.as_json(method, _cut(uri))
    if "Details" in body:
        body["Details"] = _cut(body["Details"])
    return orjson.dumps(body, option=_PRETTY)


def error_answer(request: Request, error: OrthancError, describe: bool = True) -> Response:
    """Orthanc's error answer. A 405 has an empty body and `Allow`, like the real server."""
    body = error_body(error, request.method, request.url.path, describe)
    return Response(body, status_code=error.http_status, headers=dict(error.headers),
                    media_type="application/json" if body else None)


async def handle_orthanc_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OrthancError)
    if exc.http_status >= 500:  # a busy answer is routine under load, not an error
        level = logging.INFO if isinstance(exc, ServiceBusy) else logging.ERROR
        log.log(level, "%s %s failed: %s", request.method, _cut(request.url.path), _cut(str(exc)))
    return error_answer(request, exc, request.app.state.describe_errors)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no route, wrong method) in Orthanc's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        methods = set((exc.headers or {}).get("Allow", "").split(", "))
        allow = ", ".join(m for m in _METHOD_ORDER if m in methods)
        return error_answer(request, MethodNotAllowed(headers={"Allow": allow}))
    if exc.status_code == 404:
        return error_answer(request, UnknownResource(), request.app.state.describe_errors)
    error = OrthancError(str(exc.detail))
    error.http_status = exc.status_code
    return error_answer(request, error, request.app.state.describe_errors)


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """A client hanging up mid-body is its own business, not a crash: one debug line, so that a
    client cannot flood the log with tracebacks. The answer goes nowhere; it ends the request."""
    log.debug("%s %s: the client disconnected", request.method, _cut(request.url.path))
    return error_answer(request, BadRequest("The client disconnected"), request.app.state.describe_errors)


async def handle_os_error(request: Request, exc: Exception) -> Response:
    """Safety net for a full disk met where nothing mapped it: 507 FullStorage in one log line,
    as where it is mapped. Any other OSError is unexpected."""
    if is_disk_full(exc):
        return await handle_orthanc_error(request, FullStorage(f"Cannot write: {exc.strerror}"))
    return await handle_unexpected(request, exc)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: logged once with its traceback, answered with Orthanc's 500 JSON. Registered for
    `Exception`, it runs in Starlette's ServerErrorMiddleware, which re-raises after answering;
    accelerator.api.server keeps uvicorn from logging that a second time."""
    log.error("%s %s crashed", request.method, _cut(request.url.path), exc_info=exc)
    error = InternalError(f"{type(exc).__name__}: {exc}")
    return error_answer(request, error, request.app.state.describe_errors)
