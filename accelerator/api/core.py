"""The subset of Orthanc's core REST API that peers, their tests and their users rely on
(spec 13.3 and 13.4): resources, instances upload/download, deletion, labels, statistics, system.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import Route

from accelerator import __version__
from accelerator.api.http import json_answer, read_body, receive_to_file
from accelerator.api.shapes import resource_json
from accelerator.store import FileToIngest, Store
from accelerator.store.schema import SCHEMA_VERSION
from protocol.errors import BadParameterType, BadRequest, UnknownResource
from protocol.resources import Level

Handler = Callable[[Request], Awaitable[Response]]
EMULATED_ORTHANC_VERSION = "1.12.4"  # the REST API level we answer like
_LABEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MEMORY_UPLOAD = 16 * 1024 * 1024  # larger uploads go through a file
MEGA = 1024 * 1024


def route(path: str, **handlers: Handler) -> Route:
    """One route per path, whatever its methods, so a wrong method gets 405 with the full Allow."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method  # HEAD comes with GET
        return await handlers[method](request)

    return Route(path, endpoint, methods=list(handlers))


def _store(request: Request) -> Store:
    return request.app.state.store


def _level(request: Request) -> Level:
    # `/instances` has its own route (it also takes POST), without a {level} parameter.
    return _LEVELS[request.path_params.get("level", "instances")]


_LEVELS = {level.plural: level for level in Level}
_LEVEL_PATTERN = "{level:level}"


class _Choice(Convertor):
    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class _LevelConvertor(_Choice):
    regex = "patients|studies|series|instances"


class _RelativeConvertor(_Choice):
    regex = "patient|study|series|studies|instances"


class _TransactionConvertor(_Choice):
    regex = "[.0-9a-f-]+"


class _DigitsConvertor(_Choice):
    regex = "[0-9]+"


register_url_convertor("level", _LevelConvertor())
register_url_convertor("relative", _RelativeConvertor())
register_url_convertor("txid", _TransactionConvertor())
register_url_convertor("digits", _DigitsConvertor())


# -- system ------------------------------------------------------------------------------------

async def get_system(request: Request) -> Response:
    config = request.app.state.config
    return json_answer({
        "AcceleratorVersion": __version__,
        "ApiVersion": 22,
        "CheckRevisions": False,
        "DatabaseBackendPlugin": None,
        "DatabaseVersion": SCHEMA_VERSION,
        "DicomAet": config.dicom_aet,
        "DicomPort": config.dicom_port,
        "HasLabels": True,
        "HttpPort": config.http_port,
        "IsHttpServerSecure": config.authentication_enabled or not config.remote_access_allowed,
        "MaximumPatientCount": 0,
        "MaximumStorageSize": 0,
        "Name": config.name,
        "OverwriteInstances": config.overwrite_instances,
        "PluginsEnabled": True,
        "StorageAreaPlugin": None,
        "StorageCompression": config.storage_compression,
        "Version": EMULATED_ORTHANC_VERSION,
    })


async def get_statistics(request: Request) -> Response:
    stats = await to_thread.run_sync(_store(request).statistics)
    return json_answer({
        "CountInstances": stats["instances"],
        "CountPatients": stats["patients"],
        "CountSeries": stats["series"],
        "CountStudies": stats["studies"],
        "TotalDiskSize": str(stats["disk_size"]),
        "TotalDiskSizeMB": stats["disk_size"] // 1048576,  # Orthanc floors here
        "TotalUncompressedSize": str(stats["uncompressed_size"]),
        "TotalUncompressedSizeMB": stats["uncompressed_size"] // 1048576,
    })


# -- resources ---------------------------------------------------------------------------------

def _requested_tags(request: Request) -> list[str] | None:
    raw = request.query_params.get("requested-tags") or request.query_params.get("RequestedTags")
    return [t for t in raw.split(";") if t] if raw else None


_SIZE_T_MAX = 2**64 - 1  # Orthanc reads `since` and `limit` with boost::lexical_cast<size_t>
_SQLITE_MAX = 2**63 - 1  # SQLite's largest integer: a larger since/limit means the same as it


