"""Orthanc's HybridMode: attachments on a local disk and in object storage at once.

As in Orthanc's object-storage plugin: new attachments are written to the side that `HybridMode`
names (`WriteToFileSystem` or `WriteToObjectStorage`); reads try that side first and fall back to
the other; deletions remove the attachment from both. The index does not record where an
attachment lives: `POST /move-storage` moves attachments between the sides under the same UUID,
and a read finds them wherever they are. Recovery sees what is staged on either side (a move
stages on its target side).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from accelerator.store.storage import FILE_SYSTEM, OBJECT_STORAGE, Storage
from protocol.errors import CorruptedFile

WRITE_TO_FILE_SYSTEM = "WriteToFileSystem"
WRITE_TO_OBJECT_STORAGE = "WriteToObjectStorage"


class HybridStorage(Storage):
    def __init__(self, file_system: Storage, object_storage: Storage, mode: str):
        if mode not in (WRITE_TO_FILE_SYSTEM, WRITE_TO_OBJECT_STORAGE):
            raise ValueError(f"HybridMode {mode!r}")
        self.sides = {FILE_SYSTEM: file_system, OBJECT_STORAGE: object_storage}
        self.primary = file_system if mode == WRITE_TO_FILE_SYSTEM else object_storage
        self.secondary = object_storage if mode == WRITE_TO_FILE_SYSTEM else file_system
        self.kind = self.primary.kind

    def side(self, kind: str) -> Storage:
        """One side, by Orthanc's name ("file-system" or "object-storage")."""
        return self.sides[kind]

    def where(self, uuid: str) -> list[str]:
        """The sides that hold the attachment, primary first."""
        return [s.kind for s in (self.primary, self.secondary) if s.exists(uuid)]

    # -- writing: the primary side ------------------------------------------------------------

    def stage(self, uuid: str, data: bytes) -> None:
        self.primary.stage(uuid, data)

    def stage_file(self, uuid: str, source: Path, *, synced: bool = False) -> bool:
        return self.primary.stage_file(uuid, source, synced=synced)

    def unstage(self, uuid: str, source: Path) -> None:
        self.primary.unstage(uuid, source)

    def publish(self, uuid: str) -> None:
        for side in self._staging(uuid):
            side.publish(uuid)

    def discard(self, uuid: str) -> None:
        for side in self._staging(uuid):
            side.discard(uuid)

    def staged(self) -> list[str]:
        return sorted(set(self.primary.staged()) | set(self.secondary.staged()))

    def _staging(self, uuid: str) -> list[Storage]:
        """The sides where `uuid` is staged (the primary when nowhere: its calls are no-ops)."""
        found = [s for s in (self.primary, self.secondary) if s.is_staged(uuid)]
        return found or [self.primary]

    # -- reading: the primary side first ------------------------------------------------------

    def exists(self, uuid: str) -> bool:
        return self.primary.exists(uuid) or self.secondary.exists(uuid)

    def read(self, uuid: str) -> bytes:
        return self._read(lambda side: side.read(uuid))

    def read_range(self, uuid: str, offset: int, length: int) -> bytes:
        return self._read(lambda side: side.read_range(uuid, offset, length))

    def _read(self, read):
        """Primary, then secondary, then both once more: a move copies to its target before it
        removes the source, so an attachment that a move took from the secondary to the primary
        between our first two tries is found by the third (the fourth covers a move back)."""
        for side in (self.primary, self.secondary, self.primary):
            try:
                return read(side)
            except CorruptedFile:
                pass
        return read(self.secondary)

    def local_path(self, uuid: str) -> Path | None:
        fs = self.sides[FILE_SYSTEM]
        return fs.local_path(uuid) if fs.exists(uuid) else None

    def list(self) -> Iterator[str]:
        seen: set[str] = set()
        for side in (self.primary, self.secondary):
            for uuid in side.list():
                if uuid not in seen:
                    seen.add(uuid)
                    yield uuid

    # -- deleting: both sides ------------------------------------------------------------------

    def remove(self, uuid: str) -> None:
        self.primary.remove(uuid)
        self.secondary.remove(uuid)

    def close(self) -> None:
        self.primary.close()
        self.secondary.close()
