"""The jobs engine: queue, states, control and persistence of the daemon's jobs (spec 9).

It runs in the daemon's event loop (`async with engine.running(): ...`) and meets the drivers
through the contract of `accelerator.jobs.base`. What it does, as a real Orthanc does:

- States `Pending`, `Running`, `Paused`, `Success`, `Failure`. The highest `Priority` runs first,
  in submission order among equals; at most `ConcurrentJobs` jobs run at once.
- `pause`: Pending -> Paused at once; a Running job is asked to stop (anyio cancellation of its
  driver) and reads `Running` until the driver has returned, then `Paused`. Anything else: no-op.
- `resume`: Paused -> Pending, anything else is refused (400).
- `cancel`: Pending/Paused -> Failure (37 "This job was canceled") at once, a Running job once its
  driver has returned; then `driver.discard(ctx)`. A finished job: no-op.
- `resubmit`: Failure -> Pending from checkpoint None (Content and Progress keep their stale
  values until the driver updates them, like the plugin), anything else is refused (400).
- A driver that raises -> Failure, 1 "Error encountered within the plugin engine", with the
  exception's message as `ErrorDetails`; then `driver.discard(ctx)`.
- The `JobsHistorySize` most recently finished jobs are kept, older ones are forgotten.

Persistence (unless `SaveJobs` is false): one row per job in the index (`jobs` table), written
before any state change is acted on: a job is in the index before `submit` returns, a Running
state before the driver starts, a pause/cancel request before the driver is interrupted, a
Failure before `discard` is called. At start the engine loads its jobs: Running ones become
Pending again (their driver resumes from the saved checkpoint), or Paused/canceled if a pause or
cancel had been asked; a discard that had not completed is run again (so `discard` must be
idempotent). `ctx.save` persists (shielded from cancellation: a save happens whole or not at
all); `ctx.report` only updates memory.

Replicas (several daemons sharing a PostgreSQL index with `Lock` false: `index.shared`) share
the jobs: any replica accepts, shows and controls any job, and each job runs on one of them.

- A job is held by at most one replica (the row's `owner`) for a lease (`JobsLease`, 15 s by
  default) that the holder renews every third of it. A replica holds only the jobs it runs or
  is about to run, and the failed ones whose `discard` it runs; Paused and finished jobs are
  held by nobody.
- A job submitted here is held here at once if this replica has a free slot, else left to the
  first replica with room. Every replica claims Pending jobs nobody holds, and jobs whose
  holder's lease ran out (the holder died, e.g. `kill -9`): such a job resumes from its saved
  checkpoint, as after a restart. On PostgreSQL a claim locks its rows with SKIP LOCKED: two
  replicas claiming at once take different jobs.
- A write of a job's state only lands while the writer still holds it: a replica stalled past
  its lease, whose job was taken over, cannot overwrite the new holder's state, and stops the
  driver when its renewal finds the job gone (or when it could not renew for a whole lease).
- GET /jobs and /jobs/{id} (`fetch_ids`, `fetch`, `fetch_all`) answer from the index (this
  replica's own jobs from memory, where progress is freshest); a holder writes the state of its
  running jobs at every renewal, so another replica shows a progress at most a third of a lease
  old. Pause, resume, cancel and resubmit of a job held by another replica are checked against
  the job's state in the index, answered at once, and left as a request that the holder acts
  on at its next renewal; a job nobody holds is changed in the index directly (a cancel makes
  this replica hold the job while it runs `discard`).
- A replica that stops gives back the jobs it held (Running ones as a restart would see them);
  the ones whose `discard` did not complete stay held until the lease runs out.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import anyio
import orjson
from anyio import to_thread
from anyio.abc import TaskGroup

from accelerator.jobs.base import JobContext, JobDriver
from protocol.errors import AcceleratorError, BadRequest, InternalError, UnknownResource

if TYPE_CHECKING:
    from accelerator.config import Config
    from accelerator.store.index import Index, JobRow

from accelerator.store.index import JobEdit

log = logging.getLogger(__name__)

PENDING, RUNNING, PAUSED, SUCCESS, FAILURE = "Pending", "Running", "Paused", "Success", "Failure"
FINISHED = frozenset({SUCCESS, FAILURE})

# Orthanc's ErrorCode values a job can show.
SUCCESS_CODE, PLUGIN_ERROR, CANCELED = 0, 1, 37
ERROR_DESCRIPTIONS = {
    SUCCESS_CODE: "Success",
    PLUGIN_ERROR: "Error encountered within the plugin engine",
    CANCELED: "This job was canceled",
}

Factory = Callable[[JobContext], JobDriver]
"""Makes the driver of one job; called once per job (and again after a restart of the daemon)."""

_PAUSE, _CANCEL = "pause", "cancel"
_RESUME, _RESUBMIT = "resume", "resubmit"  # with the two above: what a replica asks of a job's holder

DEFAULT_LEASE = 15.0  # seconds; `JobsLease`
POLL = 0.25  # seconds between two looks at the index of `wait` for a job held by another replica


def iso_time(moment: datetime) -> str:
    """Orthanc's ISO basic format with microseconds, UTC: `20261121T060114.838072`."""
    return moment.strftime("%Y%m%dT%H%M%S.%f")


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%S.%f").replace(tzinfo=timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _percent(progress: float) -> int:
    return min(100, max(0, math.floor(progress * 100 + 0.5)))  # Orthanc: iround(progress * 100)


