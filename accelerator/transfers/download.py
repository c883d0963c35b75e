"""The download area of one transfer: a folder with one pre-sized file per expected instance.

Buckets are scattered into these files as they arrive (in any order, from several workers at
once: each bucket owns distinct byte ranges). As the last bucket of an instance lands, the
instance is verified against its declared MD5, fsync'ed and its DICOM header parsed, in the
worker thread that wrote it (`Assembly`), so that the commit after the last bucket is only renames
and one index transaction. The folder lives next to the storage area, on the same filesystem, so
that handing over is a rename, and it survives a restart. Memory use is one bounded bucket at a
time, never a whole instance.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from accelerator.store import FileToIngest
from accelerator.store.dicom import parse_file
from protocol.chunks import ScatterRange
from protocol.codecs import stream_decoder
from protocol.errors import BadFileFormat, FullStorage, ParameterOutOfRange, UnknownResource
from protocol.messages import Bucket, InstanceInfo

_BLOCK = 1 << 20
SPOOL_IN_MEMORY = 16 << 20
FREE_SPACE_RESERVE = 256 << 20  # bytes left free on the disk after a transfer's download area


def ensure_free_space(folder: Path, needed: int) -> None:
    """FullStorage (507) unless the disk holding `folder` has room for `needed` more bytes.

    Download areas are sparse files filled as buckets land, so this is checked when a transfer
    starts: a transfer that cannot fit is refused before any byte moves.
    """
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + FREE_SPACE_RESERVE > free:
        raise FullStorage(f"The transfer needs {needed} bytes; the disk of the storage area has {free} bytes "
                          f"free (with {FREE_SPACE_RESERVE} bytes kept in reserve)")


class DownloadArea:
    def __init__(self, folder: Path, instances: Sequence[InstanceInfo]):
        self.folder = Path(folder)
        self.instances = {info.id: info for info in instances}

    def create(self) -> "DownloadArea":
        """Allocate the (sparse) files; idempotent, so a restarted transfer can call it again."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for info in self.instances.values():
            path = self.path_of(info.id)
            if not path.exists() or path.stat().st_size != info.size:
                with open(path, "ab") as f:
                    f.truncate(info.size)
        return self

    def path_of(self, instance_id: str) -> Path:
        return self.folder / instance_id  # IDs are validated Orthanc IDs: never a path

    def payload_writer(self, ranges: Sequence[ScatterRange], compression: str,
                       expected_size: int, *, spool: bool = True) -> "PayloadWriter":
        """A writer that decodes a bucket's wire payload piece by piece and scatters it."""
        self.check_ranges(ranges)
        return PayloadWriter(self, ranges, compression, expected_size, spool=spool)

    def check_ranges(self, ranges: Sequence[ScatterRange]) -> None:
        for r in ranges:
            info = self.instances.get(r.instance_id)
            if info is None:
                raise UnknownResource(f"Unknown instance in this transfer: {r.instance_id}")
            if r.instance_offset + r.length > info.size:
                raise ParameterOutOfRange(f"Chunk beyond the end of instance {r.instance_id}")

    def md5_of(self, instance_id: str) -> str | None:
        """MD5 of the file as it is on disk; None if it is missing or has the wrong size."""
        path = self.path_of(instance_id)
        try:
            if path.stat().st_size != self.instances[instance_id].size:
                return None
        except FileNotFoundError:
            return None
        digest = hashlib.md5()
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                digest.update(block)
        return digest.hexdigest()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PayloadWriter:
    """Feed the wire payload of one bucket as it arrives; `finish` checks its exact size.

    With `spool` (push receiver), the decoded bytes wait in a spool (memory up to
    SPOOL_IN_MEMORY, then a temporary file in the area's folder) and reach the instance files only
    once the size is right, so a rejected bucket leaves no trace. Without it (a pull, which simply
    fetches a bad bucket again into the same ranges), they are scattered as they come, so memory
    stays one piece per worker. Chunks that are whole instances are hashed on the way (`digests`),
    which spares re-reading them for their MD5. Blocking (decompression and disk writes): call
    from a worker thread. Raises NetworkProtocol when the payload does not decode to exactly the
    bucket's size (a gzip bomb stops at the bound).
    """

    def __init__(self, area: DownloadArea, ranges: Sequence[ScatterRange], compression: str,
                 expected_size: int, *, spool: bool = True):
        self.area = area
        self.decoder = stream_decoder(compression, expected_size)
        self.spool = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, dir=area.folder) if spool else None
        self.ranges = list(ranges)
        self.index = 0  # current range
        self.done_in_range = 0
        self.position = 0  # raw bytes written so far
        self.received = 0  # wire bytes fed so far
        self.digests: dict[str, str] = {}  # MD5 of the chunks that are whole instances
        self._hasher = None

    def feed(self, piece: bytes) -> None:
        self.received += len(piece)
        data = self.decoder.feed(piece)
        if self.spool is None:
            self._scatter(data)
        else:
            self.spool.write(data)

    def finish(self) -> int:
        try:
            self.decoder.finish()
            if self.spool is not None:
                self.spool.seek(0)
                while block := self.spool.read(_BLOCK):
                    self._scatter(block)
        finally:
            self.close()
        return self.position

    def close(self) -> None:
        """Drop a payload that will not be finished."""
        if self.spool is not None:
            self.spool.close()

    def _scatter(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.index < len(self.ranges):
            r = self.ranges[self.index]
            if self.done_in_range == 0 and r.instance_offset == 0 and \
                    r.length == self.area.instances[r.instance_id].size:
                self._hasher = hashlib.md5()
            take = min(len(view), r.length - self.done_in_range)
            piece = view[:take]
            fd = os.open(self.area.path_of(r.instance_id), os.O_WRONLY)
            try:
                written = 0
                while written < take:
                    written += os.pwrite(fd, piece[written:], r.instance_offset + self.done_in_range + written)
            finally:
                os.close(fd)
            if self._hasher is not None:
                self._hasher.update(piece)
            view = view[take:]
            self.position += take
            self.done_in_range += take
            if self.done_in_range == r.length:
                if self._hasher is not None:
                    self.digests[r.instance_id] = self._hasher.hexdigest()
                    self._hasher = None
                self.index += 1
                self.done_in_range = 0


class Assembly:
    """Which buckets of a plan have landed, and the instances made ready as their last one lands.

    `landed` is called by worker threads (blocking work; no lock held during I/O). An instance is
    ready once its MD5 matches, its file is fsync'ed and its header parsed. `settle` checks, from
    the files on disk, every instance not ready yet (buckets that landed before a restart, or
    never), and returns the bad ones; `refetch` gives back the buckets to send again for them.
    """

    def __init__(self, area: DownloadArea, buckets: Sequence[Bucket], landed: Sequence[int] = ()):
        self.area = area
        self.buckets = list(buckets)
        self.waiting: dict[str, set[int]] = {iid: set() for iid in area.instances}
        for index, bucket in enumerate(self.buckets):
            for chunk in bucket:
                if chunk.size:
                    self.waiting[chunk.instance_id].add(index)
        for index in landed:
            self._mark(index)
        self.ready: dict[str, FileToIngest] = {}
        self._lock = threading.Lock()

    def _mark(self, index: int) -> list[str]:
        """Record bucket `index` as landed; returns the instances it completes (again)."""
        complete = []
        for instance_id in dict.fromkeys(c.instance_id for c in self.buckets[index] if c.size):
            waiting = self.waiting.get(instance_id)
            if waiting is not None:
                waiting.discard(index)
                if not waiting:
                    complete.append(instance_id)
        return complete

    def landed(self, index: int, digests: dict[str, str]) -> None:
        with self._lock:
            complete = self._mark(index)
        for instance_id in complete:
            self._prepare(instance_id, digests.get(instance_id))

    def _prepare(self, instance_id: str, md5: str | None = None) -> bool:
        info = self.area.instances[instance_id]
        if (md5 or self.area.md5_of(instance_id)) != info.md5:
            with self._lock:
                self.ready.pop(instance_id, None)
            return False
        path = self.area.path_of(instance_id)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        try:
            parsed = parse_file(path)
        except BadFileFormat:
            parsed = None  # the commit parses again and reports it
        with self._lock:
            self.ready[instance_id] = FileToIngest(path, info.size, info.md5, parsed, synced=True)
        return True

    def settle(self, threads: int = 2) -> list[str]:
        """Check every instance not ready yet from its file; returns the bad ones, sorted."""
        with self._lock:
            todo = sorted(iid for iid in self.area.instances if iid not in self.ready)
        if not todo:
            return []
        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL
            verdicts = list(pool.map(self._prepare, todo))
        return [iid for iid, good in zip(todo, verdicts) if not good]

    def refetch(self, instance_ids: Sequence[str]) -> set[int]:
        """The buckets to send again for these instances, which wait for them once more."""
        wanted = set(instance_ids)
        again = {i for i, bucket in enumerate(self.buckets) if any(c.instance_id in wanted for c in bucket)}
        with self._lock:
            for index in again:
                for chunk in self.buckets[index]:
                    if chunk.size and chunk.instance_id in wanted:
                        self.waiting[chunk.instance_id].add(index)
        return again

    def files(self) -> list[FileToIngest]:
        """Every instance, ready, in ID order (call after `settle` found nothing bad)."""
        return [self.ready[iid] for iid in sorted(self.ready)]
