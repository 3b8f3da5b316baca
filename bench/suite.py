"""Throughput suite: this project against what a user would run instead, one invocation,
same machine, same model, same dtype, same inputs, interleaved.

    python bench/suite.py [--engine minilm|fast] [--sentences 4000] [--docs 300] [--rounds 3]
                          [--skip inprocess,project,two,redis,batch,serve,st,infinity,onnx]

Models (``--engine``):
  ``minilm`` — all-MiniLM-L6-v2 (the bundled model), where the engine's arithmetic is the limit;
  ``fast`` — a tiny random-weight BERT (2 layers, hidden 128, MiniLM's tokenizer, mean pooling;
  ``devstack.tiny_bert.build_embedder``, built at bench time), a stand-in for a GPU: the model
  is so cheap that the serving path around it sets the pace.
Paths:
  1. vLLM ``AsyncLLM`` in this process, every input submitted at once (vLLM's own ceiling);
  2. this project: client -> gateway -> queue -> worker (also: 2 workers on one queue; the queue
     on Redis; 2 gateway replicas on that Redis, clients split over both, the worker pulling
     through one; a batch job through the Files and Batch APIs);
  3. ``vllm serve`` (vLLM's OpenAI server) ``/v1/embeddings``;
  4. Infinity (``infinity-emb``, in a venv of its own: ``bench/peers.py``) with its torch engine
     and with ONNX Runtime (the model exported by ``optimum-cli`` and optimised as Infinity
     does), ``/v1/embeddings``;
  5. sentence-transformers ``encode`` on the same CPU, batches of 64.
Client patterns for the HTTP paths: 64 inputs per request with 4 requests in flight, 1 input
per request with 64 clients, and documents of ~500 tokens 64 per request. Inputs: distinct
STS-benchmark sentences, and documents built from them. Also: p50/p99 latency of single
one-sentence requests at low load, the vectors of every path against sentence-transformers
(min cosine over 256 sentences), and (MiniLM) worker RSS over ``--memory-sentences`` sentences.

Method: every path is started once and stays up (an idle server costs ~1 % of a core); then
``--rounds`` rounds run every measurement once each, in a rotated order, so slow phases of this
VM (about +-10 % between minutes) hit all paths alike; before each measurement the host
settles for ``--settle`` seconds (vLLM's model process keeps about one core busy for 1-2 s
after its last request, which would otherwise be charged to the next path). Every path gets
the same warm-up first. Tables give the median round and the min-max. Per measurement the CPU
seconds of each server's processes are read (psutil) by role: the model or engine process,
the worker, the gateway, the server, redis-server; on a 2-core host all come out of the same
cores. For this project's paths, each round also reads the worker's
``inference_worker_engine_busy_seconds_total``: the engine's idle time per round (seconds not
in engine steps). Prints tables and saves ``bench/results/suite-<engine>.png`` and ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import record  # noqa: E402

from devstack import localstack as ls  # noqa: E402
from worker.config import QueueConfig  # noqa: E402
from worker.cpu_host import CpuInfo  # noqa: E402

MODEL = "all-minilm-l6-v2"  # the name every HTTP path serves its model as
P = "this project"
REDIS = "this project, Redis store"
REPLICAS = "this project, Redis, 2 gateway replicas"
TWO = "this project, 2 workers"
SERVE = "vllm serve"
INF = "Infinity (torch)"
ONNX = "Infinity (ONNX Runtime)"
ST = "sentence-transformers"
INPROC = "vLLM AsyncLLM in-process"
MAX_LEN = 512  # BERT's 512 positions (sentence-transformers' own cap is 256)
MAX_NUM_SEQS = 256
#: The worker's default ``queue.interactive_quiet_seconds`` (the bench's worker config keeps it).
QUIET_SECONDS = QueueConfig.model_fields["interactive_quiet_seconds"].default
GPU_MEM = 0.15  # share of host memory vLLM's CPU backend may use (no KV cache for BERT)
#: Sentences and documents whose vectors are compared across paths (the documents also show
#: that every path embeds all of their ~500 tokens: a path that truncated them would differ).
CHECK_SENTENCES = 256
CHECK_DOCUMENTS = 16
#: Documents of each path's warm-up: two requests of 64, the measured request size (the fast
#: engine's steps hold up to 33 documents).
WARMUP_DOCUMENTS = 128


def _env() -> None:
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # MiniLM's config says 256 positions


def bench_model(engine: str, work: Path) -> Path:
    """The checkpoint of ``--engine``: ``fast`` the tiny random BERT (built in ``work``),
    ``minilm`` the bundled all-MiniLM-L6-v2."""
    if engine == "fast":
        from devstack import tiny_bert

        return tiny_bert.build_embedder(work / "tiny-bert-embedder")
    return ls.minilm_path()


def load_inputs(model: Path, n_sent: int, n_docs: int) -> tuple[list[str], list[str]]:
    sents = ls.stsb_sentences(("dev", "train"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
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


ROLES = ("model", "engine core", "worker", "gateway", "server", "redis-server")


@dataclass
class Stack:
    """The server-side processes of one path, each with its role: ``model`` (vLLM's model
    process; the process that runs the model where it has no other role), ``engine core``
    (vLLM's), ``worker`` (the inference-worker process; with ``engine_core = "thread"`` the
    engine runs in it; with ``process`` its engine process, ``VLLM::LLMEngine``, is
    ``model``), ``gateway``, ``server`` (vllm serve's or Infinity's API process),
    ``redis-server``."""

    procs: list[tuple[str, psutil.Process]] = field(default_factory=list)
    #: The workers' metrics URLs whose engine busy time a snapshot reads (:data:`BUSY`).
    engines: list[str] = field(default_factory=list)

    def add(self, role: str, root: psutil.Process) -> Stack:
        """``root`` as ``role`` and its children by vLLM's process names."""
        self.procs.append((role, root))
        for child in root.children(recursive=True):
            name = child.name()
            if name.startswith(("VLLM::Worker", "VLLM::LLMEngine")):
                self.procs.append(("model", child))
            elif name.startswith("VLLM::EngineCor"):
                self.procs.append(("engine core", child))
            else:
                self.procs.append((role, child))
        return self

    def engine(self, worker: ls.Proc) -> Stack:
        """Read ``worker``'s engine busy time (its ``/metrics``) in every snapshot."""
        self.engines.append(worker.url + "/metrics")
        return self

    def snapshot(self) -> dict[str, float]:
        """CPU seconds by role so far, and :data:`BUSY`: the engines' seconds in steps."""
        out: dict[str, float] = defaultdict(float)
        for role, p in self.procs:
            out[role] += _cpu(p)
        for url in self.engines:
            text = httpx.get(url, timeout=10).text
            for family in text_string_to_metric_families(text):
                if family.name == "inference_worker_engine_busy_seconds":
                    out[BUSY] += sum(x.value for x in family.samples if x.name.endswith("_total"))
        return out


