"""accelerator.api.find: POST /tools/find and POST /tools/lookup, with Orthanc's matching rules,
answers and error codes; the captured answers of a real Orthanc (folder 08) as oracles."""

from __future__ import annotations

import json
import time
from pathlib import Path

import orjson
import pytest

from accelerator.api.app import create_app, open_store
from accelerator.api.find import INT_MAX, wildcard_match
from tests.conftest import asgi_client
from tests.dicom_data import DUMMY_CT, DUMMY_CT_IDS, dummy_ct, make_instance
from tests.wire_samples import assert_json_matches, dataset, exchange, exchanges

pytestmark = pytest.mark.anyio

FOLDER = "08-core-orthanc-api"
STUDY = "1.2.826.0.1.3680043.10.1234.1."
SERIES = "1.2.826.0.1.3680043.10.1234.2."
SOP = "1.2.826.0.1.3680043.10.1234.3."


async def _upload(client, data: bytes) -> dict:
    answer = await client.post("/instances", content=data)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _find(client, body) -> list:
    answer = await client.post("/tools/find", content=orjson.dumps(body))
    assert answer.status_code == 200, answer.text
    return answer.json()


async def _error(client, body, status: int, code: int, route: str = "/tools/find") -> dict:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # big integers too
    answer = await client.post(route, content=content)
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert (error["HttpStatus"], error["OrthancStatus"], error["Uri"]) == (status, code, route)
    return error


async def _three_studies(client) -> list[dict]:
    """Patient PAT-1 with studies on three dates (MR, MR, CT), then patient OTHER."""
    ids = []
    for i, (date, modality) in enumerate((("20191231", "MR"), ("20200615", "MR"), ("20210101", "CT"))):
        ids.append(await _upload(client, make_instance(
            study_uid=f"{STUDY}{i}", series_uid=f"{SERIES}{i}", sop_uid=f"{SOP}{i}",
            StudyDate=date, StudyTime=f"{10 + i}3000", Modality=modality, PatientName="Doe^Jane",
            InstitutionAddress=f"Street {i}")))
    ids.append(await _upload(client, make_instance(
        patient_id="OTHER", study_uid=f"{STUDY}9", series_uid=f"{SERIES}9", sop_uid=f"{SOP}9",
        PatientName="Smith^John", StudyDate="20200615")))
    return ids


# -- oracles: a real Orthanc's answers ---------------------------------------------------------

@pytest.mark.parametrize("seq", [16, 17])  # invalid JSON; a bad Level
async def test_captured_find_errors(client, seq):
    ex = exchange(FOLDER, seq)
    ours = await client.post(ex.target, content=ex.request_body(), headers=ex.request_headers())
    assert ours.status_code == ex.status
    recorded, body = ex.response_json(), ours.json()
    assert body == recorded  # every key, Details included (absent for the bad Level)


@pytest.fixture
def samples(tmp_path_factory) -> tuple[Path, dict]:
    exchanges(FOLDER)  # skips when the samples are absent
    out = tmp_path_factory.getbasetemp() / "wire-samples-dataset"
    return out, dataset(str(out))


async def test_expanded_answers_equal_the_captured_resources(make_config, samples):
    """Server A of the capture holds the small set: a find answers the resources exactly as the
    captured GET /studies?expand and GET /studies/{id} did."""
    folder, manifest = samples
    config = make_config({"OverwriteInstances": True})
    store = open_store(config)
    for entry in manifest["files"]:
        if entry["set"] == "small":
            store.ingest_bytes((folder / entry["file"]).read_bytes())
    async with asgi_client(create_app(config, store)) as client:
        assert_json_matches(exchange(FOLDER, 7).response_json(), await _find(client, {"Level": "Study", "Expand": True}))
        found = await _find(client, {"Level": "Study", "Query": {"PatientID": "WS-SMALL-1"}, "Expand": True})
        assert_json_matches([exchange(FOLDER, 8).response_json()], found)
        for entry in manifest["files"][:3]:  # identifiers found, and looked up, as the manifest says
            ids = entry["orthanc"]
            assert await _find(client, {"Level": "Instance", "Query": {"SOPInstanceUID": entry["SOPInstanceUID"]}}) \
                == [ids["instance"]]
            looked = (await client.post("/tools/lookup", content=entry["SeriesInstanceUID"])).json()
            assert looked == [{"ID": ids["series"], "Path": f"/series/{ids['series']}", "Type": "Series"}]
    store.close()


# -- matching ----------------------------------------------------------------------------------

