"""ZIP archives of stored resources, and ZIP files of DICOM instances to ingest, as Orthanc 1.12
does them (ArchiveJob.cpp, HierarchicalZipWriter.cpp, OrthancRestApi.cpp `UploadDicomFile`,
ZipReader.cpp). Blocking: run from a worker thread.

Writing: `archive_plan` resolves the resources and names every file the way Orthanc does, then
`archive_chunks` yields the ZIP a chunk at a time: files are added one by one, each read through
the store with its MD5 checked, so memory stays bounded whatever the number or the size of the
instances. Orthanc deflates the members (minizip, level 6); so do we, with ISA-L (level 1: the
same ratio on DICOM within 2 %, ten times faster).

Reading: `ingest_zip` extracts every member to a file of the work folder (streamed, bounded),
parses it, then stores every DICOM member in one index transaction: a ZIP that fails stores
nothing. Member names are never used as paths (a `../x` member cannot write anywhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import struct
import time
import uuid as uuidlib
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isal import isal_zlib

from accelerator.store import Attachment, FileToIngest, Outcome, Store
from accelerator.store.area import UPLOAD_PREFIX
from accelerator.store.dicom import parse_file
from accelerator.store.storage import blocks, removed_on_failure, unlink
from protocol.errors import BadFileFormat, CorruptedFile, FullStorage, OrthancError, UnknownResource
from protocol.resources import Level

log = logging.getLogger(__name__)

# -- writing an archive ----------------------------------------------------------------------

CHUNK = 1 << 20  # bytes of ZIP handed to the HTTP layer at once (at least; one block more at most)
WHOLE_FILE_LIMIT = 16 << 20  # instances up to this size are read whole and checked before sending
BLOCK = 1 << 20  # bytes of a larger instance read (and decompressed) at once
DEFLATE_LEVEL = 1  # ISA-L level (0-3)
NAME_LIMIT = 255  # characters of a folder name (a file-system limit; Orthanc's names are shorter)


class ArchiveAborted(Exception):
    """A large instance failed its MD5 check after part of it was sent: the stream must break
    (the ZIP then has no central directory) so that the client never takes it for complete."""


@dataclass(frozen=True)
class ArchiveEntry:
    path: str  # "PatientFolder/StudyFolder/SeriesFolder/CT000000.dcm"
    instance_id: str


def resolve(store: Store, public_id: str) -> list[str]:
    """[patient, study, series, instance] IDs down to the resource's level (Orthanc's
    `ResourceIdentifiers`): UnknownResource if the ID is none of ours."""
    for level in Level:
        try:
            resource = store.resource(level, public_id)
        except UnknownResource:
            continue
        chain = [resource.public_id]
        while resource.parent is not None:
            resource = store.resource(Level(resource.level - 1), resource.parent)
            chain.insert(0, resource.public_id)
        return chain
    raise UnknownResource(f"Unknown resource: {public_id}")


class _Node:
    """Orthanc's `ArchiveIndex`: children by ID (sorted like its std::map), None for a child to
    expand whole; instances in the order they were added, at the instance level."""

    def __init__(self, level: Level):
        self.level = level
        self.children: dict[str, _Node | None] = {}
        self.instances: list[str] = []

    def add(self, chain: list[str]) -> None:
        public_id = chain[self.level]
        if self.level == Level.INSTANCE:
            self.instances.append(public_id)
        elif len(chain) - 1 == self.level:  # the resource itself: all of it
            self.children[public_id] = None
        elif public_id not in self.children:
            child = _Node(Level(self.level + 1))
            child.add(chain)
            self.children[public_id] = child
        elif (child := self.children[public_id]) is not None:
            child.add(chain)
        # else: already archived whole

    def expand(self, store: Store) -> None:
        if self.level == Level.INSTANCE:
            return
        for public_id, child in self.children.items():
            if child is None:
                child = _Node(Level(self.level + 1))
                for sub in store.index.children(store.resource(self.level, public_id)):
                    if child.level == Level.INSTANCE:
                        child.instances.append(sub)
                    else:
                        child.children[sub] = None
                self.children[public_id] = child
            child.expand(store)


def archive_plan(store: Store, public_ids: list[str]) -> list[ArchiveEntry]:
    """Every file of the archive of these resources, named as Orthanc's ArchiveIndexVisitor names
    it. UnknownResource for an ID that is none of ours (nothing is sent then)."""
    root = _Node(Level.PATIENT)
    for public_id in public_ids:
        root.add(resolve(store, public_id))
    root.expand(store)
    entries: list[ArchiveEntry] = []
    _visit(store, root, [], _Folder(), entries, ["%08d.dcm"])
    return entries


class _Folder:
    """Names already used in one folder of the ZIP (HierarchicalZipWriter's EnsureUniqueFilename)."""

    def __init__(self):
        self.used: dict[str, int] = {}

    def unique(self, name: str) -> str:
        name = keep_alphanumeric(name)
        count = self.used.get(name, 0) + 1
        self.used[name] = count
        return name if count == 1 else f"{name}-{count}"


def _visit(store: Store, node: _Node, path: list[str], folder: _Folder, entries: list[ArchiveEntry],
           file_format: list[str]) -> None:
    if node.level == Level.INSTANCE:
        for counter, instance_id in enumerate(node.instances):
            name = folder.unique(file_format[0] % counter)
            entries.append(ArchiveEntry("/".join([*path, name]), instance_id))
        return
    for public_id in sorted(node.children):
        child = node.children[public_id]
        assert child is not None  # expanded
        tags = store.resource(node.level, public_id).main_tags
        if node.level == Level.PATIENT and child.children:
            tags = _patient_tags_of_study(store, min(child.children), tags)
        name, fmt = folder_name(node.level, tags)
        if fmt is not None:
            file_format[0] = fmt
        _visit(store, child, [*path, folder.unique(name)], _Folder(), entries, file_format)


def _patient_tags_of_study(store: Store, study_id: str, patient_tags: dict[str, str]) -> dict[str, str]:
    """The patient's name and ID as its first archived study knows them (Orthanc 1.12.2: "use the
    PatientName from the study and not from the patient in case of PatientID collision"); the
    study level holds the patient tags of its own instances. The patient's if it does not."""
    study = store.resource(Level.STUDY, study_id).main_tags
    if "PatientID" in study or "PatientName" in study:
        return {k: study.get(k, "") for k in ("PatientID", "PatientName")}
    return patient_tags


def folder_name(level: Level, tags: dict[str, str]) -> tuple[str, str | None]:
    """The folder of a patient, study or series before KeepAlphanumeric, and for a series the
    format of its file names ("CT%06d.dcm": the first two letters of the modality, upper case)."""
    fmt = None
    if level == Level.PATIENT:
        path = f"{tags.get('PatientID', '')} {tags.get('PatientName', '')}"
    elif level == Level.STUDY:
        path = f"{tags.get('AccessionNumber', '')} {tags.get('StudyDescription', '')}"
    else:
        modality = tags.get("Modality", "").encode()  # Orthanc looks at bytes (UTF-8)
        path = f"{tags.get('Modality', '')} {tags.get('SeriesDescription', '')}"
        prefix = bytes(c - 32 if 0x61 <= c <= 0x7A else c for c in modality[:2])  # toupper, C locale
        fmt = prefix.decode("ascii", "ignore").replace("%", "%%") + "%0" + str(8 - len(modality[:2])) + "d.dcm"
    path = convert_to_ascii(path).strip()
    if not keep_alphanumeric(path):  # also covers names of punctuation only (an empty folder name)
        path = f"Unknown {level.title}"
    return path[:NAME_LIMIT], fmt


def convert_to_ascii(text: str) -> str:
    """Toolbox::ConvertToAscii: printable ASCII only (other characters and controls dropped)."""
    return "".join(c for c in text if " " <= c <= "~")


def keep_alphanumeric(name: str) -> str:
    """HierarchicalZipWriter's KeepAlphanumeric: '^' is a space, runs of white space are one
    space, letters, digits, '.' and '_' are kept, anything else (including '/', '\\', '-' and
    non-ASCII) is dropped; then stripped."""
    out: list[str] = []
    last_space = False
    for c in name.replace("^", " "):
        if not c.isascii():
            continue
        if c in " \t\n\v\f\r":
            if not last_space:
                out.append(" ")
                last_space = True
        elif c.isalnum() or c in "._":
            out.append(c)
            last_space = False
    return "".join(out).strip()


class _Sink:
    """The file object zipfile writes to (not seekable: it writes data descriptors); the bytes
    wait here until they are taken. Once dead, writes are dropped (an aborted archive)."""

    def __init__(self):
        self.buffer = bytearray()
        self.dead = False

    def write(self, data) -> int:
        if not self.dead:
            self.buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def archive_chunks(store: Store, entries: list[ArchiveEntry]) -> Iterator[bytes]:
    """The ZIP of `entries`, a chunk of about CHUNK bytes at a time.

    An instance deleted since the plan, or whose stored file fails its MD5 check, is left out
    with a log line (Orthanc skips an instance it cannot read, ArchiveJob.cpp). An instance larger
    than WHOLE_FILE_LIMIT is streamed in blocks and checked at its end; if it fails then,
    ArchiveAborted breaks the stream.
    """
    sink = _Sink()
    archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)
    member = None
    done = False
    try:
        for entry in entries:
            try:
                attachment = store.attachment(entry.instance_id)
                data = store.read_file(entry.instance_id) if attachment.size <= WHOLE_FILE_LIMIT else None
            except UnknownResource:
                log.warning("archive: instance %s was deleted meanwhile; left out", entry.instance_id)
                continue
            except CorruptedFile as exc:
                log.error("archive: instance %s left out: %s", entry.instance_id, exc)
                continue
            member = _open_member(archive, entry.path, attachment.size)
            if data is not None:  # checked already
                view = memoryview(data)
                for offset in range(0, len(data), BLOCK):
                    member.write(view[offset:offset + BLOCK])
                    if len(sink.buffer) >= CHUNK:
                        yield sink.take()
                del view, data
            else:  # checked as it goes: it breaks the stream if it fails
                digest, size = hashlib.md5(), 0
                try:
                    for block in dicom_blocks(store, attachment):
                        digest.update(block)
                        size += len(block)
                        member.write(block)
                        if len(sink.buffer) >= CHUNK:
                            yield sink.take()
                except (CorruptedFile, UnknownResource, OSError) as exc:
                    raise ArchiveAborted(f"Instance {entry.instance_id} became unreadable while its "
                                         f"{attachment.size} bytes were archived: {exc}") from exc
                if size != attachment.size or digest.hexdigest() != attachment.md5:
                    raise ArchiveAborted(f"The stored file of instance {entry.instance_id} fails its MD5 "
                                         "check (found while streaming it): the archive is aborted")
            member.close()
            member = None
            if len(sink.buffer) >= CHUNK:
                yield sink.take()
        archive.close()
        done = True
        yield sink.take()
    finally:
        if not done:  # aborted, or the client went away: leave zipfile closed, nothing more to send
            sink.dead = True
            with contextlib.suppress(Exception):
                if member is not None:
                    member.close()
            with contextlib.suppress(Exception):
                archive.close()


