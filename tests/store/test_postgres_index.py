"""What only the PostgreSQL index does: schema creation and upgrade by replicas starting together,
the daemon lock, concurrent ingests of one instance by two replicas, reruns of deadlocked
transactions, and 503 while the server is away. (The index's queries are tested on both kinds of
index by tests/store/test_store.py, test_schema.py and tests/jobs/test_index.py.)"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.config import config_from_dict
from accelerator.store import Store, schema
from accelerator.store.postgres_index import PostgresIndex, PostgresSettings
from protocol.errors import ConfigError, DatabaseCannotSerialize, DatabaseUnavailable, IndexVersionError
from protocol.resources import Level
from tests.conftest import asgi_client, postgresql_section
from tests.dicom_data import make_instance


def _instance(n: int, series: str = "1.2.3.4") -> bytes:
    return make_instance(patient_id="P", study_uid="1.2.3", series_uid=series, sop_uid=f"{series}.{n}",
                         InstanceNumber=n)


@pytest.fixture
def database(postgres_server) -> tuple[Callable[..., PostgresSettings], str]:
    """A fresh database: (settings on it, with options; its libpq connection string)."""
    name = postgres_server.create_database()

    def settings(**options) -> PostgresSettings:
        return PostgresSettings(host=postgres_server.host, port=postgres_server.port, database=name,
                                username=postgres_server.user, maximum_connection_retries=0,
                                index_connections_count=4, **options)

    return settings, postgres_server.conninfo(name)


def _at_once(count: int, work: Callable[[], object]) -> list[object]:
    """Run `work` in `count` threads released together; its results, or the exceptions raised."""
    barrier = threading.Barrier(count)
    results: list[object] = []

    def run() -> None:
        barrier.wait()
        try:
            results.append(work())
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_replicas_starting_together_create_the_schema_once(database):
    settings, conninfo = database
    indexes = _at_once(4, lambda: PostgresIndex(settings(lock=False)))
    try:
        assert all(isinstance(i, PostgresIndex) for i in indexes), indexes
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(schema.SCHEMA_VERSION,)]
    finally:
        for index in indexes:
            if isinstance(index, PostgresIndex):
                index.close()


def test_upgrade_by_replicas_starting_together_runs_each_step_once(database, monkeypatch):
    """A step that would fail if run twice (ADD COLUMN), by three replicas with --upgrade."""
    settings, conninfo = database
    PostgresIndex(settings()).close()  # an index at the current version
    monkeypatch.setattr(schema, "SCHEMA_VERSION", schema.SCHEMA_VERSION + 1)
    monkeypatch.setitem(schema.POSTGRES_UPGRADES, schema.SCHEMA_VERSION - 1,
                        "ALTER TABLE resources ADD COLUMN upgraded TEXT")
    with pytest.raises(IndexVersionError, match="accelerator serve --upgrade"):
        PostgresIndex(settings())
    indexes = _at_once(3, lambda: PostgresIndex(settings(lock=False), upgrade=True))
    try:
        assert all(isinstance(i, PostgresIndex) for i in indexes), indexes
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [(schema.SCHEMA_VERSION,)]
            assert conn.execute("SELECT upgraded FROM resources").fetchall() == []  # the column exists
    finally:
        for index in indexes:
            if isinstance(index, PostgresIndex):
                index.close()


def test_lock_keeps_the_database_to_one_daemon(database):
    settings, _ = database
    alone = PostgresIndex(settings(lock_wait=0.3))
    try:
        for lock in (True, False):  # neither a second daemon nor a replica
            with pytest.raises(ConfigError, match='"Lock": false'):
                PostgresIndex(settings(lock=lock, lock_wait=0.3))
    finally:
        alone.close()
    replicas = [PostgresIndex(settings(lock=False)) for _ in range(2)]  # replicas share it
    try:
        with pytest.raises(ConfigError, match="Lock is true here"):
            PostgresIndex(settings(lock=True, lock_wait=0.3))
    finally:
        for index in replicas:
            index.close()
    PostgresIndex(settings()).close()  # alone again once they are gone


def test_two_replicas_ingesting_one_instance_at_once_store_one_copy(database, tmp_path):
    settings, _ = database
    stores = [Store(tmp_path / f"replica-{n}", index=PostgresIndex(settings(lock=False))) for n in range(2)]
    try:
        for n in range(5):
            data = _instance(n)
            outcomes = _ingest_on_each(stores, data)
            assert sorted(o.status for o in outcomes) == ["AlreadyStored", "Success"], outcomes
        assert [s.statistics()["instances"] for s in stores] == [5, 5]
        assert stores[0].statistics() == stores[1].statistics()
        # Different instances of one new series at once: both stored, one patient/study/series.
        outcomes = _ingest_on_each(stores, _instance(1, "1.2.3.5"), _instance(2, "1.2.3.5"))
        assert [o.status for o in outcomes] == ["Success", "Success"], outcomes
        stats = stores[1].statistics()
        assert (stats["patients"], stats["studies"], stats["series"], stats["instances"]) == (1, 1, 2, 7)
        changes, _, _ = stores[0].index.changes(0, 100)
        assert sum(c.change_type == 4 for c in changes) == 2  # one NewSeries per series
    finally:
        for store in stores:
            store.close()


def _ingest_on_each(stores: list[Store], *blobs: bytes) -> list[object]:
    """Replica n ingests blobs[n] (or the single blob), all released together."""
    barrier = threading.Barrier(len(stores))
    results: list[object] = [None] * len(stores)

    def run(n: int) -> None:
        barrier.wait()
        try:
            results[n] = stores[n].ingest_bytes(blobs[n] if len(blobs) > 1 else blobs[0])
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _deadlock_an_ingest(store: Store, conninfo: str, data: bytes) -> object:
    """Ingest `data` into an existing series while two other sessions make a real deadlock with
    it, the ingest being the one PostgreSQL aborts (the last to wait: deadlock_timeout is
    200 ms in bench.postgres). `gate` holds the attachments table: the ingest waits there,
    holding a key-share lock on the series' row (its new instance refers to it). `other` holds
    the patient's row and asks for the series' row: it waits for the ingest. `gate` lets go:
    the ingest touches its ancestors and waits for the patient's row: a cycle."""
    patient = store.index.list_ids(Level.PATIENT)[0]
    series = store.index.list_ids(Level.SERIES)[0]
    result: list[object] = []

    def ingest() -> None:
        try:
            result.append(store.ingest_bytes(data))
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result.append(exc)

    with psycopg.connect(conninfo) as gate, psycopg.connect(conninfo) as other:
        gate.execute("LOCK TABLE attachments IN SHARE MODE")
        other.execute("UPDATE resources SET last_update = last_update WHERE public_id = %s", (patient,))
        ingesting = threading.Thread(target=ingest)
        ingesting.start()
        time.sleep(0.5)  # the ingest waits at the gate
        waiting = threading.Thread(target=lambda: (
            other.execute("SELECT 1 FROM resources WHERE public_id = %s FOR UPDATE", (series,)), other.commit()))
        waiting.start()
        time.sleep(0.5)  # `other` waits for the ingest (and found no deadlock yet)
        gate.commit()
        ingesting.join(30)
        waiting.join(30)
    return result[0]


