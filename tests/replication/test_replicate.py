"""`POST /replicate` between real plain Orthancs (Debian's Orthanc 1.10.1), through daemons on
loopback: directly, and through two gateways over the transfers protocol."""

from __future__ import annotations

import hashlib
import time
from contextlib import ExitStack

import httpx
import pytest

from bench.harness import Daemon, free_port
from tests.dicom_data import make_instance

FINISHED = ("Success", "Failure")


def dataset() -> list[bytes]:
    """Patient P1: study 1.1 (4 CT + 3 MR in two series), study 1.2 (2 MR); patient P2: 1 MR."""
    files = [make_instance(patient_id="P1", study_uid="1.1", series_uid="1.1.1", sop_uid=f"1.1.1.{i}",
                           source="CT_small.dcm", InstanceNumber=i, StudyDate="20240105") for i in range(4)]
    files += [make_instance(patient_id="P1", study_uid="1.1", series_uid="1.1.2", sop_uid=f"1.1.2.{i}",
                            StudyDate="20240105") for i in range(3)]
    files += [make_instance(patient_id="P1", study_uid="1.2", series_uid="1.2.1", sop_uid=f"1.2.1.{i}",
                            StudyDate="20230301") for i in range(2)]
    files += [make_instance(patient_id="P2", study_uid="2.1", series_uid="2.1.1", sop_uid="2.1.1.0",
                            StudyDate="20250101")]
    return files


def upload(orthanc, files: list[bytes]) -> None:
    with orthanc.client() as http:
        for data in files:
            assert http.post("/instances", content=data).status_code == 200


def md5s(orthanc) -> dict[str, str]:
    """Instance ID -> MD5 of the bytes the Orthanc serves."""
    with orthanc.client() as http:
        return {i: hashlib.md5(http.get(f"/instances/{i}/file").content).hexdigest()
                for i in http.get("/instances").json()}


def replicate(daemon: Daemon, body: dict, timeout: float = 90) -> dict:
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        created = http.post("/replicate", json=body)
        assert created.status_code == 200, created.text
        deadline = time.monotonic() + timeout
        while (job := http.get(f"/jobs/{created.json()['ID']}").json())["State"] not in FINISHED:
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        if job["State"] == "Failure":
            print("job failed:", job["ErrorDetails"], job["Content"])
        return job


@pytest.fixture
def sites(orthanc_factory, tmp_path):
    """Two plain Orthancs (A with the data, B empty), each behind a gateway daemon; GA knows GB
    as peer `gb`. GB forwards what it receives into B and keeps no copy."""
    a, b = orthanc_factory(name="a"), orthanc_factory(name="b")
    upload(a, dataset())
    port_ga, port_gb = free_port(), free_port()
    with ExitStack() as stack:
        gb = stack.enter_context(Daemon({"HttpPort": port_gb, "Gateway": {"Url": b.url, "KeepCopies": False},
                                         "OrthancPeers": {"ga": {"Url": f"http://127.0.0.1:{port_ga}"}}},
                                        tmp_path / "gb"))
        ga = stack.enter_context(Daemon({"HttpPort": port_ga, "Gateway": {"Url": a.url},
                                         "OrthancPeers": {"gb": {"Url": gb.url}}}, tmp_path / "ga"))
        yield a, b, ga, gb


def test_two_plain_orthancs_through_two_gateways_end_identical(sites):
    a, b, ga, gb = sites
    job = replicate(ga, {"Source": a.url, "Target": "gb"})
    assert job["State"] == "Success", job
    content = job["Content"]
    assert (content["Instances"], content["Copied"], content["Skipped"], content["Failed"]) == (10, 10, 0, 0)
    assert content["Verified"] == 10
    assert content["Levels"] == {"Patients": 2, "Studies": 3, "Series": 4, "Instances": 10}
    assert md5s(b) == md5s(a)
    assert content["Transfer"]["TotalInstances"] >= 1  # the bulk went by push, in buckets

    again = replicate(ga, {"Source": a.url, "Target": "gb"})  # nothing is sent twice
    assert (again["Content"]["Copied"], again["Content"]["Skipped"]) == (0, 10), again
    assert "Transfer" not in again["Content"]
    with httpx.Client(base_url=gb.url) as http:  # forwarded, then removed from the gateway
        deadline = time.monotonic() + 20
        while http.get("/instances").json():
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_selection_copies_only_its_studies_directly_between_two_orthancs(orthanc_factory, tmp_path):
    a, b = orthanc_factory(name="a"), orthanc_factory(name="b", username="alice", password="secret")
    upload(a, dataset())
    with Daemon({"HttpPort": free_port()}, tmp_path / "d") as daemon:
        job = replicate(daemon, {"Source": a.url, "Target": {"Type": "Orthanc", "Url": b.url, "Username": "alice",
                                                             "Password": "secret"},
                                 "Selection": {"PatientID": "P1", "StudyDate": "20240101-"}})
        assert job["State"] == "Success", job
        assert job["Content"]["Copied"] == 7
        assert job["Content"]["TargetLevels"] == {"Patients": 1, "Studies": 1, "Series": 2, "Instances": 7}
        copied = md5s(b)
        assert len(copied) == 7 and all(md5s(a)[i] == m for i, m in copied.items())
        assert "secret" not in httpx.get(f"{daemon.url}/jobs/{job['ID']}").text