def _open_member(archive: zipfile.ZipFile, path: str, size: int):
    info = zipfile.ZipInfo(path, time.localtime()[:6])
    info.compress_type = zipfile.ZIP_DEFLATED
    info.file_size = size  # zipfile decides ZIP64 from it (members of 4 GiB and more)
    member = archive.open(info, "w")
    if hasattr(member, "_compressor"):  # ISA-L's deflate instead of zlib's: same format, 10x faster
        member._compressor = isal_zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)
    return member


def dicom_blocks(store: Store, attachment: Attachment) -> Iterator[bytes]:
    """The DICOM bytes of an attachment, BLOCK at a time, never whole (range reads; a compressed
    attachment is inflated as it is read)."""
    storage = store.area.storage
    if not attachment.compressed:
        yield from blocks(storage, attachment.uuid, attachment.size, BLOCK)
        return
    inflater = zlib.decompressobj()
    skip = 8  # Orthanc's prefix: the uncompressed size
    for stored in blocks(storage, attachment.uuid, attachment.stored_size, BLOCK):
        if skip:
            stored, skip = stored[skip:], max(0, skip - len(stored))
        while stored:
            try:
                out = inflater.decompress(stored, BLOCK)
            except zlib.error as exc:
                raise CorruptedFile(f"Compressed file {attachment.uuid} is corrupted: {exc}") from None
            if out:
                yield out
            stored = inflater.unconsumed_tail
    if not inflater.eof:
        raise CorruptedFile(f"Compressed file {attachment.uuid} is truncated")


