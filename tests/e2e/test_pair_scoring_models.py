"""The pair score types on real vLLM engines through the real gateway: a tiny random-weight
1-label ``BertForSequenceClassification`` (cross-encoder) and a tiny ColBERT
(late-interaction), both built at test time with a fixed seed, and all-MiniLM-L6-v2 as a
bi-encoder (the session's embedding worker); each checked against a float32 reference
(``transformers`` / sentence-transformers) on STS sentences, with the plain HTTP calls of
vLLM's docs for ``/score`` and ``/rerank``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from devstack import tiny_bert
from tests.support.stack import MODEL, api_client, stop_cleanly

CROSS = "tiny-cross-encoder"
COLBERT = "tiny-colbert"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pair-models")
    return {
        CROSS: tiny_bert.build_cross_encoder(root / "cross", seed=1234),
        COLBERT: tiny_bert.build_colbert(root / "colbert", seed=1234),
    }


@pytest.fixture(scope="module")
def pair_workers(gateway: ls.Proc, stack_dir: Path, model_dirs: dict[str, Path]) -> Iterator[None]:
    """A scoring worker per tiny model (no score_type in the config: from the checkpoint),
    started side by side."""
    procs = [
        ls.start_worker(
            ls.worker_config(
                queue_url=gateway.url,
                model_name=name,
                model_path=path,
                task="score",
                dtype="float32",
                max_model_len=512,
                max_num_seqs=64,
                # the ColBERT also serves its token embeddings (return_multivector)
                model_extra="token_embedding_task = { supported = true }"
                if name == COLBERT
                else "",
            ),
            stack_dir,
            name,
            wait=False,
        )
        for name, path in model_dirs.items()
    ]
    try:
        for p in procs:
            ls.wait_http(p.url + "/readyz", p, 240)
        yield
    finally:
        for p in procs:
            stop_cleanly(p)


@pytest.fixture(scope="module")
def api(gateway: ls.Proc, embed_worker: ls.Proc, pair_workers: None) -> Iterator[httpx.Client]:
    with api_client(gateway.url) as c:
        yield c


def score(api: httpx.Client, model: str, text_1: Any, text_2: Any, **kw: Any) -> list[float]:
    r = api.post("/v1/score", json={"model": model, "text_1": text_1, "text_2": text_2, **kw})
    assert r.status_code == 200, r.text
    return [d["score"] for d in r.json()["data"]]


def test_models_advertise_the_score_type_the_checkpoint_calls_for(api):
    cards = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert cards[CROSS]["score_type"] == "cross-encoder"
    assert cards[CROSS]["tasks"] == ["score", "tokenize"]
    assert cards[COLBERT]["score_type"] == "late-interaction"
    assert cards[MODEL]["score_type"] == "bi-encoder"


def test_cross_encoder_scores_match_transformers(api, model_dirs, stsb_sentences):
    """Scores of (query, document) pairs vs a float32 ``transformers`` forward pass of the
    pair (the tokenizer's pair encoding, token type ids included): within 1e-4, same order."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = model_dirs[CROSS]
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    query, docs = stsb_sentences[0], stsb_sentences[1:33]
    with torch.no_grad():
        enc = tok([query] * len(docs), docs, padding=True, return_tensors="pt")
        logits = model(**enc).logits[:, 0].numpy()
    want = 1 / (1 + np.exp(-logits))
    got = np.array(score(api, CROSS, query, docs))
    raw = np.array(score(api, CROSS, query, docs, use_activation=False))
    print(f"cross-encoder: max |diff| {np.abs(got - want).max():.2e} over {len(docs)} pairs")
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(raw - logits).max() < 1e-4
    ranked = api.post("/v1/rerank", json={"model": CROSS, "query": query, "documents": docs})
    assert ranked.status_code == 200, ranked.text
    order = [d["index"] for d in ranked.json()["data"]]
    assert order == list(np.argsort(-want, kind="stable"))
    assert [d["relevance_score"] for d in ranked.json()["data"]] == pytest.approx(
        sorted(got, reverse=True), abs=1e-6
    )


def test_colbert_maxsim_matches_transformers(api, model_dirs, stsb_sentences):
    """vLLM 0.32 loads a ColBERT (``HF_ColBERT``) on CPU: MaxSim over its token embeddings
    vs the same computed with ``transformers`` in float32."""
    ref = tiny_bert.ColBERTReference(model_dirs[COLBERT])
    queries, docs = stsb_sentences[40:48], stsb_sentences[48:56]
    got = np.array(score(api, COLBERT, queries, docs))  # N:N
    want = np.array([ref.maxsim(q, d) for q, d in zip(queries, docs, strict=True)])
    print(f"late-interaction: max |diff| {np.abs(got - want).max():.2e}, scores ~{want.mean():.2f}")
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_colbert_token_embeddings_match_transformers(api, model_dirs, stsb_sentences):
    """``return_multivector``: every input's per-token vectors [tokens, dim] as the float32
    ``transformers`` ColBERT computes them (special tokens included, rows L2-normalised), in
    input order; ``dimensions`` keeps each row's first components, renormalised; ``binary``
    packs each row's signs; and they give the same MaxSim as ``/v1/score``."""
    ref = tiny_bert.ColBERTReference(model_dirs[COLBERT])
    texts = stsb_sentences[90:98]
    body = {"model": COLBERT, "input": texts, "return_multivector": True}
    r = api.post("/v1/embeddings", json=body)
    assert r.status_code == 200, r.text
    got = [np.array(d["embedding"], dtype=np.float32) for d in r.json()["data"]]
    want = [ref.tokens(t).numpy() for t in texts]
    assert [g.shape for g in got] == [w.shape for w in want]
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    print(
        f"multi-vector: max |diff| {diff:.2e}; first answer {got[0].shape[0]} rows x "
        f"{got[0].shape[1]}, row 0 starts {[round(float(v), 4) for v in got[0][0][:4]]}"
    )
    assert diff < 1e-4
    assert r.json()["usage"]["prompt_tokens"] == sum(len(w) for w in want)
    small = api.post("/v1/embeddings", json={**body, "input": texts[0], "dimensions": 8}).json()
    cut = want[0][:, :8] / np.linalg.norm(want[0][:, :8], axis=1, keepdims=True)
    assert np.abs(np.array(small["data"][0]["embedding"]) - cut).max() < 1e-4
    bits = api.post("/v1/embeddings", json={**body, "input": texts[0], "embedding_type": "ubinary"})
    assert bits.json()["data"][0]["embedding"] == np.packbits(want[0] > 0, axis=1).tolist()
    maxsim = float((got[0] @ got[1].T).max(axis=1).sum())
    assert abs(score(api, COLBERT, texts[0], texts[1])[0] - maxsim) < 1e-3


def test_bi_encoder_cosine_matches_sentence_transformers(api, stsb_sentences):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(ls.minilm_path()), device="cpu")
    query, docs = stsb_sentences[60], stsb_sentences[61:81]
    q, d = st.encode([query]), st.encode(docs)
    want = (d @ q[0]) / (np.linalg.norm(d, axis=1) * np.linalg.norm(q[0]))
    got = np.array(score(api, MODEL, query, docs))
    print(f"bi-encoder: max |diff| {np.abs(got - want).max():.2e}")
    assert np.abs(got - want).max() < 1e-4
    ranked = api.post("/v1/rerank", json={"model": MODEL, "query": query, "documents": docs})
    assert [x["index"] for x in ranked.json()["data"]] == list(np.argsort(-want, kind="stable"))


