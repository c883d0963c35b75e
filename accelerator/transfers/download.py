"""The download area of one transfer: a folder with one pre-sized file per expected instance.

Buckets are scattered into these files as they arrive (in any order, from several workers at
once: each bucket owns distinct byte ranges). As the last bucket of an instance lands, the
instance is handed to the background verifier (a small thread pool shared by every transfer),
which checks it against its declared MD5 and parses its DICOM header while the worker that wrote
it goes on with its next request (`Assembly`). The commit waits for the verifier to be done
with the transfer (`settle`), then the store makes all its files durable in one batch before the
index transaction: nothing is indexed before its bytes are on disk, with one round of fsyncs for
the whole transfer instead of one per instance on the request path. The folder lives next to the
storage area, on the same filesystem, so that handing over is a rename, and it survives a
restart. Memory use is one bounded bucket at a time, never a whole instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from accelerator.store import FileToIngest
from accelerator.store.dicom import parse_file
from protocol.chunks import ScatterRange
from protocol.codecs import level_for_speed, stream_decoder
from protocol.errors import BadFileFormat, FullStorage, ParameterOutOfRange, UnknownResource
from protocol.messages import Bucket, InstanceInfo

log = logging.getLogger(__name__)

_BLOCK = 1 << 20
SPOOL_IN_MEMORY = 16 << 20
VERIFIER_THREADS = max(2, min(4, os.cpu_count() or 2))  # instances verified at once, all transfers
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


class LinkMeter:
    """Payload bytes per second a transfer moves over its link, all workers together, measured
    as it runs (since the start: steady, not fooled by one slow bucket): what the sender's level
    is chosen from (`level`). Until a few MB have moved, the defaults apply."""

    WARMUP = 2 * 1024 * 1024  # bytes moved before the rate means anything

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.moved = 0

    def add(self, wire_bytes: int) -> None:
        self.moved += wire_bytes

    @property
    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return self.moved / elapsed if self.moved >= self.WARMUP and elapsed > 0 else None

    def level(self, compression: str) -> int | None:
        """The level of `compression` for this link (None for "none")."""
        return level_for_speed(compression, self.rate)


class DownloadArea:
    def __init__(self, folder: Path, instances: Sequence[InstanceInfo]):
        self.folder = Path(folder)
        self.instances = {info.id: info for info in instances}

    def create(self) -> "DownloadArea":
        """Allocate the (sparse) files; idempotent, so a restarted transfer can call it again.
        Plain system calls, three a file: through pathlib this took 60 ms for 300 instances,
        before the first bucket could be asked for."""
        self.folder.mkdir(parents=True, exist_ok=True)
        folder = os.fspath(self.folder)
        for info in self.instances.values():
            fd = os.open(os.path.join(folder, info.id), os.O_WRONLY | os.O_CREAT, 0o666)
            try:
                if os.fstat(fd).st_size != info.size:
                    os.ftruncate(fd, info.size)
            finally:
                os.close(fd)
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


class _Spool:
    """The decoded bytes of a bucket until it is complete: the blocks as they came (no copy) up
    to `in_memory` bytes, the rest in a temporary file of the area's folder. A
    SpooledTemporaryFile copied every byte in and out of its buffer while holding the GIL."""

    def __init__(self, in_memory: int, folder: Path):
        self.in_memory, self.folder = in_memory, folder
        self.kept: list[bytes] = []
        self.size = 0
        self.file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.file is None and self.size + len(data) > self.in_memory:
            self.file = tempfile.TemporaryFile(dir=self.folder)
        if self.file is None:
            self.kept.append(data)
        else:
            self.file.write(data)
        self.size += len(data)

    def blocks(self) -> Iterator[bytes]:
        yield from self.kept
        if self.file is not None:
            self.file.seek(0)
            while block := self.file.read(_BLOCK):
                yield block

    def close(self) -> None:
        self.kept = []
        if self.file is not None:
            self.file.close()


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
        self.spool = _Spool(SPOOL_IN_MEMORY, area.folder) if spool else None
        self.ranges = list(ranges)
        self.index = 0  # current range
        self.done_in_range = 0
        self.position = 0  # raw bytes written so far
        self.received = 0  # wire bytes fed so far
        self.digests: dict[str, str] = {}  # MD5 of the chunks that are whole instances
        self.skip: frozenset[str] = frozenset()  # instances whose ranges are not written
        self._hasher = None

    def feed(self, piece: bytes) -> None:
        self.received += len(piece)
        data = self.decoder.feed(piece)
        if self.spool is None:
            self._scatter(data)
        else:
            self.spool.write(data)

    def finish(self, skip: Collection[str] = ()) -> int:
        """Check the payload's size and, when spooled, write it out; the ranges of the instances
        in `skip` are not written (their bytes are already verified)."""
        try:
            self.decoder.finish()
            if self.spool is not None:
                self.skip = frozenset(skip)
                for block in self.spool.blocks():
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
            writing = r.instance_id not in self.skip
            if writing and self.done_in_range == 0 and r.instance_offset == 0 and \
                    r.length == self.area.instances[r.instance_id].size:
                self._hasher = hashlib.md5()
            take = min(len(view), r.length - self.done_in_range)
            piece = view[:take]
            if writing:
                self._write(r.instance_id, piece, r.instance_offset + self.done_in_range)
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

    def _write(self, instance_id: str, piece: memoryview, offset: int) -> None:
        fd = os.open(self.area.path_of(instance_id), os.O_WRONLY)
        try:
            written = 0
            while written < len(piece):
                written += os.pwrite(fd, piece[written:], offset + written)
        finally:
            os.close(fd)


def _writeback_starter():
    """`sync_file_range(SYNC_FILE_RANGE_WRITE)` where the C library has it (Linux), else None."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _writeback_starter()


