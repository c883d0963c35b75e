"""ZIP archives (GET /{level}/{id}/archive, /tools/create-archive) and ZIP uploads (POST /instances),
in process, on the file system and on object storage: Orthanc's folder naming, every file checked
by MD5, memory bounded while streaming, and the bad ZIPs a client can send."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import subprocess
import tracemalloc
import zipfile
from pathlib import Path

import anyio
import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from accelerator import zipfiles
from accelerator.api import core
from accelerator.api.app import create_app, open_storage, open_store
from accelerator.config import config_from_dict
from protocol.resources import resource_ids
from tests.api import test_server
from tests.api.test_storage_routes import corrupt
from tests.conftest import asgi_client
from tests.dicom_data import make_instance

pytestmark = pytest.mark.anyio
serve = test_server.serve  # a fixture: the daemon in the real uvicorn server

STUDY = "1.2.826.0.1.3680043.10.99.1"


def _uid(kind: int, n: int) -> str:
    return f"1.2.826.0.1.3680043.10.99.{kind}.{n}"


async def _upload(client, data: bytes) -> dict:
    answer = await client.post("/instances", content=data)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _members(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as z:
        assert z.testzip() is None  # every CRC checks
        return {info.filename: z.read(info) for info in z.infolist()}


def _sop(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


async def _study(client) -> dict[str, list[bytes]]:
    """A study of three series, with names that exercise Orthanc's rules; bytes by series."""
    series = {
        "mr": dict(Modality="MR", SeriesDescription="T1/axial  (post)"),
        "ct": dict(Modality="ct", SeriesDescription=""),
        "ot": dict(Modality="OT", SeriesDescription="Übersicht^éclair", charset="ISO_IR 192"),
    }
    uploaded: dict[str, list[bytes]] = {}
    for s, (key, tags) in enumerate(series.items()):
        for i in range(3 if key != "ot" else 2):
            data = make_instance(patient_id="PAT-1", PatientName="Doe^John", study_uid=STUDY,
                                 series_uid=_uid(2, s), sop_uid=_uid(3, 10 * s + i), AccessionNumber="ACC-42",
                                 StudyDescription="Brain (MRI)", **tags)
            await _upload(client, data)
            uploaded.setdefault(key, []).append(data)
    return uploaded


async def test_study_archive_has_orthanc_names_and_the_stored_bytes(client):
    uploaded = await _study(client)
    ids = resource_ids("PAT-1", STUDY, _uid(2, 0), _uid(3, 0))
    answer = await client.get(f"/studies/{ids.study}/archive")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers["content-disposition"] == f'filename="{ids.study}.zip"'
    members = _members(answer.content)
    root = "PAT1 Doe John/ACC42 Brain MRI"
    expected = {
        "mr": [f"{root}/MR T1axial post/MR{i:06d}.dcm" for i in range(3)],
        "ct": [f"{root}/ct/CT{i:06d}.dcm" for i in range(3)],  # the modality upper-cased in names only
        "ot": [f"{root}/OT bersicht clair/OT{i:06d}.dcm" for i in range(2)],  # non-ASCII dropped
    }
    assert set(members) == {p for paths in expected.values() for p in paths}
    for key, paths in expected.items():
        assert [members[p] for p in paths] == uploaded[key]  # numbered in the order they arrived
    for data in members.values():  # and the MD5 the store recorded
        instance = _answer_entry(data)["ID"]
        md5 = (await client.get(f"/instances/{instance}/attachments/dicom/md5")).text
        assert hashlib.md5(data).hexdigest() == md5
    with zipfile.ZipFile(io.BytesIO(answer.content)) as z:  # deflated, as Orthanc does
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}


