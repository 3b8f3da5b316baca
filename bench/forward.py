"""One sentence's engine time without any server: vLLM (the engine this project runs) against
ONNX Runtime on Infinity's optimised export of the same checkpoint, one invocation.

    python bench/forward.py [--engine minilm|fast] [--sentences 300]

What the one-sentence latency of ``bench/suite.py`` is made of: the serving path (HTTP, queue,
hand-offs) plus the engine's forward pass. This measures the second alone, so the first can be
read off the suite's p50. Each path embeds the same STS sentences one at a time (after 20
warm-up calls) and prints p10 / p50 / p90 in ms:

- vLLM's ``LLMEngine`` in this process as the worker's engine process runs it (engine core and
  model runner in one process, vLLM's default compilation, float32, OpenMP threads passive:
  ``OMP_WAIT_POLICY=PASSIVE``, the worker's CPU default), one engine step per sentence, on one
  intra-op thread and on all (alternating; the worker's ``one_thread_step_tokens`` picks one
  for a step this small) — the engine's own floor, below any server built on it;
- ONNX Runtime 2 threads in Infinity's venv (``bench/peers.py``), on the ONNX export optimised
  as Infinity does (level 99, transformer fusions): tokenizer call (no padding) + session run.

Both run on the same cores, one after the other (never side by side). No weights are
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import record  # noqa: E402
import suite  # noqa: E402

from devstack import localstack as ls  # noqa: E402

WARM_UP = 20

#: Run in Infinity's venv from the ONNX export's folder: argv = tokenizer folder, sentences
#: file, warm-up calls; prints the ms per call as JSON.
_ORT = """
import json, sys, time
import numpy as np, onnxruntime as ort
from pathlib import Path
from tokenizers import Tokenizer
from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
tok.no_padding(); tok.no_truncation()  # the export's tokenizer pads every input to 128
sents = json.loads(Path(sys.argv[2]).read_text())
found = list((Path(HUGGINGFACE_HUB_CACHE) / "infinity_onnx" / "CPUExecutionProvider").glob(
    "*_optimized.onnx"))
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(str(found[0]), so, providers=["CPUExecutionProvider"])
names = {i.name for i in s.get_inputs()}
def run(t):
    e = tok.encode(t)
    feed = {"input_ids": np.array([e.ids], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask], dtype=np.int64)}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.array([e.type_ids], dtype=np.int64)
    return s.run(None, feed)
for t in sents[:int(sys.argv[3])]:
    run(t)
ms = []
for t in sents:
    t0 = time.perf_counter(); run(t); ms.append((time.perf_counter() - t0) * 1000)
print(json.dumps(ms))
"""


def _stats(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=10)
    return f"p10 {q[0]:.2f}  p50 {statistics.median(ms):.2f}  p90 {q[-1]:.2f} ms"


def vllm_ms(model: Path, sents: list[str]) -> dict[int, list[float]]:
    """ms per sentence through vLLM's ``LLMEngine`` as the worker's engine process runs it
    (engine core and model in this process, vLLM's default compilation, float32), one step
    per sentence, on one intra-op thread and on all (the two alternating on one engine):
    {threads: float32 [n]}."""
    from vllm import PoolingParams
    from vllm.inputs.engine import tokens_input

    from worker.engine.step_threads import StepThreads
    from worker.engine.thread import llm_engine

    make = llm_engine(
        {
            "model": str(model),
            "runner": "pooling",
            "dtype": "float32",
            "max_model_len": 512,
            "gpu_memory_utilization": 0.15,
        }
    )
    # Any non-zero threshold gives the policy object; set() below picks the count per call.
    engine, threads = StepThreads.build_engine(make, 1)
    assert threads is not None
    tok = engine.get_tokenizer()
    ids = [tok(t)["input_ids"] for t in sents]
    counts = sorted({1, threads.full})
    n = 0

    def one(x: list[int], k: int) -> float:
        nonlocal n
        threads.set(k)
        n += 1
        t0 = time.perf_counter()
        engine.add_request(str(n), tokens_input(x), PoolingParams(task="embed"))
        while not any(o.finished for o in engine.step()):
            pass
        return (time.perf_counter() - t0) * 1000

    for x in ids[:WARM_UP]:
        for k in counts:
            one(x, k)
    ms: dict[int, list[float]] = {k: [] for k in counts}
    for i, x in enumerate(ids):
        for k in counts if i % 2 else counts[::-1]:
            ms[k].append(one(x, k))
    engine.engine_core.shutdown()
    return ms


def ort_ms(model: Path, sents: list[str], work: Path) -> list[float]:
    """ms per ONNX Runtime call (tokenizer + run) in Infinity's venv."""
    import peers

    peers.install()
    onnx = peers.onnx_model(model, work / f"{model.name}-onnx")
    peers.optimise_onnx(onnx, work / "hf")
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1"}
    data = work / "sentences.json"
    data.write_text(json.dumps(sents))
    out = subprocess.run(
        [
            str(peers.VENV / "bin" / "python"),
            "-c",
            _ORT,
            str(onnx),
            str(data),
            str(WARM_UP),
        ],
        cwd=onnx,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return list(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["minilm", "fast"], default="minilm")
    ap.add_argument("--sentences", type=int, default=300)
    a = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    suite._env()
    work = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    model = suite.bench_model(a.engine, work)
    sents = ls.stsb_sentences(("dev",))[: a.sentences]
    vllm = vllm_ms(model, sents)
    onnx = ort_ms(model, sents, work)
    print(f"engine {a.engine}, {len(sents)} STS sentences one at a time, float32")
    omp = os.environ["OMP_WAIT_POLICY"]
    for k, ms in vllm.items():
        print(f"  vLLM LLMEngine, {k} thread(s) (OMP {omp}): {_stats(ms)}")
    print(f"  ONNX Runtime, 2 threads (Infinity's optimised export): {_stats(onnx)}")
    for k, ms in vllm.items():
        gap = statistics.median(ms) - statistics.median(onnx)
        print(f"  vLLM ({k} thread(s)) - ONNX Runtime, p50: {gap:+.2f} ms")
    record.write(
        f"forward-{a.engine}",
        {
            "sentences": len(sents),
            "ms_per_sentence": {
                **{f"vllm_{k}_threads": ms for k, ms in vllm.items()},
                "onnx_runtime_2_threads": onnx,
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