# -- reading a ZIP of DICOM files ------------------------------------------------------------

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # ZipReader::IsZipMemoryBuffer
MAX_ENTRIES = 100_000  # members of an uploaded ZIP
MAX_CENTRAL_DIRECTORY = 16 << 20  # bytes: zipfile keeps an object per member it lists
MAX_RATIO = 1100  # deflate cannot expand more than 1032 times: a header claiming more lies
FREE_SPACE_RESERVE = 256 << 20  # bytes left free on the disk after extracting a ZIP
_NOT_AN_INSTANCE = (15, 21)  # BadFileFormat, InexistentTag (a DICOMDIR): Orthanc skips such members


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGICS


@dataclass(frozen=True)
class ZipIngest:
    outcomes: list[Outcome]  # one per DICOM member, in the ZIP's order
    skipped: list[str]  # names of the members that are not DICOM files (or DICOMDIRs)


def ingest_zip(store: Store, source: bytes | Path, *, max_total: int, max_member: int,
               remote_ip: str = "", origin: str = "RestApi") -> ZipIngest:
    """Store every DICOM file of a ZIP, as Orthanc's POST /instances does with a ZIP body:
    empty members and directories are ignored, members that are not DICOM (nested ZIPs,
    DICOMDIRs, anything else) are skipped with a log line. Unlike Orthanc, all the instances are
    stored in one transaction, and only once every member was read and parsed: a ZIP that fails
    (BadFileFormat: corrupt, encrypted, an unsupported method, beyond the limits) stores nothing.

    `max_total` bounds the uncompressed bytes of all members, `max_member` those of one.
    """
    with contextlib.ExitStack() as stack:
        fp: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else stack.enter_context(open(source, "rb"))
        _check_directory(fp)
        try:
            archive = stack.enter_context(zipfile.ZipFile(fp))
            infos = archive.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error,
                NotImplementedError) as exc:
            raise BadFileFormat(f"Cannot open ZIP archive: {exc}") from None
        _check_members(infos, fp, max_total, max_member)
        _ensure_free_space(store.area.work, sum(i.file_size for i in infos))
        staged: list[tuple[FileToIngest, str]] = []
        skipped: list[str] = []
        try:
            for info in infos:
                if info.is_dir() or info.file_size == 0:
                    continue  # Orthanc: `if (!content.empty())`
                path, md5 = _extract(archive, info, store.area.work)
                try:
                    parsed = parse_file(path)
                except OrthancError as exc:
                    if exc.orthanc_status not in _NOT_AN_INSTANCE:
                        raise
                    unlink(path)
                    log.error("Cannot import non-DICOM file from ZIP archive: %s (%s)", info.filename[:1000], exc)
                    skipped.append(info.filename)
                    continue
                staged.append((FileToIngest(path, info.file_size, md5, parsed), info.filename))
            outcomes = store.ingest_files([f for f, _ in staged], origin=origin, remote_ip=remote_ip) \
                if staged else []
        finally:
            for f, _ in staged:  # moved away when stored; left here (and removed now) if not
                unlink(f.path)
    return ZipIngest(outcomes, skipped)


