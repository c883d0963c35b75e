"""accelerator.api.tags: the DICOM tags of instances in Orthanc's shapes (/tags, /simplified-tags,
/header, /content, /shared-tags, /statistics, /attachments), on real DICOM files."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.encaps import generate_fragments

from accelerator.api.app import create_app, open_store
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

pytestmark = pytest.mark.anyio


async def _upload(client, data: bytes) -> dict:
    answer = await client.post("/instances", content=data)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _testdata(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as f:
        return f.read()


def _bare_404(answer) -> None:
    """Where Orthanc's handler answers nothing, its REST layer sends a 404 with no body."""
    assert answer.status_code == 404
    assert answer.content == b""


def _orthanc_error(answer, status: int, code: int) -> dict:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["HttpStatus"] == status and body["OrthancStatus"] == code
    return body


async def test_tags_full_format_of_a_real_ct(client):
    ct = (await _upload(client, _testdata("CT_small.dcm")))["ID"]
    tags = (await client.get(f"/instances/{ct}/tags")).json()
    assert tags["0010,0010"] == {"Name": "PatientName", "Type": "String", "Value": "CompressedSamples^CT1"}
    assert tags["0008,0005"] == {"Name": "SpecificCharacterSet", "Type": "String", "Value": "ISO_IR 100"}
    assert tags["0028,0010"] == {"Name": "Rows", "Type": "String", "Value": "128"}  # US as a number
    # The pixel data ends the dataset and is null; group lengths are left out.
    assert tags["7fe0,0010"] == {"Name": "PixelData", "Type": "Null", "Value": None}
    assert not [key for key in tags if key.endswith(",0000") or key > "7fe0,0010"]
    # Private elements: the creator, then data elements that name it; SL/UL printed as numbers.
    assert tags["0009,0010"] == {"Name": "PrivateCreator", "Type": "String", "Value": "GEMS_IDEN_01"}
    assert tags["0009,1027"]["PrivateCreator"] == "GEMS_IDEN_01"
    assert tags["0009,1027"]["Type"] == "String" and tags["0009,1027"]["Value"] == "862399669"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert tags["0020,0032"]["Value"] == "\\".join(f"{v:.6f}" for v in ds.ImagePositionPatient)  # as written
    assert all(set(node) - {"PrivateCreator"} == {"Name", "Type", "Value"} for node in tags.values())


async def test_simplify_short_and_simplified_tags(client):
    ct = (await _upload(client, _testdata("CT_small.dcm")))["ID"]
    full = (await client.get(f"/instances/{ct}/tags")).json()
    human = (await client.get(f"/instances/{ct}/tags?simplify")).json()
    assert human == (await client.get(f"/instances/{ct}/simplified-tags")).json()
    assert human["PatientName"] == "CompressedSamples^CT1" and human["PixelData"] is None
    short = (await client.get(f"/instances/{ct}/tags?short")).json()
    assert set(short) == set(full)
    assert short["0010,0010"] == "CompressedSamples^CT1" and short["7fe0,0010"] is None
    # Only the presence of the argument counts, as in Orthanc's GetDicomFormat.
    assert (await client.get(f"/instances/{ct}/tags?simplify=false")).json() == human


async def test_sequences_in_every_format(client):
    plan = (await _upload(client, _testdata("rtplan.dcm")))["ID"]
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    full = (await client.get(f"/instances/{plan}/tags")).json()
    beams = full["300a,00b0"]
    assert beams["Name"] == "BeamSequence" and beams["Type"] == "Sequence"
    assert len(beams["Value"]) == len(ds.BeamSequence)
    assert beams["Value"][0]["300a,00c2"] == {"Name": "BeamName", "Type": "String", "Value": ds.BeamSequence[0].BeamName}
    human = (await client.get(f"/instances/{plan}/simplified-tags")).json()
    assert human["BeamSequence"][0]["BeamName"] == ds.BeamSequence[0].BeamName
    nested = human["BeamSequence"][0]["ControlPointSequence"][0]
    assert nested["ControlPointIndex"] == str(ds.BeamSequence[0].ControlPointSequence[0].ControlPointIndex)
    short = (await client.get(f"/instances/{plan}/tags?short")).json()
    assert short["300a,00b0"][0]["300a,00c2"] == ds.BeamSequence[0].BeamName


