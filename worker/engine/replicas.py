"""Engine replicas: ``generator.replicas = N`` vLLM engines of one model in one worker, sharing
its device, behind the one pull -> infer -> post loop.

A worker pulls from the queue only what it has room for, so N engines need no load balancer
of their own: every pulled item goes to the replica with the fewest items running
(:class:`ReplicaSet`), and the worker's capacity is N times one engine's. Each replica gets
``1 / N`` of the device: ``gpu_memory_utilization`` divided by N (vLLM's 0.92 when unset on a
GPU; the CPU host's own choice otherwise, :mod:`worker.cpu_host`), and on a CPU host its own
cores (``VLLM_CPU_OMP_THREADS_BIND``: the CPUs this process may use, split into N ranges).

What a replica buys is parallel CPU work around the device: each engine has its own engine
core (scheduling, input and output processing), which on a GPU with a small model, not the
GPU, sets the pace (``docs/cpu-hosts.md``, "GPU hosts").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.protocol import SparseEmbedding, WorkItem
from worker.config import GeneratorConfig
from worker.engine.engine import Engine
from worker.engine.errors import InvalidInput
from worker.engine.lora import Adapters
from worker.engine.prepare import Prompt
from worker.engine.thread import environ

log = logging.getLogger(__name__)

#: vLLM's default ``gpu_memory_utilization`` on a GPU, split between replicas when unset.
VLLM_GPU_MEMORY_UTILIZATION = 0.92


def cpu_ranges(cpus: Sequence[int], n: int) -> list[str]:
    """``cpus`` split into ``n`` contiguous groups as ``VLLM_CPU_OMP_THREADS_BIND`` values
    (``"0-3"``, ``"4"`` ...). Raises ValueError with fewer CPUs than replicas."""
    cpus = sorted(cpus)
    if len(cpus) < n:
        raise ValueError(
            f"{n} engine replicas need at least {n} CPUs; this process has {len(cpus)}"
        )
    size, extra = divmod(len(cpus), n)
    out, start = [], 0
    for i in range(n):
        group = cpus[start : start + size + (i < extra)]
        start += len(group)
        out.append(",".join(str(c) for c in group))
    return out


def replica_config(gen: GeneratorConfig, on_cpu: bool) -> GeneratorConfig:
    """One replica's ``[generator]``: its share of the device's memory."""
    n = gen.replicas
    fraction = gen.gpu_memory_utilization
    if fraction is None and not on_cpu:
        fraction = VLLM_GPU_MEMORY_UTILIZATION
    if fraction is None:
        return gen
    return gen.model_copy(update={"gpu_memory_utilization": round(fraction / n, 4)})


def start(
    gen: GeneratorConfig, model_name: str, on_cpu: bool, adapters: Adapters | None = None
) -> Engine | ReplicaSet:
    """The engine of ``gen`` serving ``adapters`` too, or with ``replicas > 1`` a
    :class:`ReplicaSet` of them, started one after the other (a failure stops those already
    started and is raised)."""
    if gen.replicas == 1:
        return Engine.start(gen, model_name, adapters)
    one = replica_config(gen, on_cpu)
    binds: list[str | None] = [None] * gen.replicas
    if on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        binds = list(cpu_ranges(sorted(os.sched_getaffinity(0)), gen.replicas))
    engines: list[Engine] = []
    try:
        for i, bind in enumerate(binds):
            log.info(
                "starting engine replica %d of %d (gpu_memory_utilization %s%s)",
                i + 1,
                gen.replicas,
                one.gpu_memory_utilization,
                f", CPUs {bind}" if bind else "",
            )
            with environ("VLLM_CPU_OMP_THREADS_BIND", bind):
                engines.append(Engine.start(one, model_name, adapters))
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return ReplicaSet(engines)


class ReplicaSet:
    """N started :class:`~worker.engine.Engine` s of one model, used as one by the worker
    loop: prompts are prepared by the first (they share the tokenizer), each item runs on the
    replica with the fewest items running. Alive while every replica is (one dead engine
    stops the worker, as a single engine's death does); the adverts' facts are the first's."""

    def __init__(self, engines: list[Engine]):
        assert engines
        self.engines = engines
        self._running = [0] * len(engines)

    def __getattr__(self, name: str) -> Any:
        # The facts every replica shares (max_model_len, score_type, labels, tokenizer ...).
        return getattr(self.engines[0], name)

    @property
    def alive(self) -> bool:
        return all(e.alive for e in self.engines)

    @property
    def max_num_batched_tokens(self) -> int:
        """Tokens of one engine step, summed over the replicas (the worker's token room)."""
        return sum(e.max_num_batched_tokens for e in self.engines)

    @property
    def replicas(self) -> int:
        return len(self.engines)

    async def prepare(self, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        return await self.engines[0].prepare(items)

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray | SparseEmbedding, int]:
        i = min(range(len(self.engines)), key=self._running.__getitem__)
        self._running[i] += 1
        try:
            return await self.engines[i].run(item, prompt)
        finally:
            self._running[i] -= 1

    async def log_stats(self) -> None:
        for engine in self.engines:
            await engine.log_stats()

    async def shutdown(self) -> None:
        for engine in self.engines:
            await engine.shutdown()
