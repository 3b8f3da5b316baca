"""The end-to-end layer's real parts, as session fixtures (``tests/conftest.py`` makes them
every test's): one gateway per queue store and one vLLM worker on all-MiniLM-L6-v2 each, a
redis-server, the tiny random models and the float32 ``transformers`` reference.

Nothing here is mocked: the gateway and the worker are the console scripts an operator runs,
started as subprocesses on loopback; clients are the ``openai`` SDK and ``httpx``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devstack import localstack as ls

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Test workers skip torch.compile: about 12 s less per engine start (see localstack.EAGER).
ls.EAGER = True
REPO = Path(__file__).resolve().parents[2]
MODEL = "all-minilm-l6-v2"
#: The test worker declares these matryoshka sizes (vLLM hf_overrides) so `dimensions` can
#: be exercised; any other size must be refused.
MATRYOSHKA = [128, 256, 384]
#: The session worker's named prompts (its config's; E5's style), no default.
PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="session")
def stsb_sentences() -> list[str]:
    """200 distinct sentences from the STS benchmark dev set (``data/stsb``)."""
    return ls.stsb_sentences(("dev",))[:200]


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen3ForCausalLM (fixed seed) with a word-level tokenizer over the
    STS sentences, built with ``transformers`` for this session."""
    from devstack import tiny_qwen3

    rows = ls.read_stsb("dev")
    corpus = [s for a, b, _ in rows for s in (a, b)]
    return tiny_qwen3.build(tmp_path_factory.mktemp("tiny-qwen3"), corpus, seed=1234)


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def redis_server(stack_dir: Path) -> Iterator[ls.Proc]:
    """A real ``redis-server`` (AOF on) on a free loopback port for the session."""
    proc = ls.start_redis(stack_dir)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def store_kind() -> str:
    """The queue store a store-level test runs on: ``memory`` (the unit layer); the e2e layer
    runs the same tests again with ``redis`` (:func:`redis_store_kind`)."""
    return "memory"


def redis_store_kind(request: pytest.FixtureRequest) -> str:
    """``store_kind`` for the e2e reruns (``@pytest.fixture`` there): the Redis store on the
    session's real server, in a database of its own emptied for the test."""
    import redis

    server = request.getfixturevalue("redis_server")
    # Database 1, emptied for each test; the session's Redis gateway keeps database 0.
    url = server.url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(url).flushdb()
    request.node.redis_url = url
    return "redis"


@pytest.fixture(scope="session")
def redis_cluster(stack_dir: Path) -> Iterator[list[ls.Proc]]:
    """A real Redis Cluster for the session: three ``redis-server --cluster-enabled yes``
    primaries on free loopback ports, joined by ``redis-cli --cluster create``."""
    procs = ls.start_redis_cluster(stack_dir / "cluster")
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def empty_cluster(nodes: list[ls.Proc]) -> str:
    """Every node of the cluster emptied; its store URL (:func:`ls.cluster_url`)."""
    import redis

    for node in nodes:
        with redis.Redis.from_url(node.url) as client:
            client.flushall()
    return ls.cluster_url(nodes)


def redis_cluster_store_kind(request: pytest.FixtureRequest) -> str:
    """``store_kind`` for the cluster reruns: the Redis store on the session's cluster, every
    node emptied for the test."""
    request.node.redis_url = empty_cluster(request.getfixturevalue("redis_cluster"))
    return "redis"