async def test_wildcards_lists_and_case(client):
    ids = await _three_studies(client)
    patient = ids[0]["ParentPatient"]
    assert await _find(client, {"Level": "Patient", "Query": {"PatientName": "doe*"}}) == [patient]
    assert await _find(client, {"Level": "Patient", "Query": {"PatientName": "D?e^Jan?"}}) == [patient]
    assert await _find(client, {"Level": "Patient", "Query": {"PatientName": "doe*"}, "CaseSensitive": True}) == []
    assert await _find(client, {"Level": "Patient", "Query": {"PatientID": "pat-1"}}) == [patient]  # default: no case
    both = await _find(client, {"Level": "Patient", "Query": {"PatientID": "PAT-1\\OTHER"}})
    assert both == [patient, ids[3]["ParentPatient"]]
    assert await _find(client, {"Level": "Patient", "Query": {"PatientName": ""}}) == both  # empty: universal
    assert await _find(client, {"Level": "Patient", "Query": {"PatientName": "*"}}) == both


async def test_date_and_time_ranges(client):
    ids = await _three_studies(client)
    studies = [i["ParentStudy"] for i in ids]
    query = {"Level": "Study"}
    assert await _find(client, {**query, "Query": {"StudyDate": "20200101-20201231"}}) == [studies[1], studies[3]]
    assert await _find(client, {**query, "Query": {"StudyDate": "20200615"}}) == [studies[1], studies[3]]
    assert await _find(client, {**query, "Query": {"StudyDate": "-2020"}}) == studies[:2] + [studies[3]]
    assert await _find(client, {**query, "Query": {"StudyDate": "-20191231"}}) == studies[:1]
    assert await _find(client, {**query, "Query": {"StudyDate": "2021-"}}) == studies[2:3]
    assert await _find(client, {**query, "Query": {"StudyDate": "202006-202006"}}) == [studies[1], studies[3]]
    assert await _find(client, {**query, "Query": {"StudyDate": "20191231\\20210101"}}) == [studies[0], studies[2]]
    assert await _find(client, {**query, "Query": {"StudyTime": "11-12"}}) == studies[1:3]


@pytest.mark.parametrize("value", ["2020x", "20201301", "20200230", "2020-13", "2020.01.01", "1-2", "20200101\\2020"])
async def test_malformed_dates_are_bad_requests(client, value):
    error = await _error(client, {"Level": "Study", "Query": {"StudyDate": value}}, 400, 8)
    assert "0008,0020" in error["Details"]


@pytest.mark.parametrize("query", [{"StudyDate": "2020*"}, {"StudyInstanceUID": "1.2.*"},
                                   {"StudyDate": "2020????-"}, {"SeriesNumber": "1?"}])
async def test_wildcards_where_orthanc_refuses_them(client, query):
    error = await _error(client, {"Level": "Series", "Query": query}, 400, 3)
    assert error["Details"].startswith("Wildcards are not allowed on tag ")


async def test_levels_ancestors_and_modalities_in_study(client):
    ids = await _three_studies(client)
    instances = [i["ID"] for i in ids[:3]]
    assert await _find(client, {"Level": "Instance", "Query": {"PatientID": "PAT-1"}}) == instances
    assert await _find(client, {"Level": "Series", "Query": {"StudyDate": "2021-", "Modality": "CT"}}) \
        == [ids[2]["ParentSeries"]]
    # A tag of a lower level matches nothing (Orthanc 1.12.4 keeps the levels up to the query's)...
    assert await _find(client, {"Level": "Study", "Query": {"Modality": "CT"}}) == []
    # ...ModalitiesInStudy is the way.
    assert await _find(client, {"Level": "Study", "Query": {"ModalitiesInStudy": "CT\\US"}}) == [ids[2]["ParentStudy"]]
    assert await _find(client, {"Level": "Study", "Query": {"ModalitiesInStudy": "MR"}}) \
        == [ids[0]["ParentStudy"], ids[1]["ParentStudy"], ids[3]["ParentStudy"]]


async def test_tags_the_index_does_not_hold_are_read_from_the_files(client):
    ids = await _three_studies(client)
    assert await _find(client, {"Level": "Instance", "Query": {"InstitutionAddress": "street 1"}}) == [ids[1]["ID"]]
    assert await _find(client, {"Level": "Study", "Query": {"InstitutionAddress": "Street*", "StudyDate": "2020-"}}) \
        == [ids[1]["ParentStudy"], ids[2]["ParentStudy"]]
    # In that mode, a lower-level tag is matched in the study's instance, as in Orthanc.
    assert await _find(client, {"Level": "Study", "Query": {"InstitutionAddress": "*", "Modality": "CT"}}) \
        == [ids[2]["ParentStudy"]]


