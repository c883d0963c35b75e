"""The MoveStorage job of Orthanc's object-storage plugins (`POST /move-storage`), in HybridMode.

The plugin's job reads each attachment from the side it leaves, writes it to the other side,
deletes the source, and trusts every step. This one moves the same attachments under the same
UUIDs (the index does not record where an attachment lives) and, for each one:

1. finds where it is (`exists` on both sides); already on the target only: nothing to do;
2. reads the source copy a block at a time (a local file is read in place, an object goes to a
   temporary file of the storage area's work folder) and checks its size and MD5 against the
   index: a missing or corrupt source fails the job, naming the instance, and nothing is removed;
3. stages and publishes it on the target side, then verifies the target copy: its size, and its
   MD5 read back a block at a time, or, for an object whose ETag is the MD5 of a single-part
   upload (S3), the MD5 the server computed over the bytes it stored (one HEAD request);
4. only then removes the source copy.

Readers never miss: the copy lands on the target before the source goes, and `HybridStorage`
tries the other side again when a read misses on both (see there). A copy found on both sides
(a crash between 3 and 4) is verified and the source removed; a bad target copy is replaced.

Resumable: the list of instances is saved once in the checkpoint with the index of the first
instance not finished; that index is saved again at most once a second or every twentieth of
the list, and every step is idempotent, so a restart (even after `kill -9`) redoes at most the
last second. A temporary file left by a crash is removed by the storage area's recovery at
start (`upload-` prefix). Moves of one attachment by two jobs are serialised (striped locks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyio import to_thread

from accelerator.jobs.base import JobContext, JobFailure
from accelerator.store import Store
from accelerator.store.area import UPLOAD_PREFIX
from accelerator.store.hybrid import HybridStorage
from accelerator.store.index import Attachment, Index
from accelerator.store.storage import FILE_SYSTEM, OBJECT_STORAGE, Storage, blocks, md5_of, unlink
from accelerator.transfers.workers import run_pool
from protocol.errors import BadFileFormat, CorruptedFile, UnknownResource
from protocol.resources import Level

log = logging.getLogger(__name__)

JOB_TYPE = "MoveStorage"
TARGETS = (FILE_SYSTEM, OBJECT_STORAGE)
BLOCK = 4 * 1024 * 1024  # bytes read at once from a copy (per worker)
WORKERS = 4  # attachments moved at once (object storage is latency-bound)
SAVE_INTERVAL = 1.0  # seconds between two saves of the progress, at most...
SAVE_PARTS = 20  # ...unless a twentieth of the list is done since the last one
_LOCKS = 64

# Orthanc's groups of a MoveStorage job's Content, in the order the plugin tries the levels.
GROUPS = ((Level.INSTANCE, "Instances"), (Level.SERIES, "Series"), (Level.STUDY, "Studies"),
          (Level.PATIENT, "Patients"))


def resolve(index: Index, resources: Iterable[Any]) -> dict[str, list[str]]:
    """The plugin's job Content: each ID under the group of its level (tried from instance up
    to patient, as the plugin does). Checked in order: an item that is not a string is Bad file
    format, an empty ID or one that is no resource is UnknownResource."""
    groups: dict[str, list[str]] = {}
    for public_id in resources:
        if not isinstance(public_id, str):
            raise BadFileFormat("Every resource to move must be given by its ID, a string")
        level = _level_of(index, public_id)
        if level is None:
            raise UnknownResource(f"Unknown resource: {public_id}")
        groups.setdefault(dict(GROUPS)[level], []).append(public_id)
    return groups


def _level_of(index: Index, public_id: str) -> Level | None:
    if not public_id:
        return None
    for level, _ in GROUPS:
        try:
            index.resource(level, public_id)
        except UnknownResource:
            continue
        return level
    return None


def expand(index: Index, resources: Iterable[str]) -> list[str]:
    """The instances below the resources, each once, in order; IDs deleted since are skipped."""
    seen: dict[str, None] = {}
    for public_id in resources:
        level = _level_of(index, public_id)
        if level is None:
            continue
        for instance in index.descendants(index.resource(level, public_id), Level.INSTANCE):
            seen.setdefault(instance, None)
    return list(seen)


@dataclass
class _Progress:
    """The instances done in this run, and the first one not done (what the checkpoint says)."""

    instances: list[str]
    next: int  # every instance before this one is done
    moved: int  # attachments copied
    moved_bytes: int
    done: set[int]
    saved_next: int
    saved_at: float

    def finished(self, position: int, copied: int) -> None:
        self.done.add(position)
        if copied >= 0:
            self.moved += 1
            self.moved_bytes += copied
        while self.next in self.done:
            self.done.discard(self.next)
            self.next += 1

    @property
    def completed(self) -> int:
        return self.next + len(self.done)

    def content(self) -> dict[str, Any]:
        return {"CompletedInstances": self.completed, "MovedInstances": self.moved, "MovedBytes": self.moved_bytes}

    def checkpoint(self, target: str) -> dict[str, Any]:
        return {"TargetStorage": target, "Instances": self.instances, "Next": self.next,
                "Moved": self.moved, "MovedBytes": self.moved_bytes}

    def due(self) -> bool:
        step = max(1, len(self.instances) // SAVE_PARTS)
        return self.next - self.saved_next >= step or time.monotonic() - self.saved_at >= SAVE_INTERVAL


class MoveStorageDriver:
    """One driver for every MoveStorage job of the daemon (they share its attachment locks)."""

    def __init__(self, *, store: Store, workers: int = WORKERS):
        self.store = store
        self.workers = max(1, workers)
        self._locks = [threading.Lock() for _ in range(_LOCKS)]

    def _hybrid(self) -> HybridStorage:
        storage = self.store.area.storage
        if not isinstance(storage, HybridStorage):
            raise JobFailure("HybridMode is disabled (or there is no object storage): attachments cannot be moved")
        return storage

    async def run(self, ctx: JobContext) -> None:
        storage = self._hybrid()
        state = ctx.checkpoint
        if state is None:
            target = ctx.query.get("TargetStorage")
            if target not in TARGETS:
                raise JobFailure(f"TargetStorage must be {TARGETS[0]!r} or {TARGETS[1]!r}, not {target!r}")
            instances = await to_thread.run_sync(expand, self.store.index, _strings(ctx.query.get("Resources")))
            progress = _Progress(instances, 0, 0, 0, set(), 0, time.monotonic())
            await ctx.save(progress.checkpoint(target),
                           content={"TargetStorage": target, "TotalInstances": len(instances), **progress.content()},
                           progress=0.0 if instances else 1.0)
        else:
            target = state["TargetStorage"]
            progress = _Progress(state["Instances"], state["Next"], state.get("Moved", 0),
                                 state.get("MovedBytes", 0), set(), state["Next"], time.monotonic())
            if progress.next:
                log.info("job %s: resuming at instance %d of %d", ctx.job_id, progress.next, len(progress.instances))
        total = len(progress.instances)
        source_side, target_side = storage.side(_other(target)), storage.side(target)
        started = time.monotonic()

        async def move(position: int) -> None:
            instance = progress.instances[position]
            copied = await to_thread.run_sync(self.move_instance, instance, source_side, target_side)
            progress.finished(position, copied)
            ctx.report(content=progress.content(), progress=progress.completed / total)
            if progress.due():
                progress.saved_next, progress.saved_at = progress.next, time.monotonic()
                await ctx.save(progress.checkpoint(target))

        await run_pool(range(progress.next, total), self.workers, move)
        await ctx.save(progress.checkpoint(target), content=progress.content(), progress=1.0)
        log.info("job %s: %d instance(s) on %s, %d attachment(s) moved (%d bytes) in %.2f s", ctx.job_id, total,
                 target, progress.moved, progress.moved_bytes, time.monotonic() - started)

    async def discard(self, ctx: JobContext) -> None:
        """Nothing is held between steps (a temporary file lives within one step)."""

    # -- one instance (blocking: in a worker thread) ------------------------------------------

    def move_instance(self, instance_id: str, source: Storage, target: Storage) -> int:
        """Move the instance's attachment; returns the bytes copied, -1 if nothing was copied."""
        try:
            attachment = self.store.index.attachment(instance_id)
        except UnknownResource:
            return -1  # deleted since the job started
        with self._locks[zlib.crc32(attachment.uuid.encode()) % _LOCKS]:
            return self._move(instance_id, attachment, source, target)

    def _move(self, instance_id: str, att: Attachment, source: Storage, target: Storage) -> int:
        uuid = att.uuid
        on_target, on_source = target.exists(uuid), source.exists(uuid)
        if not on_source:
            if on_target or not self._current(instance_id, uuid):
                return -1  # already there, or deleted meanwhile
            raise JobFailure(f"instance {instance_id}: its attachment {uuid} is missing from the {source.kind} "
                             f"and from the {target.kind}")
        if on_target:  # copied before a crash: keep the copy if it is right
            if self._verified(target, att):
                self._remove_source(instance_id, uuid, source)
                return -1
            log.warning("instance %s: the copy of %s on the %s is not right, copying it again", instance_id, uuid,
                        target.kind)
            target.remove(uuid)
        try:
            self._copy(instance_id, att, source, target)
        except (CorruptedFile, FileNotFoundError, JobFailure) as exc:
            if not self._current(instance_id, uuid):
                target.remove(uuid)  # deleted meanwhile: its removal may have missed our copy
                return -1
            if isinstance(exc, JobFailure):
                raise
            raise JobFailure(f"instance {instance_id}: its attachment {uuid} cannot be read from the "
                             f"{source.kind} ({exc}): nothing was moved nor removed") from exc
        if not self._verified(target, att):
            target.remove(uuid)
            raise JobFailure(f"instance {instance_id}: the copy of attachment {uuid} written to the {target.kind} "
                             f"does not read back as {att.stored_size} bytes of MD5 {att.stored_md5}: removed it, "
                             f"the {source.kind} keeps the attachment")
        self._remove_source(instance_id, uuid, source)
        return att.stored_size

    def _current(self, instance_id: str, uuid: str) -> bool:
        """Whether the index still gives this attachment to the instance."""
        try:
            return self.store.index.attachment(instance_id).uuid == uuid
        except UnknownResource:
            return False

    def _remove_source(self, instance_id: str, uuid: str, source: Storage) -> None:
        source.remove(uuid)
        if not self._current(instance_id, uuid):  # deleted meanwhile: no copy may outlive its row
            self.store.area.storage.remove(uuid)

    def _copy(self, instance_id: str, att: Attachment, source: Storage, target: Storage) -> None:
        """Check the source copy against the index, then stage and publish it on the target."""
        uuid = att.uuid
        local = source.local_path(uuid)
        if local is not None and local.is_file():  # a file: hashed and uploaded in place
            size, md5 = _hash_file(local)
            self._check_source(instance_id, att, source, size, md5)
            target.stage_file(uuid, local, synced=True)  # a copy: the object side never moves it
        else:
            temporary = self.store.area.work / f"{UPLOAD_PREFIX}move-{uuid}"
            try:
                size, md5 = _download(source, uuid, att.stored_size, temporary)
                self._check_source(instance_id, att, source, size, md5)
                target.stage_file(uuid, temporary, synced=True)
            finally:
                unlink(temporary)
        target.publish(uuid)

    @staticmethod
    def _check_source(instance_id: str, att: Attachment, source: Storage, size: int, md5: str) -> None:
        if size != att.stored_size or md5 != att.stored_md5:
            raise JobFailure(f"instance {instance_id}: its attachment {att.uuid} on the {source.kind} fails its MD5 "
                             f"check ({size} bytes of MD5 {md5}, the index says {att.stored_size} bytes of MD5 "
                             f"{att.stored_md5}): nothing was moved nor removed")

    @staticmethod
    def _verified(target: Storage, att: Attachment) -> bool:
        """The target copy has the size and MD5 the index records."""
        etag = target.server_md5(att.uuid)
        if etag is not None:
            size, tag = etag
            if size != att.stored_size:
                return False
            if tag == att.stored_md5:
                return True  # the server's MD5 of what it stored
        try:
            return md5_of(target, att.uuid, att.stored_size) == att.stored_md5
        except CorruptedFile:
            return False


def _other(kind: str) -> str:
    return OBJECT_STORAGE if kind == FILE_SYSTEM else FILE_SYSTEM


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.md5(), 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _download(storage: Storage, uuid: str, size: int, path: Path) -> tuple[int, str]:
    """Copy the attachment to a new local file, fsync'ed; returns its size and MD5."""
    digest, written = hashlib.md5(), 0
    with open(path, "xb") as f:
        for block in blocks(storage, uuid, size, BLOCK):
            f.write(block)
            digest.update(block)
            written += len(block)
        f.flush()
        os.fsync(f.fileno())
    return written, digest.hexdigest()
