"""Scoring mode end to end: a tiny random-weight Qwen3ForCausalLM served by a real worker
(``task = "score"``) behind the real gateway, checked against a float32 ``transformers``
forward pass at the last position."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from tests.support import metric
from tests.support.stack import MODEL as EMBED_MODEL

MODEL = "tiny-qwen3-reranker"
#: Qwen3-Reranker's default instruction (its model card).
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class QwenReference:
    def __init__(self, path: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def last_logits(self, text: str) -> np.ndarray:
        with self.torch.no_grad():
            enc = self.tok(text, return_tensors="pt")
            return self.model(**enc).logits[0, -1].numpy()

    def rerank_prompt(self, query: str, doc: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
        """Qwen3-Reranker's prompt as its model card writes it, typed out here rather than
        taken from the project's template."""
        return (
            "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
            'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
            f"<|im_end|>\n<|im_start|>user\n<Instruct>: {instruction}"
            f"\n<Query>: {query}\n<Document>: {doc}"
            "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        )

    def relevance(self, query: str, doc: str, instruction: str = DEFAULT_INSTRUCTION) -> float:
        no, yes = self.tok.convert_tokens_to_ids(["no", "yes"])
        z = self.last_logits(self.rerank_prompt(query, doc, instruction))[[no, yes]]
        p = np.exp(z - z.max())
        return float(p[1] / p.sum())


@pytest.fixture(scope="module")
def qref(tiny_path) -> QwenReference:
    return QwenReference(tiny_path)


@pytest.fixture(scope="module")
def score_worker(gateway, stack_dir, tiny_path) -> Iterator[ls.Proc]:
    cfg = ls.worker_config(
        queue_url=gateway.url,
        model_name=MODEL,
        model_path=tiny_path,
        task="score",
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=64,
        generator_extra="engine_args = { block_size = 32 }",
    )
    # Keeps vLLM's own metric names (the other workers use the Prometheus-convention default).
    cfg = cfg.replace("[monitoring]", '[monitoring]\nvllm_metric_names = "upstream"')
    proc = ls.start_worker(cfg, stack_dir, "score-worker")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


@pytest.fixture(scope="module")
def sc(gateway, score_worker) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.url, timeout=120, headers={"Authorization": f"Bearer {ls.API_KEY}"}
    ) as c:
        yield c


def _vectors(body: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float64)


def test_return_logits_match_transformers(sc, qref, stsb_sentences):
    texts = stsb_sentences[:24]
    ids = [
        qref.tok.convert_tokens_to_ids("no"),
        qref.tok.convert_tokens_to_ids("yes"),
        7,
        100,
        3000,
    ]
    r = sc.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": texts, "return_logits": ids, "normalize": False},
    )
    assert r.status_code == 200, r.text
    got = _vectors(r.json())
    want = np.array([qref.last_logits(t)[ids] for t in texts])
    assert got.shape == (24, 5)
    assert np.abs(got - want).max() <= 1e-4
    assert r.json()["usage"]["prompt_tokens"] == sum(len(qref.tok(t)["input_ids"]) for t in texts)


def test_return_logits_without_normalize_are_raw_logits(sc, qref, stsb_sentences):
    """Fireworks: ``normalize: true`` is the switch that applies the softmax; without it the
    selected logits come back as they are."""
    texts = stsb_sentences[24:28]
    ids = [5, 17, 4000]
    r = sc.post("/v1/embeddings", json={"model": MODEL, "input": texts, "return_logits": ids})
    assert r.status_code == 200, r.text
    got = _vectors(r.json())
    want = np.array([qref.last_logits(t)[ids] for t in texts])
    assert np.abs(got - want).max() <= 1e-4
    assert not np.allclose(got.sum(axis=1), 1.0, atol=1e-3)  # not probabilities


def test_normalize_gives_softmax_of_the_selected_logits(sc, qref, stsb_sentences):
    texts = stsb_sentences[30:38]
    ids = [5, 17, 4000]
    raw = _vectors(
        sc.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": texts, "return_logits": ids, "normalize": False},
        ).json()
    )
    probs = _vectors(
        sc.post(
            "/v1/embeddings",
            json={"model": MODEL, "input": texts, "return_logits": ids, "normalize": True},
        ).json()
    )
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    assert np.allclose(probs, e / e.sum(axis=1, keepdims=True), atol=1e-6)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_openai_sdk_with_fireworks_extras(gateway, score_worker, qref, stsb_sentences):
    from openai import OpenAI

    client = OpenAI(base_url=gateway.url + "/v1", api_key=ls.API_KEY, max_retries=0)
    ids = [qref.tok.convert_tokens_to_ids("no"), qref.tok.convert_tokens_to_ids("yes")]
    resp = client.embeddings.create(
        model=MODEL,
        input=stsb_sentences[:3],
        encoding_format="float",
        extra_body={"return_logits": ids, "normalize": False},
    )
    got = np.array([d.embedding for d in resp.data])
    want = np.array([qref.last_logits(t)[ids] for t in stsb_sentences[:3]])
    assert np.abs(got - want).max() <= 1e-4


