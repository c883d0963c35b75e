"""The SQLite index: the resource hierarchy, attachments, metadata and labels.

One writer connection behind a lock (SQLite serialises writers anyway) and one reader connection
per thread (WAL lets them read while a write is in progress). Every method is blocking and is
meant to run in a worker thread. A write that finds the disk full ("database or disk is full") is
rolled back and raised as `FullStorage`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson

from accelerator.store import schema
from accelerator.store.area import StoredFile
from accelerator.store.dicom import ParsedInstance
from protocol.errors import FullStorage, UnknownResource
from protocol.resources import Level

DICOM_ATTACHMENT = 1
INDEX_FILE = "accelerator-index.sqlite"


@dataclass(frozen=True)
class Resource:
    row: int
    level: Level
    public_id: str
    parent: str | None  # public ID of the parent
    main_tags: dict[str, str]
    last_update: str


@dataclass(frozen=True)
class Attachment:
    uuid: str
    size: int
    md5: str
    stored_size: int
    stored_md5: str
    compressed: bool


@dataclass(frozen=True)
class InstanceFile:
    """What a transfer needs of an instance: its ID and the facts of its DICOM file."""

    instance_id: str
    attachment: Attachment


@dataclass(frozen=True)
class Outcome:
    """What happened to one instance of an ingest batch."""

    status: str  # "Success" or "AlreadyStored"
    parsed: ParsedInstance
    replaced_uuid: str | None = None  # file of an overwritten copy, now in the trash


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def _is_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL: "database or disk is full" (the primary code of the extended one)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


class Index:
    def __init__(self, directory: Path, *, upgrade: bool = False):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / INDEX_FILE
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._write_lock = threading.RLock()  # re-entered by store_instances, see there
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode = WAL")
        if schema.is_empty(self._writer):
            schema.create(self._writer)
        elif upgrade and schema.version_of(self._writer) != schema.SCHEMA_VERSION:
            schema.upgrade(self._writer)
        schema.check(self._writer, str(self.path))

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")  # a committed row must outlive its file's rename
        return conn

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._writer.close()

    # -- connections -------------------------------------------------------------------------

    @property
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. A failed COMMIT is rolled back too (SQLite may already have
        done it, e.g. on a full disk), so that the writer connection stays usable."""
        with self._write_lock:
            conn = self._writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _is_full(exc):
                    raise FullStorage(f"The index cannot grow: {exc}") from None
                raise

    # -- ingest ------------------------------------------------------------------------------

    def store_instances(
        self,
        items: Iterable[tuple[ParsedInstance, StoredFile, dict[str, str]]],
        *,
        overwrite: bool,
        on_commit: Callable[[list[Outcome]], None] = lambda outcomes: None,
    ) -> list[Outcome]:
        """Index a batch of staged instances in one transaction: all of them or none.

        `on_commit` runs right after the commit, before any other write transaction can start:
        the store moves the files into place there, so that no later transaction can replace or
        delete (and so remove) a file that is not in its place yet.
        """
        now = timestamp()
        with self._write_lock:
            with self._write() as c:
                outcomes = [self._store_instance(c, *item, overwrite, now) for item in items]
            on_commit(outcomes)
        return outcomes

    def _store_instance(self, c, parsed: ParsedInstance, stored: StoredFile, metadata: dict[str, str],
                        overwrite: bool, now: str) -> Outcome:
        """One instance of `store_instances`; a replaced file goes to the trash."""
        ids = parsed.ids
        existing = c.execute("SELECT id FROM resources WHERE public_id = ?", (ids.instance,)).fetchone()
        if existing and not overwrite:
            return Outcome("AlreadyStored", parsed)
        replaced = None
        if existing:
            row = existing[0]
            old = c.execute(
                "SELECT uuid FROM attachments WHERE resource = ? AND content_type = ?",
                (row, DICOM_ATTACHMENT),
            ).fetchone()
            c.execute("DELETE FROM attachments WHERE resource = ?", (row,))
            c.execute("DELETE FROM metadata WHERE resource = ?", (row,))
            c.execute(
                "UPDATE resources SET main_tags = ?, last_update = ? WHERE id = ?",
                (orjson.dumps(parsed.tags[Level.INSTANCE]), now, row),
            )
            replaced = old[0] if old else None
            if replaced:
                c.execute("INSERT OR IGNORE INTO trash(uuid) VALUES (?)", (replaced,))
        else:
            row = None
            for level, public_id in zip(Level, ids):
                row = self._ensure(c, level, public_id, row, parsed.tags[level], now)
        c.execute(
            "INSERT INTO attachments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row, DICOM_ATTACHMENT, stored.uuid, stored.size, stored.md5,
             stored.stored_size, stored.stored_md5, int(stored.compressed)),
        )
        c.executemany("INSERT INTO metadata VALUES (?, ?, ?)", [(row, k, v) for k, v in metadata.items()])
        self._touch_ancestors(c, row, now)
        return Outcome("Success", parsed, replaced)

    @staticmethod
    def _ensure(c, level: Level, public_id: str, parent: int | None, tags: dict, now: str) -> int:
        row = c.execute("SELECT id FROM resources WHERE public_id = ?", (public_id,)).fetchone()
        if row:
            return row[0]
        return c.execute(
            "INSERT INTO resources(level, public_id, parent, main_tags, last_update) VALUES (?, ?, ?, ?, ?)",
            (int(level), public_id, parent, orjson.dumps(tags), now),
        ).lastrowid

    @staticmethod
    def _touch_ancestors(c, row: int, now: str) -> None:
        c.execute(
            """WITH RECURSIVE up(id) AS (SELECT parent FROM resources WHERE id = ?
                 UNION ALL SELECT r.parent FROM resources r JOIN up ON r.id = up.id WHERE r.parent IS NOT NULL)
               UPDATE resources SET last_update = ? WHERE id IN (SELECT id FROM up)""",
            (row, now),
        )

    def exists(self, public_id: str) -> bool:
        return self._reader.execute(
            "SELECT 1 FROM resources WHERE public_id = ?", (public_id,)
        ).fetchone() is not None

    def committed_uuids(self, uuids: Iterable[str]) -> set[str]:
        """Which of these file names have an attachment row (used by crash recovery)."""
        found = set()
        for uuid in uuids:
            if self._reader.execute("SELECT 1 FROM attachments WHERE uuid = ?", (uuid,)).fetchone():
                found.add(uuid)
        return found

    # -- reading -----------------------------------------------------------------------------

    def resource(self, level: Level, public_id: str) -> Resource:
        row = self._reader.execute(
            """SELECT r.id, r.level, r.public_id, p.public_id, r.main_tags, r.last_update
               FROM resources r LEFT JOIN resources p ON p.id = r.parent
               WHERE r.public_id = ? AND r.level = ?""",
            (public_id, int(level)),
        ).fetchone()
        if row is None:
            raise UnknownResource(f"Unknown {level.title.lower()}: {public_id}")
        return Resource(row[0], Level(row[1]), row[2], row[3], orjson.loads(row[4]), row[5])

    def list_ids(self, level: Level, since: int = 0, limit: int | None = None) -> list[str]:
        rows = self._reader.execute(
            "SELECT public_id FROM resources WHERE level = ? ORDER BY id LIMIT ? OFFSET ?",
            (int(level), -1 if limit is None else limit, since),
        )
        return [r[0] for r in rows]

    def children(self, resource: Resource) -> list[str]:
        rows = self._reader.execute(
            "SELECT public_id FROM resources WHERE parent = ? ORDER BY id", (resource.row,)
        )
        return [r[0] for r in rows]

    def descendants(self, resource: Resource, level: Level) -> list[str]:
        """Public IDs of the descendants at `level` (the resource itself if at that level)."""
        rows = self._reader.execute(
            """WITH RECURSIVE sub(id, level, public_id) AS (
                 SELECT id, level, public_id FROM resources WHERE id = ?
                 UNION ALL SELECT r.id, r.level, r.public_id FROM resources r JOIN sub ON r.parent = sub.id
                 WHERE sub.level < ?)
               SELECT public_id FROM sub WHERE level = ? ORDER BY id""",
            (resource.row, int(level), int(level)),
        )
        return [r[0] for r in rows]

    def instance_files(self, level: Level, public_id: str) -> list[InstanceFile]:
        """Every instance below a resource with its file facts, from the index alone."""
        resource = self.resource(level, public_id)
        rows = self._reader.execute(
            """WITH RECURSIVE sub(id, level, public_id) AS (
                 SELECT id, level, public_id FROM resources WHERE id = ?
                 UNION ALL SELECT r.id, r.level, r.public_id FROM resources r JOIN sub ON r.parent = sub.id
                 WHERE sub.level < 3)
               SELECT sub.public_id, a.uuid, a.uncompressed_size, a.uncompressed_md5, a.compressed_size,
                      a.compressed_md5, a.compression
               FROM sub JOIN attachments a ON a.resource = sub.id AND a.content_type = 1
               WHERE sub.level = 3""",
            (resource.row,),
        )
        return [InstanceFile(r[0], Attachment(r[1], r[2], r[3], r[4], r[5], bool(r[6]))) for r in rows]

    def attachment(self, instance_id: str) -> Attachment:
        resource = self.resource(Level.INSTANCE, instance_id)
        row = self._reader.execute(
            """SELECT uuid, uncompressed_size, uncompressed_md5, compressed_size, compressed_md5, compression
               FROM attachments WHERE resource = ? AND content_type = ?""",
            (resource.row, DICOM_ATTACHMENT),
        ).fetchone()
        if row is None:
            raise UnknownResource(f"Instance {instance_id} has no DICOM attachment")
        return Attachment(row[0], row[1], row[2], row[3], row[4], bool(row[5]))

    def metadata(self, resource: Resource) -> dict[str, str]:
        rows = self._reader.execute("SELECT name, value FROM metadata WHERE resource = ?", (resource.row,))
        return dict(rows.fetchall())

    def count_descendants(self, resource: Resource, level: Level) -> int:
        return len(self.descendants(resource, level))

    def statistics(self) -> dict[str, int]:
        counts = dict.fromkeys(Level, 0)
        for level, count in self._reader.execute("SELECT level, count(*) FROM resources GROUP BY level"):
            counts[Level(level)] = count
        disk, uncompressed = self._reader.execute(
            "SELECT coalesce(sum(compressed_size), 0), coalesce(sum(uncompressed_size), 0) FROM attachments"
        ).fetchone()
        return {
            "patients": counts[Level.PATIENT],
            "studies": counts[Level.STUDY],
            "series": counts[Level.SERIES],
            "instances": counts[Level.INSTANCE],
            "disk_size": disk,
            "uncompressed_size": uncompressed,
        }

    # -- labels ------------------------------------------------------------------------------

    def labels(self, resource: Resource) -> list[str]:
        rows = self._reader.execute(
            "SELECT label FROM labels WHERE resource = ? ORDER BY label", (resource.row,)
        )
        return [r[0] for r in rows]

    def all_labels(self) -> list[str]:
        return [r[0] for r in self._reader.execute("SELECT DISTINCT label FROM labels ORDER BY label")]

    def set_label(self, level: Level, public_id: str, label: str, present: bool) -> None:
        with self._write() as c:
            row = c.execute(
                "SELECT id FROM resources WHERE public_id = ? AND level = ?", (public_id, int(level))
            ).fetchone()
            if row is None:
                raise UnknownResource(f"Unknown {level.title.lower()}: {public_id}")
            if present:
                c.execute("INSERT OR IGNORE INTO labels VALUES (?, ?)", (row[0], label))
            else:
                c.execute("DELETE FROM labels WHERE resource = ? AND label = ?", (row[0], label))

    # -- deletion ----------------------------------------------------------------------------

    def delete(self, level: Level, public_id: str) -> tuple[Resource | None, list[str]]:
        """Delete a resource, its descendants and any ancestor left empty, in one transaction.

        Returns the nearest remaining ancestor and the file names moved to the trash.
        """
        with self._write() as c:
            row = c.execute(
                "SELECT id, parent FROM resources WHERE public_id = ? AND level = ?", (public_id, int(level))
            ).fetchone()
            if row is None:
                raise UnknownResource(f"Unknown {level.title.lower()}: {public_id}")
            target, parent = row
            while parent is not None:  # climb while the parent would be left without children
                siblings = c.execute(
                    "SELECT count(*) FROM resources WHERE parent = ?", (parent,)
                ).fetchone()[0]
                if siblings > 1:
                    break
                target, parent = c.execute(
                    "SELECT id, parent FROM resources WHERE id = ?", (parent,)
                ).fetchone()
            uuids = [r[0] for r in c.execute(
                """WITH RECURSIVE sub(id) AS (SELECT ? UNION ALL
                     SELECT r.id FROM resources r JOIN sub ON r.parent = sub.id)
                   SELECT a.uuid FROM attachments a JOIN sub ON a.resource = sub.id""",
                (target,),
            )]
            c.executemany("INSERT OR IGNORE INTO trash(uuid) VALUES (?)", [(u,) for u in uuids])
            c.execute("DELETE FROM resources WHERE id = ?", (target,))
            remaining = None
            if parent is not None:
                prow = c.execute(
                    "SELECT id, level, public_id, main_tags, last_update FROM resources WHERE id = ?",
                    (parent,),
                ).fetchone()
                remaining = Resource(prow[0], Level(prow[1]), prow[2], None, orjson.loads(prow[3]), prow[4])
        return remaining, uuids

    def trash(self) -> list[str]:
        return [r[0] for r in self._reader.execute("SELECT uuid FROM trash")]

    def empty_trash(self, uuids: Iterable[str]) -> None:
        with self._write() as c:
            c.executemany("DELETE FROM trash WHERE uuid = ?", [(u,) for u in uuids])

    # -- jobs --------------------------------------------------------------------------------
    # The jobs engine (accelerator.jobs.engine) keeps each job as one row: searchable columns
    # plus a JSON record that only the engine interprets, given here already encoded (the
    # engine encodes it in the event loop, where the job's values cannot change meanwhile).

    def insert_job(self, job_id: str, job_type: str, priority: int, state: str, record: bytes) -> None:
        with self._write() as c:
            c.execute(
                "INSERT INTO jobs(id, type, priority, state, record) VALUES (?, ?, ?, ?, ?)",
                (job_id, job_type, priority, state, record.decode()),
            )

    def update_job(self, job_id: str, state: str, record: bytes) -> None:
        """Rewrite a job's state and record; a job deleted meanwhile stays deleted."""
        with self._write() as c:
            c.execute("UPDATE jobs SET state = ?, record = ? WHERE id = ?", (state, record.decode(), job_id))

    def jobs(self) -> list[tuple[str, str, int, str, dict]]:
        """Every job as (id, type, priority, state, record), in submission order."""
        rows = self._reader.execute("SELECT id, type, priority, state, record FROM jobs ORDER BY rowid")
        return [(r[0], r[1], r[2], r[3], orjson.loads(r[4])) for r in rows]

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        with self._write() as c:
            c.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
