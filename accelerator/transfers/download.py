"""The download area of one transfer: a folder with one pre-sized file per expected instance.

Buckets are scattered into these files as they arrive (in any order, from several workers at
once: each bucket owns distinct byte ranges), then every instance is checked against its declared
MD5, then the files are handed to the store in one transaction. The folder lives next to the
storage area, on the same filesystem, so that handing over is a rename, and it survives a restart.
Memory use is one bounded piece of a bucket at a time, never a whole instance.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from accelerator.store import FileToIngest
from protocol.chunks import ScatterRange
from protocol.codecs import stream_decoder
from protocol.errors import ParameterOutOfRange, UnknownResource
from protocol.messages import InstanceInfo

_BLOCK = 1 << 20
SPOOL_IN_MEMORY = 16 << 20


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
                       expected_size: int) -> "PayloadWriter":
        """A writer that decodes a bucket's wire payload piece by piece and scatters it."""
        self.check_ranges(ranges)
        return PayloadWriter(self, ranges, compression, expected_size)

    def check_ranges(self, ranges: Sequence[ScatterRange]) -> None:
        for r in ranges:
            info = self.instances.get(r.instance_id)
            if info is None:
                raise UnknownResource(f"Unknown instance in this transfer: {r.instance_id}")
            if r.instance_offset + r.length > info.size:
                raise ParameterOutOfRange(f"Chunk beyond the end of instance {r.instance_id}")

    def bad_instances(self, threads: int = 2) -> list[str]:
        """IDs whose file does not have the declared size and MD5, in ID order."""
        def bad(info: InstanceInfo) -> bool:
            path = self.path_of(info.id)
            try:
                if path.stat().st_size != info.size:
                    return True
                return _md5(path) != info.md5
            except FileNotFoundError:
                return True

        ordered = sorted(self.instances.values(), key=lambda i: i.id)
        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL
            verdicts = list(pool.map(bad, ordered))
        return [info.id for info, is_bad in zip(ordered, verdicts) if is_bad]

    def files(self) -> list[FileToIngest]:
        return [FileToIngest(self.path_of(i.id), i.size, i.md5)
                for i in sorted(self.instances.values(), key=lambda i: i.id)]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class PayloadWriter:
    """Feed the wire payload of one bucket as it arrives; `finish` checks its exact size and only
    then writes it into the instance files, so a rejected bucket leaves no trace.

    The decoded bytes wait in a spool (memory up to SPOOL_IN_MEMORY, then a temporary file in the
    area's folder). Blocking (decompression and disk writes): call from a worker thread. Raises
    NetworkProtocol when the payload does not decode to exactly the bucket's size (a gzip bomb
    stops at the bound).
    """

    def __init__(self, area: DownloadArea, ranges: Sequence[ScatterRange], compression: str,
                 expected_size: int):
        self.area = area
        self.decoder = stream_decoder(compression, expected_size)
        self.spool = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, dir=area.folder)
        self.ranges = list(ranges)
        self.index = 0  # current range
        self.done_in_range = 0
        self.position = 0  # raw bytes written so far
        self.received = 0  # wire bytes fed so far

    def feed(self, piece: bytes) -> None:
        self.received += len(piece)
        self.spool.write(self.decoder.feed(piece))

    def finish(self) -> int:
        try:
            self.decoder.finish()
            self.spool.seek(0)
            while block := self.spool.read(_BLOCK):
                self._scatter(block)
        finally:
            self.spool.close()
        return self.position

    def close(self) -> None:
        """Drop a payload that will not be finished."""
        self.spool.close()

    def _scatter(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.index < len(self.ranges):
            r = self.ranges[self.index]
            take = min(len(view), r.length - self.done_in_range)
            fd = os.open(self.area.path_of(r.instance_id), os.O_WRONLY)
            try:
                written = 0
                while written < take:
                    written += os.pwrite(fd, view[written:take], r.instance_offset + self.done_in_range + written)
            finally:
                os.close(fd)
            view = view[take:]
            self.position += take
            self.done_in_range += take
            if self.done_in_range == r.length:
                self.index += 1
                self.done_in_range = 0


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
