"""ObjectStorage against a real S3 server (SeaweedFS, the session's `s3_server`), plus the pure
parts: Orthanc's object names, and the settings of the Azure side.

The tests of behaviours common to both backends take only `make_settings`, `settings`, `storage`
and `tmp_path`: tests/store/test_objects_azure.py imports them and runs them again on Azurite
with its own `make_settings`."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

import obstore
import pytest
from obstore.store import AzureStore

from accelerator.store import objects
from accelerator.store.objects import (ObjectStorage, ObjectStorageSettings, make_store, object_name,
                                       object_storage, parse_connection_string, uuid_of)
from accelerator.store.storage import OBJECT_STORAGE
from protocol.errors import ConfigError, CorruptedFile, InternalError

U1 = "0123abcd-89ab-4def-8123-456789abcdef"


def new_uuid() -> str:
    return str(uuidlib.uuid4())


# -- names (pure) ---------------------------------------------------------------------------------

def test_object_names_follow_orthancs_plugin():
    assert object_name(U1) == f"{U1}.dcm"
    assert object_name(U1, "", "legacy") == f"01/23/{U1}"
    assert object_name(U1, "my/root") == f"my/root/{U1}.dcm"
    assert object_name(U1, "/my/root/", "legacy") == f"my/root/01/23/{U1}"  # never a leading "/"
    assert object_name(U1, "/") == f"{U1}.dcm"
    for bad in ("", "../etc", "0123abcd", U1.upper(), U1 + "/x"):
        with pytest.raises(ValueError):
            object_name(bad)


@pytest.mark.parametrize("structure", ["flat", "legacy"])
@pytest.mark.parametrize("root", ["", "root", "a/b/c"])
def test_names_parse_back(structure, root):
    uuid = new_uuid()
    assert uuid_of(object_name(uuid, root, structure), root, structure) == uuid


def test_foreign_names_are_ignored():
    assert uuid_of(f"{U1}.dcm", "", "legacy") is None
    assert uuid_of(f"01/23/{U1}", "", "flat") is None
    assert uuid_of(f"ff/23/{U1}", "", "legacy") is None  # fan-out folders that do not match
    assert uuid_of(f"{U1}.dcm.enc", "") is None
    assert uuid_of(f"{U1}.json", "") is None
    assert uuid_of(f"other/{U1}.dcm", "root") is None
    assert uuid_of(f"rootx/{U1}.dcm", "root") is None
    assert uuid_of(f"root/sub/{U1}.dcm", "root") is None
    assert uuid_of("README.dcm", "") is None


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="StorageStructure"):
        ObjectStorageSettings(bucket_name="b", storage_structure="tree")
    with pytest.raises(ConfigError, match="BucketName"):
        ObjectStorageSettings()
    with pytest.raises(ConfigError, match="ConnectionString"):
        ObjectStorageSettings(kind="azure", container_name="c")


def test_azure_settings():
    text = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5MTIz;EndpointSuffix=core.windows.net"
    assert parse_connection_string(text)["AccountKey"] == "a2V5MTIz"
    settings = ObjectStorageSettings(kind="azure", connection_string=text, container_name="orthanc")
    assert settings.endpoint_url == "https://acct.blob.core.windows.net"
    assert isinstance(make_store(settings), AzureStore)
    azurite = ObjectStorageSettings(kind="azure", container_name="c", connection_string=(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"))
    assert azurite.endpoint_url == "http://127.0.0.1:10000/devstoreaccount1"
    assert isinstance(make_store(azurite), AzureStore)
    bad_key = ObjectStorageSettings(kind="azure", container_name="c",
                                    connection_string="AccountName=a;AccountKey=not base64!")
    with pytest.raises(ConfigError, match="Azure Blob storage: container 'c': invalid settings: .*Access Key"):
        make_store(bad_key)


# -- against SeaweedFS ----------------------------------------------------------------------------

def s3_settings(s3_server, bucket: str | None = None, **options) -> ObjectStorageSettings:
    return ObjectStorageSettings(
        kind="s3", bucket_name=bucket or s3_server.create_bucket(), region="us-east-1",
        access_key=s3_server.access_key, secret_key=s3_server.secret_key, endpoint=s3_server.endpoint,
        virtual_addressing=False, max_retries=0, **options)


@pytest.fixture
def make_settings(s3_server) -> Callable[..., ObjectStorageSettings]:
    """Settings on a fresh bucket, or on `bucket` (which may not exist), with `options`."""
    return lambda bucket=None, **options: s3_settings(s3_server, bucket, **options)


@pytest.fixture
def settings(make_settings) -> ObjectStorageSettings:
    return make_settings()


@pytest.fixture
def storage(settings, tmp_path) -> ObjectStorage:
    storage = object_storage(settings, tmp_path / "pending")
    storage.check()
    return storage


def raw_keys(storage: ObjectStorage) -> set[str]:
    return {meta["path"] for page in obstore.list(storage.store) for meta in page}


def test_stage_publish_read_remove(storage):
    assert storage.kind == OBJECT_STORAGE
    uuid, data = new_uuid(), os.urandom(3000)
    storage.stage(uuid, data)
    assert storage.staged() == [uuid]
    assert storage.exists(uuid)
    assert list(storage.list()) == []  # staged: not listed as published
    storage.publish(uuid)
    assert storage.staged() == []
    assert storage.read(uuid) == data
    assert storage.read_range(uuid, 0, 10) == data[:10]
    assert storage.read_range(uuid, 2990, 10) == data[2990:]
    assert storage.read_range(uuid, 5, 0) == b""
    assert list(storage.list()) == [uuid]
    assert raw_keys(storage) == {f"{uuid}.dcm"}
    storage.remove(uuid)
    assert not storage.exists(uuid)
    assert list(storage.list()) == []
    storage.remove(uuid)  # gone already: no error


def test_read_range_is_one_ranged_get(storage, monkeypatch):
    uuid, data = new_uuid(), os.urandom(10_000)
    storage.stage(uuid, data)
    storage.publish(uuid)
    calls = []
    real = obstore.get_range

    def get_range(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    def get(*args, **kwargs):
        raise AssertionError("read_range read the whole object")

    monkeypatch.setattr(objects.obstore, "get_range", get_range)
    monkeypatch.setattr(objects.obstore, "get", get)
    assert storage.read_range(uuid, 4000, 1234) == data[4000:5234]
    assert calls == [{"start": 4000, "length": 1234}]


def test_create_only_never_overwrites(storage, tmp_path):
    uuid, first = new_uuid(), b"first version"
    storage.stage(uuid, first)
    with pytest.raises(InternalError, match="already staged"):  # staged, not yet published
        storage.stage(uuid, b"second")
    assert storage.staged() == [uuid]
    storage.publish(uuid)
    where = f"{storage.settings.bucket_word} {storage.settings.bucket}"
    with pytest.raises(InternalError, match=f"Object {uuid}.dcm already exists in {where}: not overwritten"):
        storage.stage(uuid, b"second")
    source = tmp_path / "source"
    source.write_bytes(b"third")
    with pytest.raises(InternalError, match="already exists"):
        storage.stage_file(uuid, source)
    large = tmp_path / "large"
    large.write_bytes(b"\0" * (objects.SINGLE_PUT_LIMIT + 1))
    with pytest.raises(InternalError, match="already exists"):  # the multipart path
        storage.stage_file(uuid, large)
    assert storage.read(uuid) == first
    assert storage.staged() == []  # the failed attempts left no marker behind
    assert list(storage.list()) == [uuid]


def test_missing_and_short_objects_are_corrupted_files(storage, settings, make_settings, tmp_path):
    uuid, word = new_uuid(), settings.bucket_word
    for read in (lambda: storage.read(uuid), lambda: storage.read_range(uuid, 0, 10),
                 lambda: storage.read_range(uuid, 0, 0)):
        with pytest.raises(CorruptedFile, match=f"Missing object {uuid}.dcm in {word} {settings.bucket}"):
            read()
    storage.stage(uuid, b"0123456789")
    storage.publish(uuid)
    with pytest.raises(CorruptedFile, match="shorter"):
        storage.read_range(uuid, 5, 10)  # ends beyond the object: no partial body
    with pytest.raises(CorruptedFile, match="shorter"):
        storage.read_range(uuid, 20, 5)  # starts beyond it (416)
    assert not storage.exists(new_uuid())
    nowhere = object_storage(make_settings("never-created"), tmp_path / "other")
    with pytest.raises(InternalError,
                       match=f"cannot read {uuid}.dcm in {word} never-created: .*(NoSuchBucket|ContainerNotFound)"):
        nowhere.read(uuid)  # a missing bucket is not a missing object


def test_staged_and_discard_after_a_restart(settings, tmp_path):
    pending = tmp_path / "pending"
    before = object_storage(settings, pending)
    kept, dropped, lost = new_uuid(), new_uuid(), new_uuid()
    before.stage(kept, b"kept")
    before.stage(dropped, b"dropped")
    before._mark(lost)  # a crash between the marker and the put: no object
    before.close()

    after = object_storage(settings, pending)  # the restart
    assert sorted(after.staged()) == sorted([kept, dropped, lost])
    after.publish(kept)
    after.discard(dropped)
    after.discard(lost)
    after.discard(lost)  # twice: no error
    assert after.staged() == []
    assert list(after.list()) == [kept]
    assert raw_keys(after) == {f"{kept}.dcm"}
    assert not after.exists(dropped)
    source = tmp_path / "copy"
    source.write_bytes(b"copy")
    uuid = new_uuid()
    assert after.stage_file(uuid, source) is False  # copied: the source stays
    assert source.read_bytes() == b"copy"
    after.unstage(uuid, source)
    assert not after.exists(uuid) and after.staged() == []


LARGE_SIZE = 32 * 1024 * 1024  # 7 parts of PART_SIZE


def stage_large_file(storage: ObjectStorage, tmp_path) -> tuple[str, Path]:
    """`stage_file` of a LARGE_SIZE file, checking that the peak RSS grows far less than that."""
    size = LARGE_SIZE
    source = tmp_path / "large"
    with open(source, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    uuid = new_uuid()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset this process's peak RSS
            f.write("5")
        peak_before = _peak_rss()
    except OSError:
        peak_before = None
    assert storage.stage_file(uuid, source) is False
    if peak_before is not None:
        grown = _peak_rss() - peak_before
        assert grown < 24 * 1024 * 1024, f"peak RSS grew by {grown >> 20} MiB for a {size >> 20} MiB upload"
    assert obstore.head(storage.store, storage.key(uuid))["size"] == size
    return uuid, source


def check_large_file(storage: ObjectStorage, uuid: str, source: Path) -> None:
    """Publish the staged large file and read it back, in ranges and whole."""
    storage.publish(uuid)
    data = source.read_bytes()
    for offset in (0, 5 * 1024 * 1024 - 3, len(data) - 100):
        assert storage.read_range(uuid, offset, 100) == data[offset:offset + 100]
    assert hashlib.md5(storage.read(uuid)).digest() == hashlib.md5(data).digest()


def test_large_stage_file_is_multipart_with_bounded_memory(make_settings, tmp_path):
    storage = object_storage(make_settings(max_connections=2), tmp_path / "pending")
    uuid, source = stage_large_file(storage, tmp_path)
    meta = obstore.head(storage.store, storage.key(uuid))
    assert meta["e_tag"].strip('"').endswith("-7")  # 7 parts of 5 MiB: a multipart upload
    check_large_file(storage, uuid, source)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens there once closed


def test_check_names_backend_bucket_and_endpoint(s3_server, tmp_path):
    def check(settings: ObjectStorageSettings) -> str:
        with pytest.raises(ConfigError) as caught:
            object_storage(settings, tmp_path / "pending").check()
        message = str(caught.value)
        assert "AWS S3 storage" in message and settings.bucket_name in message and settings.endpoint in message
        assert "\n" not in message and "Debug" not in message
        return message

    object_storage(s3_settings(s3_server), tmp_path / "pending").check()  # fine
    assert "does not exist" in check(s3_settings(s3_server, bucket="no-such-bucket"))
    wrong = s3_settings(s3_server)
    wrong = ObjectStorageSettings(**{**wrong.__dict__, "secret_key": "wrong"})
    assert "access refused, check AccessKey and SecretKey" in check(wrong)
    away = ObjectStorageSettings(**{**s3_settings(s3_server).__dict__,
                                    "endpoint": f"http://127.0.0.1:{closed_port()}"})
    assert "cannot reach the endpoint (Connection refused)" in check(away)


def test_operation_failures_are_short_internal_errors(s3_server, tmp_path):
    settings = s3_settings(s3_server, bucket="never-created")
    settings = ObjectStorageSettings(**{**settings.__dict__, "endpoint": f"http://127.0.0.1:{closed_port()}"})
    storage = object_storage(settings, tmp_path / "pending")
    uuid = new_uuid()
    for call in (lambda: storage.read(uuid), lambda: storage.read_range(uuid, 0, 1),
                 lambda: storage.exists(uuid), lambda: list(storage.list())):
        with pytest.raises(InternalError) as caught:
            call()
        assert "never-created" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(InternalError, match=f"cannot write {uuid}.dcm"):
        storage.stage(uuid, b"x")
    assert storage.staged() == [uuid]  # the put failed and so did the delete: recovery will discard


def test_legacy_layout_under_a_root_path(make_settings, tmp_path):
    settings = make_settings(root_path="/orthanc/data/", storage_structure="legacy")
    storage = object_storage(settings, tmp_path / "pending")
    storage.check()
    ours = sorted(new_uuid() for _ in range(3))
    for uuid in ours:
        storage.stage(uuid, uuid.encode())
        storage.publish(uuid)
    by_orthanc = new_uuid()  # written by an Orthanc on the same bucket
    plain = make_store(settings)  # another client on the same bucket, which knows no RootPath
    obstore.put(plain, f"orthanc/data/{by_orthanc[:2]}/{by_orthanc[2:4]}/{by_orthanc}", b"orthanc")
    foreign = {"orthanc/data/README.txt", f"orthanc/data/{U1}.dcm", f"elsewhere/01/23/{U1}"}
    for key in foreign:
        obstore.put(plain, key, b"not ours")
    assert raw_keys(storage) == {f"orthanc/data/{u[:2]}/{u[2:4]}/{u}" for u in [*ours, by_orthanc]} | foreign
    assert sorted(storage.list()) == sorted([*ours, by_orthanc])
    assert storage.read(by_orthanc) == b"orthanc"
    for uuid in ours:
        assert storage.read(uuid) == uuid.encode()
