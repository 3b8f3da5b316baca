"""Rerank throughput: 1 query x 256 documents through client -> gateway -> worker, with and
without prefix caching, the same prompts through vLLM ``AsyncLLM`` directly, and vLLM's own
rerank endpoint (``vllm serve`` with the model converted to a yes/no sequence classifier, as
vLLM documents for Qwen3-Reranker), in one run. Then a cross-encoder (a 1-label
``BertForSequenceClassification``) through this project's ``/v1/rerank`` and ``vllm serve``'s
``/rerank`` on the same model, the same documents, the same run.

    python bench/rerank.py [--docs 256] [--dtype float32] [--rounds 15]

The models are tiny random-weight ones built on the spot (no weights can be downloaded here):
a Qwen3ForCausalLM with Qwen3-Reranker's architecture and prompt, so the shape of the work (a
~80-token shared prefix plus a sentence per document) is the real one; a BERT cross-encoder of
hidden size 256 and 4 layers with all-MiniLM-L6-v2's tokenizer. Prints docs/s and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402

from common.prompts import render  # noqa: E402
from devstack import localstack as ls  # noqa: E402
from devstack import tiny_bert, tiny_qwen3  # noqa: E402
from worker.model_entry import QWEN3_RERANK_INSTRUCTION, QWEN3_RERANK_TEMPLATE  # noqa: E402

MODEL = "tiny-qwen3-reranker"


def prompts(query: str, docs: list[str]) -> list[str]:
    """The prompts the worker scores: the model's rerank template rendered as the worker does."""
    fields = {"query": query, "instruction": QWEN3_RERANK_INSTRUCTION}
    return [
        render(QWEN3_RERANK_TEMPLATE, {**fields, "document": d}, lambda s, n=None: s) for d in docs
    ]


def timed_rerank(
    c: httpx.Client, path: str, warm_up: dict, body: dict, results_key: str
) -> tuple[float, list[float]]:
    """POST ``warm_up``, then time one POST of ``body`` to a rerank endpoint. Returns
    (seconds, relevance scores in document order); ``results_key`` names the response's list
    (``data`` in Fireworks' shape, ``results`` in vLLM's)."""
    c.post(path, json=warm_up).raise_for_status()
    t0 = time.perf_counter()
    r = c.post(path, json=body)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    results = r.json()[results_key]
    assert len(results) == len(body["documents"]), r.text
    scores = [0.0] * len(results)
    for d in results:
        scores[d["index"]] = d["relevance_score"]
    return elapsed, scores


async def in_process(
    path: Path, texts: list[str], ids: list[int], dtype: str, prefix: bool
) -> float:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(path),
            runner="generate",
            dtype=dtype,
            max_model_len=1024,
            max_num_seqs=64,
            gpu_memory_utilization=0.15,
            logprobs_mode="raw_logits",
            max_logprobs=128,
            enable_prefix_caching=prefix,
            block_size=32,
        )
    )
    params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)

    async def one(i: int, t: str) -> None:
        async for _ in llm.generate(t, params, request_id=f"r{i}"):  # noqa: F821 - llm is deleted only after the last call
            pass

    # Warm up with the full set (first-time batch shapes), then time a second pass. The
    # prefix cache is reset in between so the timed pass sees the same cache state as the
    # gateway path (the shared prefix cached once, the documents not).
    await asyncio.gather(*[one(-1 - i, t) for i, t in enumerate(texts)])
    await llm.reset_prefix_cache()
    await one(-(10**6), texts[0])
    t0 = time.perf_counter()
    await asyncio.gather(*[one(i, t) for i, t in enumerate(texts)])
    elapsed = time.perf_counter() - t0
    llm.shutdown()
    del llm  # AsyncLLM must not outlive the event loop
    return elapsed


