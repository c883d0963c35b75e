"""The storage area: the content of attachments, over whichever `Storage` holds their bytes.

An attachment is staged (durable, referenced by nothing), then the index commits its row, then
it is published (`accelerator.store.storage`). A crash leaves either a staged attachment whose
row exists (`recover` publishes it) or one without a row (`recover` discards it): the storage and
the index always agree, and nothing outside the storage's root is ever touched because names
are UUIDs we made.

With `StorageCompression`, attachments hold Orthanc's zlib format: the uncompressed size as a
little-endian uint64, then a zlib stream (what Orthanc writes to disk or to a bucket alike).

A write that fails removes its partial file at once (on a full disk the space is needed now, not
at the next start) and a full disk is raised as `FullStorage` (507), as Orthanc answers.
"""

from __future__ import annotations

import hashlib
import io
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isal import isal_zlib

from accelerator.store.storage import FileSystemStorage, Storage, removed_on_failure, unlink
from protocol.errors import CorruptedFile

STAGING = FileSystemStorage.STAGING
UPLOAD_PREFIX = "upload-"  # large request bodies received into the work folder
_SIZE_PREFIX = struct.Struct("<Q")
_COMPRESSION_LEVEL = 2  # isal level 2: near zlib-6 ratio on DICOM, several times faster

__all__ = ["STAGING", "StorageArea", "StoredFile", "removed_on_failure"]


@dataclass(frozen=True)
class StoredFile:
    """A staged attachment, with the facts the index records."""

    uuid: str
    size: int  # DICOM bytes
    md5: str
    stored_size: int  # bytes in the storage
    stored_md5: str
    compressed: bool


class StorageArea:
    """Attachments in Orthanc's content format, kept by `storage`.

    `work` is a local folder for files on their way in (large uploads are received there); with
    the file-system storage it is the storage's own staging folder, so that adopting such a file
    is a rename.
    """

    def __init__(self, storage: Storage, compress: bool, work: Path):
        self.storage = storage
        self.compress = compress
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)

    def stage_bytes(self, data: bytes, md5: str | None = None) -> StoredFile:
        """Stage `data` (compressed if configured)."""
        uuid = str(uuidlib.uuid4())
        md5 = md5 or hashlib.md5(data).hexdigest()
        stored = _SIZE_PREFIX.pack(len(data)) + isal_zlib.compress(data, _COMPRESSION_LEVEL) \
            if self.compress else data
        stored_md5 = hashlib.md5(stored).hexdigest() if self.compress else md5
        self.storage.stage(uuid, stored)
        return StoredFile(uuid, len(data), md5, len(stored), stored_md5, self.compress)

    def stage_file(self, source: Path, size: int, md5: str, *, synced: bool = False) -> StoredFile:
        """Adopt an already verified file (e.g. a transfer's assembled instance).

        The caller guarantees `size` and `md5` (and, with `synced`, that the file is already
        fsync'ed). The file is moved into the storage when it can be (uncompressed, same
        filesystem), else copied and `source` stays until `forget_source`.
        """
        if self.compress:
            return self.stage_bytes(Path(source).read_bytes(), md5)
        uuid = str(uuidlib.uuid4())
        self.storage.stage_file(uuid, Path(source), synced=synced)
        return StoredFile(uuid, size, md5, size, md5, False)

    def sync_sources(self, sources: list[Path]) -> bool:
        """Make files about to be adopted by `stage_file` durable in one batch; True if done
        (stage them with `synced`). Compressed, they are read and written anew (`stage_bytes`
        syncs what it writes), so there is nothing to do here."""
        if self.compress or not sources:
            return False
        return self.storage.sync_sources([Path(s) for s in sources])

    def unstage(self, uuid: str, source: Path) -> None:
        """Undo `stage_file`: the source is back where it was, the staged copy is gone."""
        if Path(source).exists():
            self.storage.discard(uuid)
        else:
            self.storage.unstage(uuid, Path(source))

    def forget_source(self, source: Path) -> None:
        """After a commit: drop what `stage_file` left at the source (a copy was staged)."""
        unlink(Path(source))

    def publish(self, uuid: str) -> None:
        self.storage.publish(uuid)

    def discard(self, uuid: str) -> None:
        self.storage.discard(uuid)

    def remove(self, uuid: str) -> None:
        """Delete a published attachment (its row is already gone from the index)."""
        self.storage.remove(uuid)

    def recover(self, committed: Callable[[Iterable[str]], set[str]]) -> tuple[int, int]:
        """Finish or undo interrupted ingests; returns (published, deleted)."""
        for upload in self.work.glob(f"{UPLOAD_PREFIX}*"):  # bodies of requests that never ended
            unlink(upload)
        names = self.storage.staged()
        keep = committed(names)
        published = deleted = 0
        for name in names:
            if name in keep:
                self.publish(name)
                published += 1
            else:
                self.discard(name)
                deleted += 1
        return published, deleted

    def read(self, uuid: str, compressed: bool) -> bytes:
        """The DICOM bytes of an attachment."""
        return self.decode(uuid, self.storage.read(uuid), compressed)

    @staticmethod
    def decode(uuid: str, stored: bytes, compressed: bool) -> bytes:
        """The DICOM bytes of stored bytes; CorruptedFile if they do not decompress whole."""
        return _decompress(uuid, stored) if compressed else stored

    def read_range(self, uuid: str, compressed: bool, offset: int, length: int) -> bytes:
        """`length` DICOM bytes from `offset`; an uncompressed attachment is read without
        loading it whole (a range request on object storage)."""
        if compressed:
            return self.read(uuid, True)[offset : offset + length]
        return self.storage.read_range(uuid, offset, length)

    def open_dicom(self, uuid: str, compressed: bool) -> Path | BinaryIO:
        """Something a DICOM parser can read: the local file when there is one, else the bytes."""
        path = None if compressed else self.storage.local_path(uuid)
        return path if path is not None else io.BytesIO(self.read(uuid, compressed))


def _decompress(uuid: str, stored: bytes) -> bytes:
    if len(stored) < _SIZE_PREFIX.size:
        raise CorruptedFile(f"Compressed file {uuid} is truncated")
    (size,) = _SIZE_PREFIX.unpack_from(stored)
    try:
        data = zlib.decompress(stored[_SIZE_PREFIX.size :])
    except zlib.error as exc:
        raise CorruptedFile(f"Compressed file {uuid} is corrupted: {exc}") from None
    if len(data) != size:
        raise CorruptedFile(f"Compressed file {uuid} has {len(data)} bytes instead of {size}")
    return data
