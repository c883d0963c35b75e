"""Reading a stopped Orthanc's storage folder directly (accelerator/replication/orthanc_folder.py),
against folders written by a real Orthanc 1.10.1, with and without StorageCompression: the same
instances, IDs, sizes and MD5s that Orthanc's REST API answered before it was stopped, the same
bytes, the selection of /tools/find, and every kind of damage refused."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import struct
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from accelerator.replication.ends import Selection
from accelerator.replication.orthanc_folder import OrthancFolder, OrthancFolderSource
from protocol.errors import (BadRequest, BadSequenceOfCalls, CorruptedFile, ParameterOutOfRange, UnknownDicomTag,
                             UnknownResource)
from tests.dicom_data import DUMMY_CT_IDS, dummy_ct, make_instance

pytestmark = pytest.mark.slow

ROOT = "1.2.826.0.1.3680043.10.1234"


def _instances() -> dict[str, bytes]:
    """Two patients, two studies (one with two series), real pixel data; and DummyCT."""
    a = dict(patient_id="PAT-A", study_uid=f"{ROOT}.1.1", StudyDate="20190310", PatientName="Alpha^Ann")
    b = dict(patient_id="PAT-B", study_uid=f"{ROOT}.1.2", StudyDate="20210615", PatientName="Beta^Bob")
    return {
        "a1": make_instance(**a, series_uid=f"{ROOT}.2.1", sop_uid=f"{ROOT}.3.1"),
        "a2": make_instance(**a, series_uid=f"{ROOT}.2.1", sop_uid=f"{ROOT}.3.2"),
        "a3": make_instance(**a, series_uid=f"{ROOT}.2.2", sop_uid=f"{ROOT}.3.3", source="CT_small.dcm"),
        "b1": make_instance(**b, series_uid=f"{ROOT}.2.3", sop_uid=f"{ROOT}.3.4"),
        "b2": make_instance(**b, series_uid=f"{ROOT}.2.3", sop_uid=f"{ROOT}.3.5", source="CT_small.dcm"),
        "ct": dummy_ct(),
    }


@dataclass
class StoppedOrthanc:
    storage_dir: Path
    index_dir: Path
    compressed: bool
    ids: dict[str, str]  # name in _instances -> Orthanc ID
    info: dict[str, dict]  # Orthanc ID -> what its REST API said (file, MD5, parents)

    def copy(self, into: Path) -> StoppedOrthanc:
        """A copy of the folders for a test that damages them."""
        shutil.copytree(self.storage_dir, into / "storage")
        shutil.copytree(self.index_dir, into / "index")
        return StoppedOrthanc(into / "storage", into / "index", self.compressed, self.ids, self.info)

    def open(self) -> OrthancFolder:
        return OrthancFolder(self.storage_dir, self.index_dir)

    def attachment(self, instance_id: str) -> Path:
        db = sqlite3.connect(self.index_dir / "index")
        try:
            (uuid,) = db.execute("SELECT a.uuid FROM AttachedFiles a JOIN Resources r ON r.internalId = a.id "
                                 "WHERE r.publicId = ? AND a.fileType = 1", (instance_id,)).fetchone()
        finally:
            db.close()
        return self.storage_dir / uuid[:2] / uuid[2:4] / uuid

    def edit_index(self, sql: str, args: tuple = ()) -> None:
        db = sqlite3.connect(self.index_dir / "index")
        try:
            db.execute(sql, args)
            db.commit()
        finally:
            db.close()


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "StorageCompression"])
def stopped(request, tmp_path_factory) -> StoppedOrthanc:
    """An Orthanc fed the instances over REST, asked what it holds, then stopped."""
    from bench.orthanc import orthanc_binary, start_orthanc

    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package `orthanc`: /usr/sbin/Orthanc)")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), storage_compression=request.param)
    try:
        ids, info = {}, {}
        with server.client() as client:
            for name, data in _instances().items():
                answer = client.post("/instances", content=data)
                assert answer.status_code == 200, answer.text
                ids[name] = answer.json()["ID"]
            for name, iid in ids.items():
                stored = client.get(f"/instances/{iid}").json()
                series = client.get(f"/series/{stored['ParentSeries']}").json()
                study = client.get(f"/studies/{series['ParentStudy']}").json()
                info[iid] = {"file": client.get(f"/instances/{iid}/file").content,
                             "md5": client.get(f"/instances/{iid}/attachments/dicom/md5").text,
                             "patient": study["ParentPatient"], "study": series["ParentStudy"],
                             "series": stored["ParentSeries"]}
    finally:
        server.stop()
    return StoppedOrthanc(server.storage_dir, server.index_dir, request.param, ids, info)


def test_entries_are_what_orthanc_said_it_holds(stopped):
    folder = stopped.open()
    try:
        entries = folder.entries(Selection())
    finally:
        folder.close()
    assert [e.id for e in entries] == sorted(stopped.info)
    assert stopped.ids["ct"] == DUMMY_CT_IDS["instance"]
    for entry in entries:
        said = stopped.info[entry.id]
        assert (entry.md5, entry.size) == (said["md5"], len(said["file"]))
        assert entry.md5 == hashlib.md5(said["file"]).hexdigest()
        assert (entry.patient, entry.study, entry.series) == (said["patient"], said["study"], said["series"])


def test_read_gives_the_bytes_orthanc_served(stopped):
    folder = stopped.open()
    try:
        for iid, said in stopped.info.items():
            assert folder.read(iid) == said["file"]
    finally:
        folder.close()
    stored = b"".join(p.read_bytes() for p in stopped.storage_dir.rglob("*-*-*-*-*") if p.is_file())
    assert (stopped.info[stopped.ids["a1"]]["file"] in stored) is not stopped.compressed  # really decoded


def test_index_in_the_storage_directory_by_default(stopped, tmp_path):
    copy = stopped.copy(tmp_path)
    (copy.index_dir / "index").rename(copy.storage_dir / "index")
    folder = OrthancFolder(copy.storage_dir)
    try:
        assert len(folder.entries(Selection())) == len(stopped.ids)
    finally:
        folder.close()


@pytest.mark.parametrize("selection, expected", [
    (Selection.of(patients=["PAT-A"]), ["a1", "a2", "a3"]),
    (Selection.of(patients=["pat-b"]), ["b1", "b2"]),  # case-insensitive, as /tools/find
    (Selection.of(patients=["PAT-A", "PAT-B"]), ["a1", "a2", "a3", "b1", "b2"]),
    (Selection.of(studies=[f"{ROOT}.1.2"]), ["b1", "b2"]),
    (Selection.of(studies=[f"{ROOT}.1.1", "1.2.840.113619.2.176.2025.1499492.7391.1171285944.390"]),
     ["a1", "a2", "a3", "ct"]),
    (Selection.of(since="20200101"), ["b1", "b2"]),
    (Selection({"StudyDate": "20040101-20191231"}), ["a1", "a2", "a3", "ct"]),
    (Selection({"StudyDate": "-2019"}), ["a1", "a2", "a3", "ct"]),
    (Selection({"PatientName": "*bob"}), ["b1", "b2"]),  # a patient-level tag, wildcard
    (Selection({"PatientID": "PAT-?", "StudyDate": "20190310"}), ["a1", "a2", "a3"]),
    (Selection({"PatientID": "PAT-?", "StudyDate": "20190311"}), []),
    (Selection({"PatientID": "PAT-C"}), []),
    (Selection({"PatientID": ""}), ["a1", "a2", "a3", "b1", "b2", "ct"]),  # empty: no constraint
])
def test_selection_is_a_study_level_find(stopped, selection, expected):
    folder = stopped.open()
    try:
        found = [e.id for e in folder.entries(selection)]
    finally:
        folder.close()
    assert found == sorted(stopped.ids[name] for name in expected)


def test_a_bad_selection_is_refused(stopped):
    folder = stopped.open()
    try:
        with pytest.raises(UnknownDicomTag):
            folder.entries(Selection({"NoSuchKeyword": "x"}))
        with pytest.raises(BadRequest, match="date"):
            folder.entries(Selection({"StudyDate": "2019"}))
        with pytest.raises(ParameterOutOfRange, match="Wildcards"):
            folder.entries(Selection({"StudyInstanceUID": "1.2.*"}))
    finally:
        folder.close()


def test_a_tampered_file_is_refused(stopped, tmp_path):
    copy = stopped.copy(tmp_path)
    iid = copy.ids["a1"]
    path = copy.attachment(iid)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(raw))
    folder = copy.open()
    try:
        with pytest.raises(CorruptedFile, match=iid):
            folder.read(iid)
        assert folder.read(copy.ids["a2"]) == copy.info[copy.ids["a2"]]["file"]  # the others still read
        path.write_bytes(copy.info[iid]["file"] + b"\0" if not copy.compressed else bytes(raw) + b"\0")
        with pytest.raises(CorruptedFile, match="more than"):  # larger than the index says
            folder.read(iid)
    finally:
        folder.close()


def test_a_missing_file_or_instance_is_unknown(stopped, tmp_path):
    copy = stopped.copy(tmp_path)
    iid = copy.ids["b2"]
    copy.attachment(iid).unlink()
    folder = copy.open()
    try:
        with pytest.raises(UnknownResource, match="missing"):
            folder.read(iid)
        with pytest.raises(UnknownResource, match="not in the Orthanc index"):
            folder.read("00000000-00000000-00000000-00000000-00000000")
        with pytest.raises(UnknownResource):  # a study's ID is not an instance's
            folder.read(copy.info[iid]["study"])
    finally:
        folder.close()


def test_a_compressed_file_never_inflates_beyond_the_index(stopped, tmp_path):
    if not stopped.compressed:
        pytest.skip("about StorageCompression files")
    copy = stopped.copy(tmp_path)
    iid = copy.ids["a1"]
    size = len(copy.info[iid]["file"])
    inflated = size * 500  # megabytes from fewer bytes than the file (the index is edited to agree)
    bomb = struct.pack("<Q", size) + zlib.compress(b"\0" * inflated, 9)
    copy.attachment(iid).write_bytes(bomb)
    copy.edit_index("UPDATE AttachedFiles SET compressedSize = ? WHERE uuid = ?",
                    (len(bomb), copy.attachment(iid).name))
    folder = copy.open()
    tracemalloc.start()
    try:
        with pytest.raises(CorruptedFile, match=f"exactly {size} bytes"):
            folder.read(iid)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        folder.close()
    assert peak < inflated // 10, f"{peak} bytes allocated to refuse a {inflated}-byte bomb"


def test_an_index_naming_a_path_is_refused(stopped, tmp_path):
    copy = stopped.copy(tmp_path)
    iid = copy.ids["b1"]
    copy.edit_index("UPDATE AttachedFiles SET uuid = '../../../../etc/passwd' WHERE uuid = ?",
                    (copy.attachment(iid).name,))
    folder = copy.open()
    try:
        with pytest.raises(CorruptedFile, match="no valid attachment"):
            folder.read(iid)
    finally:
        folder.close()


def test_what_is_not_a_stopped_orthanc_index_is_refused(tmp_path):
    with pytest.raises(UnknownResource, match="No Orthanc index"):
        OrthancFolder(tmp_path)
    (tmp_path / "index").write_bytes(b"not a database" * 100)
    with pytest.raises(CorruptedFile):
        OrthancFolder(tmp_path)


def test_a_running_orthanc_is_refused(orthanc_factory):
    server = orthanc_factory(storage_compression=True)
    with server.client() as client:
        assert client.post("/instances", content=dummy_ct()).status_code == 200
    with pytest.raises(BadSequenceOfCalls, match="stop that Orthanc first"):
        OrthancFolder(server.storage_dir, server.index_dir)
    server.stop()
    folder = OrthancFolder(server.storage_dir, server.index_dir)
    try:
        assert [e.id for e in folder.entries(Selection())] == [DUMMY_CT_IDS["instance"]]
    finally:
        folder.close()
    server.restart()  # reading it left nothing that stops Orthanc from starting again
    with server.client() as client:
        assert client.get("/instances").json() == [DUMMY_CT_IDS["instance"]]


def test_an_orthanc_killed_with_its_log_unflushed_is_read_whole(orthanc_factory):
    """After a crash (kill -9) the last instances may be only in SQLite's write-ahead log."""
    server = orthanc_factory()
    with server.client() as client:
        assert client.post("/instances", content=dummy_ct()).status_code == 200
        md5 = client.get(f"/instances/{DUMMY_CT_IDS['instance']}/attachments/dicom/md5").text
    server.process.kill()
    server.process.wait(10)
    folder = OrthancFolder(server.storage_dir, server.index_dir)
    try:
        assert [(e.id, e.md5) for e in folder.entries(Selection())] == [(DUMMY_CT_IDS["instance"], md5)]
        assert folder.read(DUMMY_CT_IDS["instance"]) == dummy_ct()
    finally:
        folder.close()


