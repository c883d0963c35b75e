"""The push receiver: transactions created by a remote pusher (spec 3.6 to 3.9).

Stricter than the plugin where that is safe for interop:
- a plan that cannot rebuild every declared instance exactly is refused at creation (400), and so
  is one beyond `Transfers.MaxTransferInstances` / `MaxInstanceSize` / `MaxTransferSize` (400) or
  bigger than the free disk space (507, as Orthanc answers for a full storage);
- buckets are streamed to disk with bounded memory, several at once, without a global lock;
- commit verifies every MD5 and then stores all instances in one transaction, or none; a failed
  commit keeps the transaction so that the pusher can re-send buckets and commit again;
- the bytes stored are always the bytes whose MD5 was checked (see `Transaction` below);
- a transaction with a request in flight is never evicted: when all `MaxPushTransactions` slots
  have one, creation answers 503 with Retry-After; otherwise the least recently used transaction
  is evicted, as the plugin does, so that a plugin whose canceled push left a transaction behind
  (it sends no DELETE) is never refused. A transaction that receives nothing for
  `PushTransactionTimeout` seconds expires;
- transactions live on disk (plan, landed buckets, instance files) and survive a restart.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import orjson
from anyio import to_thread

from accelerator import metrics
from accelerator.store import Store
from accelerator.transfers.download import Assembly, DownloadArea, LandedLog, PayloadWriter, ensure_free_space
from protocol.chunks import scatter_ranges
from protocol.errors import (
    BadFileFormat,
    BadSequenceOfCalls,
    CorruptedFile,
    ParameterOutOfRange,
    ServiceBusy,
    UnknownResource,
)
from protocol.limits import TransferLimits
from protocol.messages import PushTransaction, bucket_size, validate_push_plan

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
DRAIN_POLL = 0.02  # seconds between checks while a commit waits for the PUTs in flight


class State(enum.Enum):
    RECEIVING = "receiving"  # PUTs are accepted
    COMMITTING = "committing"  # a commit owns it: no new PUT; it waits for those in flight
    CLOSED = "closed"  # committed, discarded, expired or evicted: no longer in the table


@dataclass
class Transaction:
    """One push transaction and what is happening to it, changed only under the receiver's lock.

    Why the stored bytes are the checked bytes: a commit first moves the transaction to
    COMMITTING (no PUT may begin), then waits until no PUT is in flight; one bucket is received
    by one request at a time (`in_flight`); and once an instance is verified, or while it is
    being verified, later PUTs leave its bytes alone (`Assembly.claim`).
    """

    id: str
    plan: PushTransaction
    area: DownloadArea
    assembly: Assembly
    total: int  # declared bytes
    last_activity: float
    state: State = State.RECEIVING
    busy: int = 0  # PUTs in flight
    in_flight: set[int] = field(default_factory=set)  # bucket indices being received
    landed: set[int] = field(default_factory=set)
    log: LandedLog | None = None  # where landed buckets are recorded, for a restart

    def remove_files(self) -> None:
        if self.log is not None:
            self.log.close()
        self.area.remove()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    @property
    def evictable(self) -> bool:
        return self.state is State.RECEIVING and not self.busy

    @property
    def missing_bytes(self) -> int:
        """Declared bytes not landed yet: what the transaction may still write to the disk."""
        return self.total - sum(bucket_size(self.plan.buckets[i]) for i in self.landed)


class PushReceiver:
    def __init__(self, store: Store, folder: Path, *, max_transactions: int, idle_timeout: float = 0,
                 limits: TransferLimits | None = None, commit_threads: int = 1, drain_timeout: float = 60):
        self.store = store
        self.folder = Path(folder)
        self.max_transactions = max_transactions
        self.idle_timeout = idle_timeout  # seconds without a request before expiry; 0 = never
        self.limits = limits or TransferLimits()
        self.commit_threads = commit_threads
        self.drain_timeout = drain_timeout  # how long a commit waits for the PUTs in flight
        self._transactions: dict[str, Transaction] = {}
        self._lock = threading.Lock()  # guards the table and the transactions' state, never held during I/O
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
            landed, _ = LandedLog(entry).read()
            tx = self._transaction(entry.name, plan, {i for i in landed if i < len(plan.buckets)})
            tx.last_activity -= max(0.0, time.time() - _last_change(entry))  # idle time before the restart
            self._transactions[entry.name] = tx
        if self._transactions:
            log.info("resumed %d push transaction(s) from disk", len(self._transactions))

    def _transaction(self, tx_id: str, plan: PushTransaction, landed: set[int]) -> Transaction:
        area = DownloadArea(self.folder / tx_id, plan.instances).create()
        return Transaction(tx_id, plan, area, Assembly(area, plan.buckets, landed=landed),
                           sum(i.size for i in plan.instances), time.monotonic(), landed=set(landed),
                           log=LandedLog(area.folder))

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._transactions)

    def get(self, tx_id: str) -> Transaction:
        with self._lock:
            tx = self._transactions.get(tx_id)
        if tx is None:
            raise UnknownResource(f"Unknown push transaction: {tx_id}")
        return tx

    # -- creation, expiry and eviction -------------------------------------------------------

    def create(self, plan: PushTransaction) -> str:
        """Check and persist a new transaction; blocking (allocates files)."""
        total = self.limits.check(plan.instances, "The push transaction")
        self.limits.check_chunks(sum(len(b) for b in plan.buckets), "The push transaction")
        validate_push_plan(plan)
        self.expire()
        self._make_room()
        with self._lock:
            pending = sum(t.missing_bytes for t in self._transactions.values())
        ensure_free_space(self.folder, total + pending)
        tx_id = str(uuidlib.uuid4())
        building = self.folder / f"{tx_id}.new"  # a crash before the rename leaves no transaction
        try:
            DownloadArea(building, plan.instances).create()
            (building / PLAN_FILE).write_bytes(orjson.dumps(plan.to_json()))
            os.replace(building, self.folder / tx_id)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        tx = self._transaction(tx_id, plan, set())
        with self._lock:
            self._transactions[tx_id] = tx
        metrics.push_created()
        return tx_id

    def _make_room(self) -> None:
        """Evict least recently used transactions until a slot is free; 503 if all are busy."""
        victims = []
        with self._lock:
            while len(self._transactions) >= self.max_transactions:
                candidates = [t for t in self._transactions.values() if t.evictable]
                if not candidates:
                    raise ServiceBusy(
                        f"All {self.max_transactions} push transactions are receiving data; retry later",
                        headers={"Retry-After": "1"})
                victim = min(candidates, key=lambda t: t.last_activity)
                victims.append(self._close(victim))
        metrics.push_aborted(len(victims))
        for victim in victims:
            log.warning("evicted push transaction %s, unused for %.0f s (MaxPushTransactions reached)",
                        victim.id, time.monotonic() - victim.last_activity)
            victim.remove_files()

    def expire(self) -> list[str]:
        """Discard the transactions that received no request for `idle_timeout` seconds."""
        if not self.idle_timeout:
            return []
        now = time.monotonic()
        with self._lock:
            expired = [self._close(t) for t in list(self._transactions.values())
                       if t.evictable and now - t.last_activity >= self.idle_timeout]
        metrics.push_aborted(len(expired))
        for tx in expired:
            log.warning("push transaction %s expired: no request for %.0f s (PushTransactionTimeout)",
                        tx.id, now - tx.last_activity)
            tx.remove_files()
        return [tx.id for tx in expired]

    async def expire_periodically(self) -> None:
        """`expire` every little while, for as long as the daemon runs (its lifespan)."""
        if not self.idle_timeout:
            return
        while True:
            await anyio.sleep(min(60.0, max(0.5, self.idle_timeout / 4)))
            await to_thread.run_sync(self.expire)

    def _close(self, tx: Transaction) -> Transaction:
        """Take `tx` out of the table (lock held); its files are the caller's to remove."""
        tx.state = State.CLOSED
        del self._transactions[tx.id]
        return tx

    # -- buckets -----------------------------------------------------------------------------

    def begin_bucket(self, tx_id: str, index_text: str) -> tuple[Transaction, int]:
        """Admit a PUT before its body is read: the transaction counts it as in flight."""
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
            if tx.state is State.CLOSED:
                raise UnknownResource(f"Unknown push transaction: {tx_id}")
            if tx.state is State.COMMITTING:
                raise BadSequenceOfCalls(f"Push transaction {tx_id} is being committed: no more buckets")
            if index in tx.in_flight:
                raise ServiceBusy(f"Bucket {index} is already being received by another request",
                                  headers={"Retry-After": "1"})
            tx.in_flight.add(index)
            tx.busy += 1
            tx.touch()
        metrics.PLUGIN.reception_started(tx.id, index)
        return tx, index

    def bucket_writer(self, tx: Transaction, index: int) -> PayloadWriter:
        """The writer for one PUT body; feed it, then `land` (blocking, worker thread)."""
        bucket = tx.plan.buckets[index]
        return tx.area.payload_writer(scatter_ranges(bucket), tx.plan.compression, bucket_size(bucket))

    def land(self, tx: Transaction, index: int, writer: PayloadWriter) -> None:
        """Check the spooled bucket's size, write it into its instances and prepare those it
        completes (blocking). Instances already verified, or being verified, keep their bytes."""
        self.assemble(tx, index, writer)
        metrics.push_bucket_received(writer.received)

    def assemble(self, tx: Transaction, index: int, writer: PayloadWriter) -> None:
        """`land` without counting the bucket as received from the network."""
        self._check_open(tx)
        instances = {chunk.instance_id for chunk in tx.plan.buckets[index] if chunk.size}
        claimed = tx.assembly.claim(instances)
        try:
            writer.finish(skip=instances - claimed)
        except BaseException:
            tx.assembly.release(claimed)
            raise
        tx.assembly.landed(index, writer.digests, claimed)
        tx.log.landed(index, writer.received)
        with self._lock:
            tx.landed.add(index)
        self._check_open(tx)  # discarded meanwhile: the pusher must not believe it landed

    def end_bucket(self, tx: Transaction, index: int) -> None:
        metrics.PLUGIN.reception_ended(tx.id, index)
        with self._lock:
            tx.busy -= 1
            tx.in_flight.discard(index)
            tx.touch()
            orphaned = tx.state is State.CLOSED and not tx.busy
        if orphaned:
            tx.remove_files()  # discarded while this PUT was running: the last one out cleans up

    def _check_open(self, tx: Transaction) -> None:
        with self._lock:
            if tx.state is State.CLOSED:
                raise UnknownResource(f"Push transaction {tx.id} was discarded while the bucket was received")

    # -- commit and discard ------------------------------------------------------------------

    async def commit(self, tx_id: str) -> int:
        """Verify every instance, then store them all at once; returns the instance count.

        No PUT may begin once the commit has started, and the commit waits (up to
        `drain_timeout`) for those in flight. On failure the transaction stays, so the pusher
        can re-send buckets and commit again.
        """
        tx = self._begin_commit(tx_id)
        try:
            with anyio.move_on_after(self.drain_timeout):
                while tx.busy:
                    await anyio.sleep(DRAIN_POLL)
            if tx.busy:  # e.g. the stalled upload of a pusher that died: retry once it is cut
                raise ServiceBusy(f"Bucket uploads of push transaction {tx_id} are still running",
                                  headers={"Retry-After": "1"})
            count = await to_thread.run_sync(self._store, tx)
        except BaseException:
            with self._lock:
                if tx.state is State.COMMITTING:
                    tx.state = State.RECEIVING
                    tx.touch()
            raise
        tx.remove_files()
        return count

    def _begin_commit(self, tx_id: str) -> Transaction:
        tx = self.get(tx_id)
        with self._lock:
            if tx.state is State.CLOSED:
                raise UnknownResource(f"Unknown push transaction: {tx_id}")
            if tx.state is State.COMMITTING:
                raise ServiceBusy(f"Push transaction {tx_id} is already being committed",
                                  headers={"Retry-After": "1"})
            tx.state = State.COMMITTING
            tx.touch()
        return tx

    def _store(self, tx: Transaction) -> int:
        """Verify and store (blocking); closes the transaction when its instances are stored."""
        started = time.monotonic()
        bad = tx.assembly.settle(self.commit_threads)
        if bad:
            shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise CorruptedFile(f"Bad MD5 sum in {len(bad)} transferred DICOM instance(s): {shown}")
        try:
            self.store.ingest_files(tx.assembly.files(), origin="Plugins")
        except BadFileFormat as exc:
            raise CorruptedFile(f"Cannot import a transferred DICOM instance: {exc}") from exc
        with self._lock:
            self._close(tx)
        metrics.push_committed(time.monotonic() - started)
        return len(tx.plan.instances)

    def discard(self, tx_id: str) -> None:
        """DELETE: the transaction is gone at once; PUTs in flight end with 404."""
        tx = self.get(tx_id)
        with self._lock:
            if tx.state is State.CLOSED:
                raise UnknownResource(f"Unknown push transaction: {tx_id}")
            if tx.state is State.COMMITTING:
                raise BadSequenceOfCalls(f"Push transaction {tx_id} is being committed")
            self._close(tx)
            idle = not tx.busy
        metrics.push_aborted()
        if idle:
            tx.remove_files()


def _last_change(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for name in (PLAN_FILE, LandedLog.NAME):
        try:
            times.append((folder / name).stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)