async def test_too_long_values_and_ignore_length(client):
    comment = "x" * 300  # longer than ORTHANC_MAXIMUM_TAG_LENGTH (256)
    instance = (await _upload(client, make_instance(ImageComments=comment)))["ID"]
    tags = (await client.get(f"/instances/{instance}/tags")).json()
    assert tags["0020,4000"] == {"Name": "ImageComments", "Type": "TooLong", "Value": None}
    assert (await client.get(f"/instances/{instance}/simplified-tags")).json()["ImageComments"] is None
    kept = (await client.get(f"/instances/{instance}/tags?ignore-length=ImageComments")).json()
    assert kept["0020,4000"]["Value"] == comment
    answer = await client.get(f"/instances/{instance}/tags?ignore-length=NotATag")
    _orthanc_error(answer, 400, 27)


@pytest.mark.parametrize("name", ["chrRuss.dcm", "chrGreek.dcm", "chrX1.dcm", "chrH31.dcm", "chrFren.dcm"])
async def test_character_sets_decode_text_as_pydicom(client, name):
    path = get_charset_files(name)[0]
    with open(path, "rb") as f:
        data = f.read()
    instance = (await _upload(client, data))["ID"]
    ds = pydicom.dcmread(path)
    human = (await client.get(f"/instances/{instance}/simplified-tags")).json()
    raw = ds.get_item(0x00100010).value  # all the groups as written, even an empty last one
    expected = decode_bytes(raw, convert_encodings(ds.SpecificCharacterSet), {0x5C, 0x3D, 0x5E})
    assert human["PatientName"] == expected.rstrip(" ")
    assert human["PatientName"].split("=")[0] == str(ds.PatientName).split("=")[0]


async def test_unknown_vr_kept_as_orthanc_keeps_it(client, monkeypatch):
    monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)  # really write UN
    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    ds.add_new(0x00081010, "UN", b"STATION1")  # StationName (SH) written as UN: a string
    ds.add_new(0x00181310, "UN", b"\x01\x00\x02\x00\x03\x00\x04\x00")  # AcquisitionMatrix (US) as UN: binary
    ds.add_new(0x00290010, "LO", "NOBODY KNOWS")
    ds.add_new(0x00291001, "UN", b"abcd")  # private, unknown to the dictionary: binary
    out = io.BytesIO()
    ds.save_as(out)
    assert pydicom.dcmread(io.BytesIO(out.getvalue())).get_item(0x00081010).VR == "UN"
    monkeypatch.undo()
    instance = (await _upload(client, out.getvalue()))["ID"]
    tags = (await client.get(f"/instances/{instance}/tags")).json()
    assert tags["0008,1010"] == {"Name": "StationName", "Type": "String", "Value": "STATION1"}
    assert tags["0018,1310"] == {"Name": "AcquisitionMatrix", "Type": "Null", "Value": None}
    assert tags["0029,1001"] == {"Name": "Unknown Tag & Data", "PrivateCreator": "NOBODY KNOWS",
                                 "Type": "Null", "Value": None}


async def test_whole_includes_tags_after_pixel_data(client):
    ds = pydicom.dcmread(io.BytesIO(make_instance()))
    ds.add_new(0xFFFAFFFA, "SQ", [])  # DigitalSignaturesSequence, after PixelData
    out = io.BytesIO()
    ds.save_as(out)
    instance = (await _upload(client, out.getvalue()))["ID"]
    assert "fffa,fffa" not in (await client.get(f"/instances/{instance}/tags")).json()
    whole = (await client.get(f"/instances/{instance}/tags?whole=true")).json()
    assert whole["fffa,fffa"] == {"Name": "DigitalSignaturesSequence", "Type": "Sequence", "Value": []}


