"""The Replicate job: copy every selected instance from a source to a target, skip what the target
already holds with the same MD5, check every instance at the end, resume where it stopped.

The steps, each saved in the job's checkpoint so that a pause, a crash or a restart of the daemon
resumes rather than restarts:

1. **Plan**: list the source's instances (ID, size, MD5, parents) and ask the target for the MD5s
   of those it holds: equal ones are skipped, never sent to find out.
2. **Copy**, by the fastest way the two ends allow:
   - to a peer that speaks the transfers protocol (a plugin, or another accelerator, maybe a
     gateway): batches are gathered into our store (read from the source, many at once, checked
     by MD5) and pushed in buckets, the next batch gathered while this one is pushed;
   - from such a peer: batches are pulled into our store, then written to the target if it is
     not our store;
   - otherwise (plain Orthanc or storage folder to plain Orthanc or our store): instance by
     instance, many at once.
   After a resume, what the target got before the interruption is found by asking its MD5s
   again, and a batch's push or pull continues its own transfer (its checkpoint is kept here).
3. **Check**: the target's MD5 of every instance, and its series and instance counts of every
   study. An instance counts as copied only once the target holds it with the source's MD5; a
   target that stores asynchronously (a gateway forwarding to its Orthanc) is given time.

Each instance that cannot be copied is reported with its reason (gone from the source, changed
on the source, refused by the target...) and the job fails after copying all the others;
resubmitting it, or resuming it after a pause or a restart, tries those again. With `Follow`, the job then watches the source's `/changes` and copies what
arrives, until it is paused or cancelled.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio import to_thread

from accelerator.jobs.base import JobContext, JobFailure
from accelerator.replication.ends import InstanceEntry, Selection
from accelerator.replication.local import LocalStore
from accelerator.replication.subjob import SUB, SubContext
from accelerator.transfers.workers import run_pool
from protocol.errors import OrthancError, UnknownResource
from protocol.messages import Resource, TransferQuery, size_mb

log = logging.getLogger(__name__)

JOB_TYPE = "Replicate"
WORKERS = 16  # instances read and written at once on a per-instance copy
BATCH_MIN = 32 * 1024 * 1024  # bytes of a batch gathered for one push or pull
BATCH_MAX = 512 * 1024 * 1024
BATCHES = 6  # a replication is cut into about this many batches (within the bounds above)
SAVE_INTERVAL = 1.0  # seconds between two saves of a per-instance copy's progress
VERIFY_PATIENCE = 60.0  # seconds a check waits for a target that is still storing, without progress
VERIFY_POLL = 0.25  # seconds between two questions to a target that is still storing
FOLLOW_POLL = 2.0  # seconds between two looks at the source's /changes
FAILED_SHOWN = 100  # failed instances listed in the job's Content (all are counted)
PUSHES_AT_ONCE = 2  # batches pushed at once: one sends while the other is committed
IN_FLIGHT = "InFlight"  # checkpoint key: number -> {"Instances", "Transfer": the batch's checkpoint}


@dataclass
class EndKinds:
    """How the ends are reached, which decides the way of copying."""

    source: str  # "Self", "Orthanc", "Peer", "Folder"
    target: str
    target_peer: str | None = None
    source_peer: str | None = None


class Progress:
    """What a pass has done, as saved in the checkpoint and shown in the job's Content."""

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self.entries = [InstanceEntry.from_json(e) for e in state["Entries"]]
        self.by_id = {e.id: e for e in self.entries}
        self.skipped: set[str] = set(state["Skipped"])
        self.copied: set[str] = set(state["Copied"])
        self.failed: dict[str, str] = dict(state["Failed"])
        self.bytes = int(state["Bytes"])
        self.started = time.monotonic()
        self.bytes_at_start = self.bytes

    def pending(self) -> list[InstanceEntry]:
        return [e for e in self.entries if e.id not in self.skipped and e.id not in self.copied
                and e.id not in self.failed]

    def copy_done(self, entry: InstanceEntry) -> None:
        self.copied.add(entry.id)
        self.bytes += entry.size

    def fail(self, instance_id: str, reason: str) -> None:
        self.copied.discard(instance_id)
        self.skipped.discard(instance_id)
        self.failed[instance_id] = reason

    def checkpoint(self) -> dict[str, Any]:
        return dict(self.state, Skipped=sorted(self.skipped), Copied=sorted(self.copied),
                    Failed=dict(self.failed), Bytes=self.bytes)

    @property
    def fraction(self) -> float:
        done = len(self.skipped) + len(self.copied) + len(self.failed)
        return done / max(1, len(self.entries)) * 0.98

    def content(self, phase: str) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.started)
        failed = [{"ID": i, "Reason": r} for i, r in sorted(self.failed.items())[:FAILED_SHOWN]]
        return {"Phase": phase, "Instances": len(self.entries), "Copied": len(self.copied),
                "Skipped": len(self.skipped), "Failed": len(self.failed), "FailedInstances": failed,
                "CopiedBytes": self.bytes, "CopiedSizeMB": size_mb(self.bytes),
                "TotalSizeMB": size_mb(sum(e.size for e in self.entries)),
                "SpeedMBs": round((self.bytes - self.bytes_at_start) / elapsed / 1e6, 2)}