async def test_patient_series_and_create_archive(client):
    uploaded = await _study(client)
    ids = resource_ids("PAT-1", STUDY, _uid(2, 1), _uid(3, 10))
    patient = _members((await client.get(f"/patients/{ids.patient}/archive")).content)
    assert len(patient) == 8
    series = _members((await client.get(f"/series/{ids.series}/archive")).content)
    assert list(series) == [f"PAT1 Doe John/ACC42 Brain MRI/ct/CT{i:06d}.dcm" for i in range(3)]
    # One instance of the MR series, and the whole CT series (given twice: once is enough)
    mr_instance = resource_ids("PAT-1", STUDY, _uid(2, 0), _uid(3, 2)).instance
    for body in ([mr_instance, ids.series, ids.series], {"Resources": [mr_instance, ids.series], "Synchronous": True}):
        answer = await client.post("/tools/create-archive", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-disposition"] == 'filename="Archive.zip"'
        members = _members(answer.content)
        assert set(members) == set(series) | {"PAT1 Doe John/ACC42 Brain MRI/MR T1axial post/MR000000.dcm"}
        assert members["PAT1 Doe John/ACC42 Brain MRI/MR T1axial post/MR000000.dcm"] == uploaded["mr"][2]
    answer = await client.get(f"/tools/create-archive?resources={mr_instance},{ids.series}")
    assert set(_members(answer.content)) == set(members)
    answer = await client.post(f"/series/{ids.series}/archive", json={"Synchronous": True})
    assert list(_members(answer.content)) == list(series)


async def test_duplicate_and_empty_names(client):
    # Two studies named alike, and a patient with nothing printable to name its folders
    for n in (1, 2):
        await _upload(client, make_instance(patient_id="P", PatientName="", study_uid=_uid(1, n),
                                            series_uid=_uid(2, n), sop_uid=_uid(3, n),
                                            AccessionNumber="", StudyDescription="Same"))
    await _upload(client, make_instance(patient_id="--", PatientName="^", study_uid=_uid(1, 3),
                                        series_uid=_uid(2, 3), sop_uid=_uid(3, 3), AccessionNumber="",
                                        StudyDescription="", Modality="", SeriesDescription=""))
    patients = (await client.get("/patients")).json()
    answer = await client.post("/tools/create-archive", json=patients)
    names = sorted(_members(answer.content))
    assert names == sorted([
        "P/Same/MR/MR000000.dcm", "P/Same-2/MR/MR000000.dcm",
        "Unknown Patient/Unknown Study/Unknown Series/00000000.dcm",
    ])


async def test_patient_folder_named_as_the_study_knows_its_patient(client):
    """Two studies whose patients share a PatientID (so one Orthanc patient): each study's
    archive names the patient folder with that study's own PatientName (Orthanc 1.12.2)."""
    for n, name in ((1, "First^Name"), (2, "Second^Name")):
        await _upload(client, make_instance(patient_id="SAME", PatientName=name, study_uid=_uid(1, n),
                                            series_uid=_uid(2, n), sop_uid=_uid(3, n), AccessionNumber=f"A{n}",
                                            StudyDescription=""))
    for n, name in ((1, "SAME First Name"), (2, "SAME Second Name")):
        study = resource_ids("SAME", _uid(1, n), "", "").study
        names = list(_members((await client.get(f"/studies/{study}/archive")).content))
        assert names == [f"{name}/A{n}/MR/MR000000.dcm"]


async def test_archive_errors_are_orthancs(client):
    kept = await _upload(client, make_instance())
    for method, path, body, status, code in [
        ("GET", "/studies/nope/archive", None, 404, 17),
        ("POST", "/tools/create-archive", b"not json", 400, 15),
        ("POST", "/tools/create-archive", b'{"Resources": 3}', 400, 15),
        ("POST", "/tools/create-archive", b'{"Resources": [3]}', 400, 15),
        ("POST", "/tools/create-archive", b'{"Synchronous": true}', 400, 15),
        ("POST", "/tools/create-archive", b'"a string"', 400, 15),
        ("POST", "/tools/create-archive", b'["nope"]', 404, 17),
        ("POST", "/tools/create-archive", f'{{"Resources": ["{kept["ID"]}"], "Synchronous": "yes"}}'.encode(), 400, 15),
        ("POST", "/tools/create-archive", f'{{"Resources": ["{kept["ID"]}"], "Asynchronous": true}}'.encode(), 501, 2),
        ("POST", "/tools/create-archive", f'{{"Resources": ["{kept["ID"]}"], "Synchronous": false}}'.encode(), 501, 2),
        ("POST", "/tools/create-archive",
         f'{{"Resources": ["{kept["ID"]}"], "Transcode": "1.2.840.10008.1.2.4.50"}}'.encode(), 501, 2),
        ("GET", f"/studies/{kept['ParentStudy']}/archive?transcode=1.2.840.10008.1.2.4.50", None, 501, 2),
        ("GET", "/tools/create-archive", None, 400, 8),
        ("POST", f"/studies/{kept['ParentStudy']}/archive", b"", 400, 15),
        ("GET", f"/instances/{kept['ID']}/archive", None, 404, 17),
    ]:
        answer = await client.request(method, path, content=body)
        assert answer.status_code == status, (path, body, answer.text)
        error = answer.json()
        assert error["OrthancStatus"] == code and error["HttpStatus"] == status, (path, body)
    answer = await client.delete(f"/studies/{kept['ParentStudy']}/archive")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, POST"


async def test_a_corrupt_stored_file_is_left_out_and_a_large_one_breaks_the_stream(client, store, monkeypatch):
    good = await _upload(client, make_instance(sop_uid=_uid(3, 1)))
    bad = await _upload(client, make_instance(sop_uid=_uid(3, 2)))
    corrupt(store.area.storage, store.attachment(bad["ID"]).uuid)
    answer = await client.get(f"/series/{good['ParentSeries']}/archive")
    members = _members(answer.content)  # the other file, intact; the corrupt one never sent
    assert list(members.values()) == [make_instance(sop_uid=_uid(3, 1))]
    monkeypatch.setattr(zipfiles, "WHOLE_FILE_LIMIT", 1024)  # streamed: checked at its end only
    monkeypatch.setattr(zipfiles, "BLOCK", 1024)
    try:
        answer = await client.get(f"/series/{good['ParentSeries']}/archive")
        content = answer.content
    except Exception:  # the connection broke: as it should
        return
    with pytest.raises(zipfile.BadZipFile):  # else what arrived is no ZIP a client could take for whole
        _members(content)


@pytest.mark.parametrize("zip64", [False, True], ids=["zip32", "zip64"])
async def test_archives_pass_info_zips_test_with_and_without_zip64(client, tmp_path, monkeypatch, zip64):
    """An independent reader (Info-ZIP's `unzip -t`) checks every member; ZIP64 is forced with
    zipfile's limits lowered (members, offsets and the member count beyond them)."""
    if shutil.which("unzip") is None:
        pytest.skip("unzip (Info-ZIP) is not installed")
    uploaded = [_large_instance(n, 100_000) for n in range(8)]
    for data in uploaded:
        await _upload(client, data)
    if zip64:
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 50_000)
        monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 5)
    study = resource_ids("BIG", STUDY, "", "").study
    content = (await client.get(f"/studies/{study}/archive")).content
    monkeypatch.undo()
    (tmp_path / "a.zip").write_bytes(content)
    tested = subprocess.run(["unzip", "-t", str(tmp_path / "a.zip")], capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0 and "No errors detected" in tested.stdout, tested.stdout + tested.stderr
    assert (b"PK\x06\x06" in content) == zip64  # the ZIP64 end of central directory record
    assert sorted(_members(content).values()) == sorted(uploaded)


def test_over_real_http_an_archive_streams_and_a_bad_large_file_breaks_it(serve, make_config, monkeypatch):
    """Through uvicorn: a whole archive in chunks; then a stream that must break (headers are
    sent, a file fails its MD5 at its end) reaches the client as an incomplete answer."""
    with serve() as (host, port), httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as http:
        uploaded = [make_instance(sop_uid=_uid(3, n)) for n in range(3)]
        answers = [http.post("/instances", content=data).json() for data in uploaded]
        series = answers[0]["ParentSeries"]
        with http.stream("GET", f"/series/{series}/archive") as answer:
            assert answer.status_code == 200 and "content-length" not in answer.headers
            content = b"".join(answer.iter_bytes())
        assert list(_members(content).values()) == uploaded
        uuid = http.get(f"/instances/{answers[2]['ID']}").json()["FileUuid"]
        storage = open_storage(make_config())
        corrupt(storage, uuid)
        storage.close()
        monkeypatch.setattr(zipfiles, "WHOLE_FILE_LIMIT", 1024)
        monkeypatch.setattr(zipfiles, "BLOCK", 1024)
        monkeypatch.setattr(zipfiles, "CHUNK", 1024)  # the first files are on their way already
        received = bytearray()
        with pytest.raises(httpx.HTTPError):
            with http.stream("GET", f"/series/{series}/archive") as answer:
                assert answer.status_code == 200
                for chunk in answer.iter_bytes():
                    received += chunk
        assert received  # part of it came, and the client knows it is cut


# -- memory ------------------------------------------------------------------------------------

def _large_instance(n: int, size: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(make_instance(patient_id="BIG", study_uid=STUDY, series_uid=_uid(2, n // 50),
                                                  sop_uid=_uid(3, n))))
    ds.add_new(0x00091010, "OB", hashlib.shake_128(str(n).encode()).digest(size))  # incompressible
    ds.private_block(0x0009, "accelerator tests", create=True)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


async def _asgi_get(app, path: str, out: io.RawIOBase) -> int:
    """GET through the ASGI app itself, the body going to `out` as it comes (an HTTP client
    would hold the whole answer in this process's memory)."""
    disconnected = anyio.Event()
    sent_request = False
    status = 0

    async def receive():
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            out.write(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"127.0.0.1:8042")], "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 8042)}
    await app(scope, receive, send)
    disconnected.set()
    return status


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole-files", "streamed-files"])
async def test_a_200_instance_archive_streams_in_bounded_memory(tmp_path, monkeypatch, compression, streamed):
    config = config_from_dict({"StorageDirectory": str(tmp_path / "storage"), "StorageCompression": compression})
    store = open_store(config)
    size, count = 512 * 1024, 200
    md5s = {}
    for n in range(count):
        data = _large_instance(n, size)
        store.ingest_bytes(data)
        md5s[_sop(data)] = hashlib.md5(data).hexdigest()
    if streamed:  # every file read in blocks, its MD5 checked at its end
        monkeypatch.setattr(zipfiles, "WHOLE_FILE_LIMIT", 64 * 1024)
    app = create_app(config, store)
    study = resource_ids("BIG", STUDY, "", "").study
    with open(tmp_path / "archive.zip", "wb") as out:
        tracemalloc.start()
        try:
            status = await _asgi_get(app, f"/studies/{study}/archive", out)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    store.close()
    assert status == 200
    archive_size = (tmp_path / "archive.zip").stat().st_size
    assert archive_size > count * size  # random bytes do not deflate
    assert peak < 12 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for a {archive_size / 1e6:.0f} MB archive"
    with zipfile.ZipFile(tmp_path / "archive.zip") as z:
        names = z.namelist()
        assert len(names) == count and len(set(names)) == count
        for name in names:
            data = z.read(name)
            assert md5s.pop(_sop(data)) == hashlib.md5(data).hexdigest()
    assert not md5s


# -- ZIP uploads -------------------------------------------------------------------------------

def _zip(*members: tuple[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as z:
        for name, data in members:
            if name.endswith("/"):
                z.mkdir(name)
            else:
                z.writestr(name, data)
    return out.getvalue()


def _without_sop_uid(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _answer_entry(data: bytes, status: str = "Success") -> dict:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    ids = resource_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return {"ID": ids.instance, "ParentPatient": ids.patient, "ParentSeries": ids.series,
            "ParentStudy": ids.study, "Path": f"/instances/{ids.instance}", "Status": status}


def _leftovers(store) -> list[Path]:
    return [p for p in store.area.work.iterdir() if p.name.startswith("upload-")]


@pytest.mark.parametrize("through_a_file", [False, True], ids=["in-memory", "through-a-file"])
async def test_zip_upload_stores_the_dicom_members_as_orthanc(client, store, tmp_path, monkeypatch, through_a_file):
    if through_a_file:
        monkeypatch.setattr(core, "MEMORY_UPLOAD", 100)
    dicoms = [make_instance(sop_uid=_uid(3, n)) for n in range(3)]
    body = _zip(
        ("study/", b""),
        ("study/a.dcm", dicoms[0]),
        ("../../escape.dcm", dicoms[1]),  # a name is never a path here
        ("/etc/absolute.dcm", dicoms[2]),
        ("readme.txt", b"not DICOM"),
        ("empty.dcm", b""),
        ("nested.zip", _zip(("inner.dcm", make_instance(sop_uid=_uid(3, 99))))),
        ("DICOMDIR", Path(get_testdata_file("DICOMDIR")).read_bytes()),
        ("no-sop-uid.dcm", _without_sop_uid(make_instance(sop_uid=_uid(3, 98)))),
        ("again.dcm", dicoms[0]),
    )
    answer = await client.post("/instances", content=body, headers={"Content-Type": "application/zip"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == [_answer_entry(dicoms[0]), _answer_entry(dicoms[1]), _answer_entry(dicoms[2]),
                             _answer_entry(dicoms[0], "AlreadyStored")]
    assert sorted((await client.get("/instances")).json()) == sorted(e["ID"] for e in answer.json()[:3])
    for data in dicoms:
        entry = _answer_entry(data)
        assert (await client.get(f"/instances/{entry['ID']}/file")).content == data
        meta = (await client.get(f"/instances/{entry['ID']}/metadata?expand")).json()
        assert meta["Origin"] == "RestApi"
    again = await client.post("/instances", content=body)
    assert [e["Status"] for e in again.json()] == ["AlreadyStored"] * 4
    assert not (tmp_path / "escape.dcm").exists() and not (tmp_path.parent / "escape.dcm").exists()
    assert _leftovers(store) == []
    empty = await client.post("/instances", content=_zip())  # an empty ZIP: "PK\5\6" then nothing
    assert empty.status_code == 200 and empty.json() == []


def _bad_crc(data: bytes) -> bytes:
    body = bytearray(_zip(("a.dcm", make_instance(sop_uid=_uid(3, 1))), ("b.dcm", data), method=zipfile.ZIP_STORED))
    at = body.find(data) + len(data) // 2
    body[at] ^= 0xFF
    return bytes(body)


def _patched_central_size(body: bytes, new_size: int) -> bytes:
    """The central directory entry of the first member claims `new_size` uncompressed bytes."""
    body = bytearray(body)
    at = body.find(b"PK\x01\x02")
    struct.pack_into("<I", body, at + 24, new_size)
    return bytes(body)


def _overlapping() -> bytes:
    """Two central directory entries for one local file (the "overlapping files" bomb)."""
    body = _zip(("a.dcm", make_instance(sop_uid=_uid(3, 1))))
    cd = body.find(b"PK\x01\x02")
    eocd = body.find(b"PK\x05\x06")
    entry = body[cd:eocd]
    second = bytearray(entry)
    second[46:51] = b"b.dcm"
    directory = entry + bytes(second)
    end = bytearray(body[eocd:])
    struct.pack_into("<HHII", end, 8, 2, 2, len(directory), cd)
    return body[:cd] + directory + bytes(end)


def _flag(body: bytes, flag: int) -> bytes:
    body = bytearray(body)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = body.find(sig)
        struct.pack_into("<H", body, at + offset, struct.unpack_from("<H", body, at + offset)[0] | flag)
    return bytes(body)


async def test_bad_zips_are_refused_whole_with_orthancs_error(make_config, monkeypatch):
    config = make_config({"MaximumRequestBodySize": 8, "Transfers": {"MaxInstanceSize": 2}})  # MiB
    store = open_store(config)
    zeros = make_instance(sop_uid=_uid(3, 7))  # a DICOM member
    bomb_member = _zip(("a.dcm", make_instance(sop_uid=_uid(3, 1))), ("zeros.dcm", b"\0" * (3 << 20)))
    many = _zip(*[(f"{i}.dcm", make_instance(sop_uid=_uid(3, 100 + i))) for i in range(6)])
    total = _zip(*[(f"{i}.bin", b"\0" * (1900 << 10)) for i in range(5)])  # 9.3 MiB once inflated
    ratio = _patched_central_size(_zip(("z.dcm", b"\0" * (1 << 20))), 1500 << 10)
    bzip2 = _zip(("a.dcm", zeros), method=zipfile.ZIP_BZIP2)
    cases = {
        "truncated": (_zip(("a.dcm", zeros))[:-30], "ZIP"),
        "garbage after the signature": (b"PK\x03\x04" + b"\x01" * 500, "ZIP"),
        "bad CRC": (_bad_crc(make_instance(sop_uid=_uid(3, 2))), "Corrupted member b.dcm"),
        "member beyond MaxInstanceSize": (bomb_member, "Uncompressed size exceeds limit: 3.00MB"),
        "members beyond MaximumRequestBodySize": (total, "MaximumRequestBodySize"),
        "a ratio no deflate has": (ratio, "compression ratio"),
        "overlapping members": (_overlapping(), "overlaps"),
        "encrypted": (_flag(_zip(("a.dcm", zeros)), 0x1), "Encrypted"),
        "bzip2": (bzip2, "unsupported compression method"),
        "size lie": (_patched_central_size(_zip(("a.dcm", zeros)), 100), "Corrupted member a.dcm"),
        "too many members": (many, "members, the limit is 5"),
    }
    monkeypatch.setattr(zipfiles, "MAX_ENTRIES", 5)
    async with asgi_client(create_app(config, store)) as client:
        kept = await _upload(client, make_instance(sop_uid=_uid(3, 1000)))
        for case, (body, needle) in cases.items():
            answer = await client.post("/instances", content=body)
            assert answer.status_code == 400, (case, answer.text)
            error = answer.json()
            assert error["OrthancStatus"] == 15 and error["Uri"] == "/instances", case
            assert needle in error["Details"], (case, error["Details"])
            # nothing stored from a ZIP that fails, not even its members before the bad one
            assert (await client.get("/instances")).json() == [kept["ID"]], case
            assert _leftovers(store) == [], case
    store.close()