async def test_header_of_a_real_file(client):
    ct = (await _upload(client, _testdata("CT_small.dcm")))["ID"]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    header = (await client.get(f"/instances/{ct}/header")).json()
    assert header["0002,0010"] == {"Name": "TransferSyntaxUID", "Type": "String",
                                   "Value": str(ds.file_meta.TransferSyntaxUID)}
    assert header["0002,0000"]["Name"] == "FileMetaInformationGroupLength"  # kept in the header
    assert "0002,0001" not in header  # OB: binary elements are left out (DicomToJsonFlags_None)
    human = (await client.get(f"/instances/{ct}/header?simplify")).json()
    assert human["MediaStorageSOPInstanceUID"] == str(ds.file_meta.MediaStorageSOPInstanceUID)
    short = (await client.get(f"/instances/{ct}/header?short")).json()
    assert short["0002,0002"] == str(ds.file_meta.MediaStorageSOPClassUID)


async def test_raw_content_of_tags_and_sequences(client):
    ct = (await _upload(client, _testdata("CT_small.dcm")))["ID"]
    listing = (await client.get(f"/instances/{ct}/content")).json()
    assert "0010-0010" in listing and "7fe0-0010" in listing and "0009-1001" in listing
    name = await client.get(f"/instances/{ct}/content/0010-0010")
    assert name.headers["content-type"] == "application/octet-stream"
    assert name.content == b"CompressedSamples^CT1 "  # the raw value, padding included
    assert (await client.get(f"/instances/{ct}/content/PatientName")).content == name.content
    rows = await client.get(f"/instances/{ct}/content/0028-0010")
    assert rows.content == (128).to_bytes(2, "little")
    _bare_404(await client.get(f"/instances/{ct}/content/0011-0011"))  # absent
    _orthanc_error(await client.get(f"/instances/{ct}/content/NotATag"), 400, 27)

    plan = (await _upload(client, _testdata("rtplan.dcm")))["ID"]
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm"))
    items = (await client.get(f"/instances/{plan}/content/300a-00b0")).json()
    assert items == [str(i) for i in range(len(ds.BeamSequence))]
    item = (await client.get(f"/instances/{plan}/content/300a-00b0/0")).json()
    assert "300a-00c2" in item and "300a-0111" in item
    beam_name = await client.get(f"/instances/{plan}/content/300a-00b0/0/300a-00c2")
    assert beam_name.content.rstrip(b" ") == ds.BeamSequence[0].BeamName.encode()
    nested = await client.get(f"/instances/{plan}/content/300a-00b0/0/300a-0111/0/300a-0112")
    assert nested.content.rstrip(b" ").decode() == str(ds.BeamSequence[0].ControlPointSequence[0].ControlPointIndex)
    _bare_404(await client.get(f"/instances/{plan}/content/300a-00b0/{len(items)}"))
    _bare_404(await client.get(f"/instances/{plan}/content/300a-00b0/x/300a-00c2"))
    _bare_404(await client.get(f"/instances/{plan}/content/0008-0070/0"))  # not a sequence
    _orthanc_error(await client.get("/instances/00000000-00000000-00000000-00000000-00000000/content"), 404, 17)


async def test_raw_pixel_data_blocks(client):
    native = (await _upload(client, _testdata("CT_small.dcm")))["ID"]
    assert (await client.get(f"/instances/{native}/content/7fe0-0010")).json() == ["0"]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert (await client.get(f"/instances/{native}/content/7fe0-0010/0")).content == ds.PixelData
    _bare_404(await client.get(f"/instances/{native}/content/7fe0-0010/1"))

    jpeg = (await _upload(client, _testdata("JPEG2000.dcm")))["ID"]
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    fragments = list(generate_fragments(ds.PixelData))
    blocks = (await client.get(f"/instances/{jpeg}/content/7fe0-0010")).json()
    assert blocks == [str(i) for i in range(len(fragments))]  # the offset table is item 0
    assert (await client.get(f"/instances/{jpeg}/content/7fe0-0010/1")).content == fragments[1]


