"""Operating the system: Prometheus, probes, drain, engine death, and faults between worker and
queue — real gateway, real workers, a real Prometheus server, bounded in time.

Layout: a gateway G2 of its own; worker W2 reaches it only through a fault-injecting proxy
(tests/support/faults.py); clients call G2 directly. Each test reports how many requests it sent and
how many were lost (always asserted to be 0).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from devstack import localstack as ls
from tests.support import metric as _metric
from tests.support.faults import FaultInjectingProxy
from tests.support.stack import cosine, unit

MODEL = "ops-minilm"
PICKUP = 120  # seconds a request may wait for a worker (outages below are shorter)
BACKLOG_MODEL = "backlog-model"  # declared at the gateway, served by no worker
REPO = Path(__file__).resolve().parents[2]


def _ops_config(queue_url: str, **kw: object) -> str:
    return ls.worker_config(
        queue_url=queue_url,
        model_name=MODEL,
        max_num_seqs=64,
        top_extra="drain_timeout_seconds = 60",
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def g2(stack_dir) -> Iterator[ls.Proc]:
    proc = ls.start_gateway(
        stack_dir,
        args=[
            "--lease-seconds",
            "5",
            "--max-attempts",
            "6",
            "--pickup-timeout",
            str(PICKUP),
            "--model",
            BACKLOG_MODEL,
        ],
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def proxy(g2) -> Iterator[FaultInjectingProxy]:
    p = FaultInjectingProxy(g2.url)
    yield p
    p.down()


@pytest.fixture(scope="module")
def w2_start(g2, proxy, stack_dir) -> Iterator[dict]:
    """W2 starts while the queue is unreachable (proxy down), then the queue comes up."""
    tcp_port = ls.free_port()
    w2 = ls.start_worker(
        _ops_config(proxy.url).replace("[monitoring]", f"[monitoring]\ntcp_probes = [{tcp_port}]"),
        stack_dir,
        "w2",
        wait=False,
    )
    try:
        yield _started_while_queue_down(w2, tcp_port, proxy)
    finally:
        w2.stop()


def _started_while_queue_down(w2: ls.Proc, tcp_port: int, proxy: FaultInjectingProxy) -> dict:
    """Wait for W2's engine while the queue is unreachable, note its probes, bring the queue up."""
    seen: dict = {"proc": w2, "tcp_port": tcp_port}
    try:
        _observe_while_queue_down(w2, seen)
    finally:  # the queue comes up whatever happened: the module's other tests share it
        proxy.up()
    ls.wait_http(w2.url + "/readyz", w2, 60)
    return seen


def _observe_while_queue_down(w2: ls.Proc, seen: dict) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # engine loaded, queue still unreachable
        try:
            if (
                httpx.get(w2.url + "/livez", timeout=2).status_code == 200
                and _metric(httpx.get(w2.url + "/metrics").text, "inference_worker_engine_up") == 1
            ):
                break
        except httpx.HTTPError:
            pass
        assert w2.popen.poll() is None, w2.log_tail()
        time.sleep(0.5)
    deadline = time.monotonic() + 30
    while _metric(httpx.get(w2.url + "/metrics").text, "inference_worker_queue_errors_total") < 2:
        assert time.monotonic() < deadline, w2.log_tail()  # pulls fail, after their retries
        time.sleep(0.25)
    seen["ready_while_down"] = httpx.get(w2.url + "/readyz").status_code
    seen["alive_while_down"] = httpx.get(w2.url + "/livez").status_code
    seen["errors_while_down"] = _metric(
        httpx.get(w2.url + "/metrics").text, "inference_worker_queue_errors_total"
    )


@pytest.fixture(scope="module")
def w2(w2_start) -> ls.Proc:
    return w2_start["proc"]