def through_gateway(
    path: Path, query: str, docs: list[str], dtype: str, prefix: bool, logs: Path
) -> tuple[float, list[float]]:
    """This project's ``POST /v1/rerank``. Returns (seconds, scores in document order)."""
    gw = ls.start_gateway(logs)
    cfg = ls.worker_config(
        queue_url=gw.url,
        model_name=MODEL,
        model_path=path,
        task="score",
        dtype=dtype,
        max_model_len=1024,
        max_num_seqs=64,
        generator_extra=(
            f"engine_args = {{ block_size = 32, enable_prefix_caching = {str(prefix).lower()} }}"
        ),
    )
    wk = ls.start_worker(cfg, logs, f"rerank-worker-{prefix}")
    try:
        with httpx.Client(
            base_url=gw.url, timeout=600, headers={"Authorization": f"Bearer {ls.API_KEY}"}
        ) as c:
            # Warm up with the full request, as the in-process path does, with another query so
            # the timed pass reuses only the shared instruction prefix.
            return timed_rerank(
                c,
                "/v1/rerank",
                {"model": MODEL, "query": "warm up", "documents": docs},
                {"model": MODEL, "query": query, "documents": docs},
                "data",
            )
    finally:
        wk.stop()
        gw.stop()


def vllm_serve(
    path: Path, query: str, docs: list[str], dtype: str, prefix: bool, logs: Path
) -> tuple[float, list[float]]:
    """vLLM's own ``POST /rerank`` on the same model, converted the way vLLM documents for
    Qwen3-Reranker (``Qwen3ForSequenceClassification`` from the "no"/"yes" rows of lm_head).
    The client formats the query and documents with the same template, split at
    ``<Document>``, as vLLM's Qwen3-Reranker example does. Returns (seconds, scores)."""
    t = QWEN3_RERANK_TEMPLATE.replace("{instruction}", QWEN3_RERANK_INSTRUCTION)
    head, tail = t.split("<Document>: {document}")
    q = head.replace("{query}", query)
    ds = [f"<Document>: {d}{tail}" for d in docs]
    overrides = {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": ["no", "yes"],
        "is_original_qwen3_reranker": True,
    }
    proc = ls.start_vllm_serve(
        path,
        MODEL,
        logs,
        f"vllm-serve-rerank-{prefix}",
        [
            "--runner",
            "pooling",
            "--dtype",
            dtype,
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            "64",
            "--gpu-memory-utilization",
            "0.15",
            "--block-size",
            "32",
            "--hf-overrides",
            json.dumps(overrides),
            "--enable-prefix-caching" if prefix else "--no-enable-prefix-caching",
        ],
    )
    try:
        with httpx.Client(base_url=proc.url, timeout=600) as c:
            return timed_rerank(
                c,
                "/rerank",
                {"model": MODEL, "query": head.replace("{query}", "warm up"), "documents": ds},
                {"model": MODEL, "query": q, "documents": ds},
                "results",
            )
    finally:
        proc.stop()


