"""The JSON objects of the transfers protocol (spec section 4), parsed strictly and serialised.

Parsers take already-decoded JSON values (dict/list/str/int) and return frozen dataclasses;
`to_json()` gives back plain dicts ready for any JSON encoder. Like the C++ plugin, parsers ignore
unknown fields, insist on JSON strings for byte sizes and offsets (spec 2.7) and raise
`BadFileFormat` (400) for a wrong shape, `ParameterOutOfRange` (400) for a compression name outside
{"gzip", "none"}. Where the plugin is lax and our daemon can be safely strict, we are strict: sizes
must be canonical decimals, MD5s 32 lowercase hex digits, instance IDs Orthanc IDs (they end up in
URIs and file names), and a push transaction may not declare an instance twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.errors import BadFileFormat, ParameterOutOfRange
from protocol.resources import Level, is_orthanc_id

GZIP = "gzip"
NONE = "none"
COMPRESSIONS = (GZIP, NONE)
# Between two accelerator daemons only, once the peer advertised it (never sent to the plugin,
# never accepted in a user's transfer query): see protocol/shuffle_zstd.py.
SHUFFLE_ZSTD = "shuffle-zstd"
WIRE_COMPRESSIONS = (GZIP, NONE, SHUFFLE_ZSTD)

MIB = 1024 * 1024
MAX_SIZE = 2**63 - 1  # the index stores sizes as SQLite int64; nothing real comes close
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]*)", re.ASCII)
_MD5 = re.compile(r"[0-9a-f]{32}", re.ASCII)
# What another server names with its own identifiers (job, transaction, originator): UUIDs in
# Orthanc and here; any short token of these characters is accepted, nothing that could carry
# megabytes into our answers and messages, nor a query or fragment into a URL.
_TOKEN = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}", re.ASCII)
_PATH = re.compile(r"(?:/[0-9A-Za-z._~-]{1,64}){1,8}", re.ASCII)
_SHOWN = 80  # characters of a refused value quoted in an error
_INT32 = (-(2**31), 2**31 - 1)


# --------------------------------------------------------------------------- scalar fields


def parse_compression(value: Any) -> str:
    """Exactly "gzip" or "none" (case-sensitive, as the plugin): a non-string is a bad format."""
    if not isinstance(value, str):
        raise BadFileFormat("Compression should be a string")
    if value not in COMPRESSIONS:
        raise ParameterOutOfRange(f'Valid compressions are "gzip" and "none", not {value!r}')
    return value


def parse_wire_compression(value: Any) -> str:
    """A bucket encoding on the wire (chunk requests, push transactions): the plugin's two, or one
    of ours that only our peers send once we advertised it (whether it is enabled is checked by
    the routes)."""
    if isinstance(value, str) and value in WIRE_COMPRESSIONS:
        return value
    return parse_compression(value)


def parse_size(value: Any, field: str = "Size") -> int:
    """A byte size or offset: a JSON string holding a canonical non-negative decimal."""
    if not isinstance(value, str):
        raise BadFileFormat(f"{field} should be a decimal string, not {type(value).__name__}")
    if len(value) > 20 or not _DECIMAL.fullmatch(value):  # 20 digits: beyond 2**64, no int() of megabytes
        raise BadFileFormat(f"{field} is not a non-negative decimal: {value!r}")
    number = int(value)
    if number > MAX_SIZE:
        raise BadFileFormat(f"{field} is too large: {value}")
    return number


def format_size(n: int) -> str:
    """Sizes travel as decimal strings (spec 2.7)."""
    return str(n)


def size_mb(n: int) -> int:
    """Bytes to MiB, rounded half away from zero, as the plugin's *SizeMB fields (spec 9.3)."""
    if n < 0:
        return -size_mb(-n)
    return (n + MIB // 2) // MIB


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise BadFileFormat(f"{what} should be a JSON object")
    return value


def _array(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise BadFileFormat(f"{what} should be a JSON array")
    return value


def _string(obj: Mapping[str, Any], key: str, what: str) -> str:
    if key not in obj:
        raise BadFileFormat(f"{what} has no {key}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadFileFormat(f"{key} should be a string")
    return value


def _optional_string(obj: Mapping[str, Any], key: str) -> str | None:
    if key not in obj:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise BadFileFormat(f"{key} should be a string")
    return value


def _matching(obj: Mapping[str, Any], key: str, what: str, pattern: re.Pattern[str], shape: str) -> str:
    value = _string(obj, key, what)
    if not pattern.fullmatch(value):
        shown = value if len(value) <= _SHOWN else f"{value[:_SHOWN]}... ({len(value)} characters)"
        raise BadFileFormat(f"{what} {key} is not {shape}: {shown!r}")
    return value


def _instance_id(obj: Mapping[str, Any], what: str) -> str:
    value = _string(obj, "ID", what)
    if not is_orthanc_id(value):
        raise BadFileFormat(f"{what} ID is not an Orthanc identifier: {value!r}")
    return value


# --------------------------------------------------------------------------- InstanceInfo


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """An instance as announced by lookup answers and push creations (spec 4.3)."""

    id: str
    size: int
    md5: str

    @classmethod
    def from_json(cls, value: Any) -> "InstanceInfo":
        obj = _object(value, "Instance")
        instance_id = _instance_id(obj, "Instance")
        if "Size" not in obj:
            raise BadFileFormat("Instance has no Size")
        size = parse_size(obj["Size"], "Size")
        md5 = _string(obj, "MD5", "Instance")
        if not _MD5.fullmatch(md5):
            raise BadFileFormat(f"MD5 is not 32 lowercase hex digits: {md5!r}")
        return cls(instance_id, size, md5)

    def to_json(self) -> dict[str, str]:
        return {"ID": self.id, "MD5": self.md5, "Size": format_size(self.size)}


def _parse_instances(value: Any) -> tuple[InstanceInfo, ...]:
    """An instance listed twice is undefined in the plugin (spec 17 q5); we refuse it."""
    instances = tuple(InstanceInfo.from_json(item) for item in _array(value, "Instances"))
    seen: set[str] = set()
    for info in instances:
        if info.id in seen:
            raise BadFileFormat(f"Instance declared twice: {info.id}")
        seen.add(info.id)
    return instances


# --------------------------------------------------------------------------- Resource


@dataclass(frozen=True, slots=True)
class Resource:
    """`{"Level", "ID"}` (spec 4.1). The level text is kept verbatim: job content echoes it, and
    /transfers/pull accepts a bad level (the job fails later), while lookup rejects it."""

    level: str
    id: str

    @property
    def parsed_level(self) -> Level:
        """Case-insensitive with aliases; ParameterOutOfRange (400) when unknown."""
        return Level.parse(self.level)

    @classmethod
    def from_json(cls, value: Any) -> "Resource":
        obj = _object(value, "Resource")
        return cls(level=_string(obj, "Level", "Resource"), id=_string(obj, "ID", "Resource"))

    def to_json(self) -> dict[str, str]:
        return {"ID": self.id, "Level": self.level}


def parse_lookup_request(value: Any) -> tuple[Resource, ...]:
    """Body of POST /transfers/lookup: a bare array of resources whose levels must be valid."""
    resources = tuple(Resource.from_json(item) for item in _array(value, "Lookup body"))
    for resource in resources:
        resource.parsed_level  # noqa: B018 -- raises ParameterOutOfRange on a bad level
    return resources


def lookup_request_to_json(resources: Iterable[Resource]) -> list[dict[str, str]]:
    return [r.to_json() for r in resources]


# --------------------------------------------------------------------------- TransferQuery


@dataclass(frozen=True, slots=True)
class TransferQuery:
    """Body of POST /transfers/pull and /transfers/send (spec 4.2).

    `priority`, `originator` and `sender_transfer_id` are None when absent, so that `to_json()`
    reproduces what was sent (the bidirectional trigger carries an Originator and no Priority).
    `strict` (our `"StrictCompression": true`, a field the plugin ignores) keeps exactly the
    compression asked for: otherwise "gzip" to a peer that advertises a better codec uses it.
    """

    resources: tuple[Resource, ...]
    peer: str
    compression: str
    priority: int | None = None
    originator: str | None = None
    sender_transfer_id: str | None = None
    strict: bool = False

    @property
    def job_priority(self) -> int:
        return 0 if self.priority is None else self.priority

    @classmethod
    def from_json(cls, value: Any) -> "TransferQuery":
        obj = _object(value, "Transfer query")
        if "Resources" not in obj:
            raise BadFileFormat("Transfer query has no Resources")
        resources = tuple(Resource.from_json(r) for r in _array(obj["Resources"], "Resources"))
        peer = _string(obj, "Peer", "Transfer query")
        if "Compression" not in obj:
            raise BadFileFormat("Transfer query has no Compression")
        compression = parse_compression(obj["Compression"])
        return cls(
            resources=resources,
            peer=peer,
            compression=compression,
            priority=_parse_priority(obj),
            originator=_optional_string(obj, "Originator"),
            sender_transfer_id=_optional_string(obj, "SenderTransferID"),
            strict=_parse_strict(obj),
        )

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Compression": self.compression,
            "Peer": self.peer,
            "Resources": [r.to_json() for r in self.resources],
        }
        if self.priority is not None:
            body["Priority"] = self.priority
        if self.originator is not None:
            body["Originator"] = self.originator
        if self.sender_transfer_id is not None:
            body["SenderTransferID"] = self.sender_transfer_id
        if self.strict:
            body["StrictCompression"] = True
        return body


def _parse_strict(obj: Mapping[str, Any]) -> bool:
    value = obj.get("StrictCompression", False)
    if not isinstance(value, bool):
        raise BadFileFormat("StrictCompression should be a Boolean")
    return value


def _parse_priority(obj: Mapping[str, Any]) -> int | None:
    if "Priority" not in obj:
        return None
    value = obj["Priority"]
    # bool is an int subclass in Python but a distinct type in JSON; floats and strings are 400.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadFileFormat("Priority should be an integer")
    if not _INT32[0] <= value <= _INT32[1]:
        raise BadFileFormat(f"Priority out of the 32-bit range: {value}")
    return value


# --------------------------------------------------------------------------- chunks and buckets


@dataclass(frozen=True, slots=True)
class Chunk:
    """Byte range `[offset, offset + size)` of one instance (spec 1, 4.4)."""

    instance_id: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    @classmethod
    def from_json(cls, value: Any) -> "Chunk":
        obj = _object(value, "Chunk")
        instance_id = _instance_id(obj, "Chunk")
        if "Offset" not in obj or "Size" not in obj:
            raise BadFileFormat("Chunk needs Offset and Size")
        return cls(instance_id, parse_size(obj["Offset"], "Offset"), parse_size(obj["Size"], "Size"))

    def to_json(self) -> dict[str, str]:
        return {"ID": self.instance_id, "Offset": format_size(self.offset), "Size": format_size(self.size)}


Bucket = tuple[Chunk, ...]
"""The chunks moved by exactly one HTTP request, in payload order."""


def parse_bucket(value: Any) -> Bucket:
    return tuple(Chunk.from_json(item) for item in _array(value, "Bucket"))


def bucket_to_json(bucket: Sequence[Chunk]) -> list[dict[str, str]]:
    return [chunk.to_json() for chunk in bucket]


def bucket_size(bucket: Iterable[Chunk]) -> int:
    """Length of the raw (uncompressed) payload of a bucket (spec 6.2)."""
    return sum(chunk.size for chunk in bucket)


# --------------------------------------------------------------------------- PushTransaction


@dataclass(frozen=True, slots=True)
class PushTransaction:
    """Body of POST /transfers/push (spec 4.5): bucket i is later PUT to `{Path}/i`."""

    instances: tuple[InstanceInfo, ...]
    buckets: tuple[Bucket, ...]
    compression: str

    @classmethod
    def from_json(cls, value: Any) -> "PushTransaction":
        obj = _object(value, "Push transaction")
        for key in ("Instances", "Buckets", "Compression"):
            if key not in obj:
                raise BadFileFormat(f"Push transaction has no {key}")
        if not isinstance(obj["Compression"], str):
            raise BadFileFormat("Compression should be a string")
        instances = _parse_instances(obj["Instances"])
        buckets = tuple(parse_bucket(b) for b in _array(obj["Buckets"], "Buckets"))
        return cls(instances, buckets, parse_wire_compression(obj["Compression"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "Buckets": [bucket_to_json(b) for b in self.buckets],
            "Compression": self.compression,
            "Instances": [i.to_json() for i in self.instances],
        }


def validate_push_plan(transaction: PushTransaction) -> None:
    """Refuse a plan that cannot rebuild every declared instance byte for byte.

    The plugin accepts any plan and lets PUT or the MD5 check at commit fail; we check at
    creation that buckets name only declared instances and cover each of them exactly once
    (no gap, no overlap, nothing past the end), so a bad pusher gets a 400 before sending data.
    """
    sizes = {info.id: info.size for info in transaction.instances}
    ranges: dict[str, list[tuple[int, int]]] = {iid: [] for iid in sizes}
    for index, bucket in enumerate(transaction.buckets):
        for chunk in bucket:
            if chunk.instance_id not in sizes:
                raise BadFileFormat(f"Bucket {index} names an undeclared instance: {chunk.instance_id}")
            if chunk.end > sizes[chunk.instance_id]:
                raise BadFileFormat(
                    f"Bucket {index} runs past the end of instance {chunk.instance_id}: "
                    f"{chunk.end} > {sizes[chunk.instance_id]}"
                )
            if chunk.size:
                ranges[chunk.instance_id].append((chunk.offset, chunk.end))
    for iid, spans in ranges.items():
        position = 0
        for start, end in sorted(spans):
            if start < position:
                raise BadFileFormat(f"Buckets overlap in instance {iid} at byte {start}")
            if start > position:
                raise BadFileFormat(f"Buckets leave bytes {position}..{start} of instance {iid} uncovered")
            position = end
        if position != sizes[iid]:
            raise BadFileFormat(f"Buckets leave bytes {position}..{sizes[iid]} of instance {iid} uncovered")


# --------------------------------------------------------------------------- lookup answer


@dataclass(frozen=True, slots=True)
class LookupAnswer:
    """Answer of POST /transfers/lookup (spec 3.2). The counters are derived, never trusted."""

    instances: tuple[InstanceInfo, ...]
    originator: str

    @classmethod
    def build(cls, instances: Iterable[InstanceInfo], originator: str) -> "LookupAnswer":
        """Deduplicated by ID and sorted ascending, as the plugin's map orders them."""
        unique = {info.id: info for info in instances}
        return cls(tuple(unique[k] for k in sorted(unique)), originator)

    @property
    def count_instances(self) -> int:
        return len(self.instances)

    @property
    def total_size(self) -> int:
        return sum(info.size for info in self.instances)

    @classmethod
    def from_json(cls, value: Any) -> "LookupAnswer":
        """The puller relies on Instances and Originator only; the counters are informative."""
        obj = _object(value, "Lookup answer")
        if "Instances" not in obj:
            raise BadFileFormat("Lookup answer has no Instances")
        instances = _parse_instances(obj["Instances"])
        return cls(instances, _matching(obj, "Originator", "Lookup answer", _TOKEN, "an identifier"))

    def to_json(self) -> dict[str, Any]:
        total = self.total_size
        return {
            "CountInstances": self.count_instances,
            "Instances": [i.to_json() for i in self.instances],
            "Originator": self.originator,
            "TotalSize": format_size(total),
            "TotalSizeMB": size_mb(total),
        }


# --------------------------------------------------------------------------- creation answers


@dataclass(frozen=True, slots=True)
class Created:
    """`{"ID", "Path"}`: answer of job creation (/transfers/pull, /send) and of push creation."""

    id: str
    path: str

    @classmethod
    def job(cls, job_id: str) -> "Created":
        return cls(job_id, f"/jobs/{job_id}")

    @classmethod
    def push_transaction(cls, transaction_id: str) -> "Created":
        return cls(transaction_id, f"/transfers/push/{transaction_id}")

    @classmethod
    def from_json(cls, value: Any) -> "Created":
        """A pusher only uses Path and a bidirectional sender only ID and Path (spec 3.5, 3.6).

        Both come from the peer and go into our URLs and answers: the ID must be a short
        identifier and the Path a short absolute path of plain segments.
        """
        obj = _object(value, "Creation answer")
        return cls(_matching(obj, "ID", "Creation answer", _TOKEN, "an identifier"),
                   _matching(obj, "Path", "Creation answer", _PATH, "a short absolute path"))

    def to_json(self) -> dict[str, str]:
        return {"ID": self.id, "Path": self.path}