class Prometheus:
    """A real Prometheus server on loopback scraping the gateway (job ``inference-gateway``)
    and the workers (job ``inference-worker``, file-based discovery: :meth:`add_worker`) every
    second, with the shipped alerting rules loaded (their ``for:`` durations shortened to 3 s
    so tests stay short)."""

    def __init__(self, gateway_url: str, workdir: Path):
        binary = shutil.which("prometheus")
        assert binary and shutil.which("promtool"), (
            "install Debian's prometheus package (make test does)"
        )
        rules = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
        (workdir / "alerts.yml").write_text(re.sub(r"for: \d+m", "for: 3s", rules))
        self.workers_file = workdir / "workers.json"
        self.workers: list[str] = []
        self.workers_file.write_text("[]")
        (workdir / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{workdir / 'alerts.yml'}]\n"
            "scrape_configs:\n"
            "  - job_name: inference-gateway\n"
            f"    static_configs: [{{targets: ['{_host(gateway_url)}']}}]\n"
            "  - job_name: inference-worker\n"
            f"    file_sd_configs: [{{files: ['{self.workers_file}'], refresh_interval: 1s}}]\n"
        )
        port = ls.free_port()
        self.proc = ls.start(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            workdir / "prometheus.log",
            ready=f"http://127.0.0.1:{port}/-/ready",
            timeout=60,
        )
        self.api = f"http://127.0.0.1:{port}/api/v1"

    def add_worker(self, url: str) -> None:
        """Scrape this worker too (as job ``inference-worker``, ``instance`` = host:port)."""
        self.workers.append(_host(url))
        self.workers_file.write_text(json.dumps([{"targets": self.workers}]))

    def query(self, q: str) -> float | None:
        try:
            res = httpx.get(self.api + "/query", params={"query": q}, timeout=5).json()["data"][
                "result"
            ]
        except (httpx.HTTPError, KeyError, ValueError):
            return None
        return float(res[0]["value"][1]) if res else None

    def wait_for(self, checks: dict, timeout: float) -> None:
        pending = dict(checks)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for q, ok in list(pending.items()):
                v = self.query(q)
                if v is not None and ok(v):
                    del pending[q]
            time.sleep(1)
        assert not pending, {q: self.query(q) for q in pending}

    def firing(self) -> list[dict]:
        try:
            alerts = httpx.get(self.api + "/alerts", timeout=5).json()["data"]["alerts"]
        except (httpx.HTTPError, KeyError, ValueError):
            return []
        return [a for a in alerts if a["state"] == "firing"]

    def stop(self) -> None:
        self.proc.stop(30)


def _host(url: str) -> str:
    return url.split("//", 1)[1]


@pytest.fixture(scope="module")
def prom(g2, w2, tmp_path_factory) -> Iterator[Prometheus]:
    p = Prometheus(g2.url, tmp_path_factory.mktemp("prometheus"))
    try:
        p.add_worker(w2.url)
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def ops_ref(reference, stsb_sentences) -> dict[str, np.ndarray]:
    texts = stsb_sentences[:200]
    return dict(zip(texts, unit(reference.raw(texts)), strict=True))


async def _load(url: str, batches: list[list[str]], concurrency: int = 16) -> list[httpx.Response]:
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {ls.API_KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=PICKUP + 300, headers=headers) as c:

        async def one(batch: list[str]) -> httpx.Response:
            async with sem:
                return await c.post("/v1/embeddings", json={"model": MODEL, "input": batch})

        return await asyncio.gather(*[one(b) for b in batches])


def _check_answers(
    resps: list[httpx.Response], batches: list[list[str]], ref: dict[str, np.ndarray]
) -> int:
    """Every request answered once, correctly. Returns the number lost (asserted 0)."""
    lost = 0
    for r, batch in zip(resps, batches, strict=True):
        if r.status_code != 200:
            lost += 1
            continue
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert got.shape == (len(batch), 384)
        assert cosine(got, np.array([ref[t] for t in batch])).min() >= 0.999
    return lost


def _batches(texts: list[str], n: int, size: int, offset: int = 0) -> list[list[str]]:
    return [[texts[(offset + i * size + j) % len(texts)] for j in range(size)] for i in range(n)]


def test_worker_started_while_queue_unreachable(w2_start):
    assert w2_start["alive_while_down"] == 200
    assert w2_start["ready_while_down"] == 503
    assert w2_start["errors_while_down"] >= 1


def test_probes(w2):
    assert httpx.get(w2.url + "/livez").json() == {"alive": True}
    assert httpx.get(w2.url + "/readyz").json() == {"ready": True}


def test_tcp_probe_port_accepts_while_alive(w2_start):

    with socket.create_connection(("127.0.0.1", w2_start["tcp_port"]), timeout=2):
        pass


def test_metrics_pass_promtool_and_prometheus_scrapes_them(g2, w2, prom, stsb_sentences, ops_ref):
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    assert promtool and prometheus, "install Debian's prometheus package (make test does)"
    batches = _batches(stsb_sentences[:200], 12, 10)
    resps = asyncio.run(_load(g2.url, batches))
    assert _check_answers(resps, batches, ops_ref) == 0
    print(f"prometheus test: sent {len(batches)} requests, lost 0")

    for url in (g2.url, w2.url):
        text = httpx.get(url + "/metrics").text
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        findings = [ln for ln in (lint.stdout + lint.stderr).splitlines() if ln.strip()]
        assert lint.returncode == 0 and not findings, (url, findings)
        if url == w2.url:  # vLLM's engine metrics are there, under Prometheus-convention names
            assert "\nvllm_num_requests_running" in text and "\nvllm:" not in text
            assert "\nvllm_iteration_tokens_bucket" in text

    n_inputs = sum(len(b) for b in batches)
    checks = {
        f'sum(inference_worker_items_completed_total{{model="{MODEL}"}})': lambda v: v >= n_inputs,
        'sum(inference_gateway_requests_total{route="/v1/embeddings",status="200"})': lambda v: (
            v >= len(batches)
        ),
        "inference_worker_engine_up": lambda v: v == 1,
        "inference_worker_engine_busy_seconds_total": lambda v: v > 0,  # relayed from its process
        "inference_worker_queue_reachable": lambda v: v == 1,
        f'sum(inference_gateway_workers{{model="{MODEL}"}})': lambda v: v == 1,
        f'sum(inference_worker_prompt_tokens_total{{model="{MODEL}"}})': lambda v: v > n_inputs,
        'count(inference_worker_build_info{task="embed",dtype="float32"})': lambda v: v == 1,
        "sum(vllm_request_success_total)": lambda v: v >= n_inputs,
        'sum(up{job=~"inference-gateway|inference-worker"})': lambda v: v == 2,
    }
    prom.wait_for(checks, timeout=60)


