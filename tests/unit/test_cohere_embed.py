"""Cohere's embed API (``/v2/embed``, ``/v1/embed``) on the real gateway in process, the test
playing the worker; the ``cohere`` SDK's ``ClientV2.embed`` and v1 ``Client.embed`` unchanged.
On a real engine: ``tests/e2e/test_embeddings.py::test_the_cohere_sdk_embeds``."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from gateway.api.quantize import quantize
from tests.support import InProcessGateway

QUERY = "query: "
MODEL = {
    "name": "emb",
    "checkpoint_name": "emb",
    "tasks": ["embed"],
    "max_model_len": 128,
    "quantization_range": [-0.5, 0.5],
    "prompts": {"query": QUERY, "document": ""},
}
VECTOR = [0.31, -0.2, 0.0, 0.49, -0.5, 0.7, -0.01, 0.12]


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise([MODEL])
        yield g


async def serve(gw: InProcessGateway, call: Any) -> tuple[Any, list[dict[str, Any]]]:
    return await gw.answer_while(
        call, [MODEL], lambda i: VECTOR[: i.get("dimensions") or None], prompt_tokens=3
    )


async def test_the_cohere_sdk_v2_embeds_every_type_from_one_vector(gw):
    cohere = pytest.importorskip("cohere")
    v2 = cohere.AsyncClientV2(api_key=gw.API_KEY, base_url="http://gateway", httpx_client=gw.client)
    kinds = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    call = v2.embed(model="emb", texts=["a", "b"], input_type="search_query", embedding_types=kinds)
    r, items = await serve(gw, call)
    assert [i["text"] for i in items] == [QUERY + "a", QUERY + "b"]  # the query prompt
    assert [i["truncate_prompt_tokens"] for i in items] == [128, 128]  # truncate END (default)
    e = r.embeddings
    want = np.array([VECTOR, VECTOR], dtype=np.float32)
    assert np.allclose(e.float_, want)
    for kind in ("int8", "uint8", "binary", "ubinary"):
        assert getattr(e, kind) == quantize(want, kind, [-0.5, 0.5]).tolist(), kind
    assert np.frombuffer(base64.b64decode(e.base64[0]), "<f4").tolist() == want[0].tolist()
    assert r.texts == ["a", "b"] and r.meta.billed_units.input_tokens == 6


async def test_the_cohere_sdk_v1_embeds_floats_as_a_list(gw):
    cohere = pytest.importorskip("cohere")
    v1 = cohere.AsyncClient(api_key=gw.API_KEY, base_url="http://gateway", httpx_client=gw.client)
    r, items = await serve(gw, v1.embed(model="emb", texts=["a"], input_type="search_document"))
    assert r.response_type == "embeddings_floats"
    assert np.allclose(r.embeddings, [VECTOR]) and items[0]["text"] == "a"  # "" prompt
    call = v1.embed(model="emb", texts=["a"], embedding_types=["int8"], truncate="NONE")
    r, items = await serve(gw, call)
    assert r.response_type == "embeddings_by_type" and len(r.embeddings.int8[0]) == 8
    assert "truncate_prompt_tokens" not in items[0]  # NONE: an over-long text is refused


async def test_truncate_start_keeps_the_end_of_a_text(gw):
    body = {"model": "emb", "texts": ["a"], "truncate": "START"}
    r, items = await serve(gw, gw.client.post("/v2/embed", json=body))
    assert r.status_code == 200, r.text
    assert items[0]["truncate_prompt_tokens"] == 128 and items[0]["truncate_side"] == "start"


async def test_output_dimension_and_max_tokens(gw):
    body = {"model": "emb", "texts": ["a"], "output_dimension": 4, "max_tokens": 16}
    r, items = await serve(gw, gw.client.post("/v2/embed", json=body))
    assert r.status_code == 200, r.text
    assert items[0]["dimensions"] == 4 and items[0]["truncate_prompt_tokens"] == 16
    assert len(r.json()["embeddings"]["float"][0]) == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"images": ["data:image/png;base64,AAAA"]}, "images"),
        ({"texts": []}, "texts"),
        ({"texts": ["a"], "input_type": "poem"}, "input_type"),
        ({"texts": ["a"], "embedding_types": ["float16"]}, "embedding_types"),
    ],
)
async def test_what_is_not_served_is_a_400_naming_the_field(gw, body, param):
    r = await gw.client.post("/v2/embed", json={"model": "emb", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert await gw.store.depth() == {}
