"""Attachments in object storage (S3 and S3-compatible servers, Azure Blob) through obstore.

The layout is the one of Orthanc's object-storage plugins, so that an Orthanc pointed at the same
bucket reads what we write and the reverse (`object_name`): `flat` (the default) stores
`<RootPath>/<uuid>.dcm`, `legacy` stores `<RootPath>/ab/cd/<uuid>`. An object holds exactly the
bytes given (`StorageArea` above applies Orthanc's `StorageCompression` format).

Staging: an object is written at its final name with a create-only put (never an overwrite) and
is "staged" until published. Before the put, an empty marker named after the UUID is written and
fsync'ed (with its folder) in `pending_folder`, a local folder: after a crash, `staged()` lists
the markers, and the store publishes (drops the marker) or discards (deletes object and marker)
each one, so an object nobody knows about is never left behind. Readers go through the index,
which names an attachment only once committed, so a staged object is invisible to them.

Large files (`stage_file` above `SINGLE_PUT_LIMIT`) go up in a multipart upload, reading the file
a part at a time (memory stays about PART_SIZE x the upload concurrency). obstore makes a
create-only put a single PUT that holds the whole body in memory, so for those the create-only
rule is a HEAD before the upload instead of a server-side condition (the UUIDs are random v4
ones we make, and the marker is created exclusively, so nothing of ours can race it).

Errors: a missing or short object is `CorruptedFile`; any other failure of the backend is an
`InternalError` naming the key and a short reason (never obstore's multi-line dump); `check()`
raises `ConfigError` naming the backend, the bucket and the endpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import AzureStore, S3Store

from accelerator.store.pending import LocalMarkers, PendingMarkers
from accelerator.store.storage import OBJECT_STORAGE, Storage
from protocol.errors import ConfigError, CorruptedFile, InternalError, OrthancError

log = logging.getLogger(__name__)

S3, AZURE = "s3", "azure"
FLAT, LEGACY = "flat", "legacy"
MIB = 1024 * 1024
SINGLE_PUT_LIMIT = 5 * MIB  # up to this size, one create-only PUT (obstore holds the body in memory)
PART_SIZE = 5 * MIB  # multipart part size (S3's minimum)
UPLOAD_CONCURRENCY = 4  # parts in flight per multipart upload (bounded by MaxConnections)
LIST_PAGE = 1000
CHECK_PREFIX = ".accelerator-check"  # `check()` lists this (empty) prefix: one cheap round trip

UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_MD5 = re.compile(r"[0-9a-f]{32}")
_UUID = re.compile(UUID_PATTERN)
_FLAT_NAME = re.compile(rf"({UUID_PATTERN})\.dcm")
_NO_BUCKET = re.compile(r"NoSuchBucket|ContainerNotFound")
_LEGACY_NAME = re.compile(rf"([0-9a-f]{{2}})/([0-9a-f]{{2}})/({UUID_PATTERN})")


@dataclass(frozen=True)
class ObjectStorageSettings:
    """The `AwsS3Storage` / `AzureBlobStorage` sections of Orthanc's object-storage plugins."""

    kind: str = S3  # "s3" | "azure"
    bucket_name: str = ""  # S3
    region: str = ""
    access_key: str = ""
    secret_key: str = ""
    endpoint: str = ""  # empty: AWS's endpoint of the region
    virtual_addressing: bool = True  # Orthanc's default; False for most S3-compatible servers
    root_path: str = ""  # both
    storage_structure: str = FLAT  # "flat" | "legacy"
    connection_timeout: float = 30.0  # seconds
    request_timeout: float = 1200.0  # seconds, a whole request (body included)
    max_connections: int = 0  # idle connections kept per host (0: obstore's default)
    max_retries: int = 3
    connection_string: str = ""  # Azure
    container_name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (S3, AZURE):
            raise ConfigError(f"Object storage: unknown kind {self.kind!r} (expected 's3' or 'azure')")
        if self.storage_structure not in (FLAT, LEGACY):
            raise ConfigError(f"{self.backend}: StorageStructure must be 'flat' or 'legacy', "
                              f"not {self.storage_structure!r}")
        if not self.bucket:
            raise ConfigError(f"{self.backend}: {'ContainerName' if self.kind == AZURE else 'BucketName'} "
                              "is missing")
        if self.kind == AZURE and not self.connection_string:
            raise ConfigError(f"{self.backend}: ConnectionString is missing")

    @property
    def backend(self) -> str:
        return "Azure Blob storage" if self.kind == AZURE else "AWS S3 storage"

    @property
    def bucket(self) -> str:
        return self.container_name if self.kind == AZURE else self.bucket_name

    @property
    def bucket_word(self) -> str:
        return "container" if self.kind == AZURE else "bucket"

    @property
    def endpoint_url(self) -> str:
        """Where requests go, for messages."""
        if self.kind == AZURE:
            return _azure_endpoint(parse_connection_string(self.connection_string))
        return _s3_endpoint(self.endpoint) or f"https://s3.{self.region or 'us-east-1'}.amazonaws.com"


