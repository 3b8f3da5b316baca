"""The worker's monitoring port in process (fast layer): probes follow the health object,
TCP probe ports reset connections once the engine is dead, vLLM's metric names."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from devstack import localstack as ls
from worker.config import MonitoringConfig
from worker.health import Health
from worker.monitoring import MonitoringServer, RenamedVllmMetrics, create_app, prometheus_name


class FakeEngine:
    """FAKE: only the ``alive`` flag of an engine."""

    alive = True


async def probe(app_health: Health, path: str) -> httpx.Response:
    app = create_app(app_health)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as c:
        return await c.get(path)


async def test_probes_follow_the_engine_and_the_queue():
    health, engine = Health(), FakeEngine()
    assert (await probe(health, "/livez")).json() == {"alive": True}  # loading: alive
    assert (await probe(health, "/readyz")).status_code == 503  # not ready yet
    health.engine_started(engine)
    assert (await probe(health, "/readyz")).status_code == 503  # no queue call yet
    health.queue_reached(True)
    assert (await probe(health, "/readyz")).json() == {"ready": True}
    health.queue_reached(False)  # cut off from the queue: alive, not ready
    assert (await probe(health, "/readyz")).status_code == 503
    assert (await probe(health, "/livez")).status_code == 200
    health.queue_reached(True)
    engine.alive = False
    assert (await probe(health, "/livez")).json() == {"alive": False}
    assert (await probe(health, "/livez")).status_code == 503
    assert (await probe(health, "/readyz")).status_code == 503


def _connect_and_read(port: int) -> str:
    """``closed`` (accepted, then an orderly close), ``reset`` (an RST, which may already
    arrive while ``connect`` returns), or ``data``; other errors (refused) propagate."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            return "closed" if s.recv(1) == b"" else "data"
    except ConnectionResetError:
        return "reset"


async def test_tcp_probe_ports_accept_while_alive_and_reset_once_dead():
    health, engine = Health(), FakeEngine()
    health.engine_started(engine)
    tcp = ls.free_port()
    server = MonitoringServer(
        MonitoringConfig(metrics_port=ls.free_port(), metrics_host="127.0.0.1", tcp_probes=[tcp]),
        health,
    )
    await server.start()
    try:
        assert await asyncio.to_thread(_connect_and_read, tcp) == "closed"
        engine.alive = False
        assert await asyncio.to_thread(_connect_and_read, tcp) == "reset"
    finally:
        await server.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(_connect_and_read, tcp)  # closed with the server


@pytest.mark.parametrize(
    "family,typ,want",
    [
        ("vllm:num_requests_running", "gauge", "vllm_num_requests_running"),
        ("vllm:request_success", "counter", "vllm:request_success".replace(":", "_")),
        ("vllm:iteration_tokens_total", "histogram", "vllm_iteration_tokens"),
        ("vllm:prompt_tokens_total", "counter", "vllm_prompt_tokens_total"),
        ("inference_worker_items_in_flight", "gauge", "inference_worker_items_in_flight"),
    ],
)
def test_prometheus_names_of_vllm_metrics(family, typ, want):
    assert prometheus_name(family, typ) == want


def test_renamed_view_keeps_values_labels_and_help():
    source = CollectorRegistry()
    c = Counter("vllm:request_success", "Finished requests.", ["reason"], registry=source)
    c.labels("stop").inc(3)
    h = Histogram(
        "vllm:iteration_tokens_total", "Tokens per step.", buckets=[1, 10], registry=source
    )
    h.observe(5)
    view = CollectorRegistry(auto_describe=False)
    view.register(RenamedVllmMetrics(source))
    text = generate_latest(view).decode()
    assert 'vllm_request_success_total{reason="stop"} 3.0' in text
    assert "# HELP vllm_request_success_total Finished requests." in text
    assert 'vllm_iteration_tokens_bucket{le="10.0"} 1.0' in text
    assert "vllm:" not in text


def test_tcp_probe_reset_under_uvloop():
    """The worker runs on uvloop: the reset holds there too."""
    import uvloop

    async def scenario() -> str:
        health, engine = Health(), FakeEngine()
        health.engine_started(engine)
        engine.alive = False
        tcp = ls.free_port()
        config = MonitoringConfig(
            metrics_port=ls.free_port(), metrics_host="127.0.0.1", tcp_probes=[tcp]
        )
        server = MonitoringServer(config, health)
        await server.start()
        try:
            return await asyncio.to_thread(_connect_and_read, tcp)
        finally:
            await server.stop()

    assert uvloop.run(scenario()) == "reset"