def test_wrong_credentials_and_unreachable_sides_fail_the_job_with_the_reason(orthanc_factory, tmp_path):
    a = orthanc_factory(name="a", username="alice", password="secret")
    with Daemon({"HttpPort": free_port()}, tmp_path / "d") as daemon:
        job = replicate(daemon, {"Source": {"Type": "Orthanc", "Url": a.url, "Username": "alice",
                                            "Password": "wrong"}, "Target": "self"})
        assert job["State"] == "Failure" and "401" in job["ErrorDetails"], job
        job = replicate(daemon, {"Source": f"http://127.0.0.1:{free_port()}", "Target": "self"})
        assert job["State"] == "Failure" and "cannot list" in job["ErrorDetails"], job
        with httpx.Client(base_url=daemon.url) as http:
            refused = http.post("/replicate", json={"Source": "no-such-peer", "Target": "self"})
            assert refused.status_code == 400 and "no-such-peer" in refused.json()["Details"]


def test_an_instance_the_target_refuses_is_reported_and_the_others_are_copied(orthanc_factory, tmp_path):
    script = tmp_path / "filter.lua"
    script.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                      "  return dicom.Modality ~= 'CT'\nend\n")
    a = orthanc_factory(name="a")
    b = orthanc_factory(name="b", extra={"LuaScripts": [str(script)]})
    upload(a, dataset())
    with Daemon({"HttpPort": free_port()}, tmp_path / "d") as daemon:
        job = replicate(daemon, {"Source": a.url, "Target": b.url})
        assert job["State"] == "Failure", job
        content = job["Content"]
        assert (content["Copied"], content["Failed"]) == (6, 4), content
        assert all(item["Reason"] for item in content["FailedInstances"])
        assert "4 of 10 instances were not copied" in job["ErrorDetails"]
        assert len(md5s(b)) == 6


def test_an_orthanc_storage_folder_is_a_source_while_that_orthanc_is_stopped(orthanc_factory, tmp_path):
    a = orthanc_factory(name="a", storage_compression=True)
    upload(a, dataset())
    expected = md5s(a)
    a.stop()
    with Daemon({"HttpPort": free_port()}, tmp_path / "d") as daemon:
        job = replicate(daemon, {"Source": {"Type": "Folder", "Path": str(a.storage_dir),
                                            "IndexDirectory": str(a.index_dir)}, "Target": "self"})
        assert job["State"] == "Success", job
        with httpx.Client(base_url=daemon.url) as http:
            got = {i: hashlib.md5(http.get(f"/instances/{i}/file").content).hexdigest()
                   for i in http.get("/instances").json()}
    assert got == expected


def run_transfer(daemon: Daemon, route: str, body: dict) -> dict:
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        created = http.post(f"/transfers/{route}", json=body)
        assert created.status_code == 200, created.text
        deadline = time.monotonic() + 60
        while (job := http.get(f"/jobs/{created.json()['ID']}").json())["State"] not in FINISHED:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return job


def wait_in_b(b, study: str) -> None:
    with b.client() as http:
        deadline = time.monotonic() + 30
        while study not in http.get("/studies").json():
            assert time.monotonic() < deadline, "GB did not forward the study into B"
            time.sleep(0.1)


def test_peers_take_studies_from_a_gateway_out_of_its_orthanc(sites):
    """A pull by a remote peer from GA, and a send by GA, carry what A holds, though GA's own
    store holds nothing at first; GB forwards what it receives into B."""
    a, b, ga, gb = sites
    with a.client() as http:
        studies = {s["MainDicomTags"]["StudyInstanceUID"]: s["ID"] for s in http.get("/studies?expand").json()}
    assert httpx.get(f"{ga.url}/instances").json() == []

    pulled = run_transfer(gb, "pull", {"Resources": [{"Level": "Study", "ID": studies["1.1"]}], "Peer": "ga",
                                       "Compression": "gzip"})
    assert pulled["State"] == "Success", pulled
    sent = run_transfer(ga, "send", {"Resources": [{"Level": "Study", "ID": studies["2.1"]}], "Peer": "gb",
                                     "Compression": "gzip"})
    assert sent["State"] == "Success", sent
    for study in (studies["1.1"], studies["2.1"]):
        wait_in_b(b, study)
    expected = md5s(a)
    assert {i: m for i, m in md5s(b).items()} == {i: expected[i] for i in md5s(b)}
    assert len(md5s(b)) == 8
    missing = httpx.post(f"{ga.url}/transfers/lookup", json=[{"Level": "Study", "ID": "0" * 8 + "-" + "0" * 8}])
    assert missing.status_code in (400, 404)