def cross_encoder(
    path: Path, query: str, docs: list[str], dtype: str, rounds: int, logs: Path
) -> tuple[float, float, float]:
    """The cross-encoder through this project's ``/v1/rerank`` and ``vllm serve``'s
    ``/rerank``, alternately ``rounds`` times after one warm-up request each. Returns (median
    seconds through the gateway, median seconds through vllm serve, max score difference)."""
    import statistics

    gw = ls.start_gateway(logs)
    cfg = ls.worker_config(
        queue_url=gw.url,
        model_name="tiny-cross-encoder",
        model_path=path,
        task="score",
        dtype=dtype,
        max_model_len=512,
        max_num_seqs=256,
    )
    wk = ls.start_worker(cfg, logs, "rerank-worker-cross-encoder")
    serve = ls.start_vllm_serve(
        path,
        "tiny-cross-encoder",
        logs,
        "vllm-serve-cross-encoder",
        [
            "--runner",
            "pooling",
            "--dtype",
            dtype,
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "256",
            "--gpu-memory-utilization",
            "0.15",
        ],
    )
    body = {"model": "tiny-cross-encoder", "query": query, "documents": docs}
    warm = {**body, "query": "warm up"}
    ours, theirs = [], []
    try:
        with (
            httpx.Client(
                base_url=gw.url, timeout=600, headers={"Authorization": f"Bearer {ls.API_KEY}"}
            ) as c,
            httpx.Client(base_url=serve.url, timeout=600) as v,
        ):
            for _ in range(rounds):
                ours.append(timed_rerank(c, "/v1/rerank", warm, body, "data"))
                theirs.append(timed_rerank(v, "/rerank", warm, body, "results"))
    finally:
        serve.stop()
        wk.stop()
        gw.stop()
    diff = max(abs(x - y) for x, y in zip(ours[-1][1], theirs[-1][1], strict=True))
    return (
        statistics.median(t for t, _ in ours),
        statistics.median(t for t, _ in theirs),
        diff,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=15, help="cross-encoder requests per path")
    p.add_argument("--skip-causal", action="store_true", help="only the cross-encoder")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = ls.read_stsb("dev")
    corpus = [s for r in rows for s in r[:2]]
    logs = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    path = tiny_qwen3.build(logs / "model", corpus, seed=0, hidden_size=256, layers=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.convert_tokens_to_ids(["no", "yes"])
    query = "A man is playing a guitar on stage in front of a large crowd of people."
    docs = corpus[: a.docs]
    texts = prompts(query, docs)
    n_tok = sum(len(tok(t)["input_ids"]) for t in texts)
    print(
        f"1 query x {len(docs)} documents, {n_tok / len(docs):.0f} tokens per prompt, "
        f"dtype={a.dtype}, block_size=32"
    )

    ce_path = tiny_bert.build_cross_encoder(
        logs / "cross-encoder", seed=0, hidden_size=256, layers=4
    )
    g, v, diff = cross_encoder(ce_path, query, docs, a.dtype, a.rounds, logs)
    n = len(docs)
    print(
        "\n| cross-encoder (BERT, 256 hidden, 4 layers) | this project /v1/rerank docs/s | "
        "vllm serve /rerank docs/s | project / vllm serve | max score diff |"
    )
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| 1 query x {n} docs, median of {a.rounds} | {n / g:.0f} | {n / v:.0f} | "
        f"{v / g:.2f} | {diff:.1e} |"
    )
    out: dict = {
        "docs": n,
        "tokens_per_prompt": n_tok / n,
        "dtype": a.dtype,
        "cross_encoder": {
            "this_project_docs_per_s": n / g,
            "vllm_serve_docs_per_s": n / v,
            "max_score_diff": diff,
            "requests_per_path": a.rounds,
        },
    }
    if a.skip_causal:
        record.write("rerank", out)
        return 0

    rows_out = []
    for prefix in (False, True):
        d = asyncio.run(in_process(path, texts, ids, a.dtype, prefix))
        g, ours = through_gateway(path, query, docs, a.dtype, prefix, logs)
        v, theirs = vllm_serve(path, query, docs, a.dtype, prefix, logs)
        diff = max(abs(x - y) for x, y in zip(ours, theirs, strict=True))
        rows_out.append((prefix, d, g, v, diff))
    print(
        "\n| prefix caching | vLLM in-process docs/s | this project docs/s | vllm serve /rerank "
        "docs/s | project / in-process | project / vllm serve | max score diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for prefix, d, g, v, diff in rows_out:
        print(
            f"| {'on' if prefix else 'off'} | {n / d:.0f} | {n / g:.0f} | {n / v:.0f} | "
            f"{d / g:.2f} | {v / g:.2f} | {diff:.1e} |"
        )
    off, on = rows_out[0][2], rows_out[1][2]
    print(f"\nprefix caching speed-up through the gateway: {off / on:.2f}x")
    out["causal_lm"] = [
        {
            "prefix_caching": prefix,
            "in_process_docs_per_s": n / d,
            "this_project_docs_per_s": n / g,
            "vllm_serve_docs_per_s": n / v,
            "max_score_diff": diff,
        }
        for prefix, d, g, v, diff in rows_out
    ]
    record.write("rerank", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
