"""Where attachments live, and whether their bytes are still the ones the index recorded.

Orthanc's routes (OrthancRestResources.cpp, `GetAttachmentInfo` and `VerifyAttachment`):

- `GET /{level}/{id}/attachments/{name}/info`: `{Uuid, ContentType, UncompressedSize,
  UncompressedMD5, CompressedSize, CompressedMD5}` with `ETag: "<revision>-<md5>"` (our revision
  is always 0, as in an Orthanc without `CheckRevisions`). We add one field of our own,
  `Storage`: the sides holding the attachment ("file-system", "object-storage"; primary first;
  empty if the bytes are gone), always present whatever the configuration, so that a client
  reads one shape. Orthanc clients ignore a key they do not know.
- `POST /{level}/{id}/attachments/{name}/verify-md5`: reads the stored bytes, checks the MD5 of
  what is stored (`CompressedMD5`), then with compression the MD5 of the decompressed bytes.
  It answers `{}` when they match; otherwise Orthanc's handler answers nothing, and its REST
  layer then sends a bare `400 Bad Request` with an empty body (`RestApiOutput::Finalize` for a
  POST): so do we. A stored file that cannot be read at all is the read's own error
  (`CorruptedFile`, 500, as every read of a vanished attachment in this store).

`{name}` is translated as Orthanc does (`EnumerationDictionary::Translate`): an integer is the
content type itself (1 is DICOM), "dicom", "dicom-as-json" and "dicom-until-pixel-data" are the
built-in names (case-sensitive), anything else is `InexistentItem` (404, error 7). Only DICOM
attachments exist here, so another content type is "not found". As in Orthanc the lookup is by
ID whatever the `{level}` word of the URI (`LookupResource` ignores it): an unknown ID is
`UnknownResource` (404); a known resource without that attachment is 404 for `info` and the bare
400 for `verify-md5` (Orthanc's handler returns without answering in both "no attachment" cases).

Ours: `GET /storage` describes the configured storage (Orthanc has no such route; the
object-storage plugins have only `/move-storage`): where new attachments go, each side (the
folder; the backend, bucket, endpoint and layout, never a key or connection string) and, with
`?count`, how many attachments each side holds, listed once per side as a stream (memory stays
flat whatever the size of the bucket), next to the number of instances the index holds.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accelerator.api import core  # registers the {level:level} convertor
from accelerator.api.http import json_answer
from accelerator.store import Attachment, Store
from accelerator.store.hybrid import HybridStorage
from accelerator.store.index import DICOM_ATTACHMENT
from accelerator.store.storage import FILE_SYSTEM, OBJECT_STORAGE, FileSystemStorage, Storage, md5_of
from protocol.errors import CorruptedFile, OrthancError, UnknownResource

log = logging.getLogger(__name__)

_CONTENT_TYPES = {"dicom": 1, "dicom-as-json": 2, "dicom-until-pixel-data": 3}
_INTEGER = re.compile(r"-?[0-9]+")


class InexistentItem(OrthancError):
    """Orthanc's ErrorCode_InexistentItem: an attachment name it cannot translate."""

    http_status, orthanc_status, message = 404, 7, "Accessing an inexistent item"


def _store(request: Request) -> Store:
    return request.app.state.store


def content_type(name: str) -> int:
    """Orthanc's `StringToContentType`: an integer, or one of the built-in names."""
    stripped = name.strip(" ")
    if _INTEGER.fullmatch(stripped):
        return int(stripped)
    if name in _CONTENT_TYPES:
        return _CONTENT_TYPES[name]
    raise InexistentItem(f"Unknown attachment name: {name!r}")


def lookup(store: Store, public_id: str, name: str) -> Attachment | None:
    """The attachment, None if the resource exists without it; UnknownResource if it does not."""
    wanted = content_type(name)
    if not store.index.exists(public_id):
        raise UnknownResource(f"Unknown resource: {public_id}")
    if wanted != DICOM_ATTACHMENT:
        return None
    try:
        return store.index.attachment(public_id)
    except UnknownResource:  # a patient, study or series: no DICOM attachment
        return None


def sides_holding(storage: Storage, uuid: str) -> list[str]:
    """The sides holding an attachment, primary first (the one a read tries first)."""
    if isinstance(storage, HybridStorage):
        return storage.where(uuid)
    return [storage.kind] if storage.exists(uuid) else []