def _check_directory(fp: BinaryIO) -> None:
    """Bound what zipfile will list before it lists it: the end of central directory record
    declares the members' count and the directory's size."""
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    tail_size = min(size, 22 + 65535)
    fp.seek(size - tail_size)
    tail = fp.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise BadFileFormat("Cannot open ZIP archive: no end of central directory record (truncated?)")
    entries, directory_size = struct.unpack_from("<xxxxxxxxxxHI", tail, at)
    if entries == 0xFFFF or directory_size == 0xFFFFFFFF:  # ZIP64: its own record has the facts
        entries = directory_size = 0  # unless it is found: then zipfile copes, or refuses the ZIP
        locator = tail[at - 20:at] if at >= 20 else b""
        if locator[:4] == b"PK\x06\x07":
            (offset,) = struct.unpack_from("<Q", locator, 8)
            fp.seek(offset)
            record = fp.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                entries, directory_size = struct.unpack_from("<QQ", record, 32)
    if entries > MAX_ENTRIES:
        raise BadFileFormat(f"The ZIP archive has {entries} members, the limit is {MAX_ENTRIES}")
    if directory_size > MAX_CENTRAL_DIRECTORY:
        raise BadFileFormat(f"The ZIP archive's central directory has {directory_size} bytes, "
                            f"the limit is {MAX_CENTRAL_DIRECTORY}")
    fp.seek(0)