@pytest.mark.parametrize("model", [CROSS, COLBERT, MODEL])
def test_the_http_calls_of_vllms_docs(api, model):
    """The requests of vLLM's score and rerank docs, unchanged but for the model name."""
    r = api.post(
        "/v1/score",
        json={
            "model": model,
            "text_1": "What is the capital of France?",
            "text_2": ["The capital of Brazil is Brasilia.", "The capital of France is Paris."],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "score" and np.isfinite(d["score"]) for d in body["data"])
    assert body["usage"]["prompt_tokens"] > 0
    docs = [
        "The capital of France is Paris",
        "Reranking is fun!",
        "vLLM is an open-source framework for fast AI serving",
    ]
    r = api.post(
        "/v1/rerank",
        json={"model": model, "query": "What is the capital of France?", "documents": docs},
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert sorted(d["index"] for d in data) == [0, 1, 2]
    scores = [d["relevance_score"] for d in data]
    assert scores == sorted(scores, reverse=True)


def test_a_long_document_is_truncated_on_request_or_refused(api, stsb_sentences):
    long_doc = " ".join(stsb_sentences[100:180])  # 700 tokens: over 512, within the size check
    r = api.post("/v1/score", json={"model": CROSS, "text_1": "a query", "text_2": long_doc})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ok = api.post(
        "/v1/score",
        json={
            "model": CROSS,
            "text_1": "a query",
            "text_2": long_doc,
            "truncate_prompt_tokens": 512,
        },
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["prompt_tokens"] == 512


def test_rerank_clients_unchanged_give_the_v1_rerank_ranking(gateway, api, stsb_sentences):
    """aleph-alpha-client's ``rerank()`` (``/rerank``) and the ``cohere`` SDK's v1
    ``Client.rerank`` (``/v1/rerank``) on the cross-encoder: the ranking and scores of
    ``/v1/rerank`` for the same inputs."""
    import cohere
    from aleph_alpha_client import Client, RerankRequest

    query, docs = stsb_sentences[3], stsb_sentences[10:20]
    want = api.post("/v1/rerank", json={"model": CROSS, "query": query, "documents": docs})
    ranked = [(d["index"], d["relevance_score"]) for d in want.json()["data"]][:4]
    aa = Client(token=ls.API_KEY, host=gateway.url + "/", total_retries=0)
    got = aa.rerank(RerankRequest(query=query, documents=docs, top_n=4), model=CROSS)
    assert [(r.index, r.relevance_score) for r in got.results] == ranked
    assert got.usage.prompt_tokens == want.json()["usage"]["prompt_tokens"]
    co = cohere.Client(api_key=ls.API_KEY, base_url=gateway.url, timeout=120)
    v1 = co.rerank(model=CROSS, query=query, documents=docs, top_n=4, return_documents=True)
    assert [(r.index, r.relevance_score) for r in v1.results] == ranked
    assert [r.document.text for r in v1.results] == [docs[i] for i, _ in ranked]
