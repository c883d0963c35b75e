"""The push receiver of replicas: a push transaction that any replica can continue and commit.

The plugin keeps a push transaction in one process's memory and temporary files, so behind a load
balancer without stickiness a bucket routed to another server gets 404 and the transfer fails.
Here every piece of a transaction that another replica may need lives in the shared object
storage, under `transfers/push/<id>/`:

- `plan.json`, written at creation: any replica that meets an unknown transaction ID loads it
  from there and opens its own local copy of the transaction;
- `bucket-<index>`: a bucket's body as received (still encoded), written once the receiving
  replica has decoded it into its instances, so it is known to be whole and to decode.

Each replica otherwise works as the single daemon does (`PushReceiver`: its local files, its MD5
checks, its state machine). At commit, the committing replica first brings the buckets that
landed on other replicas from the object storage into its local copy, then verifies every
instance and stores them all at once in the shared index (idempotent on the Orthanc IDs: two
replicas committing the same transaction store each instance once). The shared objects go at
commit, at DELETE, or after `PushTransactionTimeout` without a new object (any replica sweeps).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from accelerator.store import Store
from accelerator.store.objects import ObjectStorage
from accelerator.transfers.download import PayloadWriter
from accelerator.transfers.receiver import PLAN_FILE, PushReceiver, Transaction
from protocol.chunks import scatter_ranges
from protocol.errors import BadFileFormat, UnknownResource
from protocol.messages import PushTransaction, bucket_size

log = logging.getLogger(__name__)

PREFIX = "transfers/push"
PLAN = "plan.json"
BUCKET = "bucket-"
SWEEP_INTERVAL = 60.0  # seconds between two sweeps of the shared transactions


class RecordingWriter:
    """A bucket's `PayloadWriter` that also keeps the body as received, for the shared copy.
    The route bounds the body by the bucket's declared size before it gets here."""

    def __init__(self, inner: PayloadWriter):
        self.inner = inner
        self.parts: list[bytes] = []

    def feed(self, piece: bytes) -> None:
        self.parts.append(bytes(piece))
        self.inner.feed(piece)

    def body(self) -> bytes:
        return b"".join(self.parts)

    def __getattr__(self, name: str):  # received, digests, finish, close...
        return getattr(self.inner, name)


class SharedPushReceiver(PushReceiver):
    def __init__(self, store: Store, folder: Path, objects: ObjectStorage, **options):
        self.objects = objects
        self._swept = 0.0
        self._adopting = threading.Lock()  # one local copy per transaction, made once
        super().__init__(store, folder, **options)

    @staticmethod
    def _name(tx_id: str, leaf: str) -> str:
        return f"{PREFIX}/{tx_id}/{leaf}"

    # -- a transaction begun on another replica ----------------------------------------------

    def get(self, tx_id: str) -> Transaction:
        try:
            return super().get(tx_id)
        except UnknownResource:
            if not _looks_like_id(tx_id):
                raise
        body = self.objects.get_blob(self._name(tx_id, PLAN))
        if body is None:
            raise UnknownResource(f"Unknown push transaction: {tx_id}")
        try:
            plan = PushTransaction.from_json(orjson.loads(body))
        except (BadFileFormat, orjson.JSONDecodeError, ValueError) as exc:
            raise UnknownResource(f"Push transaction {tx_id} is unreadable: {exc}") from None
        return self._adopt(tx_id, plan)

    def _adopt(self, tx_id: str, plan: PushTransaction) -> Transaction:
        """This replica's local copy of a transaction created elsewhere. Two requests meeting it
        at once make it once (the second would otherwise recreate the files the first writes
        into); only adoptions wait on that lock, never the requests of known transactions."""
        with self._adopting:
            with self._lock:
                known = self._transactions.get(tx_id)
            if known is not None:
                return known
            tx = self._transaction(tx_id, plan, set())
            (tx.area.folder / PLAN_FILE).write_bytes(orjson.dumps(plan.to_json()))  # kept across a restart
            with self._lock:
                self._transactions[tx_id] = tx
        log.info("push transaction %s continues on this replica", tx_id)
        return tx

    # -- creation, buckets, commit, discard --------------------------------------------------

    def create(self, plan: PushTransaction) -> str:
        tx_id = super().create(plan)
        try:
            self.objects.put_blob(self._name(tx_id, PLAN), orjson.dumps(plan.to_json()))
        except BaseException:
            super().discard(tx_id)
            raise
        return tx_id

    def bucket_writer(self, tx: Transaction, index: int) -> RecordingWriter:
        return RecordingWriter(super().bucket_writer(tx, index))

    def land(self, tx: Transaction, index: int, writer: RecordingWriter) -> None:
        super().land(tx, index, writer)
        self.objects.put_blob(self._name(tx.id, f"{BUCKET}{index}"), writer.body())  # whole, and it decodes

    def _store(self, tx: Transaction) -> int:
        self._gather(tx)
        count = super()._store(tx)
        self._remove_shared(tx.id)
        return count

    def _gather(self, tx: Transaction) -> None:
        """Bring the buckets that landed on other replicas into the local copy (blocking)."""
        landed_elsewhere = {int(name.rsplit("-", 1)[1]) for name, _ in self.objects.list_blobs(f"{PREFIX}/{tx.id}/")
                            if name.rsplit("/", 1)[-1].startswith(BUCKET)}
        for index in sorted(landed_elsewhere - tx.landed):
            if index >= len(tx.plan.buckets):
                continue
            body = self.objects.get_blob(self._name(tx.id, f"{BUCKET}{index}"))
            if body is None:
                continue  # gone meanwhile: its instances fail their MD5 and the pusher re-sends
            bucket = tx.plan.buckets[index]
            writer = tx.area.payload_writer(scatter_ranges(bucket), tx.plan.compression, bucket_size(bucket))
            try:
                writer.feed(body)
                self.assemble(tx, index, writer)  # received by another replica: counted there
            finally:
                writer.close()

    def discard(self, tx_id: str) -> None:
        super().discard(tx_id)
        self._remove_shared(tx_id)

    def _remove_shared(self, tx_id: str) -> None:
        for name, _ in self.objects.list_blobs(f"{PREFIX}/{tx_id}/"):
            self.objects.delete_blob(name)

    # -- expiry ------------------------------------------------------------------------------

    def expire(self) -> list[str]:
        expired = super().expire()
        if self.idle_timeout and time.monotonic() - self._swept >= SWEEP_INTERVAL:
            self._swept = time.monotonic()
            self._sweep(time.time)
        return expired

    def _sweep(self, now: Callable[[], float]) -> None:
        """Remove the shared objects of transactions without a new object for `idle_timeout`."""
        newest: dict[str, float] = {}
        for name, modified in self.objects.list_blobs(f"{PREFIX}/"):
            tx_id = name[len(PREFIX) + 1:].split("/", 1)[0]
            newest[tx_id] = max(newest.get(tx_id, 0.0), modified)
        for tx_id, modified in newest.items():
            if now() - modified >= self.idle_timeout and tx_id not in self.ids():
                log.warning("shared push transaction %s expired: no bucket for %.0f s", tx_id, now() - modified)
                self._remove_shared(tx_id)


def _looks_like_id(text: str) -> bool:
    return 30 <= len(text) <= 40 and all(c in "0123456789abcdef-" for c in text)