#: A snapshot's key for the seconds the workers' engines spent in steps
#: (``inference_worker_engine_busy_seconds_total``): per round, ``1 - its growth / the
#: round's seconds`` is the share of the round the engine waited for work.
BUSY = "engine busy"


def _pid(proc: ls.Proc) -> psutil.Process:
    return psutil.Process(proc.pid)


# --- 1. in-process ----------------------------------------------------------------------------
class InProcess:
    """vLLM ``AsyncLLM`` in this process: every input submitted at once."""

    def __init__(self, model: Path, dtype: str):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        self.llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(model),
                runner="pooling",
                dtype=dtype,
                max_model_len=MAX_LEN,
                max_num_seqs=MAX_NUM_SEQS,
                gpu_memory_utilization=GPU_MEM,
            )
        )
        self.stack = Stack()
        self.stack.procs.append(("server", psutil.Process()))  # the frontend, and the clients
        for p in psutil.Process().children(recursive=True):
            if p.pid not in before:
                role = "model" if p.name().startswith("VLLM::Worker") else "engine core"
                self.stack.procs.append((role, p))
        self._ids = iter(range(10**9))

    async def _one(self, text: str) -> tuple[int, np.ndarray]:
        from vllm import PoolingParams

        out = None
        async for out in self.llm.encode(  # noqa: B007 - the last output is used after the loop
            text, PoolingParams(task="embed"), request_id=f"r{next(self._ids)}"
        ):
            pass
        return len(out.prompt_token_ids), out.outputs.data.float().numpy()

    async def vectors(self, texts: list[str]) -> np.ndarray:
        return np.stack([v for _, v in await asyncio.gather(*[self._one(t) for t in texts])])

    async def run(
        self, texts: list[str], start: Callable[[], None] = lambda: None
    ) -> tuple[float, int]:
        start()
        t0 = time.perf_counter()
        outs = await asyncio.gather(*[self._one(t) for t in texts])
        return time.perf_counter() - t0, sum(n for n, _ in outs)

    def shutdown(self) -> None:
        self.llm.shutdown()
        del self.llm