def test_a_deadlocked_ingest_is_run_again(database, tmp_path, caplog):
    settings, conninfo = database
    store = Store(tmp_path, index=PostgresIndex(settings()))
    try:
        store.ingest_bytes(_instance(1))
        with caplog.at_level(logging.INFO, logger="accelerator.store.postgres_index"):
            outcome = _deadlock_an_ingest(store, conninfo, _instance(2))
        assert getattr(outcome, "status", outcome) == "Success"
        assert "rerun after DeadlockDetected" in caplog.text
        assert store.statistics()["instances"] == 2
    finally:
        store.close()


def test_a_transaction_that_keeps_conflicting_is_a_503(database, tmp_path):
    settings, conninfo = database
    store = Store(tmp_path, index=PostgresIndex(settings()))
    try:
        store.ingest_bytes(_instance(1))
        store.index.retries = 0
        error = _deadlock_an_ingest(store, conninfo, _instance(2))
        assert isinstance(error, DatabaseCannotSerialize), error
        assert (error.http_status, error.orthanc_status) == (503, 42)
        assert store.statistics()["instances"] == 1
        assert not store.area.storage.staged()  # the staged file went with the transaction
    finally:
        store.close()


def test_no_server_at_start_is_database_unavailable():
    from bench.seaweedfs import free_ports

    settings = PostgresSettings(host="127.0.0.1", port=free_ports(1)[0], database="none",
                                maximum_connection_retries=1, connection_retry_interval=0)
    with pytest.raises(DatabaseUnavailable, match="after 2 attempt"):
        PostgresIndex(settings)


