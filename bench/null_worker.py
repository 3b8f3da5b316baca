"""BENCH ONLY — the worker with a NULL ENGINE: the real ``inference-worker`` (config, pull ->
prepare -> post, its HTTP client, metrics, drain) whose engine answers every input at once
with a fixed unit vector, no vLLM. Inputs are still tokenized by the model's real tokenizer
(``worker.engine.prepare``, as the worker does before vLLM), so what it measures is the
serving path's own cost: what a GPU leaves once the model is fast. Never a product path;
every figure it yields is labelled "null engine" (``bench/path.py``).

    python bench/null_worker.py --config worker.toml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.protocol import WorkItem
from worker import cli, cpu_host
from worker.config import GeneratorConfig
from worker.engine import replicas
from worker.engine.engine import Engine
from worker.engine.prepare import Prompt

#: The vector every input gets: MiniLM's width, unit length.
DIM = 384
#: Tokens of one engine step the worker's token budget is sized by (vLLM's CPU default).
STEP_TOKENS = 8192


class NullEngine(Engine):
    """BENCH ONLY: :class:`worker.engine.Engine`'s preparation and tokenization (its real
    tokenizer) with a null model: :meth:`run` returns the same float32 [DIM] unit vector for
    every input, at once."""

    def __init__(self, gen: GeneratorConfig, model_name: str) -> None:  # no vLLM engine core
        from transformers import AutoTokenizer

        self.llm = None
        self.gen, self.model_name = gen, model_name
        self._tokenizer = AutoTokenizer.from_pretrained(str(gen.model_path))
        self._preparer = None
        self.max_model_len = gen.max_model_len or 512
        self.score_type = "bi-encoder"
        self.vector = np.full(DIM, DIM**-0.5, dtype=np.float32)

    max_num_batched_tokens = STEP_TOKENS  # type: ignore[assignment]
    alive = True  # type: ignore[assignment]
    num_labels = 1  # type: ignore[assignment]
    labels = ()  # type: ignore[assignment]

    @property  # type: ignore[override]
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[Any, int]:
        return self.vector, len(prompt)

    async def log_stats(self) -> None:
        pass

    async def shutdown(self) -> None:
        self.alive = False  # type: ignore[misc]


def main() -> int:
    replicas.start = lambda gen, name, on_cpu, adapters=None: NullEngine(gen, name)  # type: ignore[assignment]
    cpu_host.is_cpu_platform = lambda: False  # the CPU host's engine choices read vLLM
    print(f"NULL ENGINE (bench only): worker code from {Path(cli.__file__).parents[1]}", flush=True)
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
