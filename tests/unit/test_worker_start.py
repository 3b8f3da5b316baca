"""What ``inference-worker`` does at start before and around the engine (fast layer: the real
``worker.cli``, a FAKE engine in place of vLLM, no subprocess): the environment the engine's
processes inherit, and the startup heap frozen once the engine is up."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from common import heap
from tests.support import FakeEngine, wait_until, worker_config
from worker import cli, cpu_host
from worker.config import Config
from worker.engine import replicas


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_main_sets_the_environment_the_engine_inherits(tmp_path: Path, monkeypatch) -> None:
    """``HF_HUB_OFFLINE=1``, no core reserved for vLLM's frontend, the CPU host's OpenMP and
    tokenizer settings, and freed memory kept for reuse: all set by ``main`` before vLLM or
    torch is imported, each only where the operator left it unset."""
    for name in ("HF_HUB_OFFLINE", "VLLM_CPU_NUM_OF_RESERVED_CPU", *cpu_host.CPU_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # the operator's: kept
    monkeypatch.setenv("INFERENCE_WORKER_QUEUE_TOKEN", "t")
    monkeypatch.setattr(cpu_host, "is_cpu_build", lambda: True)
    retained: list[bool] = []
    # SPY: the real call would change this test process's malloc for the rest of the session.
    monkeypatch.setattr(heap, "retain_freed_memory", lambda: retained.append(True) or True)
    weights = tmp_path / "weights"
    weights.mkdir()
    path = tmp_path / "config.toml"
    path.write_text(
        f'edition = 1\n[generator]\nmodel_path = "{weights}"\ntask = "embed"\n'
        '[queue]\nurl = "http://127.0.0.1:9"\ncheckpoint_name = "c"\n'
        '[queue.models."m"]\nembedding_task = { supported = true }\n'
    )
    assert cli.main(["--config", str(path), "--check"]) == 0
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert retained == [True]


class ServingFakeEngine(FakeEngine):
    """FAKE engine with what ``serve`` asks of a started engine beyond the loop's needs."""

    max_model_len = 128
    vocab_size = 1000
    score_type = "bi-encoder"
    num_labels = 1

    def token_id(self, token: str) -> int:
        raise ValueError("no tokenizer")

    async def shutdown(self) -> None:
        self.alive = False


async def test_serve_freezes_the_startup_heap_once_the_engine_is_up_and_thaws_it_at_the_end(
    monkeypatch,
) -> None:
    engine = ServingFakeEngine()
    started: list[Any] = []

    def start(gen: Any, name: str, on_cpu: bool, adapters: Any) -> ServingFakeEngine:
        started.append(gc.get_freeze_count())
        return engine

    monkeypatch.setattr(replicas, "start", start)
    # As on a GPU host: the CPU host's choices (which read the host through vLLM) left out.
    monkeypatch.setattr(cpu_host, "is_cpu_platform", lambda: False)
    cfg = Config.model_validate(
        {
            **worker_config(url="http://127.0.0.1:9"),
            "monitoring": {"metrics_port": _free_port()},
        }
    )
    assert gc.get_freeze_count() == 0
    serving = asyncio.create_task(cli.serve(cfg))
    await wait_until(lambda: gc.get_freeze_count() > 0, timeout=10, what="startup heap frozen")
    assert started == [0]  # frozen after the engine started, not before
    os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler: a drain
    assert await asyncio.wait_for(serving, 30) == 0
    assert gc.get_freeze_count() == 0 and not engine.alive


@pytest.fixture(autouse=True)
def _thawed() -> Any:
    yield
    gc.unfreeze()
