"""Embedding throughput: this project (client -> gateway -> queue -> worker) vs. vLLM's
``AsyncLLM`` in-process (the ceiling), same model, same engine settings, same sentences, one run.

    python bench/embeddings.py [--dtype bfloat16] [--batch 64] [--concurrency 4] [--limit N]

Prints sentences/s for both paths and their ratio. Inputs: the distinct sentences of the STS
benchmark (``shared/data/stsb``). The two paths run one after the other (2 cores cannot host
both engines at once without each slowing the other).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway import localstack as ls  # noqa: E402

MODEL = "all-minilm-l6-v2"


def sentences(shared: Path, limit: int | None) -> list[str]:
    seen: dict[str, None] = {}
    for name in ("stsb-en-dev.csv", "stsb-en-train.csv"):
        for a, b, _ in ls.read_stsb(shared / "data" / "stsb" / name):
            seen.setdefault(a)
            seen.setdefault(b)
    out = list(seen)
    return out[:limit] if limit else out


async def run_in_process(texts: list[str], dtype: str, max_num_seqs: int) -> float:
    """AsyncLLM directly, every sentence submitted at once (the engine batches). Returns s."""
    from vllm import AsyncEngineArgs, PoolingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(ls.minilm_path()), runner="pooling", dtype=dtype, max_model_len=256,
        max_num_seqs=max_num_seqs, gpu_memory_utilization=0.3))

    async def one(i: int, t: str) -> None:
        async for _ in llm.encode(t, PoolingParams(task="embed"), request_id=f"r{i}"):
            pass

    await asyncio.gather(*[one(i, t) for i, t in enumerate(texts[:256])])  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*[one(i + 10**6, t) for i, t in enumerate(texts)])
    elapsed = time.perf_counter() - t0
    llm.shutdown()
    del llm  # AsyncLLM must not outlive the event loop
    return elapsed


async def run_through_gateway(url: str, texts: list[str], batch: int, concurrency: int) -> float:
    """Client requests of ``batch`` sentences, ``concurrency`` at a time, base64 like the SDK."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key=ls.API_KEY, max_retries=0, timeout=600)
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    sem = asyncio.Semaphore(concurrency)

    async def one(chunk: list[str]) -> None:
        async with sem:
            r = await client.embeddings.create(model=MODEL, input=chunk)
            assert len(r.data) == len(chunk)

    await asyncio.gather(*[one(c) for c in chunks[:4]])  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*[one(c) for c in chunks])
    elapsed = time.perf_counter() - t0
    await client.close()
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=64, help="sentences per client request")
    p.add_argument("--concurrency", type=int, default=4, help="client requests in flight")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="use only the first N sentences")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shared = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
    texts = sentences(shared, a.limit)
    print(f"{len(texts)} STS-benchmark sentences, dtype={a.dtype}, max_num_seqs={a.max_num_seqs}")

    direct = asyncio.run(run_in_process(texts, a.dtype, a.max_num_seqs))

    logs = Path(tempfile.mkdtemp(prefix="bench-"))
    gw = ls.start_gateway(logs)
    cfg = ls.worker_config(queue_url=gw.url, dtype=a.dtype, max_num_seqs=a.max_num_seqs)
    wk = ls.start_worker(cfg.replace("gpu_memory_utilization = 0.15", "gpu_memory_utilization = 0.3"),
                         logs, "bench-worker")
    try:
        via = asyncio.run(run_through_gateway(gw.url, texts, a.batch, a.concurrency))
    finally:
        wk.stop()
        gw.stop()

    n = len(texts)
    print(f"\n| path | seconds | sentences/s |\n| --- | --- | --- |")
    print(f"| vLLM AsyncLLM in-process | {direct:.2f} | {n / direct:.0f} |")
    print(f"| client -> gateway -> worker ({a.batch}/request, {a.concurrency} concurrent) "
          f"| {via:.2f} | {n / via:.0f} |")
    print(f"\nratio (this project / in-process): {direct / via:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
