"""Throughput suite: this project against what a user would run instead, one invocation,
same machine, same model (all-MiniLM-L6-v2), same dtype, same inputs.

    python bench/suite.py [--sentences 4000] [--docs 300] [--memory-sentences 100000]

Paths:
  1. vLLM ``AsyncLLM`` in-process, every input submitted at once (the ceiling);
  2. this project: ``openai`` client -> gateway -> queue -> worker;
  3. ``vllm serve`` (vLLM's OpenAI server) ``/v1/embeddings``;
  4. sentence-transformers ``encode`` (batch 64) on the same CPU.
Client patterns for 2 and 3: 64 inputs per request with 4 requests in flight ("large"), and
1 input per request with 64 clients ("small"). Inputs: distinct STS-benchmark sentences, and
documents of ~500 tokens built from them. Also: p50/p99 latency of single one-sentence requests
at low load (2 and 3), throughput with 2 workers on one queue, and worker RSS over
``--memory-sentences`` sentences. Prints tables and saves ``bench/results/suite.png``.
The paths run one after another: two engines at once on 2 cores would slow each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway import localstack as ls  # noqa: E402

MODEL = "all-minilm-l6-v2"
MAX_LEN = 512  # BERT's 512 positions (sentence-transformers' own cap is 256)


def _env() -> None:
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # model has 512 positions


def load_inputs(shared: Path, n_sent: int, n_docs: int) -> tuple[list[str], list[str]]:
    seen: dict[str, None] = {}
    for name in ("stsb-en-dev.csv", "stsb-en-train.csv"):
        for a, b, _ in ls.read_stsb(shared / "data" / "stsb" / name):
            seen.setdefault(a)
            seen.setdefault(b)
    sents = list(seen)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ls.minilm_path())
    docs, cur, n = [], [], 2  # [CLS] and [SEP]
    for s in sents:
        k = len(tok(s, add_special_tokens=False)["input_ids"])
        if n + k > 500:  # documents of 480-500 tokens, under the 512 limit
            if n >= 480:
                docs.append(" ".join(cur))
            cur, n = [], 2
            if len(docs) >= n_docs:
                break
        cur.append(s)
        n += k
    return sents[:n_sent], docs


# --- 1. in-process ----------------------------------------------------------------------------
async def _in_process(sets: dict[str, list[str]], dtype: str) -> dict[str, tuple[float, int]]:
    from vllm import AsyncEngineArgs, PoolingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(ls.minilm_path()), runner="pooling", dtype=dtype, max_model_len=MAX_LEN,
        max_num_seqs=256, gpu_memory_utilization=0.3))
    counter = iter(range(10**9))

    async def one(t: str) -> int:
        out = None
        async for out in llm.encode(t, PoolingParams(task="embed"), request_id=f"r{next(counter)}"):
            pass
        return len(out.prompt_token_ids)

    await asyncio.gather(*[one(t) for t in sets["sentences"][:256]])
    res = {}
    for name, texts in sets.items():
        t0 = time.perf_counter()
        toks = await asyncio.gather(*[one(t) for t in texts])
        res[name] = (time.perf_counter() - t0, sum(toks))
    llm.shutdown()
    del llm
    return res


# --- HTTP clients (2 and 3) ------------------------------------------------------------------
async def _http_load(url: str, key: str, model: str, texts: list[str], per_request: int,
                     concurrency: int) -> tuple[float, int]:
    """Returns (seconds, prompt tokens). The load generator is aiohttp: on 2 cores both the
    ``openai`` SDK and httpx's async pool burn more CPU per request than the servers under test
    (httpx reached ~70 req/s at 64 connections here). base64 vectors, decoded with numpy as the
    SDK does."""
    import base64

    import aiohttp
    import numpy as np

    chunks = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with aiohttp.ClientSession(
        base_url=url, headers={"Authorization": f"Bearer {key}"},
        connector=aiohttp.TCPConnector(limit=concurrency + 4),
        timeout=aiohttp.ClientTimeout(total=900),
    ) as client:
        async def one(chunk: list[str]) -> None:
            nonlocal tokens
            async with sem:
                async with client.post("/v1/embeddings", json={
                        "model": model, "input": chunk, "encoding_format": "base64"}) as r:
                    body = await r.json()
                vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
                assert len(vecs) == len(chunk), body
                tokens += body["usage"]["prompt_tokens"]

        await asyncio.gather(*[one(c) for c in chunks[:concurrency]])  # warm-up
        tokens = 0
        t0 = time.perf_counter()
        await asyncio.gather(*[one(c) for c in chunks])
        elapsed = time.perf_counter() - t0
    return elapsed, tokens


def _latency(url: str, key: str, model: str, texts: list[str], n: int = 200) -> tuple[float, float]:
    """p50/p99 ms of one-sentence requests sent one at a time (low load), over one connection."""

    async def run() -> list[float]:
        import aiohttp

        lat = []
        async with aiohttp.ClientSession(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
            for i in range(n + 10):
                t0 = time.perf_counter()
                async with c.post("/v1/embeddings", json={"model": model, "input": texts[i % len(texts)],
                                                          "encoding_format": "base64"}) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                if i >= 10:
                    lat.append((time.perf_counter() - t0) * 1000)
        return lat

    lat = sorted(asyncio.run(run()))
    return statistics.median(lat), lat[int(0.99 * (len(lat) - 1))]


def _patterns(url: str, key: str, model: str, sets: dict[str, list[str]]) -> dict[str, tuple[float, int]]:
    res = {}
    for name, texts in sets.items():
        res[f"{name}, 64/request x4"] = asyncio.run(_http_load(url, key, model, texts, 64, 4))
        if name == "sentences":
            res[f"{name}, 1/request x64"] = asyncio.run(_http_load(url, key, model, texts, 1, 64))
    return res


# --- 2. this project --------------------------------------------------------------------------
def _project(sets: dict[str, list[str]], dtype: str, logs: Path, workers: int = 1,
             memory_sentences: int = 0) -> dict:
    gw = ls.start_gateway(logs, args=["--pickup-timeout", "600"])
    # N workers on one host split its cores: worker i's engine binds its OpenMP threads to its
    # own cores (two engines with 2 threads each on 2 cores would oversubscribe them).
    cores = os.cpu_count() or 1
    per = max(1, cores // workers)
    procs = []
    for i in range(workers):
        env = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
        if workers > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"{i * per}-{i * per + per - 1}" if per > 1 else str(i)
        procs.append(ls.start_worker(ls.worker_config(queue_url=gw.url, dtype=dtype, max_model_len=MAX_LEN),
                                     logs, f"suite-worker-{workers}-{i}", env=env))
    out: dict = {}
    try:
        if workers == 1:
            out["latency"] = _latency(gw.url, ls.API_KEY, MODEL, sets["sentences"])
            out["patterns"] = _patterns(gw.url, ls.API_KEY, MODEL, sets)
            if memory_sentences:
                out["memory"] = _memory(gw.url, procs[0], sets["sentences"], memory_sentences)
        else:
            out["patterns"] = {"sentences, 64/request x8": asyncio.run(_http_load(
                gw.url, ls.API_KEY, MODEL, sets["sentences"], 64, 8))}
    finally:
        for p in procs:
            p.stop()
        gw.stop()
    return out


def _rss(proc: ls.Proc) -> float:
    """MiB resident: the worker and its vLLM engine processes."""
    p = psutil.Process(proc.pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def _memory(url: str, worker: ls.Proc, texts: list[str], total: int) -> dict:
    start = _rss(worker)
    samples = [start]
    done = 0
    while done < total:
        n = min(6400, total - done)
        asyncio.run(_http_load(url, ls.API_KEY, MODEL, (texts * (n // len(texts) + 1))[:n], 64, 8))
        done += n
        samples.append(_rss(worker))
    return {"sentences": done, "rss_start_mib": start, "rss_end_mib": samples[-1],
            "rss_max_mib": max(samples), "samples": samples}


# --- 3. vllm serve ----------------------------------------------------------------------------
def _vllm_serve(sets: dict[str, list[str]], dtype: str, logs: Path) -> dict:
    proc = ls.start_vllm_serve(ls.minilm_path(), MODEL, logs, "vllm-serve", [
        "--runner", "pooling", "--dtype", dtype, "--max-model-len", str(MAX_LEN),
        "--max-num-seqs", "256", "--gpu-memory-utilization", "0.3"])
    try:
        return {"latency": _latency(proc.url, "none", MODEL, sets["sentences"]),
                "patterns": _patterns(proc.url, "none", MODEL, sets)}
    finally:
        proc.stop()


# --- 4. sentence-transformers -----------------------------------------------------------------
def _sentence_transformers(sets: dict[str, list[str]]) -> dict[str, tuple[float, int]]:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 2)
    m = SentenceTransformer(str(ls.minilm_path()), device="cpu")
    m.max_seq_length = MAX_LEN
    m.encode(sets["sentences"][:256], batch_size=64)
    res = {}
    for name, texts in sets.items():
        toks = sum(len(ids) for ids in m.tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"])
        t0 = time.perf_counter()
        m.encode(texts, batch_size=64)
        res[name] = (time.perf_counter() - t0, toks)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--memory-sentences", type=int, default=100_000)
    ap.add_argument("--skip", default="", help="comma-separated: inprocess,project,two,serve,st")
    a = ap.parse_args()
    _env()
    skip = set(filter(None, a.skip.split(",")))
    shared = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared"))
    sents, docs = load_inputs(shared, a.sentences, a.docs)
    sets = {"sentences": sents, "documents": docs}
    logs = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    print(f"{len(sents)} sentences, {len(docs)} documents, dtype={a.dtype}, {os.cpu_count()} cores; logs {logs}",
          flush=True)
    R: dict = {}
    if "inprocess" not in skip:
        R["inprocess"] = asyncio.run(_in_process(sets, a.dtype))
        print("in-process done", flush=True)
    if "project" not in skip:
        R["project"] = _project(sets, a.dtype, logs, memory_sentences=a.memory_sentences)
        print("project done", flush=True)
    if "two" not in skip:
        R["project2"] = _project(sets, a.dtype, logs, workers=2)
        print("two workers done", flush=True)
    if "serve" not in skip:
        R["serve"] = _vllm_serve(sets, a.dtype, logs)
        print("vllm serve done", flush=True)
    if "st" not in skip:
        R["st"] = _sentence_transformers(sets)
        print("sentence-transformers done", flush=True)
    report(R, sets, a)
    return 0


def report(R: dict, sets: dict[str, list[str]], a: argparse.Namespace) -> None:
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows = []  # (path, pattern, n, seconds, tokens)
    for name, texts in sets.items():
        if "inprocess" in R:
            rows.append(("vLLM AsyncLLM in-process", name, len(texts), *R["inprocess"][name]))
        if "st" in R:
            rows.append(("sentence-transformers", name + ", batch 64", len(texts), *R["st"][name]))
    for key, label in (("project", "this project"), ("project2", "this project, 2 workers"),
                       ("serve", "vllm serve")):
        for pat, (sec, tok) in R.get(key, {}).get("patterns", {}).items():
            n = len(sets["sentences" if pat.startswith("sentences") else "documents"])
            rows.append((label, pat, n, sec, tok))
    print("\n| path | inputs, pattern | inputs/s | tokens/s |\n| --- | --- | --- | --- |")
    for path, pat, n, sec, tok in rows:
        print(f"| {path} | {pat} | {n / sec:.0f} | {tok / sec:.0f} |")
    rate = {(p, pat): n / sec for p, pat, n, sec, _ in rows}

    def ratio(pat_a: str, other: tuple[str, str]) -> str:
        mine = rate.get(("this project", pat_a))
        theirs = rate.get(other)
        return f"{mine / theirs:.2f}x" if mine and theirs else "n/a"

    print("\nthis project vs:")
    for name in sets:
        big = f"{name}, 64/request x4"
        print(f"  {name}: in-process {ratio(big, ('vLLM AsyncLLM in-process', name))}, "
              f"vllm serve {ratio(big, ('vllm serve', big))}, "
              f"sentence-transformers {ratio(big, ('sentence-transformers', name + ', batch 64'))}")
    small = "sentences, 1/request x64"
    print(f"  1 sentence/request x64: vllm serve {ratio(small, ('vllm serve', small))}, "
          f"in-process {ratio(small, ('vLLM AsyncLLM in-process', 'sentences'))}")
    if "project2" in R and "project" in R:
        two = rate[("this project, 2 workers", "sentences, 64/request x8")]
        one = rate[("this project", "sentences, 64/request x4")]
        print(f"  2 workers vs 1: {two / one:.2f}x")
    for key, label in (("project", "this project"), ("serve", "vllm serve")):
        if "latency" in R.get(key, {}):
            p50, p99 = R[key]["latency"]
            print(f"latency, 1 sentence, sequential, {label}: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    if "latency" in R.get("project", {}) and "latency" in R.get("serve", {}):
        print(f"added latency p50 (this project - vllm serve): "
              f"{R['project']['latency'][0] - R['serve']['latency'][0]:+.1f} ms")
    if "memory" in R.get("project", {}):
        m = R["project"]["memory"]
        print(f"worker RSS over {m['sentences']} sentences: start {m['rss_start_mib']:.0f} MiB, "
              f"end {m['rss_end_mib']:.0f} MiB, max {m['rss_max_mib']:.0f} MiB")
    (out / "suite.json").write_text(json.dumps(R, indent=1, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
        labels = [f"{p} | {pat}" for p, pat, *_ in rows]
        vals = [n / sec for _, _, n, sec, _ in rows]
        colors = ["tab:blue" if p.startswith("this project") else "tab:gray" for p, *_ in rows]
        ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
        for i, v in enumerate(vals[::-1]):
            ax.text(v, i, f" {v:.0f}", va="center")
        ax.set_xlabel("inputs / s (all-MiniLM-L6-v2, " + a.dtype + f", {os.cpu_count()} CPU cores)")
        ax.set_title("Embedding throughput: this project vs. alternatives")
        fig.tight_layout()
        fig.savefig(out / "suite.png", dpi=110)
        print(f"chart: {out / 'suite.png'}")
    except ImportError:
        print("matplotlib not installed: no chart")


if __name__ == "__main__":
    sys.exit(main())