async def test_shared_tags_of_a_series_a_study_and_a_patient(client):
    ids = [await _upload(client, make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1234.3.{i}", InstanceNumber=i))
           for i in (1, 2)]
    series, study, patient = ids[0]["ParentSeries"], ids[0]["ParentStudy"], ids[0]["ParentPatient"]
    shared = (await client.get(f"/series/{series}/shared-tags")).json()
    assert shared["0010,0020"] == {"Name": "PatientID", "Type": "String", "Value": "PAT-1"}
    assert "0008,0018" not in shared and "0020,0013" not in shared  # they differ
    assert all(node["Type"] == "String" for node in shared.values())  # no Null, no sequence
    assert "7fe0,0010" not in shared
    human = (await client.get(f"/studies/{study}/shared-tags?simplify")).json()
    assert human["StudyInstanceUID"] == "1.2.826.0.1.3680043.10.1234.1.1" and "SOPInstanceUID" not in human
    assert (await client.get(f"/patients/{patient}/shared-tags?short")).json()["0010,0020"] == "PAT-1"
    # Orthanc looks the ID up whatever the level word of the URI.
    assert (await client.get(f"/studies/{series}/shared-tags")).json() == shared
    answer = await client.get(f"/instances/{ids[0]['ID']}/shared-tags")
    assert answer.status_code == 404
    _orthanc_error(await client.get("/studies/00000000-00000000-00000000-00000000-00000000/shared-tags"), 404, 17)


async def test_statistics_of_each_level(make_config):
    config = make_config({"StorageCompression": True})
    store = open_store(config)
    async with asgi_client(create_app(config, store)) as client:
        first = await _upload(client, make_instance())
        await _upload(client, make_instance(sop_uid="1.2.826.0.1.3680043.10.1234.3.2"))
        await _upload(client, make_instance(study_uid="1.2.826.0.1.3680043.10.1234.1.9",
                                            series_uid="1.2.826.0.1.3680043.10.1234.2.9"))
        patient = (await client.get(f"/patients/{first['ParentPatient']}/statistics")).json()
        assert (patient["CountStudies"], patient["CountSeries"], patient["CountInstances"]) == (2, 2, 3)
        sizes = [store.attachment(i) for i in store.index.list_ids(3)]
        assert patient["UncompressedSize"] == str(sum(a.size for a in sizes))
        assert patient["DiskSize"] == str(sum(a.stored_size for a in sizes))
        assert int(patient["DiskSize"]) < int(patient["UncompressedSize"])  # compressed
        assert patient["DicomDiskSize"] == patient["DiskSize"] and patient["DiskSizeMB"] == 0
        study = (await client.get(f"/studies/{first['ParentStudy']}/statistics")).json()
        assert (study["CountSeries"], study["CountInstances"]) == (1, 2) and "CountStudies" not in study
        series = (await client.get(f"/series/{first['ParentSeries']}/statistics")).json()
        assert series["CountInstances"] == 2 and "CountSeries" not in series
        instance = (await client.get(f"/instances/{first['ID']}/statistics")).json()
        assert not [key for key in instance if key.startswith("Count")]
        assert instance["UncompressedSize"] == str(store.attachment(first["ID"]).size)
        _orthanc_error(await client.get("/series/00000000-00000000-00000000-00000000-00000000/statistics"), 404, 17)
    store.close()


async def test_attachments_listing(client):
    ids = await _upload(client, make_instance())
    assert (await client.get(f"/instances/{ids['ID']}/attachments")).json() == ["dicom"]
    assert (await client.get(f"/instances/{ids['ID']}/attachments?full")).json() == {"dicom": 1}
    assert (await client.get(f"/studies/{ids['ParentStudy']}/attachments")).json() == []
    assert (await client.get(f"/studies/{ids['ParentStudy']}/attachments?full")).json() == {}
    info = (await client.get(f"/instances/{ids['ID']}/attachments/dicom/info")).json()
    assert info["ContentType"] == 1  # the one attachment listed is the one storage.py describes
    _orthanc_error(await client.get(f"/studies/{ids['ID']}/attachments"), 404, 17)


async def test_unknown_instance_is_orthanc_404(client):
    for route in ("tags", "simplified-tags", "header", "content/0010-0010", "statistics", "attachments"):
        answer = await client.get(f"/instances/00000000-00000000-00000000-00000000-00000000/{route}")
        _orthanc_error(answer, 404, 17)


async def test_wrong_method_is_405(client):
    answer = await client.delete("/instances/00000000-00000000-00000000-00000000-00000000/tags")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET"
