"""accelerator.api.core: the Orthanc core REST subset, in-process over httpx.ASGITransport."""

from __future__ import annotations

import hashlib

import pydicom
import pytest
from pydicom.data import get_testdata_file

from accelerator.api.app import create_app, open_store
from protocol.resources import resource_ids
from tests.conftest import asgi_client
from tests.dicom_data import DUMMY_CT_IDS, bundled_files, dummy_ct, make_instance

pytestmark = pytest.mark.anyio


async def _upload(client, data: bytes) -> dict:
    answer = await client.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def _expected_ids(path):
    """The IDs computed independently with pydicom's own decoding, or None if not storable."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        uids = [ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    except Exception:
        return None
    if not all(uids):
        return None
    return resource_ids(str(ds.get("PatientID", "") or ""), *map(str, uids))


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compressed"])
async def test_every_bundled_file_round_trips_byte_for_byte(make_config, compression):
    config = make_config({"StorageCompression": compression})
    store = open_store(config)
    first_bytes: dict[str, bytes] = {}
    rejected = 0
    async with asgi_client(create_app(config, store)) as client:
        for path in bundled_files():
            data = path.read_bytes()
            answer = await client.post("/instances", content=data)
            expected = _expected_ids(path)
            if expected is None:  # not DICOM (400, 15), or without one of the UIDs (404, 21), as Orthanc
                status = (answer.status_code, answer.json()["OrthancStatus"])
                assert status in ((400, 15), (404, 21)), f"{path.name}: {status}"
                rejected += 1
                continue
            assert answer.status_code == 200, f"{path.name}: {answer.text}"
            body = answer.json()
            assert body["ID"] == expected.instance, path.name
            assert (body["ParentPatient"], body["ParentStudy"], body["ParentSeries"]) == (
                expected.patient, expected.study, expected.series)
            assert body["Status"] == ("AlreadyStored" if expected.instance in first_bytes else "Success")
            first_bytes.setdefault(expected.instance, data)
        for instance, data in first_bytes.items():
            downloaded = await client.get(f"/instances/{instance}/file")
            assert downloaded.status_code == 200
            assert downloaded.headers["content-type"] == "application/dicom"
            assert downloaded.content == data
            md5 = await client.get(f"/instances/{instance}/attachments/dicom/md5")
            assert md5.text == hashlib.md5(data).hexdigest()
        stats = (await client.get("/statistics")).json()
    store.close()
    assert len(first_bytes) > 150 and rejected > 10
    assert stats["CountInstances"] == len(first_bytes)
    assert int(stats["TotalUncompressedSize"]) == sum(map(len, first_bytes.values()))
    if compression:
        assert int(stats["TotalDiskSize"]) < int(stats["TotalUncompressedSize"])
    else:
        assert stats["TotalDiskSize"] == stats["TotalUncompressedSize"]


async def test_upload_answer_and_resource_shapes(client):
    body = await _upload(client, dummy_ct())
    assert body == {
        "ID": DUMMY_CT_IDS["instance"], "ParentPatient": DUMMY_CT_IDS["patient"],
        "ParentStudy": DUMMY_CT_IDS["study"], "ParentSeries": DUMMY_CT_IDS["series"],
        "Path": f"/instances/{DUMMY_CT_IDS['instance']}", "Status": "Success",
    }
    patient = (await client.get(f"/patients/{DUMMY_CT_IDS['patient']}")).json()
    assert patient["Type"] == "Patient" and patient["Studies"] == [DUMMY_CT_IDS["study"]]
    assert patient["MainDicomTags"]["PatientID"] == "ozp00SjY2xG"
    study = (await client.get(f"/studies/{DUMMY_CT_IDS['study']}")).json()
    assert study["ParentPatient"] == DUMMY_CT_IDS["patient"] and study["Series"] == [DUMMY_CT_IDS["series"]]
    assert study["PatientMainDicomTags"]["PatientName"] == "CompressedSamples^CT1"
    assert isinstance(study["IsStable"], bool) and len(study["LastUpdate"]) == 15
    series = (await client.get(f"/series/{DUMMY_CT_IDS['series']}")).json()
    assert series["Instances"] == [DUMMY_CT_IDS["instance"]] and series["MainDicomTags"]["Modality"] == "CT"
    assert series["Status"] == "Unknown" and series["ExpectedNumberOfInstances"] is None
    instance = (await client.get(f"/instances/{DUMMY_CT_IDS['instance']}")).json()
    assert instance["ParentSeries"] == DUMMY_CT_IDS["series"] and instance["IndexInSeries"] == 1
    assert instance["FileSize"] == len(dummy_ct()) and len(instance["FileUuid"]) == 36


async def test_lists_expand_and_parents_and_children(client):
    for i in range(1, 4):
        await _upload(client, make_instance(sop_uid=f"1.2.3.{i}", InstanceNumber=i))
    ids = (await client.get("/instances")).json()
    assert len(ids) == 3
    assert (await client.get("/instances?limit=2")).json() == ids[:2]
    assert (await client.get("/instances?since=2")).json() == ids[2:]
    studies = (await client.get("/studies?expand")).json()
    assert len(studies) == 1 and studies[0]["Type"] == "Study"
    study_id = studies[0]["ID"]
    parent = (await client.get(f"/instances/{ids[0]}/study")).json()
    assert parent["ID"] == study_id
    assert (await client.get(f"/instances/{ids[0]}/patient")).json()["ID"] == studies[0]["ParentPatient"]
    children = (await client.get(f"/studies/{study_id}/instances")).json()
    assert sorted(c["ID"] for c in children) == sorted(ids)
    assert len((await client.get(f"/studies/{study_id}/series")).json()) == 1
    assert (await client.get(f"/series/{children[0]['ParentSeries']}/study")).json()["ID"] == study_id
    assert (await client.get(f"/studies/{study_id}/study")).status_code == 404


async def test_requested_tags(client):
    for series in ("1.2.3.1", "1.2.3.2"):
        for i in range(1, 3):
            await _upload(client, make_instance(series_uid=series, sop_uid=f"{series}.{i}"))
    answer = await client.get(
        "/studies?expand&requested-tags=NumberOfStudyRelatedInstances;NumberOfStudyRelatedSeries;"
        "PatientName;ModalitiesInStudy;0018,0050")
    (study,) = answer.json()
    tags = study["RequestedTags"]
    assert tags["NumberOfStudyRelatedInstances"] == "4" and tags["NumberOfStudyRelatedSeries"] == "2"
    assert tags["ModalitiesInStudy"] == "MR"
    assert tags["PatientName"] == "CompressedSamples^MR1"
    # not a main tag: read from a stored file, with its original text
    assert tags["SliceThickness"] == pydicom.dcmread(get_testdata_file("MR_small.dcm")).SliceThickness.original_string


async def test_paths_with_repeated_and_trailing_slashes(client):
    await _upload(client, make_instance())
    plain = (await client.get("/patients")).json()
    for path in ("/patients/", "//patients", "//patients//", "/patients///"):
        answer = await client.get(f"http://127.0.0.1:8042{path}")  # absolute: '//x' is not a host
        assert answer.status_code == 200 and answer.json() == plain, path
    assert (await client.get(f"http://127.0.0.1:8042//patients/{plain[0]}/")).json()["ID"] == plain[0]


async def test_delete_cascades_over_http(client):
    a = await _upload(client, make_instance(series_uid="1.1", sop_uid="1.1.1"))
    b = await _upload(client, make_instance(series_uid="1.2", sop_uid="1.2.1"))
    answer = (await client.delete(f"/series/{a['ParentSeries']}")).json()
    assert answer == {"RemainingAncestor": {"ID": a["ParentStudy"], "Path": f"/studies/{a['ParentStudy']}",
                                            "Type": "Study"}}
    assert (await client.get(f"/instances/{a['ID']}")).status_code == 404
    assert (await client.get(f"/instances/{b['ID']}/file")).status_code == 200
    assert (await client.delete(f"/patients/{b['ParentPatient']}")).json() == {"RemainingAncestor": None}
    assert (await client.get("/patients")).json() == []
    stats = (await client.get("/statistics")).json()
    assert stats["CountInstances"] == 0 and stats["TotalDiskSize"] == "0"


async def test_labels(client):
    body = await _upload(client, make_instance())
    study = body["ParentStudy"]
    assert (await client.put(f"/studies/{study}/labels/urgent")).status_code == 200
    assert (await client.put(f"/studies/{study}/labels/urgent")).status_code == 200  # idempotent
    assert (await client.put(f"/studies/{study}/labels/second-opinion")).status_code == 200
    assert (await client.get(f"/studies/{study}/labels")).json() == ["second-opinion", "urgent"]
    assert (await client.get(f"/studies/{study}")).json()["Labels"] == ["second-opinion", "urgent"]
    assert (await client.get(f"/studies/{study}/labels/urgent")).status_code == 200
    assert (await client.delete(f"/studies/{study}/labels/urgent")).status_code == 200
    assert (await client.get(f"/studies/{study}/labels/urgent")).status_code == 404
    assert (await client.get("/tools/labels")).json() == ["second-opinion"]
    bad = await client.put(f"/studies/{study}/labels/no%20spaces")
    assert bad.status_code == 400 and "Invalid label" in bad.json()["Details"]
    unknown = await client.put("/studies/00000000-00000000-00000000-00000000-00000000/labels/x")
    assert unknown.status_code == 404


async def test_metadata(client):
    body = await _upload(client, make_instance())
    names = (await client.get(f"/instances/{body['ID']}/metadata")).json()
    assert {"ReceptionDate", "Origin", "TransferSyntax", "SopClassUid", "RemoteIP"} <= set(names)
    assert (await client.get(f"/instances/{body['ID']}/metadata/Origin")).text == "RestApi"
    assert (await client.get(f"/instances/{body['ID']}/metadata/TransferSyntax")).text == "1.2.840.10008.1.2.1"
    assert (await client.get(f"/instances/{body['ID']}/metadata/Nope")).status_code == 404


async def test_system(client):
    system = (await client.get("/system")).json()
    assert system["Name"] == "accelerator" and system["HttpPort"] == 8042
    assert system["DatabaseVersion"] >= 2 and system["HasLabels"] is True


# -- bad input: a status and a message, and nothing stored is lost ------------------------------

async def test_bad_uploads_get_400_and_store_stays_intact(client):
    kept = await _upload(client, make_instance())
    truncated_meta = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00"
    for body, needle in ((b"this is not DICOM", "Cannot parse an invalid DICOM file (size: 17 bytes)"),
                         (truncated_meta, f"size: {len(truncated_meta)} bytes"),
                         (b"", "The body is empty")):
        answer = await client.post("/instances", content=body)
        assert answer.status_code == 400
        error = answer.json()
        assert needle in error["Details"]
        assert error["HttpStatus"] == 400 and error["Uri"] == "/instances" and error["Method"] == "POST"
    assert (await client.get("/instances")).json() == [kept["ID"]]
    assert (await client.get(f"/instances/{kept['ID']}/file")).status_code == 200


async def test_missing_uid_is_400_naming_the_tag(client):
    import io

    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    del ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    answer = await client.post("/instances", content=out.getvalue())
    assert answer.status_code == 404 and answer.json()["OrthancStatus"] == 21  # Orthanc's "Inexistent tag"
    assert answer.json()["Message"] == "Inexistent tag" and "SOPInstanceUID" in answer.json()["Details"]


async def test_body_over_the_limit_is_413(make_config):
    config = make_config({"MaximumRequestBodySize": 1})
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        kept = await _upload(client, make_instance())
        answer = await client.post("/instances", content=b"\0" * (1024 * 1024 + 1))
        assert answer.status_code == 413 and answer.json()["HttpStatus"] == 413

        async def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(3):
                yield b"\0" * 600_000

        answer = await client.post("/instances", content=chunked())
        assert answer.status_code == 413
        assert (await client.get("/instances")).json() == [kept["ID"]]
    store.close()


async def test_unknown_resources_are_404_with_orthanc_json(client):
    for path in ("/patients/00000000-00000000-00000000-00000000-00000000",
                 "/instances/nope/file", "/nope", "/studies/abc/series"):
        answer = await client.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["OrthancStatus"] == 17 and answer.json()["Message"] == "Unknown resource"
    assert (await client.delete("/studies/00000000-00000000-00000000-00000000-00000000")).status_code == 404


async def test_wrong_method_is_405_with_allow(client):
    for method, path, allow in (("DELETE", "/statistics", "GET"), ("PUT", "/instances", "GET, POST"),
                                ("POST", "/patients/x", "GET, DELETE")):
        answer = await client.request(method, path)
        assert answer.status_code == 405, path
        assert answer.headers["allow"] == allow and answer.content == b""


async def test_bad_list_arguments_are_400(client):
    """As Orthanc (boost::lexical_cast<size_t> failing): 400 Bad type for a parameter, never 500,
    for signs, non-ASCII digits that Python reads as digits, and values beyond a size_t."""
    for value in ("-1", "", "x", "1e3", "\u0661\u0662", "\u00b2", "18446744073709551616", "9" * 5000):
        for name in ("limit", "since"):
            answer = await client.get("/patients", params={name: value})
            assert answer.status_code == 400, (name, value)
            assert answer.json()["OrthancStatus"] == 5 and name in answer.json()["Details"]


async def test_huge_list_arguments_are_clamped(client):
    patient = (await _upload(client, dummy_ct()))["ParentPatient"]
    for limit, since, expected in (("18446744073709551615", "0", [patient]),
                                   ("9223372036854775808", "0", [patient]),
                                   ("1", "18446744073709551615", [])):
        answer = await client.get("/patients", params={"limit": limit, "since": since})
        assert answer.status_code == 200 and answer.json() == expected, (limit, since)


async def test_errors_without_description(make_config):
    config = make_config({"HttpDescribeErrors": False})
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        answer = await client.get("/patients/unknown")
        assert answer.status_code == 404 and answer.content == b""
    store.close()


async def test_large_uploads_are_streamed_through_a_file(client, store, monkeypatch):
    """Bodies above MEMORY_UPLOAD (or of unknown length) go to a file first; same results."""
    from accelerator.api import core

    monkeypatch.setattr(core, "MEMORY_UPLOAD", 1000)
    data = make_instance(sop_uid="7.7.7")

    async def chunked():
        for i in range(0, len(data), 4000):
            yield data[i:i + 4000]

    first = await client.post("/instances", content=data)
    again = await client.post("/instances", content=chunked())
    assert (first.json()["Status"], again.json()["Status"]) == ("Success", "AlreadyStored")
    assert (await client.get(f"/instances/{first.json()['ID']}/file")).content == data
    metadata = (await client.get(f"/instances/{first.json()['ID']}/metadata?expand")).json()
    assert metadata["RemoteIP"] == "127.0.0.1" and metadata["Origin"] == "RestApi"
    bad = await client.post("/instances", content=b"not DICOM" * 500)
    assert bad.status_code == 400
    assert not list(store.area.work.iterdir())  # no upload file left behind


async def test_head_is_answered_like_get(client):
    head, get = await client.head("/system"), await client.get("/system")
    assert head.status_code == get.status_code == 200
    assert head.headers["content-length"] == get.headers["content-length"]