@pytest.mark.anyio
async def test_api_on_postgresql(postgres_server, tmp_path):
    """The REST API on a PostgreSQL index: ingest, lists, find, labels, changes, delete."""
    config = config_from_dict({"StorageDirectory": str(tmp_path / "storage"), **postgresql_section(postgres_server)})
    store = open_store(config)
    assert store.index.path.startswith("postgresql://")
    async with asgi_client(create_app(config, store)) as client, _closing(store):
        ids = [(await client.post("/instances", content=_instance(n))).json() for n in range(3)]
        assert {i["Status"] for i in ids} == {"Success"}
        assert (await client.post("/instances", content=_instance(0))).json()["Status"] == "AlreadyStored"
        study = ids[0]["ParentStudy"]
        assert await _json(client.get("/studies")) == [study]
        found = await _json(client.post("/tools/find", json={"Level": "Study", "Query": {"PatientID": "P*"}}))
        assert found == [study]
        assert (await client.put(f"/studies/{study}/labels/urgent")).status_code == 200
        assert await _json(client.get("/tools/labels")) == ["urgent"]
        changes = await _json(client.get("/changes"))
        assert [c["ChangeType"] for c in changes["Changes"][:4]] == ["NewInstance", "NewSeries", "NewStudy",
                                                                     "NewPatient"]
        assert (await client.delete(f"/instances/{ids[0]['ID']}")).status_code == 200
        stats = await _json(client.get("/statistics"))
        assert (stats["CountInstances"], stats["CountStudies"]) == (2, 1)


@contextlib.asynccontextmanager
async def _closing(store: Store):
    """The app's lifespan would close the store; these tests do not enter it."""
    try:
        yield
    finally:
        store.close()


async def _json(request):
    answer = await request
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.anyio
async def test_503_while_postgresql_is_away_then_works_again(tmp_path):
    """PostgreSQL stopped under a running app: requests get Orthanc's 503 (DatabaseUnavailable),
    not a 500, for as long as it is away; once it is back, the pool connects again at once (not
    after a back-off grown during the outage) and the same requests succeed."""
    from bench.postgres import postgres_bin_dir, start_postgres

    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed")
    server = start_postgres()  # its own: stopping it must not disturb other tests
    try:
        config = config_from_dict({"StorageDirectory": str(tmp_path / "storage"), **postgresql_section(server)})
        store = open_store(config)
        store.index.connection_wait = 1.0  # how long a request waits for a connection (5 s by default)
        async with asgi_client(create_app(config, store)) as client, _closing(store):
            assert (await client.post("/instances", content=_instance(1))).status_code == 200
            server.stop_server()
            down = time.monotonic()
            answers = []
            while time.monotonic() - down < 4:  # long enough for the pool to give up reconnecting
                answers += [await client.get("/statistics"), await client.post("/instances", content=_instance(2))]
            for answer in answers:
                assert answer.status_code == 503, answer.text
                assert answer.json()["OrthancStatus"] == 36
            server.start()
            started = time.monotonic()
            assert (await client.get("/statistics")).json()["CountInstances"] == 1
            assert (await client.post("/instances", content=_instance(2))).status_code == 200
            assert time.monotonic() - started < 3
            assert (await client.get("/statistics")).json()["CountInstances"] == 2
    finally:
        server.stop()


def test_a_test_database_is_empty(database):
    """Each test's database starts empty: tests never see each other's rows."""
    _, conninfo = database
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0


def test_settings_from_the_configuration(postgres_server, tmp_path):
    """Orthanc's option names, ConnectionUri winning over the separate fields; no password in
    the description that logs show."""
    section = postgresql_section(postgres_server, Password="secret")["PostgreSQL"]
    uri = postgres_server.uri(section["Database"])
    config = config_from_dict({"StorageDirectory": str(tmp_path), "PostgreSQL": {
        **section, "Host": "nowhere.invalid", "ConnectionUri": uri}})
    assert "secret" not in repr(config.postgresql)
    store = open_store(config)
    try:
        assert store.index.path == uri and "secret" not in store.index.path
        assert store.statistics()["instances"] == 0
    finally:
        store.close()
    assert config_from_dict({"StorageDirectory": str(tmp_path), "PostgreSQL": {
        **section, "EnableIndex": False}}).postgresql_index is None
    assert config_from_dict({"PostgreSQL": {"TransactionMode": "ReadCommitted", "Typo": 1}}).unknown_keys == (
        "PostgreSQL.Typo",)  # the plugin's options we have no use for pass silently
    with pytest.raises(ConfigError, match="PostgreSQL.EnableStorage: attachments in PostgreSQL are not supported"):
        config_from_dict({"PostgreSQL": {"EnableStorage": True}})
    with pytest.raises(ConfigError, match="PostgreSQL.Password") as error:
        config_from_dict({"PostgreSQL": {"Password": 12345}})
    assert "12345" not in str(error.value)
    default = open_store(config_from_dict({"StorageDirectory": str(tmp_path)}))
    try:
        assert Path(default.index.path).suffix == ".sqlite"
    finally:
        default.close()
