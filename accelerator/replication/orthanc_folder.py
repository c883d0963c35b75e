"""A replication source that reads a stopped Orthanc's storage folder directly, without its REST API.

Moving an archive off an Orthanc that is being retired (or whose HTTP server is slow, or down) is
fastest from its disk: its SQLite index names every instance and its DICOM attachment, and the
attachments are plain files. Checked against a real Orthanc 1.10.1 (database schema 6):

- `Resources(internalId, resourceType, publicId, parentId)`: resourceType 1 patient, 2 study,
  3 series, 4 instance (Orthanc's `ResourceType` enum, which starts at 1);
- `MainDicomTags(id, tagGroup, tagElement, value)`: main tags of each level, stripped (a study
  also carries its patient's);
- `AttachedFiles(id, fileType, uuid, compressedSize, uncompressedSize, compressionType,
  uncompressedMD5, compressedMD5)`: fileType 1 is the DICOM file (2 the JSON summary of older
  versions, 3 the DICOM until its pixel data: neither is copied); compressionType 1 is none, 2 is
  `StorageCompression`'s "zlib with size" (the uncompressed size as a little-endian uint64, then
  a zlib stream); MD5s are lowercase hex, empty when `StoreMD5ForAttachments` was off;
- the file of an attachment is `<StorageDirectory>/<uuid[0:2]>/<uuid[2:4]>/<uuid>`;
- a running Orthanc keeps its index in SQLite's exclusive locking mode, so a read-only
  connection meets "database is locked": that is how a running Orthanc is refused (its files
  would change under us).

Everything read comes from outside and is bounded: a UUID that is not one is refused (it names a
path), a file must have the size the index records, a decompression never yields more than the
index's size, and every file is checked against the index's MD5 before it is handed on.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import struct
import threading
import zlib
from pathlib import Path

from anyio import to_thread

from accelerator.api.find import Constraint, make_constraint
from accelerator.api.tags import parse_tag
from accelerator.replication.ends import InstanceEntry, Selection
from protocol.errors import BadSequenceOfCalls, CorruptedFile, IndexVersionError, UnknownResource

log = logging.getLogger(__name__)

PATIENT, STUDY, SERIES, INSTANCE = 1, 2, 3, 4  # Orthanc's ResourceType
DICOM_ATTACHMENT = 1  # FileContentType_Dicom
COMPRESSION_NONE, COMPRESSION_ZLIB_WITH_SIZE = 1, 2  # Orthanc's CompressionType
SCHEMA_VERSION_PROPERTY, SCHEMA_VERSION = 1, "6"  # GlobalProperty_DatabaseSchemaVersion
MAX_INSTANCE_SIZE = 16 * 1024**3  # as our MaxInstanceSize default: no instance is held larger
_SIZE_PREFIX = struct.Struct("<Q")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_INSTANCES = """
    SELECT i.publicId, a.uncompressedSize, a.uncompressedMD5, p.publicId, st.internalId, st.publicId, se.publicId
    FROM Resources AS i
    JOIN Resources AS se ON se.internalId = i.parentId
    JOIN Resources AS st ON st.internalId = se.parentId
    JOIN Resources AS p ON p.internalId = st.parentId
    JOIN AttachedFiles AS a ON a.id = i.internalId AND a.fileType = ?
    WHERE i.resourceType = ?
"""
_ATTACHMENT = """
    SELECT a.uuid, a.compressedSize, a.uncompressedSize, a.compressionType, a.uncompressedMD5
    FROM Resources AS r JOIN AttachedFiles AS a ON a.id = r.internalId AND a.fileType = ?
    WHERE r.publicId = ? AND r.resourceType = ?
