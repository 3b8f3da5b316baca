"""Text Embeddings Inference's routes (``/embed``, ``/rerank`` with TEI's body, ``/predict``,
``POST /``, ``GET /info``) on the real gateway in process, the test playing the worker; TEI's
bodies name no model (``--default-model``, or the only one served). On a real engine with
``huggingface_hub.InferenceClient``: ``tests/e2e/test_embeddings.py``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import InProcessGateway

EMB = {
    "name": "emb",
    "checkpoint_name": "emb",
    "tasks": ["embed"],
    "max_model_len": 128,
    "prompts": {"query": "q: "},
}
CROSS = {"name": "ce", "checkpoint_name": "ce", "tasks": ["score"], "score_type": "cross-encoder"}
CLF = {"name": "clf", "checkpoint_name": "clf", "tasks": ["classify"], "labels": ["neg", "pos"]}
SCORES = {"Paris": 0.9, "Rome": 0.2, "cats": 0.05}


@pytest.fixture
async def gw() -> Any:
    """A gateway serving ``models`` (default: all three; ``--default-model emb``)."""
    async with InProcessGateway(pickup_timeout_seconds=10, default_model="emb") as g:
        yield g


def value(item: dict[str, Any]) -> list[float]:
    if item["task"] == "score":
        return [SCORES[item["text_pair"]]]
    if item["task"] == "classify":
        return [0.3, 0.7] if item["text"] == "good" else [0.8, 0.2]
    return [0.6, 0.8]


async def serve(
    gw: InProcessGateway, call: Any, models: tuple[dict[str, Any], ...] = (EMB, CROSS, CLF)
) -> tuple[Any, list[dict[str, Any]]]:
    """``call`` answered by this test as a worker of ``models`` (which it advertises)."""
    return await gw.answer_while(call, list(models), value, prompt_tokens=2)


async def test_embed_answers_bare_vectors_with_teis_fields(gw):
    await gw.advertise([EMB, CROSS, CLF])
    body = {"inputs": ["a", "b"], "prompt_name": "query", "truncate": True, "normalize": False}
    r, items = await serve(gw, gw.client.post("/embed", json=body))
    assert r.status_code == 200, r.text
    assert r.json() == [[pytest.approx(0.6), pytest.approx(0.8)]] * 2
    assert [i["model"] for i in items] == ["emb", "emb"]  # --default-model
    assert [i["text"] for i in items] == ["q: a", "q: b"]
    assert all(i["truncate_prompt_tokens"] == 128 and i["normalize"] is False for i in items)
    left = {"inputs": "a", "truncate": True, "truncation_direction": "Left"}
    r, items = await serve(gw, gw.client.post("/embed", json=left))
    assert r.status_code == 200 and items[0]["truncate_side"] == "start"


async def test_without_a_default_the_only_model_served_else_a_400():
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise([EMB])
        r, items = await serve(g, g.client.post("/embed", json={"inputs": "a"}), (EMB,))
        assert r.status_code == 200 and items[0]["model"] == "emb"
        await g.advertise([EMB, CROSS])
        two = await g.client.post("/embed", json={"inputs": "a"})
        assert two.status_code == 400 and "--default-model" in two.json()["error"]["message"]
        call = g.client.post("/embed", json={"inputs": "a", "model": "emb"})
        named, items = await serve(g, call, (EMB, CROSS))
        assert named.status_code == 200 and items[0]["model"] == "emb"


async def test_rerank_with_teis_body_ranks_texts_and_with_cohere_s_body_as_v1(gw):
    await gw.advertise([EMB, CROSS, CLF])
    body = {"model": "ce", "query": "capital?", "texts": list(SCORES), "return_text": True}
    r, items = await serve(gw, gw.client.post("/rerank", json=body))
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"index": 0, "score": pytest.approx(0.9), "text": "Paris"},
        {"index": 1, "score": pytest.approx(0.2), "text": "Rome"},
        {"index": 2, "score": pytest.approx(0.05), "text": "cats"},
    ]
    assert all(i["normalize"] is True for i in items)
    raw = {"model": "ce", "query": "capital?", "texts": ["Rome"], "raw_scores": True}
    r, items = await serve(gw, gw.client.post("/rerank", json=raw))
    assert items[0]["normalize"] is False
    assert r.json() == [{"index": 0, "score": pytest.approx(0.2)}]
    cohere = {"model": "ce", "query": "capital?", "documents": ["Rome"]}
    r, _ = await serve(gw, gw.client.post("/rerank", json=cohere))
    assert r.json()["results"][0]["index"] == 0 and "data" in r.json()


async def test_predict_answers_labels_best_first_and_root_routes_by_the_models_type(gw):
    await gw.advertise([EMB, CROSS, CLF])
    r, _ = await serve(gw, gw.client.post("/predict", json={"model": "clf", "inputs": "good"}))
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"score": pytest.approx(0.7), "label": "pos"},
        {"score": pytest.approx(0.3), "label": "neg"},
    ]
    batch = {"model": "clf", "inputs": ["good", "bad"]}
    r, _ = await serve(gw, gw.client.post("/predict", json=batch))
    assert [[p["label"] for p in one] for one in r.json()] == [["pos", "neg"], ["neg", "pos"]]
    r, _ = await serve(gw, gw.client.post("/", json={"model": "clf", "inputs": "good"}))
    assert r.json()[0]["label"] == "pos"
    r, items = await serve(gw, gw.client.post("/", json={"inputs": "a"}))
    assert r.json() == [[pytest.approx(0.6), pytest.approx(0.8)]] and items[0]["model"] == "emb"


async def test_info_describes_the_model(gw):
    await gw.advertise([EMB, CROSS, CLF])
    info = (await gw.client.get("/info")).json()
    assert info["model_id"] == "emb" and info["model_type"] == {"embedding": {"pooling": "model"}}
    assert info["max_input_length"] == 128 and info["prompts"] == {"query": "q: "}
    clf = (await gw.client.get("/info", params={"model": "clf"})).json()
    assert clf["model_type"]["classifier"]["id2label"] == {"0": "neg", "1": "pos"}
    assert (await gw.client.get("/info", params={"model": "nope"})).status_code == 404
