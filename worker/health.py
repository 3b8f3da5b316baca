"""What the worker's probes report, kept in one small object.

- alive (``/livez``): the process runs and the vLLM engine, once started, has not died;
- ready (``/readyz``): the engine is loaded and alive, and the last call to the queue succeeded.

The gauges ``inference_worker_engine_up`` and ``inference_worker_queue_reachable`` follow it.
"""

from __future__ import annotations

from typing import Protocol

from worker import metrics


class _Engine(Protocol):
    @property
    def alive(self) -> bool: ...


class Health:
    """Set by the worker as the engine and the queue come and go; read by the probes."""

    def __init__(self) -> None:
        self._engine: _Engine | None = None
        self._queue_ok = False

    def engine_started(self, engine: _Engine) -> None:
        self._engine = engine
        metrics.ENGINE_UP.set(1)

    def engine_stopped(self) -> None:
        metrics.ENGINE_UP.set(0)

    def queue_reached(self, ok: bool) -> None:
        """Record the outcome of the last call to the queue."""
        self._queue_ok = ok
        metrics.QUEUE_REACHABLE.set(1 if ok else 0)

    @property
    def queue_ok(self) -> bool:
        return self._queue_ok

    def alive(self) -> bool:
        """True until the engine has died (also while it is still loading)."""
        return self._engine is None or self._engine.alive

    def ready(self) -> bool:
        """True while the engine is loaded and alive and the queue answered the last call."""
        return self._engine is not None and self._engine.alive and self._queue_ok