# --- 5. sentence-transformers -----------------------------------------------------------------
class SentenceTransformers:
    def __init__(self, model: Path) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(os.cpu_count() or 2)
        self.m = SentenceTransformer(str(model), device="cpu")
        self.m.max_seq_length = MAX_LEN
        self.stack = Stack([("model", psutil.Process())])

    def _tokens(self, texts: list[str]) -> int:
        ids = self.m.tokenizer(texts, truncation=True, max_length=MAX_LEN)["input_ids"]
        return sum(len(i) for i in ids)

    def vectors(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.m.encode(texts, batch_size=64, normalize_embeddings=True))

    async def batched(self, texts: list[str], start: Callable[[], None]) -> tuple[float, int]:
        start()
        t0 = time.perf_counter()
        self.m.encode(texts, batch_size=64)
        return time.perf_counter() - t0, self._tokens(texts)


# --- HTTP clients -----------------------------------------------------------------------------
def _session(url: str, key: str, concurrency: int) -> object:
    import aiohttp

    return aiohttp.ClientSession(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        connector=aiohttp.TCPConnector(limit=concurrency + 4),
        timeout=aiohttp.ClientTimeout(total=900),
    )


def _decode(body: dict, n: int) -> np.ndarray:
    """float32 [n, dim] from a base64 embeddings response, in input order (``index``: a
    server may list them in another order)."""
    data = sorted(body["data"], key=lambda d: d["index"])
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
    assert len(vecs) == n, body
    return np.stack(vecs)


async def http_vectors(url: str, key: str, texts: list[str]) -> np.ndarray:
    """The path's vectors of ``texts`` (64 per request), float32 [n, dim]."""
    out = []
    async with _session(url, key, 1) as c:  # type: ignore[attr-defined]
        for i in range(0, len(texts), 64):
            chunk = texts[i : i + 64]
            body = {"model": MODEL, "input": chunk, "encoding_format": "base64"}
            async with c.post("/v1/embeddings", json=body) as r:
                out.append(_decode(await r.json(), len(chunk)))
    return np.concatenate(out)


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
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    urls = [url] if isinstance(url, str) else url
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_session(u, key, concurrency)) for u in urls]  # type: ignore[arg-type]
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
                _decode(body, len(chunk))
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
            # Polled every 20 ms: the job's end is known to within that (the interactive
            # patterns stop at their last answer; a 0.1 s poll added ~50 ms, ~3 % of a
            # 4,000-sentence job on the fast engine).
            await asyncio.sleep(0.02)
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

    async def once(self, settle: float) -> None:
        await asyncio.sleep(settle)
        snap: list[dict[str, float]] = []
        sec, tok = await self.run(lambda: snap.append(self.stack.snapshot()))
        after = self.stack.snapshot()
        cpu = {role: after[role] - snap[0].get(role, 0.0) for role in after}
        self.rounds.append({"seconds": sec, "tokens": tok, "cpu_s": cpu})
        print(f"  {self.path} | {self.pattern}: {len(self.texts) / sec:.0f} inputs/s", flush=True)

    def rates(self) -> list[float]:
        return [len(self.texts) / r["seconds"] for r in self.rounds]

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)

    def engine_idle(self) -> tuple[float, float] | None:
        """Median over the rounds of the engine's idle seconds and idle share (None: the path
        has no worker engine)."""
        if not all(BUSY in r["cpu_s"] for r in self.rounds):
            return None
        idle = [r["seconds"] - r["cpu_s"][BUSY] for r in self.rounds]
        share = [i / r["seconds"] for i, r in zip(idle, self.rounds, strict=True)]
        return statistics.median(idle), statistics.median(share)

    def cpu_per_1k(self) -> dict[str, float]:
        roles = {role for r in self.rounds for role in r["cpu_s"]}
        k = 1000 / len(self.texts)
        return {
            role: statistics.median(r["cpu_s"].get(role, 0.0) for r in self.rounds) * k
            for role in ROLES
            if role in roles
        }


