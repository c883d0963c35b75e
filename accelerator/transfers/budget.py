"""A byte budget: bounds the memory that concurrent requests hold, whatever their number.

A count of requests (`Threads`) does not bound memory when buckets can be 8 MiB each; a budget in
bytes does. Requests larger than the whole budget take all of it, alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio


class ByteBudget:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._condition: anyio.Condition | None = None  # created in the event loop, on first use

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.capacity)
        if self._condition is None:
            self._condition = anyio.Condition()
        condition = self._condition
        async with condition:
            while self.used + size > self.capacity:
                await condition.wait()
            self.used += size
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with condition:
                    self.used -= size
                    condition.notify_all()
