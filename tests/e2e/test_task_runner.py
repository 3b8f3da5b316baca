"""How the worker's task runner (``worker/engine/tasks.py``) hands requests to vLLM, seen from
a FAKE engine core that records them (vLLM's own request types, no model): a query shared by
several documents in flight is embedded once, and every request carries its item's priority
to vLLM's priority scheduling. End-to-end layer because it imports vLLM (no engine starts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np

from common.protocol import WorkItem
from worker.engine.prepare import PairPrompt
from worker.engine.tasks import Runner


class RecordingCore:
    """FAKE engine core: each ``encode`` is recorded (its token ids and priority, and its LoRA
    request apart) and answered, after a turn of the event loop, with the token ids as its
    vector."""

    def __init__(self) -> None:
        self.requests: list[tuple[list[int], int]] = []
        self.loras: list[Any] = []
        self.errored = False

    async def encode(
        self, prompt: Any, params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[Any]:
        import torch

        ids = list(prompt["prompt_token_ids"])
        self.requests.append((ids, priority))
        self.loras.append(lora_request)
        await asyncio.sleep(0)
        yield SimpleNamespace(
            outputs=SimpleNamespace(data=torch.tensor(ids, dtype=torch.float32)),
            prompt_token_ids=ids,
            finished=True,
        )


def item(i: int, priority: int | None = None) -> WorkItem:
    return WorkItem(
        item_id=f"i{i}",
        lease_id="1:w",
        lease_seconds=30,
        attempt=1,
        model="m",
        task="score",
        text="q",
        text_pair=f"d{i}",
        priority=priority,
    )


async def test_a_query_shared_by_documents_in_flight_is_embedded_once() -> None:
    core = RecordingCore()
    runner = Runner(core, "bi-encoder", 128, "/m", "m")  # type: ignore[arg-type]
    query = [5, 6, 7]
    docs = [[10 + i, 20 + i, 30 + i] for i in range(8)]
    scores = await asyncio.gather(
        *[runner.run(item(i), PairPrompt(query, d)) for i, d in enumerate(docs)]
    )
    asked = [ids for ids, _ in core.requests]
    assert asked.count(query) == 1 and len(asked) == 1 + len(docs)
    for (score, _), d in zip(scores, docs, strict=True):
        want = np.dot(query, d) / (np.linalg.norm(query) * np.linalg.norm(d))
        assert abs(float(score[0]) - want) < 1e-6
    # once that query's request is done, a later pair asks for it again (nothing is cached)
    await runner.run(item(99), PairPrompt(query, [1, 2, 3]))
    assert [ids for ids, _ in core.requests].count(query) == 2


async def test_every_request_carries_its_items_priority() -> None:
    core = RecordingCore()
    runner = Runner(core, "bi-encoder", 128, "/m", "m")  # type: ignore[arg-type]
    batch = WorkItem(
        item_id="b", lease_id="1:w", lease_seconds=30, attempt=1, model="m", task="embed",
        text="x", priority=1,
    )  # fmt: skip
    interactive = batch.model_copy(update={"item_id": "i", "priority": None})
    await runner.run(batch, [1, 2])
    await runner.run(interactive, [3, 4])
    await runner.run(item(0, priority=1), PairPrompt([5], [6]))
    assert [p for _, p in core.requests] == [1, 0, 1, 1]


async def test_every_request_carries_its_model_names_lora_adapter() -> None:
    """An item runs with the adapter its model name has (none for a name without one), and a
    query shared by pairs in flight is shared within one model name only: an adapter's query
    vector is not the base model's."""
    core = RecordingCore()
    adapters = {"tuned": "LoRA(tuned)"}  # stands in for vLLM's LoRARequest
    runner = Runner(core, "bi-encoder", 128, "/m", "m", adapters=adapters)  # type: ignore[arg-type]
    base = item(0)
    tuned = item(1).model_copy(update={"model": "tuned"})
    await asyncio.gather(
        runner.run(base, PairPrompt([5], [6])), runner.run(tuned, PairPrompt([5], [7]))
    )
    asked = [
        (ids, lora or "base") for (ids, _), lora in zip(core.requests, core.loras, strict=True)
    ]
    assert sorted(asked) == [
        ([5], "LoRA(tuned)"),
        ([5], "base"),
        ([6], "base"),
        ([7], "LoRA(tuned)"),
    ]
