"""The store facade: ingest, read, delete, and the queries the API and transfers need.

Ingest is all or nothing per batch: every file is parsed and staged first, then one index
transaction makes the whole batch visible, then the files are published. A transfer commits all
its instances through `ingest_files` so that a study appears at once or not at all.

Files are published before the next write transaction can start, so that a concurrent overwrite
or deletion only ever removes a file that is in its place. What follows a commit (publishing,
removing replaced files) never fails the ingest: a file that cannot be moved is read from staging
and published at the next start; a file that cannot be removed stays in the trash until then.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accelerator.store.area import STAGING, StorageArea, StoredFile
from accelerator.store.dicom import ParsedInstance, parse_bytes, parse_file
from accelerator.store.index import Attachment, Index, IndexBase, Outcome, Resource, timestamp
from accelerator.store.storage import FileSystemStorage, Storage
from protocol.errors import AcceleratorError, CorruptedFile
from protocol.resources import Level

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileToIngest:
    """An assembled file whose size and MD5 the caller has already verified.

    A transfer that prepared the file as it arrived passes its parsed header, so that the commit
    is one batch of fsyncs (`synced`: already done), renames and one index transaction.
    """

    path: Path
    size: int
    md5: str
    parsed: ParsedInstance | None = None
    synced: bool = False


class Store:
    def __init__(
        self,
        storage_directory: Path,
        index_directory: Path | None = None,
        *,
        compress: bool = False,
        overwrite: bool = False,
        upgrade: bool = False,
        storage: Storage | None = None,
        index: IndexBase | None = None,
    ):
        """`storage` holds the attachments (default: Orthanc's layout under `storage_directory`,
        which is also the local folder for transfers and uploads whatever the storage); `index`
        the resources (default: SQLite under `index_directory`), and the store closes it."""
        self.overwrite = overwrite
        self.index = index or Index(Path(index_directory or storage_directory), upgrade=upgrade)
        storage = storage or FileSystemStorage(Path(storage_directory))
        self.area = StorageArea(storage, compress, Path(storage_directory) / STAGING)
        self.recover()

    def close(self) -> None:
        self.index.close()
        self.area.storage.close()

    def recover(self) -> None:
        """Finish what a crash interrupted: staged files and deletions."""
        published, deleted = self.area.recover(self.index.committed_uuids)
        trash = self.index.trash()
        self._remove_files(trash)
        if published or deleted or trash:
            log.warning(
                "recovered the storage area: %d file(s) published, %d orphan(s) deleted, %d deleted "
                "file(s) removed", published, deleted, len(trash),
            )

    # -- ingest ------------------------------------------------------------------------------

    def ingest_bytes(self, data: bytes, *, origin: str = "RestApi", remote_ip: str = "") -> Outcome:
        parsed = parse_bytes(data)
        if not self.overwrite and self.index.exists(parsed.ids.instance):
            return Outcome("AlreadyStored", parsed)  # nothing to write
        stored = self.area.stage_bytes(data)
        try:
            return self._commit([(parsed, stored)], origin, remote_ip)[0]
        except BaseException:
            self.area.discard(stored.uuid)
            raise

    def ingest_upload(self, upload: FileToIngest, *, remote_ip: str = "") -> Outcome:
        """A large POST /instances body already written to a file (moved into place if new)."""
        parsed = upload.parsed or parse_file(upload.path)
        if not self.overwrite and self.index.exists(parsed.ids.instance):
            return Outcome("AlreadyStored", parsed)
        staged = FileToIngest(upload.path, upload.size, upload.md5, parsed, upload.synced)
        return self.ingest_files([staged], origin="RestApi", remote_ip=remote_ip)[0]

    def ingest_files(self, files: Sequence[FileToIngest], *, origin: str = "Plugins",
                     remote_ip: str = "") -> list[Outcome]:
        """Adopt verified files in one transaction; they are moved, not copied.

        Every file is parsed before any is touched, and a batch that fails puts the files back
        where they were, so the caller can fix the cause and try again.
        """
        parsed = [f.parsed or parse_file(f.path) for f in files]
        # Durable before the index commit, as one batch (not one fsync per file as it is staged).
        synced = self.area.sync_sources([f.path for f in files if not f.synced])
        staged: list[StoredFile] = []
        try:
            for f in files:
                staged.append(self.area.stage_file(f.path, f.size, f.md5, synced=f.synced or synced))
            outcomes = self._commit(list(zip(parsed, staged)), origin, remote_ip)
        except BaseException:
            for f, stored in zip(files, staged):
                self.area.unstage(stored.uuid, f.path)
            raise
        for f in files:
            self.area.forget_source(f.path)
        return outcomes

    def _commit(self, staged, origin: str, remote_ip: str) -> list[Outcome]:
        """Index staged files in one transaction, then publish them. This raises only if nothing
        was committed, and the caller then undoes the staging."""
        now = timestamp()
        items = [(parsed, stored, _metadata(parsed, now, origin, remote_ip)) for parsed, stored in staged]
        outcomes = self.index.store_instances(
            items, overwrite=self.overwrite, on_commit=lambda outcomes: self._publish(staged, outcomes)
        )
        self._remove_files([o.replaced_uuid for o in outcomes if o.replaced_uuid])
        return outcomes

    def _publish(self, staged, outcomes: list[Outcome]) -> None:
        """Runs inside the index's write lock, right after the commit. Were a file published
        later, a concurrent overwrite could trash it first: its removal would then delete the
        staged file under `publish` (a 500), or run before the file arrives (a file left behind)."""
        for (_, stored), outcome in zip(staged, outcomes):
            try:
                if outcome.status == "Success":
                    self.area.publish(stored.uuid)
                else:
                    self.area.discard(stored.uuid)
            except (OSError, AcceleratorError) as exc:
                log.warning("file %s stays in staging until the next start: %s", stored.uuid, exc)

    # -- reading -----------------------------------------------------------------------------

    def attachment(self, instance_id: str) -> Attachment:
        return self.index.attachment(instance_id)

    def read_file(self, instance_id: str) -> bytes:
        """The whole DICOM file, checked against the MD5 the index recorded: a file that changed
        in the storage is CorruptedFile, never served as if it were the instance."""
        att = self.index.attachment(instance_id)
        data = self.area.read(att.uuid, att.compressed)
        if len(data) != att.size or hashlib.md5(data).hexdigest() != att.md5:
            raise CorruptedFile(f"The stored file of instance {instance_id} fails its MD5 check")
        return data

    def read_range(self, attachment: Attachment, offset: int, length: int) -> bytes:
        return self.area.read_range(attachment.uuid, attachment.compressed, offset, length)

    def resource(self, level: Level, public_id: str) -> Resource:
        return self.index.resource(level, public_id)

    def statistics(self) -> dict[str, int]:
        return self.index.statistics()

    # -- deletion ----------------------------------------------------------------------------

    def delete(self, level: Level, public_id: str) -> Resource | None:
        """Delete a resource and its files; returns the nearest remaining ancestor."""
        remaining, uuids = self.index.delete(level, public_id)
        self._remove_files(uuids)
        return remaining

    def _remove_files(self, uuids: list[str]) -> None:
        """Unlink the files of rows already gone, then forget them in the trash. The rows' change
        is committed, so a failure here only leaves the trash to the next start."""
        if not uuids:
            return
        try:
            for uuid in uuids:
                self.area.remove(uuid)
            self.index.empty_trash(uuids)
        except (OSError, AcceleratorError) as exc:
            log.warning("%d removed file(s) stay in the trash until the next start: %s", len(uuids), exc)


def _metadata(parsed: ParsedInstance, now: str, origin: str, remote_ip: str) -> dict[str, str]:
    meta = {
        "ReceptionDate": now,
        "Origin": origin,
        "TransferSyntax": parsed.transfer_syntax_uid,
        "SopClassUid": parsed.sop_class_uid,
    }
    if parsed.index_in_series is not None:
        meta["IndexInSeries"] = str(parsed.index_in_series)
    if remote_ip:
        meta["RemoteIP"] = remote_ip
    return meta
