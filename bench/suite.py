"""Throughput suite: this project against what a user would run instead, one invocation,
same machine, same model (all-MiniLM-L6-v2), same dtype, same engine settings, same inputs.

    python bench/suite.py [--sentences 4000] [--docs 300] [--rounds 3] [--memory-sentences 100000]

Paths:
  1. vLLM ``AsyncLLM`` in-process, every input submitted at once (the ceiling);
  2. this project: client -> gateway -> queue -> worker (also: 2 workers on one queue; the
     queue on Redis; 2 gateway replicas on that Redis, clients split over both, the worker
     pulling through one);
  3. ``vllm serve`` (vLLM's OpenAI server) ``/v1/embeddings``;
  4. sentence-transformers ``encode`` on the same CPU, batches of 64.
Client patterns for 2 and 3: 64 inputs per request with 4 requests in flight ("large"), and
1 input per request with 64 clients ("small"). Inputs: distinct STS-benchmark sentences, and
documents of ~500 tokens built from them. Also: p50/p99 latency of single one-sentence requests
at low load (2 and 3), and worker RSS over ``--memory-sentences`` sentences.

Method: every path is started once and stays up (an idle engine costs ~1% of a core); then
``--rounds`` rounds run every measurement once each, in a rotated order, so slow phases of this
VM (about +-10% between minutes) hit all paths alike; the low-load latency samples rotate too.
Every path gets the same warm-up first (512 sentences and 8 documents through its own
interface). Tables give the median round and the
min-max. Per measurement the CPU seconds of each server's processes are read (psutil), split
into vLLM's model process and everything else on the server side (frontend, gateway, engine
core): on a 2-core host both come out of the same cores.
Prints tables and saves ``bench/results/suite.png`` and ``suite.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devstack import localstack as ls  # noqa: E402
from worker.config import QueueConfig  # noqa: E402
from worker.cpu_host import CpuInfo, choose_dtype  # noqa: E402

MODEL = "all-minilm-l6-v2"
REDIS = "this project, Redis store"
REPLICAS = "this project, Redis, 2 gateway replicas"
MAX_LEN = 512  # BERT's 512 positions (sentence-transformers' own cap is 256)
MAX_NUM_SEQS = 256
#: The worker's default ``queue.interactive_quiet_seconds`` (the bench's worker config keeps it).
QUIET_SECONDS = QueueConfig.model_fields["interactive_quiet_seconds"].default
GPU_MEM = 0.15  # share of host memory vLLM's CPU backend may use (no KV cache for BERT)


def _env() -> None:
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # model has 512 positions


def load_inputs(n_sent: int, n_docs: int) -> tuple[list[str], list[str]]:
    sents = ls.stsb_sentences(("dev", "train"))
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


# --- CPU accounting ---------------------------------------------------------------------------
def _cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


@dataclass
class Stack:
    """The server-side processes of one path; ``model`` is vLLM's model process."""

    procs: list[psutil.Process] = field(default_factory=list)
    #: Processes to count as the model besides vLLM's ``VLLM::Worker`` (sentence-transformers).
    model_pids: set[int] = field(default_factory=set)
    #: The queue store's server (redis-server), counted apart.
    store: psutil.Process | None = None

    @classmethod
    def of(cls, *roots: psutil.Process) -> Stack:
        ps: list[psutil.Process] = []
        for r in roots:
            ps += [r, *r.children(recursive=True)]
        return cls(ps)

    def snapshot(self) -> tuple[float, float, float]:
        """CPU-s of (the model process(es), the other server processes, the queue store)."""
        model = rest = 0.0
        for p in self.procs:
            try:
                name = p.name()
            except psutil.NoSuchProcess:
                continue
            if name.startswith("VLLM::Worker") or p.pid in self.model_pids:
                model += _cpu(p)
            else:
                rest += _cpu(p)
        return model, rest, _cpu(self.store) if self.store is not None else 0.0


