"""Schema versions of the index: refusal of other versions, in-place upgrade (SQLite; the tests
that need no older index also run on PostgreSQL, whose upgrades under concurrency are tested in
test_postgres_index.py)."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from accelerator.store import Store
from accelerator.store import schema
from accelerator.store.index import INDEX_FILE
from protocol.errors import IndexVersionError
from protocol.resources import Level
from tests.dicom_data import make_instance


def _old_index(directory, version: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(directory / INDEX_FILE)
    schema.create(conn, version)
    conn.execute(
        "INSERT INTO resources(level, public_id, parent, main_tags, last_update) VALUES (0, 'p', NULL, '{}', 'x')"
    )
    conn.commit()
    conn.close()


def test_fresh_index_has_current_version(tmp_path, make_index, index_conninfo):
    store = Store(tmp_path, index=make_index(tmp_path))
    if index_conninfo is None:
        conn = sqlite3.connect(tmp_path / INDEX_FILE)
        assert schema.version_of(conn) == schema.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    else:
        with psycopg.connect(index_conninfo) as conn:
            assert schema.postgres_version_of(conn) == schema.SCHEMA_VERSION
            assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    store.close()


def test_older_index_is_refused_with_the_upgrade_command(tmp_path):
    _old_index(tmp_path, 1)
    with pytest.raises(IndexVersionError, match=r"accelerator serve --upgrade"):
        Store(tmp_path)
    conn = sqlite3.connect(tmp_path / INDEX_FILE)
    assert schema.version_of(conn) == 1  # refusing did not touch it
    conn.close()


def test_upgrade_in_place_keeps_data_and_enables_new_features(tmp_path):
    _old_index(tmp_path, 1)
    store = Store(tmp_path, upgrade=True)
    assert store.index.list_ids(Level.PATIENT) == ["p"]
    outcome = store.ingest_bytes(make_instance())
    store.index.set_label(Level.STUDY, outcome.parsed.ids.study, "urgent", True)
    assert store.index.all_labels() == ["urgent"]
    store.close()
    Store(tmp_path).close()  # now opens without --upgrade


def test_newer_index_is_refused_even_with_upgrade(tmp_path, make_index, index_conninfo):
    make_index(tmp_path).close()
    if index_conninfo is None:
        conn = sqlite3.connect(tmp_path / INDEX_FILE)
        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
        conn.close()
    else:
        with psycopg.connect(index_conninfo) as conn:
            conn.execute("UPDATE schema_version SET version = %s", (schema.SCHEMA_VERSION + 1,))
    for upgrade in (False, True):
        with pytest.raises(IndexVersionError, match="newer"):
            make_index(tmp_path, upgrade=upgrade)


def test_every_upgrade_step_is_defined():
    assert set(schema.UPGRADES) == set(range(1, schema.SCHEMA_VERSION))
    assert set(schema.POSTGRES_UPGRADES) == set(range(schema.POSTGRES_FIRST_VERSION, schema.SCHEMA_VERSION))
