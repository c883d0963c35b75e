"""The contract between the jobs engine and the job drivers (pull, push).

The engine owns scheduling, states, persistence and control (pause, resume, cancel, resubmit).
A driver owns the work. They meet here:

- The engine calls `driver.run(ctx)` in the daemon's event loop. `run` returns on success, or
  raises: an `OrthancError`/`JobFailure` (the job fails with its message as `ErrorDetails`), or
  anything else (same, with the exception's text).
- Pause and cancel arrive as anyio cancellation of `run`. A driver must therefore keep its
  persistent state consistent at every `await`: whatever it has saved with `ctx.save` is what a
  later `run` (after resume, or after a restart of the daemon) starts from.
- After a cancel or a failure (not after a pause), the engine calls `driver.discard(ctx)` so the
  driver can release what it holds (download area, remote push transaction...). A resubmit then
  starts from `checkpoint = None`.
"""

from __future__ import annotations

from typing import Any, Protocol

from protocol.errors import AcceleratorError


class JobFailure(AcceleratorError):
    """A job cannot succeed; the message is shown as the job's `ErrorDetails`, in plain words."""


class JobContext(Protocol):
    @property
    def job_id(self) -> str: ...

    @property
    def query(self) -> dict[str, Any]:
        """The creation request (TransferQuery JSON), verbatim."""

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """What the driver saved last; None on the first run and after a resubmit."""

    @property
    def content(self) -> dict[str, Any]:
        """The job's `Content` as shown by GET /jobs/{id} (read-only view)."""

    async def save(
        self,
        checkpoint: dict[str, Any] | None = None,
        *,
        content: dict[str, Any] | None = None,
        progress: float | None = None,
    ) -> None:
        """Persist driver state (replaces the checkpoint when given), merge `content` into the
        job's Content, set progress (0..1). Returns once written to the index."""

    def report(self, *, content: dict[str, Any] | None = None, progress: float | None = None) -> None:
        """Update what GET /jobs/{id} shows without persisting (cheap, for live counters)."""


class JobDriver(Protocol):
    async def run(self, ctx: JobContext) -> None: ...

    async def discard(self, ctx: JobContext) -> None: ...
