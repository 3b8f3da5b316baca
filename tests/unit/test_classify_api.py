"""``POST /v1/classify`` (vLLM's shape) and quantized embeddings (``embedding_type``) on the
real gateway in process; the test plays the worker over the queue protocol, so the request
checks, the labels and the quantization at the edge are checked exactly without vLLM (the
end-to-end tests on real engines: ``test_classify.py``)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from gateway.api.quantize import quantize
from tests.support import InProcessGateway

LABELS = ["neg", "neu", "pos"]
CLASSIFIER = {
    "name": "clf",
    "checkpoint_name": "clf",
    "tasks": ["classify"],
    "labels": LABELS,
    "max_model_len": 64,
}
EMBEDDER = {
    "name": "emb",
    "checkpoint_name": "emb",
    "tasks": ["embed"],
    "quantization_range": [-0.5, 0.5],
}
MODELS = [CLASSIFIER, EMBEDDER]


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise(MODELS)
        yield g


async def serve(gw: InProcessGateway, call: Any, values: Any) -> tuple[Any, list[dict[str, Any]]]:
    """``call`` answered by this test as the worker (4 prompt tokens each; see ``answer_while``)."""
    return await gw.answer_while(call, MODELS, values, prompt_tokens=4)


PROBS = {"awful": [0.7, 0.2, 0.1], "fine": [0.2, 0.6, 0.2], "great": [0.05, 0.15, 0.8]}


async def test_classify_answers_in_vllms_shape_with_the_models_labels(gw):
    texts = ["great", "awful", "fine"]
    r, items = await serve(
        gw,
        gw.client.post("/v1/classify", json={"model": "clf", "input": texts}),
        lambda i: PROBS[i["text"]],
    )
    assert r.status_code == 200, r.text
    assert [(i["task"], i["text"], i["normalize"]) for i in items] == [
        ("classify", t, True) for t in texts
    ]
    body = r.json()
    assert body["object"] == "list" and body["model"] == "clf"
    assert body["id"].startswith("classify-") and isinstance(body["created"], int)
    assert [(d["index"], d["label"], d["num_classes"]) for d in body["data"]] == [
        (0, "pos", 3),
        (1, "neg", 3),
        (2, "neu", 3),
    ]
    assert body["data"][0]["probs"] == pytest.approx(PROBS["great"], abs=1e-6)
    assert body["usage"] == {"prompt_tokens": 12, "total_tokens": 12, "completion_tokens": 0}


@pytest.mark.parametrize("switch", ["normalize", "use_activation"])
async def test_classify_without_activation_asks_for_raw_logits(gw, switch):
    r, items = await serve(
        gw,
        gw.client.post(
            "/v1/classify",
            json={"model": "clf", "input": "x", switch: False, "truncate_prompt_tokens": 16},
        ),
        lambda i: [-1.0, 0.5, 2.0],
    )
    assert r.status_code == 200, r.text
    assert items[0]["normalize"] is False and items[0]["truncate_prompt_tokens"] == 16
    assert r.json()["data"][0]["probs"] == [-1.0, 0.5, 2.0]
    assert r.json()["data"][0]["label"] == "pos"


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        ({"model": "clf", "input": []}, 400, "input", None),
        ({"model": "clf", "input": ["ok", ""]}, 400, "input", None),
        ({"model": "emb", "input": "x"}, 400, "model", "unsupported_task"),
        ({"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
        ({"model": "clf", "input": "x" * 40_000}, 400, "input", "context_length_exceeded"),
    ],
)
async def test_bad_classify_requests_get_the_embeddings_errors(gw, body, status, param, code):
    r = await gw.client.post("/v1/classify", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and (code is None or err["code"] == code)
    assert await gw.store.depth() == {}


VECTOR = [0.31, -0.2, 0.0, 0.49, -0.5, 0.7, -0.01, 0.12, 0.05]  # 9 dims: 2 packed bytes


@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
async def test_quantized_embeddings_at_the_edge(gw, kind):
    """The worker's float32 vector, quantized once by the gateway with the model's advertised
    range; base64 carries the bytes of the same integers."""
    want = quantize(np.array([VECTOR], dtype=np.float32), kind, [-0.5, 0.5])[0]
    r, items = await serve(
        gw,
        gw.client.post(
            "/v1/embeddings", json={"model": "emb", "input": "x", "embedding_type": kind}
        ),
        lambda i: VECTOR,
    )
    assert r.status_code == 200, r.text
    assert "embedding_type" not in items[0]  # the queue carries float32 only
    got = r.json()["data"][0]["embedding"]
    assert got == want.tolist() and all(isinstance(v, int) for v in got)
    assert len(got) == (2 if "binary" in kind else 9)
    r64, _ = await serve(
        gw,
        gw.client.post(
            "/v1/embeddings",
            json={
                "model": "emb",
                "input": "x",
                "embedding_type": kind,
                "encoding_format": "base64",
            },
        ),
        lambda i: VECTOR,
    )
    raw = base64.b64decode(r64.json()["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype=want.dtype).tolist() == want.tolist()


async def test_the_range_clips_and_float_stays_the_default(gw):
    r, _ = await serve(
        gw,
        gw.client.post(
            "/v1/embeddings", json={"model": "emb", "input": "x", "embedding_type": "uint8"}
        ),
        lambda i: VECTOR,
    )
    got = r.json()["data"][0]["embedding"]
    assert got[4] == 0 and got[5] == 255  # -0.5 is the range's low end; 0.7 is clipped
    plain, _ = await serve(
        gw, gw.client.post("/v1/embeddings", json={"model": "emb", "input": "x"}), lambda i: VECTOR
    )
    assert plain.json()["data"][0]["embedding"] == pytest.approx(VECTOR, abs=1e-7)
    bad = await gw.client.post(
        "/v1/embeddings", json={"model": "emb", "input": "x", "embedding_type": "int4"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "embedding_type"


@pytest.mark.extras
def test_quantize_equals_sentence_transformers_quantize_embeddings():
    """Binary and ubinary bit for bit, int8 and uint8 within one step, on 200 random unit
    vectors of 384 dims (all-MiniLM-L6-v2's size), range [-1, 1]."""
    st = pytest.importorskip(
        "sentence_transformers.util.quantization", reason="the reference needs torch (model extra)"
    )
    quantize_embeddings = st.quantize_embeddings

    rng = np.random.default_rng(7)
    v = rng.standard_normal((200, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ranges = np.array([[-1.0] * 384, [1.0] * 384])
    for kind in ("binary", "ubinary"):
        assert np.array_equal(quantize(v, kind, [-1, 1]), quantize_embeddings(v, kind))
    for kind in ("int8", "uint8"):
        ours = quantize(v, kind, [-1, 1]).astype(int)
        theirs = quantize_embeddings(v, kind, ranges=ranges).astype(int)
        assert np.abs(ours - theirs).max() <= 1
    sizes = {k: quantize(v[:1], k, [-1, 1]).nbytes for k in ("int8", "binary")}
    assert sizes == {"int8": 384, "binary": 48} and v[:1].nbytes == 1536
