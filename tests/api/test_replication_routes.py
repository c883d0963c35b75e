"""`POST /replicate`, `/replication/entries` and `/replication/md5s` in process: what they accept,
what they refuse (Orthanc's error JSON, 400), and what they answer about our store."""

from __future__ import annotations

import pytest

from tests.replication.test_replicate import dataset

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("body, words", [
    ([], "JSON object"),
    ({"Target": "self"}, '"Source" is missing'),
    ({"Source": "self", "Target": "self"}, "the same"),
    ({"Source": "ftp://x", "Target": "self"}, "not 'self', a URL"),
    ({"Source": {"Type": "Folder", "Path": "/no/such/folder"}, "Target": "self"}, "no such folder"),
    ({"Source": "http://127.0.0.1:1", "Target": {"Type": "Folder", "Path": "/tmp"}}, "only be a source"),
    ({"Source": "http://127.0.0.1:1", "Target": "self", "Selection": {"PatientID": 3}}, "Selection"),
    ({"Source": "http://127.0.0.1:1", "Target": "self", "Follow": "yes"}, "Follow"),
    ({"Source": "http://127.0.0.1:1", "Target": "self", "Compression": "zip"}, "Compression"),
])
async def test_a_bad_replication_request_is_400_and_creates_no_job(client, body, words):
    answer = await client.post("/replicate", json=body)
    assert answer.status_code == 400, answer.text
    assert words in answer.json()["Details"] and answer.json()["OrthancStatus"] == 8
    assert (await client.get("/jobs")).json() == []


async def test_entries_and_md5s_answer_for_our_store(client):
    uploaded = [(await client.post("/instances", content=data)).json() for data in dataset()]
    entries = (await client.post("/replication/entries", json={"Query": {"PatientID": "P2"}})).json()["Instances"]
    assert [e["ID"] for e in entries] == [u["ID"] for u in uploaded if u["ParentPatient"] == entries[0]["Patient"]]
    md5 = (await client.get(f"/instances/{entries[0]['ID']}/attachments/dicom/md5")).text
    assert entries[0]["MD5"] == md5 and entries[0]["Size"] > 0
    asked = [u["ID"] for u in uploaded[:3]] + ["00000000-00000000-00000000-00000000-00000000"]
    found = (await client.post("/replication/md5s", json={"Instances": asked})).json()["Instances"]
    assert sorted(found) == sorted(asked[:3])


async def test_md5_questions_are_bounded(client):
    too_many = {"Instances": ["x"] * 100_001}
    assert (await client.post("/replication/md5s", json=too_many)).status_code == 400
    assert (await client.post("/replication/md5s", json={"Instances": ["y" * 45]})).status_code == 400
    assert (await client.post("/replication/entries", json={"Query": {"PatientID": ["a"]}})).status_code == 400