def test_faulty_queue_calls_lose_nothing(g2, w2, proxy, stsb_sentences, ops_ref):
    before = httpx.get(w2.url + "/metrics").text
    batches = _batches(stsb_sentences[:200], 60, 8, offset=3)
    proxy.mode = "faults"
    try:
        resps = asyncio.run(_load(g2.url, batches))
    finally:
        proxy.mode = "pass"
    lost = _check_answers(resps, batches, ops_ref)
    after = httpx.get(w2.url + "/metrics").text
    retries = _metric(after, "inference_worker_queue_retries_total") - _metric(
        before, "inference_worker_queue_retries_total"
    )
    print(
        f"fault proxy test: sent {len(batches)} requests, lost {lost}, "
        f"injected {dict(proxy.injected)}"
    )
    assert lost == 0
    assert proxy.injected["500"] and proxy.injected["429"] and proxy.injected["slow"]
    assert proxy.injected["lost"] >= 1
    assert retries >= proxy.injected["500"] // 2  # the worker retried instead of giving up
    assert w2.popen.poll() is None


def test_logs_carry_no_secrets_or_inputs(g2, w2, stsb_sentences):
    for log in (w2.log_path, g2.log_path):
        text = log.read_text(errors="replace")
        assert ls.API_KEY not in text and ls.WORKER_TOKEN not in text
        leaked = [s for s in stsb_sentences[:200] if s in text]
        assert not leaked, (log, leaked[:3])
    assert "serving ['ops-minilm']" in w2.log_path.read_text()


def test_queue_outage_of_30_s_mid_run(g2, w2, proxy, stsb_sentences, ops_ref):
    batches = _batches(stsb_sentences[:200], 30, 8, offset=11)

    async def scenario() -> list[httpx.Response]:
        load = asyncio.create_task(_load(g2.url, batches, concurrency=30))
        await _in_flight(w2, 1)
        proxy.down()
        try:  # the queue comes back whatever happens here: later tests share it
            await asyncio.sleep(30)
            assert w2.popen.poll() is None
            assert httpx.get(w2.url + "/livez").status_code == 200
            assert httpx.get(w2.url + "/readyz").status_code == 503
        finally:
            proxy.up()
        return await asyncio.wait_for(load, PICKUP + 300)

    resps = asyncio.run(scenario())
    lost = _check_answers(resps, batches, ops_ref)
    print(f"30 s outage test: sent {len(batches)} requests, lost {lost}")
    assert lost == 0


async def _in_flight(worker: ls.Proc, n: int, timeout: float = 60) -> None:
    """Wait until ``worker`` holds at least ``n`` items (its in-flight gauge)."""
    deadline = time.monotonic() + timeout
    while _metric(httpx.get(worker.url + "/metrics").text, "inference_worker_items_in_flight") < n:
        assert time.monotonic() < deadline, f"{worker.url}: fewer than {n} items in flight"
        await asyncio.sleep(0.05)