async def test_different_ids_in_one_batch(gateway, score_worker, qref, stsb_sentences):
    texts = stsb_sentences[40:56]
    id_sets = [[1, 2, 3], [4000, 6000], [9, 8, 7, 6, 5, 4, 3, 2]]
    headers = {"Authorization": f"Bearer {ls.API_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120, headers=headers) as c:
        resps = await asyncio.gather(
            *[
                c.post(
                    "/v1/embeddings",
                    json={"model": MODEL, "input": texts, "return_logits": ids, "normalize": False},
                )
                for ids in id_sets
            ]
        )
    for ids, r in zip(id_sets, resps, strict=True):
        assert r.status_code == 200, r.text
        want = np.array([qref.last_logits(t)[ids] for t in texts])
        assert np.abs(_vectors(r.json()) - want).max() <= 1e-4


def test_rerank_orders_by_reference_scores(sc, qref, stsb_sentences):
    query = "A man is playing a guitar."
    docs = stsb_sentences[60:80]
    r = sc.post("/v1/rerank", json={"model": MODEL, "query": query, "documents": docs})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = [qref.relevance(query, d) for d in docs]
    assert [d["index"] for d in body["data"]] == list(np.argsort(ref)[::-1])
    got = {d["index"]: d["relevance_score"] for d in body["data"]}
    assert max(abs(got[i] - ref[i]) for i in range(len(docs))) <= 1e-4
    assert all("document" not in d for d in body["data"])
    assert body["model"] == MODEL
    n = sum(len(qref.tok(qref.rerank_prompt(query, d))["input_ids"]) for d in docs)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}


def test_score_equals_rerank_and_the_log_odds_of_return_logits(sc, qref, stsb_sentences):
    """``/v1/score`` on a causal-LM reranker: P("yes") of the rerank prompt, as ``/v1/rerank``
    gives it; without activation the log-odds logit("yes") - logit("no") of the reference."""
    query, docs = "A man is playing a guitar.", stsb_sentences[80:88]
    body = {"model": MODEL, "text_1": query, "text_2": docs}
    r = sc.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    got = [d["score"] for d in r.json()["data"]]
    assert max(abs(g - qref.relevance(query, d)) for g, d in zip(got, docs, strict=True)) <= 1e-4
    raw = sc.post("/v1/score", json={**body, "use_activation": False}).json()["data"]
    no, yes = qref.tok.convert_tokens_to_ids(["no", "yes"])
    for d, doc in zip(raw, docs, strict=True):
        logits = qref.last_logits(qref.rerank_prompt(query, doc))
        assert abs(d["score"] - (logits[yes] - logits[no])) <= 1e-4