def _int_argument(request: Request, name: str) -> int | None:
    """A `since`/`limit` argument. Like Orthanc, anything but ASCII digits of a size_t is
    400 Bad type for a parameter (`"²".isdigit()` is true, and `int()` reads Arabic-Indic
    digits); a valid but huge value is clamped, never an SQLite OverflowError."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 20 and int(raw) <= _SIZE_T_MAX):
        raise BadParameterType(f"Argument {name!r} must be an integer from 0 to {_SIZE_T_MAX}, got {raw!r}")
    return min(int(raw), _SQLITE_MAX)


async def list_resources(request: Request) -> Response:
    store, level = _store(request), _level(request)
    expand = "expand" in request.query_params
    tags = _requested_tags(request)
    since, limit = _int_argument(request, "since") or 0, _int_argument(request, "limit")

    def work():
        ids = store.index.list_ids(level, since, limit)
        if not expand:
            return ids
        return [resource_json(store, store.resource(level, i), tags) for i in ids]

    return json_answer(await to_thread.run_sync(work))


async def get_resource(request: Request) -> Response:
    store, level, public_id = _store(request), _level(request), request.path_params["id"]
    tags = _requested_tags(request)
    return json_answer(
        await to_thread.run_sync(lambda: resource_json(store, store.resource(level, public_id), tags))
    )


async def delete_resource(request: Request) -> Response:
    store, level, public_id = _store(request), _level(request), request.path_params["id"]
    remaining = await to_thread.run_sync(store.delete, level, public_id)
    ancestor = None
    if remaining is not None:
        ancestor = {
            "ID": remaining.public_id,
            "Path": f"/{remaining.level.plural}/{remaining.public_id}",
            "Type": remaining.level.title,
        }
    return json_answer({"RemainingAncestor": ancestor})


async def get_relative(request: Request) -> Response:
    """`/{level}/{id}/{relative}`: an ancestor (`/instances/{id}/study`) or the descendants at a
    level (`/studies/{id}/instances`)."""
    store, level, public_id = _store(request), _level(request), request.path_params["id"]
    relative = request.path_params["relative"]
    tags = _requested_tags(request)

    def work():
        resource = store.resource(level, public_id)
        if relative == "statistics":
            return _resource_statistics(store, resource)
        ancestor, child = _ANCESTORS.get(relative), _LEVELS.get(relative)
        if ancestor is not None and ancestor < level:
            while resource.level > ancestor:
                resource = store.resource(Level(resource.level - 1), resource.parent)
            return resource_json(store, resource, tags)
        if child is not None and child > level:
            return [resource_json(store, store.resource(child, i), tags)
                    for i in store.index.descendants(resource, child)]
        raise UnknownResource(f"A {level.title.lower()} has no {relative}")

    return json_answer(await to_thread.run_sync(work))


_ANCESTORS = {"patient": Level.PATIENT, "study": Level.STUDY, "series": Level.SERIES}


def _resource_statistics(store, resource) -> dict[str, Any]:
    """Orthanc's `/{level}/{id}/statistics`: counts below the resource and the sizes of its
    DICOM files (stored and uncompressed)."""
    files = store.index.instance_files(resource.level, resource.public_id)
    stored = sum(f.attachment.stored_size for f in files)
    size = sum(f.attachment.size for f in files)
    answer: dict[str, Any] = {"CountInstances": len(files), "DiskSize": str(stored),
                              "DiskSizeMB": stored // MEGA, "UncompressedSize": str(size),
                              "UncompressedSizeMB": size // MEGA}
    for level, name in ((Level.STUDY, "CountStudies"), (Level.SERIES, "CountSeries")):
        if resource.level < level:
            answer[name] = store.index.count_descendants(resource, level)
    return answer


# -- instances ---------------------------------------------------------------------------------

async def post_instances(request: Request) -> Response:
    """Store one DICOM file, or every DICOM file of a ZIP (Orthanc >= 1.8.2: a body starting
    with a ZIP signature; the answer is then a JSON array, see accelerator.api.archive). Small
    bodies are handled in memory; larger ones (or bodies of unknown length) are streamed to a
    file first, so memory stays bounded by MEMORY_UPLOAD."""
    from accelerator.api import archive  # it imports this module
    from accelerator.zipfiles import is_zip

    store = _store(request)
    limit = request.app.state.config.maximum_request_body_bytes
    client = request.client.host if request.client else ""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= MEMORY_UPLOAD:
        body = await read_body(request, limit)
        if not body:
            raise BadRequest("The body is empty: POST /instances expects a DICOM file")
        if is_zip(body):
            return await archive.post_zip_instances(request, body)
        outcome = await to_thread.run_sync(lambda: store.ingest_bytes(body, remote_ip=client))
    else:
        path, size, md5 = await receive_to_file(request, limit, store.area.work)
        try:
            if not size:
                raise BadRequest("The body is empty: POST /instances expects a DICOM file")
            def first_bytes() -> bytes:
                with open(path, "rb") as f:
                    return f.read(4)

            if is_zip(await to_thread.run_sync(first_bytes)):
                return await archive.post_zip_instances(request, path)
            upload = FileToIngest(path, size, md5)
            outcome = await to_thread.run_sync(lambda: store.ingest_upload(upload, remote_ip=client))
        finally:
            path.unlink(missing_ok=True)  # adopted files were moved away already
    return json_answer(upload_answer(outcome))


def upload_answer(outcome) -> dict[str, str]:
    """Orthanc's answer for one stored instance (`POST /instances`, and each member of a ZIP)."""
    ids = outcome.parsed.ids
    return {
        "ID": ids.instance,
        "ParentPatient": ids.patient,
        "ParentSeries": ids.series,
        "ParentStudy": ids.study,
        "Path": f"/instances/{ids.instance}",
        "Status": outcome.status,
    }


