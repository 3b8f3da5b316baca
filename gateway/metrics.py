"""The gateway's Prometheus metrics (its own registry, served on ``/metrics``)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

REGISTRY = CollectorRegistry(auto_describe=True)
_NS = "inference_gateway"

REQUESTS = Counter(
    f"{_NS}_requests_total",
    "Client requests by route and HTTP status.",
    ["route", "status"],
    registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    f"{_NS}_request_duration_seconds",
    "Client request latency.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    f"{_NS}_queue_wait_seconds",
    "Time an item waited in the queue before its first lease.",
    ["model"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
LEASES_EXPIRED = Counter(
    f"{_NS}_leases_expired_total",
    "Leases that expired without a result.",
    ["model"],
    registry=REGISTRY,
)
REDELIVERIES = Counter(
    f"{_NS}_redeliveries_total",
    "Items leased again after a failed attempt.",
    ["model"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    f"{_NS}_dead_letters_total",
    "Items given up after max attempts (answered with an error).",
    ["model"],
    registry=REGISTRY,
)
ITEMS_ENQUEUED = Counter(
    f"{_NS}_items_enqueued_total", "Inputs enqueued.", ["model", "task"], registry=REGISTRY
)

# Read from the queue store at every scrape: the same on every replica (Redis store), so
# aggregate them with max() (or avg()), not sum(); the counters above are per replica: sum().
QUEUE_DEPTH = Gauge(
    f"{_NS}_queue_depth_items", "Inputs waiting for a worker.", ["model"], registry=REGISTRY
)
ITEMS_LEASED = Gauge(
    f"{_NS}_items_leased",
    "Inputs leased to workers, not yet answered.",
    ["model"],
    registry=REGISTRY,
)
WORKERS = Gauge(f"{_NS}_workers", "Live workers per model.", ["model"], registry=REGISTRY)
STORE_UP = Gauge(
    f"{_NS}_queue_store_up", "1 if the queue store answered the last scrape.", registry=REGISTRY
)
QUEUE_FULL = Counter(
    f"{_NS}_queue_full_total",
    "Requests refused with 429: the model's queue was at its limit.",
    ["model"],
    registry=REGISTRY,
)
RESULTS_REJECTED = Counter(
    f"{_NS}_results_rejected_total",
    "Worker results refused as malformed (not finite, wrong length...).",
    ["model"],
    registry=REGISTRY,
)
BATCH_LINES = Counter(
    f"{_NS}_batch_lines_total",
    "Lines of batch jobs: queued, then completed (status 200) or failed.",
    ["model", "state"],
    registry=REGISTRY,
)


@functools.lru_cache(maxsize=4096)
def child(metric: MetricWrapperBase, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label values rather than on every
    request or item (prometheus-client checks the values and takes a lock on each lookup).
    For the counters and histograms above, whose children are never removed; the gauges,
    cleared at every scrape, keep calling ``labels``. At most 4,096 children are held here,
    whatever label values arrive."""
    return metric.labels(*labels)
