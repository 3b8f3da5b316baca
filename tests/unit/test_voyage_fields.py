"""Voyage AI's embeddings fields (what the ``voyageai`` SDK sends) on ``/v1/embeddings``,
honoured or refused, never dropped: on the real gateway in process, the test playing the
worker (``input_type``, a named prompt: ``test_named_prompts.py``). On a real engine with the
SDK itself: ``tests/e2e/test_embeddings.py``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gateway.api.quantize import quantize
from tests.support import InProcessGateway

EMBEDDER = {
    "name": "emb",
    "checkpoint_name": "emb",
    "tasks": ["embed"],
    "max_model_len": 128,
    "quantization_range": [-0.5, 0.5],
}
VECTOR = [0.31, -0.2, 0.0, 0.49, -0.5, 0.7, -0.01, 0.12]


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise([EMBEDDER])
        yield g


async def embed(gw: InProcessGateway, **fields: Any) -> tuple[Any, list[dict[str, Any]]]:
    call = gw.client.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"], **fields})
    # as a worker answers: the first ``dimensions`` components
    return await gw.answer_while(
        call, [EMBEDDER], lambda i: VECTOR[: i.get("dimensions") or None], prompt_tokens=3
    )


async def test_output_dimension_and_output_dtype_are_dimensions_and_embedding_type(gw):
    r, items = await embed(gw, output_dimension=4, output_dtype="int8")
    assert r.status_code == 200, r.text
    assert [i["dimensions"] for i in items] == [4, 4]  # matryoshka, in the worker
    want = quantize(np.array([VECTOR[:4]], dtype=np.float32), "int8", [-0.5, 0.5])[0].tolist()
    assert [d["embedding"] for d in r.json()["data"]] == [want, want]
    same, _ = await embed(gw, output_dimension=4, dimensions=4, output_dtype="binary")
    assert same.status_code == 200, same.text
    assert len(same.json()["data"][0]["embedding"]) == 1  # 4 sign bits, packed in one byte


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"output_dimension": 4, "dimensions": 8}, "output_dimension"),
        ({"output_dtype": "int8", "embedding_type": "binary"}, "output_dtype"),
        ({"input_type": "poem"}, "input_type"),
        ({"output_dtype": "float16"}, "output_dtype"),
    ],
)
async def test_conflicts_and_what_is_not_served_are_400s_with_nothing_queued(gw, fields, param):
    r = await gw.client.post("/v1/embeddings", json={"model": "emb", "input": "a", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert await gw.store.depth() == {}


async def test_truncation_true_truncates_to_the_models_context_and_otherwise_not(gw):
    r, items = await embed(gw, truncation=True)
    assert r.status_code == 200, r.text
    assert [i["truncate_prompt_tokens"] for i in items] == [128, 128]
    r, items = await embed(gw, truncation=True, truncate_prompt_tokens=16)
    assert [i["truncate_prompt_tokens"] for i in items] == [16, 16]  # the explicit one wins
    for off in ({"truncation": False}, {}):
        r, items = await embed(gw, **off)
        assert r.status_code == 200 and all("truncate_prompt_tokens" not in i for i in items)