def start_writeback(path: Path) -> None:
    """Have the kernel start writing the file's dirty pages out, without waiting for it (the
    GIL is released), so that the fsync batch of the commit finds little left to write. Only an
    optimisation: durability is still that fsync's."""
    if _sync_file_range is None:
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            _sync_file_range(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE
        finally:
            os.close(fd)


_verifier: ThreadPoolExecutor | None = None
_verifier_lock = threading.Lock()


def verifier() -> ThreadPoolExecutor:
    """The background verifier: `VERIFIER_THREADS` threads shared by every transfer. Its queue
    holds instance IDs only; each verification reads its file a block at a time."""
    global _verifier
    with _verifier_lock:
        if _verifier is None:
            _verifier = ThreadPoolExecutor(VERIFIER_THREADS, thread_name_prefix="verifier")
        return _verifier


class Assembly:
    """Which buckets of a plan have landed, and the instances made ready as their last one lands.

    `landed` is called by worker threads; it only records the bucket and queues the instances it
    completes for the background verifier, so the worker's next request starts at once. An
    instance is ready once its MD5 matches and its header is parsed (durability is the store's,
    in one batch at the commit). `settle` waits for the verifier to be done with this assembly,
    then checks, from the files on disk, every instance not ready yet (buckets that landed before
    a restart), and returns the bad ones; `refetch` gives back the buckets to send again for them.

    A writer that may race with others on the same instances (the push receiver: a bucket sent
    again while another completes the instance) `claim`s the instances before writing: an
    instance that is ready or being verified is not handed out, so its bytes cannot change after
    their MD5 was checked, and an instance is verified only once no claimed writer is left.
    """

    def __init__(self, area: DownloadArea, buckets: Sequence[Bucket], landed: Collection[int] = ()):
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
        self._verifying: set[str] = set()
        self._writers: dict[str, int] = {}  # instance -> claimed writers
        self._lock = threading.Lock()
        self._queued = 0  # instances handed to the background verifier, not done yet
        self._idle = threading.Condition(self._lock)

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

    def claim(self, instance_ids: Collection[str]) -> set[str]:
        """The instances among these that may be written now (not ready, not being verified)."""
        with self._lock:
            claimed = {iid for iid in instance_ids if iid not in self.ready and iid not in self._verifying}
            for iid in claimed:
                self._writers[iid] = self._writers.get(iid, 0) + 1
        return claimed

    def release(self, claimed: Collection[str]) -> None:
        with self._lock:
            self._release(claimed)

    def _release(self, claimed: Collection[str]) -> None:
        for iid in claimed:
            if self._writers[iid] == 1:
                del self._writers[iid]
            else:
                self._writers[iid] -= 1

    def landed(self, index: int, digests: dict[str, str], claimed: Collection[str] = ()) -> None:
        """Bucket `index` is written (its `claimed` instances are released): queue the instances
        it completes for the background verifier, unless another writer still holds them (it
        will). Returns at once: verification is not on the request path."""
        with self._lock:
            self._release(claimed)
            complete = [iid for iid in self._mark(index)
                        if iid not in self.ready and iid not in self._verifying and iid not in self._writers]
            self._verifying.update(complete)  # from now on no writer may touch them
            self._queued += len(complete)
        for position, instance_id in enumerate(complete):
            try:
                verifier().submit(self._background, instance_id, digests.get(instance_id))
            except BaseException:  # e.g. the interpreter is shutting down: settle checks them
                with self._lock:
                    self._verifying.difference_update(complete[position:])
                    self._queued -= len(complete) - position
                    self._idle.notify_all()
                raise

    def _background(self, instance_id: str, md5: str | None) -> None:
        try:
            self._prepare(instance_id, md5)
        except Exception:  # noqa: BLE001 -- not ready: `settle` checks it again from its file
            log.exception("verifying instance %s of %s failed", instance_id, self.area.folder.name)
        finally:
            with self._lock:
                self._queued -= 1
                self._idle.notify_all()

    def drain(self) -> None:
        """Wait until the background verifier is done with this assembly (blocking)."""
        with self._idle:
            self._idle.wait_for(lambda: self._queued == 0)

    def _prepare(self, instance_id: str, md5: str | None = None) -> bool:
        """Verify and parse one instance that no writer holds (marked as verifying)."""
        try:
            return self._verify(instance_id, md5)
        finally:
            with self._lock:
                self._verifying.discard(instance_id)

    def _verify(self, instance_id: str, md5: str | None) -> bool:
        info = self.area.instances[instance_id]
        path = self.area.path_of(instance_id)
        try:
            good = (md5 or self.area.md5_of(instance_id)) == info.md5
            if good:
                start_writeback(path)
            parsed = parse_file(path) if good else None
        except BadFileFormat:
            parsed = None  # the commit parses again and reports it
        except FileNotFoundError:  # the transfer was discarded meanwhile
            good = False
        with self._lock:
            if good:
                self.ready[instance_id] = FileToIngest(path, info.size, info.md5, parsed)
            else:
                self.ready.pop(instance_id, None)
        return good

    def settle(self, threads: int = 2) -> list[str]:
        """Wait for the background verifier, then check every instance not ready yet from its
        file; returns the bad ones, sorted. An instance with a bucket that never landed is bad
        without reading its (sparse) file."""
        self.drain()
        with self._lock:
            todo = sorted(iid for iid, waiting in self.waiting.items()  # all buckets landed
                          if not waiting and iid not in self.ready and iid not in self._verifying)
            self._verifying.update(todo)
        if todo:
            with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL
                list(pool.map(self._prepare, todo))
        with self._lock:
            return sorted(iid for iid in self.area.instances if iid not in self.ready)

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


class LandedLog:
    """The buckets of a transfer that have landed, as lines appended to a file of its download
    area: `+index wire_bytes` when a bucket lands, `-index` when it must be fetched again.

    A bucket costs one short line, not a rewrite of the plan. Each line is one `os.write` to an
    O_APPEND file made once the bucket's bytes are written, so like them it survives a kill -9
    (both are in the page cache); a line cut short by a crash is ignored (its bucket is fetched
    again). Instance files are named by Orthanc IDs, so the log's name cannot clash with one.
    """

    NAME = "landed.log"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None
        self._opening = threading.Lock()  # workers land buckets from several threads

    def read(self) -> tuple[set[int], int]:
        """(buckets landed, wire bytes received) as logged; nothing if there is no log yet."""
        landed: set[int] = set()
        received = 0
        try:
            lines = self.path.read_bytes().split(b"\n")[:-1]  # after the last newline: unfinished
        except FileNotFoundError:
            return landed, received
        for line in lines:
            with contextlib.suppress(ValueError):  # a damaged line: that bucket is fetched again
                if line.startswith(b"+"):
                    index, wire = (int(n) for n in line[1:].split(b" "))
                    landed.add(index)
                    received += wire
                elif line.startswith(b"-"):
                    landed.discard(int(line[1:]))
        return landed, received

    def landed(self, index: int, wire_bytes: int) -> None:
        self._append(f"+{index} {wire_bytes}\n")

    def again(self, indices: Collection[int]) -> None:
        self._append("".join(f"-{i}\n" for i in sorted(indices)))

    def _append(self, lines: str) -> None:
        with self._opening:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, lines.encode())

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
