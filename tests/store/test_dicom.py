"""accelerator.store.dicom and the ID recipe of spec 14 on real files."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file

from accelerator.store.dicom import keyword_of, parse_bytes, parse_file, read_tag
from protocol.errors import BadFileFormat
from protocol.resources import Level, orthanc_id, resource_ids
from tests.dicom_data import DUMMY_CT, DUMMY_CT_IDS, dummy_ct, make_instance


def test_dummy_ct_ids_match_orthanc():
    parsed = parse_bytes(dummy_ct())
    assert parsed.ids._asdict() == DUMMY_CT_IDS


def test_recipe_strips_trailing_padding_only():
    padded = resource_ids("ozp00SjY2xG ", DUMMY_CT["StudyInstanceUID"] + "\x00",
                          DUMMY_CT["SeriesInstanceUID"] + "\x00", DUMMY_CT["SOPInstanceUID"] + "\x00")
    assert padded._asdict() == DUMMY_CT_IDS
    assert resource_ids(" X", "1", "2", "3").patient == orthanc_id(" X") != orthanc_id("X")


def test_padding_really_is_in_the_file():
    data = dummy_ct()
    assert b"ozp00SjY2xG " in data
    assert DUMMY_CT["SOPInstanceUID"].encode() + b"\x00" in data


@pytest.mark.parametrize("charset, encoded_with", [("ISO_IR 100", "latin-1"), ("ISO_IR 192", "utf-8")])
def test_non_ascii_patient_id_is_hashed_as_utf8(charset, encoded_with):
    data = make_instance(patient_id="Gérard-Ñ", charset=charset)
    assert "Gérard-Ñ".encode(encoded_with) in data  # the file really uses that character set
    parsed = parse_bytes(data)
    assert parsed.ids.patient == orthanc_id("Gérard-Ñ")
    assert parsed.tags[Level.PATIENT]["PatientID"] == "Gérard-Ñ"


def test_iso_2022_japanese_names_are_decoded():
    path = get_charset_files("chrH31.dcm")[0]
    parsed = parse_file(path)
    expected = str(pydicom.dcmread(path).PatientName)
    assert parsed.tags[Level.PATIENT]["PatientName"] == expected
    assert any(ord(c) > 127 for c in expected)


@pytest.mark.parametrize("path", [p for p in get_charset_files() if p.endswith(".dcm")],
                         ids=lambda p: p.rsplit("/", 1)[-1])
def test_ids_of_every_character_set_sample(path):
    ds = pydicom.dcmread(path)
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        with pytest.raises(BadFileFormat):
            parse_file(path)
        return
    expected = resource_ids(str(ds.get("PatientID", "")), ds.StudyInstanceUID, ds.SeriesInstanceUID,
                            ds.SOPInstanceUID)
    assert parse_file(path).ids == expected


def test_main_tags_keep_their_original_text():
    parsed = parse_file(get_testdata_file("CT_small.dcm"))
    assert parsed.tags[Level.SERIES]["ImageOrientationPatient"] == (
        "1.000000\\0.000000\\0.000000\\0.000000\\1.000000\\0.000000")
    assert parsed.tags[Level.INSTANCE]["InstanceNumber"] == "1"
    assert parsed.tags[Level.PATIENT]["PatientName"] == "CompressedSamples^CT1"
    assert parsed.index_in_series == 1
    assert parsed.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_big_endian_binary_values():
    parsed = parse_file(get_testdata_file("MR_small_bigendian.dcm"))
    little = parse_file(get_testdata_file("MR_small.dcm"))
    assert parsed.ids == little.ids
    assert parsed.tags[Level.INSTANCE] == little.tags[Level.INSTANCE]


@pytest.mark.parametrize("data", [b"", b"this is not DICOM", b"\0" * 128 + b"DICM" + b"\xff" * 64])
def test_garbage_is_bad_file_format(data):
    with pytest.raises(BadFileFormat, match="size"):
        parse_bytes(data)


def test_missing_uids_are_bad_file_format():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.SeriesInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(BadFileFormat, match="SeriesInstanceUID"):
        parse_bytes(out.getvalue())


def test_read_tag_by_keyword_and_by_number():
    path = get_testdata_file("CT_small.dcm")
    expected = pydicom.dcmread(path).KVP.original_string
    assert read_tag(path, "KVP") == read_tag(path, "0018,0060") == expected
    assert read_tag(path, "NoSuchKeyword") is None
    assert keyword_of("0010,0010") == "PatientName"


def test_main_tags_of_late_groups_are_read():
    """ImageIndex (0054,1330) is the last main tag: the header must be read that far."""
    data = make_instance(ImageIndex=7, NumberOfSlices=42, InstanceNumber=None)
    parsed = parse_bytes(data)
    assert parsed.tags[Level.INSTANCE]["ImageIndex"] == "7"
    assert parsed.tags[Level.SERIES]["NumberOfSlices"] == "42"
    assert parsed.index_in_series == 7
