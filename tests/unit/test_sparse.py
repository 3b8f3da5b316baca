"""Sparse embeddings (the ``embed_sparse`` task): their wire forms (JSON and the binary results
body), the results the gateway refuses, the client routes (``embedding_type: "sparse"`` on
``/v1/embeddings``, TEI's ``/embed_sparse``) with the test playing the worker, and the worker's
config. On a real SPLADE model and engine: ``tests/e2e/test_sparse_embeddings.py``."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.protocol import (
    ItemResult,
    ItemSpec,
    SparseEmbedding,
    WorkItem,
    encode_indices,
    encode_vector,
)
from common.results_body import decode_results, encode_results
from gateway.queue.store import check_result
from tests.support import InProcessGateway

SPARSE = {
    "name": "splade",
    "checkpoint_name": "splade",
    "tasks": ["embed_sparse", "tokenize"],
    "max_model_len": 64,
    "vocab_size": 1000,
}
DENSE = {"name": "dense", "checkpoint_name": "dense", "tasks": ["embed"], "vocab_size": 1000}


def item(**kw: Any) -> WorkItem:
    kw.setdefault("text", "x")
    return WorkItem(
        model="m", task="embed_sparse", item_id="i", lease_id="l", lease_seconds=5, **kw
    )


def test_a_sparse_embedding_is_sorted_by_token_id_and_keeps_only_non_zero_weights():
    got = SparseEmbedding.of([9, 2, 5], [0.5, 1.0, 2.0])
    assert got.indices.tolist() == [2, 5, 9] and got.values.tolist() == [1.0, 2.0, 0.5]
    assert got.indices.dtype == np.dtype("<u4") and got.values.dtype == np.dtype("<f4")
    dense = np.zeros(10, np.float32)
    dense[[1, 7]] = [0.25, 3.0]
    got = SparseEmbedding.from_dense(dense)
    assert got.indices.tolist() == [1, 7] and got.values.tolist() == [0.25, 3.0]
    for indices, values in (([1, 1], [1.0, 2.0]), ([-1], [1.0]), ([1, 2], [1.0])):
        with pytest.raises(ValueError):
            SparseEmbedding.of(indices, values)


def test_the_binary_body_carries_sparse_embeddings_beside_vectors_as_json_does():
    """Each result's float32 weights then its uint32 indices in the body; an empty sparse
    embedding stays one (not a result without a vector)."""
    results = [
        ItemResult.ok(item(), SparseEmbedding.of([3, 70000], [0.5, 1.5]), 4),
        ItemResult.ok(item(), np.array([1.0, 2.0], np.float32), 2),
        ItemResult.ok(item(), SparseEmbedding.of([], []), 2),
        ItemResult.ok(item(), SparseEmbedding.of([1], [2.0]), 3),
    ]
    body = encode_results("w", results)
    back = decode_results(body).results
    assert [r.model_dump() for r in back] == [r.model_dump() for r in results]
    assert back[0].sparse().indices.tolist() == [3, 70000]
    assert back[2].sparse().indices.size == 0 and back[1].indices_b64 is None
    # 2 + 2 (first), 2 (vector), 0 (empty), 1 + 1 (last): 4-byte words after the header
    size = int.from_bytes(body[4:8], "little")
    assert len(body) - 8 - size == 4 * 8
    with pytest.raises(ValueError):
        decode_results(body[:-4])  # one index short


def _why(res: ItemResult, spec: ItemSpec, vocab: int | None = 100) -> str | None:
    checked = check_result(res, spec, vocab_size=vocab)
    return None if checked.error is None else checked.error.message


def _result(indices: Any, values: Any) -> ItemResult:
    return ItemResult(
        item_id="i",
        lease_id="l",
        vector_b64=None if values is None else encode_vector(np.array(values, np.float32)),
        indices_b64=None if indices is None else encode_indices(np.array(indices, np.uint32)),
    )


@pytest.mark.parametrize(
    ("indices", "values", "why"),
    [
        ([1, 99], [0.5, 2.0], None),
        ([], [], None),
        (None, [1.0], "without its weights and indices"),
        ([1], None, "without its weights and indices"),
        ([1, 2], [1.0], "2 indices for 1 weights"),
        ([5, 2], [1.0, 1.0], "not increasing"),
        ([2, 2], [1.0, 1.0], "not increasing"),
        ([1, 100], [1.0, 1.0], "outside the vocabulary (100 tokens)"),
        ([1], [float("nan")], "not finite"),
    ],
)
def test_the_gateway_refuses_sparse_results_that_cannot_be_right(indices, values, why):
    spec = ItemSpec(model="m", task="embed_sparse", text="x")
    got = _why(_result(indices, values), spec)
    assert got is None if why is None else why in str(got)


def test_indices_on_a_dense_result_and_bad_base64_are_refused():
    dense = ItemSpec(model="m", task="embed", text="x")
    assert "indices for a dense result" in str(_why(_result([1], [1.0]), dense))
    sparse = ItemSpec(model="m", task="embed_sparse", text="x")
    odd = ItemResult(item_id="i", lease_id="l", vector_b64="AAAA", indices_b64="AAA=")
    assert "not base64 of whole 32-bit values" in str(_why(odd, sparse))
    # without a known vocabulary, any uint32 index passes
    assert _why(_result([1, 70000], [1.0, 1.0]), sparse, vocab=None) is None


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        yield g


def answer(i: dict[str, Any]) -> dict[str, Any]:
    """The test as a SPLADE worker: token ids 2, 5 and 10 + the text's length, weights 0.5, 1.5
    and 2.0."""
    indices = np.array([2, 5, 10 + len(i["text"])], "<u4")
    values = np.array([0.5, 1.5, 2.0], "<f4")
    return {
        "prompt_tokens": 3,
        "vector_b64": base64.b64encode(values.tobytes()).decode(),
        "indices_b64": base64.b64encode(indices.tobytes()).decode(),
    }


async def test_embeddings_with_embedding_type_sparse_answer_indices_and_values(gw):
    await gw.advertise([SPARSE, DENSE])
    body = {"model": "splade", "input": ["ab", "abcd"], "embedding_type": "sparse"}
    for encoding in ("float", "base64"):  # lists either way (the openai SDK asks for base64)
        call = gw.client.post("/v1/embeddings", json={**body, "encoding_format": encoding})
        r, items = await gw.answer_while(call, [SPARSE], answer, 3)
        assert r.status_code == 200, r.text
        assert [d["embedding"] for d in r.json()["data"]] == [
            {"indices": [2, 5, 12], "values": [0.5, 1.5, 2.0]},
            {"indices": [2, 5, 14], "values": [0.5, 1.5, 2.0]},
        ]
        assert r.json()["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
        assert [(i["task"], i["normalize"]) for i in items] == [("embed_sparse", False)] * 2


async def test_teis_embed_sparse_answers_index_value_lists(gw):
    await gw.advertise([SPARSE])  # the only model: TEI's body needs none
    body = {"inputs": "abc", "truncate": True, "truncation_direction": "Left"}
    r, items = await gw.answer_while(
        gw.client.post("/embed_sparse", json=body), [SPARSE], answer, 3
    )
    assert r.status_code == 200, r.text
    assert r.json() == [
        [{"index": 2, "value": 0.5}, {"index": 5, "value": 1.5}, {"index": 13, "value": 2.0}]
    ]
    assert (items[0]["truncate_prompt_tokens"], items[0]["truncate_side"]) == (64, "start")


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/embeddings", {"dimensions": 8}, "dimensions", None),
        ("/v1/embeddings", {"normalize": True}, "normalize", None),
        ("/v1/embeddings", {"model": "dense"}, "model", "unsupported_task"),
        ("/v1/embeddings", {"return_logits": [1]}, "model", "unsupported_task"),
        ("/v1/embeddings", {"input": [[1, 1000]]}, "input", "invalid_token_ids"),
        ("/embed_sparse", {"model": "dense"}, "model", "unsupported_task"),
        ("/embed_sparse", {"prompt_name": "query"}, "prompt_name", "unknown_prompt_name"),
    ],
)
async def test_bad_sparse_requests_are_400_naming_the_field(gw, path, body, param, code):
    await gw.advertise([SPARSE, DENSE])
    if path == "/v1/embeddings":
        body = {"model": "splade", "input": "x", "embedding_type": "sparse", **body}
    else:
        body = {"model": "splade", "inputs": "x", **body}
    r = await gw.client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def _config(tmp_path: Path, architectures: list[str] | None, task: str = "embed_sparse") -> Path:
    """A SPLADE worker's config, its checkpoint's ``config.json`` naming ``architectures``;
    its model declares ``task`` (the table of it)."""
    import json

    from devstack import localstack as ls

    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    if architectures is not None:
        (weights / "config.json").write_text(json.dumps({"architectures": architectures}))
    text = ls.worker_config(queue_url="http://127.0.0.1:9", model_path=weights, task=task)
    text = text.replace('task = "embed"\n', 'task = "embed_sparse"\n')
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_a_splade_config_starts_vllms_sparse_model_and_advertises_embed_sparse(tmp_path):
    from worker.config import load_config
    from worker.engine.args import engine_kwargs

    for architectures in (["BertForMaskedLM"], None):  # None: config.json unread
        cfg = load_config(_config(tmp_path, architectures), {"INFERENCE_WORKER_QUEUE_TOKEN": "t"})
        assert cfg.generator.task == "embed_sparse"
        assert cfg.queue.models["all-minilm-l6-v2"].tasks() == ["embed_sparse"]
    kw = engine_kwargs(cfg.generator)
    assert kw["runner"] == "pooling"
    assert kw["hf_overrides"] == {"architectures": ["BertSpladeSparseEmbeddingModel"]}


@pytest.mark.parametrize(
    ("architectures", "task", "key"),
    [
        (["BertModel"], "embed_sparse", "generator.task"),  # no sparse head
        (["BertForMaskedLM"], "embed", "sparse_embedding_task.supported"),  # not declared
    ],
)
def test_a_sparse_config_that_cannot_work_names_the_key_and_the_file(
    tmp_path, architectures, task, key
):
    from worker.config import ConfigError, load_config

    path = _config(tmp_path, architectures, task)
    with pytest.raises(ConfigError) as e:
        load_config(path, {"INFERENCE_WORKER_QUEUE_TOKEN": "t"})
    assert str(path) in str(e.value) and key in str(e.value)


def test_a_bge_m3_checkpoint_serves_sparse_and_per_token_vectors_beside_dense_ones(tmp_path):
    """An ``XLMRobertaModel`` with ``sparse_linear.pt`` starts as vLLM's BGE-M3 model whatever
    the task, so an ``embed`` worker may declare sparse and per-token vectors too; without
    that head, sparse embeddings beside ``embed`` are a config error naming the key."""
    from worker.config import ConfigError, load_config
    from worker.engine.args import engine_kwargs

    path = _config(tmp_path, ["XLMRobertaModel"], "embed")
    text = path.read_text().replace('task = "embed_sparse"\n', 'task = "embed"\n')
    text = text.replace(
        '[queue.models."all-minilm-l6-v2".embedding_task]',
        "sparse_embedding_task = { supported = true }\n"
        "token_embedding_task = { supported = true }\n\n"
        '[queue.models."all-minilm-l6-v2".embedding_task]',
    )
    path.write_text(text)
    env = {"INFERENCE_WORKER_QUEUE_TOKEN": "t"}
    with pytest.raises(ConfigError) as e:
        load_config(path, env)
    assert str(path) in str(e.value) and "sparse_embedding_task.supported" in str(e.value)
    (tmp_path / "weights" / "sparse_linear.pt").write_bytes(b"")
    cfg = load_config(path, env)
    tasks = cfg.queue.models["all-minilm-l6-v2"].tasks()
    assert cfg.generator.task == "embed" and tasks == ["embed", "embed_sparse", "token_embed"]
    assert engine_kwargs(cfg.generator)["hf_overrides"] == {
        "architectures": ["BgeM3EmbeddingModel"]
    }


async def test_teis_info_describes_a_sparse_model_as_tei_does_splade(gw):
    await gw.advertise([SPARSE, DENSE])
    info = (await gw.client.get("/info", params={"model": "splade"})).json()
    assert info["model_type"] == {"embedding": {"pooling": "splade"}}
    assert (await gw.client.get("/info", params={"model": "dense"})).json()["model_type"] == {
        "embedding": {"pooling": "model"}
    }
