"""The gateway: the OpenAI-compatible client API in front of the queue store, and the worker
API of queue protocol v1 (``docs/queue-protocol.md``), assembled into one FastAPI app.

- client routes (API keys): :mod:`gateway.client_api`, logic in :mod:`gateway.serving`;
  the Files and Batch APIs: :mod:`gateway.batch_api`, logic in :mod:`gateway.files`,
  :mod:`gateway.batches`, run by :mod:`gateway.batch_runner`;
- queue routes (worker tokens): :mod:`gateway.worker_api` over the store (:mod:`gateway.store`:
  :mod:`gateway.memory_store` or :mod:`gateway.redis_store`);
- ``/metrics``, ``/healthz``, ``/readyz``: :mod:`gateway.observability`;
- credentials, body limits: :mod:`gateway.auth`, :mod:`gateway.edge` (before the body is
  read); errors in OpenAI's shape: :mod:`gateway.errors`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI

from gateway import batch_api, client_api, errors, observability, worker_api
from gateway.auth import Credentials
from gateway.batch_runner import BatchRunner
from gateway.batches import Batches
from gateway.edge import Edge
from gateway.files import FileStore
from gateway.memory_store import MemoryStore
from gateway.serving import Serving
from gateway.settings import GatewaySettings
from gateway.store import QueueStore


def make_store(
    settings: GatewaySettings, clock: Callable[[], float] = time.monotonic
) -> QueueStore:
    """The store ``settings.queue_url`` names: ``memory``, or a ``redis://`` / ``rediss://``
    URL (password from ``settings.queue_password_file`` when given)."""
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
    from gateway.redis_store import RedisStore

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
    app.add_middleware(
        Edge,
        credentials=app.state.credentials,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout_seconds,
        max_upload_bytes=settings.max_file_bytes,
    )
    app.add_middleware(observability.RequestMetrics)
    app.include_router(client_api.router)
    app.include_router(batch_api.router)
    app.include_router(worker_api.router)
    app.include_router(observability.router)
    return app
