"""Where attachment bytes live: one interface, one implementation per kind of storage.

The store writes an attachment in three steps so that the storage and the index always agree:
`stage` (durable, but referenced by no index row), the index commit, then `publish`. After a
crash, `staged()` names what was staged but not published: the store publishes the ones the
index committed and `discard`s the others. Nothing is visible to readers through the index
before its commit, and nothing outside the storage's root is touched (names are UUIDs we make).

A backend stores bytes as given: the content format (Orthanc's `StorageCompression` layout) and
the MD5 bookkeeping belong to `StorageArea`, above. Every method is blocking (disk or network)
and is meant for a worker thread. Errors: a missing attachment is `CorruptedFile`, a full
storage `FullStorage`; nothing else is expected.

`FileSystemStorage` is Orthanc's own layout: `<root>/ab/cd/<uuid>`, staged under `.staging/`.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from protocol.errors import CorruptedFile, FullStorage, InternalError, is_disk_full

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FILE_SYSTEM = "file-system"  # Orthanc's names of the two sides in POST /move-storage
OBJECT_STORAGE = "object-storage"
SYNC_THREADS = 16  # files fsync'ed at once by `sync_sources`


class Storage(ABC):
    """The few operations the store needs from where it keeps attachments."""

    kind: str  # FILE_SYSTEM or OBJECT_STORAGE

    @abstractmethod
    def stage(self, uuid: str, data: bytes) -> None:
        """Write a new attachment durably; unpublished until `publish`."""

    @abstractmethod
    def stage_file(self, uuid: str, source: Path, *, synced: bool = False) -> bool:
        """Stage the bytes of a local file (an assembled transfer, a large upload). Returns True
        if `source` was moved (it is gone; `unstage` puts it back), False if it was copied (the
        caller removes it once the commit is done). `synced`: the file is already fsync'ed."""

    def sync_sources(self, sources: list[Path]) -> bool:
        """Make the files `stage_file` will adopt durable, all at once, before they are staged;
        True if done (they are then staged with `synced`), False if `stage_file` must see to it
        (the default: a backend that copies the file has nothing to sync here)."""
        return False

    @abstractmethod
    def unstage(self, uuid: str, source: Path) -> None:
        """Undo a `stage_file` that moved `source`: it is back, the staged attachment gone."""

    @abstractmethod
    def publish(self, uuid: str) -> None:
        """The index committed the attachment: make it final."""

    @abstractmethod
    def discard(self, uuid: str) -> None:
        """Drop a staged attachment whose commit did not happen (no error if it is gone)."""

    @abstractmethod
    def staged(self) -> list[str]:
        """The attachments staged and neither published nor discarded (for recovery)."""

    def is_staged(self, uuid: str) -> bool:
        return uuid in self.staged()

    @abstractmethod
    def remove(self, uuid: str) -> None:
        """Delete a published attachment whose index row is gone (no error if it is gone)."""

    @abstractmethod
    def exists(self, uuid: str) -> bool:
        """Whether the attachment is stored (published or staged)."""

    @abstractmethod
    def read(self, uuid: str) -> bytes:
        """The whole attachment; CorruptedFile if it is missing."""

    @abstractmethod
    def read_range(self, uuid: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`, without reading the rest; CorruptedFile if the
        attachment is missing or shorter."""

    @abstractmethod
    def list(self) -> Iterator[str]:
        """Every published attachment's UUID (for verification and orphan checks)."""

    def local_path(self, uuid: str) -> Path | None:
        """A local file holding the attachment, when there is one (readers may open it)."""
        return None

    def server_md5(self, uuid: str) -> tuple[int, str] | None:
        """(size, MD5) of the attachment as the storage computed them over the bytes it holds,
        when it offers that for the price of one request (an S3 single-part ETag); None when
        it does not, and the caller reads the bytes back to check them."""
        return None

    def close(self) -> None:
        """Release connections; the storage is not used afterwards."""


class FileSystemStorage(Storage):
    """Orthanc's storage area on a local disk: `<root>/ab/cd/<uuid>`, staged in `.staging/`."""

    kind = FILE_SYSTEM
    STAGING = ".staging"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = self.root / self.STAGING
        self.staging.mkdir(parents=True, exist_ok=True)
        self._folders = threading.Lock()  # a fan-out folder is not dropped between mkdir and rename

    def path_of(self, uuid: str) -> Path:
        return self.root / uuid[0:2] / uuid[2:4] / uuid

    def local_path(self, uuid: str) -> Path | None:
        path = self.path_of(uuid)
        return path if path.exists() else self.staging / uuid

    def stage(self, uuid: str, data: bytes) -> None:
        path = self.staging / uuid
        with removed_on_failure(path), open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def sync_sources(self, sources: list[Path]) -> bool:
        """fsync every file, several at once (their journal commits are shared): one batch
        before the index commit costs far less than one fsync per instance as each arrives."""
        with full_storage():
            if len(sources) <= 1:
                for source in sources:
                    _fsync(source)
            else:
                with ThreadPoolExecutor(min(SYNC_THREADS, len(sources)), thread_name_prefix="fsync") as pool:
                    list(pool.map(_fsync, sources))
        return True

    def stage_file(self, uuid: str, source: Path, *, synced: bool = False) -> bool:
        """Renamed into staging: `source` must be on the storage's filesystem."""
        with full_storage():
            if not synced:
                _fsync(source)
            os.replace(source, self.staging / uuid)
        return True

    def unstage(self, uuid: str, source: Path) -> None:
        os.replace(self.staging / uuid, source)

    def publish(self, uuid: str) -> None:
        target = self.path_of(uuid)
        with self._folders:  # else a concurrent `remove` may drop the new, still empty folder
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / uuid, target)

    def discard(self, uuid: str) -> None:
        unlink(self.staging / uuid)

    def staged(self) -> list[str]:
        """UUID-named files only: the staging folder also receives uploads on their way in."""
        return [p.name for p in self.staging.iterdir() if _UUID.fullmatch(p.name) and p.is_file()]

    def is_staged(self, uuid: str) -> bool:
        return (self.staging / uuid).is_file()

    def remove(self, uuid: str) -> None:
        path = self.path_of(uuid)
        unlink(path)
        unlink(self.staging / uuid)
        with self._folders:
            for folder in (path.parent, path.parent.parent):  # drop empty fan-out folders, as Orthanc does
                try:
                    folder.rmdir()
                except OSError:
                    break

    def exists(self, uuid: str) -> bool:
        return self.path_of(uuid).exists() or (self.staging / uuid).exists()

    def _open(self, uuid: str):
        try:
            return open(self.path_of(uuid), "rb")
        except FileNotFoundError:
            pass
        try:  # committed a moment ago, not yet published
            return open(self.staging / uuid, "rb")
        except FileNotFoundError:
            raise CorruptedFile(f"Missing file in the storage area: {uuid}") from None

    def read(self, uuid: str) -> bytes:
        with self._open(uuid) as f:
            return f.read()

    def read_range(self, uuid: str, offset: int, length: int) -> bytes:
        with self._open(uuid) as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise CorruptedFile(f"File {uuid} is shorter than the index says")
        return data

    def list(self) -> Iterator[str]:
        for first in sorted(self.root.glob("[0-9a-f][0-9a-f]")):
            for path in sorted(first.glob("[0-9a-f][0-9a-f]/*")):
                if path.is_file():
                    yield path.name


READ_BLOCK = 4 * 1024 * 1024  # bytes of an attachment read at once when it is read in pieces


def blocks(storage: Storage, uuid: str, size: int, block: int = READ_BLOCK) -> Iterator[bytes]:
    """The first `size` bytes of an attachment, a block at a time (range reads, never whole);
    CorruptedFile if it is missing or shorter."""
    if size == 0:
        storage.read_range(uuid, 0, 0)  # exists, or CorruptedFile
    for offset in range(0, size, block):
        yield storage.read_range(uuid, offset, min(block, size - offset))


def md5_of(storage: Storage, uuid: str, size: int) -> str:
    """MD5 of exactly `size` stored bytes; CorruptedFile if the attachment is missing, shorter
    or longer (so that a file with bytes appended does not pass for intact)."""
    digest = hashlib.md5()
    for block in blocks(storage, uuid, size):
        digest.update(block)
    try:
        extra = storage.read_range(uuid, size, 1)
    except CorruptedFile:
        extra = b""  # nothing past the end: as it should be
    if extra:
        raise CorruptedFile(f"Attachment {uuid} is longer than the index says")
    return digest.hexdigest()


@contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """Around the writing of a new file: if it fails, the partial file goes at once."""
    try:
        with full_storage():
            yield
    except BaseException:
        unlink(path)
        raise


@contextmanager
def full_storage() -> Iterator[None]:
    """No space left (ENOSPC, or EDQUOT over a quota) becomes FullStorage, without a traceback."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise FullStorage(f"Cannot write to the storage area: {exc.strerror}") from None
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InternalError(f"Cannot remove {path.name}: {exc}") from None
