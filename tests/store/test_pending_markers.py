"""Replicas keep the markers of staged objects in the shared index, so that any replica settles
what a dead one left: an object whose index row exists stays, the others go (real PostgreSQL and
a real S3 server)."""

from __future__ import annotations

import time
import uuid

import obstore
import pytest

from accelerator.api.app import open_store
from accelerator.config import config_from_dict
from accelerator.store.objects import ObjectStorage
from accelerator.store.pending import IndexMarkers
from tests.conftest import object_storage_section, postgresql_section
from tests.dicom_data import make_instance


@pytest.fixture
def replica_config(tmp_path, postgres_server, s3_server):
    shared = {**postgresql_section(postgres_server, Lock=False), **object_storage_section(s3_server)}
    return lambda name: config_from_dict({"StorageDirectory": str(tmp_path / name), **shared})


def objects_of(store) -> ObjectStorage:
    storage = store.area.storage
    assert isinstance(storage, ObjectStorage) and isinstance(storage.markers, IndexMarkers)
    return storage


def test_a_replica_settles_what_a_dead_replica_left_staged(replica_config):
    dead = open_store(replica_config("dead"))
    objects = objects_of(dead)
    orphan = str(uuid.uuid4())  # staged, never committed: the replica died before its commit
    objects.stage(orphan, b"bytes nobody will ever index")
    outcome = dead.ingest_bytes(make_instance(sop_uid="1.2.3.4.5"))  # committed normally
    landed = dead.attachment(outcome.parsed.ids.instance).uuid
    objects.markers.mark(landed)  # as if its commit's answer was lost before the publish
    recent = str(uuid.uuid4())
    objects.stage(recent, b"staged a moment ago by a live replica")
    for name in (orphan, landed):  # an hour later, as it were
        dead.index.clear_pending([name])
        dead.index.mark_pending(name, time.time() - 7200)
    dead.index.close()  # no clean stop: its markers stay in the index

    survivor = open_store(replica_config("survivor"))  # recovers at start
    objects = objects_of(survivor)
    assert not objects.exists(orphan)  # not committed: gone
    assert objects.exists(landed) and not objects.is_staged(landed)  # committed: kept, settled
    assert survivor.read_file(outcome.parsed.ids.instance)
    assert objects.exists(recent) and objects.is_staged(recent)  # may be a live replica's: left alone
    survivor.close()


def test_a_discard_after_a_commit_whose_answer_was_lost_keeps_the_object(replica_config):
    store = open_store(replica_config("one"))
    objects = objects_of(store)
    outcome = store.ingest_bytes(make_instance(sop_uid="1.2.3.4.6"))
    name = store.attachment(outcome.parsed.ids.instance).uuid
    objects.markers.mark(name)
    objects.discard(name)  # what the store does when the commit seemed to fail
    assert objects.exists(name) and not objects.is_staged(name)
    assert store.read_file(outcome.parsed.ids.instance)
    key = objects.key(name)
    assert obstore.head(objects.store, key)["size"] > 0
    store.close()
