"""The `jobs` table of the index (schema version 3) and its methods, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3

import orjson
import psycopg
import pytest

from accelerator.store import Store, schema
from accelerator.store.index import INDEX_FILE
from protocol.resources import Level
from tests.jobs.fakes import TYPE, make_engine, wait_state

pytestmark = pytest.mark.anyio


def test_job_rows_round_trip_in_submission_order(tmp_path, make_index, index_conninfo):
    index = make_index(tmp_path)
    try:
        for n in range(3):
            index.insert_job(f"job-{2 - n}", "PullTransfer", n, "Pending", orjson.dumps({"n": n}))
        index.update_job("job-1", "Running", orjson.dumps({"n": 10}))
        index.update_job("gone", "Running", b"{}")  # unknown: nothing happens
        assert index.jobs() == [
            ("job-2", "PullTransfer", 0, "Pending", {"n": 0}),
            ("job-1", "PullTransfer", 1, "Running", {"n": 10}),
            ("job-0", "PullTransfer", 2, "Pending", {"n": 2}),
        ]
        index.delete_jobs(["job-2", "job-0"])
        assert [row[0] for row in index.jobs()] == ["job-1"]
        if index_conninfo is None:
            conn = sqlite3.connect(tmp_path / INDEX_FILE)  # readable with sqlite's JSON functions
            assert conn.execute("SELECT json_extract(record, '$.n') FROM jobs").fetchone() == (10,)
            conn.close()
        else:
            with psycopg.connect(index_conninfo) as conn:  # and with PostgreSQL's
                assert conn.execute("SELECT (record::json ->> 'n')::int FROM jobs").fetchone() == (10,)
    finally:
        index.close()


async def test_upgrade_from_version_2_adds_the_jobs_table(tmp_path):
    conn = sqlite3.connect(tmp_path / INDEX_FILE)
    schema.create(conn, 2)
    conn.execute("INSERT INTO resources(level, public_id, parent, main_tags, last_update) "
                 "VALUES (0, 'p', NULL, '{}', 'x')")
    conn.commit()
    conn.close()
    store = Store(tmp_path, upgrade=True)
    try:
        assert store.index.list_ids(Level.PATIENT) == ["p"]
        engine, _ = make_engine(store.index)
        async with engine.running():
            job_id = await engine.submit(TYPE, {"do": "succeed"})
            await wait_state(engine, job_id, "Success")
        assert [row[3] for row in store.index.jobs()] == ["Success"]
    finally:
        store.close()


async def test_jobs_persist_across_a_restart(tmp_path, make_index):
    """The engine on either index: a job submitted before a restart is listed after it."""
    store = Store(tmp_path, index=make_index(tmp_path))
    try:
        engine, _ = make_engine(store.index)
        async with engine.running():
            job_id = await engine.submit(TYPE, {"do": "succeed"})
            await wait_state(engine, job_id, "Success")
    finally:
        store.close()
    reopened = Store(tmp_path, index=make_index(tmp_path))
    try:
        assert [(row[0], row[3]) for row in reopened.index.jobs()] == [(job_id, "Success")]
    finally:
        reopened.close()
