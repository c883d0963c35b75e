"""Scripts written with `orthanc-api-client` (PyPI), run against a real daemon as its users run them
against Orthanc: upload a folder, find a study by PatientID, read its tags, download its archive and
check the files inside by MD5, list peers, send to a peer (transfers plugin and /peers/store), read
metrics."""

from __future__ import annotations

import hashlib
import time
import zipfile

import pytest

orthanc_api_client = pytest.importorskip("orthanc_api_client")

from orthanc_api_client import OrthancApiClient, ResourceType  # noqa: E402

from tests.clients.conftest import OTHER_PATIENT, PATIENT, STUDY_UID  # noqa: E402

pytestmark = pytest.mark.slow


def test_upload_a_folder(site):
    o = OrthancApiClient(site.url)
    assert o.is_alive()
    ids = o.upload_folder(str(site.folder), ignore_errors=True)  # README.txt: 400, ignored
    assert set(ids) == set(site.md5s) | set(site.other_md5s)
    assert o.get_statistics().instances_count == len(site.md5s) + len(site.other_md5s)


def test_find_a_study_by_patient_id(uploaded):
    o = OrthancApiClient(uploaded.url)
    studies = o.studies.find(query={"PatientID": PATIENT})
    assert [s.orthanc_id for s in studies] == [uploaded.study_id]
    assert studies[0].dicom_id == STUDY_UID
    assert studies[0].patient_main_dicom_tags.get("PatientID") == PATIENT
    assert o.studies.lookup(STUDY_UID) == uploaded.study_id  # POST /tools/lookup
    assert o.patients.lookup(OTHER_PATIENT) is not None
    assert o.studies.lookup("1.2.3.404") is None


def test_read_the_tags_of_an_instance(uploaded):
    o = OrthancApiClient(uploaded.url)
    instance_id = o.studies.get_first_instance_id(uploaded.study_id)
    tags = o.instances.get_tags(instance_id)
    assert tags.get("PatientID") == PATIENT
    assert tags.get("StudyInstanceUID") == STUDY_UID
    assert tags.get("0010,0010") == "Client^One"


def test_download_the_archive_and_check_every_file(uploaded, tmp_path):
    o = OrthancApiClient(uploaded.url)
    path = tmp_path / "study.zip"
    o.studies.download_archive(uploaded.study_id, str(path))
    with zipfile.ZipFile(path) as archive:
        found = sorted(hashlib.md5(archive.read(name)).hexdigest() for name in archive.namelist()
                       if not name.endswith("/"))
    assert found == sorted(uploaded.md5s.values())


def test_list_peers(site):
    o = OrthancApiClient(site.url)
    assert sorted(o.get_json("peers")) == ["b", "b-bidir", "self", "self-bidir"]


def test_send_a_study_with_the_transfers_plugin(uploaded):
    o = OrthancApiClient(uploaded.url)
    o.transfers.send(target_peer="b", resources_ids=[uploaded.study_id], resource_type=ResourceType.STUDY)
    b = OrthancApiClient(uploaded.url_b)
    for instance_id, md5 in uploaded.md5s.items():
        assert hashlib.md5(b.instances.get_file(instance_id)).hexdigest() == md5


def test_send_a_study_to_a_peer_that_pulls_from_us(uploaded):
    """RemoteSelf: the client gets a RemoteJob it can follow at the URL given."""
    o = OrthancApiClient(uploaded.url)
    remote = o.transfers.send_async(target_peer="b-bidir", resources_ids=[uploaded.study_id],
                                    resource_type=ResourceType.STUDY)
    assert remote.remote_url.startswith(uploaded.url_b) and remote.remote_job_id
    b = OrthancApiClient(uploaded.url_b)
    deadline = time.monotonic() + 60
    while (job := b.get_json(f"jobs/{remote.remote_job_id}"))["State"] not in ("Success", "Failure"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["State"] == "Success"
    assert set(b.studies.get_instances_ids(uploaded.study_id)) == set(uploaded.md5s)


def test_store_a_study_on_a_peer(uploaded):
    """Orthanc's own route, POST /peers/{peer}/store, as `o.peers.send` calls it."""
    o = OrthancApiClient(uploaded.url)
    o.peers.send(target_peer="b", resources_ids=[uploaded.study_id])
    b = OrthancApiClient(uploaded.url_b)
    assert set(b.studies.get_instances_ids(uploaded.study_id)) == set(uploaded.md5s)


def test_read_metrics(uploaded):
    o = OrthancApiClient(uploaded.url)
    metrics = o.get_metrics()
    assert any(name.startswith("orthanc_") for name in metrics.metrics), metrics.metrics