def _leaf(exc: BaseException) -> BaseException:
    """The first real error of what a driver's task group raised."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    """ErrorDetails of a failed job: our own errors carry plain words, others get their type."""
    exc = _leaf(exc)
    if isinstance(exc, AcceleratorError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(eq=False)
class _Job:
    id: str
    type: str
    priority: int
    query: dict[str, Any]
    content: dict[str, Any]
    created: datetime
    changed: datetime  # last state change; the CompletionTime of a finished job
    state: str = PENDING
    progress: float = 0.0  # 0..1
    checkpoint: bytes | None = None  # JSON, encoded when saved: later changes by the driver don't leak in
    error_code: int = SUCCESS_CODE
    error_details: str = ""
    runtime: float = 0.0  # seconds spent running, runs that ended (since the last resubmit)
    stop: str | None = None  # _PAUSE or _CANCEL asked of the running driver
    discard_pending: bool = False  # Failure reached, driver.discard not completed yet
    # Memory only.
    queued: int = 0  # FIFO rank among equal priorities
    finished: int = 0  # completion rank, for the history bound
    run_started: float | None = None  # time.monotonic() at the start of the current run
    scope: anyio.CancelScope | None = None
    driver: JobDriver | None = None
    discarding: bool = False
    lost: bool = False  # replicas: another replica holds the job now; this copy only winds down
    version: int = 0  # bumped by every change that must be persisted
    saved_version: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def effective_runtime(self) -> float:
        if self.run_started is None:
            return self.runtime
        return self.runtime + time.monotonic() - self.run_started

    def record(self) -> bytes:
        return orjson.dumps({
            "query": self.query,
            "content": self.content,
            "progress": self.progress,
            "checkpoint": None if self.checkpoint is None else orjson.Fragment(self.checkpoint),
            "error_code": self.error_code,
            "error_details": self.error_details,
            "created": iso_time(self.created),
            "changed": iso_time(self.changed),
            "runtime": self.effective_runtime(),
            "stop": self.stop,
            "discard_pending": self.discard_pending,
        })

    @classmethod
    def from_row(cls, job_id: str, job_type: str, priority: int, state: str, record: dict) -> "_Job":
        checkpoint = record.get("checkpoint")
        return cls(
            id=job_id,
            type=job_type,
            priority=priority,
            query=record["query"],
            content=record["content"],
            created=_parse_time(record["created"]),
            changed=_parse_time(record["changed"]),
            state=state,
            progress=record["progress"],
            checkpoint=None if checkpoint is None else orjson.dumps(checkpoint),
            error_code=record["error_code"],
            error_details=record["error_details"],
            runtime=record["runtime"],
            stop=record["stop"],
            discard_pending=record["discard_pending"],
        )


def _check_resume(job_id: str, state: str) -> None:
    if state != PAUSED:
        raise BadRequest(f"Job {job_id} is {state}: only a paused job can be resumed")


def _check_resubmit(job_id: str, state: str) -> None:
    if state != FAILURE:
        raise BadRequest(f"Job {job_id} is {state}: only a failed or canceled job can be resubmitted")


def _reset_for_resubmit(job: _Job) -> None:
    """A resubmitted job starts over, from checkpoint None."""
    job.error_code, job.error_details = SUCCESS_CODE, ""
    job.runtime = 0.0
    if not job.discard_pending:  # else the discard still needs it; it is reset afterwards
        job.checkpoint = None


def _change_state(job: _Job, state: str) -> None:
    """The state and its time, nothing else (callable from a worker thread)."""
    job.state = state
    job.changed = _now()


class _Context:
    """What a driver sees of its job (the `JobContext` of accelerator.jobs.base)."""

    def __init__(self, engine: JobsEngine, job: _Job):
        self._engine = engine
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def job_type(self) -> str:
        return self._job.type

    @property
    def priority(self) -> int:
        return self._job.priority

    @property
    def query(self) -> dict[str, Any]:
        return self._job.query

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        saved = self._job.checkpoint
        return None if saved is None else orjson.loads(saved)

    @property
    def content(self) -> dict[str, Any]:
        return copy.deepcopy(self._job.content)

    async def save(
        self,
        checkpoint: dict[str, Any] | None = None,
        *,
        content: dict[str, Any] | None = None,
        progress: float | None = None,
    ) -> None:
        with anyio.CancelScope(shield=True):  # whole or not at all
            if checkpoint is not None:
                self._job.checkpoint = orjson.dumps(checkpoint)
            self.report(content=content, progress=progress)
            await self._engine._persist(self._job)

    def report(self, *, content: dict[str, Any] | None = None, progress: float | None = None) -> None:
        if content:
            self._job.content = {**self._job.content, **copy.deepcopy(content)}
        if progress is not None:
            self._job.progress = min(1.0, max(0.0, float(progress)))


class JobsEngine:
    """Schedules, runs, controls and persists jobs; see the module's docstring."""

    def __init__(
        self,
        index: Index | None,
        *,
        concurrent_jobs: int = 2,
        history_size: int = 10,
        lease: float = DEFAULT_LEASE,
        shared: bool | None = None,
        release_at_exit: bool = True,
    ):
        """`index` None keeps jobs in memory only (`SaveJobs: false`). `shared` (default: the
        index's own `shared`) runs the jobs as one replica among several, with leases of
        `lease` seconds. `release_at_exit` False leaves this replica's jobs held when it stops,
        as `kill -9` would (tests of the take-over)."""
        if concurrent_jobs < 1:
            raise ValueError("concurrent_jobs must be >= 1")
        if lease <= 0:
            raise ValueError("lease must be > 0")
        self._index = index
        self._shared = index is not None and bool(index.shared if shared is None else shared)
        self._lease = float(lease)
        self._release_at_exit = release_at_exit
        self.replica = str(uuid.uuid4())  # this process's owner ID in the index
        self._wake = anyio.Event()  # replicas: claim now rather than at the next renewal
        self._closing = False
        self._concurrent = concurrent_jobs
        self._history = max(0, history_size)
        self._factories: dict[str, Factory] = {}
        self._jobs: dict[str, _Job] = {}
        self._ranks = itertools.count(1)
        self._tg: TaskGroup | None = None
        self._loaded = False
        self._changed = anyio.Event()

    @classmethod
    def from_config(cls, config: Config, index: Index) -> JobsEngine:
        return cls(
            index if config.save_jobs else None,
            concurrent_jobs=config.concurrent_jobs,
            history_size=config.jobs_history_size,
            lease=config.jobs_lease,
        )

    def register(self, job_type: str, factory: Factory) -> None:
        """Declare a job type; `factory(ctx)` returns the driver of one job of that type."""
        self._factories[job_type] = factory

    # -- life --------------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobsEngine]:
        """Load the persisted jobs and run jobs until the block exits. On exit the running
        drivers are cancelled; their jobs stay `Running` in the index and resume at next start."""
        if self._tg is not None:
            raise RuntimeError("the jobs engine is already running")
        if not self._loaded:
            await self._load()
        self._closing = False
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    for job in list(self._jobs.values()):
                        if job.discard_pending:
                            self._start_discard(job)
                    self._schedule()
                    if self._shared:
                        tg.start_soon(self._keep_leases, name="jobs leases")
                    yield self
                finally:
                    self._tg = None
                    tg.cancel_scope.cancel()
        finally:
            for job in self._jobs.values():  # as a restart would see them
                job.scope, job.discarding = None, False
                if job.state == RUNNING:
                    job.runtime, job.run_started = job.effective_runtime(), None
                    self._recover(job)
            if self._shared and self._release_at_exit:
                await self._give_back()

    async def _give_back(self) -> None:
        """Replicas: let go of the jobs held here as the engine stops, so that another replica
        resumes them now rather than after the lease; bounded in time (a database that does
        not answer leaves them to their lease)."""
        self._closing = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(max(1.0, self._lease / 3)):
            for job in list(self._jobs.values()):
                if not job.discard_pending and not job.lost:
                    job.version += 1  # written even if unchanged: the release is the point
                    await self._persist_quietly(job)

    async def _load(self) -> None:
        self._loaded = True
        if self._index is None or self._shared:  # replicas claim their jobs as they run
            return
        rows = await to_thread.run_sync(self._index.jobs)
        recovered, finished = [], []
        for row in rows:
            if row[0] in self._jobs:
                continue
            try:
                job = _Job.from_row(*row)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("job %s: unreadable row in the index (%s), ignored", row[0], exc)
                continue
            if job.state == RUNNING:
                self._recover(job)
                recovered.append(job)
            if job.state == PENDING:
                job.queued = next(self._ranks)
            self._jobs[job.id] = job
            if job.state in FINISHED:
                finished.append(job)
        for job in sorted(finished, key=lambda j: j.changed):
            job.finished = next(self._ranks)
        for job in recovered:
            await self._persist(job)
        if rows:
            log.info("jobs: %d loaded from the index (%d interrupted)", len(rows), len(recovered))
        await self._trim_history()

    def _recover(self, job: _Job) -> None:
        """A Running job whose driver is gone (daemon stopped): what a restart makes of it."""
        if job.stop == _PAUSE:
            self._set_state(job, PAUSED)
        elif job.stop == _CANCEL:
            self._fail(job, CANCELED, "")
        else:
            self._set_state(job, PENDING)
            job.queued = next(self._ranks)
        job.stop = None

    # -- reading -----------------------------------------------------------------------------

    def list_ids(self) -> list[str]:
        return sorted(self._jobs)

    def get(self, job_id: str) -> dict[str, Any]:
        """The job's JSON, as GET /jobs/{id} of Orthanc; UnknownResource (404) if unknown."""
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownResource(f"Unknown job: {job_id}")
        return self._json(job)

    def all(self) -> list[dict[str, Any]]:
        """Every job's JSON, ordered by ID (GET /jobs?expand)."""
        return [self._json(self._jobs[i]) for i in self.list_ids()]

    def state(self, job_id: str) -> str:
        return self._known(job_id, UnknownResource).state

    async def wait(self, job_id: str, states: Iterable[str] = FINISHED) -> dict[str, Any]:
        """Wait until the job is in one of `states`; returns its JSON. Bound it with a timeout.
        UnknownResource if the job is (or becomes) unknown, e.g. forgotten by the history bound.
        Replicas: a job not held here is looked up in the index every POLL seconds."""
        wanted = frozenset(states)
        while True:
            changed = self._changed
            if not self._shared:
                job = self._known(job_id, UnknownResource)
                if job.state in wanted:
                    return self._json(job)
                await changed.wait()
                continue
            answer = await self.fetch(job_id)
            if answer["State"] in wanted:
                return answer
            with anyio.move_on_after(POLL):
                await changed.wait()

    async def fetch(self, job_id: str) -> dict[str, Any]:
        """GET /jobs/{id}: as `get`, and on replicas a job held elsewhere from the index."""
        job = self._jobs.get(job_id)
        if not self._shared or (job is not None and job.saved_version >= job.version):
            return self.get(job_id)
        row = await to_thread.run_sync(self._index.job_row, job_id)
        answer = self._shown(job_id, row)
        if answer is None:
            raise UnknownResource(f"Unknown job: {job_id}")
        return answer

    async def fetch_all(self) -> list[dict[str, Any]]:
        """GET /jobs?expand: as `all`, and on replicas every job of the index."""
        if not self._shared:
            return self.all()
        rows = await to_thread.run_sync(self._index.job_rows)
        answers = {}
        for row in rows:
            answer = self._shown(row.id, row)
            if answer is not None:
                answers[row.id] = answer
        return [answers[i] for i in sorted(answers)]

    def _shown(self, job_id: str, row: JobRow | None) -> dict[str, Any] | None:
        """Replicas: what this replica answers for a job, given its row just read. A job held
        here is shown from memory (its progress is freshest) once its last change is written;
        until then the row is shown, so that no replica shows a state (e.g. Success) that
        another replica reading the index would contradict a moment later."""
        job = self._jobs.get(job_id)
        if job is not None and (job.saved_version >= job.version or row is None):
            return self._json(job)
        return None if row is None else self._row_json(row)

    async def fetch_ids(self) -> list[str]:
        """GET /jobs: as `list_ids`, and on replicas every job of the index."""
        if not self._shared:
            return self.list_ids()
        ids = await to_thread.run_sync(self._index.job_ids)
        return sorted(set(ids) | set(self._jobs))

    def _row_json(self, row: JobRow) -> dict[str, Any] | None:
        """The JSON of a job held by another replica or by none, from its row (None if the row
        cannot be read: it is logged and left out, as at load)."""
        record = {**row.record, "checkpoint": None}  # not shown: not re-encoded
        try:
            return self._json(_Job.from_row(row.id, row.type, row.priority, row.state, record))
        except (KeyError, TypeError, ValueError) as exc:
            log.error("job %s: unreadable row in the index (%s), ignored", row.id, exc)
            return None

    def _json(self, job: _Job) -> dict[str, Any]:
        now = _now()
        runtime_ms = math.floor(job.effective_runtime() * 1000)
        answer: dict[str, Any] = {
            "ID": job.id,
            "Type": job.type,
            "State": job.state,
            "Priority": job.priority,
            "Progress": _percent(job.progress),
            "ErrorCode": job.error_code,
            "ErrorDescription": ERROR_DESCRIPTIONS.get(job.error_code, "Error"),
            "ErrorDetails": job.error_details,
            "Content": copy.deepcopy(job.content),
            "CreationTime": iso_time(job.created),
            "Timestamp": iso_time(now),
            "EffectiveRuntime": runtime_ms / 1000,
        }
        if job.state in FINISHED:
            answer["CompletionTime"] = iso_time(job.changed)
        # As Orthanc: the rest of the job is assumed to go at the pace of the part done.
        if job.state == RUNNING and job.progress > 0.01 and runtime_ms > 0:
            remaining = (1 - job.progress) / job.progress * runtime_ms
            answer["EstimatedTimeOfArrival"] = iso_time(now + timedelta(milliseconds=round(remaining)))
        return answer

    # -- control -----------------------------------------------------------------------------

    async def submit(
        self, job_type: str, query: dict[str, Any], priority: int = 0, content: dict[str, Any] | None = None
    ) -> str:
        """Queue a new job; returns its ID once the job is in the index. Replicas: the job is
        held here if this replica has a free slot, else the first replica with room takes it."""
        if job_type not in self._factories:
            raise InternalError(f"No driver is registered for jobs of type {job_type!r}")
        now = _now()
        job = _Job(
            id=str(uuid.uuid4()),
            type=job_type,
            priority=int(priority),
            query=orjson.loads(orjson.dumps(query)),
            content=orjson.loads(orjson.dumps(content or {})),
            created=now,
            changed=now,
        )
        here = not self._shared or (self._tg is not None and self._free_slots() > 0)
        if self._index is not None:
            record = job.record()
            owner = self.replica if self._shared and here else None
            with anyio.CancelScope(shield=True):  # a job in the index is a job in memory
                await to_thread.run_sync(
                    self._index.insert_job, job.id, job.type, job.priority, job.state, record, owner, self._lease
                )
        if not here:  # left to the replicas' claims, this one's included
            self._wake_up()
            self._notify()
            return job.id
        job.queued = next(self._ranks)
        self._jobs[job.id] = job
        self._notify()
        self._schedule()
        return job.id

    async def pause(self, job_id: str) -> None:
        await self._control(_PAUSE, job_id)

    async def resume(self, job_id: str) -> None:
        await self._control(_RESUME, job_id)

    async def cancel(self, job_id: str) -> None:
        await self._control(_CANCEL, job_id)

    async def resubmit(self, job_id: str) -> None:
        await self._control(_RESUBMIT, job_id)

    async def _control(self, action: str, job_id: str) -> None:
        """Act on a job held here (or on every job without replicas); on replicas, a job held
        elsewhere or by nobody is acted on through the index."""
        job = self._jobs.get(job_id)
        if job is None and self._shared:
            await self._control_in_index(action, job_id)
            return
        job = self._known(job_id, BadRequest)
        if action == _PAUSE:
            await self._pause(job)
        elif action == _RESUME:
            await self._resume(job)
        elif action == _CANCEL:
            await self._cancel(job)
        else:
            await self._resubmit(job)

    async def _pause(self, job: _Job) -> None:
        if job.state == PENDING:
            self._set_state(job, PAUSED)
            await self._persist(job)
        elif job.state == RUNNING and job.stop is None:
            await self._interrupt(job, _PAUSE)
        # Paused, finished, or already stopping: nothing to do (200, as Orthanc)

    async def _resume(self, job: _Job) -> None:
        _check_resume(job.id, job.state)
        self._set_state(job, PENDING)
        job.queued = next(self._ranks)
        await self._persist(job)
        self._schedule()

    async def _cancel(self, job: _Job) -> None:
        if job.state in (PENDING, PAUSED):
            self._fail(job, CANCELED, "")
            await self._persist(job)
            self._start_discard(job)
        elif job.state == RUNNING and job.stop != _CANCEL:
            await self._interrupt(job, _CANCEL)
        # finished: nothing to do (200, as Orthanc)

    async def _resubmit(self, job: _Job) -> None:
        _check_resubmit(job.id, job.state)
        _reset_for_resubmit(job)
        self._set_state(job, PENDING)
        job.queued = next(self._ranks)
        await self._persist(job)
        self._schedule()

    async def _control_in_index(self, action: str, job_id: str) -> None:
        """Replicas: `action` on a job not held here, in one index transaction. A job held by
        another replica (alive, or dead and not yet taken over) is checked against its state
        and left a request for its holder; a job nobody holds changes state here and now."""
        discard: list[_Job] = []

        def decide(row: JobRow | None) -> JobEdit | None:  # in the transaction: computes only
            discard.clear()  # PostgreSQL may run the transaction again
            if row is None:
                raise BadRequest(f"Unknown job: {job_id}")
            if action == _RESUME:
                _check_resume(job_id, row.state)
            elif action == _RESUBMIT:
                _check_resubmit(job_id, row.state)
            elif row.state in FINISHED or (action == _PAUSE and row.state == PAUSED):
                return None  # nothing to do (200, as Orthanc)
            if row.owner is not None:
                return JobEdit(request=action)
            job = _Job.from_row(row.id, row.type, row.priority, row.state, row.record)
            claim = None
            if action == _PAUSE:
                _change_state(job, PAUSED)  # it was Pending (or Running, left so by a daemon alone)
            elif action == _RESUME or action == _RESUBMIT:
                if action == _RESUBMIT:
                    _reset_for_resubmit(job)
                _change_state(job, PENDING)
            else:  # cancel of a Pending or Paused job: its discard runs here
                job.error_code, job.error_details, job.discard_pending = CANCELED, "", True
                _change_state(job, FAILURE)
                claim = self.replica
                discard.append(job)
            return JobEdit(state=job.state, record=job.record(), claim_for=claim)

        with anyio.CancelScope(shield=True):
            await to_thread.run_sync(self._index.modify_job, job_id, decide, self._lease)
        for job in discard:
            job.finished = next(self._ranks)
            self._jobs[job.id] = job
            self._start_discard(job)
        self._notify()
        self._wake_up()  # a job made Pending may run here

    def _known(self, job_id: str, error: type[Exception]) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise error(f"Unknown job: {job_id}")
        return job

    async def _interrupt(self, job: _Job, why: str) -> None:
        scope = job.scope
        job.stop = why
        await self._persist(job)
        if scope is not None:
            scope.cancel()

    # -- running -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start the best pending jobs while there are free slots."""
        if self._tg is None:
            return
        running = sum(1 for j in self._jobs.values() if j.state == RUNNING)
        while running < self._concurrent:
            candidates = [j for j in self._jobs.values() if j.state == PENDING and not j.discard_pending]
            if not candidates:
                return
            job = min(candidates, key=lambda j: (-j.priority, j.queued))
            self._set_state(job, RUNNING)
            job.stop = None
            job.scope = anyio.CancelScope()
            job.run_started = time.monotonic()
            running += 1
            self._tg.start_soon(self._run, job, name=f"job {job.id}")

    async def _run(self, job: _Job) -> None:
        ctx = _Context(self, job)
        scope = job.scope
        assert scope is not None
        error: Exception | None = None
        try:
            with scope:
                await self._persist(job)  # Running, before the driver starts
                await self._driver(job, ctx).run(ctx)
        except Exception as exc:  # the daemon's shutdown (outer cancellation) goes through
            error = exc
        job.runtime, job.run_started, job.scope = job.effective_runtime(), None, None
        if job.lost:  # another replica holds it now: its state is that replica's to write
            log.warning("job %s: stopped here, another replica has taken it over", job.id)
            self._notify()
            self._schedule()
            return
        if error is None and not scope.cancelled_caught:
            job.progress = 1.0
            job.error_code, job.error_details = SUCCESS_CODE, ""
            self._set_state(job, SUCCESS)
            job.finished = next(self._ranks)
        elif job.stop == _CANCEL:
            self._fail(job, CANCELED, "")
        elif job.stop == _PAUSE or error is None:
            if error is not None:
                log.warning("job %s failed while pausing (%s): paused, a resume will tell", job.id,
                            _describe(error))
            self._set_state(job, PAUSED)
        else:
            if not isinstance(_leaf(error), AcceleratorError):
                log.error("job %s: unexpected error in its driver", job.id, exc_info=error)
            else:
                log.warning("job %s failed: %s", job.id, error)
            self._fail(job, PLUGIN_ERROR, _describe(error))
        job.stop = None
        await self._persist_quietly(job)
        self._schedule()
        self._wake_up()  # replicas: a slot is free, maybe for a job waiting in the index
        if job.discard_pending:
            await self._discard(job)
        else:
            await self._trim_history()

    def _driver(self, job: _Job, ctx: _Context) -> JobDriver:
        if job.driver is None:
            factory = self._factories.get(job.type)
            if factory is None:
                raise InternalError(f"No driver is registered for jobs of type {job.type!r}")
            job.driver = factory(ctx)
        return job.driver

    def _start_discard(self, job: _Job) -> None:
        if self._tg is not None and not job.discarding:
            self._tg.start_soon(self._discard, job, name=f"discard job {job.id}")
        # not running: done at the next start (job.discard_pending is persisted)

    async def _discard(self, job: _Job) -> None:
        if job.discarding:
            return
        job.discarding = True
        try:
            ctx = _Context(self, job)
            await self._driver(job, ctx).discard(ctx)
        except Exception:
            log.exception("job %s: discarding its driver state failed", job.id)
        finally:
            job.discarding = False
        if job.lost:
            return
        job.discard_pending = False
        if job.state != FAILURE:  # resubmitted meanwhile: it starts over from nothing
            job.checkpoint = None
        await self._persist_quietly(job)
        self._notify()
        self._schedule()
        await self._trim_history()

    # -- state and persistence ---------------------------------------------------------------

    def _set_state(self, job: _Job, state: str) -> None:
        job.state = state
        job.changed = _now()
        self._notify()

    def _fail(self, job: _Job, code: int, details: str) -> None:
        job.error_code, job.error_details = code, details
        job.discard_pending = True
        self._set_state(job, FAILURE)
        job.finished = next(self._ranks)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _persist(self, job: _Job) -> None:
        """Write the job as it is now; returns once written. Writes of one job are serialised
        and coalesced: a write that waited for the lock may find its change already written."""
        job.version += 1
        wanted = job.version
        if self._index is None or job.lost:
            return
        request = None
        with anyio.CancelScope(shield=True):
            async with job.lock:
                if job.saved_version >= wanted or job.lost:
                    return
                version, state, record = job.version, job.state, job.record()
                if not self._shared:
                    await to_thread.run_sync(self._index.update_job, job.id, state, record)
                elif self._releasable(job):
                    written, request = await to_thread.run_sync(
                        self._index.release_job, job.id, state, record, self.replica)
                    if written and self._jobs.get(job.id) is job:
                        del self._jobs[job.id]  # held by nobody now: the index has it
                else:
                    written = await to_thread.run_sync(
                        self._index.update_job, job.id, state, record, self.replica)
                if self._shared and not written:
                    self._lose(job)
                    return
                job.saved_version = version
        if self._shared:
            self._notify()  # what replicas show changed (see `_shown`)
        if request is not None:  # asked since the last renewal
            if self._tg is not None:
                self._tg.start_soon(self._ask_again, request, job.id, name=f"{request} job {job.id}")
            else:  # stopping: the job is nobody's now, the request goes to the index
                await self._ask_again(request, job.id)

    def _releasable(self, job: _Job) -> bool:
        """Replicas: whether a job in this state is held by nobody (so any replica can resume
        or resubmit it, or forget it with the history)."""
        if job.discard_pending:
            return False
        return job.state in (PAUSED, SUCCESS, FAILURE) or (self._closing and job.state == PENDING)

    async def _ask_again(self, action: str, job_id: str) -> None:
        """A request left for a job by another replica just before this one let go of it:
        asked again of the job as it is now (it might have become meaningless: then ignored)."""
        try:
            await self._control(action, job_id)
        except (BadRequest, UnknownResource) as exc:
            log.info("job %s: %s asked through another replica no longer applies (%s)", job_id, action, exc)
        except Exception:
            log.exception("job %s: cannot %s it as another replica asked", job_id, action)

    def _lose(self, job: _Job) -> None:
        """Replicas: another replica holds the job now (this one's lease ran out): stop its
        driver, forget it here, write nothing more of it."""
        if job.lost:
            return
        job.lost = True
        log.warning("job %s: no longer held by this replica, stopped here", job.id)
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        if job.scope is not None:
            job.scope.cancel()
        self._notify()

    async def _persist_quietly(self, job: _Job) -> None:
        try:
            await self._persist(job)
        except Exception:
            log.exception("job %s: cannot write its state (%s) to the index", job.id, job.state)

    async def _trim_history(self) -> None:
        """Forget the oldest finished jobs beyond JobsHistorySize (not while discarding)."""
        if self._shared:
            await self._trim_history_in_index()
            return
        finished = sorted((j for j in self._jobs.values() if j.state in FINISHED), key=lambda j: j.finished)
        excess = len(finished) - self._history
        if excess <= 0:
            return
        victims = [j for j in finished if not j.discard_pending][:excess]
        if not victims:
            return
        for job in victims:
            del self._jobs[job.id]
        self._notify()
        if self._index is not None:
            try:
                with anyio.CancelScope(shield=True):
                    await to_thread.run_sync(self._index.delete_jobs, [j.id for j in victims])
            except Exception:
                log.exception("jobs: cannot delete %d old jobs from the index", len(victims))

    async def _trim_history_in_index(self) -> None:
        """Replicas: the history bound over the finished jobs of every replica (those held by
        nobody: a discard in progress keeps its job), oldest completion first."""
        try:
            with anyio.CancelScope(shield=True):
                finished = await to_thread.run_sync(self._index.finished_jobs)
                excess = len(finished) - self._history
                if excess <= 0:
                    return
                finished.sort(key=lambda f: f[1])  # ISO basic times: sorted as text
                await to_thread.run_sync(self._index.delete_finished_jobs, [f[0] for f in finished[:excess]])
        except Exception:
            log.exception("jobs: cannot trim the history in the index")
            return
        self._notify()

    # -- replicas: leases and claims ---------------------------------------------------------

    def _free_slots(self) -> int:
        busy = sum(1 for j in self._jobs.values() if j.state in (PENDING, RUNNING) and not j.discard_pending)
        return self._concurrent - busy

    def _wake_up(self) -> None:
        self._wake.set()

    async def _keep_leases(self) -> None:
        """Replicas, for the engine's life: every third of the lease (or sooner when woken),
        renew the leases of the jobs held here, act on what other replicas asked of them,
        write the state of running ones, and claim jobs for the free slots. A replica that
        could not renew for a whole lease stops its jobs: others may have taken them."""
        last_renewal = time.monotonic()
        while True:  # until the engine stops (cancelled); one round is bounded by the index's timeouts
            wake = self._wake
            try:
                await self._renew()
                last_renewal = time.monotonic()
                await self._claim()
            except Exception as exc:
                log.warning("jobs: cannot renew or claim in the index (%s)", _describe(exc))
                if time.monotonic() - last_renewal > self._lease:
                    for job in list(self._jobs.values()):
                        self._lose(job)
            with anyio.move_on_after(self._lease / 3):
                await wake.wait()
            if wake.is_set():
                self._wake = anyio.Event()

    async def _renew(self) -> None:
        held = {job.id: job for job in self._jobs.values()}
        if held:
            renewed = await to_thread.run_sync(self._index.renew_jobs, self.replica, list(held), self._lease)
        else:
            renewed = {}
        for job_id, job in held.items():
            # A job let go meanwhile is not lost; one being written finds out by itself.
            if job_id not in renewed and self._jobs.get(job_id) is job and not job.lock.locked():
                self._lose(job)
        for job_id, request in renewed.items():
            if request is not None and self._jobs.get(job_id) is held[job_id]:
                await self._ask_again(request, job_id)
        for job in list(self._jobs.values()):
            if job.state == RUNNING or job.saved_version < job.version:  # progress; failed writes
                job.version += 1
                await self._persist_quietly(job)

    async def _claim(self) -> None:
        """Take jobs from the index for the free slots: Pending ones nobody holds, and those of
        replicas that died (a Running one resumes from its checkpoint, or becomes Paused or
        canceled if that had been asked)."""
        free = self._free_slots()
        if free <= 0:
            return
        rows = await to_thread.run_sync(self._index.claim_jobs, self.replica, free, self._lease)
        for row in rows:
            if row.id in self._jobs:  # already held here (a lease renewed late): keep it
                continue
            try:
                job = _Job.from_row(row.id, row.type, row.priority, row.state, row.record)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("job %s: unreadable row in the index (%s), left alone", row.id, exc)
                continue
            if row.owner is not None:
                log.warning("job %s (%s): taken over from replica %s, whose lease ran out",
                            job.id, job.state, row.owner)
            if job.state == RUNNING:
                job.runtime = job.effective_runtime()
                self._recover(job)
            if job.state == PENDING:
                job.queued = next(self._ranks)
            elif job.state in FINISHED:
                job.finished = next(self._ranks)
            self._jobs[job.id] = job
            job.version += 1
            await self._persist_quietly(job)  # a Paused or finished one is let go at once
            if row.request is not None:
                await self._ask_again(row.request, job.id)
            if job.discard_pending and not job.lost:
                self._start_discard(job)
        if rows:
            self._notify()
            self._schedule()
