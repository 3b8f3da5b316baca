"""The worker's monitoring port: Prometheus ``/metrics`` and health probes.

- ``GET /metrics``: the worker's metrics and vLLM's own engine metrics (default registry),
  the latter as ``vllm_*`` (Prometheus conventions) or vLLM's ``vllm:*`` names
  (``monitoring.vllm_metric_names``).
- ``GET /livez``: 200 while the process and the vLLM engine are alive, else 503.
- ``GET /readyz``: 200 once the engine is loaded and the last queue call succeeded, else 503.
- ``monitoring.tcp_probes``: extra TCP ports that accept connections while the worker is alive,
  for orchestrators that probe with a plain TCP connect.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from worker.config import MonitoringConfig, VllmMetricNames
from worker.engine.process import RELAYED
from worker.health import Health

log = logging.getLogger(__name__)


def prometheus_name(family: str, typ: str) -> str:
    """The Prometheus-convention name of a vLLM metric family: ``vllm:x`` -> ``vllm_x``
    (colons are reserved for recording rules), and a non-counter loses a ``_total`` suffix
    (vLLM's histogram ``vllm:iteration_tokens_total`` -> ``vllm_iteration_tokens``).
    Other names are returned unchanged."""
    if not family.startswith("vllm:"):
        return family
    name = family.replace(":", "_")
    if typ != "counter" and name.endswith("_total"):
        name = name[: -len("_total")]
    return name


class RenamedVllmMetrics(Collector):
    """Everything in ``source`` (the default registry: the worker's metrics and vLLM's),
    with vLLM's families renamed by :func:`prometheus_name`; values, labels and help unchanged."""

    def __init__(self, source: CollectorRegistry = REGISTRY):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            name = prometheus_name(family.name, family.type)
            if name == family.name:
                yield family
                continue
            renamed = Metric(name, family.documentation, family.type)
            renamed.samples = [
                s._replace(name=name + s.name[len(family.name) :]) for s in family.samples
            ]
            yield renamed


def metrics_registry(names: VllmMetricNames) -> CollectorRegistry:
    """The registry ``/metrics`` serves: the default registry itself for ``"upstream"``
    names, a renaming view of it for ``"prometheus"`` names."""
    if names == "upstream":
        return REGISTRY
    view = CollectorRegistry(auto_describe=False)
    view.register(RenamedVllmMetrics())
    return view


def create_app(health: Health, vllm_metric_names: VllmMetricNames = "prometheus") -> FastAPI:
    """The monitoring ASGI app; ``health`` is asked on every probe."""
    app = FastAPI(title="inference-worker monitoring", docs_url=None, redoc_url=None)
    registry = metrics_registry(vllm_metric_names)

    @app.get("/metrics")
    async def prometheus() -> Response:
        await RELAYED.refresh()  # engine processes' vLLM metrics as they are now
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        ok = health.alive()
        return JSONResponse({"alive": ok}, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = health.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    return app


class MonitoringServer:
    """Serves :func:`create_app` on ``host:port`` plus the TCP probe ports, in this event loop."""

    def __init__(self, cfg: MonitoringConfig, health: Health):
        self._health = health
        config = uvicorn.Config(
            create_app(health, cfg.vllm_metric_names),
            host=cfg.metrics_host,
            port=cfg.metrics_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=2,
        )
        self._server = uvicorn.Server(config)
        self._host = cfg.metrics_host
        self._tcp_ports = cfg.tcp_probes
        self._tcp: list[asyncio.base_events.Server] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="monitoring")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise RuntimeError("monitoring server exited at start")
            await asyncio.sleep(0.02)
        for port in self._tcp_ports:
            self._tcp.append(await asyncio.start_server(self._tcp_probe, self._host, port))
        log.info(
            "monitoring on %s:%d (tcp probes: %s)",
            self._host,
            self._server.config.port,
            self._tcp_ports or "none",
        )

    async def _tcp_probe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Alive: accept and close. Dead engine: reset the connection (RST, by closing with
        ``SO_LINGER`` 0), which a TCP probe reads as a failure."""
        if not self._health.alive():
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        writer.close()

    async def stop(self) -> None:
        """Close the probe ports and the HTTP server; never waits more than a few seconds
        for scrapers' keep-alive connections."""
        for srv in self._tcp:
            srv.close()
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=3)
            except asyncio.TimeoutError:
                self._server.force_exit = True
                await asyncio.gather(self._task, return_exceptions=True)
        log.info("monitoring stopped")
