"""Fake job drivers for the engine's tests: each job's behaviour is chosen by its query."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import anyio

from accelerator.jobs.base import JobContext, JobFailure
from accelerator.jobs.engine import JobsEngine
from protocol.errors import NetworkProtocol

TYPE = "FakeTransfer"
WAIT = 5  # seconds: bound of every wait in these tests


class FakeDriver:
    """Behaviours (query["do"]):

    - "succeed": return at once;
    - "fail": raise JobFailure; "orthanc": raise an OrthancError; "crash": raise KeyError;
    - "wait": save the checkpoint {"step": n + 1} (n = the step of the checkpoint it started
      from), report progress query["progress"] if given, then wait for `release(job)`;
      with query["slow_stop"], an interruption waits for `let_stop(job)` before returning.
    """

    def __init__(self) -> None:
        self.starts: list[tuple[str, Any]] = []  # (job id, checkpoint at start), in order
        self.discards: list[tuple[str, Any]] = []  # (job id, checkpoint at discard)
        self.running: set[str] = set()
        self.max_running = 0
        self._events: dict[tuple[str, str], anyio.Event] = {}
        self.discard_gate: anyio.Event | None = None  # if set, discard waits for it
        self.factory_calls: dict[str, int] = defaultdict(int)

    def event(self, kind: str, job_id: str) -> anyio.Event:
        return self._events.setdefault((kind, job_id), anyio.Event())

    def release(self, job_id: str) -> None:
        self.event("release", job_id).set()

    def let_stop(self, job_id: str) -> None:
        self.event("stop", job_id).set()

    async def entered(self, job_id: str) -> None:
        """Wait until the driver of `job_id` has saved its checkpoint and waits."""
        with anyio.fail_after(WAIT):
            await self.event("entered", job_id).wait()
        self._events.pop(("entered", job_id))  # the next run sets a new one

    def factory(self, ctx: JobContext) -> "FakeDriver":
        self.factory_calls[ctx.job_id] += 1
        return self

    async def run(self, ctx: JobContext) -> None:
        self.starts.append((ctx.job_id, ctx.checkpoint))
        self.running.add(ctx.job_id)
        self.max_running = max(self.max_running, len(self.running))
        try:
            await self._run(ctx)
        finally:
            self.running.discard(ctx.job_id)

    async def _run(self, ctx: JobContext) -> None:
        do = ctx.query["do"]
        if do == "succeed":
            await ctx.save({"done": True}, content={"CompletedHttpQueries": 1}, progress=0.5)
            return
        if do == "fail":
            raise JobFailure("peer 'b' has no study 1.2.3")
        if do == "orthanc":
            raise NetworkProtocol("peer 'b' answered HTTP 500 to the lookup")
        if do == "crash":
            raise KeyError("boom")
        assert do == "wait", do
        step = (ctx.checkpoint or {}).get("step", 0) + 1
        await ctx.save({"step": step}, content={"Step": step})
        if "progress" in ctx.query:
            ctx.report(progress=ctx.query["progress"], content={"Reported": True})
        self.event("entered", ctx.job_id).set()
        try:
            await self.event("release", ctx.job_id).wait()
        except anyio.get_cancelled_exc_class():
            if ctx.query.get("slow_stop"):
                with anyio.CancelScope(shield=True):
                    await self.event("stop", ctx.job_id).wait()
            raise

    async def discard(self, ctx: JobContext) -> None:
        self.discards.append((ctx.job_id, ctx.checkpoint))
        if self.discard_gate is not None:
            await self.discard_gate.wait()


def make_engine(index=None, driver: FakeDriver | None = None, **options) -> tuple[JobsEngine, FakeDriver]:
    engine = JobsEngine(index, **options)
    driver = driver or FakeDriver()
    engine.register(TYPE, driver.factory)
    return engine, driver


async def wait_state(engine: JobsEngine, job_id: str, *states: str) -> dict:
    with anyio.fail_after(WAIT):
        return await engine.wait(job_id, states)
