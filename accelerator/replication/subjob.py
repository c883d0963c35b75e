"""A pull or push run inside a replication job, with its checkpoint kept in the replication's.

The pull and push drivers resume from what they saved with `ctx.save`; giving them a context
whose checkpoint is one slot of the replication's checkpoint (the batch's entry under
`InFlight`) lets a replication resume a batch's transfer where it stopped (same remote push
transaction, same landed buckets) without a second job in the engine, several batches at once.
Their `Content` counters are shown under the replication's `Transfer`.
"""

from __future__ import annotations

from typing import Any

from accelerator.jobs.base import JobContext

SUB = "Transfer"  # key of the sub-run's checkpoint in the parent's, and of its counters in Content


class SubContext:
    def __init__(self, parent: JobContext, progress: Any, slot: dict[str, Any], query: dict[str, Any], name: str):
        """`slot`: where this run's checkpoint lives, inside the parent's state; `progress`
        makes the parent's whole checkpoint (None: nothing is saved, as for a discard)."""
        self.parent = parent
        self.progress = progress
        self.slot = slot
        self._query = query
        self._name = name
        self._shown: dict[str, Any] = {}

    @property
    def job_id(self) -> str:
        """Distinct per batch: download areas and sender-transfer-ids are keyed by it."""
        return f"{self.parent.job_id}.{self._name}"

    @property
    def query(self) -> dict[str, Any]:
        return self._query

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        return self.slot.get(SUB)

    @property
    def content(self) -> dict[str, Any]:
        return dict(self._shown)

    async def save(self, checkpoint: dict[str, Any] | None = None, *, content: dict[str, Any] | None = None,
                   progress: float | None = None) -> None:
        if checkpoint is not None:
            self.slot[SUB] = checkpoint
        self._shown.update(content or {})
        if self.progress is not None:
            await self.parent.save(self.progress.checkpoint(), content={SUB: dict(self._shown)})

    def report(self, *, content: dict[str, Any] | None = None, progress: float | None = None) -> None:
        self._shown.update(content or {})
        self.parent.report(content={SUB: dict(self._shown)})
