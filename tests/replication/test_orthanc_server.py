"""The real Orthanc servers the replication tests and the benchmark run (bench/orthanc.py): they
come up on their own folder, store what they are sent, enforce their credentials, and are gone
when stopped."""

from __future__ import annotations

import hashlib
import json
import os

import httpx
import pytest

from tests.dicom_data import DUMMY_CT_IDS, dummy_ct

pytestmark = pytest.mark.slow


def test_stores_a_real_instance_in_its_own_folder(orthanc_factory):
    server = orthanc_factory(name="plain")
    data = dummy_ct()
    with server.client() as client:
        system = client.get("/system").json()
        assert system["Name"] == "plain" and system["DatabaseVersion"] == 6
        # none of /usr/share/orthanc/plugins ("explorer.js" is the core's own entry)
        assert [p for p in client.get("/plugins").json() if p != "explorer.js"] == []
        answer = client.post("/instances", content=data)
        assert answer.status_code == 200, answer.text
        assert answer.json()["ID"] == DUMMY_CT_IDS["instance"]
        assert client.get(f"/instances/{DUMMY_CT_IDS['instance']}/file").content == data
        md5 = client.get(f"/instances/{DUMMY_CT_IDS['instance']}/attachments/dicom/md5").text
    assert md5 == hashlib.md5(data).hexdigest()
    assert server.url.startswith("http://127.0.0.1:")
    assert (server.index_dir / "index").is_file()
    assert [p for p in server.storage_dir.rglob("*") if p.is_file()]  # the attachment is on its disk
    assert json.loads(server.config_path.read_text())["Plugins"] == []


def test_credentials_are_enforced(orthanc_factory):
    server = orthanc_factory(username="alice", password="s3cret")
    assert server.auth == ("alice", "s3cret")
    assert httpx.get(server.url + "/system").status_code == 401
    assert httpx.get(server.url + "/system", auth=("alice", "wrong")).status_code == 401
    assert httpx.post(server.url + "/instances", content=dummy_ct()).status_code == 401
    with server.client() as client:
        assert client.post("/instances", content=dummy_ct()).status_code == 200
        assert client.get("/instances").json() == [DUMMY_CT_IDS["instance"]]


def test_stop_ends_the_process_and_restart_keeps_the_data(orthanc_factory):
    server = orthanc_factory(storage_compression=True)
    with server.client() as client:
        assert client.post("/instances", content=dummy_ct()).status_code == 200
    pid = server.process.pid
    server.stop()
    assert server.process.poll() is not None and not server.running()
    with pytest.raises(ProcessLookupError):  # reaped: no such process any more
        os.kill(pid, 0)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/system", timeout=2)
    server.restart()
    assert server.running() and server.process.pid != pid
    with server.client() as client:
        assert client.get("/instances").json() == [DUMMY_CT_IDS["instance"]]
        assert client.get(f"/instances/{DUMMY_CT_IDS['instance']}/file").content == dummy_ct()


def test_a_bad_configuration_fails_with_the_log(tmp_path):
    from bench.orthanc import orthanc_binary, start_orthanc

    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package `orthanc`)")
    with pytest.raises(RuntimeError, match="exited") as caught:
        start_orthanc(tmp_path, extra={"StorageCompression": "not a Boolean"})
    assert "StorageCompression" in str(caught.value)  # the log's tail says why
