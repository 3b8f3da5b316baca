"""What operators watch: ``/metrics`` (Prometheus, the gateway's own registry), ``/healthz``,
the request-metrics middleware and the queue collector read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.queue import WorkQueue

router = APIRouter()


@router.get("/metrics")
async def prometheus(_: Request) -> Response:
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


class QueueCollector(Collector):
    """Queue depth, leases and live workers per model, read from the queue at scrape time."""

    def __init__(self, queue: WorkQueue):
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "inference_gateway_queue_depth_items", "Inputs waiting for a worker.", labels=["model"]
        )
        for model, n in self.queue.depth().items():
            depth.add_metric([model], n)
        yield depth
        leased = GaugeMetricFamily(
            "inference_gateway_items_leased",
            "Inputs leased to workers, not yet answered.",
            labels=["model"],
        )
        for model, n in self.queue.leased().items():
            leased.add_metric([model], n)
        yield leased
        workers = GaugeMetricFamily(
            "inference_gateway_workers", "Live workers per model.", labels=["model"]
        )
        for model, (_, n) in self.queue.available_models().items():
            workers.add_metric([model], n)
        yield workers


class RequestMetrics:
    """ASGI middleware: ``inference_gateway_requests_total{route,status}`` and
    ``inference_gateway_request_duration_seconds{route}`` (seconds) for the client routes
    (``/v1/...``). Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which costs a
    task group and a memory stream per request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope.get("path", "")
        if scope["type"] != "http" or not route.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = 500  # unless a response starts

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(time.monotonic() - t0)