async def test_since_limit_and_order(client):
    ids = await _three_studies(client)
    instances = [i["ID"] for i in ids]
    assert await _find(client, {"Level": "Instance"}) == instances  # arrival order
    assert await _find(client, {"Level": "Instance", "Limit": 2}) == instances[:2]
    assert await _find(client, {"Level": "Instance", "Since": 1, "Limit": 2}) == instances[1:3]
    assert await _find(client, {"Level": "Instance", "Since": 3}) == instances[3:]
    assert await _find(client, {"Level": "Instance", "Limit": 0}) == instances  # 0: no limit
    assert await _find(client, {"Level": "Instance", "Limit": INT_MAX, "Since": INT_MAX}) == []
    assert await _find(client, {"Level": "Instance", "Query": {"PatientID": "PAT-1"}, "Since": 1, "Limit": 1}) \
        == instances[1:2]


async def test_labels(client):
    ids = await _three_studies(client)
    studies = [i["ParentStudy"] for i in ids]
    for study, labels in zip(studies, (["a", "b"], ["b"], [])):
        for label in labels:
            assert (await client.put(f"/studies/{study}/labels/{label}")).status_code == 200
    assert await _find(client, {"Level": "Study", "Labels": ["b"]}) == studies[:2]
    assert await _find(client, {"Level": "Study", "Labels": ["a", "b"]}) == studies[:1]
    assert await _find(client, {"Level": "Study", "Labels": ["a", "c"], "LabelsConstraint": "Any"}) == studies[:1]
    assert await _find(client, {"Level": "Study", "Labels": ["a"], "LabelsConstraint": "None"}) == studies[1:]
    assert await _find(client, {"Level": "Study", "Labels": []}) == studies


async def test_expand_formats_and_requested_tags(client):
    ids = await _three_studies(client)
    body = {"Level": "Study", "Query": {"StudyDate": "20191231"}, "Expand": True}
    [study] = await _find(client, body)
    assert study["ID"] == ids[0]["ParentStudy"] and study["Type"] == "Study"
    assert study == (await client.get(f"/studies/{study['ID']}")).json() | {"LastUpdate": study["LastUpdate"],
                                                                          "IsStable": study["IsStable"]}
    assert "RequestedTags" not in study
    [short] = await _find(client, {**body, "Short": True})
    assert short["MainDicomTags"]["0008,0020"] == "20191231"
    assert short["PatientMainDicomTags"]["0010,0020"] == "PAT-1"
    [full] = await _find(client, {**body, "Full": True})
    assert full["MainDicomTags"]["0008,0020"] == {"Name": "StudyDate", "Type": "String", "Value": "20191231"}
    [asked] = await _find(client, {**body, "RequestedTags": ["InstitutionAddress", "0010,0020", "ModalitiesInStudy"]})
    assert asked["RequestedTags"] == {"InstitutionAddress": "Street 0", "PatientID": "PAT-1", "ModalitiesInStudy": "MR"}
    # Without Expand, RequestedTags changes nothing.
    assert await _find(client, {**body, "Expand": False, "RequestedTags": ["PatientID"]}) == [study["ID"]]


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, code, details", [
    (b"", 8, "The body must contain a JSON object"),
    (b"[1, 2]", 8, "The body must contain a JSON object"),
    (b'{"Level": "Study", "Limit": NaN}', 8, "The body must contain a JSON object"),
    ({"Query": {}}, 8, 'Field "Level" is missing, or should be a string'),
    ({"Level": 1}, 8, 'Field "Level" is missing, or should be a string'),
    ({"Level": "Study", "Query": []}, 8, 'Field "Query" is missing, or should be a JSON object'),
    ({"Level": "Study", "CaseSensitive": "yes"}, 8, 'Field "CaseSensitive" must be a Boolean'),
    ({"Level": "Study", "Limit": "10"}, 8, 'Field "Limit" must be an integer'),
    ({"Level": "Study", "Limit": 1.5}, 8, 'Field "Limit" must be an integer'),
    ({"Level": "Study", "Limit": True}, 8, 'Field "Limit" must be an integer'),
    ({"Level": "Study", "Limit": INT_MAX + 1}, 8, 'Field "Limit" must be an integer'),
    ({"Level": "Study", "Limit": 10**30}, 8, 'Field "Limit" must be an integer'),
    ({"Level": "Study", "Since": -1}, 3, 'Field "Since" must be a positive integer'),
    ({"Level": "Study", "Limit": -5}, 3, 'Field "Limit" must be a positive integer'),
    ({"Level": "Study", "Expand": "yes"}, 8, 'Field "Expand" must be a Boolean'),
    ({"Level": "Study", "Short": 1}, 15, "Boolean value expected in field: Short"),
    ({"Level": "Study", "Query": {"PatientID": 12}}, 8, 'Tag "PatientID" must be associated with a string'),
    ({"Level": "Study", "Query": {"NotATag": "x"}}, 27, 'Unknown DICOM tag: "NotATag"'),
    ({"Level": "Study", "Query": {"0010,00": "x"}}, 27, 'Unknown DICOM tag: "0010,00"'),
    ({"Level": "Study", "RequestedTags": "PatientID"}, 8, 'Field "RequestedTags" must be an array'),
    ({"Level": "Study", "RequestedTags": ["Nope"]}, 27, 'Unknown DICOM tag: "Nope"'),
    ({"Level": "Study", "Labels": "a"}, 8, 'Field "Labels" must be an array'),
    ({"Level": "Study", "Labels": [1]}, 8, 'Field "Labels" must contain strings'),
    ({"Level": "Study", "Labels": ["no spaces"]}, 3, "A label must be"),
    ({"Level": "Study", "LabelsConstraint": "Some"}, 8, 'Field "LabelsConstraint" must be'),
])
async def test_bad_input_is_orthanc_error_json(client, body, code, details):
    error = await _error(client, body, 400, code)
    assert error["Details"].startswith(details)


