"""ObjectStorage on a real Azure Blob service (Azurite, the session's `azure_server`).

The behaviours common to both backends are the S3 module's tests, imported and run here again with
this module's `make_settings` (an `AzureBlobStorage` container instead of a bucket); below, what
differs on Azure: how a multipart upload shows, the errors of `check()`, the emulator's connection
string, and a daemon configured with an `AzureBlobStorage` section end to end."""

from __future__ import annotations

import re
from collections.abc import Callable

import obstore
import pytest

from accelerator.api.app import open_store
from accelerator.config import config_from_dict
from accelerator.store.objects import ObjectStorageSettings, object_storage
from bench.azurite import signed_request
from protocol.errors import ConfigError
from tests.dicom_data import make_instance
from tests.store.test_objects import (  # noqa: F401  (tests and fixtures imported run here too)
    check_large_file, closed_port, new_uuid, raw_keys, stage_large_file, storage,
    test_create_only_never_overwrites, test_legacy_layout_under_a_root_path,
    test_missing_and_short_objects_are_corrupted_files, test_read_range_is_one_ranged_get,
    test_stage_publish_read_remove, test_staged_and_discard_after_a_restart)


def azure_settings(azure_server, container: str | None = None, *, connection_string: str | None = None,
                   **options) -> ObjectStorageSettings:
    return ObjectStorageSettings(
        kind="azure", connection_string=connection_string or azure_server.connection_string,
        container_name=container or azure_server.create_container(), max_retries=0, **options)


@pytest.fixture
def make_settings(azure_server) -> Callable[..., ObjectStorageSettings]:
    return lambda container=None, **options: azure_settings(azure_server, container, **options)


@pytest.fixture
def settings(make_settings) -> ObjectStorageSettings:
    return make_settings()


def test_large_stage_file_is_put_in_blocks_with_bounded_memory(azure_server, tmp_path):
    storage = object_storage(azure_settings(azure_server, max_connections=2), tmp_path / "pending")
    uuid, source = stage_large_file(storage, tmp_path)
    answer = signed_request("GET", azure_server.endpoint, f"/{storage.settings.bucket}/{storage.key(uuid)}",
                            {"comp": "blocklist", "blocklisttype": "committed"})
    assert answer.status_code == 200, answer.text
    assert len(re.findall(r"<Block>", answer.text)) == 7  # Put Block x 7 + Put Block List
    assert storage.server_md5(uuid) is None  # Azure's ETag is no MD5
    check_large_file(storage, uuid, source)


def test_check_names_backend_container_and_endpoint(azure_server, tmp_path):
    def check(settings: ObjectStorageSettings, endpoint: str = azure_server.endpoint) -> str:
        with pytest.raises(ConfigError) as caught:
            object_storage(settings, tmp_path / "pending").check()
        message = str(caught.value)
        assert message.startswith(f"Azure Blob storage: container {settings.container_name!r} at {endpoint}: ")
        assert "\n" not in message and "Debug" not in message and azure_server.account_key not in message
        return message

    object_storage(azure_settings(azure_server), tmp_path / "pending").check()  # fine
    assert "the container does not exist (404 Not Found ContainerNotFound)" in check(
        azure_settings(azure_server, "no-such-container"))
    wrong_key = azure_server.connection_string.replace(azure_server.account_key, "d3Jvbmcga2V5")
    assert "access refused, check ConnectionString (403 Forbidden AuthorizationFailure)" in check(
        azure_settings(azure_server, connection_string=wrong_key))
    away = f"http://127.0.0.1:{closed_port()}/devstoreaccount1"
    moved = azure_server.connection_string.replace(azure_server.endpoint, away)
    assert "cannot reach the endpoint (Connection refused)" in check(
        azure_settings(azure_server, "any-container", connection_string=moved), away)


def test_use_development_storage(azure_server, tmp_path, monkeypatch):
    """`UseDevelopmentStorage=true`: obstore's emulator settings (account, key, and the address
    of AZURITE_BLOB_STORAGE_URL, default 127.0.0.1:10000), and messages naming that address."""
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azure_server.endpoint.rsplit("/", 1)[0])
    settings = azure_settings(azure_server, connection_string="UseDevelopmentStorage=true")
    assert settings.endpoint_url == azure_server.endpoint
    storage = object_storage(settings, tmp_path / "pending")
    storage.check()
    uuid = new_uuid()
    storage.stage(uuid, b"emulator")
    storage.publish(uuid)
    assert storage.read(uuid) == b"emulator" and list(storage.list()) == [uuid]


def test_daemon_with_an_azure_blob_storage_section(azure_server, tmp_path):
    container = azure_server.create_container()
    config = config_from_dict({"StorageDirectory": str(tmp_path / "storage"), "AzureBlobStorage": {
        "ConnectionString": azure_server.connection_string, "ContainerName": container,
        "HybridMode": "Disabled"}})
    data = make_instance()
    store = open_store(config)
    try:
        outcome = store.ingest_bytes(data)
        assert outcome.status == "Success"
        instance = outcome.parsed.ids.instance
        assert store.read_file(instance) == data
        attachment = store.attachment(instance)
        assert store.read_range(attachment, 128, 4) == b"DICM"
    finally:
        store.close()
    assert raw_keys(object_storage(azure_settings(azure_server, container), tmp_path / "other")) == {
        f"{attachment.uuid}.dcm"}  # Orthanc's flat layout, at the container's root
    assert not any((tmp_path / "storage").rglob("*.dcm"))
    store = open_store(config)  # a restart reads it back from the container
    try:
        assert store.read_file(instance) == data
        blob = obstore.get(store.area.storage.store, f"{attachment.uuid}.dcm").bytes()
        assert bytes(blob) == data  # exactly the file, as Orthanc's plugin stores it
    finally:
        store.close()