@pytest.fixture
def redis_url(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    return getattr(request.node, "redis_url", None)


#: TEI's routes name no model: the session's gateways default to MiniLM.
GATEWAY_ARGS = ["--lease-seconds", "8", "--pickup-timeout", "20", "--default-model", MODEL]


@pytest.fixture(scope="session")
def memory_gateway(stack_dir: Path) -> Iterator[ls.Proc]:
    """The session's gateway, on the memory store."""
    proc = ls.start_gateway(stack_dir, args=GATEWAY_ARGS)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway(memory_gateway: ls.Proc) -> ls.Proc:
    """The session's gateway (memory store); ``tests/support/backends.py`` makes it both
    stores."""
    return memory_gateway


@pytest.fixture(scope="session")
def redis_gateway(redis_server: ls.Proc, stack_dir: Path) -> Iterator[ls.Proc]:
    """A second session gateway, on the Redis store (the session's redis-server)."""
    proc = ls.start_gateway(stack_dir, args=[*GATEWAY_ARGS, "--queue-url", redis_server.url])
    yield proc
    proc.stop()


def embed_worker_config(queue_url: str, pairs: bool = False, **kw: object) -> str:
    """The MiniLM worker's config; ``pairs``: the model also scores pairs (``/v1/score``,
    ``/v1/rerank``) as a bi-encoder."""
    dims = ", ".join(map(str, MATRYOSHKA))
    kw.setdefault("task_extra", 'prompts = { query = "query: ", document = "passage: " }')
    if pairs:
        kw["model_extra"] = f'[queue.models."{MODEL}".scoring_task]\nsupported = true\n'
    return ls.worker_config(
        queue_url=queue_url,
        model_name=MODEL,
        dtype="float32",
        generator_extra=(
            f"engine_args = {{ hf_overrides = {{ matryoshka_dimensions = [{dims}] }} }}\n"
            + str(kw.pop("generator_extra", ""))
        ),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def embed_worker(memory_embed_worker: ls.Proc) -> ls.Proc:
    """The session's embedding worker (on the memory store's gateway)."""
    return memory_embed_worker


@pytest.fixture(scope="session")
def memory_embed_worker(memory_gateway: ls.Proc, stack_dir: Path) -> Iterator[ls.Proc]:
    config = embed_worker_config(memory_gateway.url, pairs=True)
    with serving_worker(config, stack_dir, "embed-worker") as proc:
        yield proc


@pytest.fixture(scope="session")
def redis_embed_worker(redis_gateway: ls.Proc, stack_dir: Path) -> Iterator[ls.Proc]:
    """The Redis gateway's embedding worker runs vLLM's ``AsyncLLM`` with its engine-core
    process (``engine_core = "asyncllm"``, the GPU hosts' default), the memory one vLLM's
    ``LLMEngine`` in a process of the worker's own (``auto`` = ``process`` on this CPU host):
    the end-to-end tests that run on both stores check both engine cores against the same
    references (the classifier of tests/e2e/test_classify_model.py runs the third, ``thread``)."""
    config = embed_worker_config(
        redis_gateway.url, pairs=True, generator_extra='engine_core = "asyncllm"'
    )
    with serving_worker(config, stack_dir, "embed-worker-redis") as proc:
        yield proc


@pytest.fixture(scope="session")
def client(gateway: ls.Proc, embed_worker: ls.Proc):  # type: ignore[no-untyped-def]
    return openai_client(gateway.url, timeout=120)


@pytest.fixture(scope="session")
def http(gateway: ls.Proc, embed_worker: ls.Proc) -> Iterator[httpx.Client]:
    with api_client(gateway.url) as c:
        yield c


def api_client(url: str, timeout: float = 120) -> httpx.Client:
    """An ``httpx`` client of the gateway at ``url`` with the tests' API key."""
    return httpx.Client(
        base_url=url, timeout=timeout, headers={"Authorization": f"Bearer {ls.API_KEY}"}
    )


def openai_client(url: str, **options: Any) -> Any:
    """The ``openai`` SDK on the gateway at ``url`` with the tests' API key, no retries
    unless ``options`` say."""
    from openai import OpenAI

    options.setdefault("max_retries", 0)
    return OpenAI(base_url=url + "/v1", api_key=ls.API_KEY, **options)


@contextlib.contextmanager
def serving_worker(config_text: str, stack_dir: Path, name: str) -> Iterator[ls.Proc]:
    """A worker started on ``config_text`` (ready when entered), stopped on exit, where it
    must drain cleanly."""
    proc = ls.start_worker(config_text, stack_dir, name)
    yield proc
    stop_cleanly(proc)


def stop_cleanly(proc: ls.Proc) -> None:
    """Stop a worker; it must drain and exit 0."""
    code = proc.stop()
    assert code == 0, f"worker did not drain cleanly (exit {code}):\n{proc.log_tail()}"


class MiniLMReference:
    """float32 ``transformers`` forward pass with mean pooling, as sentence-transformers does."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = ls.minilm_path()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    def raw(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, not normalised: float32 [n, 384]."""
        out = []
        with self.torch.no_grad():
            for i in range(0, len(texts), 32):
                enc = self.tok(
                    texts[i : i + 32],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        return np.concatenate(out)

    def n_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tok(texts)["input_ids"]]


@pytest.fixture(scope="session")
def reference() -> MiniLMReference:
    return MiniLMReference()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(unit(a) * unit(b), axis=-1)
