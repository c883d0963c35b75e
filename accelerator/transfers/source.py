"""The source role: answer lookups and serve chunks (spec 3.2, 3.3).

Sizes and MD5s come from the index (computed once at ingest), so a lookup never reads a DICOM
file; a chunk reads only the byte ranges it serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from accelerator.store import Attachment, Store
from protocol.chunks import ChunkRequest, ReadRange, resolve_ranges
from protocol.messages import InstanceInfo, Resource


def lookup(store: Store, resources: Iterable[Resource]) -> list[InstanceInfo]:
    """Every instance below the resources, once each, sorted by ID. Blocking."""
    found: dict[str, InstanceInfo] = {}
    for resource in resources:
        for item in store.index.instance_files(resource.parsed_level, resource.id):
            att = item.attachment
            found[item.instance_id] = InstanceInfo(item.instance_id, att.size, att.md5)
    return [found[i] for i in sorted(found)]


def plan_reads(store: Store, request: ChunkRequest) -> list[tuple[Attachment, ReadRange]]:
    """The ranges to read for a chunk request; an unknown ID is a 404 only if the range reaches it."""
    attachments: dict[str, Attachment] = {}

    def sizes() -> Iterator[tuple[str, int]]:
        for instance_id in request.instance_ids:
            att = attachments.get(instance_id) or store.attachment(instance_id)
            attachments[instance_id] = att
            yield instance_id, att.size

    ranges = resolve_ranges(sizes(), request.offset, request.size)
    return [(attachments[r.instance_id], r) for r in ranges]


def read(store: Store, reads: Sequence[tuple[Attachment, ReadRange]]) -> list[bytes]:
    """The bytes of the planned ranges, in payload order. Blocking."""
    return [store.read_range(att, r.start, r.length) for att, r in reads]


def read_blocks(store: Store, reads: Sequence[tuple[Attachment, ReadRange]], block: int) -> Iterator[bytes]:
    """The same bytes in pieces of at most `block`, for answers too large to hold in memory."""
    for att, r in reads:
        position = r.start
        end = r.start + r.length
        while position < end:
            length = min(block, end - position)
            yield store.read_range(att, position, length)
            position += length