def test_follow_keeps_the_target_in_sync_until_cancelled(orthanc_factory, tmp_path):
    a, b = orthanc_factory(name="a"), orthanc_factory(name="b")
    files = dataset()
    upload(a, files[:3])
    with Daemon({"HttpPort": free_port()}, tmp_path / "d") as daemon, \
            httpx.Client(base_url=daemon.url, timeout=30) as http:
        job_id = http.post("/replicate", json={"Source": a.url, "Target": b.url, "Follow": True}).json()["ID"]

        def wait_for(count: int) -> None:
            deadline = time.monotonic() + 30
            while len(md5s(b)) < count:
                job = http.get(f"/jobs/{job_id}").json()
                assert job["State"] == "Running" and time.monotonic() < deadline, job
                time.sleep(0.2)

        wait_for(3)
        upload(a, files[3:])
        wait_for(len(files))
        assert md5s(b) == md5s(a)
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
        deadline = time.monotonic() + 10
        while http.get(f"/jobs/{job_id}").json()["State"] == "Running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert http.get(f"/jobs/{job_id}").json()["State"] == "Failure"  # Orthanc's state of a cancelled job


def test_the_cli_replicates_and_prints_the_report(orthanc_factory, tmp_path):
    import subprocess
    import sys

    a, b = orthanc_factory(name="a"), orthanc_factory(name="b")
    upload(a, dataset())
    with Daemon({"HttpPort": free_port()}, tmp_path / "d") as daemon:
        done = subprocess.run([sys.executable, "-m", "accelerator", "replicate", a.url, b.url, "--patient", "P2",
                               "--url", daemon.url, "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 instances" in done.stdout and "1 copied" in done.stdout and "0 failed" in done.stdout, done.stdout
    assert len(md5s(b)) == 1


def test_a_gateway_forwards_once_its_orthanc_is_back(sites):
    """B is down when GB receives a study: the push still succeeds, and GB forwards the study
    when B is back (its position in the changes log survives; nothing is skipped)."""
    a, b, ga, gb = sites
    b.stop()
    with a.client() as http:
        study = next(s["ID"] for s in http.get("/studies?expand").json()
                     if s["MainDicomTags"]["StudyInstanceUID"] == "1.2")
    sent = run_transfer(ga, "send", {"Resources": [{"Level": "Study", "ID": study}], "Peer": "gb",
                                     "Compression": "gzip"})
    assert sent["State"] == "Success", sent
    assert len(httpx.get(f"{gb.url}/instances").json()) == 2  # kept until B has them
    b.restart()
    wait_in_b(b, study)
    deadline = time.monotonic() + 20
    while httpx.get(f"{gb.url}/instances").json():  # KeepCopies false: gone once forwarded
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert md5s(b) == {i: m for i, m in md5s(a).items() if i in md5s(b)} and len(md5s(b)) == 2


def test_an_instance_the_gateways_orthanc_refuses_does_not_hold_up_the_others(orthanc_factory, tmp_path):
    script = tmp_path / "filter.lua"
    script.write_text("function ReceivedInstanceFilter(dicom, origin, info)\n"
                      "  return dicom.Modality ~= 'CT'\nend\n")
    b = orthanc_factory(name="b", extra={"LuaScripts": [str(script)]})
    with Daemon({"HttpPort": free_port(), "Gateway": {"Url": b.url, "KeepCopies": False}}, tmp_path / "gb") as gb, \
            httpx.Client(base_url=gb.url, timeout=30) as http:
        files = dataset()
        for data in files[:7]:  # study 1.1: 4 CT, then 3 MR
            assert http.post("/instances", content=data).status_code == 200
        for data in files[7:]:  # then two more studies, all MR
            assert http.post("/instances", content=data).status_code == 200
        deadline = time.monotonic() + 20
        while len(md5s(b)) < 6:
            assert time.monotonic() < deadline, md5s(b)
            time.sleep(0.1)
        while len(http.get("/instances").json()) != 4:  # the refused CT stay here, the rest moved on
            assert time.monotonic() < deadline
            time.sleep(0.1)
        kept = http.get("/instances?expand").json()
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in kept} == {f"1.1.1.{n}" for n in range(4)}
