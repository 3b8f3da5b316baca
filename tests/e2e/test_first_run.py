"""A newcomer's first run on a CPU host: the Pharia example config starts unchanged (model path
and queue URL aside), an engine that cannot start says why in one line, ``dtype = "auto"``
keeps the model's quality, and a causal LM serves as an embedding model (last-token pooling)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from tests.support import metric
from tests.support.stack import MODEL, cosine, unit
from worker.cpu_host import CpuInfo, choose_dtype

REPO = Path(__file__).resolve().parents[2]
PHARIA = REPO / "configs" / "pharia-qwen3-embedding-8b.toml"
PHARIA_MODEL = "qwen3-embedding-8b"


#: Qwen3-Embedding's ``config_sentence_transformers.json``: an instruction before each query,
#: nothing before documents, no default.
QWEN3_PROMPTS = {
    "query": "Instruct: Given a web search query, retrieve relevant passages that answer the "
    "query\nQuery:",
    "document": "",
}


@pytest.fixture(scope="module")
def qwen3_embedding(tiny_path, tmp_path_factory) -> Path:
    """The tiny Qwen3 with Qwen3-Embedding's named prompts file beside its weights."""
    import shutil

    path = tmp_path_factory.mktemp("qwen3-embedding") / "model"
    shutil.copytree(tiny_path, path)
    st = {"prompts": QWEN3_PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (path / "config_sentence_transformers.json").write_text(json.dumps(st))
    return path


@pytest.fixture
def pharia_worker(gateway, stack_dir, qwen3_embedding) -> Iterator[ls.Proc]:
    """The example with only ``model_path`` (a tiny Qwen3, the architecture of
    Qwen3-Embedding, with its prompts file) and ``url`` changed: no dtype, no
    gpu_memory_utilization. Logs as JSON lines (``LOG_FORMAT=json``)."""
    original = PHARIA.read_text()
    text = original.replace(
        'model_path = "/path/to/weights/Qwen/Qwen3-Embedding-8B"',
        f'model_path = "{qwen3_embedding}"',
    )
    text = text.replace(
        'url = "https://inference-api.pharia.example.com"', f'url = "{gateway.url}"'
    )
    changed = [
        (a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 2 and len(original.splitlines()) == len(text.splitlines())
    proc = ls.start_worker(text, stack_dir, "pharia-worker", env={"LOG_FORMAT": "json"})
    try:
        yield proc
    finally:
        proc.stop()


class LastTokenReference:
    """float32 ``transformers`` forward pass of the causal LM: the final hidden state of the
    last prompt token, L2-normalised (what vLLM's pooling runner gives a causal LM)."""

    def __init__(self, path: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()

    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        with self.torch.no_grad():
            for t in texts:
                hidden = self.model(**self.tok(t, return_tensors="pt")).last_hidden_state
                out.append(hidden[0, -1].numpy())
        return unit(np.array(out))


def json_log(proc: ls.Proc) -> list[dict[str, str]]:
    """The worker's log, every line a JSON object (``LOG_FORMAT=json``; fails otherwise)."""
    return [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.strip()]


def test_pharia_example_serves_on_this_cpu_host(
    gateway, pharia_worker, qwen3_embedding, stsb_sentences
):
    """Also: a causal LM served as an embedding model (last-token pooling, against
    transformers), its query instruction from the checkpoint's named prompts, JSON log lines,
    the 400 for ``dimensions`` on a model without matryoshka support, and SIGINT draining like
    SIGTERM."""
    tiny_path = qwen3_embedding
    messages = [r["message"] for r in json_log(pharia_worker)]
    assert all(
        {"asctime", "levelname", "name", "message"} <= r.keys() for r in json_log(pharia_worker)
    )
    auto = choose_dtype(CpuInfo.read())[0]
    assert any(m.startswith(f"dtype = auto on this CPU host: using {auto}") for m in messages)
    memory = [m for m in messages if m.startswith("gpu_memory_utilization not set: using 0.")]
    assert memory and "of NUMA node" in memory[0] and "GiB available now" in memory[0]
    block = "block_size not set: using 32 tokens per KV-cache block"
    assert any(m.startswith(block) for m in messages)

    from openai import OpenAI

    client = OpenAI(base_url=gateway.url + "/v1", api_key=ls.API_KEY, max_retries=0, timeout=120)
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards[PHARIA_MODEL]["tasks"] == ["embed", "tokenize"]
    assert cards[PHARIA_MODEL]["max_model_len"] == 2048
    texts = stsb_sentences[:8]
    resp = client.embeddings.create(model=PHARIA_MODEL, input=texts, encoding_format="float")
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    want = LastTokenReference(tiny_path).embed(texts)
    assert got.shape == want.shape
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert cosine(got, want).min() >= (0.999 if auto == "float32" else 0.99)
    assert cards[PHARIA_MODEL]["prompts"] == QWEN3_PROMPTS
    queries = client.embeddings.create(
        model=PHARIA_MODEL, input=texts[:4], extra_body={"input_type": "query"}
    )
    got = np.array([d.embedding for d in queries.data], dtype=np.float32)
    prompted = LastTokenReference(tiny_path).embed([QWEN3_PROMPTS["query"] + t for t in texts[:4]])
    assert cosine(got, prompted).min() >= (0.999 if auto == "float32" else 0.99)
    assert cosine(got, want[:4]).max() < 0.99  # the instruction changed the vectors
    text = httpx.get(pharia_worker.url + "/metrics").text
    assert metric(text, "inference_worker_build_info", dtype=auto) == 1
    r = httpx.post(
        gateway.url + "/v1/embeddings",
        headers={"Authorization": f"Bearer {ls.API_KEY}"},
        json={"model": PHARIA_MODEL, "input": "x", "dimensions": 32},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_dimensions"
    assert "matryoshka" in r.json()["error"]["message"].lower()
    pharia_worker.signal(signal.SIGINT)
    assert pharia_worker.popen.wait(60) == 0
    assert "drained; exit code 0" in [r["message"] for r in json_log(pharia_worker)]


def test_engine_that_cannot_start_says_why_in_one_line(gateway, stack_dir):
    """An explicit ``gpu_memory_utilization`` is honoured, even when vLLM refuses it: exit 1
    with one ERROR line carrying vLLM's root cause and the config key; the traceback only at
    LOG_LEVEL=DEBUG. Both runs go side by side."""

    def config() -> str:
        return ls.worker_config(queue_url=gateway.url, model_name="cannot-start").replace(
            "gpu_memory_utilization = 0.15", "gpu_memory_utilization = 1.0"
        )

    info = ls.start_worker(config(), stack_dir, "cannot-start-info", wait=False)
    debug = ls.start_worker(
        config(), stack_dir, "cannot-start-debug", wait=False, env={"LOG_LEVEL": "DEBUG"}
    )
    try:
        codes = [info.popen.wait(300), debug.popen.wait(300)]
    finally:
        info.stop()
        debug.stop()
    assert codes == [1, 1]
    text = info.log_path.read_text()
    errors = [ln for ln in text.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, errors
    assert "vLLM failed to start: ValueError: Available memory on node" in errors[0]
    assert "[config: generator.gpu_memory_utilization]" in errors[0]
    assert "Traceback" not in text
    assert "Traceback" in debug.log_path.read_text()


def test_auto_dtype_keeps_sts_benchmark_quality(
    gateway, embed_worker, client, reference, stack_dir
):
    """STS-benchmark dev Spearman (500 pairs) of the dtype ``auto`` picks on this host within
    0.2 points of float32 ``transformers``. Where ``auto`` is float32 (AVX2-only hosts) the
    session's float32 worker is that worker; elsewhere a worker with ``dtype = "auto"``."""
    from scipy.stats import spearmanr

    pairs = ls.read_stsb("dev")[:500]
    gold = [g for _, _, g in pairs]
    auto = choose_dtype(CpuInfo.read())[0]
    worker = None
    if auto != "float32":
        worker = ls.start_worker(
            ls.worker_config(queue_url=gateway.url, model_name="auto-minilm", dtype="auto"),
            stack_dir,
            "auto-worker",
        )
    model = MODEL if worker is None else "auto-minilm"
    try:

        def served(texts: list[str]) -> np.ndarray:
            resp = client.embeddings.create(model=model, input=texts, encoding_format="float")
            return np.array([d.embedding for d in resp.data], dtype=np.float32)

        a, b = served([p[0] for p in pairs]), served([p[1] for p in pairs])
    finally:
        if worker is not None:
            worker.stop()
    ra, rb = reference.raw([p[0] for p in pairs]), reference.raw([p[1] for p in pairs])
    rho_served = 100 * spearmanr(cosine(a, b), gold).statistic
    rho_f32 = 100 * spearmanr(cosine(ra, rb), gold).statistic
    print(
        f"STS-B dev (500 pairs) Spearman x100: {auto} (auto) {rho_served:.2f}, "
        f"float32 transformers {rho_f32:.2f}"
    )
    assert rho_f32 > 80  # the model is right at all
    assert abs(rho_served - rho_f32) <= 0.2


def test_a_pooler_config_in_engine_args_changes_the_pooling(gateway, stack_dir, tiny_path):
    """``engine_args = { pooler_config = { seq_pooling_type = "MEAN" } }``: the causal LM's
    embedding is the mean of its final hidden states (against ``transformers``), not the last
    token's."""
    import torch
    from openai import OpenAI
    from transformers import AutoModel, AutoTokenizer

    name = "tiny-qwen3-mean"
    config = ls.worker_config(
        queue_url=gateway.url,
        model_name=name,
        model_path=tiny_path,
        max_num_seqs=16,
        generator_extra='engine_args = { pooler_config = { seq_pooling_type = "MEAN" } }',
    )
    worker = ls.start_worker(config, stack_dir, "mean-pooling-worker")
    try:
        client = OpenAI(base_url=gateway.url + "/v1", api_key=ls.API_KEY, max_retries=0)
        texts = ["a man is playing a guitar", "a woman is slicing an onion", "a dog runs"]
        resp = client.embeddings.create(model=name, input=texts, encoding_format="float")
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    finally:
        worker.stop()
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModel.from_pretrained(tiny_path, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = [model(**tok(t, return_tensors="pt")).last_hidden_state[0] for t in texts]
    mean = unit(np.array([h.mean(0).numpy() for h in hidden]))
    last = unit(np.array([h[-1].numpy() for h in hidden]))
    assert cosine(got, mean).min() >= 0.999
    assert cosine(got, last).max() < 0.99  # not the last-token pooling it had without it