@pytest.mark.anyio
async def test_the_async_source(stopped):
    source = await OrthancFolderSource.open(stopped.storage_dir, stopped.index_dir)
    try:
        assert str(stopped.storage_dir) in source.name
        entries = await source.entries(Selection.of(patients=["PAT-B"]))
        assert [e.id for e in entries] == sorted([stopped.ids["b1"], stopped.ids["b2"]])
        for entry in entries:
            assert await source.read(entry.id) == stopped.info[entry.id]["file"]
        with pytest.raises(UnknownResource):
            await source.read("00000000-00000000-00000000-00000000-00000000")
    finally:
        await source.aclose()


def test_an_index_without_md5s_gets_them_from_the_files(orthanc_factory):
    """`StoreMD5ForAttachments: false` leaves the MD5 columns empty: the files themselves say."""
    server = orthanc_factory(storage_compression=True, extra={"StoreMD5ForAttachments": False})
    with server.client() as client:
        assert client.post("/instances", content=dummy_ct()).status_code == 200
    server.stop()
    db = sqlite3.connect(server.index_dir / "index")
    try:
        assert db.execute("SELECT uncompressedMD5 FROM AttachedFiles WHERE fileType = 1").fetchall() == [("",)]
    finally:
        db.close()
    folder = OrthancFolder(server.storage_dir, server.index_dir)
    try:
        assert [(e.id, e.md5) for e in folder.entries(Selection())] == \
            [(DUMMY_CT_IDS["instance"], hashlib.md5(dummy_ct()).hexdigest())]
        assert folder.read(DUMMY_CT_IDS["instance"]) == dummy_ct()
    finally:
        folder.close()
