"""The gateway: the OpenAI-compatible client API in front of the queue, and the worker API of
queue protocol v1 (``docs/queue-protocol.md``), assembled into one FastAPI app.

- client routes (API keys): :mod:`gateway.client_api`, logic in :mod:`gateway.serving`;
- queue routes (worker tokens): :mod:`gateway.worker_api` over :mod:`gateway.queue`;
- ``/metrics`` and ``/healthz``: :mod:`gateway.observability`;
- credentials: :mod:`gateway.auth`; errors in OpenAI's shape: :mod:`gateway.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from gateway import client_api, errors, metrics, observability, worker_api
from gateway.queue import WorkQueue
from gateway.serving import Serving
from gateway.settings import GatewaySettings

#: Seconds between two sweeps for expired leases (long polls also sweep).
REAP_INTERVAL_SECONDS = 0.5


def create_app(settings: GatewaySettings) -> FastAPI:
    """A gateway with a queue of its own. ``app.state`` holds ``settings``, ``queue`` and
    ``serving``; the lifespan runs the lease reaper and registers the queue's metrics."""
    queue = WorkQueue(
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        worker_ttl_seconds=settings.worker_ttl_seconds,
    )
    collector = observability.QueueCollector(queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        metrics.REGISTRY.register(collector)

        async def reaper() -> None:
            while True:
                await asyncio.sleep(REAP_INTERVAL_SECONDS)
                queue.reap()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            metrics.REGISTRY.unregister(collector)

    app = FastAPI(title="inference-gateway", lifespan=lifespan)
    app.state.settings = settings
    app.state.queue = queue
    app.state.serving = Serving(queue, settings)
    errors.install(app)
    app.add_middleware(observability.RequestMetrics)
    app.include_router(client_api.router)
    app.include_router(worker_api.router)
    app.include_router(observability.router)
    return app
