"""Per-token (multi-vector) embeddings (the ``token_embed`` task): the matrix on the wire
(``rows``, JSON and binary body), the results the gateway refuses, and ``/v1/embeddings`` with
``return_multivector`` with the test playing the worker. On a real ColBERT and engine:
``tests/e2e/test_pair_scoring_models.py``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from common.protocol import ItemResult, ItemSpec, WorkItem, encode_vector
from common.results_body import decode_results, encode_results
from gateway.queue.store import check_result
from tests.support import InProcessGateway

COLBERT = {
    "name": "colbert",
    "checkpoint_name": "colbert",
    "tasks": ["score", "token_embed", "tokenize"],
    "score_type": "late-interaction",
    "max_model_len": 64,
    "vocab_size": 1000,
}
DENSE = {"name": "dense", "checkpoint_name": "dense", "tasks": ["embed"], "vocab_size": 1000}


def item(**kw: Any) -> WorkItem:
    return WorkItem(
        model="m", task="token_embed", text="x", item_id="i", lease_id="l", lease_seconds=5, **kw
    )


def test_a_matrix_travels_row_major_with_its_rows_in_json_and_the_binary_body():
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = ItemResult.ok(item(), matrix, 3)
    assert result.rows == 3 and (result.matrix() == matrix).all()
    vector = ItemResult.ok(item(), np.ones(4, np.float32), 1)
    assert vector.rows is None
    back = decode_results(encode_results("w", [result, vector])).results
    assert [r.model_dump() for r in back] == [result.model_dump(), vector.model_dump()]
    assert (back[0].matrix() == matrix).all()


def _why(spec: ItemSpec, values: int, rows: int | None, limit: int = 64) -> str | None:
    res = ItemResult(
        item_id="i", lease_id="l", vector_b64=encode_vector(np.ones(values, np.float32)), rows=rows
    )
    checked = check_result(res, spec, limit)
    return None if checked.error is None else checked.error.message


@pytest.mark.parametrize(
    ("dimensions", "values", "rows", "why"),
    [
        (None, 12, 3, None),
        (4, 12, 3, None),
        (None, 12, None, "a matrix without rows"),
        (None, 10, 3, "values"),  # not whole rows
        (2, 12, 3, "6 were asked for"),  # rows wider than asked
        (None, 65 * 2, 65, "more than the prompt's tokens (64)"),
    ],
)
def test_the_gateway_refuses_matrices_that_cannot_be_right(dimensions, values, rows, why):
    spec = ItemSpec(model="m", task="token_embed", text="x", dimensions=dimensions)
    got = _why(spec, values, rows)
    assert got is None if why is None else why in str(got)


def test_rows_on_a_single_vector_are_refused():
    spec = ItemSpec(model="m", task="embed", text="x")
    assert "rows for a single vector" in str(_why(spec, 4, 1))


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        yield g


def answer(i: dict[str, Any]) -> dict[str, Any]:
    """The test as a ColBERT worker: one row per character of the text, [c, 0, 0, -c]."""
    rows = np.array([[c, 0, 0, -c] for c in range(1, len(i["text"]) + 1)], "<f4")
    rows = rows[:, : i.get("dimensions") or 4]
    return {
        "prompt_tokens": len(rows),
        "rows": len(rows),
        "vector_b64": base64.b64encode(rows.tobytes()).decode(),
    }


async def test_return_multivector_answers_a_list_of_rows_per_input(gw):
    await gw.advertise([COLBERT])
    body = {"model": "colbert", "input": ["ab", "c"], "return_multivector": True}
    r, items = await gw.answer_while(
        gw.client.post("/v1/embeddings", json=body), [COLBERT], answer, 0
    )
    assert r.status_code == 200, r.text
    assert [d["embedding"] for d in r.json()["data"]] == [
        [[1.0, 0.0, 0.0, -1.0], [2.0, 0.0, 0.0, -2.0]],
        [[1.0, 0.0, 0.0, -1.0]],
    ]
    assert r.json()["usage"]["prompt_tokens"] == 3
    assert [(i["task"], i["normalize"]) for i in items] == [("token_embed", True)] * 2


async def test_dimensions_types_and_base64_apply_to_each_row(gw):
    await gw.advertise([COLBERT])

    async def rows_of(**extra: Any) -> tuple[Any, dict[str, Any]]:
        body = {"model": "colbert", "input": "ab", "return_multivector": True, **extra}
        call = gw.client.post("/v1/embeddings", json=body)
        r, items = await gw.answer_while(call, [COLBERT], answer, 0)
        return r.json()["data"][0]["embedding"], items[0]

    rows, pulled = await rows_of(dimensions=2)
    assert rows == [[1.0, 0.0], [2.0, 0.0]] and pulled["dimensions"] == 2
    rows, _ = await rows_of(encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(s), "<f4").tolist() for s in rows]
    assert decoded == [[1.0, 0.0, 0.0, -1.0], [2.0, 0.0, 0.0, -2.0]]
    rows, _ = await rows_of(embedding_type="ubinary")
    assert rows == [[0b10000000], [0b10000000]]  # each row's sign bits


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"return_logits": [1]}, "return_logits", None),
        ({"embedding_type": "sparse"}, "embedding_type", None),
        ({"model": "dense"}, "model", "unsupported_task"),
    ],
)
async def test_bad_multivector_requests_are_400_naming_the_field(gw, extra, param, code):
    await gw.advertise([COLBERT, DENSE])
    body = {"model": "colbert", "input": "x", "return_multivector": True, **extra}
    r = await gw.client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if code is not None:
        assert r.json()["error"]["code"] == code