# --- 1. in-process ----------------------------------------------------------------------------
class InProcess:
    """vLLM ``AsyncLLM`` in this process: every input submitted at once."""

    def __init__(self, dtype: str):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(ls.minilm_path()),
                runner="pooling",
                dtype=dtype,
                max_model_len=MAX_LEN,
                max_num_seqs=MAX_NUM_SEQS,
                gpu_memory_utilization=GPU_MEM,
            )
        )
        engine = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        # The frontend is this process (which also runs the clients, idle during these runs).
        self.stack = Stack([psutil.Process(), *engine])
        self._ids = iter(range(10**9))

    async def _one(self, text: str) -> int:
        from vllm import PoolingParams

        out = None
        async for out in self.llm.encode(  # noqa: B007 - the last output is used after the loop
            text, PoolingParams(task="embed"), request_id=f"r{next(self._ids)}"
        ):
            pass
        return len(out.prompt_token_ids)

    async def run(
        self, texts: list[str], start: Callable[[], None] = lambda: None
    ) -> tuple[float, int]:
        start()
        t0 = time.perf_counter()
        toks = await asyncio.gather(*[self._one(t) for t in texts])
        return time.perf_counter() - t0, sum(toks)

    def shutdown(self) -> None:
        self.llm.shutdown()
        del self.llm


# --- 4. sentence-transformers -----------------------------------------------------------------
class SentenceTransformers:
    def __init__(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(os.cpu_count() or 2)
        self.m = SentenceTransformer(str(ls.minilm_path()), device="cpu")
        self.m.max_seq_length = MAX_LEN
        self.stack = Stack([psutil.Process()], model_pids={os.getpid()})

    def _tokens(self, texts: list[str]) -> int:
        ids = self.m.tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"]
        return sum(len(i) for i in ids)

    async def batched(self, texts: list[str], start: Callable[[], None]) -> tuple[float, int]:
        start()
        t0 = time.perf_counter()
        self.m.encode(texts, batch_size=64)
        return time.perf_counter() - t0, self._tokens(texts)


# --- HTTP clients (2 and 3) ------------------------------------------------------------------
async def http_load(
    url: str | list[str],
    key: str,
    texts: list[str],
    per_request: int,
    concurrency: int,
    start: Callable[[], None] = lambda: None,
) -> tuple[float, int]:
    """Returns (seconds, prompt tokens); ``start()`` is called when the timed part begins, after
    a warm-up of one one-input request per connection. The load generator is aiohttp: on 2
    cores both the ``openai`` SDK and httpx's async pool burn more CPU per request than the
    servers under test (httpx reached ~70 req/s at 64 connections here). base64 vectors,
    decoded with numpy as the SDK does. With several URLs (gateway replicas): requests take
    turns."""
    import base64

    import aiohttp
    import numpy as np

    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    urls = [url] if isinstance(url, str) else url
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                aiohttp.ClientSession(
                    base_url=u,
                    headers={"Authorization": f"Bearer {key}"},
                    connector=aiohttp.TCPConnector(limit=concurrency + 4),
                    timeout=aiohttp.ClientTimeout(total=900),
                )
            )
            for u in urls
        ]
        turn = 0

        async def one(chunk: list[str]) -> None:
            nonlocal tokens, turn
            async with sem:
                client = clients[turn % len(clients)]
                turn += 1
                async with client.post(
                    "/v1/embeddings",
                    json={"model": MODEL, "input": chunk, "encoding_format": "base64"},
                ) as r:
                    body = await r.json()
                vecs = [
                    np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                    for d in body["data"]
                ]
                assert len(vecs) == len(chunk), body
                tokens += body["usage"]["prompt_tokens"]

        await asyncio.gather(*[one(c[:1]) for c in chunks[:concurrency]])  # warm-up
        tokens = 0
        start()
        t0 = time.perf_counter()
        await asyncio.gather(*[one(c) for c in chunks])
        elapsed = time.perf_counter() - t0
    return elapsed, tokens


