"""accelerator.transfers.budget: memory held by concurrent requests stays within the budget."""

from __future__ import annotations

import anyio
import pytest

from accelerator.transfers.budget import ByteBudget

pytestmark = pytest.mark.anyio


async def test_holders_never_exceed_the_budget():
    budget = ByteBudget(10)
    peak = 0

    async def holder(size: int) -> None:
        nonlocal peak
        async with budget.hold(size):
            peak = max(peak, budget.used)
            await anyio.sleep(0.01)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for size in (4, 4, 4, 6, 3, 25, 1):
                tg.start_soon(holder, size)
    assert peak <= 10 and budget.used == 0


async def test_a_cancelled_holder_gives_its_bytes_back():
    budget = ByteBudget(8)
    with anyio.move_on_after(0.05):
        async with budget.hold(8):
            await anyio.sleep(1)
    assert budget.used == 0
    with anyio.fail_after(1):
        async with budget.hold(8):
            assert budget.used == 8