def object_name(uuid: str, root_path: str = "", structure: str = FLAT) -> str:
    """The object name Orthanc's object-storage plugin gives to a DICOM attachment."""
    if not _UUID.fullmatch(uuid):
        raise ValueError(f"Not an attachment UUID: {uuid!r}")
    name = f"{uuid}.dcm" if structure == FLAT else f"{uuid[0:2]}/{uuid[2:4]}/{uuid}"
    root = root_path.strip("/")
    return f"{root}/{name}" if root else name


def uuid_of(name: str, root_path: str = "", structure: str = FLAT) -> str | None:
    """The UUID of an attachment's object name, None for a name that is not one."""
    root = root_path.strip("/")
    if root:
        if not name.startswith(root + "/"):
            return None
        name = name[len(root) + 1:]
    if structure == FLAT:
        match = _FLAT_NAME.fullmatch(name)
        return match.group(1) if match else None
    match = _LEGACY_NAME.fullmatch(name)
    if match and match.group(3).startswith(match.group(1) + match.group(2)):
        return match.group(3)
    return None


def object_storage(settings: ObjectStorageSettings, pending_folder: Path) -> ObjectStorage:
    """The storage described by `settings` (no request made: call `check()` at start)."""
    return ObjectStorage(settings, make_store(settings), pending_folder)


def make_store(settings: ObjectStorageSettings) -> Any:
    """The obstore store of the settings: an S3Store or an AzureStore (ConfigError if obstore
    refuses the settings, e.g. an account key that is not base64)."""
    try:
        return _make_store(settings)
    except Exception as exc:
        raise ConfigError(f"{settings.backend}: {settings.bucket_word} {settings.bucket!r}: "
                          f"invalid settings: {short_reason(exc)}") from None


def _make_store(settings: ObjectStorageSettings) -> Any:
    client: dict[str, Any] = {
        "connect_timeout": timedelta(seconds=settings.connection_timeout),
        "timeout": timedelta(seconds=settings.request_timeout),
    }
    if settings.max_connections > 0:
        client["pool_max_idle_per_host"] = str(settings.max_connections)
    retry = {"max_retries": max(0, settings.max_retries)}
    if settings.kind == AZURE:
        config = _azure_config(parse_connection_string(settings.connection_string))
        if config.get("use_emulator") or config.get("endpoint", "").startswith("http://"):
            client["allow_http"] = True
        return AzureStore(settings.container_name, config=config, client_options=client, retry_config=retry)
    config: dict[str, Any] = {
        "region": settings.region or "us-east-1",
        "virtual_hosted_style_request": settings.virtual_addressing,
    }
    endpoint = _s3_endpoint(settings.endpoint)
    if endpoint:
        if endpoint.startswith("http://"):
            client["allow_http"] = True
        if settings.virtual_addressing:  # obstore wants the bucket in a virtual-hosted endpoint
            endpoint = _with_bucket_host(endpoint, settings.bucket_name)
        config["endpoint"] = endpoint
    if settings.access_key or settings.secret_key:
        config["access_key_id"] = settings.access_key
        config["secret_access_key"] = settings.secret_key
    return S3Store(settings.bucket_name, config=config, client_options=client, retry_config=retry)