def verify(store: Store, attachment: Attachment) -> bool:
    """Orthanc's check: the MD5 of the stored bytes, then (compressed) of the DICOM bytes. Read
    as any read is (in HybridMode the primary side, then the other); uncompressed, a block at a
    time. Bytes gone entirely are the read's own CorruptedFile; wrong bytes are False."""
    storage = store.area.storage
    if not storage.exists(attachment.uuid):
        raise CorruptedFile(f"Missing attachment in the storage: {attachment.uuid}")
    try:
        if not attachment.compressed:
            return md5_of(storage, attachment.uuid, attachment.stored_size) == attachment.stored_md5
        stored = storage.read(attachment.uuid)  # compressed: read whole, as every read of it
        if hashlib.md5(stored).hexdigest() != attachment.stored_md5:
            return False
        return hashlib.md5(store.area.decode(attachment.uuid, stored, True)).hexdigest() == attachment.md5
    except CorruptedFile:
        return False


# -- routes ------------------------------------------------------------------------------------

async def get_attachment_info(request: Request) -> Response:
    store, public_id, name = _store(request), request.path_params["id"], request.path_params["name"]

    def work() -> tuple[Attachment, list[str]]:
        attachment = lookup(store, public_id, name)
        if attachment is None:
            raise UnknownResource(f"Resource {public_id} has no attachment {name!r}")
        return attachment, sides_holding(store.area.storage, attachment.uuid)

    attachment, sides = await to_thread.run_sync(work)
    answer = json_answer({
        "Uuid": attachment.uuid,
        "ContentType": DICOM_ATTACHMENT,
        "UncompressedSize": attachment.size,
        "UncompressedMD5": attachment.md5,
        "CompressedSize": attachment.stored_size,
        "CompressedMD5": attachment.stored_md5,
        "Storage": sides,
    })
    answer.headers["ETag"] = f'"0-{attachment.md5}"'
    return answer


async def post_verify_md5(request: Request) -> Response:
    store, public_id, name = _store(request), request.path_params["id"], request.path_params["name"]

    def work() -> bool:
        attachment = lookup(store, public_id, name)
        return attachment is not None and verify(store, attachment)

    if await to_thread.run_sync(work):
        log.info("The attachment %s of resource %s has the right MD5", name, public_id)
        return Response(b"{}", media_type="application/json")
    log.warning("The attachment %s of resource %s has bad MD5!", name, public_id)
    return Response(b"", status_code=400)  # Orthanc: a POST that answered nothing


async def get_storage(request: Request) -> Response:
    store, config = _store(request), request.app.state.config
    raw = request.query_params.get("count")
    count = raw is not None and raw.lower() not in ("false", "0")  # `?count` alone counts

    def work() -> dict[str, Any]:
        storage = store.area.storage
        sides = storage.sides if isinstance(storage, HybridStorage) else {storage.kind: storage}
        answer: dict[str, Any] = {
            "HybridMode": config.hybrid_mode or "Disabled",
            "StorageCompression": store.area.compress,
            "WriteTo": storage.kind,
            "Sides": {kind: describe_side(side) for kind, side in sides.items()},
        }
        if count:
            for kind, side in sides.items():
                answer["Sides"][kind]["Count"] = sum(1 for _ in side.list())
            answer["CountInstances"] = store.statistics()["instances"]
        return answer

    return json_answer(await to_thread.run_sync(work))


def describe_side(side: Storage) -> dict[str, Any]:
    """One side of the storage, without any secret."""
    if side.kind == FILE_SYSTEM and isinstance(side, FileSystemStorage):
        return {"Root": str(side.root.resolve())}
    settings = getattr(side, "settings", None)
    if side.kind != OBJECT_STORAGE or settings is None:
        return {}
    described = {
        "Backend": settings.backend,
        "Bucket": settings.bucket,
        "Endpoint": settings.endpoint_url,
        "RootPath": settings.root_path,
        "StorageStructure": settings.storage_structure,
    }
    if settings.region:
        described["Region"] = settings.region
    return described


def routes() -> list[Route]:
    attachment = "/{level:level}/{id}/attachments/{name}"
    return [
        core.route(f"{attachment}/info", GET=get_attachment_info),
        core.route(f"{attachment}/verify-md5", POST=post_verify_md5),
        core.route("/storage", GET=get_storage),
    ]
