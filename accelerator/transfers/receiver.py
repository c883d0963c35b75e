"""The push receiver: transactions created by a remote pusher (spec 3.6 to 3.9).

Stricter than the plugin where that is safe for interop:
- a plan that cannot rebuild every declared instance exactly is refused at creation (400);
- buckets are streamed to disk with bounded memory, several at once, without a global lock;
- commit verifies every MD5 and then stores all instances in one transaction, or none; a failed
  commit keeps the transaction so that the pusher can re-send buckets and commit again;
- a transaction that received data within `HttpTimeout` seconds is never evicted: when all
  `MaxPushTransactions` slots are live, creation answers 503 with Retry-After;
- transactions live on disk (plan + instance files) and survive a restart.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from accelerator.store import Store
from accelerator.transfers.download import Assembly, DownloadArea, PayloadWriter
from protocol.chunks import scatter_ranges
from protocol.errors import BadFileFormat, CorruptedFile, ParameterOutOfRange, ServiceBusy, UnknownResource
from protocol.messages import PushTransaction, bucket_size, validate_push_plan

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"


@dataclass
class Transaction:
    id: str
    plan: PushTransaction
    area: DownloadArea
    assembly: Assembly
    last_activity: float
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by a commit
    busy: int = 0  # PUTs in progress

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class PushReceiver:
    def __init__(self, store: Store, folder: Path, *, max_transactions: int, idle_timeout: float,
                 commit_threads: int = 1):
        self.store = store
        self.folder = Path(folder)
        self.max_transactions = max_transactions
        self.idle_timeout = idle_timeout
        self.commit_threads = commit_threads
        self._transactions: dict[str, Transaction] = {}
        self._lock = threading.Lock()  # guards the dict only, never held during I/O
        self.folder.mkdir(parents=True, exist_ok=True)
        self._reload()

    def _reload(self) -> None:
        for entry in sorted(self.folder.iterdir()):
            plan_path = entry / PLAN_FILE
            if not plan_path.is_file():
                shutil.rmtree(entry, ignore_errors=True)  # creation interrupted before its plan
                continue
            try:
                plan = PushTransaction.from_json(orjson.loads(plan_path.read_bytes()))
            except (BadFileFormat, orjson.JSONDecodeError, ValueError) as exc:
                log.warning("dropping unreadable push transaction %s: %s", entry.name, exc)
                shutil.rmtree(entry, ignore_errors=True)
                continue
            area = DownloadArea(entry, plan.instances).create()
            self._transactions[entry.name] = Transaction(
                entry.name, plan, area, Assembly(area, plan.buckets), time.monotonic())
        if self._transactions:
            log.info("resumed %d push transaction(s) from disk", len(self._transactions))

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._transactions)

    # -- creation ----------------------------------------------------------------------------

    def create(self, plan: PushTransaction) -> str:
        """Persist a new transaction; blocking (allocates files)."""
        validate_push_plan(plan)
        self._make_room()
        tx_id = str(uuidlib.uuid4())
        building = self.folder / f"{tx_id}.new"  # a crash before the rename leaves no transaction
        DownloadArea(building, plan.instances).create()
        (building / PLAN_FILE).write_bytes(orjson.dumps(plan.to_json()))
        os.replace(building, self.folder / tx_id)
        area = DownloadArea(self.folder / tx_id, plan.instances)
        with self._lock:
            self._transactions[tx_id] = Transaction(
                tx_id, plan, area, Assembly(area, plan.buckets), time.monotonic())
        return tx_id

    def _make_room(self) -> None:
        with self._lock:
            while len(self._transactions) >= self.max_transactions:
                now = time.monotonic()
                idle = [t for t in self._transactions.values()
                        if not t.busy and not t.lock.locked() and now - t.last_activity >= self.idle_timeout]
                if not idle:
                    oldest = min(t.last_activity for t in self._transactions.values())
                    wait = max(1, int(self.idle_timeout - (now - oldest)) + 1)
                    raise ServiceBusy(
                        f"All {self.max_transactions} push transactions are receiving data; retry later",
                        headers={"Retry-After": str(wait)},
                    )
                victim = min(idle, key=lambda t: t.last_activity)
                del self._transactions[victim.id]
                log.warning("evicted idle push transaction %s (MaxPushTransactions reached)", victim.id)
                victim.area.remove()

    # -- buckets -----------------------------------------------------------------------------

    def get(self, tx_id: str) -> Transaction:
        with self._lock:
            tx = self._transactions.get(tx_id)
        if tx is None:
            raise UnknownResource(f"Unknown push transaction: {tx_id}")
        return tx

    def begin_bucket(self, tx_id: str, index_text: str) -> tuple[Transaction, int]:
        """Check a PUT's target before its body is read; marks the transaction busy."""
        tx = self.get(tx_id)
        try:
            index = int(index_text)
        except ValueError:
            raise UnknownResource(f"Bad bucket index: {index_text!r}") from None
        if index >= 2**64:
            raise UnknownResource(f"Bucket index out of range: {index_text}")  # overflows size_t, as in the plugin
        if index >= len(tx.plan.buckets):
            raise ParameterOutOfRange(
                f"Bucket index {index} out of range: the transaction has {len(tx.plan.buckets)} bucket(s)")
        with self._lock:
            tx.busy += 1
        tx.touch()
        return tx, index

    def bucket_writer(self, tx: Transaction, index: int) -> PayloadWriter:
        """The writer for one PUT body; feed it, then `finish` (blocking, worker thread)."""
        bucket = tx.plan.buckets[index]
        return tx.area.payload_writer(scatter_ranges(bucket), tx.plan.compression, bucket_size(bucket))

    def landed(self, tx: Transaction, index: int, writer: PayloadWriter) -> None:
        """A bucket was written: prepare the instances it completes (blocking)."""
        tx.assembly.landed(index, writer.digests)

    def end_bucket(self, tx: Transaction) -> None:
        tx.touch()
        with self._lock:
            tx.busy -= 1

    # -- commit and discard ------------------------------------------------------------------

    def commit(self, tx_id: str) -> int:
        """Verify every instance, then store them all at once; returns the instance count.

        On failure the transaction stays, so the pusher can re-send buckets and commit again.
        """
        tx = self.get(tx_id)
        with tx.lock:
            if self._transactions.get(tx_id) is not tx:
                raise UnknownResource(f"Unknown push transaction: {tx_id}")  # committed meanwhile
            tx.touch()
            bad = tx.assembly.settle(self.commit_threads)
            if bad:
                shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
                raise CorruptedFile(f"Bad MD5 sum in {len(bad)} transferred DICOM instance(s): {shown}")
            try:
                self.store.ingest_files(tx.assembly.files(), origin="Plugins")
            except BadFileFormat as exc:
                raise CorruptedFile(f"Cannot import a transferred DICOM instance: {exc}") from exc
            with self._lock:
                self._transactions.pop(tx_id, None)
            tx.area.remove()
            return len(tx.plan.instances)

    def discard(self, tx_id: str) -> None:
        tx = self.get(tx_id)
        with tx.lock:
            with self._lock:
                if self._transactions.pop(tx_id, None) is None:
                    raise UnknownResource(f"Unknown push transaction: {tx_id}")
            tx.area.remove()
