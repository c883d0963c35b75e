"""Schema of the index (SQLite and PostgreSQL), its version, and the steps that upgrade an
older index.

SQLite keeps the version in `PRAGMA user_version`, PostgreSQL in the one-row table
`schema_version`. A daemon refuses an index of another version at start (`IndexVersionError`);
`accelerator serve --upgrade` runs the missing steps in one transaction. Add a step by appending
to `UPGRADES` and to `POSTGRES_UPGRADES` and bumping `SCHEMA_VERSION`; never edit a step that has
shipped. PostgreSQL indexes start at version 4 (`POSTGRES_FIRST_VERSION`): there is no older one
to upgrade. On PostgreSQL, creation and upgrade run under an advisory lock held by the
transaction (`SCHEMA_LOCK`), so that replicas starting together create the schema once.
"""

from __future__ import annotations

import sqlite3

from protocol.errors import IndexVersionError

SCHEMA_VERSION = 6

# Version 1: resources, their main tags, DICOM attachments and metadata.
_VERSION_1 = """
CREATE TABLE resources (
    id          INTEGER PRIMARY KEY,
    level       INTEGER NOT NULL,              -- protocol.resources.Level
    public_id   TEXT    NOT NULL UNIQUE,       -- Orthanc ID
    parent      INTEGER REFERENCES resources(id) ON DELETE CASCADE,
    main_tags   TEXT    NOT NULL,              -- JSON object keyword -> string
    last_update TEXT    NOT NULL               -- ISO basic, UTC
);
CREATE INDEX resources_parent ON resources(parent);
CREATE INDEX resources_level ON resources(level, public_id);

CREATE TABLE attachments (
    resource          INTEGER NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    content_type      INTEGER NOT NULL,        -- 1 = DICOM, as in Orthanc
    uuid              TEXT    NOT NULL UNIQUE, -- file name in the storage area
    uncompressed_size INTEGER NOT NULL,        -- exact DICOM bytes
    uncompressed_md5  TEXT    NOT NULL,
    compressed_size   INTEGER NOT NULL,        -- bytes on disk
    compressed_md5    TEXT    NOT NULL,
    compression       INTEGER NOT NULL,        -- 0 none, 1 zlib with size prefix
    PRIMARY KEY (resource, content_type)
);

CREATE TABLE metadata (
    resource INTEGER NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    name     TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    PRIMARY KEY (resource, name)
);
"""

# Version 2: labels, and the trash list that makes deletions crash-safe.
_VERSION_2 = """
CREATE TABLE labels (
    resource INTEGER NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    label    TEXT    NOT NULL,
    PRIMARY KEY (resource, label)
);
CREATE INDEX labels_label ON labels(label);

CREATE TABLE trash (
    uuid TEXT PRIMARY KEY                      -- files whose rows are gone, to unlink
);
"""

# Version 3: jobs (accelerator.jobs.engine), so that they survive a restart of the daemon.
_VERSION_3 = """
CREATE TABLE jobs (
    id       TEXT    PRIMARY KEY,              -- job ID, as in GET /jobs/{id}
    type     TEXT    NOT NULL,                 -- PullTransfer, PushTransfer
    priority INTEGER NOT NULL,
    state    TEXT    NOT NULL,                 -- Pending, Running, Paused, Success, Failure
    record   TEXT    NOT NULL                  -- JSON: query, content, checkpoint, error, times
);
"""

# Version 4: Orthanc's changes log (GET /changes), written in the transaction of the ingest it
# records. As in Orthanc's own index, the changes of a resource go with it when it is deleted,
# and `seq` is never reused (AUTOINCREMENT), even after DELETE /changes.
_VERSION_4 = """
CREATE TABLE changes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    change_type INTEGER NOT NULL,              -- Orthanc's ChangeType (2 NewInstance, 12 StablePatient...)
    resource    INTEGER NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    level       INTEGER NOT NULL,              -- protocol.resources.Level
    date        TEXT    NOT NULL               -- ISO basic, UTC, as Orthanc's
);
CREATE INDEX changes_resource ON changes(resource);
"""

# Version 5: jobs that any replica sharing the index can run (accelerator.jobs.engine). `owner`
# is the replica running the job (a UUID per process start; NULL: nobody), `lease_until` when
# its claim ends unless renewed (seconds since the epoch, by the database's clock: replicas'
# clocks may disagree), `request` a pause/cancel/resubmit asked through another replica, for
# the owner to act on at its next renewal.
_VERSION_5 = """
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL;
ALTER TABLE jobs ADD COLUMN request TEXT;
CREATE INDEX jobs_owner ON jobs(owner);
"""

# Version 6: objects staged in a shared object storage and not yet settled by their index
# commit (`since`: seconds since the epoch, by the stager's clock), so that any replica can
# settle those a dead replica left: committed, the object stays; not, it goes.
_VERSION_6 = """
CREATE TABLE pending_objects (
    uuid  TEXT PRIMARY KEY,
    since REAL NOT NULL
);
"""

UPGRADES = {1: _VERSION_2, 2: _VERSION_3, 3: _VERSION_4, 4: _VERSION_5, 5: _VERSION_6}  # from version N to N + 1


