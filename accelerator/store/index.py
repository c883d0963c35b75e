"""The index: the resource hierarchy, attachments, metadata, labels, jobs and the changes log.

`IndexBase` is the one interface and holds every query; an implementation only says how to get
a connection, run a write transaction and the few expressions the databases spell differently.
`SqliteIndex` (also named `Index`: the default) is the embedded one, `PostgresIndex`
(accelerator.store.postgres_index) the one replicas share. The SQL is written once, in the
dialect both accept (`?` placeholders, translated for PostgreSQL; `INSERT ... ON CONFLICT`;
`RETURNING`).

Writes in one process are serialised by a lock (SQLite serialises writers anyway), held from the
transaction through `store_instances`'s `on_commit`. Every method is blocking and is meant to run
in a worker thread.

SQLite: one writer connection and one reader connection per thread (WAL lets them read while a
write is in progress). A write that finds the disk full ("database or disk is full") is rolled
back and raised as `FullStorage`.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson

from accelerator.store import schema
from accelerator.store.area import StoredFile
from accelerator.store.dicom import ParsedInstance
from protocol.errors import FullStorage, UnknownResource
from protocol.resources import Level

DICOM_ATTACHMENT = 1
INDEX_FILE = "accelerator-index.sqlite"
T = TypeVar("T")

# The changes log (GET /changes): Orthanc's ChangeType values (ServerEnumerations.h) of the
# changes Orthanc writes to its index for what we do. `Deleted` is not one of them: Orthanc only
# signals it to plugins, and the changes of a deleted resource leave the log with it.
NEW_INSTANCE, NEW_PATIENT, NEW_SERIES, NEW_STUDY = 2, 3, 4, 5
STABLE_PATIENT, STABLE_STUDY, STABLE_SERIES = 12, 13, 14
CHANGE_TYPES = {1: "CompletedSeries", NEW_INSTANCE: "NewInstance", NEW_PATIENT: "NewPatient",
                NEW_SERIES: "NewSeries", NEW_STUDY: "NewStudy", STABLE_PATIENT: "StablePatient",
                STABLE_STUDY: "StableStudy", STABLE_SERIES: "StableSeries"}
_NEW = {Level.PATIENT: NEW_PATIENT, Level.STUDY: NEW_STUDY, Level.SERIES: NEW_SERIES, Level.INSTANCE: NEW_INSTANCE}
_STABLE = {Level.PATIENT: STABLE_PATIENT, Level.STUDY: STABLE_STUDY, Level.SERIES: STABLE_SERIES}
MAX_CHANGES = 1_000_000  # entries the log keeps; older ones are pruned (Orthanc's log is unbounded)
STABLE_AGE = 60  # seconds without a new instance before a patient/study/series is stable (Orthanc's default)


@dataclass(frozen=True)
class Change:
    """One entry of the changes log."""

    seq: int
    change_type: int
    level: Level
    public_id: str
    date: str


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


@dataclass(frozen=True)
class JobRow:
    """A job as the index has it, with who holds it (accelerator.jobs.engine)."""

    id: str
    type: str
    priority: int
    state: str
    record: dict
    owner: str | None  # the replica holding the job; None: nobody
    live: bool  # the owner's lease has not run out (False without an owner)
    request: str | None  # "pause", "cancel" or "resubmit" left for the owner


@dataclass(frozen=True)
class JobEdit:
    """What `IndexBase.modify_job` writes; None leaves a column as it is."""

    state: str | None = None
    record: bytes | None = None
    request: str | None = None
    claim_for: str | None = None  # the replica that now holds the job, with a fresh lease


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime())


def _is_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL: "database or disk is full" (the primary code of the extended one)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_FULL


class IndexBase:
    """Every query of the index; subclasses provide the connections and the dialect.

    A subclass implements `_read()` (a connection for reads), `_run_transaction(work)` (call
    `work(connection)` in one write transaction and commit), `_rows(sql, params, batch)` (a
    query's rows fetched `batch` at a time), `_last_seq(c)`, and sets the dialect attributes.
    A connection only needs `execute(sql, params)` returning a cursor and `executemany`.
    """

    #: `LIMIT ?` value meaning no limit.
    UNLIMITED: int | None = -1
    #: Expression of one main tag's value, and the parameter it takes for a keyword.
    MAIN_TAG_SQL = "json_extract(CAST(main_tags AS TEXT), ?)"
    path: object  # what the log names: the SQLite file, or the PostgreSQL database

    def __init__(self) -> None:
        self._write_lock = threading.RLock()  # re-entered by store_instances, see there
        # Patients, studies and series that received an instance less than STABLE_AGE seconds
        # ago, oldest first: row -> (level, public ID, monotonic and wall time of the last one).
        # In memory, as Orthanc's: a restart forgets them (their Stable* change never comes).
        self._unstable: OrderedDict[int, tuple[Level, str, float, float]] = OrderedDict()
        self._unstable_lock = threading.Lock()
        self.stable_age = STABLE_AGE

    def close(self) -> None:
        raise NotImplementedError

    # -- what an implementation provides -----------------------------------------------------

    def _read(self):
        """A context manager giving a connection for reads."""
        raise NotImplementedError

    def _run_transaction(self, work: Callable[[object], T]) -> T:
        raise NotImplementedError

    def _rows(self, sql: str, params: tuple, batch: int) -> Iterator[tuple]:
        raise NotImplementedError

    def _last_seq(self, c) -> int:
        """The last sequence number ever given (0 if none): it survives DELETE /changes."""
        raise NotImplementedError

    @staticmethod
    def _main_tag_param(keyword: str) -> str:
        return f'$."{keyword}"'

    @staticmethod
    def _encode_json(value: object) -> bytes | str:
        return orjson.dumps(value)

    # -- transactions ------------------------------------------------------------------------

    def _write(self, work: Callable[[object], T]) -> T:
        """One write transaction running `work(connection)`: all of it or nothing."""
        with self._write_lock:
            return self._run_transaction(work)

    # -- ingest ------------------------------------------------------------------------------

    def store_instances(
        self,
        items: Iterable[tuple[ParsedInstance, StoredFile, dict[str, str]]],
        *,
        overwrite: bool,
        on_commit: Callable[[list[Outcome]], None] = lambda outcomes: None,
    ) -> list[Outcome]:
        """Index a batch of staged instances in one transaction: all of them or none.

        `on_commit` runs right after the commit, before any other write transaction of this
        process can start: the store moves the files into place there, so that no later
        transaction can replace or delete (and so remove) a file that is not in its place yet.
        The transaction may run more than once (PostgreSQL retries it on a conflict): it starts
        from scratch each time.
        """
        now = timestamp()
        items = list(items)
        with self._write_lock:
            due = self._due_stable()

            def work(c) -> tuple[list[Outcome], list[tuple[int, Level, str]]]:
                touched: list[tuple[int, Level, str]] = []  # ancestors that become (again) unstable
                self._log_stable(c, due)  # before the new entries: the log stays in time order
                outcomes = [self._store_instance(c, *item, overwrite, now, touched) for item in items]
                self._prune_changes(c)
                return outcomes, touched

            outcomes, touched = self._write(work)
            on_commit(outcomes)
            self._mark_unstable(touched)
        return outcomes

    def _store_instance(self, c, parsed: ParsedInstance, stored: StoredFile, metadata: dict[str, str],
                        overwrite: bool, now: str, touched: list[tuple[int, Level, str]]) -> Outcome:
        """One instance of `store_instances`; a replaced file goes to the trash. Logs the
        changes Orthanc logs, in its order: NewInstance, then NewSeries, NewStudy, NewPatient
        for the resources it creates. The rows are created with `ON CONFLICT DO NOTHING` on
        the Orthanc IDs: when another process (a replica) stores the same instance at the same
        time, one of them stores it and the other finds it already stored."""
        ids = parsed.ids
        existing = c.execute("SELECT id FROM resources WHERE public_id = ?", (ids.instance,)).fetchone()
        if existing and not overwrite:
            return Outcome("AlreadyStored", parsed)
        replaced = None
        if existing:
            row = existing[0]
            self._log_overwrite(c, row, now)
            old = c.execute(
                "SELECT uuid FROM attachments WHERE resource = ? AND content_type = ?",
                (row, DICOM_ATTACHMENT),
            ).fetchone()
            c.execute("DELETE FROM attachments WHERE resource = ?", (row,))
            c.execute("DELETE FROM metadata WHERE resource = ?", (row,))
            c.execute(
                "UPDATE resources SET main_tags = ?, last_update = ? WHERE id = ?",
                (self._encode_json(parsed.tags[Level.INSTANCE]), now, row),
            )
            replaced = old[0] if old else None
            if replaced:
                c.execute("INSERT INTO trash(uuid) VALUES (?) ON CONFLICT DO NOTHING", (replaced,))
            for level, public_id in reversed(list(zip(Level, ids))[:-1]):  # series, study, patient
                parent = c.execute("SELECT id FROM resources WHERE public_id = ?", (public_id,)).fetchone()[0]
                touched.append((parent, level, public_id))
        else:
            row = None
            created, ancestors = [], []
            for level, public_id in zip(Level, ids):
                row, new = self._ensure(c, level, public_id, row, parsed.tags[level], now)
                if new:
                    created.append((row, level))
                elif level is Level.INSTANCE:  # stored meanwhile by another process
                    return Outcome("AlreadyStored", parsed)
                if level is not Level.INSTANCE:
                    ancestors.append((row, level, public_id))
            for new_row, level in reversed(created):  # instance first, up to the patient
                self._log_change(c, _NEW[level], new_row, level, now)
            touched.extend(reversed(ancestors))  # series, study, patient: the order Orthanc marks them
        c.execute(
            "INSERT INTO attachments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (row, DICOM_ATTACHMENT, stored.uuid, stored.size, stored.md5,
             stored.stored_size, stored.stored_md5, int(stored.compressed)),
        )
        c.executemany("INSERT INTO metadata VALUES (?, ?, ?)", [(row, k, v) for k, v in metadata.items()])
        self._touch_ancestors(c, row, now)
        return Outcome("Success", parsed, replaced)

    def _ensure(self, c, level: Level, public_id: str, parent: int | None, tags: dict, now: str) -> tuple[int, bool]:
        """The resource's row, and whether it was created now."""
        row = c.execute("SELECT id FROM resources WHERE public_id = ?", (public_id,)).fetchone()
        if row:
            return row[0], False
        created = c.execute(
            """INSERT INTO resources(level, public_id, parent, main_tags, last_update) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (public_id) DO NOTHING RETURNING id""",
            (int(level), public_id, parent, self._encode_json(tags), now),
        ).fetchone()
        if created:
            return created[0], True
        # Inserted by a concurrent transaction since our SELECT (PostgreSQL waited for its commit).
        return c.execute("SELECT id FROM resources WHERE public_id = ?", (public_id,)).fetchone()[0], False

    # -- changes log -------------------------------------------------------------------------

    @staticmethod
    def _log_change(c, change_type: int, row: int, level: Level, date: str) -> None:
        c.execute("INSERT INTO changes(change_type, resource, level, date) VALUES (?, ?, ?, ?)",
                  (change_type, row, int(level), date))

    def _log_overwrite(self, c, row: int, now: str) -> None:
        """An overwritten instance, as Orthanc records it: Orthanc deletes the old instance (and
        the ancestors it leaves empty, with their changes) and creates it again, so the log
        forgets their past entries and gets NewInstance (NewSeries...) again."""
        recreated = []
        while row is not None:
            level, parent = c.execute("SELECT level, parent FROM resources WHERE id = ?", (row,)).fetchone()
            recreated.append((row, Level(level)))
            if parent is None or c.execute(
                    "SELECT count(*) FROM resources WHERE parent = ?", (parent,)).fetchone()[0] > 1:
                break
            row = parent
        for old, level in recreated:
            c.execute("DELETE FROM changes WHERE resource = ?", (old,))
            self._log_change(c, _NEW[level], old, level, now)

    def _prune_changes(self, c) -> None:
        """Keep the log within MAX_CHANGES entries (a range delete on the key: cheap)."""
        last = self._last_seq(c)
        if last > MAX_CHANGES:
            c.execute("DELETE FROM changes WHERE seq <= ?", (last - MAX_CHANGES,))

    def _mark_unstable(self, touched: list[tuple[int, Level, str]]) -> None:
        now, wall = time.monotonic(), time.time()
        with self._unstable_lock:
            for row, level, public_id in touched:
                self._unstable.pop(row, None)
                self._unstable[row] = (level, public_id, now, wall)  # most recent last

    def _due_stable(self) -> list[tuple[int, Level, str, float]]:
        """Take the resources whose last instance came more than `stable_age` seconds ago."""
        due = []
        limit = time.monotonic() - self.stable_age
        with self._unstable_lock:
            while self._unstable:
                row, (level, public_id, last, wall) = next(iter(self._unstable.items()))
                if last >= limit:
                    break
                del self._unstable[row]
                due.append((row, level, public_id, wall))
        return due

    def _log_stable(self, c, due: list[tuple[int, Level, str, float]]) -> None:
        """Log StableSeries/StableStudy/StablePatient for the resources now stable, dated when
        they became so (Orthanc's monitor logs them then; we log them at the next write or
        read of the log, which keeps both the order and the dates)."""
        for row, level, public_id, wall in due:
            alive = c.execute("SELECT 1 FROM resources WHERE id = ? AND public_id = ?", (row, public_id)).fetchone()
            if alive:  # a deleted one gets no entry (Orthanc's insert fails on it)
                date = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall + self.stable_age))
                self._log_change(c, _STABLE[level], row, level, date)

    def flush_stable(self) -> None:
        """Log the Stable* changes that are due (before the log is read)."""
        with self._unstable_lock:
            due = bool(self._unstable) and next(iter(self._unstable.values()))[2] < time.monotonic() - self.stable_age
        if due:
            with self._write_lock:
                stable = self._due_stable()
                self._write(lambda c: self._log_stable(c, stable))

    def changes(self, since: int, limit: int) -> tuple[list[Change], bool, int]:
        """Orthanc's GetChanges: entries after `since`, at most `limit`; whether they reach the
        end of the log; and the last sequence number (of the last entry, or the log's)."""
        self.flush_stable()
        with self._read() as c:
            rows = c.execute(
                """SELECT c.seq, c.change_type, c.level, r.public_id, c.date
                   FROM changes c JOIN resources r ON r.id = c.resource
                   WHERE c.seq > ? ORDER BY c.seq LIMIT ?""", (since, limit + 1)).fetchall()
            done = len(rows) <= limit
            entries = [Change(r[0], r[1], Level(r[2]), r[3], r[4]) for r in rows[:limit]]
            return entries, done, entries[-1].seq if entries else self._last_seq(c)

    def last_change(self) -> tuple[list[Change], int]:
        """Orthanc's `?last`: the last entry (if any) and the last sequence number."""
        self.flush_stable()
        with self._read() as c:
            rows = c.execute(
                """SELECT c.seq, c.change_type, c.level, r.public_id, c.date
                   FROM changes c JOIN resources r ON r.id = c.resource ORDER BY c.seq DESC LIMIT 1""").fetchall()
            entries = [Change(r[0], r[1], Level(r[2]), r[3], r[4]) for r in rows]
            return entries, entries[-1].seq if entries else self._last_seq(c)

    def last_change_seq(self) -> int:
        with self._read() as c:
            return self._last_seq(c)

    def clear_changes(self) -> None:
        """DELETE /changes: the log is emptied; sequence numbers go on from where they were."""
        self._write(lambda c: c.execute("DELETE FROM changes"))

    @staticmethod
    def _touch_ancestors(c, row: int, now: str) -> None:
        c.execute(
            """WITH RECURSIVE up(id) AS (SELECT parent FROM resources WHERE id = ?
                 UNION ALL SELECT r.parent FROM resources r JOIN up ON r.id = up.id WHERE r.parent IS NOT NULL)
               UPDATE resources SET last_update = ? WHERE id IN (SELECT id FROM up)""",
            (row, now),
        )

    def exists(self, public_id: str) -> bool:
        with self._read() as c:
            return c.execute("SELECT 1 FROM resources WHERE public_id = ?", (public_id,)).fetchone() is not None

    def committed_uuids(self, uuids: Iterable[str]) -> set[str]:
        """Which of these file names have an attachment row (used by crash recovery)."""
        found = set()
        with self._read() as c:
            for uuid in uuids:
                if c.execute("SELECT 1 FROM attachments WHERE uuid = ?", (uuid,)).fetchone():
                    found.add(uuid)
        return found

    # -- reading -----------------------------------------------------------------------------

    def resource(self, level: Level, public_id: str) -> Resource:
        with self._read() as c:
            row = c.execute(
                """SELECT r.id, r.level, r.public_id, p.public_id, r.main_tags, r.last_update
                   FROM resources r LEFT JOIN resources p ON p.id = r.parent
                   WHERE r.public_id = ? AND r.level = ?""",
                (public_id, int(level)),
            ).fetchone()
        if row is None:
            raise UnknownResource(f"Unknown {level.title.lower()}: {public_id}")
        return Resource(row[0], Level(row[1]), row[2], row[3], orjson.loads(row[4]), row[5])

    def list_ids(self, level: Level, since: int = 0, limit: int | None = None) -> list[str]:
        with self._read() as c:
            rows = c.execute(
                "SELECT public_id FROM resources WHERE level = ? ORDER BY id LIMIT ? OFFSET ?",
                (int(level), self.UNLIMITED if limit is None else limit, since),
            ).fetchall()
        return [r[0] for r in rows]

    def children(self, resource: Resource) -> list[str]:
        with self._read() as c:
            rows = c.execute(
                "SELECT public_id FROM resources WHERE parent = ? ORDER BY id", (resource.row,)
            ).fetchall()
        return [r[0] for r in rows]

    def descendants(self, resource: Resource, level: Level) -> list[str]:
        """Public IDs of the descendants at `level` (the resource itself if at that level)."""
        with self._read() as c:
            rows = c.execute(
                """WITH RECURSIVE sub(id, level, public_id) AS (
                     SELECT id, level, public_id FROM resources WHERE id = ?
                     UNION ALL SELECT r.id, r.level, r.public_id FROM resources r JOIN sub ON r.parent = sub.id
                     WHERE sub.level < ?)
                   SELECT public_id FROM sub WHERE level = ? ORDER BY id""",
                (resource.row, int(level), int(level)),
            ).fetchall()
        return [r[0] for r in rows]

    def instance_files(self, level: Level, public_id: str) -> list[InstanceFile]:
        """Every instance below a resource with its file facts, from the index alone."""
        resource = self.resource(level, public_id)
        with self._read() as c:
            rows = c.execute(
                """WITH RECURSIVE sub(id, level, public_id) AS (
                     SELECT id, level, public_id FROM resources WHERE id = ?
                     UNION ALL SELECT r.id, r.level, r.public_id FROM resources r JOIN sub ON r.parent = sub.id
                     WHERE sub.level < 3)
                   SELECT sub.public_id, a.uuid, a.uncompressed_size, a.uncompressed_md5, a.compressed_size,
                          a.compressed_md5, a.compression
                   FROM sub JOIN attachments a ON a.resource = sub.id AND a.content_type = 1
                   WHERE sub.level = 3""",
                (resource.row,),
            ).fetchall()
        return [InstanceFile(r[0], Attachment(r[1], r[2], r[3], r[4], r[5], bool(r[6]))) for r in rows]

    def attachment(self, instance_id: str) -> Attachment:
        resource = self.resource(Level.INSTANCE, instance_id)
        with self._read() as c:
            row = c.execute(
                """SELECT uuid, uncompressed_size, uncompressed_md5, compressed_size, compressed_md5, compression
                   FROM attachments WHERE resource = ? AND content_type = ?""",
                (resource.row, DICOM_ATTACHMENT),
            ).fetchone()
        if row is None:
            raise UnknownResource(f"Instance {instance_id} has no DICOM attachment")
        return Attachment(row[0], row[1], row[2], row[3], row[4], bool(row[5]))

    def metadata(self, resource: Resource) -> dict[str, str]:
        with self._read() as c:
            return dict(c.execute("SELECT name, value FROM metadata WHERE resource = ?", (resource.row,)).fetchall())

    def count_descendants(self, resource: Resource, level: Level) -> int:
        return len(self.descendants(resource, level))

    def statistics(self) -> dict[str, int]:
        counts = dict.fromkeys(Level, 0)
        with self._read() as c:
            for level, count in c.execute("SELECT level, count(*) FROM resources GROUP BY level").fetchall():
                counts[Level(level)] = count
            disk, uncompressed = c.execute(
                "SELECT coalesce(sum(compressed_size), 0), coalesce(sum(uncompressed_size), 0) FROM attachments"
            ).fetchone()
        return {
            "patients": counts[Level.PATIENT],
            "studies": counts[Level.STUDY],
            "series": counts[Level.SERIES],
            "instances": counts[Level.INSTANCE],
            "disk_size": int(disk),  # PostgreSQL's sum() of BIGINT is NUMERIC
            "uncompressed_size": int(uncompressed),
        }

    # -- labels ------------------------------------------------------------------------------

    def labels(self, resource: Resource) -> list[str]:
        with self._read() as c:
            rows = c.execute("SELECT label FROM labels WHERE resource = ? ORDER BY label", (resource.row,)).fetchall()
        return [r[0] for r in rows]

    def all_labels(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT DISTINCT label FROM labels ORDER BY label").fetchall()]

    def set_label(self, level: Level, public_id: str, label: str, present: bool) -> None:
        def work(c) -> None:
            row = c.execute(
                "SELECT id FROM resources WHERE public_id = ? AND level = ?", (public_id, int(level))
            ).fetchone()
            if row is None:
                raise UnknownResource(f"Unknown {level.title.lower()}: {public_id}")
            if present:
                c.execute("INSERT INTO labels VALUES (?, ?) ON CONFLICT DO NOTHING", (row[0], label))
            else:
                c.execute("DELETE FROM labels WHERE resource = ? AND label = ?", (row[0], label))

        self._write(work)

    # -- deletion ----------------------------------------------------------------------------

    def delete(self, level: Level, public_id: str) -> tuple[Resource | None, list[str]]:
        """Delete a resource, its descendants and any ancestor left empty, in one transaction.

        Returns the nearest remaining ancestor and the file names moved to the trash.
        """
        return self._write(lambda c: self._delete(c, level, public_id))

    def _delete(self, c, level: Level, public_id: str) -> tuple[Resource | None, list[str]]:
        row = c.execute(
            "SELECT id, parent FROM resources WHERE public_id = ? AND level = ?", (public_id, int(level))
        ).fetchone()
        if row is None:
            raise UnknownResource(f"Unknown {level.title.lower()}: {public_id}")
        target, parent = row
        while parent is not None:  # climb while the parent would be left without children
            siblings = c.execute("SELECT count(*) FROM resources WHERE parent = ?", (parent,)).fetchone()[0]
            if siblings > 1:
                break
            target, parent = c.execute("SELECT id, parent FROM resources WHERE id = ?", (parent,)).fetchone()
        uuids = [r[0] for r in c.execute(
            """WITH RECURSIVE sub(id) AS (SELECT CAST(? AS BIGINT) UNION ALL
                 SELECT r.id FROM resources r JOIN sub ON r.parent = sub.id)
               SELECT a.uuid FROM attachments a JOIN sub ON a.resource = sub.id""",
            (target,),
        ).fetchall()]
        c.executemany("INSERT INTO trash(uuid) VALUES (?) ON CONFLICT DO NOTHING", [(u,) for u in uuids])
        c.execute("DELETE FROM resources WHERE id = ?", (target,))
        remaining = None
        if parent is not None:
            prow = c.execute(
                "SELECT id, level, public_id, main_tags, last_update FROM resources WHERE id = ?", (parent,),
            ).fetchone()
            remaining = Resource(prow[0], Level(prow[1]), prow[2], None, orjson.loads(prow[3]), prow[4])
        return remaining, uuids

    def trash(self) -> list[str]:
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT uuid FROM trash").fetchall()]

    def empty_trash(self, uuids: Iterable[str]) -> None:
        rows = [(u,) for u in uuids]
        self._write(lambda c: c.executemany("DELETE FROM trash WHERE uuid = ?", rows))

    # -- objects staged by replicas ----------------------------------------------------------
    # What `ObjectStorage` records before it writes an object that no index row names yet, when
    # the storage is shared by replicas (`accelerator.store.pending`): a row outlives the replica
    # that wrote it, so any replica can settle it.

    def mark_pending(self, uuid: str, since: float) -> None:
        self._write(lambda c: c.execute("INSERT INTO pending_objects (uuid, since) VALUES (?, ?) "
                                        "ON CONFLICT (uuid) DO NOTHING", (uuid, since)))

    def clear_pending(self, uuids: Iterable[str]) -> None:
        rows = [(u,) for u in uuids]
        if rows:
            self._write(lambda c: c.executemany("DELETE FROM pending_objects WHERE uuid = ?", rows))

    def pending_objects(self, before: float | None = None) -> list[str]:
        """Staged objects not settled yet; with `before`, only those staged before that time."""
        with self._read() as c:
            if before is None:
                rows = c.execute("SELECT uuid FROM pending_objects ORDER BY uuid").fetchall()
            else:
                rows = c.execute("SELECT uuid FROM pending_objects WHERE since < ? ORDER BY uuid",
                                 (before,)).fetchall()
        return [r[0] for r in rows]

    def is_pending(self, uuid: str) -> bool:
        with self._read() as c:
            return c.execute("SELECT 1 FROM pending_objects WHERE uuid = ?", (uuid,)).fetchone() is not None

    # -- jobs --------------------------------------------------------------------------------
    # The jobs engine (accelerator.jobs.engine) keeps each job as one row: searchable columns
    # plus a JSON record that only the engine interprets, given here already encoded (the
    # engine encodes it in the event loop, where the job's values cannot change meanwhile).
    #
    # Replicas sharing the index (`shared`) run each job on one of them: the `owner` of a row
    # is the replica holding it (running it, or discarding what it left), until `lease_until`
    # (the database's clock, so that replicas' clocks do not matter) unless it renews the lease.
    # A row whose lease ran out belongs to a replica that died: another claims it and resumes
    # it. `request` carries a pause/cancel/resubmit asked through another replica to the owner.

    def insert_job(self, job_id: str, job_type: str, priority: int, state: str, record: bytes,
                   owner: str | None = None, lease: float = 0) -> None:
        """A new job; with `owner`, already held by that replica for `lease` seconds (the
        replica that accepted it runs it at once when it has room)."""
        if owner is None:
            self._write(lambda c: c.execute(
                "INSERT INTO jobs(id, type, priority, state, record) VALUES (?, ?, ?, ?, ?)",
                (job_id, job_type, priority, state, record.decode()),
            ))
            return
        self._write(lambda c: c.execute(
            "INSERT INTO jobs(id, type, priority, state, record, owner, lease_until)"
            f" VALUES (?, ?, ?, ?, ?, ?, {self.NOW_SQL} + ?)",
            (job_id, job_type, priority, state, record.decode(), owner, float(lease)),
        ))

    def update_job(self, job_id: str, state: str, record: bytes, owner: str | None = None) -> bool:
        """Rewrite a job's state and record; a job deleted meanwhile stays deleted. With `owner`,
        only while that replica still holds the job (a replica whose lease ran out while it was
        stalled must not overwrite the state of the replica that took the job over). Returns
        whether the row was written."""
        if owner is None:
            sql, params = "UPDATE jobs SET state = ?, record = ? WHERE id = ?", (state, record.decode(), job_id)
        else:
            sql = "UPDATE jobs SET state = ?, record = ? WHERE id = ? AND owner = ?"
            params = (state, record.decode(), job_id, owner)
        return self._write(lambda c: c.execute(sql, params).rowcount) > 0

    def jobs(self) -> list[tuple[str, str, int, str, dict]]:
        """Every job as (id, type, priority, state, record), in submission order."""
        with self._read() as c:
            rows = c.execute("SELECT id, type, priority, state, record FROM jobs ORDER BY rowid").fetchall()
        return [(r[0], r[1], r[2], r[3], orjson.loads(r[4])) for r in rows]

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        rows = [(i,) for i in job_ids]
        self._write(lambda c: c.executemany("DELETE FROM jobs WHERE id = ?", rows))

    # The database's clock in seconds since the epoch, and how a claim query locks its rows:
    # SQLite has one writer at a time anyway (BEGIN IMMEDIATE), so it needs no row locks.
    NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"
    LOCK_ROWS = ""
    SKIP_LOCKED_ROWS = ""
    #: The completion time in a job's record (the history bound reads no whole record).
    JOB_CHANGED_SQL = "json_extract(record, '$.changed')"

    @property
    def shared(self) -> bool:
        """Whether other daemons (replicas) may use this index at the same time."""
        return False

    def _job_columns(self) -> str:
        return ("id, type, priority, state, record, owner, "
                f"CASE WHEN owner IS NOT NULL AND lease_until >= {self.NOW_SQL} THEN 1 ELSE 0 END, request")

    @staticmethod
    def _job_row(r: tuple) -> JobRow:
        return JobRow(r[0], r[1], r[2], r[3], orjson.loads(r[4]), r[5], bool(r[6]), r[7])

    def job_rows(self) -> list[JobRow]:
        """Every job with its owner, in submission order (GET /jobs on any replica)."""
        with self._read() as c:
            rows = c.execute(f"SELECT {self._job_columns()} FROM jobs ORDER BY rowid").fetchall()
        return [self._job_row(r) for r in rows]

    def job_ids(self) -> list[str]:
        """Every job's ID (GET /jobs without expand reads no record)."""
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT id FROM jobs ORDER BY rowid").fetchall()]

    def finished_jobs(self) -> list[tuple[str, str]]:
        """(ID, completion time in ISO basic) of the finished jobs nobody holds."""
        with self._read() as c:
            return [(r[0], r[1] or "") for r in c.execute(
                f"SELECT id, {self.JOB_CHANGED_SQL} FROM jobs"
                " WHERE state IN ('Success', 'Failure') AND owner IS NULL").fetchall()]

    def job_row(self, job_id: str) -> JobRow | None:
        """One job as it is now in the index; None if unknown (GET /jobs/{id} on any replica)."""
        with self._read() as c:
            row = c.execute(f"SELECT {self._job_columns()} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job_row(row)

    def claim_jobs(self, owner: str, limit: int, lease: float) -> list[JobRow]:
        """Take up to `limit` jobs for replica `owner`, best first (highest priority, then
        submission order): Pending jobs nobody holds, and jobs whose owner's lease ran out.
        One transaction; on PostgreSQL the rows are locked with SKIP LOCKED, so replicas that
        claim at the same moment take different jobs without waiting for each other. The rows
        are returned as they were (state, record, pending request), now owned by `owner`.
        A Running job nobody holds was left so by a daemon that had the index alone (`Lock`
        true) before the replicas: it is taken as the job of a replica that died."""
        if limit <= 0:
            return []

        def work(c) -> list[JobRow]:
            rows = c.execute(
                f"SELECT {self._job_columns()} FROM jobs"
                " WHERE (state IN ('Pending', 'Running') AND owner IS NULL)"
                f" OR (owner IS NOT NULL AND lease_until < {self.NOW_SQL})"
                f" ORDER BY priority DESC, rowid LIMIT ?{self.SKIP_LOCKED_ROWS}", (limit,)).fetchall()
            c.executemany(
                f"UPDATE jobs SET owner = ?, lease_until = {self.NOW_SQL} + ?, request = NULL WHERE id = ?",
                [(owner, float(lease), r[0]) for r in rows])
            return [self._job_row(r) for r in rows]

        return self._write(work)

    def renew_jobs(self, owner: str, job_ids: Iterable[str], lease: float) -> dict[str, str | None]:
        """Extend the lease of the jobs among `job_ids` that `owner` still holds; returns those,
        each with the request another replica left for it (cleared: the owner acts on it now).
        A job missing from the answer was taken over: the owner must stop it. Rows the owner
        holds but did not name (it gave up on them, e.g. after losing the database for longer
        than a lease) are left to expire, so that any replica can claim them."""
        wanted = set(job_ids)

        def work(c) -> dict[str, str | None]:
            rows = c.execute(f"SELECT id, request FROM jobs WHERE owner = ?{self.LOCK_ROWS}", (owner,)).fetchall()
            held = {r[0]: r[1] for r in rows if r[0] in wanted}
            c.executemany(
                f"UPDATE jobs SET lease_until = {self.NOW_SQL} + ?, request = NULL WHERE id = ? AND owner = ?",
                [(float(lease), job_id, owner) for job_id in held])
            return held

        return self._write(work)

    def release_job(self, job_id: str, state: str, record: bytes, owner: str) -> tuple[bool, str | None]:
        """Write a job's state and record and let go of it (nobody holds a Paused or finished
        job, nor a Pending one given back at shutdown), if `owner` still holds it. Returns
        (written, the request left for it since the last renewal: the caller asks it again of
        the job as it is now, so that it is not lost)."""

        def work(c) -> tuple[bool, str | None]:
            row = c.execute(f"SELECT request FROM jobs WHERE id = ? AND owner = ?{self.LOCK_ROWS}",
                            (job_id, owner)).fetchone()
            if row is None:
                return False, None
            c.execute("UPDATE jobs SET state = ?, record = ?, owner = NULL, lease_until = NULL, request = NULL"
                      " WHERE id = ?", (state, record.decode(), job_id))
            return True, row[0]

        return self._write(work)

    def modify_job(self, job_id: str, decide: Callable[[JobRow | None], JobEdit | None], lease: float = 0) -> None:
        """Read one job's row locked, let `decide(row)` (None: unknown job) say what to write,
        and write it, in one transaction: a pause, resume, cancel or resubmit asked through a
        replica that does not hold the job. `decide` runs inside the transaction: it only
        computes (it may raise to refuse, nothing is written then)."""

        def work(c) -> None:
            found = c.execute(f"SELECT {self._job_columns()} FROM jobs WHERE id = ?{self.LOCK_ROWS}",
                              (job_id,)).fetchone()
            edit = decide(None if found is None else self._job_row(found))
            if edit is None or found is None:
                return
            sets, params = [], []
            for column, value in (("state", edit.state), ("record", edit.record and edit.record.decode()),
                                  ("request", edit.request)):
                if value is not None:
                    sets.append(f"{column} = ?")
                    params.append(value)
            if edit.claim_for is not None:
                sets.append(f"owner = ?, lease_until = {self.NOW_SQL} + ?")
                params += [edit.claim_for, float(lease)]
            if sets:
                c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*params, job_id))

        self._write(work)

    def delete_finished_jobs(self, job_ids: Iterable[str]) -> None:
        """Forget finished jobs nobody holds (the history bound, applied by any replica): a job
        resubmitted or taken meanwhile is kept."""
        rows = [(i,) for i in job_ids]
        self._write(lambda c: c.executemany(
            "DELETE FROM jobs WHERE id = ? AND owner IS NULL AND state IN ('Success', 'Failure')", rows))

    # -- read-only scans for POST /tools/find and /tools/lookup (accelerator.api.find) ---------

    def scan(self, level: Level, batch: int = 1000) -> Iterator[tuple[int, str, int | None, dict[str, str]]]:
        """(row, public ID, parent row, main tags) of every resource at `level`, in row order,
        fetched `batch` rows at a time (memory stays flat whatever the number of resources)."""
        for row in self._rows(
                "SELECT id, public_id, parent, main_tags FROM resources WHERE level = ? ORDER BY id",
                (int(level),), batch):
            yield row[0], row[1], row[2], orjson.loads(row[3])

    def main_tag_values(self, level: Level, keyword: str, batch: int = 1000) -> Iterator[tuple[str, str | None]]:
        """(public ID, value of one main tag, None if absent) of every resource at `level`, in
        row order; the database extracts the value, no JSON is decoded here."""
        for row in self._rows(
                f"SELECT public_id, {self.MAIN_TAG_SQL} FROM resources WHERE level = ? ORDER BY id",
                (self._main_tag_param(keyword), int(level)), batch):
            yield row[0], row[1]

    def labels_at(self, level: Level) -> dict[int, set[str]]:
        """The labels of every labelled resource at `level`, by row."""
        labels: dict[int, set[str]] = {}
        with self._read() as c:
            rows = c.execute(
                "SELECT l.resource, l.label FROM labels l JOIN resources r ON r.id = l.resource WHERE r.level = ?",
                (int(level),)).fetchall()
        for row, label in rows:
            labels.setdefault(row, set()).add(label)
        return labels


class SqliteIndex(IndexBase):
    """The embedded index: one SQLite file (WAL) under `directory`."""

    def __init__(self, directory: Path, *, upgrade: bool = False):
        super().__init__()
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / INDEX_FILE
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
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

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """This thread's reader connection (kept open for the next read)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        yield conn

    def _run_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """A failed COMMIT is rolled back too (SQLite may already have done it, e.g. on a full
        disk), so that the writer connection stays usable."""
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = work(conn)
            conn.execute("COMMIT")
            return result
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if _is_full(exc):
                raise FullStorage(f"The index cannot grow: {exc}") from None
            raise

    def _rows(self, sql: str, params: tuple, batch: int) -> Iterator[tuple]:
        with self._read() as c:
            cursor = c.execute(sql, params)
            try:
                while rows := cursor.fetchmany(batch):
                    yield from rows
            finally:
                cursor.close()

    def _last_seq(self, c) -> int:
        row = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return row[0] if row else 0


#: The default index; code that only uses an index should name `IndexBase`.
Index = SqliteIndex
