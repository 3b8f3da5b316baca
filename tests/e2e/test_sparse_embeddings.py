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
    proc = ls.start_worker(text, stack_dir, "splade")
    yield proc
    code = proc.stop()
    assert code == 0, f"worker did not drain cleanly (exit {code}):\n{proc.log_tail()}"


@pytest.fixture(scope="module")
def api(gateway: ls.Proc, splade: ls.Proc) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.url, timeout=120, headers={"Authorization": f"Bearer {ls.API_KEY}"}
    ) as c:
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
    import openai

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=ls.API_KEY, max_retries=0)
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