"""


class OrthancFolder:
    """A stopped Orthanc's storage folder and index, read only; blocking calls, safe from any
    thread (one connection behind a lock)."""

    def __init__(self, storage_dir: Path, index_dir: Path | None = None, *, max_size: int = MAX_INSTANCE_SIZE):
        self.storage_dir = Path(storage_dir)
        self.index_path = Path(index_dir if index_dir is not None else storage_dir) / "index"
        self.max_size = max_size
        if not self.index_path.is_file():
            raise UnknownResource(f"No Orthanc index at {self.index_path} (give the IndexDirectory of that "
                                  "Orthanc when it is not its StorageDirectory)")
        # a short busy timeout: a running Orthanc holds its lock for as long as it runs
        self._db = sqlite3.connect(self.index_path.resolve().as_uri() + "?mode=ro", uri=True,
                                   timeout=0.5, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            version = self._query("SELECT value FROM GlobalProperties WHERE property = ?",
                                  (SCHEMA_VERSION_PROPERTY,))
        except BaseException:
            self._db.close()
            raise
        if not version or str(version[0][0]) != SCHEMA_VERSION:
            self._db.close()
            found = version[0][0] if version else "none"
            raise IndexVersionError(f"{self.index_path}: Orthanc database schema {found}, this reader knows "
                                    f"schema {SCHEMA_VERSION} (Orthanc 0.9.5 and later, SQLite back-end)")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise BadSequenceOfCalls(
                        f"The Orthanc index {self.index_path} is in use: stop that Orthanc first "
                        "(its storage folder is read directly only while it is stopped)") from None
                raise CorruptedFile(f"{self.index_path}: {exc}") from None
            except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
                raise CorruptedFile(f"{self.index_path} is not a readable Orthanc index: {exc}") from None

    # -- what to copy ------------------------------------------------------------------------

    def entries(self, selection: Selection) -> list[InstanceEntry]:
        """Every instance of the studies `selection` matches, sorted by ID, with the size and MD5
        of its DICOM file (from the index; computed from the file when the index has no MD5)."""
        studies = None if selection.everything else self._matching_studies(selection)
        found = []
        for public_id, size, md5, patient, study_row, study, series in self._query(
                _INSTANCES, (DICOM_ATTACHMENT, INSTANCE)):
            if studies is not None and study_row not in studies:
                continue
            if not md5:  # StoreMD5ForAttachments was off: the file itself says
                md5 = hashlib.md5(self.read(public_id)).hexdigest()
            found.append(InstanceEntry(public_id, int(size), md5.lower(), patient, study, series))
        found.sort(key=lambda entry: entry.id)
        return found

    def _matching_studies(self, selection: Selection) -> set[int]:
        """Internal IDs of the studies whose main tags, or their patient's, meet every constraint
        (`/tools/find` at study level: wildcards, lists and date ranges, case-insensitive)."""
        constraints: list[Constraint] = [make_constraint(parse_tag(key), value, False)
                                         for key, value in selection.query.items() if value]
        tags: dict[int, dict[int, str]] = {}
        for row, group, element, value in self._query(
                "SELECT t.id, t.tagGroup, t.tagElement, t.value FROM MainDicomTags AS t "
                "JOIN Resources AS r ON r.internalId = t.id WHERE r.resourceType IN (?, ?)", (PATIENT, STUDY)):
            tags.setdefault(row, {})[(group << 16) | element] = value
        matching = set()
        for row, parent in self._query("SELECT internalId, parentId FROM Resources WHERE resourceType = ?",
                                       (STUDY,)):
            values = {**tags.get(parent, {}), **tags.get(row, {})}
            if all(c.matches(values.get(c.tag)) for c in constraints):
                matching.add(row)
        return matching

    # -- the files ---------------------------------------------------------------------------

    def read(self, instance_id: str) -> bytes:
        """The instance's DICOM file, decoded and checked against the index's size and MD5:
        `UnknownResource` when the index or the disk does not have it, `CorruptedFile` when it
        is not what the index says."""
        rows = self._query(_ATTACHMENT, (DICOM_ATTACHMENT, instance_id, INSTANCE))
        if not rows:
            raise UnknownResource(f"Instance {instance_id} is not in the Orthanc index {self.index_path}")
        uuid, stored_size, size, compression, md5 = rows[0]
        what = f"Instance {instance_id} (attachment {uuid})"
        if not isinstance(uuid, str) or not _UUID.fullmatch(uuid):
            raise CorruptedFile(f"{what}: the index names no valid attachment")
        if not (0 <= size <= self.max_size and 0 <= stored_size <= size + size // 1000 + 64):  # deflate's worst
            raise CorruptedFile(f"{what}: sizes {stored_size}/{size} in the index are out of bounds "
                                f"(at most {self.max_size} bytes per instance)")
        path = self.storage_dir / uuid[0:2] / uuid[2:4] / uuid
        try:
            with open(path, "rb") as file:
                stored = file.read(stored_size + 1)  # one more: a file larger than recorded is refused
        except FileNotFoundError:
            raise UnknownResource(f"{what}: its file {path} is missing") from None
        if len(stored) != stored_size:
            raise CorruptedFile(f"{what}: {path} holds {'more than ' if len(stored) > stored_size else ''}"
                                f"{min(len(stored), stored_size)} bytes, the index says {stored_size}")
        if compression == COMPRESSION_ZLIB_WITH_SIZE:
            data = _inflate(what, stored, size)
        elif compression == COMPRESSION_NONE:
            data = stored
        else:
            raise CorruptedFile(f"{what}: unknown compression type {compression}")
        if len(data) != size:
            raise CorruptedFile(f"{what}: {len(data)} bytes, the index says {size}")
        if md5 and hashlib.md5(data).hexdigest() != md5.lower():
            raise CorruptedFile(f"{what}: MD5 of {path} differs from the index's {md5}")
        return data

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _inflate(what: str, stored: bytes, size: int) -> bytes:
    """Orthanc's "zlib with size" (ZlibCompressor): uint64 LE size, then a zlib stream; never
    more than `size` bytes are produced, whatever the stream holds."""
    if not stored and size == 0:
        return b""  # Orthanc writes nothing at all for an empty attachment
    if len(stored) < _SIZE_PREFIX.size or _SIZE_PREFIX.unpack_from(stored)[0] != size:
        raise CorruptedFile(f"{what}: the size prefix of the compressed file does not match the index")
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(memoryview(stored)[_SIZE_PREFIX.size:], size + 1)
    except zlib.error as exc:
        raise CorruptedFile(f"{what}: the compressed file does not decompress: {exc}") from None
    if len(data) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        raise CorruptedFile(f"{what}: the compressed file does not hold exactly {size} bytes")
    return data


class OrthancFolderSource:
    """`OrthancFolder` as a replication `Source`: each blocking call runs in a worker thread."""

    def __init__(self, folder: OrthancFolder, name: str | None = None):
        self.folder = folder
        self.name = name or f"Orthanc folder {folder.storage_dir}"

    @classmethod
    async def open(cls, storage_dir: Path, index_dir: Path | None = None, *,
                   max_size: int = MAX_INSTANCE_SIZE) -> OrthancFolderSource:
        folder = await to_thread.run_sync(lambda: OrthancFolder(storage_dir, index_dir, max_size=max_size))
        return cls(folder)

    async def entries(self, selection: Selection) -> list[InstanceEntry]:
        return await to_thread.run_sync(self.folder.entries, selection)

    async def read(self, instance_id: str) -> bytes:
        return await to_thread.run_sync(self.folder.read, instance_id)

    async def aclose(self) -> None:
        await to_thread.run_sync(self.folder.close)
