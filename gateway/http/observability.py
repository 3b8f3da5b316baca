"""What operators watch: ``/metrics`` (Prometheus, the gateway's own registry), the probes
``/healthz`` (liveness) and ``/readyz`` (readiness: the queue store answers and the gateway is
not draining), and the request-metrics middleware."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.queue.store import QueueStore, StoreUnavailable

router = APIRouter()


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    await update_queue_gauges(request.app.state.store)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 while the queue store answers and the gateway is not draining."""
    draining = bool(getattr(request.app.state, "draining", False))
    store_ok = await request.app.state.store.ping()
    ok = store_ok and not draining
    body = {"ready": ok, "queue_store": store_ok, "draining": draining}
    return JSONResponse(body, status_code=200 if ok else 503)


async def update_queue_gauges(store: QueueStore) -> None:
    """Queue depth, leases and live workers per model, read from the store (on every replica
    the same figures); ``inference_gateway_queue_store_up`` 0 when it cannot be read."""
    try:
        depth, leased, models = (
            await store.depth(),
            await store.leased(),
            await store.available_models(),
        )
    except StoreUnavailable:
        metrics.STORE_UP.set(0)
        return
    metrics.STORE_UP.set(1)
    for gauge, values in (
        (metrics.QUEUE_DEPTH, depth),
        (metrics.ITEMS_LEASED, leased),
        (metrics.WORKERS, {m: n for m, (_, n) in models.items()}),
    ):
        gauge.clear()
        for model, n in values.items():
            gauge.labels(model).set(n)


#: The ``route`` label of a request to a path no route matches (one label for all of them,
#: so made-up paths cannot grow ``/metrics``).
UNMATCHED_ROUTE = "unmatched"


class RequestMetrics:
    """ASGI middleware: ``inference_gateway_requests_total{route,status}`` and
    ``inference_gateway_request_duration_seconds{route}`` (seconds) for the client routes
    (``/v1/...``). ``route`` is the matched route's template (e.g. ``/v1/embeddings``), or
    :data:`UNMATCHED_ROUTE`: a fixed set of labels whatever paths clients send. Plain ASGI
    rather than Starlette's ``BaseHTTPMiddleware``, which costs a task group and a memory
    stream per request."""

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
            matched = scope.get("route")  # set by the router on the shared scope
            route = getattr(matched, "path", None) or UNMATCHED_ROUTE
            metrics.child(metrics.REQUESTS, route, str(status)).inc()
            metrics.child(metrics.REQUEST_DURATION, route).observe(time.monotonic() - t0)