def test_rerank_with_a_request_prompt_template(sc, qref, stsb_sentences):
    """``prompt_template`` on /v1/rerank replaces the model's prompt for that request."""
    query = "A woman is slicing an onion."
    # Sentences whose first five words are plain words: four tokens of this word-level
    # tokenizer are then exactly the first four words.
    docs = [d for d in stsb_sentences[100:] if all(w.isalpha() for w in d.split()[:5])][:6]
    template = "Query: {query}\nDocument: {{ truncate_tokens(document, 4) }}\nRelevant:"
    r = sc.post(
        "/v1/rerank",
        json={"model": MODEL, "query": query, "documents": docs, "prompt_template": template},
    )
    assert r.status_code == 200, r.text
    no, yes = qref.tok.convert_tokens_to_ids(["no", "yes"])
    got = {d["index"]: d["relevance_score"] for d in r.json()["data"]}
    for i, doc in enumerate(docs):
        text = f"Query: {query}\nDocument: {' '.join(doc.split()[:4])}\nRelevant:"
        z = qref.last_logits(text)[[no, yes]]
        p = np.exp(z - z.max())
        assert abs(got[i] - p[1] / p.sum()) <= 1e-4, (i, text)
    bad = sc.post(
        "/v1/rerank",
        json={"model": MODEL, "query": query, "documents": docs, "prompt_template": "{% if %}"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_template"


def test_the_cohere_sdk_reranks_with_a_request_instruction(
    gateway, score_worker, qref, stsb_sentences
):
    """The ``cohere`` SDK unchanged (``ClientV2.rerank`` on ``/v2/rerank``), and Jina's body
    (documents as objects, ``return_documents``, an ``instruction``) as plain HTTP on
    ``/rerank``: scores vs Qwen3-Reranker's prompt with that instruction in ``transformers``."""
    import cohere

    query, docs = "A dog runs in the park.", stsb_sentences[120:130]
    client = cohere.ClientV2(api_key=ls.API_KEY, base_url=gateway.url, timeout=120)
    got = client.rerank(model=MODEL, query=query, documents=docs, top_n=3)
    ref = [qref.relevance(query, d) for d in docs]
    assert [x.index for x in got.results] == list(np.argsort(ref)[::-1][:3])
    assert max(abs(x.relevance_score - ref[x.index]) for x in got.results) <= 1e-4
    told = "Find sentences about animals"
    with httpx.Client(base_url=gateway.url, timeout=120) as c:
        r = c.post(
            "/rerank",
            headers={"Authorization": f"Bearer {ls.API_KEY}"},
            json={
                "model": MODEL,
                "query": query,
                "documents": [{"text": d} for d in docs],
                "return_documents": True,
                "instruction": told,
            },
        )
    assert r.status_code == 200, r.text
    want = [qref.relevance(query, d, told) for d in docs]
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(np.argsort(want)[::-1])
    assert max(abs(x["relevance_score"] - want[x["index"]]) for x in results) <= 1e-4
    assert [x["document"] for x in results] == [{"text": docs[x["index"]]} for x in results]
    assert max(abs(a - b) for a, b in zip(want, ref, strict=True)) > 2e-4  # it changed them


def test_rerank_top_n_and_return_documents(sc, qref, stsb_sentences):
    query = "A child is riding a horse."
    docs = stsb_sentences[80:92]
    full = sc.post("/v1/rerank", json={"model": MODEL, "query": query, "documents": docs}).json()
    top = sc.post(
        "/v1/rerank",
        json={
            "model": MODEL,
            "query": query,
            "documents": docs,
            "top_n": 3,
            "return_documents": True,
        },
    ).json()
    assert len(top["data"]) == 3
    assert [d["index"] for d in top["data"]] == [d["index"] for d in full["data"][:3]]
    assert all(d["document"] == docs[d["index"]] for d in top["data"])
    big = sc.post(
        "/v1/rerank", json={"model": MODEL, "query": query, "documents": docs, "top_n": 99}
    )
    assert len(big.json()["data"]) == len(docs)


@pytest.mark.parametrize(
    "body,code,needle",
    [
        ({"input": "x", "return_logits": [10**6]}, "invalid_token_ids", "vocabulary"),
        ({"input": "x", "return_logits": []}, "invalid_token_ids", "at least one"),
        ({"input": "x", "return_logits": list(range(129))}, "invalid_token_ids", "128"),
        ({"input": "x", "return_logits": [1], "dimensions": 8}, None, "dimensions"),
    ],
)
def test_bad_logit_requests(sc, body, code, needle):
    r = sc.post("/v1/embeddings", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert needle in err["message"]


@pytest.mark.parametrize(
    "body,param,needle",
    [
        ({"query": "q", "documents": []}, "documents", "empty"),
        ({"query": "q", "documents": ["a", ""]}, "documents", "documents[1]"),
        ({"query": "q", "documents": ["d"] * 2049}, "documents", "2048"),
        ({"query": "", "documents": ["d"]}, "query", "empty"),
        ({"documents": ["d"]}, "query", "required"),
    ],
)
def test_bad_rerank_requests(sc, body, param, needle):
    r = sc.post("/v1/rerank", json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert needle in r.json()["error"]["message"]


def test_over_long_document_is_a_per_document_error(sc):
    r = sc.post(
        "/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["fine", "word " * 1100]}
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["message"].startswith("documents[1]")


def test_wrong_task_for_the_model(sc, embed_worker):
    # The session's embedding model scores pairs (bi-encoder) but has no logits to return.
    r = sc.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "q", "return_logits": [1]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "return_logits"
    assert "needs a causal-LM scoring model" in r.json()["error"]["message"]
    r = sc.post("/v1/embeddings", json={"model": MODEL, "input": "plain embedding please"})
    assert r.status_code == 400
    assert "scoring" in r.json()["error"]["message"]


def test_score_worker_keeps_serving(sc, score_worker):
    r = sc.post("/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["a", "b"]})
    assert r.status_code == 200
    assert score_worker.popen.poll() is None
    models = {m["id"]: m for m in sc.get("/v1/models").json()["data"]}
    assert models[MODEL]["tasks"] == ["score", "tokenize"]


def test_upstream_vllm_metric_names(sc, score_worker):
    """``monitoring.vllm_metric_names = "upstream"`` serves vLLM's engine metrics as ``vllm:*``."""
    sc.post("/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["a", "b"]})
    text = httpx.get(score_worker.url + "/metrics").text
    assert metric(text, "vllm:request_success_total") >= 2
    assert "vllm:iteration_tokens_total_bucket" in text
    assert "\nvllm_" not in text
    assert metric(text, "inference_worker_items_completed_total", task="score") >= 2
