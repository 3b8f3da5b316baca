"""Sparse embeddings on a real vLLM engine through the real gateway: a tiny random-weight
SPLADE model (a ``BertForMaskedLM``, fixed seed) built at test time and served as vLLM's
``BertSpladeSparseEmbeddingModel``, against a float32 ``transformers`` computation of
SPLADE's ``max over tokens of log(1 + relu(logits))``; called with the ``openai`` SDK
(``embedding_type: "sparse"``) and TEI's ``/embed_sparse``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import localstack as ls
from devstack import tiny_bert
from tests.support.stack import api_client, openai_client, serving_worker

SPLADE = "tiny-splade"


@pytest.fixture(scope="module")
def splade_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert.build_splade(tmp_path_factory.mktemp("splade"), seed=40)


@pytest.fixture(scope="module")
def reference(splade_path: Path) -> tiny_bert.SpladeReference:
    return tiny_bert.SpladeReference(splade_path)


@pytest.fixture(scope="module")
def splade(gateway: ls.Proc, stack_dir: Path, splade_path: Path) -> Iterator[ls.Proc]:
    text = ls.worker_config(
        queue_url=gateway.url,
        model_name=SPLADE,
        model_path=splade_path,
        task="embed_sparse",
        dtype="float32",
        max_model_len=128,
        max_num_seqs=64,
    )
    with serving_worker(text, stack_dir, "splade") as proc:
        yield proc


@pytest.fixture(scope="module")
def api(gateway: ls.Proc, splade: ls.Proc) -> Iterator[httpx.Client]:
    with api_client(gateway.url) as c:
        yield c


def max_error(got: dict[int, float], want: dict[int, float]) -> float:
    """The largest weight difference over both supports (a token missing on one side counts
    its whole weight)."""
    return max(abs(got.get(k, 0.0) - want.get(k, 0.0)) for k in set(got) | set(want))


def test_sparse_embeddings_match_transformers_through_the_openai_sdk(
    gateway, splade, reference, stsb_sentences
):
    """Every input's token ids and weights as SPLADE computes them in float32 ``transformers``
    (the same ids, weights within 1e-4), in input order, with the prompt's tokens counted."""

    client = openai_client(gateway.url)
    texts = [*stsb_sentences[:16], "x"]
    answer = client.embeddings.create(
        model=SPLADE, input=texts, extra_body={"embedding_type": "sparse"}
    )
    errors = []
    for text, data in zip(texts, answer.data, strict=True):
        emb: Any = data.embedding  # {"indices", "values"}: the SDK leaves a dict as it is
        got = dict(zip(emb["indices"], emb["values"], strict=True))
        want = reference.weights(text)
        assert emb["indices"] == sorted(want)  # the same token ids, increasing
        errors.append(max_error(got, want))
    first = answer.data[0].embedding
    print(
        f"sparse: max |diff| {max(errors):.2e}; first answer {len(first['indices'])} weights, "  # type: ignore[call-overload]
        f"indices {first['indices'][:4]}..., values {[round(v, 4) for v in first['values'][:4]]}..."  # type: ignore[call-overload]
    )
    assert max(errors) < 1e-4
    assert [d.index for d in answer.data] == list(range(len(texts)))
    tokens = sum(len(reference.tok(t)["input_ids"]) for t in texts)
    assert answer.usage.prompt_tokens == tokens


def test_teis_embed_sparse_gives_the_same_weights_as_index_value_pairs(api, reference):
    texts = ["A man is playing a guitar.", "hello world"]
    r = api.post("/embed_sparse", json={"model": SPLADE, "inputs": texts})
    assert r.status_code == 200, r.text
    for text, pairs in zip(texts, r.json(), strict=True):
        got = {p["index"]: p["value"] for p in pairs}
        assert [p["index"] for p in pairs] == sorted(reference.weights(text))
        assert max_error(got, reference.weights(text)) < 1e-4


