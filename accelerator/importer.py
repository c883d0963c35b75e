"""`accelerator import`: walk files and folders and upload every DICOM file to a daemon.

The daemon decides what is DICOM (it answers 400 / OrthancStatus 15 otherwise), so the importer
never rejects a file by its name; such files are counted and skipped, never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
from tqdm import tqdm

_BAD_FILE_FORMAT = 15


@dataclass
class ImportSummary:
    imported: int = 0
    already_stored: int = 0
    not_dicom: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"imported: {self.imported}, already stored: {self.already_stored}, "
            f"not DICOM: {self.not_dicom}, failed: {self.failed}"
        ]
        lines += [f"  failed: {e}" for e in self.errors[:20]]
        if len(self.errors) > 20:
            lines.append(f"  ... and {len(self.errors) - 20} more")
        return "\n".join(lines)


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
    files = list(walk(paths))
    summary = ImportSummary()
    missing = [str(p) for p in files if not p.exists()]
    for name in missing:
        summary.failed += 1
        summary.errors.append(f"{name}: no such file")
    files = [p for p in files if p.exists()]
    bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
               disable=not progress, desc="import")
    send, receive = anyio.create_memory_object_stream[Path](max_buffer_size=jobs)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), auth=auth, timeout=120,
                                 transport=transport) as client:

        async def worker() -> None:
            async with receive.clone() as queue:
                async for path in queue:
                    await _upload(client, path, summary)
                    bar.update(path.stat().st_size)
                    bar.set_postfix(imported=summary.imported, skipped=summary.not_dicom,
                                    failed=summary.failed, refresh=False)

        async with anyio.create_task_group() as tg:
            for _ in range(jobs):
                tg.start_soon(worker)
            async with send, receive:
                for path in files:
                    await send.send(path)
    bar.close()
    return summary


async def _upload(client: httpx.AsyncClient, path: Path, summary: ImportSummary) -> None:
    try:
        data = await anyio.Path(path).read_bytes()
        response = await client.post("/instances", content=data,
                                     headers={"Content-Type": "application/dicom"})
    except (OSError, httpx.HTTPError) as exc:
        summary.failed += 1
        summary.errors.append(f"{path}: {type(exc).__name__}: {exc}")
        return
    if response.status_code == 200:
        if response.json().get("Status") == "AlreadyStored":
            summary.already_stored += 1
        else:
            summary.imported += 1
        return
    details = _error_details(response)
    if response.status_code == 400 and details.get("OrthancStatus") == _BAD_FILE_FORMAT:
        summary.not_dicom += 1
        return
    summary.failed += 1
    message = details.get("Details") or details.get("Message") or response.reason_phrase
    summary.errors.append(f"{path}: HTTP {response.status_code}: {message}")


def _error_details(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