@dataclass
class Http:
    """An HTTP path: its URL(s), key and server processes; ``latency``: measure it."""

    url: str | list[str]
    key: str
    stack: Stack
    patterns: list[tuple[str, int, int]]
    latency: bool = False


async def run(
    a: argparse.Namespace, model: Path, sets: dict[str, list[str]], logs: Path
) -> tuple[list[Measurement], dict]:
    """Starts the paths, runs the rounds; returns the measurements and the other results
    (latency samples, vector checks, memory)."""
    skip = set(filter(None, a.skip.split(",")))
    sents, docs = sets["sentences"], sets["documents"]
    cores = os.cpu_count() or 1
    ms: list[Measurement] = []
    procs: list[ls.Proc] = []
    inproc = st = None
    out: dict = {}
    big, small, doc = ("sentences", 64, 4), ("sentences", 1, 64), ("documents", 64, 4)

    def start_worker(queue_url: str, name: str, env: dict[str, str]) -> ls.Proc:
        cfg = ls.worker_config(
            queue_url=queue_url,
            model_path=model,
            dtype=a.dtype,
            max_model_len=MAX_LEN,
            max_num_seqs=MAX_NUM_SEQS,
        )
        w = ls.start_worker(cfg, logs, name, env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", **env})
        procs.append(w)
        return w

    gw = wk = None
    try:
        if "inprocess" not in skip:
            inproc = InProcess(model, a.dtype)
            for name, texts in sets.items():
                ms.append(
                    Measurement(
                        INPROC, name, texts, lambda s, t=texts: inproc.run(t, s), inproc.stack
                    )
                )
        if "st" not in skip:
            st = SentenceTransformers(model)
            for name, texts in sets.items():
                ms.append(
                    Measurement(
                        ST,
                        f"{name}, batch 64",
                        texts,
                        lambda s, t=texts: st.batched(t, s),
                        st.stack,
                    )
                )
        http: dict[str, Http] = {}
        if "project" not in skip:
            gw = ls.start_gateway(logs, args=["--pickup-timeout", "600"])
            procs.append(gw)
            wk = start_worker(gw.url, "suite-worker", {})
            stack = Stack().add("gateway", _pid(gw)).add("worker", _pid(wk)).engine(wk)
            pats = [big, small, doc] + ([("sentences", 64, 8)] if "two" not in skip else [])
            http[P] = Http(gw.url, ls.API_KEY, stack, pats, latency=True)
            if "batch" not in skip:
                ms.append(
                    Measurement(
                        P,
                        "sentences, batch job",
                        sents,
                        lambda s, u=gw.url: batch_load(u, ls.API_KEY, sents, s),
                        stack,
                    )
                )
        if "redis" not in skip:
            # The queue on Redis: one replica with its worker; then clients split over that
            # replica and a second one on the same Redis (the worker pulls through the first).
            redis_proc = ls.start_redis(logs)
            procs.append(redis_proc)
            on_redis = ["--pickup-timeout", "600", "--queue-url", redis_proc.url]
            r1 = ls.start_gateway(logs, args=on_redis)
            r2 = ls.start_gateway(logs, args=on_redis)
            procs += [r1, r2]
            wr = start_worker(r1.url, "suite-worker-redis", {})

            def redis_stack(*gateways: ls.Proc) -> Stack:
                s = Stack().add("worker", _pid(wr)).engine(wr).add("redis-server", _pid(redis_proc))
                for g in gateways:
                    s.add("gateway", _pid(g))
                return s

            http[REDIS] = Http(r1.url, ls.API_KEY, redis_stack(r1), [big, small], latency=True)
            http[REPLICAS] = Http([r1.url, r2.url], ls.API_KEY, redis_stack(r1, r2), [big, small])
        if "serve" not in skip:
            serve = ls.start_vllm_serve(
                model,
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
            http[SERVE] = Http(
                serve.url, "none", Stack().add("server", _pid(serve)), [big, small, doc], True
            )
        for path, engine, flag in ((INF, "torch", "infinity"), (ONNX, "optimum", "onnx")):
            if flag in skip:
                continue
            import peers

            inf = peers.start_infinity(
                model, MODEL, engine, logs / "infinity", logs, a.dtype, max_seq_length=MAX_LEN
            )
            procs.append(inf)
            http[path] = Http(
                inf.url, "none", Stack().add("server", _pid(inf)), [big, small, doc], True
            )
            out.setdefault("peers", peers.versions())
        if "two" not in skip and P in http:
            # Two workers on one queue split the host's cores: each engine binds its OpenMP
            # threads to its own core(s).
            gw2 = ls.start_gateway(logs, args=["--pickup-timeout", "600"])
            procs.append(gw2)
            per = max(1, cores // 2)
            stack = Stack().add("gateway", _pid(gw2))
            for i in range(2):
                bind = f"{i * per}-{i * per + per - 1}" if per > 1 else str(i)
                w = start_worker(gw2.url, f"suite-worker2-{i}", {"VLLM_CPU_OMP_THREADS_BIND": bind})
                stack.add("worker", _pid(w))
            http[TWO] = Http(gw2.url, ls.API_KEY, stack, [("sentences", 64, 8)])
        for path, h in http.items():
            for name, per_req, conc in h.patterns:
                texts = sets[name]
                ms.append(
                    Measurement(
                        path,
                        f"{name}, {per_req}/request x{conc}",
                        texts,
                        lambda s, h=h, t=texts, p=per_req, c=conc: http_load(
                            h.url, h.key, t, p, c, s
                        ),
                        h.stack,
                    )
                )
        # The same warm-up for every path (the first batches of a fresh engine are slower,
        # each new batch shape once): 512 sentences and WARMUP_DOCUMENTS documents through
        # the path's own interface.
        warm_docs = docs[:WARMUP_DOCUMENTS]
        if inproc is not None:
            await inproc.run(sents[:512])
            await inproc.run(warm_docs)
        if st is not None:
            await st.batched(sents[:512], lambda: None)
            await st.batched(warm_docs, lambda: None)
        for h in http.values():
            await http_load(h.url, h.key, sents[:512], 64, 8)
            await http_load(h.url, h.key, warm_docs, 64, 2)
        reference = st or SentenceTransformers(model)
        out["min_cosine_vs_sentence_transformers"] = await check_vectors(
            reference, sents[:CHECK_SENTENCES], http, inproc, "sentences"
        )
        out["min_cosine_documents_vs_sentence_transformers"] = await check_vectors(
            reference, docs[:CHECK_DOCUMENTS], http, inproc, "documents"
        )
        del reference
        print(f"all paths up; {len(ms)} measurements x {a.rounds} rounds", flush=True)
        lat: dict[str, list[float]] = defaultdict(list)
        lat_paths = [p for p, h in http.items() if h.latency]
        for r in range(a.rounds):
            print(f"round {r + 1}/{a.rounds}", flush=True)
            k = (r * len(ms)) // max(a.rounds, 1)
            for m in ms[k:] + ms[:k]:  # rotated order
                await m.once(a.settle)
            k = r % len(lat_paths) if lat_paths else 0
            for path in lat_paths[k:] + lat_paths[:k]:  # low-load latency, rotated too
                await asyncio.sleep(a.settle)
                url = http[path].url
                assert isinstance(url, str)
                lat[path] += await latencies(
                    url, http[path].key, sents, a.latency_requests // a.rounds
                )
        out["measurements"] = [
            {"path": m.path, "pattern": m.pattern, "inputs": len(m.texts), "rounds": m.rounds}
            for m in ms
        ]
        out["latency_ms"] = dict(lat)
        if a.memory_sentences and gw is not None and wk is not None:
            for p in procs:  # the other servers leave the cores to the worker under test
                if p not in (gw, wk):
                    p.stop()
            out["memory"] = await memory(gw.url, wk, sents, a.memory_sentences)
    finally:
        for p in reversed(procs):
            p.stop()
        if inproc is not None:
            inproc.shutdown()
    return ms, out


async def check_vectors(
    reference: SentenceTransformers,
    texts: list[str],
    http: dict[str, Http],
    inproc: InProcess | None,
    label: str,
) -> dict[str, float]:
    """Min cosine of every path's vectors of ``texts`` (``label``: what they are) against
    sentence-transformers' (``max_seq_length`` 512, as every path)."""
    want = reference.vectors(texts)
    got: dict[str, np.ndarray] = {}
    if inproc is not None:
        got[INPROC] = await inproc.vectors(texts)
    for path, h in http.items():
        url = h.url if isinstance(h.url, str) else h.url[0]
        got[path] = await http_vectors(url, h.key, texts)
    out = {}
    for path, vecs in got.items():
        unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
        out[path] = float(np.min(np.sum(unit * want, axis=1)))
        print(
            f"vectors of {len(texts)} {label}, {path}: min cosine vs sentence-transformers "
            f"{out[path]:.7f}",
            flush=True,
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["minilm", "fast"], default="minilm")
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before each")
    ap.add_argument("--latency-requests", type=int, default=300, help="per path, over all rounds")
    ap.add_argument(
        "--dtype",
        default="float32",
        help="every path's dtype; float32 (the default) is the CPU default of every peer and "
        "keeps the vectors comparable",
    )
    ap.add_argument("--memory-sentences", type=int, default=None, help="default: 100,000 (minilm)")
    ap.add_argument(
        "--skip",
        default="",
        help="comma-separated: inprocess,project,two,redis,batch,serve,st,infinity,onnx",
    )
    a = ap.parse_args()
    _env()
    cpu = CpuInfo.read()
    logs = Path(tempfile.mkdtemp(prefix="bench-suite-"))
    model = bench_model(a.engine, logs)
    if a.memory_sentences is None:
        a.memory_sentences = 100_000 if a.engine == "minilm" else 0
    sents, docs = load_inputs(model, a.sentences, a.docs)
    sets = {"sentences": sents, "documents": docs}
    print(
        f"CPU: {cpu.model_name}, {os.cpu_count()} cores, bfloat16 flags: "
        f"{', '.join(cpu.bf16_flags) or 'none'}",
        flush=True,
    )
    print(
        f"engine {a.engine} ({model}), {len(sents)} sentences, {len(docs)} documents, "
        f"dtype={a.dtype}, {a.rounds} rounds, {a.settle:g} s settle; logs {logs}",
        flush=True,
    )
    ms, R = asyncio.run(run(a, model, sets, logs))
    R["host"] = {
        "cpu": cpu.model_name,
        "cores": os.cpu_count(),
        "bf16_flags": cpu.bf16_flags,
        "dtype": a.dtype,
        "engine": a.engine,
    }
    report(ms, R, a)
    return 0


def report(ms: list[Measurement], R: dict, a: argparse.Namespace) -> None:
    out = record.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    print(
        "\n| path | inputs, pattern | inputs/s (median) | min-max | tokens/s | "
        "CPU-s per 1k inputs by process |\n| --- | --- | --- | --- | --- | --- |"
    )
    rate: dict[tuple[str, str], float] = {}
    for m in ms:
        rs = m.rates()
        med = statistics.median(rs)
        rate[(m.path, m.pattern)] = med
        cpu = ", ".join(f"{role} {v:.2f}" for role, v in m.cpu_per_1k().items())
        print(
            f"| {m.path} | {m.pattern} | {med:.0f} | {min(rs):.0f}-{max(rs):.0f} | "
            f"{m.median('tokens') / m.median('seconds'):.0f} | {cpu} |"
        )

    def ratio(mine: tuple[str, str], other: tuple[str, str]) -> str:
        x, y = rate.get(mine), rate.get(other)
        return f"{x / y:.2f}x" if x and y else "n/a"

    big, small = "sentences, 64/request x4", "sentences, 1/request x64"
    docs = "documents, 64/request x4"
    ratios = {
        "vs in-process, sentences 64/request": ratio((P, big), (INPROC, "sentences")),
        "vs in-process, documents": ratio((P, docs), (INPROC, "documents")),
    }
    for peer in (SERVE, INF, ONNX):
        for pat in (big, small, docs):
            ratios[f"vs {peer}, {pat}"] = ratio((P, pat), (peer, pat))
    ratios.update(
        {
            "vs sentence-transformers batch 64, sentences 64/request x4": ratio(
                (P, big), (ST, "sentences, batch 64")
            ),
            "vs sentence-transformers batch 64, documents": ratio(
                (P, docs), (ST, "documents, batch 64")
            ),
            "Redis store vs memory store, sentences 64/request x4": ratio((REDIS, big), (P, big)),
            "Redis store vs memory store, sentences 1/request x64": ratio(
                (REDIS, small), (P, small)
            ),
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
                (TWO, "sentences, 64/request x8"), (P, "sentences, 64/request x8")
            ),
        }
    )
    print("\nengine idle per round (seconds not in engine steps; medians of the rounds):")
    for m in ms:
        if (idle := m.engine_idle()) is not None:
            R.setdefault("engine_idle", {})[f"{m.path} | {m.pattern}"] = idle
            print(f"  {m.path} | {m.pattern}: {idle[0]:.2f} s, {idle[1]:.0%} of the round")
    print("\nthis project (medians of the rounds):")
    for k, v in ratios.items():
        if v != "n/a":
            print(f"  {k}: {v}")
    R["ratios"] = ratios
    p50 = {}
    for path, samples in R.get("latency_ms", {}).items():
        xs = sorted(samples)
        p50[path] = statistics.median(xs)
        print(
            f"latency, 1 sentence, sequential, {path}: p50 {p50[path]:.1f} ms, "
            f"p99 {xs[int(0.99 * (len(xs) - 1))]:.1f} ms ({len(xs)} requests)"
        )
    if P in p50:
        for other in (SERVE, INF, ONNX):
            if other in p50:
                print(f"added latency p50 (this project - {other}): {p50[P] - p50[other]:+.1f} ms")
        if REDIS in p50:
            print(f"added latency p50 (Redis store - memory store): {p50[REDIS] - p50[P]:+.1f} ms")
    if R.get("memory"):
        m = R["memory"]
        print(
            f"worker RSS over {m['sentences']} sentences: start {m['rss_start_mib']:.0f} MiB, "
            f"end {m['rss_end_mib']:.0f} MiB, max {m['rss_max_mib']:.0f} MiB"
        )
    name = f"suite-{a.engine}"
    record.write(name, R)
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
        colors = ["tab:blue" if m.path.startswith(P) else "tab:gray" for m in ms][::-1]
        ax.barh(labels, meds, xerr=err, color=colors, capsize=3)
        for i, (v, hi) in enumerate(zip(meds, err[1], strict=True)):
            ax.text(v + hi, i, f"  {v:.0f}", va="center")
        model = "all-MiniLM-L6-v2" if a.engine == "minilm" else "tiny BERT (fast engine)"
        ax.set_xlabel(
            f"inputs / s, median of {a.rounds} rounds, bars min-max "
            f"({model}, {a.dtype}, {os.cpu_count()} CPU cores)"
        )
        ax.set_title("Embedding throughput: this project vs. alternatives")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        print(f"chart: {out / f'{name}.png'}")
    except ImportError:
        print("matplotlib not installed: no chart")


if __name__ == "__main__":
    sys.exit(main())