async def get_instance_file(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    data = await to_thread.run_sync(store.read_file, public_id)
    return Response(
        data,
        media_type="application/dicom",
        headers={"Content-Disposition": f'filename="{public_id}.dcm"'},
    )


async def get_instance_md5(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    attachment = await to_thread.run_sync(store.attachment, public_id)
    return Response(attachment.md5, media_type="text/plain")


async def get_instance_metadata(request: Request) -> Response:
    store, public_id = _store(request), request.path_params["id"]
    metadata = await to_thread.run_sync(
        lambda: store.index.metadata(store.resource(Level.INSTANCE, public_id))
    )
    name = request.path_params.get("name")
    if name is not None:
        if name not in metadata:
            raise UnknownResource(f"Instance {public_id} has no metadata {name!r}")
        return Response(metadata[name], media_type="text/plain")
    return json_answer(metadata if "expand" in request.query_params else sorted(metadata))


# -- labels ------------------------------------------------------------------------------------

def _label(request: Request) -> str:
    label = request.path_params["label"]
    if not _LABEL.match(label):
        raise BadRequest(f"Invalid label {label!r}: use 1 to 64 letters, digits, '_' or '-'")
    return label


async def get_labels(request: Request) -> Response:
    store, level, public_id = _store(request), _level(request), request.path_params["id"]
    return json_answer(
        await to_thread.run_sync(lambda: store.index.labels(store.resource(level, public_id)))
    )


async def get_label(request: Request) -> Response:
    store, level, public_id, label = _store(request), _level(request), request.path_params["id"], _label(request)
    labels = await to_thread.run_sync(lambda: store.index.labels(store.resource(level, public_id)))
    if label not in labels:
        raise UnknownResource(f"{level.title} {public_id} has no label {label!r}")
    return Response(b"", media_type="text/plain")


async def put_label(request: Request) -> Response:
    store, level, public_id, label = _store(request), _level(request), request.path_params["id"], _label(request)
    await to_thread.run_sync(store.index.set_label, level, public_id, label, True)
    return Response(b"", media_type="text/plain")


async def delete_label(request: Request) -> Response:
    store, level, public_id, label = _store(request), _level(request), request.path_params["id"], _label(request)
    await to_thread.run_sync(store.index.set_label, level, public_id, label, False)
    return Response(b"", media_type="text/plain")


async def get_all_labels(request: Request) -> Response:
    return json_answer(await to_thread.run_sync(_store(request).index.all_labels))


def routes() -> list[Route]:
    resource = f"/{_LEVEL_PATTERN}/{{id}}"
    return [
        route("/system", GET=get_system),
        route("/statistics", GET=get_statistics),
        route("/tools/labels", GET=get_all_labels),
        route("/instances", GET=list_resources, POST=post_instances),
        route(f"/{_LEVEL_PATTERN}", GET=list_resources),
        route(resource, GET=get_resource, DELETE=delete_resource),
        route("/instances/{id}/file", GET=get_instance_file),
        route("/instances/{id}/attachments/dicom/md5", GET=get_instance_md5),
        route("/instances/{id}/metadata", GET=get_instance_metadata),
        route("/instances/{id}/metadata/{name}", GET=get_instance_metadata),
        route(f"{resource}/labels", GET=get_labels),
        route(f"{resource}/labels/{{label}}", GET=get_label, PUT=put_label, DELETE=delete_label),
        route(f"{resource}/{{relative:relative}}", GET=get_relative),
    ]
