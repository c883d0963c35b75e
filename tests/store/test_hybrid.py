"""HybridStorage: a local disk and a real S3 bucket (SeaweedFS) as Orthanc's HybridMode."""

from __future__ import annotations

import uuid as uuidlib

import pytest

from accelerator.store.hybrid import WRITE_TO_FILE_SYSTEM, WRITE_TO_OBJECT_STORAGE, HybridStorage
from accelerator.store.objects import object_storage
from accelerator.store.storage import FILE_SYSTEM, OBJECT_STORAGE, FileSystemStorage
from protocol.errors import CorruptedFile
from tests.store.test_objects import s3_settings

DATA = bytes(range(256)) * 40


@pytest.fixture(params=[WRITE_TO_FILE_SYSTEM, WRITE_TO_OBJECT_STORAGE])
def hybrid(request, s3_server, tmp_path) -> HybridStorage:
    objects = object_storage(s3_settings(s3_server), tmp_path / "pending")
    objects.check()
    storage = HybridStorage(FileSystemStorage(tmp_path / "disk"), objects, request.param)
    yield storage
    storage.close()


def _new(storage, data: bytes = DATA) -> str:
    uuid = str(uuidlib.uuid4())
    storage.stage(uuid, data)
    storage.publish(uuid)
    return uuid


def test_writes_go_to_the_side_hybrid_mode_names(hybrid):
    uuid = _new(hybrid)
    written = FILE_SYSTEM if hybrid.primary.kind == FILE_SYSTEM else OBJECT_STORAGE
    assert hybrid.where(uuid) == [written]
    assert hybrid.read(uuid) == DATA and hybrid.read_range(uuid, 100, 50) == DATA[100:150]
    assert list(hybrid.list()) == [uuid]


def test_reads_fall_back_to_the_other_side(hybrid):
    uuid = str(uuidlib.uuid4())
    hybrid.secondary.stage(uuid, DATA)  # as left there by an earlier mode, or by a move
    hybrid.secondary.publish(uuid)
    assert hybrid.where(uuid) == [hybrid.secondary.kind]
    assert hybrid.read(uuid) == DATA
    assert hybrid.read_range(uuid, 1000, 24) == DATA[1000:1024]
    assert hybrid.exists(uuid) and list(hybrid.list()) == [uuid]


def test_an_attachment_on_both_sides_is_read_from_the_primary_and_deleted_from_both(hybrid):
    uuid = _new(hybrid, b"primary")
    hybrid.secondary.stage(uuid, b"second!")
    hybrid.secondary.publish(uuid)
    assert hybrid.read(uuid) == b"primary" and len(hybrid.where(uuid)) == 2
    assert list(hybrid.list()) == [uuid]  # once
    hybrid.remove(uuid)
    assert hybrid.where(uuid) == [] and not hybrid.exists(uuid)
    with pytest.raises(CorruptedFile):
        hybrid.read(uuid)


def test_recovery_sees_what_is_staged_on_either_side(hybrid):
    on_primary, on_secondary = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    hybrid.stage(on_primary, DATA)
    hybrid.secondary.stage(on_secondary, DATA)  # a move's copy, interrupted before its publish
    assert hybrid.staged() == sorted([on_primary, on_secondary])
    hybrid.publish(on_secondary)
    hybrid.discard(on_primary)
    assert hybrid.staged() == []
    assert hybrid.where(on_secondary) == [hybrid.secondary.kind] and not hybrid.exists(on_primary)


def test_a_file_is_adopted_on_the_primary_side(hybrid, tmp_path):
    source = tmp_path / "disk" / ".staging" / "incoming"
    source.write_bytes(DATA)
    uuid = str(uuidlib.uuid4())
    moved = hybrid.stage_file(uuid, source)
    assert moved == (hybrid.primary.kind == FILE_SYSTEM)
    hybrid.publish(uuid)
    assert hybrid.where(uuid)[0] == hybrid.primary.kind and hybrid.read(uuid) == DATA
