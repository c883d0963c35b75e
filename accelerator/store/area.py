"""The storage area: one file per attachment, in Orthanc's layout, written atomically.

A file is first written and fsync'ed under `.staging/`, then the index commits its row, then the
file is renamed to `<root>/ab/cd/<uuid>`. A crash leaves either a staged file whose row exists
(`recover` finishes the rename) or one without a row (`recover` deletes it): the area and the
index always agree, and nothing outside `root` is ever touched because names are UUIDs we made.

With `StorageCompression`, files hold Orthanc's zlib format: the uncompressed size as a
little-endian uint64, then a zlib stream.

A write that fails removes its partial file at once (on a full disk the space is needed now, not
at the next start) and a full disk is raised as `FullStorage` (507), as Orthanc answers.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from isal import isal_zlib

from protocol.errors import CorruptedFile, FullStorage, InternalError, is_disk_full

STAGING = ".staging"
_SIZE_PREFIX = struct.Struct("<Q")
_COMPRESSION_LEVEL = 2  # isal level 2: near zlib-6 ratio on DICOM, several times faster


@dataclass(frozen=True)
class StoredFile:
    """A file written to the staging folder, with the facts the index records."""

    uuid: str
    size: int  # DICOM bytes
    md5: str
    stored_size: int  # bytes on disk
    stored_md5: str
    compressed: bool


class StorageArea:
    def __init__(self, root: Path, compress: bool):
        self.root = Path(root)
        self.compress = compress
        self.staging = self.root / STAGING
        self.staging.mkdir(parents=True, exist_ok=True)
        self._folders = threading.Lock()  # a fan-out folder is not dropped between mkdir and rename

    def path_of(self, uuid: str) -> Path:
        return self.root / uuid[0:2] / uuid[2:4] / uuid

    def stage_bytes(self, data: bytes, md5: str | None = None) -> StoredFile:
        """Write `data` under staging (compressed if configured) and fsync it."""
        uuid = str(uuidlib.uuid4())
        md5 = md5 or hashlib.md5(data).hexdigest()
        stored = _SIZE_PREFIX.pack(len(data)) + isal_zlib.compress(data, _COMPRESSION_LEVEL) \
            if self.compress else data
        stored_md5 = hashlib.md5(stored).hexdigest() if self.compress else md5
        path = self.staging / uuid
        with removed_on_failure(path), open(path, "xb") as f:
            f.write(stored)
            f.flush()
            os.fsync(f.fileno())
        return StoredFile(uuid, len(data), md5, len(stored), stored_md5, self.compress)

    def stage_file(self, source: Path, size: int, md5: str, *, synced: bool = False) -> StoredFile:
        """Adopt an already verified file (e.g. a transfer's assembled instance).

        The caller guarantees `size` and `md5` (and, with `synced`, that the file is already
        fsync'ed). Uncompressed, the file is renamed into staging (`source` must be on the storage
        area's filesystem); compressed, a compressed copy is staged and `source` stays until
        `forget_source`.
        """
        if self.compress:
            return self.stage_bytes(Path(source).read_bytes(), md5)
        uuid = str(uuidlib.uuid4())
        with _full_storage():
            if not synced:
                with open(source, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(source, self.staging / uuid)
        return StoredFile(uuid, size, md5, size, md5, False)

    def unstage(self, uuid: str, source: Path) -> None:
        """Undo `stage_file`: the source is back where it was, the staged copy is gone."""
        if Path(source).exists():
            self.discard(uuid)
        else:
            os.replace(self.staging / uuid, source)

    def forget_source(self, source: Path) -> None:
        """After a commit: drop what `stage_file` left at the source (compressed case)."""
        _unlink(Path(source))

    def publish(self, uuid: str) -> None:
        """Move a committed file from staging to its final place."""
        target = self.path_of(uuid)
        with self._folders:  # else a concurrent `remove` may drop the new, still empty folder
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / uuid, target)

    def discard(self, uuid: str) -> None:
        """Forget a staged file whose commit did not happen."""
        _unlink(self.staging / uuid)

    def remove(self, uuid: str) -> None:
        """Delete a published file (its row is already gone from the index)."""
        path = self.path_of(uuid)
        _unlink(path)
        _unlink(self.staging / uuid)
        with self._folders:
            for folder in (path.parent, path.parent.parent):  # drop empty fan-out folders, as Orthanc does
                try:
                    folder.rmdir()
                except OSError:
                    break

    def recover(self, committed: Callable[[Iterable[str]], set[str]]) -> tuple[int, int]:
        """Finish or undo interrupted ingests; returns (published, deleted)."""
        names = [p.name for p in self.staging.iterdir() if p.is_file()]
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

    def _open(self, uuid: str):
        try:
            return open(self.path_of(uuid), "rb")
        except FileNotFoundError:
            pass
        try:  # committed a moment ago, not yet published
            return open(self.staging / uuid, "rb")
        except FileNotFoundError:
            raise CorruptedFile(f"Missing file in the storage area: {uuid}") from None

    def read(self, uuid: str, compressed: bool) -> bytes:
        """The DICOM bytes of an attachment."""
        with self._open(uuid) as f:
            stored = f.read()
        return _decompress(uuid, stored) if compressed else stored

    def read_range(self, uuid: str, compressed: bool, offset: int, length: int) -> bytes:
        """`length` DICOM bytes from `offset`; an uncompressed file is read without loading it whole."""
        if compressed:
            return self.read(uuid, True)[offset : offset + length]
        with self._open(uuid) as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise CorruptedFile(f"File {uuid} is shorter than the index says")
        return data


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


@contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Around the writing of a new file: if it fails, the partial file goes at once."""
    try:
        with _full_storage():
            yield
    except BaseException:
        _unlink(path)
        raise


@contextmanager
def _full_storage() -> Iterator[None]:
    """No space left (ENOSPC, or EDQUOT over a quota) becomes FullStorage, without a traceback."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise FullStorage(f"Cannot write to the storage area: {exc.strerror}") from None
        raise


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InternalError(f"Cannot remove {path.name}: {exc}") from None
