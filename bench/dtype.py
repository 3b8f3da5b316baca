"""dtype on this CPU: float32 against what ``dtype = "auto"`` picks here, in one run.

    python bench/dtype.py [--sentences 3000] [--rounds 3] [--also bfloat16]

For each dtype, vLLM ``AsyncLLM`` in this process on all-MiniLM-L6-v2 (every input submitted at
once, as bench/suite.py's in-process path): sentences/s over STS-benchmark sentences, median of
``--rounds`` rounds run in a rotated order, and the STS-benchmark dev Spearman x100 of the
cosine similarities against the gold scores (1,500 pairs). Prints the CPU model and its
bfloat16 flags, and the choice ``auto`` makes (``worker/cpu_host.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import record  # noqa: E402

from devstack import localstack as ls  # noqa: E402
from worker.cpu_host import CpuInfo, choose_dtype  # noqa: E402


class Engine:
    def __init__(self, dtype: str):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.dtype = dtype
        self.llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(ls.minilm_path()),
                runner="pooling",
                dtype=dtype,
                max_model_len=256,
                max_num_seqs=256,
                gpu_memory_utilization=0.15,
            )
        )
        self._ids = iter(range(10**9))

    async def _one(self, text: str) -> np.ndarray:
        from vllm import PoolingParams

        out = None
        async for out in self.llm.encode(  # noqa: B007 - the last output is used after the loop
            text, PoolingParams(task="embed"), request_id=f"r{next(self._ids)}"
        ):
            pass
        assert out is not None
        return out.outputs.data.float().numpy()

    def shutdown(self) -> None:
        """Stop the engine inside the event loop and drop it (vLLM's AsyncLLM must not outlive
        the loop)."""
        self.llm.shutdown()
        del self.llm

    async def embed(self, texts: list[str]) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        vecs = await asyncio.gather(*[self._one(t) for t in texts])
        return time.perf_counter() - t0, np.array(vecs)


def spearman_x100(a: np.ndarray, b: np.ndarray, gold: list[float]) -> float:
    from scipy.stats import spearmanr

    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(100 * spearmanr(cos, gold).statistic)


async def run(a: argparse.Namespace) -> None:
    cpu = CpuInfo.read()
    auto, why = choose_dtype(cpu)
    print(
        f"CPU: {cpu.model_name}, {os.cpu_count()} cores; bfloat16 flags: "
        f"{', '.join(cpu.bf16_flags) or 'none'}"
    )
    print(f"dtype = auto picks {auto}: {why}")
    dtypes = list(dict.fromkeys(["float32", auto, *a.also]))
    seen: dict[str, None] = {}
    for s1, s2, _ in ls.read_stsb("dev") + ls.read_stsb("train"):
        seen.setdefault(s1)
        seen.setdefault(s2)
    texts = list(seen)[: a.sentences]
    pairs = ls.read_stsb("dev")
    engines = [Engine(d) for d in dtypes]
    for e in engines:  # warm-up
        await e.embed(texts[:64])
    rates: dict[str, list[float]] = {d: [] for d in dtypes}
    for r in range(a.rounds):
        for e in engines[r % len(engines) :] + engines[: r % len(engines)]:
            seconds, _ = await e.embed(texts)
            rates[e.dtype].append(len(texts) / seconds)
    print(f"\n| dtype | sentences/s (median of {a.rounds}) | min-max | STS-B dev Spearman x100 |")
    print("| --- | --- | --- | --- |")
    base = statistics.median(rates["float32"])
    rows = []
    for e in engines:
        _, va = await e.embed([p[0] for p in pairs])
        _, vb = await e.embed([p[1] for p in pairs])
        rho = spearman_x100(va, vb, [p[2] for p in pairs])
        med = statistics.median(rates[e.dtype])
        label = e.dtype + (" (auto)" if e.dtype == auto else "")
        print(
            f"| {label} | {med:.0f} ({med / base:.2f}x float32) | "
            f"{min(rates[e.dtype]):.0f}-{max(rates[e.dtype]):.0f} | {rho:.2f} |"
        )
        rows.append(
            {"dtype": e.dtype, "sentences_per_s": rates[e.dtype], "sts_dev_spearman_x100": rho}
        )
    for e in engines:
        e.shutdown()
    engines.clear()
    record.write(
        "dtype",
        {"cpu": cpu.model_name, "auto": auto, "why": why, "sentences": len(texts), "dtypes": rows},
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sentences", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--also", nargs="*", default=[], help="further dtypes, e.g. bfloat16")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(run(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
