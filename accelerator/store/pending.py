"""Where object storage records the objects it has staged and not yet settled.

An object is written before the index row that names it (the row is the commit); a marker,
durable before the object is written, says "staged, not settled". Settling (the commit's
publish, or a discard) clears it. After a crash, recovery settles what is left: an object whose
row exists stays, the others go. Two homes for the markers, one interface:

- `LocalMarkers`: files in a folder of this daemon (one daemon owns its storage);
- `IndexMarkers`: rows of the shared index, for replicas: a replica that dies never comes back
  to its local folder, so its markers must be where any replica can settle them. Only markers
  older than `settle_after` are offered to recovery: younger ones may belong to a live replica
  still committing.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Protocol

from accelerator.store.storage import full_storage, unlink
from protocol.errors import InternalError

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SETTLE_AFTER = 3600.0  # seconds: longer than any commit takes, so recovery never races one


class PendingMarkers(Protocol):
    def mark(self, uuid: str) -> None:
        """Durably, and exclusively: InternalError if `uuid` is already staged."""

    def clear(self, uuid: str) -> None: ...

    def exists(self, uuid: str) -> bool: ...

    def settleable(self) -> list[str]:
        """The markers recovery may settle now."""


class LocalMarkers:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def mark(self, uuid: str) -> None:
        path = self.folder / uuid
        with full_storage():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise InternalError(f"Attachment {uuid} is already staged") from None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def clear(self, uuid: str) -> None:
        unlink(self.folder / uuid)

    def exists(self, uuid: str) -> bool:
        return (self.folder / uuid).is_file()

    def settleable(self) -> list[str]:
        return [p.name for p in self.folder.iterdir() if p.is_file() and _UUID.fullmatch(p.name)]


class IndexMarkers:
    def __init__(self, index, settle_after: float = SETTLE_AFTER):
        self.index = index
        self.settle_after = settle_after

    def mark(self, uuid: str) -> None:
        if self.index.is_pending(uuid):
            raise InternalError(f"Attachment {uuid} is already staged")
        self.index.mark_pending(uuid, time.time())

    def clear(self, uuid: str) -> None:
        self.index.clear_pending([uuid])

    def exists(self, uuid: str) -> bool:
        return self.index.is_pending(uuid)

    def settleable(self) -> list[str]:
        return self.index.pending_objects(before=time.time() - self.settle_after)
