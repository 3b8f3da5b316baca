"""Engine replicas (:mod:`worker.engine.replicas`): how a replica's share of the device is
worked out, and how a :class:`~worker.engine.replicas.ReplicaSet` of FAKE engines (no vLLM)
spreads items."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from common.protocol import WorkItem
from worker.config import GeneratorConfig
from worker.engine.replicas import ReplicaSet, cpu_ranges, replica_config


def test_cpus_are_split_into_one_contiguous_range_per_replica():
    assert cpu_ranges([0, 1], 2) == ["0", "1"]
    assert cpu_ranges([3, 0, 1, 2, 4], 2) == ["0,1,2", "3,4"]
    assert cpu_ranges(range(8), 1) == ["0,1,2,3,4,5,6,7"]
    with pytest.raises(ValueError, match="at least 3 CPUs"):
        cpu_ranges([0, 1], 3)


def test_each_replica_gets_its_share_of_the_device_memory():
    gen = GeneratorConfig(model_path=Path("/m"), replicas=4)
    assert replica_config(gen, on_cpu=False).gpu_memory_utilization == 0.23  # 0.92 / 4
    assert replica_config(gen, on_cpu=True).gpu_memory_utilization is None  # cpu_host's own
    pinned = GeneratorConfig(model_path=Path("/m"), replicas=2, gpu_memory_utilization=0.5)
    assert replica_config(pinned, on_cpu=True).gpu_memory_utilization == 0.25


class FakeEngine:
    """FAKE of :class:`worker.engine.Engine`: runs take ``delay`` seconds and say who ran them."""

    def __init__(self, name: str, delay: float):
        self.name, self.delay, self.alive = name, delay, True
        self.max_num_batched_tokens = 2048
        self.max_model_len = 256
        self.ran: list[str] = []
        self.shut = False

    async def prepare(self, items: list[WorkItem]) -> list[list[int]]:
        return [[len(i.text or "")] for i in items]

    async def run(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        self.ran.append(item.item_id)
        await asyncio.sleep(self.delay)
        return np.zeros(2, dtype=np.float32), 1

    async def log_stats(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.shut = True


def _item(i: int) -> WorkItem:
    return WorkItem(
        item_id=f"i{i}", lease_id="l", lease_seconds=30, model="m", task="embed", text="t"
    )


async def test_items_go_to_the_least_busy_replica_and_the_set_reads_as_one_engine():
    fast, slow = FakeEngine("fast", 0.01), FakeEngine("slow", 0.2)
    engines = ReplicaSet([slow, fast])  # type: ignore[list-item]
    assert engines.max_num_batched_tokens == 4096 and engines.max_model_len == 256
    # 8 items arrive together: 4 each while both are busy ...
    await asyncio.gather(*[engines.run(_item(i), [1]) for i in range(8)])
    assert len(slow.ran) == 4 and len(fast.ran) == 4
    # ... and one at a time, the replica that is free takes it (here always the first).
    for i in range(8, 12):
        await engines.run(_item(i), [1])
    assert len(slow.ran) == 8
    assert await engines.prepare([_item(0)]) == [[1]]
    assert engines.alive
    fast.alive = False
    assert not engines.alive  # one dead replica stops the worker
    await engines.shutdown()
    assert slow.shut and fast.shut