class ObjectStorage(Storage):
    """Attachments as objects in a bucket (or an Azure container), Orthanc's plugin layout."""

    kind = OBJECT_STORAGE

    def __init__(self, settings: ObjectStorageSettings, store: Any, pending_folder: Path):
        self.settings = settings
        self.store = store
        self.markers: PendingMarkers = LocalMarkers(Path(pending_folder))
        self._committed = None
        self.root = settings.root_path.strip("/")
        concurrency = UPLOAD_CONCURRENCY
        if settings.max_connections > 0:
            concurrency = min(concurrency, settings.max_connections)
        self.upload_concurrency = concurrency

    def __repr__(self) -> str:
        s = self.settings
        return f"<ObjectStorage {s.backend} {s.bucket_word} {s.bucket!r} at {s.endpoint_url}>"

    def key(self, uuid: str) -> str:
        return object_name(uuid, self.root, self.settings.storage_structure)

    # -- start -------------------------------------------------------------------------------

    def check(self) -> None:
        """One cheap round trip (a listing of an empty prefix): ConfigError if the bucket is
        missing, the credentials are refused or the endpoint cannot be reached."""
        prefix = f"{self.root}/{CHECK_PREFIX}" if self.root else CHECK_PREFIX
        try:
            next(iter(obstore.list(self.store, prefix=prefix, chunk_size=1)), None)
        except Exception as exc:
            raise ConfigError(self._check_message(exc)) from None

    def _check_message(self, exc: Exception) -> str:
        s = self.settings
        where = f"{s.backend}: {s.bucket_word} {s.bucket!r} at {s.endpoint_url}"
        text = str(exc)
        reason = short_reason(exc)
        if _NO_BUCKET.search(text):
            return f"{where}: the {s.bucket_word} does not exist ({reason})"
        if re.search(r"status code: 40[13]\b|SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied|"
                     r"AuthenticationFailed|AuthorizationFailure", text):
            keys = "ConnectionString" if s.kind == AZURE else "AccessKey and SecretKey"
            return f"{where}: access refused, check {keys} ({reason})"
        if re.search(r"kind: (Connect|Timeout)|error sending request|dns error", text):
            return f"{where}: cannot reach the endpoint ({reason})"
        return f"{where}: {reason}"

    # -- writing -----------------------------------------------------------------------------

    def stage(self, uuid: str, data: bytes) -> None:
        key = self.key(uuid)
        self._mark(uuid)
        try:
            obstore.put(self.store, key, data, mode="create")
        except Exception as exc:
            self._failed_put(uuid, key, exc)

    def stage_file(self, uuid: str, source: Path, *, synced: bool = False) -> bool:
        """Uploaded (copied): the caller removes `source` after the commit. Returns False."""
        key = self.key(uuid)
        size = os.stat(source).st_size
        self._mark(uuid)
        try:
            if size <= SINGLE_PUT_LIMIT:
                obstore.put(self.store, key, Path(source), mode="create")
            else:  # obstore's create-only put would hold the whole file in memory
                if self._exists(key):
                    raise _Exists(key)
                obstore.put(self.store, key, Path(source), use_multipart=True, chunk_size=PART_SIZE,
                            max_concurrency=self.upload_concurrency)
        except Exception as exc:
            self._failed_put(uuid, key, exc)
        return False

    def unstage(self, uuid: str, source: Path) -> None:
        """`stage_file` copies, so `source` never left: only the staged object goes."""
        self.discard(uuid)

    def publish(self, uuid: str) -> None:
        self.markers.clear(uuid)

    def discard(self, uuid: str) -> None:
        if self._committed is not None and self._committed([uuid]):
            # Replicas: a commit whose answer was lost (the database went away) may have landed
            # all the same; its row names this object, which must stay. A database still away
            # raises here, and the marker is settled later by whichever replica recovers.
            self.markers.clear(uuid)
            return
        self._delete(self.key(uuid))  # object first: a crash in between leaves the marker
        self.markers.clear(uuid)

    def staged(self) -> list[str]:
        """What recovery may settle (replicas: only what a dead replica can have left)."""
        return self.markers.settleable()

    def is_staged(self, uuid: str) -> bool:
        return self.markers.exists(uuid)

    def share_markers(self, markers: PendingMarkers, committed) -> None:
        """Keep the markers of staged objects in `markers` (replicas: the shared index), and
        ask `committed(uuids)` (the index) before discarding a staged object."""
        self.markers = markers
        self._committed = committed

    def server_md5(self, uuid: str) -> tuple[int, str] | None:
        """The ETag when it looks like a single-part MD5 (not a multipart upload's, not Azure's)."""
        try:
            meta = obstore.head(self.store, self.key(uuid))
        except Exception as exc:  # missing, or a transient error: the caller reads back
            log.debug("HEAD of %s failed: %s", uuid, short_reason(exc))
            return None
        tag = str(meta.get("e_tag") or "").strip('"').lower()
        if not _MD5.fullmatch(tag):
            return None
        return int(meta["size"]), tag

    def remove(self, uuid: str) -> None:
        self._delete(self.key(uuid))
        self.markers.clear(uuid)

    def _mark(self, uuid: str) -> None:
        """The durable marker of a staged object, written before the object (exclusively)."""
        self.markers.mark(uuid)

    def _failed_put(self, uuid: str, key: str, exc: Exception) -> None:
        if isinstance(exc, (AlreadyExistsError, PreconditionError, _Exists)):
            self.markers.clear(uuid)  # the object is not ours: leave it, forget the marker
            raise InternalError(f"Object {key} already exists in {self._where()}: not overwritten") from None
        try:  # the put may have landed all the same (an answer lost): drop it, then the marker
            self._delete(key)
        except InternalError:
            pass  # the marker stays: recovery discards it
        else:
            self.markers.clear(uuid)
        raise self._error("write", key, exc) from None

    def _delete(self, key: str) -> None:
        try:
            obstore.delete(self.store, key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error("delete", key, exc) from None

    # -- reading -----------------------------------------------------------------------------

    def exists(self, uuid: str) -> bool:
        return self._exists(self.key(uuid))

    def _exists(self, key: str) -> bool:
        try:
            obstore.head(self.store, key)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._error("read", key, exc) from None
        return True

    def read(self, uuid: str) -> bytes:
        key = self.key(uuid)
        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError as exc:
            raise self._missing(key, exc) from None
        except Exception as exc:
            raise self._error("read", key, exc) from None

    def read_range(self, uuid: str, offset: int, length: int) -> bytes:
        """One ranged GET of exactly these bytes."""
        key = self.key(uuid)
        if length <= 0:
            if length < 0 or offset < 0:
                raise InternalError(f"Bad range {offset}+{length} for object {key}")
            if not self._exists(key):
                raise self._missing(key)
            return b""
        try:
            data = obstore.get_range(self.store, key, start=offset, length=length)
        except FileNotFoundError as exc:
            raise self._missing(key, exc) from None
        except Exception as exc:
            if re.search(r"status code: 416\b|InvalidRange", str(exc)):
                raise self._short(key) from None
            raise self._error("read", key, exc) from None
        if len(data) != length:
            raise self._short(key)
        return bytes(data)

    def list(self) -> Iterator[str]:
        """Published attachments under RootPath (names of another layout or tool ignored)."""
        structure = self.settings.storage_structure
        try:
            for page in obstore.list(self.store, prefix=self.root or None, chunk_size=LIST_PAGE):
                for meta in page:
                    uuid = uuid_of(meta["path"], self.root, structure)
                    # a marker checked after the listing saw its object: staged ones stay out
                    if uuid is not None and not self.markers.exists(uuid):
                        yield uuid
        except Exception as exc:
            raise self._error("list", self.root or "/", exc) from None

    # -- blobs: state that replicas share (push transactions), beside the attachments --------

    def blob_key(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def put_blob(self, name: str, data: bytes) -> None:
        key = self.blob_key(name)
        try:
            obstore.put(self.store, key, data)
        except Exception as exc:
            raise self._error("write", key, exc) from None

    def get_blob(self, name: str) -> bytes | None:
        """The blob, or None when there is none."""
        key = self.blob_key(name)
        try:
            return bytes(obstore.get(self.store, key).bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error("read", key, exc) from None

    def list_blobs(self, prefix: str) -> list[tuple[str, float]]:
        """(name relative to the root, last modified as a POSIX time) of the blobs under a prefix."""
        start = self.blob_key(prefix)
        skip = len(self.root) + 1 if self.root else 0
        try:
            return [(str(meta["path"])[skip:], meta["last_modified"].timestamp())
                    for page in obstore.list(self.store, prefix=start, chunk_size=LIST_PAGE) for meta in page]
        except Exception as exc:
            raise self._error("list", start, exc) from None

    def delete_blob(self, name: str) -> None:
        self._delete(self.blob_key(name))

    # -- errors ------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"{self.settings.bucket_word} {self.settings.bucket}"

    def _missing(self, key: str, exc: Exception | None = None) -> OrthancError:
        if exc is not None and _NO_BUCKET.search(str(exc)):  # not the object: the whole bucket
            return self._error("read", key, exc)
        return CorruptedFile(f"Missing object {key} in {self._where()}")

    def _short(self, key: str) -> CorruptedFile:
        return CorruptedFile(f"Object {key} in {self._where()} is shorter than the index says")

    def _error(self, verb: str, key: str, exc: Exception) -> InternalError:
        reason = short_reason(exc)
        log.warning("%s: cannot %s %s in %s: %s", self.settings.backend, verb, key, self._where(), reason)
        log.debug("obstore error: %s", exc)
        return InternalError(f"{self.settings.backend}: cannot {verb} {key} in {self._where()}: {reason}")


class _Exists(Exception):
    """The object of a multipart upload's name is already there."""


def short_reason(exc: BaseException) -> str:
    """One line out of obstore's error (status, S3/Azure error code, or the transport failure)."""
    text = str(exc)
    parts = []
    status = re.search(r"status code: (\d{3}(?: [A-Za-z][A-Za-z -]{0,40}[A-Za-z])?)", text)
    if status:
        parts.append(status.group(1))
    code = re.search(r"<Code>([^<]{1,80})</Code>", text)
    if code:
        parts.append(code.group(1))
    if parts:
        return " ".join(parts)
    if isinstance(exc, FileNotFoundError):
        return "not found"
    os_message = re.search(r'message: "([^"]{1,80})"', text)
    if os_message:
        return os_message.group(1)
    if re.search(r"kind: Timeout|timed out|deadline", text, re.IGNORECASE):
        return "timed out"
    if "dns error" in text:
        return "cannot resolve the host name"
    first = text.split("\n", 1)[0]
    first = re.sub(r"^.* - ", "", first)  # "Error performing GET <url> in 2ms - <what>"
    return first[:200] or type(exc).__name__


def _s3_endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip().rstrip("/")
    if endpoint and "://" not in endpoint:  # the AWS SDK takes a bare host and uses HTTPS
        endpoint = "https://" + endpoint
    return endpoint


def _with_bucket_host(endpoint: str, bucket: str) -> str:
    parts = urlsplit(endpoint)
    if parts.hostname and parts.hostname.startswith(bucket + "."):
        return endpoint
    return urlunsplit(parts._replace(netloc=f"{bucket}.{parts.netloc}"))


def parse_connection_string(text: str) -> dict[str, str]:
    """`Key=Value;...` of an Azure storage connection string (keys as written)."""
    fields = {}
    for item in text.split(";"):
        if "=" in item:
            name, value = item.split("=", 1)
            fields[name.strip()] = value.strip()
    return fields


def _azure_config(fields: dict[str, str]) -> dict[str, Any]:
    lower = {k.lower(): v for k, v in fields.items()}
    if lower.get("usedevelopmentstorage", "").lower() == "true":
        return {"use_emulator": True}
    config: dict[str, Any] = {}
    if "accountname" in lower:
        config["account_name"] = lower["accountname"]
    if "accountkey" in lower:
        config["account_key"] = lower["accountkey"]
    if "sharedaccesssignature" in lower:
        config["sas_key"] = lower["sharedaccesssignature"]
    endpoint = _azure_endpoint(fields)
    if endpoint:
        config["endpoint"] = endpoint
    return config


def _azure_endpoint(fields: dict[str, str]) -> str:
    lower = {k.lower(): v for k, v in fields.items()}
    if lower.get("usedevelopmentstorage", "").lower() == "true":  # obstore honours this variable
        emulator = os.environ.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000"
        return f"{emulator.rstrip('/')}/devstoreaccount1"
    if lower.get("blobendpoint"):
        return lower["blobendpoint"].rstrip("/")
    if "accountname" in lower:
        protocol = lower.get("defaultendpointsprotocol", "https")
        suffix = lower.get("endpointsuffix", "core.windows.net")
        return f"{protocol}://{lower['accountname']}.blob.{suffix}"
    return ""
