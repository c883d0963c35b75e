"""`accelerator import`: walk files, folders and ZIP archives and upload every DICOM file to a daemon.

The daemon decides what is DICOM (it answers 400 / OrthancStatus 15 otherwise, and 404 /
OrthancStatus 21 for a DICOM file without the UIDs an instance needs), so the importer never
rejects a file by its name; such files are skipped and named, never fatal. A ZIP archive (found
by its signature, whatever its name) is read with `zipfile` and its members are uploaded one by
one, as Orthanc's `POST /instances` does with a ZIP: nothing is extracted to disk, and members
with an unsafe name (absolute, `..`), nested archives, encrypted members and members larger than
`MAX_MEMBER` are skipped. At the end, the studies that received instances are described from
the daemon (ID, PatientID, StudyDate, description, instance count).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
from anyio import to_thread
from tqdm import tqdm

_BAD_FILE_FORMAT = 15
_INEXISTENT_TAG = 21
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
MAX_MEMBER = 2 << 30  # bytes: a ZIP member claiming more is skipped, one inflating past it too
_SHOWN = 20  # names listed per kind of problem


@dataclass
class StudyInfo:
    """A study that received instances in this import, as the daemon describes it."""

    id: str
    sent: int = 0  # instances of this import stored (or already stored) in it
    patient_id: str = ""
    study_date: str = ""
    description: str = ""
    instances: int | None = None  # in the daemon, after the import

    def describe(self) -> str:
        total = "?" if self.instances is None else str(self.instances)
        return (f"  study {self.id}  PatientID {self.patient_id or '-'}  {self.study_date or '-':<8}  "
                f"{self.description or '(no description)'}  {total} instance(s) "
                f"({self.sent} from this import)")


@dataclass
class ImportSummary:
    imported: int = 0
    already_stored: int = 0
    not_dicom: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: why" of every file not stored
    studies: dict[str, StudyInfo] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [
            f"imported: {self.imported}, already stored: {self.already_stored}, "
            f"not DICOM: {self.not_dicom}, failed: {self.failed}"
        ]
        if self.studies:
            lines.append(f"{len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}:")
            lines += [info.describe() for info in self.studies.values()]
        lines += _listed("skipped", self.skipped)
        lines += _listed("failed", self.errors)
        return "\n".join(lines)


def _listed(kind: str, items: list[str]) -> list[str]:
    lines = [f"  {kind}: {item}" for item in items[:_SHOWN]]
    if len(items) > _SHOWN:
        lines.append(f"  ... and {len(items) - _SHOWN} more {kind}")
    return lines


@dataclass(frozen=True)
class Item:
    """One thing to upload: a file, or a member of a ZIP archive."""

    name: str
    size: int
    read: Callable[[], bytes]


def walk(paths: Sequence[str | os.PathLike]) -> Iterator[Path]:
    """Every regular file below the given paths, in a stable order."""
    for path in map(Path, paths):
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _ZIP_SIGNATURES
    except OSError:
        return False


def unsafe_member_name(name: str) -> bool:
    """A member name that would escape a folder it were extracted to (we never extract, but such
    an archive is suspect: Orthanc's ZIP upload refuses them too)."""
    normalized = name.replace("\\", "/")
    parts = normalized.split("/")
    return (normalized.startswith("/") or ".." in parts or (len(normalized) > 1 and normalized[1] == ":")
            or "\x00" in name)


def zip_items(path: Path, summary: ImportSummary) -> list[Item]:
    """The members of a ZIP worth uploading; the others are named in `summary.skipped`."""
    items: list[Item] = []
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        summary.failed += 1
        summary.errors.append(f"{path}: not a readable ZIP archive: {exc}")
        return items
    for info in members:
        name = f"{path}:{info.filename}"
        if info.is_dir():
            continue
        if unsafe_member_name(info.filename):
            summary.skipped.append(f"{name}: unsafe name in a ZIP archive")
        elif info.flag_bits & 0x1:
            summary.skipped.append(f"{name}: encrypted ZIP member")
        elif info.filename.lower().endswith(".zip"):
            summary.skipped.append(f"{name}: nested ZIP archive (not imported)")
        elif info.file_size > MAX_MEMBER:
            summary.skipped.append(f"{name}: larger than {MAX_MEMBER >> 20} MiB")
        else:
            items.append(Item(name, info.file_size, _member_reader(path, info.filename)))
    return items


def _member_reader(path: Path, member: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with zipfile.ZipFile(path) as archive, archive.open(member) as f:
            data = f.read(MAX_MEMBER + 1)  # the declared size may lie (ZIP bomb): bounded anyway
        if len(data) > MAX_MEMBER:
            raise ValueError(f"inflates past {MAX_MEMBER >> 20} MiB")
        if data[:4] in _ZIP_SIGNATURES:
            raise _Nested()
        return data

    return read


class _Nested(Exception):
    pass


def import_paths(
    paths: Sequence[str | os.PathLike],
    *,
    url: str,
    auth: tuple[str, str] | None = None,
    jobs: int = 4,
    progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ImportSummary:
    return anyio.run(lambda: import_paths_async(
        paths, url=url, auth=auth, jobs=jobs, progress=progress, transport=transport))


async def import_paths_async(
    paths: Sequence[str | os.PathLike],
    *,
    url: str,
    auth: tuple[str, str] | None = None,
    jobs: int = 4,
    progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ImportSummary:
    summary = ImportSummary()
    items: list[Item] = []
    for path in walk(paths):
        if not path.exists():
            summary.failed += 1
            summary.errors.append(f"{path}: no such file")
        elif is_zip(path):
            items += zip_items(path, summary)
        else:
            items.append(Item(str(path), path.stat().st_size, _file_reader(path)))
    bar = tqdm(total=sum(i.size for i in items), unit="B", unit_scale=True, disable=not progress, desc="import")
    send, receive = anyio.create_memory_object_stream[Item](max_buffer_size=jobs)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), auth=auth, timeout=120,
                                 transport=transport) as client:

        async def worker() -> None:
            async with receive.clone() as queue:
                async for item in queue:
                    await _upload(client, item, summary)
                    bar.update(item.size)
                    bar.set_postfix(imported=summary.imported, skipped=len(summary.skipped),
                                    failed=summary.failed, refresh=False)

        async with anyio.create_task_group() as tg:
            for _ in range(jobs):
                tg.start_soon(worker)
            async with send, receive:
                for item in items:
                    await send.send(item)
        bar.close()
        for info in summary.studies.values():
            await _describe_study(client, info)
    return summary


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


async def _upload(client: httpx.AsyncClient, item: Item, summary: ImportSummary) -> None:
    try:
        data = await to_thread.run_sync(item.read)
    except _Nested:
        summary.skipped.append(f"{item.name}: nested ZIP archive (not imported)")
        return
    except (OSError, ValueError, zipfile.BadZipFile, NotImplementedError, EOFError) as exc:
        summary.failed += 1
        summary.errors.append(f"{item.name}: cannot read: {exc}")
        return
    try:
        response = await client.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
    except httpx.HTTPError as exc:
        summary.failed += 1
        summary.errors.append(f"{item.name}: {type(exc).__name__}: {exc}")
        return
    if response.status_code == 200:
        answer = _error_details(response)
        if answer.get("Status") == "AlreadyStored":
            summary.already_stored += 1
        else:
            summary.imported += 1
        study = answer.get("ParentStudy")
        if isinstance(study, str):
            summary.studies.setdefault(study, StudyInfo(study)).sent += 1
        return
    details = _error_details(response)
    status = details.get("OrthancStatus")
    message = details.get("Details") or details.get("Message") or response.reason_phrase
    if response.status_code == 400 and status == _BAD_FILE_FORMAT:
        summary.not_dicom += 1
        summary.skipped.append(f"{item.name}: not DICOM ({message})")
        return
    if response.status_code == 404 and status == _INEXISTENT_TAG:
        summary.not_dicom += 1
        summary.skipped.append(f"{item.name}: DICOM without an instance's UIDs ({message})")
        return
    summary.failed += 1
    summary.errors.append(f"{item.name}: HTTP {response.status_code}: {message}")


async def _describe_study(client: httpx.AsyncClient, info: StudyInfo) -> None:
    """Fill `info` from `GET /studies/{id}` (with the instance count as a requested tag)."""
    try:
        response = await client.get(f"/studies/{info.id}",
                                    params={"requested-tags": "NumberOfStudyRelatedInstances"})
    except httpx.HTTPError:
        return
    if response.status_code != 200:
        return
    study = _error_details(response)
    main, patient = study.get("MainDicomTags") or {}, study.get("PatientMainDicomTags") or {}
    info.patient_id = str(patient.get("PatientID", ""))
    info.study_date = str(main.get("StudyDate", ""))
    info.description = str(main.get("StudyDescription", ""))
    count = (study.get("RequestedTags") or {}).get("NumberOfStudyRelatedInstances")
    try:
        info.instances = int(count)
    except (TypeError, ValueError):
        info.instances = None


def _error_details(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}

