"""The worker's admission of batch-job inputs to the engine (fast layer; a clock the test
advances): all of them while interactive traffic is quiet, a few tokens at a time while it
flows, and always at least one."""

from __future__ import annotations

import asyncio

from tests.support import FakeClock, wait_until
from worker.batch_gate import BatchGate


async def settle() -> None:
    """Turns of the event loop (no time passes) until every task has entered or waits."""
    for _ in range(100):
        await asyncio.sleep(0)


async def admitted(gate: BatchGate, tokens: list[int]) -> int:
    """How many of these batch inputs enter at once (each holds its place until the end)."""
    release = asyncio.Event()
    inside = 0

    async def one(t: int) -> None:
        nonlocal inside
        async with gate.admit(t):
            inside += 1
            await release.wait()

    tasks = [asyncio.create_task(one(t)) for t in tokens]
    await settle()
    n = inside
    release.set()
    await asyncio.gather(*tasks)
    return n


async def test_quiet_interactive_traffic_lets_all_batch_work_in():
    gate = BatchGate(tokens_beside_interactive=32, quiet_seconds=2.0, clock=FakeClock())
    assert not gate.busy
    assert await admitted(gate, [20] * 10) == 10


async def test_while_interactive_inputs_flow_batch_work_enters_a_few_tokens_at_a_time():
    clock = FakeClock()
    gate = BatchGate(tokens_beside_interactive=32, quiet_seconds=2.0, clock=clock)
    gate.saw_interactive()
    assert gate.busy
    assert await admitted(gate, [10, 10, 10, 10]) == 3  # 30 tokens <= 32 < 40
    assert await admitted(gate, [16, 16]) == 2  # exactly the budget still enters
    assert await admitted(gate, [100, 5]) == 1  # one at a time, at least one
    clock.advance(1.9)
    assert gate.busy
    clock.advance(0.2)
    assert not gate.busy and await admitted(gate, [100, 100]) == 2


async def test_waiting_batch_work_enters_once_interactive_traffic_goes_quiet():
    clock = FakeClock()
    gate = BatchGate(tokens_beside_interactive=8, quiet_seconds=0.2, clock=clock)
    gate.saw_interactive()
    release = asyncio.Event()
    inside = 0

    async def one() -> None:
        nonlocal inside
        async with gate.admit(8):
            inside += 1
            await release.wait()

    tasks = [asyncio.create_task(one()) for _ in range(3)]
    await settle()
    assert inside == 1
    clock.advance(0.3)  # quiet for longer than quiet_seconds: no event needed, the waiting
    await wait_until(lambda: inside == 3, timeout=20, what="all admitted")  # ones look again
    release.set()
    await asyncio.gather(*tasks)
