"""Real DICOM test data: the files bundled in pydicom's wheel and in pydicom-data, and
instances derived from them with chosen identifiers."""

from __future__ import annotations

import io
import os
from functools import cache
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

# DummyCT.dcm of Orthanc's test database (spec 14): identifiers with their padding.
DUMMY_CT = {
    "PatientID": "ozp00SjY2xG ",
    "StudyInstanceUID": "1.2.840.113619.2.176.2025.1499492.7391.1171285944.390",
    "SeriesInstanceUID": "1.2.840.113619.2.176.2025.1499492.7391.1171285944.394",
    "SOPInstanceUID": "1.2.840.113619.2.176.2025.1499492.7040.1171286242.109",
}
DUMMY_CT_IDS = {
    "patient": "6816cb19-844d5aee-85245eba-28e841e6-2414fae2",
    "study": "b9c08539-26f93bde-c81ab0d7-bffaf2cb-a4d0bdd0",
    "series": "f2635388-f01d497a-15f7c06b-ad7dba06-c4c599fe",
    "instance": "66a662ce-7430e543-bad44d47-0dc5a943-ec7a538d",
}


@cache
def bundled_files() -> tuple[Path, ...]:
    """Every file shipped in pydicom's test_files and charset_files, and in pydicom-data."""
    import data_store  # the pydicom-data package

    data = Path(pydicom.__file__).parent / "data"
    roots = [data / "test_files", data / "charset_files", Path(data_store.__file__).parent / "data"]
    files = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            files += [Path(dirpath) / n for n in names if not n.endswith((".pyc", ".py"))]
    return tuple(sorted(files))


def make_instance(
    *,
    patient_id: str = "PAT-1",
    study_uid: str = "1.2.826.0.1.3680043.10.1234.1.1",
    series_uid: str = "1.2.826.0.1.3680043.10.1234.2.1",
    sop_uid: str = "1.2.826.0.1.3680043.10.1234.3.1",
    charset: str | None = None,
    source: str = "MR_small.dcm",
    **tags,
) -> bytes:
    """A Part-10 file from a real pydicom sample with the given identifiers."""
    ds = pydicom.dcmread(get_testdata_file(source))
    if charset:
        ds.SpecificCharacterSet = charset
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dummy_ct() -> bytes:
    return make_instance(
        patient_id=DUMMY_CT["PatientID"],
        study_uid=DUMMY_CT["StudyInstanceUID"],
        series_uid=DUMMY_CT["SeriesInstanceUID"],
        sop_uid=DUMMY_CT["SOPInstanceUID"],
        source="CT_small.dcm",
    )