def test_sigterm_drains_releases_the_rest_and_exits_0(
    g2, w2, prom, stack_dir, stsb_sentences, ops_ref
):
    """SIGTERM under load: the worker stops pulling, finishes what it can within its drain
    timeout (0.5 s here, with 512 items in flight), releases the rest at once (W2 serves them),
    exits 0; Prometheus then fires InferenceWorkerDown for it. Its own worker: it is stopped."""
    config = _ops_config(g2.url, queue_extra="max_items_in_flight = 512").replace(
        "drain_timeout_seconds = 60", "drain_timeout_seconds = 0.5"
    )
    victim = ls.start_worker(config, stack_dir, "sigterm-victim")
    try:
        prom.add_worker(victim.url)
        prom.wait_for({f'up{{instance="{_host(victim.url)}"}}': lambda v: v == 1}, 30)
        batches = _batches(stsb_sentences[:200], 40, 64, offset=5)

        async def scenario() -> list[httpx.Response]:
            load = asyncio.create_task(_load(g2.url, batches, concurrency=40))
            await _in_flight(victim, 256)
            victim.signal(signal.SIGTERM)
            return await load

        t0 = time.monotonic()
        resps = asyncio.run(scenario())
        try:
            code = victim.popen.wait(90)
        except subprocess.TimeoutExpired as e:
            victim.signal(signal.SIGUSR1)  # stack dump into the log, then fail with it
            time.sleep(2)
            raise AssertionError(
                "worker did not exit after SIGTERM:\n" + victim.log_tail(120)
            ) from e
        lost = _check_answers(resps, batches, ops_ref)
        log = victim.log_path.read_text()
        released = re.search(r"released (\d+) unfinished items back to the queue", log)
        print(
            f"SIGTERM test: sent {len(batches)} requests, lost {lost}, exit {code}, "
            f"released {released and released[1]} items, {time.monotonic() - t0:.1f} s"
        )
        assert code == 0, victim.log_tail()
        assert lost == 0
        assert released is not None and int(released[1]) > 0, victim.log_tail(60)
        assert "drain timeout" in log and "drained; exit code 0" in log
        instance = _host(victim.url)
        deadline = time.monotonic() + 60
        down: list[dict] = []
        while not down and time.monotonic() < deadline:
            down = [
                a
                for a in prom.firing()
                if a["labels"]["alertname"] == "InferenceWorkerDown"
                and a["labels"]["instance"] == instance
            ]
            time.sleep(1)
        assert down, prom.firing()
    finally:
        victim.stop()


def test_engine_death_exits_1_and_its_items_reach_another_worker(
    g2, w2, stack_dir, stsb_sentences, ops_ref
):
    """Kill a worker's vLLM engine process under load: the worker exits 1 with the cause in one
    ERROR line, and the items it held reach W2 at once (released with the attempt counted).
    Its probes in that state (/livez 503, TCP reset) are checked in tests/unit/test_monitoring.py:
    here the process is gone within milliseconds of noticing the death. The victim runs
    ``engine_core = "process"`` (the CPU hosts' default: vLLM's engine in a process of the
    worker's own, which can die alone; ``asyncllm``'s engine-core process is its own the same
    way); with the engine in the worker process a crash of it is the worker's
    (test_queue_faults), and a failed engine thread is checked in
    tests/unit/test_engine_thread.py."""
    victim = ls.start_worker(
        _ops_config(g2.url, generator_extra='engine_core = "process"'), stack_dir, "engine-victim"
    )
    try:
        batches = _batches(stsb_sentences[:200], 40, 64, offset=17)
        engine_procs = list(psutil.Process(victim.pid).children(recursive=True))
        assert engine_procs, "no vLLM engine process found"

        async def scenario() -> list[httpx.Response]:
            load = asyncio.create_task(_load(g2.url, batches, concurrency=40))
            await _in_flight(victim, 1)
            for p in engine_procs:
                p.kill()
            return await load

        t0 = time.monotonic()
        resps = asyncio.run(scenario())
        code = victim.popen.wait(60)
        lost = _check_answers(resps, batches, ops_ref)
        log = victim.log_path.read_text()
        released = re.search(r"released (\d+) unfinished items back to the queue", log)
        print(
            f"engine death test: sent {len(batches)} requests, lost {lost}, exit {code}, "
            f"released {released and released[1]}, {time.monotonic() - t0:.1f} s"
        )
        assert code == 1, victim.log_tail()
        assert lost == 0
        assert released is not None and int(released[1]) > 0
        assert len(re.findall(r" ERROR worker: vLLM engine died: \S", log)) == 1
    finally:
        victim.stop()


def test_autoscaler_query_sees_queue_depth(g2, prom):
    """The KEDA trigger's query, as shipped, returns the backlog of a model with no worker."""
    import yaml

    so = yaml.safe_load((REPO / "deploy/k8s/components/keda/scaledobject.yaml").read_text())
    query = so["spec"]["triggers"][0]["metadata"]["query"].replace(
        "all-minilm-l6-v2", BACKLOG_MODEL
    )
    assert prom.query(query) == 0  # "or vector(0)": no series yet is zero, not "no data"
    backlog = 37
    headers = {"Authorization": f"Bearer {ls.API_KEY}"}

    async def scenario() -> float | None:
        async with httpx.AsyncClient(base_url=g2.url, headers=headers, timeout=PICKUP + 30) as c:
            waiting = asyncio.create_task(
                c.post(
                    "/v1/embeddings",
                    json={"model": BACKLOG_MODEL, "input": [f"queued {i}" for i in range(backlog)]},
                )
            )
            await asyncio.to_thread(prom.wait_for, {query: lambda v: v == backlog}, 30)
            value = prom.query(query)
            waiting.cancel()
            return value

    assert asyncio.run(scenario()) == backlog
