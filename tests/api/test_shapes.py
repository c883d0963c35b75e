"""accelerator.api.shapes: the resource JSON that Orthanc answers, where it depends on more than
one row (a study's patient tags, a series' expected instances and status)."""

from __future__ import annotations

import io

import orjson
import pydicom
import pytest

from accelerator.api.shapes import expected_number_of_instances, resource_json, series_status
from protocol.resources import Level
from tests.dicom_data import make_instance

STUDY, SERIES = "1.2.826.0.1.3680043.10.1234.1.1", "1.2.826.0.1.3680043.10.1234.2.1"


def _ingest(store, number: int, **tags):
    """Instance `number` of the test series (SOP UID and InstanceNumber from `number`)."""
    tags.setdefault("InstanceNumber", number)
    data = make_instance(sop_uid=f"{SERIES}.{number}", **tags)
    return store.ingest_bytes(data).parsed.ids


def _series(store, ids) -> dict:
    return resource_json(store, store.resource(Level.SERIES, ids.series))


def test_studies_sharing_an_empty_patient_id_keep_their_own_patient_tags(store):
    first = make_instance(patient_id="", PatientName="First^Patient", PatientSex="F")
    second = make_instance(patient_id="", study_uid="1.2.3.4", series_uid="1.2.3.4.1", sop_uid="1.2.3.4.1.1",
                           PatientName="Second^Patient", PatientSex="M")
    a, b = (store.ingest_bytes(data).parsed.ids for data in (first, second))
    assert a.patient == b.patient
    study_a = resource_json(store, store.resource(Level.STUDY, a.study))
    study_b = resource_json(store, store.resource(Level.STUDY, b.study))
    assert study_a["PatientMainDicomTags"]["PatientName"] == "First^Patient"
    assert study_b["PatientMainDicomTags"] == {
        "PatientName": "Second^Patient", "PatientID": "", "PatientBirthDate": "", "PatientSex": "M"}
    for study in (study_a, study_b):  # MainDicomTags: the study's own tags only, as Orthanc
        assert not {"PatientName", "PatientID", "PatientSex"} & set(study["MainDicomTags"])
    assert study_b["MainDicomTags"]["StudyInstanceUID"] == "1.2.3.4"
    patient = resource_json(store, store.resource(Level.PATIENT, a.patient))
    assert patient["MainDicomTags"]["PatientName"] == "First^Patient"  # the first one stored


def test_a_study_indexed_without_patient_tags_reads_them_from_its_instance(store):
    """A study row written before the patient tags were kept at the study level."""
    ids = store.ingest_bytes(make_instance(patient_id="", PatientName="Own^Name")).parsed.ids
    study = store.resource(Level.STUDY, ids.study)
    legacy = {k: v for k, v in study.main_tags.items() if not k.startswith("Patient")}
    store.index._writer.execute("UPDATE resources SET main_tags = ? WHERE public_id = ?",
                                (orjson.dumps(legacy), ids.study))
    answer = resource_json(store, store.resource(Level.STUDY, ids.study))
    assert answer["PatientMainDicomTags"]["PatientName"] == "Own^Name"
    assert answer["MainDicomTags"] == legacy


def test_a_series_without_the_counting_tags_is_unknown(store):
    ids = _ingest(store, 1)
    series = _series(store, ids)
    assert (series["ExpectedNumberOfInstances"], series["Status"]) == (None, "Unknown")


def test_cardiac_number_of_images_missing_then_complete(store):
    ids = _ingest(store, 1, CardiacNumberOfImages=3)
    _ingest(store, 2, CardiacNumberOfImages=3)
    assert (_series(store, ids)["ExpectedNumberOfInstances"], _series(store, ids)["Status"]) == (3, "Missing")
    _ingest(store, 3, CardiacNumberOfImages=3)
    assert _series(store, ids)["Status"] == "Complete"


def test_an_index_out_of_range_or_twice_is_inconsistent(store):
    ids = _ingest(store, 1, ImagesInAcquisition=2, NumberOfTemporalPositions=1)
    _ingest(store, 2, ImagesInAcquisition=2, NumberOfTemporalPositions=1, InstanceNumber=1)
    assert _series(store, ids)["Status"] == "Inconsistent"


def test_an_index_beyond_the_expected_count_is_inconsistent(store):
    ids = _ingest(store, 1, NumberOfSlices=2, NumberOfTimeSlices=1, InstanceNumber=5)
    assert (_series(store, ids)["ExpectedNumberOfInstances"], _series(store, ids)["Status"]) == (2, "Inconsistent")


def test_an_index_that_is_not_a_number_makes_the_status_unknown(store):
    ids = _ingest(store, 1, CardiacNumberOfImages=2, InstanceNumber="")
    assert _series(store, ids)["Status"] == "Unknown"


def test_instances_without_an_index_are_not_counted(store):
    ds = pydicom.dcmread(io.BytesIO(make_instance(sop_uid=f"{SERIES}.1", CardiacNumberOfImages=1)))
    del ds.InstanceNumber
    out = io.BytesIO()
    ds.save_as(out)
    ids = store.ingest_bytes(out.getvalue()).parsed.ids
    assert _series(store, ids)["Status"] == "Missing"


@pytest.mark.parametrize("tags, expected", [
    ({}, None),
    ({"ImagesInAcquisition": "5"}, None),  # needs NumberOfTemporalPositions too
    ({"ImagesInAcquisition": "5", "NumberOfTemporalPositions": "3"}, 15),
    ({"NumberOfSlices": "4", "NumberOfTimeSlices": "2"}, 8),
    ({"CardiacNumberOfImages": "12"}, 12),
    ({"CardiacNumberOfImages": "+12"}, 12),  # boost::lexical_cast takes a sign
    ({"CardiacNumberOfImages": " 12"}, None),  # ... but no space
    ({"CardiacNumberOfImages": "0"}, None),
    ({"CardiacNumberOfImages": "1\\2"}, None),
    # the first rule whose tags are present decides, even when its values are unusable
    ({"ImagesInAcquisition": "x", "NumberOfTemporalPositions": "3", "CardiacNumberOfImages": "4"}, None),
    ({"ImagesInAcquisition": "5", "NumberOfTemporalPositions": "0", "CardiacNumberOfImages": "4"}, None),
    ({"ImagesInAcquisition": "5", "CardiacNumberOfImages": "4"}, 4),
])
def test_expected_number_of_instances_follows_orthanc(tags, expected):
    assert expected_number_of_instances(tags) == expected


def test_series_status_counts_each_index_once(store):
    ids = _ingest(store, 1, CardiacNumberOfImages=2)
    _ingest(store, 2, CardiacNumberOfImages=2)
    assert series_status(store, store.resource(Level.SERIES, ids.series), 2) == "Complete"
    assert series_status(store, store.resource(Level.SERIES, ids.series), 3) == "Missing"
    assert series_status(store, store.resource(Level.SERIES, ids.series), 1) == "Inconsistent"