def levels(entries: Iterable[InstanceEntry]) -> dict[str, int]:
    items = list(entries)
    return {"Patients": len({e.patient for e in items}), "Studies": len({e.study for e in items}),
            "Series": len({e.series for e in items}), "Instances": len(items)}


def batches(entries: list[InstanceEntry]) -> list[list[InstanceEntry]]:
    """Consecutive batches of about 1/`BATCHES` of the bytes each (within the bounds), the first
    and the last ones a quarter of that: the first push starts after a short gathering, and
    what is left after the last commit (the target storing it: a gateway forwards it to its
    Orthanc) is short too."""
    total = sum(e.size for e in entries)
    full = min(BATCH_MAX, max(BATCH_MIN, total // BATCHES + 1))
    small = max(BATCH_MIN // 4, full // 4)
    cut: list[list[InstanceEntry]] = []
    current: list[InstanceEntry] = []
    size = done = 0
    for entry in entries:
        limit = small if not cut or total - done <= full else full
        if current and size + entry.size > limit:
            cut.append(current)
            current, size = [], 0
            limit = small if total - done <= full else full
        current.append(entry)
        size += entry.size
        done += entry.size
    if current:
        cut.append(current)
    return cut


def batch_query(query: dict[str, Any], instance_ids: list[str], peer: str) -> dict[str, Any]:
    """The pull or push query of one batch: its instances, with the replication's compression."""
    transfer = TransferQuery(resources=tuple(Resource("Instance", i) for i in instance_ids), peer=peer,
                             compression=query.get("Compression", "gzip")).to_json()
    transfer["SkipStoredInstances"] = True  # a pull does not fetch what our store holds already
    return transfer


class ReplicateDriver:
    """One driver for every Replicate job. `open_ends(query)` gives (source, target, kinds)."""

    def __init__(self, *, store, open_ends, pull_driver, push_driver, workers: int = WORKERS,
                 verify_patience: float = VERIFY_PATIENCE):
        self.local = LocalStore(store)
        self.open_ends = open_ends
        self.pull_driver = pull_driver
        self.push_driver = push_driver
        self.workers = workers
        self.verify_patience = verify_patience

    async def run(self, ctx: JobContext) -> None:
        query = ctx.query
        source, target, kinds = await self.open_ends(query)
        try:
            seq = await self._changes_seq(source, kinds) if query.get("Follow") else None
            while True:
                failures = await self._pass(ctx, query, source, target, kinds)
                if not query.get("Follow"):
                    if failures:
                        raise JobFailure(failures)
                    return
                seq = await self._wait_for_changes(ctx, source, kinds, seq)
                await ctx.save({}, content={"Phase": "Planning"})
        finally:
            await source.aclose()
            await target.aclose()

    # -- one pass ----------------------------------------------------------------------------

    async def _pass(self, ctx: JobContext, query: dict, source, target, kinds: EndKinds) -> str | None:
        state = ctx.checkpoint or {}
        fresh = "Entries" not in state
        if fresh:
            state = await self._plan(ctx, query, source, target)
        progress = Progress(state)
        if not fresh:
            progress.failed.clear()  # resumed: instances that failed before are tried again
        pending = progress.pending()
        if pending and not fresh:  # resumed: what the target got before the interruption is done
            held = await self._held(target, pending)
            for entry in pending:
                if held.get(entry.id) == entry.md5:
                    progress.copy_done(entry)
            await ctx.save(progress.checkpoint(), content=progress.content("Copying"), progress=progress.fraction)
            pending = progress.pending()
        if kinds.target == "Peer":
            await self._by_push(ctx, progress, source, kinds)
        elif kinds.source == "Peer":
            await self._by_pull(ctx, progress, target, kinds)
        else:
            await self._copy(ctx, progress, source, target, pending)
        return await self._check(ctx, progress, target, kinds)

    async def _plan(self, ctx: JobContext, query: dict, source, target) -> dict[str, Any]:
        await ctx.save(None, content={"Phase": "Planning", "Source": query.get("SourceName"),
                                      "Target": query.get("TargetName")}, progress=0.0)
        selection = Selection(dict(query.get("Selection") or {}))
        try:
            entries = await source.entries(selection)
        except OrthancError as exc:
            raise JobFailure(f"cannot list the instances of the source: {exc.details or exc}") from exc
        held = await self._held(target, entries)
        state = {"Entries": [e.to_json() for e in entries],
                 "Skipped": sorted(e.id for e in entries if held.get(e.id) == e.md5),
                 "Copied": [], "Failed": {}, "Bytes": 0, "Levels": levels(entries)}
        progress = Progress(state)
        await ctx.save(progress.checkpoint(), content=dict(progress.content("Copying"), Levels=state["Levels"]),
                       progress=progress.fraction)
        return state

    @staticmethod
    async def _held(target, entries: Iterable[InstanceEntry], *, settled: bool = False) -> dict[str, str]:
        """MD5s of what the target holds; `settled`: holds for good (a gateway's Orthanc, not
        what the gateway has received and not yet forwarded)."""
        ask = getattr(target, "settled_md5s", target.md5s) if settled else target.md5s
        try:
            return await ask(e.id for e in entries)
        except OrthancError as exc:
            raise JobFailure(f"cannot ask the target which instances it holds: {exc.details or exc}") from exc

    # -- per-instance copy -------------------------------------------------------------------

    async def _copy(self, ctx: JobContext, progress: Progress, source, target, pending: list[InstanceEntry]) -> None:
        """Read, check and write each instance, `workers` at once."""
        last_save = time.monotonic()

        async def copy_one(position: int) -> None:
            nonlocal last_save
            entry = pending[position]
            reason = await self._transfer_one(source, target, entry)
            if reason is None:
                progress.copy_done(entry)
            else:
                progress.fail(entry.id, reason)
            if time.monotonic() - last_save >= SAVE_INTERVAL:
                last_save = time.monotonic()
                await ctx.save(progress.checkpoint(), content=progress.content("Copying"),
                               progress=progress.fraction)
            else:
                ctx.report(content=progress.content("Copying"), progress=progress.fraction)

        await run_pool(range(len(pending)), self.workers, copy_one)
        await ctx.save(progress.checkpoint(), content=progress.content("Copying"), progress=progress.fraction)

    @staticmethod
    async def _transfer_one(source, target, entry: InstanceEntry) -> str | None:
        """None once the target has taken the instance, else why not."""
        try:
            data = await source.read(entry.id)
        except UnknownResource:
            return "deleted from the source during the replication"
        except OrthancError as exc:
            return f"cannot read it from the source: {exc.details or exc}"
        digest = await to_thread.run_sync(lambda: hashlib.md5(data).hexdigest())
        if digest != entry.md5:
            return f"changed on the source during the replication (MD5 {digest}, listed {entry.md5})"
        try:
            await target.write(entry.id, data)
        except OrthancError as exc:
            return f"refused by the target: {exc.details or exc}"
        return None

    # -- through the transfers protocol ------------------------------------------------------

    async def _gather(self, progress: Progress, source, batch: list[InstanceEntry]) -> list[InstanceEntry]:
        """Bring a batch into our store (what is there already stays); the instances ready."""
        held = await self.local.md5s(e.id for e in batch)
        missing = [e for e in batch if held.get(e.id) != e.md5]

        async def gather_one(position: int) -> None:
            entry = missing[position]
            reason = await self._transfer_one(source, self.local, entry)
            if reason is not None:
                progress.fail(entry.id, reason)

        await run_pool(range(len(missing)), self.workers, gather_one)
        return [e for e in batch if e.id not in progress.failed]

    async def _by_push(self, ctx: JobContext, progress: Progress, source, kinds: EndKinds) -> None:
        """Batches gathered into our store and pushed, `PUSHES_AT_ONCE` at a time, the next one
        gathered meanwhile: the link never waits for a receiver's commit nor for a gathering."""
        plan = self._resumed_batches(progress)
        if not plan:
            return
        send, receive = anyio.create_memory_object_stream[list[InstanceEntry]](1)
        slots = anyio.Semaphore(PUSHES_AT_ONCE)

        async def gather_all() -> None:
            async with send:
                for batch in plan:
                    ready = await self._gather(progress, source, batch) if kinds.source != "Self" else batch
                    await send.send(ready)

        async def push(batch: list[InstanceEntry]) -> None:
            try:
                await self._transfer_batch(ctx, progress, batch, kinds.target_peer, self.push_driver)
            finally:
                slots.release()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(gather_all)
            async with receive, anyio.create_task_group() as pushes:
                async for ready in receive:
                    if ready:
                        await slots.acquire()
                        pushes.start_soon(push, ready)
            tasks.cancel_scope.cancel()

    @staticmethod
    def _resumed_batches(progress: Progress) -> list[list[InstanceEntry]]:
        """The batches left: first those whose transfer was interrupted (each goes on with its
        own transfer), then the rest, cut anew."""
        pending = progress.pending()
        flying = [set(b["Instances"]) for b in progress.state.get(IN_FLIGHT, {}).values()]
        resumed = [[e for e in pending if e.id in ids] for ids in flying]
        taken = set().union(*flying) if flying else set()
        return [b for b in resumed if b] + batches([e for e in pending if e.id not in taken])

    async def _by_pull(self, ctx: JobContext, progress: Progress, target, kinds: EndKinds) -> None:
        """Batches pulled into our store, then written to the target unless it is our store."""
        for batch in self._resumed_batches(progress):
            if kinds.target == "Self":
                await self._transfer_batch(ctx, progress, batch, kinds.source_peer, self.pull_driver)
            else:
                await self._transfer_batch(ctx, progress, batch, kinds.source_peer, self.pull_driver, count=False)
                await self._copy(ctx, progress, self.local, target, batch)

    async def _transfer_batch(self, ctx: JobContext, progress: Progress, batch: list[InstanceEntry], peer: str,
                              driver, count: bool = True) -> None:
        """One push or pull of a batch, resumable through its own checkpoint kept in ours (its
        slot of `InFlight`, numbered once for the job's life: the number names its transfer)."""
        state = progress.state
        flying = state.setdefault(IN_FLIGHT, {})
        ids = [e.id for e in batch]
        number = next((n for n, b in flying.items() if set(b["Instances"]) == set(ids)), None)
        if number is None:
            number = str(state.get("Batches", 0))
            state["Batches"] = int(number) + 1
            flying[number] = {"Instances": ids}
            await ctx.save(progress.checkpoint())
        sub = SubContext(ctx, progress, flying[number], batch_query(ctx.query, ids, peer), name=f"batch-{number}")
        await driver.run(sub)
        if count:
            for entry in batch:
                progress.copy_done(entry)
        flying.pop(number, None)
        await ctx.save(progress.checkpoint(), content=progress.content("Copying"), progress=progress.fraction)

    # -- the final check ---------------------------------------------------------------------

    async def _check(self, ctx: JobContext, progress: Progress, target, kinds: EndKinds) -> str | None:
        await ctx.save(progress.checkpoint(), content=progress.content("Verifying"), progress=progress.fraction)
        expected = {e.id: e.md5 for e in progress.entries if e.id not in progress.failed}
        patience = self.verify_patience if kinds.target == "Peer" else 0.0
        held: dict[str, str] = {}
        missing = dict(expected)
        moved = time.monotonic()
        while True:
            answer = await self._held(target, (progress.by_id[i] for i in missing), settled=True)
            good = {i for i, md5 in answer.items() if md5 == missing.get(i)}
            held.update(answer)
            if good:
                moved = time.monotonic()
            missing = {i: m for i, m in missing.items() if i not in good}
            if not missing or time.monotonic() - moved >= patience:
                break
            await anyio.sleep(VERIFY_POLL)
        for instance_id in missing:
            found = held.get(instance_id)
            progress.fail(instance_id, "the target does not hold it after the copy" if found is None
                          else f"the target holds another file (MD5 {found}, source {expected[instance_id]})")
        content = progress.content("Done")
        content["Verified"] = len(expected) - len(missing)
        census = await self._census(target, progress)
        if census is not None:
            content["TargetLevels"] = census
        await ctx.save(progress.checkpoint(), content=content, progress=1.0 if not progress.failed else 0.99)
        if not progress.failed:
            return None
        first = next(iter(sorted(progress.failed.items())))
        return (f"{len(progress.failed)} of {len(progress.entries)} instances were not copied "
                f"(first: {first[0]}: {first[1]}); the job's Content lists them")

    @staticmethod
    async def _census(target, progress: Progress) -> dict[str, int] | None:
        """The target's counts per level in the replicated studies, where it can tell."""
        census = getattr(target, "census", None)
        if census is None:
            return None
        studies = {e.study: e.patient for e in progress.entries}
        try:
            counts = await census(studies)
        except OrthancError as exc:
            log.warning("replication: the target cannot count its series and instances: %s", exc)
            return None
        return {"Patients": len({studies[s] for s in counts}), "Studies": len(counts),
                "Series": sum(c[0] for c in counts.values()), "Instances": sum(c[1] for c in counts.values())}

    # -- follow ------------------------------------------------------------------------------

    @staticmethod
    async def _changes_seq(source, kinds: EndKinds) -> int:
        changes = getattr(source, "changes", None)
        if changes is None:
            raise JobFailure(f"cannot follow a source of type {kinds.source}: it has no /changes")
        _, last = await changes(None)
        return last

    async def _wait_for_changes(self, ctx: JobContext, source, kinds: EndKinds, seq: int) -> int:
        ctx.report(content={"Phase": "Following"})
        while True:
            await anyio.sleep(FOLLOW_POLL)
            try:
                count, last = await source.changes(seq)
            except OrthancError as exc:
                log.warning("job %s: cannot read the source's changes: %s", ctx.job_id, exc)
                continue
            if count:
                return last
            seq = last

    async def discard(self, ctx: JobContext) -> None:
        """The push transactions or download areas of the batches in flight are released by
        their driver (best effort)."""
        state = ctx.checkpoint or {}
        flying = {n: b for n, b in state.get(IN_FLIGHT, {}).items() if SUB in b}
        if not flying:
            return
        try:
            source, target, kinds = await self.open_ends(ctx.query)
        except Exception:  # noqa: BLE001 - best effort
            return
        driver, peer = (self.push_driver, kinds.target_peer) if kinds.target == "Peer" else \
            (self.pull_driver, kinds.source_peer)
        try:
            for number, batch in flying.items():
                query = batch_query(ctx.query, batch["Instances"], peer)
                try:
                    await driver.discard(SubContext(ctx, None, batch, query, name=f"batch-{number}"))
                except Exception as exc:  # noqa: BLE001 - best effort
                    log.warning("job %s: could not release batch %s: %s", ctx.job_id, number, exc)
        finally:
            await source.aclose()
            await target.aclose()
