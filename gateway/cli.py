"""``inference-gateway``: the reference queue and OpenAI-compatible front door.

Every setting is a flag or a ``GATEWAY_*`` environment variable (:mod:`gateway.settings`);
secrets are best given in the environment: ``GATEWAY_API_KEYS`` and ``GATEWAY_WORKER_TOKENS``
(comma-separated). Exit 2 for bad settings.

SIGTERM / SIGINT drain: readiness turns 503 and new client requests get 503 at once, while
worker calls and the clients already waiting are served, until none is waiting or
``--drain-timeout`` passes; then the server stops. A second signal stops it at once.

With ``--internal-port`` a second listener serves workers and probes only
(:func:`internal_only`), with a connection budget of its own: a flood of client connections
on the public port cannot keep workers from pulling nor the liveness probe from answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Iterator
from types import FrameType
from typing import Literal

import uvicorn
from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from common import heap
from common.protocol import PREFIX
from gateway.api.serving import Serving
from gateway.app import create_app
from gateway.errors import APIError
from gateway.http.connections import Budget, gateway_protocol
from gateway.settings import GatewaySettings, parse, queue_url_password

log = logging.getLogger("gateway")


#: What the internal listener serves: the queue routes and what operators watch.
INTERNAL_PATHS = (PREFIX + "/", "/healthz", "/readyz", "/metrics")


def internal_only(app: ASGIApp) -> ASGIApp:
    """``app`` for the internal listener: the queue routes and the probes; any other path is
    a 404 in OpenAI's error shape (clients use the public port)."""

    async def internal(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(INTERNAL_PATHS):
            error = APIError(404, "Client routes are not served on the internal port.")
            await JSONResponse(error.response_json(), 404)(scope, receive, send)
            return
        await app(scope, receive, send)

    return internal


class InternalServer(uvicorn.Server):
    """The internal listener's server: it runs beside the public one, which owns the signals
    and the app's lifespan."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its own graceful shutdown, and the internal
    listener (if any) started after it and stopped before it."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FastAPI,
        drain_timeout: float,
        internal: InternalServer | None = None,
    ):
        super().__init__(config)
        self._app = app
        self._drain_timeout = drain_timeout
        self._internal = internal
        self._internal_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Future[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        if self._internal is not None and not self.should_exit:
            self._internal_task = asyncio.create_task(self._internal.serve())

    async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        if self._internal is not None and self._internal_task is not None:
            self._internal.should_exit = True
            await self._internal_task
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or self._loop is None or self._drain_timeout <= 0:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._draining = asyncio.run_coroutine_threadsafe(self._drain(), self._loop)  # type: ignore[assignment]

    async def _drain(self) -> None:
        self._app.state.draining = True
        serving: Serving = self._app.state.serving
        deadline = time.monotonic() + self._drain_timeout
        log.warning(
            "draining: %d client requests waiting; no new ones (at most %g s)",
            serving.in_flight,
            self._drain_timeout,
        )
        while serving.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.warning("drained (%d client requests still waiting); stopping", serving.in_flight)
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = parse(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    heap.retain_freed_memory()  # freed memory reused in place, not faulted in again
    app = create_app(settings)
    config = _config(settings, app, settings.port)
    internal = None
    if settings.internal_port is not None:
        internal = InternalServer(
            _config(settings, internal_only(app), settings.internal_port, lifespan="off")
        )
    _warn_about_secrets_in(argv)
    heap.freeze_startup_heap()  # the app's and its imports' objects: out of the GC's walks
    try:
        DrainingServer(config, app, settings.drain_timeout_seconds, internal).run()
    finally:
        heap.thaw_startup_heap()
    return 0


def _config(
    settings: GatewaySettings, app: ASGIApp, port: int, lifespan: Literal["auto", "off"] = "auto"
) -> uvicorn.Config:
    """A listener on ``port``, with a connection budget of its own
    (:mod:`gateway.http.connections`)."""
    protocol = gateway_protocol(
        settings.header_timeout_seconds,
        settings.write_timeout_seconds,
        Budget(settings.max_connections),
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=10,
        http=protocol,
        lifespan=lifespan,
    )


def _warn_about_secrets_in(argv: list[str]) -> None:
    """A key, token or Redis password given as a flag is visible to every user of the host."""
    flags = [a for a in argv if a.startswith(("--api-key", "--worker-token")) and "-file" not in a]
    urls = [v for f, v in itertools.pairwise(argv) if f == "--queue-url"]
    urls += [a.split("=", 1)[1] for a in argv if a.startswith("--queue-url=")]
    if flags:
        log.warning(
            "a key or token on the command line is visible to every user of this host (ps); "
            "use --api-key-file / --worker-token-file or GATEWAY_API_KEYS / GATEWAY_WORKER_TOKENS"
        )
    if any(queue_url_password(url) for url in urls):
        log.warning(
            "the Redis password in --queue-url is visible to every user of this host (ps); "
            "use --queue-password-file, or GATEWAY_QUEUE_URL"
        )


if __name__ == "__main__":
    sys.exit(main())
