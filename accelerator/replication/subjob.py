"""A pull or push run inside a replication job, with its checkpoint kept in the replication's.

The pull and push drivers resume from what they saved with `ctx.save`; giving them a context
whose checkpoint is one key of the replication's checkpoint lets a replication resume a batch's
transfer where it stopped (same remote push transaction, same landed buckets) without a second
job in the engine. Their `Content` counters are shown under the replication's `Transfer`.
"""

from __future__ import annotations

from typing import Any

from accelerator.jobs.base import JobContext

SUB = "Transfer"  # key of the sub-run's checkpoint in the parent's, and of its counters in Content


class SubContext:
    def __init__(self, parent: JobContext, state: dict[str, Any], query: dict[str, Any], name: str):
        self.parent = parent
        self.state = state  # the parent's checkpoint, updated in place
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
        return self.state.get(SUB)

    @property
    def content(self) -> dict[str, Any]:
        return dict(self._shown)

    async def save(self, checkpoint: dict[str, Any] | None = None, *, content: dict[str, Any] | None = None,
                   progress: float | None = None) -> None:
        if checkpoint is not None:
            self.state[SUB] = checkpoint
        self._shown.update(content or {})
        await self.parent.save(self.state, content={SUB: dict(self._shown)})

    def report(self, *, content: dict[str, Any] | None = None, progress: float | None = None) -> None:
        self._shown.update(content or {})
        self.parent.report(content={SUB: dict(self._shown)})
