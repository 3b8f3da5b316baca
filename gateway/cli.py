"""``inference-gateway``: the reference queue and OpenAI-compatible front door.

Every setting is a flag or a ``GATEWAY_*`` environment variable (:mod:`gateway.settings`);
secrets are best given in the environment: ``GATEWAY_API_KEYS`` and ``GATEWAY_WORKER_TOKENS``
(comma-separated). Exit 2 for bad settings.

SIGTERM / SIGINT drain: readiness turns 503 and new client requests get 503 at once, while
worker calls and the clients already waiting are served, until none is waiting or
``--drain-timeout`` passes; then the server stops. A second signal stops it at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.connections import head_timeout_protocol
from gateway.serving import Serving
from gateway.settings import parse
from worker import heap

log = logging.getLogger("gateway")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain before its own graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self._app = app
        self._drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Future[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=10,
        limit_concurrency=settings.max_connections,
        http=head_timeout_protocol(settings.header_timeout_seconds),
    )
    if any(a.startswith(("--api-key", "--worker-token")) and "-file" not in a for a in argv):
        log.warning(
            "a key or token on the command line is visible to every user of this host (ps); "
            "use --api-key-file / --worker-token-file or GATEWAY_API_KEYS / GATEWAY_WORKER_TOKENS"
        )
    heap.freeze_startup_heap()  # the app's and its imports' objects: out of the GC's walks
    try:
        DrainingServer(config, app, settings.drain_timeout_seconds).run()
    finally:
        heap.thaw_startup_heap()
    return 0


if __name__ == "__main__":
    sys.exit(main())
