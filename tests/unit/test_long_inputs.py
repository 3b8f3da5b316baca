"""Over-long inputs, the operator's choice per model (``embedding_task.long_inputs``) unless
the client says: on the real gateway in process (the test playing the worker), and the
worker's cut at the start against Hugging Face's ``truncation_side="left"``. On a real engine:
``tests/e2e/test_embeddings.py::test_a_text_cut_at_its_start_embeds_as_its_end``."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import MINILM_FILES, InProcessGateway

MODELS = [
    {"name": n, "checkpoint_name": n, "tasks": ["embed"], "max_model_len": 64, "long_inputs": p}
    for n, p in (
        ("refusing", "refuse"),
        ("end", "truncate_end"),
        ("start", "truncate_start"),
        ("chunked", "chunk"),
    )
]


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise(MODELS)
        yield g


async def cut(gw: InProcessGateway, model: str, **fields: Any) -> tuple[Any, Any]:
    """(truncate_prompt_tokens, truncate_side) of the item the worker is handed."""
    call = gw.client.post("/v1/embeddings", json={"model": model, "input": "a", **fields})
    r, items = await gw.answer_while(call, MODELS, lambda i: [0.6, 0.8], prompt_tokens=2)
    assert r.status_code == 200, r.text
    return items[0].get("truncate_prompt_tokens"), items[0].get("truncate_side")


async def test_the_models_policy_applies_when_the_client_says_nothing(gw):
    assert await cut(gw, "chunked") == (None, None)  # not cut: split (below)
    assert await cut(gw, "refusing") == (None, None)
    assert await cut(gw, "end") == (64, None)
    assert await cut(gw, "start") == (64, "start")


async def test_the_clients_fields_win_over_the_policy(gw):
    assert await cut(gw, "start", truncation=False) == (None, None)  # refuse, as asked
    assert await cut(gw, "start", truncate_prompt_tokens=10) == (10, None)
    assert await cut(gw, "refusing", truncation=True) == (64, None)
    assert await cut(gw, "refusing", truncation=True, truncation_side="start") == (64, "start")
    assert await cut(gw, "end", truncation_side="start") == (64, "start")


def work_item(**fields: Any) -> Any:
    """A leased embedding input as a worker is handed it (model ``m``)."""
    from common.protocol import WorkItem

    base = {"item_id": "i", "lease_id": "l", "attempt": 1, "lease_seconds": 30}
    return WorkItem(**{**base, "model": "m", "task": "embed", **fields})


def test_a_start_cut_keeps_the_end_as_hugging_face_truncates_left():
    from transformers import AutoTokenizer

    from worker.engine.prepare import Preparer

    tok = AutoTokenizer.from_pretrained(MINILM_FILES)
    left = AutoTokenizer.from_pretrained(MINILM_FILES, truncation_side="left")
    text = " ".join(f"w{i}" for i in range(40))  # no repeats: both cuts differ
    base = {"text": text, "truncate_prompt_tokens": 12}
    items = [
        work_item(**base, truncate_side="start"),
        work_item(**base),
        work_item(**{**base, "text": "short"}),
        work_item(token_ids=list(range(1, 31)), truncate_prompt_tokens=5, truncate_side="start"),
    ]
    start, end, short, ids = Preparer(tok, "bi-encoder", False, 64).prepare(items)
    assert start == left(text, truncation=True, max_length=12)["input_ids"]
    assert start[0] == tok.cls_token_id and start[-1] == tok.sep_token_id
    assert end == tok(text, truncation=True, max_length=12)["input_ids"] and end != start
    assert short == tok("short")["input_ids"]  # within the limit: not cut
    assert ids == [26, 27, 28, 29, 30]
    assert tok.truncation_side == "right"  # the worker's own tokenizer is left as it was


async def test_a_chunking_model_takes_texts_up_to_its_windows_and_splits_them(gw):
    long = "w " * 600  # 1,200 characters, over 64 tokens x --max-chars-per-token
    items = []
    for given, tokens in ((long, 300), ([1, 2], 2)):  # 300 tokens: within 16 windows of 64
        call = gw.client.post("/v1/embeddings", json={"model": "chunked", "input": given})
        r, got = await gw.answer_while(call, MODELS, lambda i: [0.6, 0.8], prompt_tokens=tokens)
        assert r.status_code == 200, r.text
        items += got
    assert [i.get("chunk_tokens") for i in items] == [64, None]  # text only, not token ids
    refused = await gw.client.post("/v1/embeddings", json={"model": "refusing", "input": long})
    assert (
        refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    )
    over = await gw.client.post("/v1/embeddings", json={"model": "chunked", "input": "w" * 10**6})
    assert over.status_code == 400  # past 16 windows' worth of characters
    truncated = await cut(gw, "chunked", truncation=True)
    assert truncated == (64, None)  # the client's field wins


def test_a_long_text_is_split_into_windows_with_the_special_tokens_around_each():
    from transformers import AutoTokenizer

    from common.protocol import MAX_CHUNKS
    from worker.engine.prepare import ChunkedPrompt, Preparer

    tok = AutoTokenizer.from_pretrained(MINILM_FILES)
    text = " ".join(f"w{i}" for i in range(30))
    ids = tok(text)["input_ids"]
    body = ids[1:-1]

    def item(text: str, chunk: int) -> Any:
        return work_item(text=text, chunk_tokens=chunk)

    prep = Preparer(tok, "bi-encoder", False, 64)
    chunked, short = prep.prepare([item(text, 12), item("short", 12)])
    assert isinstance(chunked, ChunkedPrompt)
    assert [w[1:-1] for w in chunked.windows] == [body[k : k + 10] for k in range(0, len(body), 10)]
    assert all(w[0] == tok.cls_token_id and w[-1] == tok.sep_token_id for w in chunked.windows)
    assert all(len(w) <= 12 for w in chunked.windows) and len(chunked) == len(body) + 2 * len(
        chunked.windows
    )
    assert short == tok("short")["input_ids"]  # within one window: as it is
    (too_long,) = prep.prepare([item(text * MAX_CHUNKS, 12)])
    assert not isinstance(too_long, ChunkedPrompt) and too_long.code == "context_length_exceeded"
