"""Chunk URIs and the byte ranges behind them (spec 3.3, 6.1, 6.2).

A bucket travels as one GET `/transfers/chunks/<id1>.<id2>...?offset=O&size=S&compression=C`
(pull) or one PUT body (push). Because only the first chunk of a planned bucket may start inside
an instance and only the last may stop inside one, `(ids, offset, size)` plus the instance sizes
determine every chunk; `resolve_ranges` recomputes them on the source side with the plugin's
general skip rules, and `scatter_ranges` says where each payload byte goes on the receiver side.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from protocol.errors import BadParameterType, UnknownResource
from protocol.messages import GZIP, NONE, Bucket, Chunk, bucket_size, parse_wire_compression

CHUNKS_PATH = "/transfers/chunks/"
_IDS = re.compile(r"[.0-9a-f-]+", re.ASCII)
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)  # what boost::lexical_cast<int> accepts
_INT32_MAX = 2**31 - 1
_MAX_LEVEL = 19  # zstd's highest ordinary level


def chunk_uri(bucket: Sequence[Chunk], compression: str, level: int | None = None) -> str:
    """The pull URI of a bucket, argument order exactly offset, size, compression (spec 6.1).

    `level` (an extra argument, which the plugin would ignore) asks one of our peers for a codec
    level chosen from the link's speed; it is never added for the plugin's two compressions.
    """
    if not bucket:
        raise ValueError("an empty bucket has no chunk URI")
    ids = ".".join(chunk.instance_id for chunk in bucket)
    extra = f"&level={level}" if level is not None and compression not in (GZIP, NONE) else ""
    return (
        f"{CHUNKS_PATH}{ids}?offset={bucket[0].offset}&size={bucket_size(bucket)}"
        f"&compression={compression}{extra}"
    )


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """What a GET /transfers/chunks asks for; `size` 0 means "to the end of the listed instances"."""

    instance_ids: tuple[str, ...]
    offset: int
    size: int
    compression: str
    level: int | None = None  # our codecs' level, asked by one of our peers (ignored for gzip)


def parse_chunk_request(ids_text: str, query: Mapping[str, str] | Iterable[tuple[str, str]]) -> ChunkRequest:
    """Apply the chunk server's argument rules (spec 3.3, wire-samples README section 7).

    `ids_text` is the path part after `/transfers/chunks/`. Arguments are read in order, the last
    occurrence wins and unknown ones are ignored, as in the plugin: `offset`/`size` must read as a
    signed 32-bit integer >= 0 (BadParameterType), `compression` is exactly `none` or `gzip`
    (ParameterOutOfRange), or a codec of ours (whether it is enabled is the route's business),
    and `level`, ours too, a small integer (BadParameterType). IDs are not checked against the store here: like the plugin, an unknown
    ID is only an error (404) if the requested range reaches it.
    """
    if not _IDS.fullmatch(ids_text):
        raise UnknownResource(f"Not a list of instance identifiers: {ids_text!r}")
    offset, size, compression, level = 0, 0, "none", None
    pairs = query.items() if isinstance(query, Mapping) else query
    for key, value in pairs:
        if key == "offset":
            offset = _size_argument(key, value)
        elif key == "size":
            size = _size_argument(key, value)
        elif key == "compression":
            compression = parse_wire_compression(value)
        elif key == "level":
            level = _level_argument(value)
    return ChunkRequest(tuple(ids_text.split(".")), offset, size, compression, level)


def parse_chunk_uri(uri: str) -> ChunkRequest:
    """Parse a whole request target, e.g. as the plugin sends it (`//transfers/chunks/...`)."""
    path, _, query = uri.partition("?")
    path = "/" + path.lstrip("/")
    if not path.startswith(CHUNKS_PATH):
        raise UnknownResource(f"Not a chunk URI: {uri!r}")
    return parse_chunk_request(path[len(CHUNKS_PATH):], parse_qsl(query, keep_blank_values=True))


def _size_argument(key: str, value: str) -> int:
    if len(value) <= 16 and _INT.fullmatch(value):  # short: int() of huge digit strings is slow
        number = int(value)
        if 0 <= number <= _INT32_MAX:
            return number
    raise BadParameterType(f'The "{key}" GET argument must be a non-negative 32-bit integer: {value!r}')


def _level_argument(value: str) -> int:
    if len(value) <= 2 and value.isascii() and value.isdigit() and 1 <= int(value) <= _MAX_LEVEL:
        return int(value)
    raise BadParameterType(f'The "level" GET argument must be an integer from 1 to {_MAX_LEVEL}: {value[:20]!r}')


@dataclass(frozen=True, slots=True)
class ReadRange:
    """`length` bytes of an instance starting at `start`, in payload order."""

    instance_id: str
    start: int
    length: int


def resolve_ranges(instances: Iterable[tuple[str, int]], offset: int, size: int) -> list[ReadRange]:
    """The ranges a chunk server reads for `(ids, offset, size)`, by the plugin's general rules.

    Instances are walked in order: while `offset` is at or past an instance's end it is reduced by
    that size and the instance skipped; then bytes are taken from `offset` to the instance end and
    from following whole instances, until `size` bytes are collected (`size` 0: no limit). Offsets
    past everything give an empty list. `instances` yields `(id, size)` and is consumed lazily, so
    a generator that looks sizes up in the store raises 404 only for instances the range reaches.
    """
    ranges: list[ReadRange] = []
    collected = 0
    pending = iter(instances)
    while size == 0 or collected < size:
        try:
            instance_id, instance_size = next(pending)
        except StopIteration:
            break
        if offset >= instance_size:
            offset -= instance_size
            continue
        length = instance_size - offset
        if size:
            length = min(length, size - collected)
        ranges.append(ReadRange(instance_id, offset, length))
        collected += length
        offset = 0
    return ranges


@dataclass(frozen=True, slots=True)
class ScatterRange:
    """Payload bytes `[payload_offset, payload_offset + length)` go to `instance_id` at
    `instance_offset`."""

    instance_id: str
    instance_offset: int
    length: int
    payload_offset: int


def scatter_ranges(bucket: Bucket | Sequence[Chunk]) -> list[ScatterRange]:
    """Where each byte of a bucket's raw payload lands (spec 6.2, 7.1); empty chunks are skipped.

    Shared by the puller (GET answers) and the push receiver (PUT bodies). The caller must first
    check that the decoded payload is exactly `bucket_size(bucket)` bytes (`codecs.decode` does).
    """
    ranges: list[ScatterRange] = []
    position = 0
    for chunk in bucket:
        if chunk.size:
            ranges.append(ScatterRange(chunk.instance_id, chunk.offset, chunk.size, position))
            position += chunk.size
    return ranges
