"""What pull and push jobs share: the bucket worker pool and the live counters of a job.

The pool keeps every worker busy until the last bucket: workers take the next pending bucket
from one queue, so nobody idles while another still has a queue of its own (the plugin's
per-thread tail). The first failure stops the pool: in-flight buckets are cancelled, since their
work is redone from the checkpoint anyway.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio

from protocol.messages import size_mb


async def run_pool(indices: Iterable[int], workers: int, work: Callable[[int], Awaitable[None]]) -> None:
    """Run `work(i)` for every index with at most `workers` at once; the first error cancels the rest."""
    pending = iter(list(indices))

    async def worker() -> None:
        for index in pending:  # a shared iterator: each index is taken exactly once
            await work(index)

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, workers)):
                tg.start_soon(worker)
    except BaseExceptionGroup as group:  # one clear error for the job's ErrorDetails
        raise _first(group) from None


def _first(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


@dataclass
class Counters:
    """The `Content` counters the plugin reports (spec 9.3)."""

    buckets: int
    completed: int = 0  # successful bucket requests (this run and the ones before)
    traffic: int = 0  # wire bytes of bucket bodies, this run
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0

    def bucket_done(self, wire_bytes: int) -> None:
        self.completed += 1
        self.traffic += wire_bytes
        self.last = time.monotonic()

    @property
    def progress(self) -> float:
        return (1 + self.completed) / (2 + self.buckets)

    def network_speed_kbs(self) -> int:
        elapsed_ms = (self.last - self.started) * 1000
        return 0 if elapsed_ms < 10 else int(self.traffic * 1000 / (1024 * elapsed_ms))

    def content(self, size_key: str, total_wire: int) -> dict[str, int]:
        return {
            "CompletedHttpQueries": self.completed,
            size_key: size_mb(total_wire),
            "NetworkSpeedKBs": self.network_speed_kbs(),
        }
