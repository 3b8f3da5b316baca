"""Sequence classification on a real vLLM engine through the real gateway: a tiny random-weight
3-label ``BertForSequenceClassification`` (labels neg / neu / pos, fixed seed) built at test
time, against a float32 ``transformers`` pass; and quantized embeddings of the session's
all-MiniLM-L6-v2 worker against sentence-transformers' ``quantize_embeddings``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from devstack import tiny_bert
from tests.support.stack import MODEL, api_client, serving_worker

CLASSIFIER = "tiny-sentiment"
LABELS = ("neg", "neu", "pos")


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert.build_cross_encoder(
        tmp_path_factory.mktemp("classifier"), seed=4321, labels=LABELS
    )


@pytest.fixture(scope="module")
def classifier(gateway: ls.Proc, stack_dir: Path, classifier_path: Path) -> Iterator[ls.Proc]:
    text = ls.worker_config(
        queue_url=gateway.url,
        model_name=CLASSIFIER,
        model_path=classifier_path,
        task="classify",
        dtype="float32",
        max_model_len=512,
        max_num_seqs=64,
        generator_extra='engine_core = "thread"',  # the one end-to-end worker of this mode
    )
    with serving_worker(text, stack_dir, "classifier") as proc:
        yield proc


@pytest.fixture(scope="module")
def api(gateway: ls.Proc, embed_worker: ls.Proc) -> Iterator[httpx.Client]:
    with api_client(gateway.url) as c:
        yield c


def test_classify_matches_transformers(api, classifier, classifier_path, stsb_sentences):
    """Probabilities within 1e-4 of the softmax of a float32 ``transformers`` pass, labels
    the argmax's, answers in input order; raw logits with ``normalize: false``."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(classifier_path)
    model = BertForSequenceClassification.from_pretrained(
        classifier_path, dtype=torch.float32
    ).eval()
    texts = stsb_sentences[:24]
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    r = api.post("/v1/classify", json={"model": CLASSIFIER, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.array([d["probs"] for d in body["data"]])
    print(f"classify: max |diff| {np.abs(got - want).max():.2e}; first answer {body['data'][0]}")
    assert np.abs(got - want).max() < 1e-4
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    assert [d["label"] for d in body["data"]] == [LABELS[i] for i in want.argmax(1)]
    assert {d["num_classes"] for d in body["data"]} == {3}
    assert len({d["label"] for d in body["data"]}) > 1  # the classes are not all one
    raw = api.post("/v1/classify", json={"model": CLASSIFIER, "input": texts, "normalize": False})
    assert np.abs(np.array([d["probs"] for d in raw.json()["data"]]) - logits).max() < 1e-4
    card = next(m for m in api.get("/v1/models").json()["data"] if m["id"] == CLASSIFIER)
    assert card["tasks"] == ["classify", "tokenize"] and card["labels"] == list(LABELS)


def test_a_classifier_is_not_an_embedding_model_and_long_inputs_are_refused(
    api, classifier, stsb_sentences
):
    r = api.post("/v1/embeddings", json={"model": CLASSIFIER, "input": "x"})
    assert r.status_code == 400 and "supports: classification" in r.json()["error"]["message"]
    long_text = " ".join(stsb_sentences[:80])  # ~700 tokens, over 512
    r = api.post("/v1/classify", json={"model": CLASSIFIER, "input": ["fine", long_text]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ok = api.post(
        "/v1/classify",
        json={"model": CLASSIFIER, "input": long_text, "truncate_prompt_tokens": 512},
    )
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 512


def embed(api: httpx.Client, texts: list[str], **kw: Any) -> list[Any]:
    r = api.post("/v1/embeddings", json={"model": MODEL, "input": texts, **kw})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def test_quantized_embeddings_equal_sentence_transformers_on_the_same_vectors(api, stsb_sentences):
    """Binary exactly, int8 within one step of ``quantize_embeddings`` on the float vectors the
    same endpoint returns; one all-MiniLM-L6-v2 vector's size in each type."""
    from sentence_transformers.util.quantization import quantize_embeddings

    texts = stsb_sentences[:32]
    floats = np.array(embed(api, texts), dtype=np.float32)
    ranges = np.array([[-1.0] * 384, [1.0] * 384])
    for kind in ("binary", "ubinary"):
        assert np.array_equal(
            np.array(embed(api, texts, embedding_type=kind)), quantize_embeddings(floats, kind)
        )
    for kind in ("int8", "uint8"):
        got = np.array(embed(api, texts, embedding_type=kind))
        want = quantize_embeddings(floats, kind, ranges=ranges).astype(int)
        assert np.abs(got - want).max() <= 1
    sizes = {"float": len(base64.b64decode(embed(api, texts[:1], encoding_format="base64")[0]))}
    for kind in ("int8", "uint8", "binary", "ubinary"):
        b64 = embed(api, texts[:1], embedding_type=kind, encoding_format="base64")[0]
        sizes[kind] = len(base64.b64decode(b64))
    print(f"one all-MiniLM-L6-v2 vector, bytes per embedding_type: {sizes}")
    assert sizes == {"float": 1536, "int8": 384, "uint8": 384, "binary": 48, "ubinary": 48}
    with_dims = embed(api, texts[:1], embedding_type="binary", dimensions=128)[0]
    assert len(with_dims) == 16  # dimensions first, then 8 bits per byte


def test_the_openai_sdk_default_is_still_float(client):
    out = client.embeddings.create(model=MODEL, input=["a sentence"])
    assert len(out.data[0].embedding) == 384
    assert all(isinstance(v, float) for v in out.data[0].embedding)
