"""Scripts written with `pyorthanc` (PyPI), run against a real daemon as its users run them against
Orthanc: upload a folder, find a study by PatientID, read its tags, download its archive and check
the files inside by MD5, list peers, send to a peer, read metrics."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile

import httpx
import pytest

pyorthanc = pytest.importorskip("pyorthanc")

from tests.clients.conftest import OTHER_PATIENT, PATIENT, STUDY_UID  # noqa: E402

pytestmark = pytest.mark.slow


def _client(url: str):
    return pyorthanc.Orthanc(url, timeout=60)


def test_upload_a_folder(site):
    client = _client(site.url)
    instances = pyorthanc.upload(client, str(site.folder), recursive=True)  # *.dcm only, as pyorthanc does
    assert {i.id_ for i in instances} == set(site.md5s) | set(site.other_md5s)
    assert client.get_statistics()["CountInstances"] == len(site.md5s) + len(site.other_md5s)


def test_find_a_study_by_patient_id(uploaded):
    client = _client(uploaded.url)
    studies = pyorthanc.find_studies(client, query={"PatientID": PATIENT})
    assert [s.id_ for s in studies] == [uploaded.study_id]
    study = studies[0]
    assert (study.patient_information["PatientID"], study.uid, study.description) == (
        PATIENT, STUDY_UID, "Client study")
    assert study.patient_identifier == pyorthanc.find_patients(client, query={"PatientID": PATIENT})[0].id_
    assert [s.id_ for s in pyorthanc.find_studies(client, query={"PatientID": "CLIENT-PAT-*"})] != []
    assert pyorthanc.find_studies(client, query={"PatientID": "NOBODY"}) == []
    patients = pyorthanc.find_patients(client, query={"PatientID": OTHER_PATIENT})
    assert [p.patient_id for p in patients] == [OTHER_PATIENT]


def test_read_the_tags_of_an_instance(uploaded):
    client = _client(uploaded.url)
    study = pyorthanc.Study(uploaded.study_id, client)
    instance = study.series[0].instances[0]
    simplified = instance.simplified_tags
    assert simplified["PatientID"] == PATIENT and simplified["StudyInstanceUID"] == STUDY_UID
    full = instance.tags
    assert full["0010,0020"]["Value"] == PATIENT and full["0010,0020"]["Name"] == "PatientID"


def test_download_the_archive_and_check_every_file(uploaded, tmp_path):
    client = _client(uploaded.url)
    study = pyorthanc.Study(uploaded.study_id, client)
    buffer = io.BytesIO()
    study.download(buffer)  # streamed, as pyorthanc recommends for large studies
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        found = sorted(hashlib.md5(archive.read(name)).hexdigest() for name in archive.namelist()
                       if not name.endswith("/"))
    assert found == sorted(uploaded.md5s.values())
    assert study.get_zip() == buffer.getvalue() or zipfile.is_zipfile(io.BytesIO(study.get_zip()))


def test_list_peers(site):
    client = _client(site.url)
    assert sorted(client.get_peers()) == ["b", "b-bidir", "self", "self-bidir"]
    expanded = client.get_peers(params={"expand": ""})
    assert expanded["b"]["Url"].rstrip("/") == site.url_b


def test_send_a_study_to_a_peer(uploaded):
    """With the transfers plugin (POST /transfers/send), as pyorthanc users call a plugin route."""
    client = _client(uploaded.url)
    answer = client.post(f"{uploaded.url}/transfers/send", json={
        "Peer": "b", "Compression": "gzip", "Resources": [{"Level": "Study", "ID": uploaded.study_id}]})
    answer.raise_for_status()
    job = pyorthanc.Job(answer.json()["ID"], client)
    deadline = time.monotonic() + 60
    while job.state.value not in ("Success", "Failure") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.state.value == "Success"
    remote = _client(uploaded.url_b)
    for instance_id, md5 in uploaded.md5s.items():
        assert hashlib.md5(remote.get_instances_id_file(instance_id)).hexdigest() == md5


def test_store_a_study_on_a_peer(uploaded):
    """Orthanc's own route, POST /peers/{peer}/store (synchronous)."""
    client = _client(uploaded.url)
    answer = client.post_peers_id_store("b", json={"Resources": [uploaded.study_id], "Synchronous": True})
    assert answer["InstancesCount"] == len(uploaded.md5s) and answer["FailedInstancesCount"] == 0
    remote = httpx.get(f"{uploaded.url_b}/studies/{uploaded.study_id}/instances").json()
    assert {i["ID"] for i in remote} == set(uploaded.md5s)


def test_read_metrics(uploaded):
    client = _client(uploaded.url)
    text = client.get_tools_metrics_prometheus()
    text = text.decode() if isinstance(text, bytes) else text
    names = {line.split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert any(name.startswith("orthanc_") for name in names), text[:500]
