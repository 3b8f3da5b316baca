"""The worker's Prometheus metrics (default registry, next to vLLM's own ``vllm:*``).

Names follow Prometheus conventions: base units (seconds), ``_total`` counters.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram, Info

_NS = "inference_worker"

ITEMS_PULLED = Counter(
    f"{_NS}_items_pulled_total", "Items leased from the queue.", ["model", "task"]
)
ITEMS_COMPLETED = Counter(
    f"{_NS}_items_completed_total", "Items answered with a result.", ["model", "task"]
)
ITEMS_FAILED = Counter(
    f"{_NS}_items_failed_total", "Items answered with an error.", ["model", "task", "code"]
)
ITEMS_IN_FLIGHT = Gauge(f"{_NS}_items_in_flight", "Items leased and not yet answered.")
PROMPT_TOKENS = Counter(f"{_NS}_prompt_tokens_total", "Prompt tokens processed.", ["model", "task"])
PULL_BATCH_SIZE = Histogram(
    f"{_NS}_pull_batch_size_items",
    "Items per non-empty pull.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
PULL_DURATION = Histogram(
    f"{_NS}_pull_duration_seconds",
    "Time of one pull call, long-poll wait included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ITEM_DURATION = Histogram(
    f"{_NS}_item_duration_seconds",
    "Time from pulling an item to its result being posted.",
    ["model", "task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_ERRORS = Counter(
    f"{_NS}_queue_errors_total", "Failed calls to the queue (after retries).", ["op", "reason"]
)
QUEUE_RETRIES = Counter(f"{_NS}_queue_retries_total", "Retried calls to the queue.", ["op"])
ENGINE_UP = Gauge(f"{_NS}_engine_up", "1 while the vLLM engine is loaded and alive.")
QUEUE_REACHABLE = Gauge(f"{_NS}_queue_reachable", "1 if the last call to the queue succeeded.")
INFO = Info(f"{_NS}_build", "Worker version, model, task, checkpoint and dtype.")
#: Seconds the engine spent in its steps (scheduling and forward pass); ``1 - rate()`` is the
#: share of time it waited for work. Counted by the ``process`` and ``thread`` engine cores
#: where they step the engine (:func:`count_engine_busy`; an engine process's count is
#: relayed, one ``replica`` label per process where there are several); vLLM's ``AsyncLLM``
#: (GPU hosts) has its own metrics instead.
ENGINE_BUSY = Counter(
    f"{_NS}_engine_busy_seconds_total",
    "Seconds the engine spent in its steps (1 - rate: the share it waited for work).",
    registry=None,
)


def count_engine_busy() -> Counter:
    """:data:`ENGINE_BUSY`, registered in this process's default registry (once): called where
    an engine is stepped (the worker process for the thread core, the engine process for the
    process core, which relays it)."""
    from prometheus_client import REGISTRY

    with contextlib.suppress(ValueError):  # registered already
        REGISTRY.register(ENGINE_BUSY)
    return ENGINE_BUSY


class ItemMetrics(NamedTuple):
    """The per-(model, task) children of the item metrics, looked up once (:func:`for_items`)."""

    pulled: Any
    completed: Any
    prompt_tokens: Any
    duration: Any


@functools.lru_cache(maxsize=1024)
def for_items(model: str, task: str) -> ItemMetrics:
    """The item metrics' children labelled (``model``, ``task``): the labelled lookup (a lock
    and a dict) done once per pair instead of once per item and metric. The pairs are the
    config's model names and the protocol's tasks (the queue only leases those)."""
    return ItemMetrics(
        ITEMS_PULLED.labels(model, task),
        ITEMS_COMPLETED.labels(model, task),
        PROMPT_TOKENS.labels(model, task),
        ITEM_DURATION.labels(model, task),
    )