def test_a_sparse_model_refuses_dense_requests_and_over_long_inputs_clearly(api, reference):
    r = api.post("/v1/embeddings", json={"model": SPLADE, "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"
    long = "word " * 400  # past the 128-token context
    body = {"model": SPLADE, "input": long, "embedding_type": "sparse"}
    r = api.post("/v1/embeddings", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = api.post("/embed_sparse", json={"model": SPLADE, "inputs": long, "truncate": True})
    assert r.status_code == 200, r.text
    ids = reference.tok(long, truncation=True, max_length=128)["input_ids"]
    want = reference.weights(reference.tok.decode(ids[1:-1]))
    got = {p["index"]: p["value"] for p in r.json()[0]}
    assert max_error(got, want) < 1e-4  # the first 128 tokens' weights
    card = next(m for m in api.get("/v1/models").json()["data"] if m["id"] == SPLADE)
    assert card["tasks"] == ["embed_sparse", "tokenize"]


BGE_M3 = "tiny-bge-m3"


@pytest.fixture(scope="module")
def m3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert.build_bge_m3(tmp_path_factory.mktemp("bge-m3"), seed=41)


@pytest.fixture(scope="module")
def m3(gateway: ls.Proc, stack_dir: Path, m3_path: Path) -> Iterator[ls.Proc]:
    """One BGE-M3 worker (``generator.task = "embed"``) serving its dense, sparse and
    per-token vectors from one engine."""
    text = ls.worker_config(
        queue_url=gateway.url,
        model_name=BGE_M3,
        model_path=m3_path,
        task="embed",
        dtype="float32",
        max_model_len=128,
        max_num_seqs=64,
        model_extra="sparse_embedding_task = { supported = true }\n"
        "token_embedding_task = { supported = true }",
    )
    with serving_worker(text, stack_dir, "bge-m3") as proc:
        yield proc


def test_bge_m3_dense_sparse_and_per_token_vectors_match_flagembeddings_formulas(
    gateway, m3, m3_path, stsb_sentences
):
    """BGE-M3's three outputs from one worker, as FlagEmbedding computes them on a float32
    ``transformers`` pass: the dense vector (CLS), the lexical weights (the largest
    ``relu(sparse_linear)`` per token id, special tokens left out) and the per-token vectors
    (``colbert_linear``, every token but the first); the sparse ones through the ``openai``
    SDK and TEI's ``/embed_sparse`` alike."""
    import numpy as np

    ref = tiny_bert.BgeM3Reference(m3_path)
    client = openai_client(gateway.url)
    texts = stsb_sentences[20:28]
    dense = client.embeddings.create(model=BGE_M3, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in dense.data])
    dense_err = float(np.abs(got - np.stack([ref.dense(t) for t in texts])).max())
    sparse = client.embeddings.create(
        model=BGE_M3, input=texts, extra_body={"embedding_type": "sparse"}
    )
    sparse_err = 0.0
    for text, data in zip(texts, sparse.data, strict=True):
        emb: Any = data.embedding
        want = ref.weights(text)
        assert emb["indices"] == sorted(want)
        pairs = dict(zip(emb["indices"], emb["values"], strict=True))
        sparse_err = max(sparse_err, max_error(pairs, want))
    with api_client(gateway.url, timeout=60) as http:
        tei = http.post("/embed_sparse", json={"model": BGE_M3, "inputs": texts[:2]}).json()
        multi = http.post(
            "/v1/embeddings",
            json={"model": BGE_M3, "input": texts, "return_multivector": True},
        ).json()
    assert [[p["index"] for p in one] for one in tei] == [sorted(ref.weights(t)) for t in texts[:2]]
    rows = [np.array(d["embedding"]) for d in multi["data"]]
    want_rows = [ref.tokens(t) for t in texts]
    assert [r.shape for r in rows] == [w.shape for w in want_rows]
    multi_err = max(float(np.abs(r - w).max()) for r, w in zip(rows, want_rows, strict=True))
    first: Any = sparse.data[0].embedding
    answer = dict(zip(first["indices"], first["values"], strict=True))
    print(
        f"bge-m3: max |diff| dense {dense_err:.2e}, sparse {sparse_err:.2e}, per-token "
        f"{multi_err:.2e}; first sparse answer {answer}"
    )
    assert max(dense_err, sparse_err, multi_err) < 1e-4