async def batch_load(
    url: str, key: str, texts: list[str], started: Callable[[], None]
) -> tuple[float, int]:
    """One batch job of ``texts`` (a line each) through the Files and Batch APIs: seconds
    from its creation to its completion, and its prompt tokens (from the output).

    A batch job fills idle capacity: it starts once the worker has seen no interactive input
    for its ``interactive_quiet_seconds`` (the measurement before may have been interactive
    traffic, during which batch inputs enter the engine only a few at a time)."""
    import aiohttp

    lines = [
        json.dumps(
            {
                "custom_id": f"l{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": MODEL, "input": t, "encoding_format": "base64"},
            }
        )
        for i, t in enumerate(texts)
    ]
    async with aiohttp.ClientSession(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", ("\n".join(lines) + "\n").encode(), filename="bench.jsonl")
        async with c.post("/v1/files", data=form) as r:
            file_id = (await r.json())["id"]
        await asyncio.sleep(QUIET_SECONDS + 0.2)
        started()
        t0 = time.perf_counter()
        body = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
        async with c.post("/v1/batches", json=body) as r:
            batch = await r.json()
        while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
            await asyncio.sleep(0.1)
            async with c.get(f"/v1/batches/{batch['id']}") as r:
                batch = await r.json()
        elapsed = time.perf_counter() - t0
        assert batch["status"] == "completed", batch
        async with c.get(f"/v1/files/{batch['output_file_id']}/content") as r:
            out = (await r.text()).splitlines()
    assert len(out) == len(texts)
    tokens = sum(json.loads(o)["response"]["body"]["usage"]["prompt_tokens"] for o in out)
    return elapsed, tokens


async def latencies(url: str, key: str, texts: list[str], n: int) -> list[float]:
    """ms of ``n`` one-sentence requests sent one at a time (low load), over one connection."""
    import aiohttp

    lat = []
    async with aiohttp.ClientSession(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in range(n + 5):
            t0 = time.perf_counter()
            async with c.post(
                "/v1/embeddings",
                json={"model": MODEL, "input": texts[i % len(texts)], "encoding_format": "base64"},
            ) as r:
                assert r.status == 200, await r.text()
                await r.read()
            if i >= 5:
                lat.append((time.perf_counter() - t0) * 1000)
    return lat


def _rss(proc: ls.Proc) -> float:
    """MiB resident: the worker and its vLLM engine processes."""
    p = psutil.Process(proc.pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


async def memory(url: str, worker: ls.Proc, texts: list[str], total: int) -> dict:
    start = _rss(worker)
    samples = [start]
    done = 0
    while done < total:
        n = min(6400, total - done)
        await http_load(url, ls.API_KEY, (texts * (n // len(texts) + 1))[:n], 64, 8)
        done += n
        samples.append(_rss(worker))
    return {
        "sentences": done,
        "rss_start_mib": start,
        "rss_end_mib": samples[-1],
        "rss_max_mib": max(samples),
        "samples": samples,
    }


# --- the run ----------------------------------------------------------------------------------
@dataclass
class Measurement:
    path: str
    pattern: str
    texts: list[str]
    #: Runs the measurement; calls its argument when the timed part begins.
    run: Callable[[Callable[[], None]], Awaitable[tuple[float, int]]]
    stack: Stack
    rounds: list[dict] = field(default_factory=list)

    async def once(self) -> None:
        snap: list[tuple[float, float, float]] = []
        sec, tok = await self.run(lambda: snap.append(self.stack.snapshot()))
        m0, r0, s0 = snap[0]
        m1, r1, s1 = self.stack.snapshot()
        self.rounds.append(
            {
                "seconds": sec,
                "tokens": tok,
                "model_cpu_s": m1 - m0,
                "other_cpu_s": r1 - r0,
                "store_cpu_s": s1 - s0,
            }
        )
        print(f"  {self.path} | {self.pattern}: {len(self.texts) / sec:.0f} inputs/s", flush=True)

    def rates(self) -> list[float]:
        return [len(self.texts) / r["seconds"] for r in self.rounds]

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


async def run(
    a: argparse.Namespace, sets: dict[str, list[str]], logs: Path
) -> tuple[list[Measurement], dict]:
    """Starts the paths, runs the rounds; returns the measurements and the other results
    (latency samples, memory)."""
    skip = set(filter(None, a.skip.split(",")))
    sents, docs = sets["sentences"], sets["documents"]
    cores = os.cpu_count() or 1
    ms: list[Measurement] = []
    procs: list[ls.Proc] = []
    inproc = None
    out: dict = {}

    def start_worker(queue_url: str, name: str, env: dict[str, str]) -> ls.Proc:
        cfg = ls.worker_config(
            queue_url=queue_url, dtype=a.dtype, max_model_len=MAX_LEN, max_num_seqs=MAX_NUM_SEQS
        )
        w = ls.start_worker(cfg, logs, name, env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", **env})
        procs.append(w)
        return w

    try:
        if "inprocess" not in skip:
            inproc = InProcess(a.dtype)
            for name, texts in sets.items():
                ms.append(
                    Measurement(
                        "vLLM AsyncLLM in-process",
                        name,
                        texts,
                        lambda s, t=texts: inproc.run(t, s),
                        inproc.stack,
                    )
                )
        if "st" not in skip:
            st = SentenceTransformers()
            for name, texts in sets.items():
                ms.append(
                    Measurement(
                        "sentence-transformers",
                        f"{name}, batch 64",
                        texts,
                        lambda s, t=texts: st.batched(t, s),
                        st.stack,
                    )
                )
        http: dict[str, tuple[str | list[str], str, Stack]] = {}
        if "project" not in skip:
            gw = ls.start_gateway(logs, args=["--pickup-timeout", "600"])
            procs.append(gw)
            wk = start_worker(gw.url, "suite-worker", {})
            http["this project"] = (
                gw.url,
                ls.API_KEY,
                Stack.of(psutil.Process(gw.pid), psutil.Process(wk.pid)),
            )
        if "redis" not in skip:
            # The queue on Redis: one replica with its worker; then clients split over that
            # replica and a second one on the same Redis (the worker pulls through the first).
            redis_proc = ls.start_redis(logs)
            procs.append(redis_proc)
            store = psutil.Process(redis_proc.pid)
            on_redis = ["--pickup-timeout", "600", "--queue-url", redis_proc.url]
            r1 = ls.start_gateway(logs, args=on_redis)
            r2 = ls.start_gateway(logs, args=on_redis)
            procs += [r1, r2]
            wr = start_worker(r1.url, "suite-worker-redis", {})
            roots = [psutil.Process(r1.pid), psutil.Process(wr.pid)]
            http[REDIS] = (r1.url, ls.API_KEY, replace(Stack.of(*roots), store=store))
            http[REPLICAS] = (
                [r1.url, r2.url],
                ls.API_KEY,
                replace(Stack.of(*roots, psutil.Process(r2.pid)), store=store),
            )
        if "serve" not in skip:
            serve = ls.start_vllm_serve(
                ls.minilm_path(),
                MODEL,
                logs,
                "vllm-serve",
                [
                    "--runner",
                    "pooling",
                    "--dtype",
                    a.dtype,
                    "--max-model-len",
                    str(MAX_LEN),
                    "--max-num-seqs",
                    str(MAX_NUM_SEQS),
                    "--gpu-memory-utilization",
                    str(GPU_MEM),
                ],
            )
            procs.append(serve)
            http["vllm serve"] = (serve.url, "none", Stack.of(psutil.Process(serve.pid)))
        if "two" not in skip and "this project" in http:
            # Two workers on one queue split the host's cores: each engine binds its OpenMP
            # threads to its own core(s).
            gw2 = ls.start_gateway(logs, args=["--pickup-timeout", "600"])
            procs.append(gw2)
            per = max(1, cores // 2)
            roots = [psutil.Process(gw2.pid)]
            for i in range(2):
                bind = f"{i * per}-{i * per + per - 1}" if per > 1 else str(i)
                w = start_worker(gw2.url, f"suite-worker2-{i}", {"VLLM_CPU_OMP_THREADS_BIND": bind})
                roots.append(psutil.Process(w.pid))
            http["this project, 2 workers"] = (gw2.url, ls.API_KEY, Stack.of(*roots))
        for path, (url, key, stack) in http.items():
            if path.endswith("2 workers"):
                pats = [("sentences", 64, 8)]
            elif path in (REDIS, REPLICAS):
                pats = [("sentences", 64, 4), ("sentences", 1, 64)]
            else:
                pats = [("sentences", 64, 4), ("sentences", 1, 64), ("documents", 64, 4)]
                if path == "this project" and "this project, 2 workers" in http:
                    pats.append(("sentences", 64, 8))  # the same client pattern as 2 workers
            if path == "this project":
                ms.append(
                    Measurement(
                        path,
                        "sentences, batch job",
                        sents,
                        lambda s, u=url, k=key: batch_load(u, k, sents, s),
                        stack,
                    )
                )
            for name, per_req, conc in pats:
                texts = sets[name]
                ms.append(
                    Measurement(
                        path,
                        f"{name}, {per_req}/request x{conc}",
                        texts,
                        lambda s, u=url, k=key, t=texts, p=per_req, c=conc: http_load(
                            u, k, t, p, c, s
                        ),
                        stack,
                    )
                )
        # The same warm-up for every path (the first batches of a fresh engine are slower):
        # 512 sentences and 8 documents through the path's own interface.
        if inproc is not None:
            await inproc.run(sents[:512])
            await inproc.run(docs[:8])
        if "st" not in skip:
            await st.batched(sents[:512], lambda: None)
            await st.batched(docs[:8], lambda: None)
        for url, key, _ in http.values():
            await http_load(url, key, sents[:512], 64, 8)
            await http_load(url, key, docs[:8], 4, 2)
        print(f"all paths up; {len(ms)} measurements x {a.rounds} rounds", flush=True)
        lat: dict[str, list[float]] = defaultdict(list)
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", flush=True)
            k = (r * len(ms)) // max(a.rounds, 1)
            for m in ms[k:] + ms[:k]:  # rotated order
                await m.once()
            paths = [p for p in ("this project", REDIS, "vllm serve") if p in http]
            k = r % len(paths) if paths else 0
            for path in paths[k:] + paths[:k]:  # low-load latency, rotated too
                url, key, _ = http[path]
                assert isinstance(url, str)
                lat[path] += await latencies(url, key, sents, a.latency_requests // a.rounds)
        out["measurements"] = [
            {"path": m.path, "pattern": m.pattern, "inputs": len(m.texts), "rounds": m.rounds}
            for m in ms
        ]
        out["latency_ms"] = dict(lat)
        if a.memory_sentences and "this project" in http:
            for p in procs:  # the other engines leave the cores to the worker under test
                if p not in (gw, wk):
                    p.stop()
            out["memory"] = await memory(gw.url, wk, sents, a.memory_sentences)
    finally:
        for p in reversed(procs):
            p.stop()
        if inproc is not None:
            inproc.shutdown()
    return ms, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-requests", type=int, default=300, help="per path, over all rounds")
    ap.add_argument(
        "--dtype", default="auto", help='auto: what the worker\'s dtype = "auto" picks on this CPU'
    )
    ap.add_argument("--memory-sentences", type=int, default=100_000)
    ap.add_argument(
        "--skip", default="", help="comma-separated: inprocess,project,two,redis,serve,st"
    )
    a = ap.parse_args()
    _env()
    cpu = CpuInfo.read()
    if a.dtype == "auto":
        a.dtype = choose_dtype(cpu)[0]
    sents, docs = load_inputs(a.sentences, a.docs)
    sets = {"sentences": sents, "documents": docs}
    logs = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    print(
        f"CPU: {cpu.model_name}, {os.cpu_count()} cores, bfloat16 flags: "
        f"{', '.join(cpu.bf16_flags) or 'none'}",
        flush=True,
    )
    print(
        f"{len(sents)} sentences, {len(docs)} documents, dtype={a.dtype}, "
        f"{a.rounds} rounds; logs {logs}",
        flush=True,
    )
    ms, R = asyncio.run(run(a, sets, logs))
    R["host"] = {
        "cpu": cpu.model_name,
        "cores": os.cpu_count(),
        "bf16_flags": cpu.bf16_flags,
        "dtype": a.dtype,
    }
    report(ms, R, a)
    return 0


def report(ms: list[Measurement], R: dict, a: argparse.Namespace) -> None:
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    print(
        "\n| path | inputs, pattern | inputs/s (median) | min-max | tokens/s | "
        "CPU-s per 1k inputs: model process / rest of server / redis-server |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    rate: dict[tuple[str, str], float] = {}
    for m in ms:
        rs = m.rates()
        med = statistics.median(rs)
        rate[(m.path, m.pattern)] = med
        k = 1000 / len(m.texts)
        print(
            f"| {m.path} | {m.pattern} | {med:.0f} | {min(rs):.0f}-{max(rs):.0f} | "
            f"{m.median('tokens') / m.median('seconds'):.0f} | "
            f"{m.median('model_cpu_s') * k:.2f} / {m.median('other_cpu_s') * k:.2f} / "
            f"{m.median('store_cpu_s') * k:.2f} |"
        )

    def ratio(mine: tuple[str, str], other: tuple[str, str]) -> str:
        x, y = rate.get(mine), rate.get(other)
        return f"{x / y:.2f}x" if x and y else "n/a"

    P = "this project"
    big, small = "sentences, 64/request x4", "sentences, 1/request x64"
    ratios = {
        "vs in-process, sentences 64/request": ratio(
            (P, big), ("vLLM AsyncLLM in-process", "sentences")
        ),
        "vs vllm serve, sentences 64/request x4": ratio((P, big), ("vllm serve", big)),
        "vs vllm serve, sentences 1/request x64": ratio((P, small), ("vllm serve", small)),
        "vs vllm serve, documents 64/request x4": ratio(
            (P, "documents, 64/request x4"), ("vllm serve", "documents, 64/request x4")
        ),
        "vs sentence-transformers batch 64, sentences 64/request x4": ratio(
            (P, big), ("sentence-transformers", "sentences, batch 64")
        ),
        "vs sentence-transformers batch 64, documents": ratio(
            (P, "documents, 64/request x4"), ("sentence-transformers", "documents, batch 64")
        ),
        "Redis store vs memory store, sentences 64/request x4": ratio((REDIS, big), (P, big)),
        "Redis store vs memory store, sentences 1/request x64": ratio((REDIS, small), (P, small)),
        "2 replicas on Redis vs memory store, sentences 64/request x4": ratio(
            (REPLICAS, big), (P, big)
        ),
        "2 replicas on Redis vs memory store, sentences 1/request x64": ratio(
            (REPLICAS, small), (P, small)
        ),
        "batch job vs sentences 64/request x4 (the best interactive pattern)": ratio(
            (P, "sentences, batch job"), (P, big)
        ),
        "2 workers vs 1 worker, sentences 64/request x8": ratio(
            ("this project, 2 workers", "sentences, 64/request x8"), (P, "sentences, 64/request x8")
        ),
    }
    print("\nthis project (medians of the rounds):")
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    R["ratios"] = ratios
    lat = R.get("latency_ms", {})
    p50 = {}
    for path, samples in lat.items():
        xs = sorted(samples)
        p50[path] = statistics.median(xs)
        print(
            f"latency, 1 sentence, sequential, {path}: p50 {p50[path]:.1f} ms, "
            f"p99 {xs[int(0.99 * (len(xs) - 1))]:.1f} ms ({len(xs)} requests)"
        )
    if P in p50 and "vllm serve" in p50:
        print(
            f"added latency p50 (this project - vllm serve): {p50[P] - p50['vllm serve']:+.1f} ms"
        )
    if P in p50 and REDIS in p50:
        print(f"added latency p50 (Redis store - memory store): {p50[REDIS] - p50[P]:+.1f} ms")
    if "memory" in R:
        m = R["memory"]
        print(
            f"worker RSS over {m['sentences']} sentences: start {m['rss_start_mib']:.0f} MiB, "
            f"end {m['rss_end_mib']:.0f} MiB, max {m['rss_max_mib']:.0f} MiB"
        )
    (out / "suite.json").write_text(json.dumps(R, indent=1, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 0.45 * len(ms) + 1.5))
        labels = [f"{m.path} | {m.pattern}" for m in ms][::-1]
        meds = [statistics.median(m.rates()) for m in ms][::-1]
        err = [
            [md - min(m.rates()) for md, m in zip(meds, ms[::-1], strict=True)],
            [max(m.rates()) - md for md, m in zip(meds, ms[::-1], strict=True)],
        ]
        colors = ["tab:blue" if m.path.startswith("this project") else "tab:gray" for m in ms][::-1]
        ax.barh(labels, meds, xerr=err, color=colors, capsize=3)
        for i, (v, hi) in enumerate(zip(meds, err[1], strict=True)):
            ax.text(v + hi, i, f"  {v:.0f}", va="center")
        ax.set_xlabel(
            f"inputs / s, median of {a.rounds} rounds, bars min-max "
            f"(all-MiniLM-L6-v2, {a.dtype}, {os.cpu_count()} CPU cores)"
        )
        ax.set_title("Embedding throughput: this project vs. alternatives")
        fig.tight_layout()
        fig.savefig(out / "suite.png", dpi=110)
        print(f"chart: {out / 'suite.png'}")
    except ImportError:
        print("matplotlib not installed: no chart")


if __name__ == "__main__":
    sys.exit(main())
