"""Schema of the SQLite index, its version, and the steps that upgrade an older index.

The version lives in `PRAGMA user_version`. A daemon refuses an index of another version at
start (`IndexVersionError`); `accelerator serve --upgrade` runs the missing steps in one
transaction. Add a step by appending to `UPGRADES` and bumping `SCHEMA_VERSION`; never edit a
step that has shipped.
"""

from __future__ import annotations

import sqlite3

from protocol.errors import IndexVersionError

SCHEMA_VERSION = 4

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

UPGRADES = {1: _VERSION_2, 2: _VERSION_3, 3: _VERSION_4}  # from version N to N + 1


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
    version = version_of(conn)
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
