"""accelerator.store.dicom and the ID recipe of spec 14 on real files."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement

from accelerator.store.dicom import (
    keyword_of, parse_bytes, parse_file, patient_tags_of_study, read_tag, study_tags,
)
from protocol.errors import BadFileFormat, InexistentTag
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


def _saved(ds: pydicom.Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_an_absent_uid_is_inexistent_tag_as_in_orthanc(keyword):
    """Orthanc's DicomInstanceHasher reads the three UIDs with DicomMap::GetValue, which throws
    ErrorCode_InexistentTag (21, HTTP 404) for an absent tag."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    delattr(ds, keyword)
    with pytest.raises(InexistentTag, match=keyword) as raised:
        parse_bytes(_saved(ds))
    error = raised.value
    assert (error.http_status, error.orthanc_status, error.message) == (404, 21, "Inexistent tag")
    assert isinstance(error, BadFileFormat)  # code refusing a bad transferred file refuses it too


def test_an_empty_uid_is_bad_file_format():
    """Present but empty: DicomInstanceHasher::Setup throws BadFileFormat."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SeriesInstanceUID = ""
    with pytest.raises(BadFileFormat, match="missing StudyInstanceUID, SeriesInstanceUID") as raised:
        parse_bytes(_saved(ds))
    assert not isinstance(raised.value, InexistentTag)


def test_real_files_without_study_and_series_uids():
    """pydicom's JPEG-LS samples have a SOPInstanceUID but no Study/Series Instance UID."""
    with pytest.raises(InexistentTag, match="StudyInstanceUID, SeriesInstanceUID"):
        parse_file(get_testdata_file("JPEGLSNearLossless_08.dcm"))


def test_the_study_level_keeps_the_patient_tags_of_its_own_instances():
    """ResourcesContent::AddResource duplicates the patient tags at the study level."""
    first = parse_bytes(make_instance(patient_id="", PatientName="First^Patient"))
    second = parse_bytes(make_instance(patient_id="", study_uid="1.2.3.4", series_uid="1.2.3.4.1",
                                       sop_uid="1.2.3.4.1.1", PatientName="Second^Patient"))
    assert first.ids.patient == second.ids.patient  # one patient: the empty PatientID
    assert patient_tags_of_study(first.tags[Level.STUDY])["PatientName"] == "First^Patient"
    assert patient_tags_of_study(second.tags[Level.STUDY])["PatientName"] == "Second^Patient"
    assert patient_tags_of_study(second.tags[Level.STUDY]) == second.tags[Level.PATIENT]
    assert "PatientName" not in study_tags(second.tags[Level.STUDY])
    assert study_tags(second.tags[Level.STUDY])["StudyInstanceUID"] == "1.2.3.4"


def _with_un_elements(charset: str | None, elements: dict[int, bytes]) -> bytes:
    """An explicit VR file whose given elements are written with VR UN (pydicom would otherwise
    give a known tag its dictionary VR)."""
    ds = pydicom.dcmread(io.BytesIO(make_instance(charset=charset)))
    pydicom_config.replace_un_with_known_vr = False
    try:
        for tag, value in elements.items():
            ds.add(DataElement(tag, "UN", value))
        return _saved(ds)
    finally:
        pydicom_config.replace_un_with_known_vr = True


def test_un_elements_are_kept_as_orthanc_keeps_them():
    """FromDcmtkBridge::ConvertLeafElement, EVR_UN of a public tag (CP 246): a string VR in the
    dictionary gives the bytes less one trailing NUL, through the character set, trailing spaces
    kept; a binary VR (US) gives a binary value, which is never a main tag."""
    data = _with_un_elements("ISO_IR 192", {
        0x00080060: b"CT",                          # Modality (CS)
        0x00081030: "Étude ".encode(),              # StudyDescription (LO), 6 bytes: space kept
        0x00080080: "Hôpita".encode() + b"\0",      # InstitutionName (LO), NUL padding removed
        0x00200013: b"7 ",                          # InstanceNumber (IS)
        0x00540081: b"\x2a\x00",                    # NumberOfSlices (US): binary for Orthanc
    })
    parsed = parse_bytes(data)
    assert parsed.tags[Level.SERIES]["Modality"] == "CT"
    assert parsed.tags[Level.STUDY]["StudyDescription"] == "Étude "
    assert parsed.tags[Level.STUDY]["InstitutionName"] == "Hôpita"
    assert parsed.tags[Level.INSTANCE]["InstanceNumber"] == "7 "
    assert "NumberOfSlices" not in parsed.tags[Level.SERIES]


def test_a_private_un_value_is_a_string_only_when_ascii():
    data = _with_un_elements(None, {0x00091000: b"PRIVATE ", 0x00091001: b"\x01\xff"})
    source = io.BytesIO(data)
    assert read_tag(source, "0009,1000") == "PRIVATE "
    assert read_tag(io.BytesIO(data), "0009,1001") is None


def test_binary_numbers_never_go_through_the_character_set():
    """US/UL/FL/FD are numbers (boost::lexical_cast), whatever SpecificCharacterSet says."""
    for charset in ("ISO_IR 192", "ISO_IR 100", "GB18030"):
        data = make_instance(charset=charset, NumberOfSlices=42, ImageIndex=7,
                             RecommendedDisplayFrameRateInFloat=0.1, DiffusionBValue=0.1)
        parsed = parse_bytes(data)
        assert parsed.tags[Level.SERIES]["NumberOfSlices"] == "42"
        assert parsed.tags[Level.INSTANCE]["ImageIndex"] == "7"
        assert read_tag(io.BytesIO(data), "RecommendedDisplayFrameRateInFloat") == "0.100000001"
        assert read_tag(io.BytesIO(data), "DiffusionBValue") == "0.10000000000000001"


def test_string_values_go_through_the_character_set():
    """Every string VR is converted with the character set (Toolbox::ConvertToUtf8)."""
    parsed = parse_bytes(make_instance(charset="ISO_IR 100", StudyDescription="Crâne", Modality="MR"))
    assert parsed.tags[Level.STUDY]["StudyDescription"] == "Crâne"
    assert parsed.tags[Level.SERIES]["Modality"] == "MR"


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
