"""``POST /v1/score`` (vLLM's shape) and ``/v1/rerank`` for every score type, on the real
gateway in process; the test plays the worker over the queue protocol (pull, post), so what
the gateway queues for each score type and how it turns results into scores is checked
exactly, without vLLM (the end-to-end tests on real engines: ``test_pair_scoring.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tests.support import InProcessGateway

CROSS = {"name": "ce", "checkpoint_name": "ce", "tasks": ["score"], "score_type": "cross-encoder"}
CAUSAL = {
    "name": "lm",
    "checkpoint_name": "lm",
    "tasks": ["score"],
    "score_type": "causal-lm",
    "vocab_size": 100,
    "rerank": {
        "template": "Q: {query} D: {document} I: {instruction}",
        "instruction": "judge",
        "false_token_id": 3,
        "true_token_id": 7,
    },
}


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise([CROSS, CAUSAL])
        yield g


async def serve(gw: InProcessGateway, call: Any, values: Any) -> tuple[Any, list[dict[str, Any]]]:
    """``call`` answered by this test as the worker (5 prompt tokens each; see ``answer_while``)."""
    return await gw.answer_while(call, [CROSS, CAUSAL], values, prompt_tokens=5)


SCORES = {"Paris is the capital.": 0.9, "Brasilia is a capital.": 0.2, "Cats purr.": 0.05}


async def test_score_pairs_one_text_1_with_every_text_2_in_vllms_shape(gw):
    docs = list(SCORES)
    r, items = await serve(
        gw,
        gw.client.post("/v1/score", json={"model": "ce", "text_1": "capital?", "text_2": docs}),
        lambda i: [SCORES[i["text_pair"]]],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(i["text"], i["text_pair"], i["task"]) for i in items] == [
        ("capital?", d, "score") for d in docs
    ]
    assert body["object"] == "list" and body["model"] == "ce" and body["id"].startswith("score-")
    assert isinstance(body["created"], int)
    assert body["data"] == [
        {"index": k, "object": "score", "score": pytest.approx(SCORES[d], abs=1e-6)}
        for k, d in enumerate(docs)
    ]
    assert body["usage"] == {"prompt_tokens": 15, "total_tokens": 15, "completion_tokens": 0}


async def test_score_pairs_n_to_n_and_refuses_lists_of_different_lengths(gw):
    r, items = await serve(
        gw,
        gw.client.post(
            "/v1/score", json={"model": "ce", "text_1": ["a", "b"], "text_2": ["x", "y"]}
        ),
        lambda i: [0.5],
    )
    assert r.status_code == 200, r.text
    assert [(i["text"], i["text_pair"]) for i in items] == [("a", "x"), ("b", "y")]
    bad = await gw.client.post(
        "/v1/score", json={"model": "ce", "text_1": ["a", "b"], "text_2": ["x", "y", "z"]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_1"
    assert "1:1, 1:N (one text_1) or N:N" in bad.json()["error"]["message"]
    empty = await gw.client.post("/v1/score", json={"model": "ce", "text_1": "a", "text_2": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "text_2"


async def test_use_activation_false_and_truncation_reach_the_worker(gw):
    r, items = await serve(
        gw,
        gw.client.post(
            "/v1/score",
            json={
                "model": "ce",
                "text_1": "q",
                "text_2": "d",
                "use_activation": False,
                "truncate_prompt_tokens": 32,
            },
        ),
        lambda i: [-2.5],
    )
    assert r.status_code == 200, r.text
    assert items[0]["normalize"] is False and items[0]["truncate_prompt_tokens"] == 32
    assert r.json()["data"][0]["score"] == -2.5


async def test_rerank_on_a_cross_encoder_sorts_by_its_scores(gw):
    docs = list(SCORES)
    r, items = await serve(
        gw,
        gw.client.post(
            "/v1/rerank",
            json={"model": "ce", "query": "capital?", "documents": docs, "top_n": 0},
        ),
        lambda i: [SCORES[i["text_pair"]]],
    )
    assert r.status_code == 200, r.text
    assert all(i["text"] == "capital?" and "return_logits" not in i for i in items)
    got = [(d["index"], round(d["relevance_score"], 6)) for d in r.json()["data"]]
    assert got == [(0, 0.9), (1, 0.2), (2, 0.05)]  # top_n 0 (vLLM's default): all


async def test_score_on_a_causal_lm_is_p_true_or_the_log_odds(gw):
    """The model's rerank prompt with the pair, the logits of its (false, true) tokens: the
    score is P(true) (their softmax, done by the worker), or without activation the log-odds
    logit(true) - logit(false), whose sigmoid is P(true)."""

    def softmax_or_raw(i: dict[str, Any]) -> list[float]:
        logits = np.array([1.0, 3.0])
        if not i["normalize"]:
            return logits.tolist()
        z = np.exp(logits - logits.max())
        return (z / z.sum()).tolist()

    r, items = await serve(
        gw,
        gw.client.post("/v1/score", json={"model": "lm", "text_1": "q", "text_2": "d"}),
        softmax_or_raw,
    )
    assert r.status_code == 200, r.text
    assert items[0]["fields"] == {"query": "q", "document": "d", "instruction": "judge"}
    assert items[0]["return_logits"] == [3, 7] and items[0]["prompt_template"].startswith("Q:")
    p_true = r.json()["data"][0]["score"]
    assert p_true == pytest.approx(1 / (1 + np.exp(-2.0)), abs=1e-6)
    raw, _ = await serve(
        gw,
        gw.client.post(
            "/v1/score",
            json={"model": "lm", "text_1": "q", "text_2": "d", "use_activation": False},
        ),
        softmax_or_raw,
    )
    assert raw.json()["data"][0]["score"] == pytest.approx(2.0, abs=1e-6)
    truncated = await gw.client.post(
        "/v1/score",
        json={"model": "lm", "text_1": "q", "text_2": "d", "truncate_prompt_tokens": 8},
    )
    assert truncated.status_code == 400
    assert truncated.json()["error"]["param"] == "truncate_prompt_tokens"


async def test_causal_lm_only_features_are_refused_on_other_score_types(gw):
    logits = await gw.client.post(
        "/v1/embeddings", json={"model": "ce", "input": "x", "return_logits": [1, 2]}
    )
    assert logits.status_code == 400
    err = logits.json()["error"]
    assert err["param"] == "return_logits" and "causal-LM" in err["message"]
    assert "cross-encoder" in err["message"]
    template = await gw.client.post(
        "/v1/rerank",
        json={"model": "ce", "query": "q", "documents": ["d"], "prompt_template": "{query}"},
    )
    assert template.status_code == 400
    assert template.json()["error"]["param"] == "prompt_template"


async def test_a_pair_result_of_the_wrong_length_is_rejected_and_redelivered(gw):
    """A pair's answer is one float: two floats are a bad result, retried; the good second
    attempt answers the client."""
    attempts: list[int] = []

    def values(i: dict[str, Any]) -> list[float]:
        attempts.append(i["attempt"])
        return [0.1, 0.2] if i["attempt"] == 1 else [0.7]

    r, _ = await serve(
        gw, gw.client.post("/v1/score", json={"model": "ce", "text_1": "q", "text_2": "d"}), values
    )
    assert r.status_code == 200, r.text
    assert attempts == [1, 2] and r.json()["data"][0]["score"] == pytest.approx(0.7)


async def test_models_tell_the_score_type(gw):
    cards = {m["id"]: m for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert cards["ce"]["score_type"] == "cross-encoder"
    assert cards["lm"]["score_type"] == "causal-lm"


async def test_return_logits_serve_a_causal_lm_and_refuse_what_logits_cannot_take(gw):
    body = {"model": "lm", "input": "x", "return_logits": [3, 7]}
    r, items = await serve(gw, gw.client.post("/v1/embeddings", json=body), lambda i: [0.5, 1.5])
    assert r.status_code == 200, r.text
    assert items[0]["return_logits"] == [3, 7] and items[0]["task"] == "score"
    assert r.json()["data"][0]["embedding"] == [0.5, 1.5]
    for extra, param in (
        ({"dimensions": 2}, "dimensions"),
        ({"embedding_type": "int8"}, "embedding_type"),
    ):
        bad = await gw.client.post("/v1/embeddings", json={**body, **extra})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, extra
        assert "return_logits" in bad.json()["error"]["message"]
    float_type = {**body, "embedding_type": "float"}
    r, _ = await serve(gw, gw.client.post("/v1/embeddings", json=float_type), lambda i: [0.5, 1.5])
    assert r.status_code == 200, r.text


async def test_pair_scoring_before_a_worker_said_how_is_a_503():
    """A model declared with ``--model`` and no advert yet: pair scoring cannot be prepared."""
    async with InProcessGateway(pickup_timeout_seconds=10, models=["later"]) as g:
        r = await g.client.post(
            "/v1/rerank", json={"model": "later", "query": "q", "documents": ["d"]}
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_worker_available"
        assert r.json()["error"]["type"] == "server_error"
        assert "advertised how it scores pairs for 'later'" in r.json()["error"]["message"]


async def test_a_request_in_flight_is_counted_until_it_is_answered(gw):
    serving = gw.app.state.serving
    seen: list[int] = []

    def values(i: dict[str, Any]) -> list[float]:
        seen.append(serving.in_flight)
        return [0.5]

    body = {"model": "ce", "text_1": "q", "text_2": "d"}
    r, _ = await serve(gw, gw.client.post("/v1/score", json=body), values)
    assert r.status_code == 200 and seen == [1] and serving.in_flight == 0


async def test_a_long_query_and_a_failed_input_name_their_field(gw):
    short = {**CROSS, "name": "short", "max_model_len": 16}
    await gw.advertise([short], worker_id="w2")
    long = {"model": "short", "query": "q" * 10_000, "documents": ["d"]}
    r = await gw.client.post("/v1/rerank", json=long)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "query"

    async def failing() -> Any:
        call = asyncio.ensure_future(
            gw.client.post("/v1/score", json={"model": "ce", "text_1": "q", "text_2": ["a", "b"]})
        )
        pulled: list[dict[str, Any]] = []
        while len(pulled) < 2:
            body = {"worker_id": "w", "models": [CROSS, CAUSAL], "max_items": 8, "wait_seconds": 1}
            pulled += (await gw.worker.post("/pull", json=body)).json()["items"]
        results = [
            {
                "item_id": i["item_id"],
                "lease_id": i["lease_id"],
                "prompt_tokens": 1,
                "error": {"code": "invalid_input", "message": "bad text"},
            }
            for i in pulled
        ]
        posted = await gw.worker.post("/results", json={"worker_id": "w", "results": results})
        assert posted.json()["accepted"] == 2, posted.text
        return await call

    r = await failing()
    assert r.status_code == 400 and r.json()["error"]["param"] == "text_2", r.text
    assert "text_2[0]" in r.json()["error"]["message"]


async def test_a_causal_rerank_scores_p_true_and_checks_its_template_and_size(gw):
    body = {"model": "lm", "query": "q", "documents": ["d1", "d2"]}
    r, _ = await serve(gw, gw.client.post("/v1/rerank", json=body), lambda i: [0.2, 0.7])
    assert r.status_code == 200, r.text
    assert [d["relevance_score"] for d in r.json()["data"]] == [pytest.approx(0.7)] * 2  # P(yes)
    bad = await gw.client.post("/v1/rerank", json={**body, "prompt_template": "{% if %}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_template"
    # the template counts in every pair: 1,200 x 60,000 characters, over --max-rerank-bytes
    huge = {
        **body,
        "documents": ["d"] * 1200,
        "prompt_template": "{query} {document} " + "x" * 60_000,
    }
    r = await gw.client.post("/v1/rerank", json=huge)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"


async def test_an_over_long_pair_names_its_field(gw):
    short = {**CROSS, "name": "short-ce", "max_model_len": 16}
    await gw.advertise([short], worker_id="w3")
    long = "d" * 5_000
    r = await gw.client.post("/v1/score", json={"model": "short-ce", "text_1": "q", "text_2": long})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text_2"
    assert "text_2[0]" in r.json()["error"]["message"]
    rr = {"model": "short-ce", "query": "q", "documents": ["ok", long]}
    r = await gw.client.post("/v1/rerank", json=rr)
    assert r.status_code == 400 and "documents[1]" in r.json()["error"]["message"]
