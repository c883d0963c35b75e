"""The one exception hierarchy of accelerator, and how each error shows on the wire.

Every error a request can meet is an `OrthancError` subclass carrying the HTTP status and the
Orthanc error code (`OrthancStatus`) that a real Orthanc would answer with, so that peers and
clients written for Orthanc see the same statuses from us. This module is the only place where an
error is mapped to an HTTP status; the API layer renders any `OrthancError` with `as_json()`.

Errors that never reach the wire (a bad configuration, an index of another schema) also live here
so that the whole hierarchy reads in one page:

    AcceleratorError
    ├── ConfigError              bad configuration: the daemon refuses to start
    ├── IndexVersionError        index written by another schema version
    └── OrthancError             answered over HTTP (status, OrthancStatus, message)
        ├── BadRequest           400 / 8    malformed request (not JSON, wrong shape)
        ├── ParameterOutOfRange  400 / 3    a value outside its allowed set or range
        ├── BadParameterType     400 / 5    a GET argument of the wrong type
        ├── BadFileFormat        400 / 15   not DICOM, or a protocol object with bad fields
        │   └── InexistentTag    404 / 21   a DICOM file without a tag Orthanc requires
        ├── BadSequenceOfCalls   400 / 6    a call that does not fit the resource's state
        ├── BodyTooLarge         413 / 8    request body above the configured limit
        ├── Unauthorized         401 / 29   missing or wrong credentials
        ├── Forbidden            403 / 45   remote access not allowed
        ├── UnknownResource      404 / 17   unknown patient/study/series/instance/peer/...
        ├── MethodNotAllowed     405        wrong method on a known route (empty body + Allow)
        ├── NetworkProtocol      500 / 9    a peer answered something the protocol forbids
        ├── CorruptedFile        500 / 20   MD5 mismatch, stored file unreadable
        ├── InternalError        500 / -1
        ├── ServiceBusy          503 / 36   every slot taken; retry later (Retry-After)
        ├── JobFailed            500 / the job's ErrorCode: a job run synchronously failed
        ├── UnknownDicomTag      400 / 27   a tag name the dictionary does not know
        ├── FullStorage          507 / 14   no space left for what was sent (as Orthanc)
        ├── DatabaseUnavailable  503 / 36   the PostgreSQL index cannot be reached (transient)
        └── DatabaseCannotSerialize 503 / 42  a transaction kept conflicting; retry later
"""

from __future__ import annotations

import errno
from typing import Any


class AcceleratorError(Exception):
    """Base of every error raised on purpose by accelerator."""


class ConfigError(AcceleratorError):
    """A configuration option is missing, malformed or out of range."""


class IndexVersionError(AcceleratorError):
    """The SQLite index was written with another schema version than this program's."""


class OrthancError(AcceleratorError):
    """An error answered over HTTP with Orthanc's status code and error JSON."""

    http_status: int = 500
    orthanc_status: int = -1
    message: str = "Internal error"

    def __init__(self, details: str = "", *, headers: dict[str, str] | None = None):
        super().__init__(details or self.message)
        self.details = details
        self.headers = headers or {}

    def as_json(self, method: str, uri: str) -> dict[str, Any]:
        """The body a real Orthanc answers with `HttpDescribeErrors` on (spec 2.6)."""
        body: dict[str, Any] = {
            "HttpError": _HTTP_REASONS.get(self.http_status, "Error"),
            "HttpStatus": self.http_status,
            "Message": self.message,
            "Method": method,
            "OrthancError": self.message,
            "OrthancStatus": self.orthanc_status,
            "Uri": uri,
        }
        if self.details:
            body["Details"] = self.details
        return body


class BadRequest(OrthancError):
    http_status, orthanc_status, message = 400, 8, "Bad request"


class ParameterOutOfRange(OrthancError):
    http_status, orthanc_status, message = 400, 3, "Parameter out of range"


class BadParameterType(OrthancError):
    http_status, orthanc_status, message = 400, 5, "Bad type for a parameter"


class BadFileFormat(OrthancError):
    http_status, orthanc_status, message = 400, 15, "Bad file format"


class InexistentTag(BadFileFormat):
    """A tag that must be there is absent, e.g. an uploaded file without StudyInstanceUID: Orthanc
    answers 404 "Inexistent tag" (`DicomMap::GetValue` in `DicomInstanceHasher`). A kind of bad
    file, so that the code that refuses a bad transferred file refuses this one too."""

    http_status, orthanc_status, message = 404, 21, "Inexistent tag"


class BadSequenceOfCalls(OrthancError):
    """E.g. a bucket PUT while its push transaction is being committed."""

    http_status, orthanc_status, message = 400, 6, "Bad sequence of calls"


class BodyTooLarge(OrthancError):
    http_status, orthanc_status, message = 413, 8, "Request body too large"


class Unauthorized(OrthancError):
    http_status, orthanc_status, message = 401, 29, "Bad credentials"


class Forbidden(OrthancError):
    http_status, orthanc_status, message = 403, 45, "Access to a resource is forbidden"


class UnknownResource(OrthancError):
    http_status, orthanc_status, message = 404, 17, "Unknown resource"


class MethodNotAllowed(OrthancError):
    http_status, orthanc_status, message = 405, 8, "Method not allowed"


class NetworkProtocol(OrthancError):
    http_status, orthanc_status, message = 500, 9, "Error in the network protocol"


class CorruptedFile(OrthancError):
    http_status, orthanc_status, message = 500, 20, "Corrupted file (e.g. inconsistent MD5 hash)"


class InternalError(OrthancError):
    http_status, orthanc_status, message = 500, -1, "Internal error"


class ServiceBusy(OrthancError):
    http_status, orthanc_status, message = 503, 36, "Service busy, retry later"


class FullStorage(OrthancError):
    """Orthanc answers 507 with error 14 when its storage area is full (ServerContext::Store)."""

    http_status, orthanc_status, message = 507, 14, "The file storage is full"


class JobFailed(OrthancError):
    """A job run on behalf of a synchronous request failed: its error code and description, as
    Orthanc's job wrapper rethrows them (e.g. `POST /move-storage`)."""

    http_status = 500

    def __init__(self, details: str, *, code: int, description: str):
        super().__init__(details)
        self.orthanc_status, self.message = code, description


class UnknownDicomTag(OrthancError):
    """A tag name the DICOM dictionary does not know. Orthanc answers it with HTTP 500; we answer
    400, since the name comes from the request."""

    http_status, orthanc_status, message = 400, 27, "Unknown DICOM tag"


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that means the storage is out of space (ENOSPC) or over its quota (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


_HTTP_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


class DatabaseUnavailable(OrthancError):
    """The index database (PostgreSQL) cannot be reached: server down, connection lost, no
    connection free in time. Transient: Orthanc answers 503 with error 36 and so do we."""

    http_status, orthanc_status, message = 503, 36, "The database is currently not available (probably a transient situation)"


class DatabaseCannotSerialize(OrthancError):
    """A transaction still met serialization failures or deadlocks after its retries: Orthanc's
    503 with error 42; the client may try again."""

    http_status, orthanc_status, message = (
        503, 42, "Database could not serialize access due to concurrent update, the transaction should be retried")
