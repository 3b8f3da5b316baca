"""Over-long inputs chunked on a real engine: a MiniLM worker whose model splits a text longer
than its context into windows (``embedding_task.long_inputs = "chunk"``), embeds each and
pools them weighted by tokens; checked against the same computed by hand with
``transformers`` in float32."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from devstack import localstack as ls
from tests.support.stack import cosine, unit

CHUNKED = "minilm-chunked"


@pytest.fixture(scope="module")
def chunk_worker(gateway: ls.Proc, stack_dir: Path) -> Iterator[ls.Proc]:
    cfg = ls.worker_config(
        queue_url=gateway.url,
        model_name=CHUNKED,
        max_model_len=256,
        max_num_seqs=32,
        task_extra='long_inputs = "chunk"',
    )
    proc = ls.start_worker(cfg, stack_dir, "chunk-worker")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def by_hand(reference, text: str, size: int) -> tuple[np.ndarray, int]:
    """Windows of ``size`` tokens ([CLS] + body + [SEP]), each mean-pooled, their mean
    weighted by tokens, L2-normalised; and the tokens of all windows."""
    torch = reference.torch
    ids = reference.tok(text)["input_ids"]
    body, room = ids[1:-1], size - 2
    windows = [[ids[0], *body[k : k + room], ids[-1]] for k in range(0, len(body), room)]
    pooled = []
    with torch.no_grad():
        for w in windows:
            hidden = reference.model(input_ids=torch.tensor([w])).last_hidden_state[0]
            pooled.append(hidden.mean(0).numpy().astype(np.float64))
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    vec = (weights[:, None] * np.array(pooled)).sum(0) / weights.sum()
    return unit(vec[None, :]).astype(np.float32), sum(len(w) for w in windows)


def test_a_text_longer_than_the_context_is_embedded_in_windows(
    http, chunk_worker, reference, stsb_sentences
):
    long = " ".join(stsb_sentences[:90])  # three windows of 256
    short = stsb_sentences[60]
    r = http.post("/v1/embeddings", json={"model": CHUNKED, "input": [long, short]})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    want, tokens = by_hand(reference, long, 256)
    assert cosine(got[:1], want).min() >= 0.999
    assert cosine(got[1:], unit(reference.raw([short]))).min() >= 0.999  # one window: as is
    assert r.json()["usage"]["prompt_tokens"] == tokens + reference.n_tokens([short])[0]
    assert tokens > 512  # it took three windows
    cut = http.post("/v1/embeddings", json={"model": CHUNKED, "input": long, "truncation": True})
    assert cut.json()["usage"]["prompt_tokens"] == 256  # the client's truncation wins
