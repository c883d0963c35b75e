"""accelerator.store: ingest, read-back, duplicates, deletion, statistics, crash recovery; on
every kind of storage and every kind of index (SQLite, PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import zlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from accelerator.api.app import open_store
from accelerator.config import config_from_dict
from accelerator.store import FileToIngest, Store
from accelerator.store.area import STAGING
from accelerator.store.storage import FileSystemStorage
from protocol.errors import BadFileFormat, CorruptedFile, UnknownResource
from protocol.resources import Level
from tests.dicom_data import make_instance


@pytest.fixture
def config(make_config, index_section):
    """The store of these tests (conftest's `store`) on this test's kind of index too."""
    return make_config(index_section)


def _series(n: int, *, patient="P", study="1.2.3", series="1.2.3.4", start=1) -> list[bytes]:
    return [make_instance(patient_id=patient, study_uid=study, series_uid=series,
                          sop_uid=f"{series}.{i}", InstanceNumber=i) for i in range(start, start + n)]


def _files_on_disk(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file() and len(p.name) == 36}


def _check_consistent(store: Store) -> None:
    """Every index row has its file with the recorded MD5, and every file has its row."""
    rows = {}
    for level_id in store.index.list_ids(Level.INSTANCE):
        att = store.attachment(level_id)
        rows[att.uuid] = att
        assert hashlib.md5(store.area.read(att.uuid, att.compressed)).hexdigest() == att.md5
    assert set(store.area.storage.list()) == set(rows)
    assert not store.area.storage.staged()
    if isinstance(store.area.storage, FileSystemStorage):
        assert _files_on_disk(store.area.storage.root) == set(rows)


@pytest.mark.parametrize("compress", [False, True])
def test_ingest_and_read_back(tmp_path, compress, make_index):
    store = Store(tmp_path, compress=compress, index=make_index(tmp_path))
    data = _series(3)
    outcomes = [store.ingest_bytes(d) for d in data]
    assert [o.status for o in outcomes] == ["Success"] * 3
    for d, o in zip(data, outcomes):
        assert store.read_file(o.parsed.ids.instance) == d
        att = store.attachment(o.parsed.ids.instance)
        assert (att.size, att.md5) == (len(d), hashlib.md5(d).hexdigest())
        assert att.compressed is compress
        assert store.read_range(att, 10, 100) == d[10:110]
    stats = store.statistics()
    assert stats["uncompressed_size"] == sum(map(len, data))
    if compress:
        assert stats["disk_size"] < stats["uncompressed_size"]
        raw = (store.area.storage.path_of(att.uuid)).read_bytes()
        assert raw[:8] == len(d).to_bytes(8, "little")  # Orthanc's zlib layout
    else:
        assert stats["disk_size"] == stats["uncompressed_size"]
    _check_consistent(store)
    store.close()


@pytest.mark.file_system_only
def test_storage_layout_is_orthancs(store):
    outcome = store.ingest_bytes(_series(1)[0])
    uuid = store.attachment(outcome.parsed.ids.instance).uuid
    path = store.area.storage.root / uuid[:2] / uuid[2:4] / uuid
    assert path.is_file()


def test_duplicate_is_already_stored_and_not_written(store):
    data = _series(1)[0]
    first = store.ingest_bytes(data)
    uuid = store.attachment(first.parsed.ids.instance).uuid
    second = store.ingest_bytes(data)
    assert (first.status, second.status) == ("Success", "AlreadyStored")
    assert store.attachment(first.parsed.ids.instance).uuid == uuid
    assert store.statistics()["instances"] == 1
    _check_consistent(store)


def test_overwrite_replaces_the_file(tmp_path, make_index):
    store = Store(tmp_path, overwrite=True, index=make_index(tmp_path))
    first = make_instance(sop_uid="1.2.9", InstanceNumber=1)
    second = make_instance(sop_uid="1.2.9", InstanceNumber=2)
    o1, o2 = store.ingest_bytes(first), store.ingest_bytes(second)
    assert (o1.status, o2.status) == ("Success", "Success")
    assert store.read_file(o1.parsed.ids.instance) == second
    assert store.resource(Level.INSTANCE, o1.parsed.ids.instance).main_tags["InstanceNumber"] == "2"
    stats = store.statistics()
    assert (stats["instances"], stats["uncompressed_size"]) == (1, len(second))
    _check_consistent(store)
    store.close()


def test_concurrent_uploads_of_one_instance_store_one_copy(store):
    data = _series(1)[0]
    statuses = []
    barrier = threading.Barrier(8)

    def upload():
        barrier.wait()
        store.ingest_bytes(data)
        statuses.append("done")

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(statuses) == 8
    assert store.statistics()["instances"] == 1
    _check_consistent(store)


def test_bad_input_leaves_store_intact(store):
    good = store.ingest_bytes(_series(1)[0])
    for bad in (b"", b"garbage", b"\0" * 200):
        with pytest.raises(BadFileFormat):
            store.ingest_bytes(bad)
    assert store.statistics()["instances"] == 1
    assert store.read_file(good.parsed.ids.instance)
    _check_consistent(store)


def test_delete_cascades_and_removes_empty_parents(store):
    a = _series(2, patient="P1", study="1.1", series="1.1.1")
    b = _series(2, patient="P1", study="1.1", series="1.1.2")
    c = _series(1, patient="P1", study="1.2", series="1.2.1")
    ids = [store.ingest_bytes(d).parsed.ids for d in a + b + c]
    assert (store.statistics()["patients"], store.statistics()["studies"], store.statistics()["series"]) == (1, 2, 3)

    # Deleting the only series of study 1.2 removes the study too; the patient remains.
    remaining = store.delete(Level.SERIES, ids[4].series)
    assert remaining.level == Level.PATIENT and remaining.public_id == ids[0].patient
    with pytest.raises(UnknownResource):
        store.resource(Level.STUDY, ids[4].study)

    # Deleting one instance of a series of two keeps the series.
    remaining = store.delete(Level.INSTANCE, ids[0].instance)
    assert remaining.level == Level.SERIES and remaining.public_id == ids[0].series

    # Deleting the patient removes everything, files included.
    assert store.delete(Level.PATIENT, ids[0].patient) is None
    stats = store.statistics()
    assert stats == {"patients": 0, "studies": 0, "series": 0, "instances": 0,
                     "disk_size": 0, "uncompressed_size": 0}
    _check_consistent(store)
    if isinstance(store.area.storage, FileSystemStorage):  # fan-out folders go, as in Orthanc
        assert not [p for p in store.area.storage.root.iterdir() if p.is_dir() and p.name != STAGING]


def test_delete_unknown_is_404_and_changes_nothing(store):
    store.ingest_bytes(_series(1)[0])
    with pytest.raises(UnknownResource):
        store.delete(Level.STUDY, "00000000-00000000-00000000-00000000-00000000")
    assert store.statistics()["instances"] == 1


def test_statistics_are_exact(store):
    data = _series(3, series="9.1") + _series(2, patient="Q", study="8", series="8.1")
    for d in data:
        store.ingest_bytes(d)
    stats = store.statistics()
    assert stats == {"patients": 2, "studies": 2, "series": 2, "instances": 5,
                     "disk_size": sum(map(len, data)), "uncompressed_size": sum(map(len, data))}


def test_ingest_files_is_all_or_nothing(store, tmp_path):
    data = _series(3)
    paths = []
    for i, d in enumerate(data):
        p = store.area.work / f"incoming-{i}"
        p.write_bytes(d)
        paths.append(FileToIngest(p, len(d), hashlib.md5(d).hexdigest()))
    bad = store.area.work / "incoming-bad"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(BadFileFormat):
        store.ingest_files(paths + [FileToIngest(bad, 16, "0" * 32)])
    assert store.statistics()["instances"] == 0
    assert not store.area.storage.staged()
    assert [p.path.read_bytes() for p in paths] == data  # a failed batch gives the files back

    def failing_store_instances(*args, **kwargs):
        raise OSError("disk full")

    original = store.index.store_instances
    store.index.store_instances = failing_store_instances
    with pytest.raises(OSError):
        store.ingest_files(paths)
    store.index.store_instances = original
    assert [p.path.read_bytes() for p in paths] == data
    assert not store.area.storage.staged()
    outcomes = store.ingest_files(paths)
    assert [o.status for o in outcomes] == ["Success"] * 3
    assert all(not p.path.exists() for p in paths)  # moved (or copied, then removed)
    _check_consistent(store)


def test_recovery_of_interrupted_ingests(tmp_path, make_index):
    store = Store(tmp_path, index=make_index(tmp_path))
    kept = store.ingest_bytes(_series(1)[0])
    # 1. a file staged but never indexed (crash before the commit)
    orphan = store.area.stage_bytes(_series(1, start=5)[0])
    # 2. a file indexed but not yet moved out of staging (crash between commit and rename)
    data = _series(1, start=7)[0]
    parsed = __import__("accelerator.store.dicom", fromlist=["parse_bytes"]).parse_bytes(data)
    staged = store.area.stage_bytes(data)
    store.index.store_instances([(parsed, staged, {})], overwrite=False)
    # 3. a deletion committed but whose file was not unlinked
    doomed = store.ingest_bytes(_series(1, start=9)[0])
    doomed_uuid = store.attachment(doomed.parsed.ids.instance).uuid
    store.index.delete(Level.INSTANCE, doomed.parsed.ids.instance)
    store.close()

    assert (store.area.storage.staging / orphan.uuid).exists()
    assert store.area.storage.path_of(doomed_uuid).exists()
    reopened = Store(tmp_path, index=make_index(tmp_path))
    assert not (reopened.area.storage.staging / orphan.uuid).exists()
    assert reopened.read_file(parsed.ids.instance) == data
    assert reopened.area.storage.path_of(staged.uuid).exists()
    assert not reopened.area.storage.path_of(doomed_uuid).exists()
    assert reopened.index.trash() == []
    assert reopened.statistics()["instances"] == 2
    assert reopened.read_file(kept.parsed.ids.instance)
    _check_consistent(reopened)
    reopened.close()


def test_a_failure_after_the_commit_does_not_undo_the_ingest(tmp_path, make_index):
    """The row is committed: a file that cannot be moved into place is read from staging and
    published at the next start (it used to be discarded, leaving a row without its file)."""
    store = Store(tmp_path, index=make_index(tmp_path))
    data = _series(1)[0]

    def failing_publish(uuid):
        raise OSError("mkdir failed")

    store.area.publish = failing_publish
    outcome = store.ingest_bytes(data)
    assert outcome.status == "Success"
    assert store.read_file(outcome.parsed.ids.instance) == data
    store.close()
    reopened = Store(tmp_path, index=make_index(tmp_path))
    assert reopened.read_file(outcome.parsed.ids.instance) == data
    _check_consistent(reopened)
    reopened.close()


def test_missing_file_is_reported_as_corrupted(store):
    outcome = store.ingest_bytes(_series(1)[0])
    store.area.storage.remove(store.attachment(outcome.parsed.ids.instance).uuid)
    with pytest.raises(CorruptedFile):
        store.read_file(outcome.parsed.ids.instance)


_WRITER = textwrap.dedent("""
    import json, sys, itertools
    sys.path.insert(0, sys.argv[2])
    from accelerator.api.app import open_store
    from accelerator.config import config_from_dict
    from tests.dicom_data import make_instance
    store = open_store(config_from_dict(json.loads(sys.argv[1])))
    blobs = [make_instance(sop_uid=f"1.2.826.7.{i}", InstanceNumber=i) for i in range(40)]
    print("ready", flush=True)
    for i in itertools.count():
        store.ingest_bytes(blobs[i % 40])
        if i % 40 == 39:
            from protocol.resources import Level
            for instance in store.index.list_ids(Level.INSTANCE)[:20]:
                store.delete(Level.INSTANCE, instance)
""")


@pytest.mark.slow
def test_kill_9_during_ingest_and_delete_leaves_a_consistent_store(tmp_path, storage_section, index_section):
    """A writer killed at random moments: after each restart the storage and index agree (on
    the file system, and in a bucket; on SQLite and on PostgreSQL)."""
    repo = Path(__file__).resolve().parents[2]
    options = {"StorageDirectory": str(tmp_path / "storage"), **storage_section(), **index_section}
    for attempt, delay in enumerate((0.3, 0.55, 0.8, 1.1)):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, json.dumps(options), str(repo)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        store = open_store(config_from_dict(options))
        _check_consistent(store)
        assert store.statistics()["instances"] == len(store.index.list_ids(Level.INSTANCE))
        store.close()


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compressed"])
def test_stored_content_is_what_orthanc_writes(make_config, compression):
    """On disk or in a bucket, an attachment holds the DICOM file, or with StorageCompression
    Orthanc's layout: the uncompressed size (uint64, little endian) then a zlib stream."""
    store = open_store(make_config({"StorageCompression": compression}))  # the index is not the point
    data = _series(1)[0]
    outcome = store.ingest_bytes(data)
    att = store.attachment(outcome.parsed.ids.instance)
    raw = store.area.storage.read(att.uuid)  # the bytes as the storage holds them
    assert hashlib.md5(raw).hexdigest() == att.stored_md5 and len(raw) == att.stored_size
    if compression:
        assert raw[:8] == len(data).to_bytes(8, "little") and zlib.decompress(raw[8:]) == data
    else:
        assert raw == data
    store.close()


def test_a_file_changed_in_the_storage_is_never_served(store):
    """Same size, other bytes (on disk or in the bucket): CorruptedFile, not the wrong bytes."""
    data = _series(1)[0]
    outcome = store.ingest_bytes(data)
    att = store.attachment(outcome.parsed.ids.instance)
    store.area.storage.remove(att.uuid)
    store.area.storage.stage(att.uuid, bytes(len(data)))
    store.area.storage.publish(att.uuid)
    with pytest.raises(CorruptedFile, match="MD5"):
        store.read_file(outcome.parsed.ids.instance)