async def test_query_keys_by_tag_number_and_level_aliases(client):
    ids = await _three_studies(client)
    assert await _find(client, {"Level": "studies", "Query": {"0010,0020": "OTHER"}}) == [ids[3]["ParentStudy"]]
    assert await _find(client, {"Level": "Images", "Query": {"00100020": "OTHER"}}) == [ids[3]["ID"]]
    assert await _find(client, {"Level": "Study"}) == await _find(client, {"Level": "Study", "Query": {}})


async def test_huge_body_and_pathological_wildcards(client, config):
    answer = await client.post("/tools/find", content=b'{"Level": "Study", "Query": {"PatientName": "' + b"a" * (2 << 20) + b'"}}')
    assert answer.status_code == 413
    await _upload(client, make_instance(PatientName="a" * 60))
    pattern = "*a" * 30 + "*b"
    started = time.monotonic()
    assert await _find(client, {"Level": "Patient", "Query": {"PatientName": pattern}}) == []
    assert time.monotonic() - started < 5
    assert not wildcard_match(pattern, "a" * 5000)
    assert wildcard_match("a*b?d*", "aXXbcdEE") and not wildcard_match("a*b?d", "abd")


# -- lookup ------------------------------------------------------------------------------------

async def test_lookup_every_level(client):
    await _upload(client, dummy_ct())
    ids = DUMMY_CT_IDS
    patient = (await client.post("/tools/lookup", content=b"  ozp00sjy2xg ")).json()  # normalised as Orthanc
    assert patient == [{"ID": ids["patient"], "Path": f"/patients/{ids['patient']}", "Type": "Patient"}]
    for key, level, path in (("StudyInstanceUID", "study", "studies"), ("SeriesInstanceUID", "series", "series"),
                             ("SOPInstanceUID", "instance", "instances")):
        answer = await client.post("/tools/lookup", content=DUMMY_CT[key])
        assert answer.status_code == 200
        assert answer.json() == [{"ID": ids[level], "Path": f"/{path}/{ids[level]}", "Type": level.capitalize()}]
    assert (await client.post("/tools/lookup", content=b"nothing")).json() == []
    await _error(client, b"1.2.840.*", 400, 3, "/tools/lookup")


async def test_lookup_finds_every_resource_sharing_an_identifier(client):
    first = await _upload(client, make_instance(patient_id="SAME", study_uid=f"{STUDY}5"))
    second = await _upload(client, make_instance(patient_id="OTHER", study_uid=f"{STUDY}5",
                                                 sop_uid=f"{SOP}77"))
    found = (await client.post("/tools/lookup", content=f"{STUDY}5")).json()
    assert [f["ID"] for f in found] == [first["ParentStudy"], second["ParentStudy"]]
    assert {f["Type"] for f in found} == {"Study"}
