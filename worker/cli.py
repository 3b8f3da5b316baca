"""``inference-worker --config config.toml``: start vLLM, then pull -> infer -> post.

Exit codes: 0 after a clean drain (SIGTERM / SIGINT), 1 if the engine died or failed to start,
2 for a bad config (the message names the file and the key).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING

import uvloop

from common import heap
from worker import __version__, cpu_host, logs, metrics
from worker.adverts import model_adverts
from worker.config import Config, ConfigError, GeneratorConfig, load_config
from worker.health import Health
from worker.vllm_output import OutputRelay

if TYPE_CHECKING:
    from worker.engine.lora import Adapters
    from worker.loop import Worker

log = logging.getLogger("worker")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference-worker", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="path of the worker's config.toml")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    return p.parse_args(argv)


def _failure(exc: BaseException | None, relay: OutputRelay | None, since: float) -> str:
    """One line on why the engine failed: the first exception vLLM's processes printed
    since ``since``, else ``exc`` itself; with the config keys of the vLLM flags it names."""
    cause = relay.root_cause(since) if relay is not None else None
    if cause is None and exc is not None:
        first = (str(exc).strip().splitlines() or [""])[0]
        cause = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    cause = cause or "no cause was printed"
    # vLLM words its advice in its CLI flags; name the config keys they correspond to.
    flags = dict.fromkeys(f.replace("-", "_") for f in re.findall(r"`--([a-z][a-z0-9-]+)", cause))
    keys = [
        f"generator.{f}" if f in GeneratorConfig.model_fields else f"generator.engine_args.{f}"
        for f in flags
    ]
    if keys:
        cause += f" [config: {', '.join(keys)}]"
    if not log.isEnabledFor(logging.DEBUG):
        cause += " (LOG_LEVEL=DEBUG shows vLLM's traceback)"
    return cause


class _StopOnSignal:
    """SIGTERM / SIGINT, handled once for the worker's whole life: recorded while the engine
    starts, then a drain of the worker (:meth:`attach`)."""

    def __init__(self) -> None:
        self.requested = False
        self._worker: Worker | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self)

    def __call__(self) -> None:
        self.requested = True
        if self._worker is not None:
            self._worker.stop()

    def attach(self, worker: Worker) -> None:
        self._worker = worker
        if self.requested:
            worker.stop()


async def serve(cfg: Config, relay: OutputRelay | None = None) -> int:
    """Run the worker until SIGTERM / SIGINT or engine death; returns the exit code."""
    from worker.engine import replicas
    from worker.loop import Worker
    from worker.monitoring import MonitoringServer
    from worker.queue_client import QueueClient

    gen = cpu_host.resolve(cfg.generator)
    metrics.INFO.info(
        {
            "version": __version__,
            "model": ",".join(cfg.queue.models),
            "task": gen.task,
            "checkpoint": cfg.queue.checkpoint_name,
            "dtype": gen.dtype,
        }
    )
    health = Health()
    mon = MonitoringServer(cfg.monitoring, health)
    await mon.start()
    stop = _StopOnSignal()
    log.info("starting vLLM: model=%s task=%s dtype=%s", gen.model_path, gen.task, gen.dtype)
    started = time.monotonic()
    on_cpu = cpu_host.is_cpu_platform()
    adapters = _adapters(cfg, on_cpu)
    try:
        engine = replicas.start(gen, cfg.queue.checkpoint_name, on_cpu, adapters)
    except Exception as e:
        log.error("vLLM failed to start: %s", _failure(e, relay, started))
        log.debug("vLLM start failure", exc_info=True)
        await mon.stop()
        if adapters is not None:
            adapters.close()
        return 1
    up = time.monotonic()
    heap.freeze_startup_heap()  # vLLM, torch and the engine's objects: out of the GC's walks
    health.engine_started(engine)
    client = QueueClient.for_config(cfg.queue)
    try:
        worker = Worker(cfg, engine, client, model_adverts(cfg, engine), health)
        stop.attach(worker)
        log.info(
            "serving %s as worker %s (up to %d items / %d tokens in flight)",
            list(cfg.queue.models),
            worker.worker_id,
            worker.capacity,
            worker.token_capacity,
        )
        code = await worker.run()
        if code != 0:
            log.error("vLLM engine died: %s", _failure(None, relay, up))
        return code
    finally:
        health.engine_stopped()
        await engine.shutdown()
        if adapters is not None:
            adapters.close()
        log.info("vLLM engine shut down")
        await client.aclose()
        await mon.stop()
        heap.thaw_startup_heap()


def _adapters(cfg: Config, on_cpu: bool) -> Adapters | None:
    """The LoRA adapters the config's models name (None if none does); on a CPU host the base
    model's names go through a zero adapter (:mod:`worker.engine.lora`)."""
    from worker.engine.lora import Adapters

    folders = {name: entry.lora_path for name, entry in cfg.queue.models.items()}
    if all(folder is None for folder in folders.values()):
        return None
    log.info("LoRA adapters: %s", {k: str(v) for k, v in folders.items() if v is not None})
    return Adapters(folders, zero_for_base=on_cpu)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Serving: what vLLM's processes print goes through the worker's logging (one error line
    # with the root cause when the engine fails; vLLM's tracebacks at DEBUG).
    relay = None if args.check else OutputRelay()
    stderr = relay.stderr if relay else sys.stderr
    logs.setup(stderr)
    faulthandler.register(signal.SIGUSR1, file=stderr)  # `kill -USR1 <pid>`: every stack
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM's CPU backend reserves one core for the frontend by default: half the throughput
    # on small hosts. Ignored by the GPU backend.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    cpu_host.set_cpu_env()  # before torch loads OpenMP
    # Freed memory reused in place, here and in the engine's processes (they inherit it).
    heap.retain_freed_memory()
    try:
        cfg = load_config(args.config)
        if args.check:
            print(f"{args.config}: OK")
            return 0
        # uvloop, as vLLM's own API server uses: a cheaper event loop for the pull/post HTTP
        # calls and vLLM's output handling that share it.
        code = uvloop.run(serve(cfg, relay))
        log.info("exiting with %d", code)
        return code
    except ConfigError as e:
        print(f"inference-worker: config error:\n{e}", file=stderr)
        return 2
    finally:
        if relay is not None:
            relay.close()


if __name__ == "__main__":
    sys.exit(main())
