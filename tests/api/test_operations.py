"""accelerator.api.operations: the changes log, clock, UIDs, log level, modalities and the
Prometheus metrics, in process, as Orthanc 1.12 answers them (see the module's docstring)."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accelerator.api.app import create_app, open_store
from accelerator.config import config_from_dict
from accelerator.store import Store, schema
from accelerator.store.index import INDEX_FILE, MAX_CHANGES
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

pytestmark = pytest.mark.anyio

ISO = re.compile(r"^\d{8}T\d{6}$")
UID = re.compile(r"^[12](\.(0|[1-9][0-9]*))+$")


def _instance(n: int, *, patient: str = "P1", study: str = "1.2.3", series: str = "1.2.3.4") -> bytes:
    return make_instance(patient_id=patient, study_uid=study, series_uid=series, sop_uid=f"{series}.{n}")


async def _client(tmp_path, **options) -> tuple:
    config = config_from_dict({"StorageDirectory": str(tmp_path / "storage"), **options})
    store = open_store(config)
    app = create_app(config, store)
    return app, store, asgi_client(app)


@pytest.fixture
async def daemon(tmp_path) -> AsyncIterator[tuple]:
    app, store, client = await _client(tmp_path)
    async with client, app.state.jobs.running():
        yield app, store, client
    store.close()


async def _upload(client: httpx.AsyncClient, data: bytes) -> dict:
    answer = await client.post("/instances", content=data)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _changes(client: httpx.AsyncClient, query: str = "") -> dict:
    answer = await client.get(f"/changes{query}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    return answer.json()


def _kinds(changes: dict) -> list[tuple[str, str]]:
    return [(c["ChangeType"], c["ID"]) for c in changes["Changes"]]


async def test_changes_after_ingest_have_orthancs_order_and_shape(daemon):
    _, _, client = daemon
    assert await _changes(client) == {"Changes": [], "Done": True, "Last": 0}
    first = await _upload(client, _instance(1))
    second = await _upload(client, _instance(2))
    await _upload(client, _instance(2))  # AlreadyStored: nothing logged
    log = await _changes(client)
    assert _kinds(log) == [("NewInstance", first["ID"]), ("NewSeries", first["ParentSeries"]),
                           ("NewStudy", first["ParentStudy"]), ("NewPatient", first["ParentPatient"]),
                           ("NewInstance", second["ID"])]
    assert [c["Seq"] for c in log["Changes"]] == [1, 2, 3, 4, 5]
    assert log["Done"] is True and log["Last"] == 5
    entry = log["Changes"][1]
    assert set(entry) == {"ChangeType", "Date", "ID", "Path", "ResourceType", "Seq"}
    assert entry["Path"] == f"/series/{first['ParentSeries']}" and entry["ResourceType"] == "Series"
    assert ISO.match(entry["Date"])


async def test_since_limit_and_last(daemon):
    _, _, client = daemon
    for n in range(3):
        await _upload(client, _instance(n))  # 4 + 1 + 1 entries
    page = await _changes(client, "?limit=2")
    assert [c["Seq"] for c in page["Changes"]] == [1, 2] and page["Done"] is False and page["Last"] == 2
    page = await _changes(client, "?since=2&limit=4")
    assert [c["Seq"] for c in page["Changes"]] == [3, 4, 5, 6] and page["Done"] is True and page["Last"] == 6
    page = await _changes(client, "?since=6")
    assert page == {"Changes": [], "Done": True, "Last": 6}
    page = await _changes(client, "?since=100")
    assert page == {"Changes": [], "Done": True, "Last": 6}  # the log's last Seq, not `since`
    page = await _changes(client, "?limit=0")
    assert page["Changes"] == [] and page["Done"] is False and page["Last"] == 6
    last = await _changes(client, "?last")
    assert [c["Seq"] for c in last["Changes"]] == [6] and last["Done"] is True and last["Last"] == 6
    # Orthanc falls back to since=0, limit=100 when an argument does not parse: no 400.
    for bad in ("?since=abc", "?limit=x", "?since=1&limit=1.5", "?since=99999999999999999999"):
        page = await _changes(client, bad)
        assert [c["Seq"] for c in page["Changes"]] == [1, 2, 3, 4, 5, 6], bad
    page = await _changes(client, "?since=4&limit=-1")  # boost::lexical_cast<unsigned>("-1"): 2^32 - 1
    assert [c["Seq"] for c in page["Changes"]] == [5, 6]


async def test_deleted_resources_leave_the_log_and_delete_changes_empties_it(daemon):
    _, _, client = daemon
    a = await _upload(client, _instance(1))
    b = await _upload(client, _instance(2))
    other = await _upload(client, _instance(1, patient="P2", study="9.8", series="9.8.7"))
    assert (await client.delete(f"/instances/{b['ID']}")).status_code == 200
    log = await _changes(client)
    ids = [c["ID"] for c in log["Changes"]]
    assert b["ID"] not in ids and a["ID"] in ids
    assert all(c["ChangeType"] != "Deleted" for c in log["Changes"])  # Orthanc logs no Deleted
    assert (await client.delete(f"/patients/{a['ParentPatient']}")).status_code == 200
    log = await _changes(client)
    assert {c["ID"] for c in log["Changes"]} == {other["ID"], other["ParentSeries"], other["ParentStudy"],
                                                  other["ParentPatient"]}
    assert log["Last"] == 9
    answer = await client.delete("/changes")
    assert answer.status_code == 200 and answer.text == ""
    assert await _changes(client) == {"Changes": [], "Done": True, "Last": 9}
    again = await _upload(client, _instance(3))
    log = await _changes(client)  # patient P1 was deleted: all four are new again
    assert [(c["Seq"], c["ID"]) for c in log["Changes"]][:2] == [(10, again["ID"]), (11, again["ParentSeries"])]


async def test_stable_changes_follow_stable_age(daemon):
    _, store, client = daemon
    first = await _upload(client, _instance(1))
    assert [k for k, _ in _kinds(await _changes(client))] == ["NewInstance", "NewSeries", "NewStudy", "NewPatient"]
    store.index.stable_age = 0  # what 60 s later would see
    log = await _changes(client)
    assert _kinds(log)[4:] == [("StableSeries", first["ParentSeries"]), ("StableStudy", first["ParentStudy"]),
                               ("StablePatient", first["ParentPatient"])]
    assert all(ISO.match(c["Date"]) for c in log["Changes"])
    assert len((await _changes(client))["Changes"]) == 7  # logged once
    store.index.stable_age = 3600
    await _upload(client, _instance(2))  # unstable again: a new Stable* comes only after StableAge
    assert [c["ChangeType"] for c in (await _changes(client))["Changes"]][7:] == ["NewInstance"]


async def test_overwritten_instance_is_logged_as_orthanc_recreates_it(tmp_path):
    app, store, client = await _client(tmp_path, OverwriteInstances=True)
    async with client, app.state.jobs.running():
        first = await _upload(client, _instance(1))
        await _upload(client, _instance(1))
        log = await _changes(client)
        # The only instance of its series, study and patient: Orthanc deletes all four and creates
        # them again, so their first entries go and new ones come.
        assert [(c["Seq"], c["ChangeType"]) for c in log["Changes"]] == [
            (5, "NewInstance"), (6, "NewSeries"), (7, "NewStudy"), (8, "NewPatient")]
        assert log["Changes"][0]["ID"] == first["ID"]
        second = await _upload(client, _instance(2))
        await _upload(client, _instance(2))  # it has a sibling now: only the instance is recreated
        assert [(c["Seq"], c["ChangeType"], c["ID"]) for c in (await _changes(client, "?since=8"))["Changes"]] == [
            (10, "NewInstance", second["ID"])]
    store.close()


async def test_changes_log_is_pruned(daemon, monkeypatch):
    _, _, client = daemon
    monkeypatch.setattr("accelerator.store.index.MAX_CHANGES", 3)
    await _upload(client, _instance(1))
    await _upload(client, _instance(2))
    log = await _changes(client)
    assert [c["Seq"] for c in log["Changes"]] == [3, 4, 5] and log["Last"] == 5
    assert MAX_CHANGES >= 100_000


async def test_index_of_version_3_is_upgraded_with_its_changes_log(tmp_path):
    folder = tmp_path / "index"
    folder.mkdir()
    conn = sqlite3.connect(folder / INDEX_FILE)
    schema.create(conn, 3)
    conn.close()
    store = Store(tmp_path / "storage", folder, upgrade=True)
    try:
        outcome = store.ingest_bytes(_instance(1))
        entries, done, last = store.index.changes(0, 10)
        assert [e.public_id for e in entries][0] == outcome.parsed.ids.instance and done and last == 4
    finally:
        store.close()


async def test_clock_uids_modalities(daemon):
    _, _, client = daemon
    for route in ("/tools/now", "/tools/now-local"):
        answer = await client.get(route)
        assert answer.status_code == 200 and ISO.match(answer.text), answer.text
        assert answer.headers["content-type"].startswith("text/plain")
    patient = (await client.get("/tools/generate-uid?level=patient")).text
    assert re.match(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$", patient)
    uids = set()
    for level in ("study", "series", "instance"):
        for _ in range(3):
            uid = (await client.get(f"/tools/generate-uid?level={level}")).text
            assert UID.match(uid) and len(uid) <= 64, uid
            uids.add(uid)
    assert len(uids) == 9
    for bad in ("", "?level=Study", "?level=image"):
        answer = await client.get(f"/tools/generate-uid{bad}")
        assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 17
    assert (await client.get("/modalities")).json() == []
    assert (await client.get("/modalities?expand")).json() == {}
    assert (await client.post("/tools/now")).status_code == 405


async def test_log_level(daemon):
    _, _, client = daemon
    ours = logging.getLogger("accelerator")
    saved = {name: logging.getLogger(name).level for name in ("accelerator", "protocol", "httpx", "httpcore")}
    try:
        assert (await client.get("/tools/log-level")).text in ("default", "verbose")
        for level, effective in (("verbose", logging.DEBUG), ("trace", logging.DEBUG), ("default", logging.INFO)):
            answer = await client.put("/tools/log-level", content=level)
            assert answer.status_code == 200 and answer.text == ""
            assert (await client.get("/tools/log-level")).text == level
            assert ours.getEffectiveLevel() == effective
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        for bad in ("Verbose", "debug", "", "verbose\n"):
            answer = await client.put("/tools/log-level", content=bad)
            assert answer.status_code == 400 and answer.json()["OrthancStatus"] == 3, bad
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


async def test_metrics_parse_with_prometheus_own_parser(daemon):
    _, _, client = daemon
    await _upload(client, _instance(1))
    await _upload(client, _instance(2))
    answer = await client.get("/tools/metrics-prometheus")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    orthanc = [line.split(" ") for line in answer.text.splitlines() if line.startswith("orthanc_")]
    assert orthanc == sorted(orthanc) and all(len(fields) == 3 for fields in orthanc)  # Orthanc's layout
    assert ["orthanc_count_instances", "2"] in [fields[:2] for fields in orthanc]
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    value = {name: f.samples[0].value for name, f in families.items() if len(f.samples) == 1}
    assert value["orthanc_count_instances"] == 2 and value["orthanc_count_patients"] == 1
    assert value["orthanc_last_change"] == 5
    assert value["orthanc_disk_size_mb"] > 0 and value["orthanc_up_time_s"] >= 0
    for name in ("orthanc_transfers_created_push_count", "orthanc_transfers_committed_push_count",
                 "orthanc_transfers_aborted_push_count", "orthanc_transfers_available_push_count",
                 "orthanc_transfers_push_total_received_bytes_count",
                 "orthanc_transfers_push_total_time_spent_in_reception_ms",
                 "orthanc_transfers_push_total_time_spent_in_commit_ms",
                 "orthanc_jobs_pending", "orthanc_jobs_running", "orthanc_jobs_success", "orthanc_jobs_failed"):
        assert name in families, name
    assert value["orthanc_transfers_available_push_count"] == 4  # MaxPushTransactions, none active
    jobs = {(s.labels["type"], s.labels["state"]): s.value for s in families["accelerator_jobs"].samples}
    assert jobs[("PushTransfer", "Running")] == 0 and ("OrthancPeerStore", "Success") in jobs
    assert "accelerator_transfer_bytes" in families and families["accelerator_transfer_bytes"].type == "counter"
    assert "accelerator_peer_http_retries" in families
