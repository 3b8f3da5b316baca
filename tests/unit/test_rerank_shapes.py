"""Rerank in the shapes RAG stacks call, on the real gateway in process (the test plays the
worker): Fireworks' ``data`` and Cohere's / Jina's ``results`` in one body, at ``/v1/rerank``,
``/rerank`` and ``/v2/rerank``; documents as strings or ``{"text": ...}``; a per-request
``instruction`` for causal-LM rerankers; Cohere's fields that would change the result refused;
the ``cohere`` SDK's ``ClientV2.rerank`` and ``Client.rerank`` (v1) unchanged. On real engines:
``tests/e2e/test_pair_scoring_models.py``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import InProcessGateway
from tests.unit.test_pair_api import CAUSAL, CROSS, SCORES, serve

DOCS = list(SCORES)  # scores 0.9, 0.2, 0.05
WANT = [0, 1, 2]


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise([CROSS, CAUSAL])
        yield g


def by_text(item: dict[str, Any]) -> list[float]:
    return [SCORES[item["text_pair"]]]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v2/rerank"])
async def test_every_rerank_path_answers_both_shapes(gw, path):
    docs = [DOCS[2], {"text": DOCS[0], "title": "ignored"}, DOCS[1]]  # strings and objects
    body = {"model": "ce", "query": "q", "documents": docs, "top_n": 2, "return_documents": True}
    r, items = await serve(gw, gw.client.post(path, json=body), by_text)
    assert r.status_code == 200, r.text
    assert [i["text_pair"] for i in items] == [DOCS[2], DOCS[0], DOCS[1]]
    got = r.json()
    assert got["id"].startswith("rerank-") and got["model"] == "ce"
    assert got["usage"] == {"prompt_tokens": 15, "total_tokens": 15, "completion_tokens": 0}
    # Fireworks: the document as a string; Cohere and Jina: as {"text": ...}; same ranking
    assert [(d["index"], d["document"]) for d in got["data"]] == [(1, DOCS[0]), (2, DOCS[1])]
    assert [(d["index"], d["document"]) for d in got["results"]] == [
        (1, {"text": DOCS[0]}),
        (2, {"text": DOCS[1]}),
    ]
    assert [d["relevance_score"] for d in got["results"]] == pytest.approx([0.9, 0.2])


async def test_documents_appear_only_when_asked(gw):
    body = {"model": "ce", "query": "q", "documents": DOCS}
    r, _ = await serve(gw, gw.client.post("/v2/rerank", json=body), by_text)
    assert r.status_code == 200, r.text
    assert all("document" not in d for d in r.json()["results"] + r.json()["data"])
    assert [d["index"] for d in r.json()["results"]] == WANT


async def test_an_instruction_replaces_a_causal_rerankers_for_this_request(gw):
    body = {"model": "lm", "query": "q", "documents": ["d1", "d2"], "instruction": "find poems"}
    r, items = await serve(gw, gw.client.post("/rerank", json=body), lambda i: [0.0, 1.0])
    assert r.status_code == 200, r.text
    assert [i["fields"]["instruction"] for i in items] == ["find poems", "find poems"]
    plain = {"model": "lm", "query": "q", "documents": ["d1"]}
    r, items = await serve(gw, gw.client.post("/rerank", json=plain), lambda i: [0.0, 1.0])
    assert r.status_code == 200 and items[0]["fields"]["instruction"] == "judge"  # the model's


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens_per_doc", 512),
        ("relevant_spans", {"mode": "enabled"}),
        ("rank_fields", ["title"]),
        ("max_chunks_per_doc", 10),
    ],
)
async def test_cohere_fields_that_would_change_the_result_are_refused(gw, field, value):
    body = {"model": "ce", "query": "q", "documents": DOCS, field: value}
    r = await gw.client.post("/v2/rerank", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and "not supported" in r.json()["error"]["message"]
    assert (await gw.store.depth()).get("ce", 0) == 0  # nothing queued


async def test_relevant_spans_disabled_is_served(gw):
    body = {"model": "ce", "query": "q", "documents": DOCS, "relevant_spans": {"mode": "disabled"}}
    r, _ = await serve(gw, gw.client.post("/v2/rerank", json=body), by_text)
    assert r.status_code == 200, r.text


async def test_an_instruction_on_a_cross_encoder_is_refused(gw):
    body = {"model": "ce", "query": "q", "documents": DOCS, "instruction": "x"}
    r = await gw.client.post("/v1/rerank", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "instruction"


async def test_a_document_object_needs_text_and_its_text_is_checked(gw):
    no_text = {"model": "ce", "query": "q", "documents": [{"title": "t"}]}
    assert (await gw.client.post("/rerank", json=no_text)).status_code in (400, 422)
    surrogate = '{"model": "ce", "query": "q", "documents": [{"text": "a\\ud800"}]}'
    r = await gw.client.post(
        "/rerank", content=surrogate, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "documents[0]" in r.json()["error"]["message"]


async def test_the_cohere_sdk_v2_and_v1_rerank_unchanged(gw):
    cohere = pytest.importorskip("cohere")
    v2 = cohere.AsyncClientV2(api_key=gw.API_KEY, base_url="http://gateway", httpx_client=gw.client)
    r, _ = await serve(gw, v2.rerank(model="ce", query="q", documents=DOCS, top_n=2), by_text)
    assert [(x.index, round(x.relevance_score, 6)) for x in r.results] == [(0, 0.9), (1, 0.2)]
    v1 = cohere.AsyncClient(api_key=gw.API_KEY, base_url="http://gateway", httpx_client=gw.client)
    call = v1.rerank(
        model="ce", query="q", documents=[{"text": d} for d in DOCS], return_documents=True
    )
    r, _ = await serve(gw, call, by_text)
    assert [x.index for x in r.results] == WANT
    assert [x.document.text for x in r.results] == DOCS