def _check_members(infos: list[zipfile.ZipInfo], fp: BinaryIO, max_total: int, max_member: int) -> None:
    """Refuse a ZIP bomb from its central directory, before anything is inflated."""
    if len(infos) > MAX_ENTRIES:
        raise BadFileFormat(f"The ZIP archive has {len(infos)} members, the limit is {MAX_ENTRIES}")
    total = 0
    for info in infos:
        name = info.filename[:1000]
        if info.flag_bits & 0x1:
            raise BadFileFormat(f"Encrypted member in the ZIP archive: {name}")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BadFileFormat(f"Invalid file or unsupported compression method (e.g. Deflate64): {name}")
        if info.file_size > max_member:  # ZipReader's message
            raise BadFileFormat(f"Uncompressed size exceeds limit: {info.file_size / 1048576:.2f}MB "
                                f"(member {name}; the limit is {max_member / 1048576:.2f}MB)")
        if info.file_size > (1 << 20) and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise BadFileFormat(f"Member {name} claims a compression ratio no deflate stream has "
                                f"({info.file_size} bytes from {info.compress_size}): a ZIP bomb?")
        total += info.file_size
    if total > max_total:
        raise BadFileFormat(f"The ZIP archive expands to {total} bytes, more than MaximumRequestBodySize "
                            f"({max_total} bytes)")
    # Members whose data overlap (the "overlapping files" bomb: many entries, one deflate stream)
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset < end or info.header_offset + info.compress_size > size:
            raise BadFileFormat(f"Member {info.filename[:1000]} overlaps another one or the end of the "
                                "ZIP archive")
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"  # the name's bytes, as in the header
        name_size = len(info.orig_filename.encode(encoding, "replace"))
        end = info.header_offset + 30 + name_size + info.compress_size


def _ensure_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed + FREE_SPACE_RESERVE > free:
        raise FullStorage(f"The ZIP archive expands to {needed} bytes; the disk of the storage area has "
                          f"{free} bytes free (with {FREE_SPACE_RESERVE} bytes kept in reserve)")


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, folder: Path) -> tuple[Path, str]:
    """One member into a new file of `folder` (named by us, never by the ZIP); (path, MD5).
    BadFileFormat if its data do not inflate to exactly its declared size and CRC."""
    path = folder / f"{UPLOAD_PREFIX}{uuidlib.uuid4()}"
    digest = hashlib.md5()
    size = 0
    with removed_on_failure(path), open(path, "xb") as out:
        try:
            with archive.open(info) as member:
                while chunk := member.read(BLOCK):
                    size += len(chunk)
                    if size > info.file_size:
                        raise BadFileFormat(f"Member {info.filename[:1000]} inflates beyond its declared size")
                    digest.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as exc:
            raise BadFileFormat(f"Corrupted member {info.filename[:1000]} in the ZIP archive: {exc}") from None
        if size != info.file_size:
            raise BadFileFormat(f"Member {info.filename[:1000]} inflates to {size} bytes instead of {info.file_size}")
    return path, digest.hexdigest()