def version_of(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def is_empty(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 0


def create(conn: sqlite3.Connection, version: int = SCHEMA_VERSION) -> None:
    """Create a fresh index at `version` (older versions exist for upgrade tests)."""
    with conn:
        conn.executescript(_VERSION_1)
        for step in range(1, version):
            conn.executescript(UPGRADES[step])
        conn.execute(f"PRAGMA user_version = {version}")


def check(conn: sqlite3.Connection, path: str) -> None:
    check_version(version_of(conn), path)


def check_version(version: int, path: str) -> None:
    """Refuse an index of another version than this program's, saying what to do."""
    if version < SCHEMA_VERSION:
        raise IndexVersionError(
            f"The index {path} has schema version {version}, this program needs version "
            f"{SCHEMA_VERSION}. Back it up, then run `accelerator serve --upgrade` to upgrade it in place."
        )
    if version > SCHEMA_VERSION:
        raise IndexVersionError(
            f"The index {path} has schema version {version}, written by a newer accelerator; "
            f"this program only knows versions up to {SCHEMA_VERSION}."
        )


def upgrade(conn: sqlite3.Connection) -> tuple[int, int]:
    """Run the missing steps in one transaction; returns (old version, new version)."""
    old = version_of(conn)
    if old > SCHEMA_VERSION:
        check(conn, "")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(old, SCHEMA_VERSION):
            for statement in UPGRADES[step].split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return old, SCHEMA_VERSION


# -- PostgreSQL ------------------------------------------------------------------------------
# The same tables and columns as SQLite's at version 4, in PostgreSQL's types: sizes are BIGINT
# (an instance may exceed 2 GiB), row IDs are identities. `jobs.rowid` is named after SQLite's
# implicit column so that one query lists jobs in submission order on both. JSON stays TEXT (as
# written, key order kept; PostgreSQL's `::json` reads it).

POSTGRES_FIRST_VERSION = 4
SCHEMA_LOCK = 0x61636301  # pg_advisory_xact_lock key of schema creation and upgrade

_POSTGRES_VERSION_4 = """
CREATE TABLE schema_version (
    version INTEGER NOT NULL                   -- one row
);

CREATE TABLE resources (
    id          BIGINT   GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    level       SMALLINT NOT NULL,             -- protocol.resources.Level
    public_id   TEXT     NOT NULL UNIQUE,      -- Orthanc ID
    parent      BIGINT   REFERENCES resources(id) ON DELETE CASCADE,
    main_tags   TEXT     NOT NULL,             -- JSON object keyword -> string
    last_update TEXT     NOT NULL              -- ISO basic, UTC
);
CREATE INDEX resources_parent ON resources(parent);
CREATE INDEX resources_level ON resources(level, public_id);

CREATE TABLE attachments (
    resource          BIGINT   NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    content_type      INTEGER  NOT NULL,       -- 1 = DICOM, as in Orthanc
    uuid              TEXT     NOT NULL UNIQUE,
    uncompressed_size BIGINT   NOT NULL,
    uncompressed_md5  TEXT     NOT NULL,
    compressed_size   BIGINT   NOT NULL,
    compressed_md5    TEXT     NOT NULL,
    compression       SMALLINT NOT NULL,       -- 0 none, 1 zlib with size prefix
    PRIMARY KEY (resource, content_type)
);

CREATE TABLE metadata (
    resource BIGINT NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    name     TEXT   NOT NULL,
    value    TEXT   NOT NULL,
    PRIMARY KEY (resource, name)
);

CREATE TABLE labels (
    resource BIGINT NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    label    TEXT   NOT NULL,
    PRIMARY KEY (resource, label)
);
CREATE INDEX labels_label ON labels(label);

CREATE TABLE trash (
    uuid TEXT PRIMARY KEY
);

CREATE TABLE jobs (
    rowid    BIGINT  GENERATED ALWAYS AS IDENTITY UNIQUE,  -- submission order
    id       TEXT    PRIMARY KEY,
    type     TEXT    NOT NULL,
    priority INTEGER NOT NULL,
    state    TEXT    NOT NULL,
    record   TEXT    NOT NULL               -- JSON
);

CREATE TABLE changes (
    seq         BIGINT   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- never reused
    change_type INTEGER  NOT NULL,
    resource    BIGINT   NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    level       SMALLINT NOT NULL,
    date        TEXT     NOT NULL
);
CREATE INDEX changes_resource ON changes(resource);
"""

_POSTGRES_VERSION_5 = """
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN request TEXT;
CREATE INDEX jobs_owner ON jobs(owner);
"""

_POSTGRES_VERSION_6 = """
CREATE TABLE pending_objects (
    uuid  TEXT PRIMARY KEY,
    since DOUBLE PRECISION NOT NULL
);
"""

# from version N (>= POSTGRES_FIRST_VERSION) to N + 1
POSTGRES_UPGRADES: dict[int, str] = {4: _POSTGRES_VERSION_5, 5: _POSTGRES_VERSION_6}


def postgres_version_of(conn) -> int | None:
    """The schema version of a PostgreSQL index; None for an empty database."""
    if conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return row[0] if row else None


def postgres_prepare(conn, *, upgrade: bool, where: str) -> tuple[int, int]:
    """Create the schema of an empty database, or upgrade an older one if `upgrade`, then check
    the version; one transaction under the SCHEMA_LOCK advisory lock, so that replicas starting
    together wait for the first and then find its schema. Returns (old version or 0, version).
    `conn` is a psycopg connection in autocommit mode."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        old = postgres_version_of(conn)
        if old is None:
            conn.execute(_POSTGRES_VERSION_4)
            for step in range(POSTGRES_FIRST_VERSION, SCHEMA_VERSION):
                conn.execute(POSTGRES_UPGRADES[step])
            conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            return 0, SCHEMA_VERSION
        if upgrade and old < SCHEMA_VERSION:
            for step in range(old, SCHEMA_VERSION):
                conn.execute(POSTGRES_UPGRADES[step])
            conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            return old, SCHEMA_VERSION
        check_version(old, where)
        return old, old
