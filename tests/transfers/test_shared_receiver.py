"""The push receiver of replicas, in process: two replicas (each its own store, both on one
PostgreSQL index and one S3 bucket) share a transaction through the object storage."""

from __future__ import annotations

import threading
import time

import pytest

from accelerator.api.app import create_app, open_store
from accelerator.config import config_from_dict
from accelerator.transfers.shared_receiver import SharedPushReceiver
from tests.conftest import object_storage_section, postgresql_section
from tests.transfers.test_receiver import _one_instance_plan


@pytest.fixture
def replicas(tmp_path, postgres_server, s3_server):
    shared = {**postgresql_section(postgres_server, Lock=False), **object_storage_section(s3_server)}
    made = []
    for name in ("a", "b"):
        config = config_from_dict({"StorageDirectory": str(tmp_path / name), **shared})
        store = open_store(config)
        made.append((store, create_app(config, store).state.receiver))
    yield made
    for store, _ in made:
        store.close()


def test_replicas_use_the_shared_receiver(replicas):
    assert all(isinstance(receiver, SharedPushReceiver) for _, receiver in replicas)


def test_many_requests_meeting_a_transaction_at_once_adopt_it_once(replicas):
    (_, a), (_, b) = replicas
    _, plan, _ = _one_instance_plan(buckets=4)
    tx_id = a.create(plan)
    barrier = threading.Barrier(8)
    seen = []
    made = []
    make = b._transaction

    def slow_make(*args):  # widen the window in which a second request could make it again
        made.append(args[0])
        time.sleep(0.05)
        return make(*args)

    b._transaction = slow_make

    def meet() -> None:
        barrier.wait()
        seen.append(b.get(tx_id))

    threads = [threading.Thread(target=meet) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(seen) == 8 and all(tx is seen[0] for tx in seen)
    assert made == [tx_id]  # its local files were made once


def test_buckets_landed_on_two_replicas_commit_on_either(replicas):
    (store_a, a), (store_b, b) = replicas
    data, plan, pieces = _one_instance_plan(buckets=4)
    tx_id = a.create(plan)
    for index, piece in enumerate(pieces):
        receiver = a if index % 2 == 0 else b
        tx, _ = receiver.begin_bucket(tx_id, str(index))
        writer = receiver.bucket_writer(tx, index)
        try:
            writer.feed(piece)
            receiver.land(tx, index, writer)
        finally:
            writer.close()
            receiver.end_bucket(tx, index)
    import anyio

    assert anyio.run(b.commit, tx_id) == 1
    instance = plan.instances[0].id
    assert store_a.read_file(instance) == data == store_b.read_file(instance)
    assert b.objects.list_blobs(f"transfers/push/{tx_id}/") == []
