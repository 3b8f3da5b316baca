"""The gateway: the OpenAI-compatible client API in front of the queue store, and the worker
API of queue protocol v1 (``docs/queue-protocol.md``), assembled into one FastAPI app.

- client routes (API keys): :mod:`gateway.api` (routes, their logic, input checks);
- the Files and Batch APIs and the batch runner: :mod:`gateway.batch`;
- queue routes (worker tokens) over the queue store: :mod:`gateway.queue` (the memory or the
  Redis store);
- the HTTP edge: credentials and body limits before a body is read, the hot POST routes served
  outside FastAPI's per-request work (:mod:`gateway.http.routing`), connections, ``/metrics``,
  ``/healthz``, ``/readyz``: :mod:`gateway.http`; errors in OpenAI's shape:
  :mod:`gateway.errors`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI

from gateway import errors
from gateway.api import routes as client_routes
from gateway.api.serving import Serving
from gateway.batch import routes as batch_routes
from gateway.batch.batches import Batches
from gateway.batch.files import FileStore
from gateway.batch.runner import BatchRunner
from gateway.http import observability
from gateway.http.auth import Credentials
from gateway.http.edge import Edge
from gateway.http.routing import DirectRoutes
from gateway.queue import routes as worker_routes
from gateway.queue.memory import MemoryStore
from gateway.queue.store import QueueStore
from gateway.settings import GatewaySettings


def make_store(
    settings: GatewaySettings, clock: Callable[[], float] = time.monotonic
) -> QueueStore:
    """The store ``settings.queue_url`` names: ``memory``, or a ``redis://`` / ``rediss://``
    URL, ``redis+cluster://`` / ``rediss+cluster://`` for a Redis Cluster (password from
    ``settings.queue_password_file`` when given)."""
    common = {
        "lease_seconds": settings.lease_seconds,
        "max_attempts": settings.max_attempts,
        "worker_ttl_seconds": settings.worker_ttl_seconds,
        "max_queued": settings.max_queued_inputs,
        "max_queued_batch": settings.max_queued_batch_inputs,
        "advert_ttl_seconds": settings.advert_ttl_seconds,
    }
    if settings.queue_url == "memory":
        return MemoryStore(clock=clock, **common)  # type: ignore[arg-type]
    from gateway.queue.redis import RedisStore

    password = None
    if settings.queue_password_file:
        password = Path(settings.queue_password_file).read_text(encoding="utf-8").strip()
    return RedisStore(settings.queue_url, password=password, **common)  # type: ignore[arg-type]


def create_app(
    settings: GatewaySettings,
    clock: Callable[[], float] = time.monotonic,
    store: QueueStore | None = None,
) -> FastAPI:
    """A gateway on ``store`` (default: :func:`make_store`). ``app.state`` holds ``settings``,
    ``store``, ``serving``, ``credentials`` and ``draining`` (set after SIGTERM); the lifespan
    starts and closes the store. ``clock`` (seconds) drives the in-memory store's leases and
    worker liveness."""
    store = store or make_store(settings, clock)
    serving = Serving(store, settings)
    files = FileStore(
        Path(settings.files_dir),
        settings.max_file_bytes,
        max_files=settings.max_files_per_key,
        max_owner_bytes=settings.max_file_bytes_per_key,
        expiry_seconds=settings.file_expiry_seconds,
    )
    batches = Batches(store, files, settings)
    runner = BatchRunner(store, files, serving, settings, batches)
    batches.on_create = runner.wake

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await store.start()
        await runner.start()
        try:
            yield
        finally:
            await runner.close()
            await store.close()

    app = FastAPI(title="inference-gateway", lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.serving = serving
    app.state.files = files
    app.state.batches = batches
    app.state.batch_runner = runner
    app.state.draining = False
    app.state.credentials = Credentials.load(settings)
    errors.install(app)
    # Outermost last: request metrics see every answer, also the edge's 401 / 408 / 413.
    hot = [client_routes.router, client_routes.peer_router, worker_routes.router]
    app.add_middleware(DirectRoutes, routers=hot)
    app.add_middleware(
        Edge,
        credentials=app.state.credentials,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        max_upload_bytes=settings.max_file_bytes,
    )
    app.add_middleware(observability.RequestMetrics)
    app.include_router(client_routes.router)
    app.include_router(client_routes.peer_router)
    app.include_router(batch_routes.router)
    app.include_router(worker_routes.router)
    app.include_router(observability.router)
    return app
