"""Stateless gateway replicas on one Redis queue, with real processes (docs/queue-protocol.md,
"Queue store"): clients on one replica and the worker on another, a replica SIGKILLed under
load, a worker killed while pulling through one replica and its inputs served through the
other, Redis restarted mid-run (AOF), and Redis unreachable for 10 s. Each prints the requests
sent and lost."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from tests.support import metric
from tests.support.reports import FAULT_REPORTS
from tests.support.stack import MODEL, cosine, embed_worker_config, unit

DEPTH = "inference_gateway_queue_depth_items"
GATEWAY_ARGS = ["--lease-seconds", "8", "--pickup-timeout", "30", "--request-timeout", "180"]
HEADERS = {"Authorization": f"Bearer {ls.API_KEY}"}


class Redis:
    """This module's own redis-server (AOF on), restartable on the same port and data dir."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.proc = ls.start_redis(log_dir)
        self.port = self.proc.port
        self.url = self.proc.url

    def stop(self) -> None:
        assert self.proc.stop(30) == 0, self.proc.log_tail()  # SIGTERM: AOF flushed

    def start(self) -> None:
        self.proc = ls.start_redis(self.log_dir, port=self.port)


@pytest.fixture(scope="module")
def redis_q(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    r = Redis(tmp_path_factory.mktemp("replicas"))
    yield r
    r.proc.stop(10)


def start_replica(redis_q: Redis, log_dir: Path) -> ls.Proc:
    return ls.start_gateway(log_dir, args=[*GATEWAY_ARGS, "--queue-url", redis_q.url])


@pytest.fixture(scope="module")
def replica_a(redis_q: Redis, stack_dir: Path) -> Iterator[ls.Proc]:
    proc = start_replica(redis_q, stack_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def replica_b(redis_q: Redis, stack_dir: Path) -> Iterator[ls.Proc]:
    proc = start_replica(redis_q, stack_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def worker_b(replica_b: ls.Proc, stack_dir: Path) -> Iterator[ls.Proc]:
    """The module's worker: it pulls through replica B only."""
    proc = ls.start_worker(embed_worker_config(replica_b.url), stack_dir, "worker-on-b")
    yield proc
    assert proc.stop() == 0, proc.log_tail()


def embed(url: str, texts: list[str], timeout: float = 180) -> httpx.Response:
    return httpx.post(
        url + "/v1/embeddings",
        json={"model": MODEL, "input": texts, "encoding_format": "float"},
        headers=HEADERS,
        timeout=timeout,
    )


def vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)


def total(replicas: list[ls.Proc], name: str, **labels: str) -> float:
    """A counter summed over replicas (counters are per replica; see docs)."""
    return sum(metric(httpx.get(r.url + "/metrics").text, name, **labels) for r in replicas)


def report(test: str, **counts: Any) -> None:
    """Printed in the run's summary (``fault tests`` section), also when the test passes."""
    FAULT_REPORTS.append(f"[{test}] " + ", ".join(f"{k} {v}" for k, v in counts.items()))


def test_two_replicas_share_one_queue(
    replica_a, replica_b, worker_b, reference, stsb_sentences, redis_q
):
    """Clients on A, the worker on B: answers are right, and both replicas report the same
    models, worker count and queue depth (from the store)."""
    texts = stsb_sentences[:100]
    got = vectors(embed(replica_a.url, texts))
    assert cosine(got, unit(reference.raw(texts))).min() >= 0.999

    def sent(i: int) -> np.ndarray:
        return vectors(embed(replica_a.url, texts[i * 10 : i * 10 + 10]))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(sent, range(10)))
    assert np.concatenate(answers).shape == (100, 384)
    report("two replicas", requests_sent=11, answered=11, lost=0)

    def models(r: ls.Proc) -> list[Any]:
        data = httpx.get(r.url + "/v1/models", headers=HEADERS).json()["data"]
        return [(m["id"], m["workers"], m["tasks"]) for m in data]

    # One live worker (a worker another test killed stays listed for the worker TTL).
    deadline = time.monotonic() + 45
    while models(replica_a) != [(MODEL, 1, ["embed", "tokenize"])] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert models(replica_a) == models(replica_b) == [(MODEL, 1, ["embed", "tokenize"])]
    # The store-wide gauges, read from both replicas while a request is in the queue: the
    # worker (and its engine) stopped for a moment, so nothing moves between the reads.
    gauges = (
        "inference_gateway_workers",
        "inference_gateway_queue_depth_items",
        "inference_gateway_items_leased",
    )

    def read(r: ls.Proc) -> tuple[float, ...]:
        text = httpx.get(r.url + "/metrics").text
        return tuple(metric(text, name, model=MODEL) for name in gauges)

    result: dict[str, httpx.Response] = {}
    worker_b.signal(signal.SIGSTOP, group=True)
    try:
        t = threading.Thread(target=lambda: result.update(r=embed(replica_a.url, texts[:50])))
        t.start()
        deadline = time.monotonic() + 5
        while True:  # the 50 inputs queued or leased, both replicas reading the same
            a, b = read(replica_a), read(replica_b)
            if a == b and a[1] + a[2] == 50:
                break
            assert time.monotonic() < deadline, (a, b)
            time.sleep(0.05)
        assert a == b == read(replica_a) and a[0] == 1
    finally:
        worker_b.signal(signal.SIGCONT, group=True)
    t.join(60)
    assert vectors(result["r"]).shape == (50, 384)
    assert httpx.get(replica_a.url + "/readyz").status_code == 200


def test_worker_killed_while_pulling_through_a_is_served_through_b(
    replica_a, replica_b, worker_b, reference, stsb_sentences, stack_dir
):
    victim = ls.start_worker(
        embed_worker_config(replica_a.url, max_num_seqs=64), stack_dir, "victim-on-a"
    )
    try:
        texts = (stsb_sentences * 10)[:2000]
        before = total([replica_a, replica_b], "inference_gateway_redeliveries_total")
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.update(r=embed(replica_a.url, texts)))
        t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = httpx.get(victim.url + "/metrics").text
            pulled = metric(m, "inference_worker_items_pulled_total")
            if pulled > 0:
                break
            time.sleep(0.02)
        completed = metric(m, "inference_worker_items_completed_total")
        victim.signal(signal.SIGKILL, group=True)  # the worker and its engine, mid-batch
        assert pulled > completed, "the victim had nothing in flight when killed"
        t.join(170)
        assert not t.is_alive()
        got = vectors(result["r"])
        want = np.concatenate([unit(reference.raw(stsb_sentences))] * 10)[:2000]
        assert got.shape == (2000, 384) and cosine(got, want).min() >= 0.999
        redelivered = total([replica_a, replica_b], "inference_gateway_redeliveries_total")
        assert redelivered - before >= 1
        report(
            "worker killed via A",
            inputs_sent=2000,
            in_flight_at_kill=int(pulled - completed),
            redelivered=int(redelivered - before),
            lost=0,
        )
    finally:
        victim.stop()


def test_a_replica_sigkilled_under_load_loses_nothing_its_clients_retry(
    redis_q, replica_a, worker_b, stsb_sentences, stack_dir
):
    """Clients spread over A and C; C is SIGKILLed mid-run. Its clients see a broken
    connection and send again to A (as a client behind a load balancer retries); every
    request is answered, and the inputs C had queued do not block the queue."""
    replica_c = start_replica(redis_q, stack_dir)
    try:
        n, size = 40, 20
        answered: list[int] = []
        retried: list[int] = []
        lock = threading.Lock()

        def client(i: int) -> None:
            texts = [stsb_sentences[(i * size + j) % 200] for j in range(size)]
            first = replica_c.url if i % 2 else replica_a.url
            try:
                resp = embed(first, texts)
                assert resp.status_code == 200, resp.text
            except httpx.TransportError:
                with lock:
                    retried.append(i)
                resp = embed(replica_a.url, texts)
            assert vectors(resp).shape == (size, 384)
            with lock:
                answered.append(i)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, i) for i in range(n)]
            deadline = time.monotonic() + 60
            while len(answered) < 6:
                assert time.monotonic() < deadline, "no request answered"
                time.sleep(0.05)
            replica_c.signal(signal.SIGKILL)
            for f in futures:
                f.result(timeout=180)
        assert sorted(answered) == list(range(n))
        assert retried, "C was killed after all its clients were served"
        report(
            "replica SIGKILL", requests_sent=n, retried_on_a=len(retried), lost=n - len(answered)
        )
    finally:
        replica_c.stop()


def test_redis_restarted_mid_run_serves_the_queued_inputs(
    redis_q, replica_a, replica_b, worker_b, reference, stsb_sentences
):
    texts = (stsb_sentences * 10)[:2000]
    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.update(r=embed(replica_a.url, texts)))
    t.start()
    deadline = time.monotonic() + 60
    queued = leased = 0.0
    while queued == 0 or leased == 0:  # inputs wait and the worker holds some: restart now
        assert time.monotonic() < deadline, f"nothing queued ({queued}) or leased ({leased})"
        assert "r" not in result, result["r"].text  # answered (or refused) before a restart
        text = httpx.get(replica_a.url + "/metrics").text
        queued = metric(text, "inference_gateway_queue_depth_items", model=MODEL)
        leased = metric(text, "inference_gateway_items_leased", model=MODEL)
        time.sleep(0.05)
    redis_q.stop()
    try:
        time.sleep(2)
    finally:
        redis_q.start()
    # a request sent right after Redis is back is answered the first time (no 503)
    right_after = embed(replica_b.url, ["right after the restart"])
    assert vectors(right_after).shape == (1, 384)
    t.join(170)
    assert not t.is_alive()
    got = vectors(result["r"])
    want = np.concatenate([unit(reference.raw(stsb_sentences))] * 10)[:2000]
    assert cosine(got, want).min() >= 0.999
    report(
        "Redis restart",
        inputs_sent=2000,
        queued_at_restart=int(queued),
        leased_at_restart=int(leased),
        lost=0,
    )


def test_redis_unreachable_for_10_s_clean_503s_then_service_resumes(
    redis_q, replica_a, replica_b, worker_b
):
    assert vectors(embed(replica_a.url, ["before"])).shape == (1, 384)
    redis_q.stop()
    codes: dict[int, int] = {}
    slowest = 0.0
    try:
        assert httpx.get(replica_a.url + "/readyz").status_code == 503
        down = httpx.get(replica_a.url + "/metrics").text
        assert metric(down, "inference_gateway_queue_store_up") == 0
        end = time.monotonic() + 10
        while time.monotonic() < end:
            t0 = time.monotonic()
            r = embed(replica_a.url, ["during"], timeout=30)
            slowest = max(slowest, time.monotonic() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "queue_unavailable"
            time.sleep(0.5)
        assert worker_b.popen.poll() is None  # still retrying
        assert httpx.get(worker_b.url + "/livez").status_code == 200
    finally:
        redis_q.start()
    back = time.monotonic()
    deadline = back + 60
    while True:  # nobody restarts anything: service resumes by itself
        r = embed(replica_a.url, ["after"], timeout=60)
        if r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)
    resumed = time.monotonic() - back
    assert httpx.get(replica_a.url + "/readyz").status_code == 200
    up = httpx.get(replica_a.url + "/metrics").text
    assert metric(up, "inference_gateway_queue_store_up") == 1
    assert slowest < 6
    report(
        "Redis down 10 s",
        requests_sent=sum(codes.values()),
        clean_503=codes.get(503, 0),
        slowest_503_s=round(slowest, 2),
        served_again_s_after_redis_returned=round(resumed, 1),
        lost=0,
    )


def test_a_draining_replica_serves_its_waiting_clients_and_takes_no_new_ones(
    redis_q, replica_b, worker_b, stsb_sentences, stack_dir
):
    """SIGTERM to a replica: readiness 503 and new client requests 503 ``draining`` at once;
    the client already waiting is answered; the process exits 0 within the drain timeout."""
    replica_d = start_replica(redis_q, stack_dir)
    try:
        texts = (stsb_sentences * 5)[:1000]
        result: dict[str, httpx.Response] = {}
        t = threading.Thread(target=lambda: result.update(r=embed(replica_d.url, texts)))
        t.start()
        deadline = time.monotonic() + 30
        while (
            metric(
                httpx.get(replica_d.url + "/metrics").text,
                "inference_gateway_items_leased",
                model=MODEL,
            )
            == 0
        ):
            assert time.monotonic() < deadline, "the request was not taken"
            time.sleep(0.05)
        replica_d.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(replica_d.url + "/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readiness still 200 while draining"
            time.sleep(0.05)
        late = embed(replica_d.url, ["too late"])
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        t.join(60)
        assert vectors(result["r"]).shape == (1000, 384)
        assert replica_d.popen.wait(35) == 0
        report("replica drain", waiting_requests=1, answered=1, refused_while_draining=1, lost=0)
    finally:
        replica_d.stop()


def test_redis_losing_its_data_answers_the_waiting_clients_503_or_504(redis_q, stack_dir):
    """Redis loses its data (here ``FLUSHDB`` of a database of the test's own) while clients
    wait: the one whose inputs were only queued gets a 503 or 504 within the gateway's
    timeouts (never a hang, never a 500); the one whose inputs a worker holds is answered when
    the worker posts to the client's replica; the next request is served. The worker is the
    test's own (queue protocol v1 over HTTP)."""
    import asyncio

    import redis

    from tests.support.queue_worker import QueueWorker, result, vector_of

    url = redis_q.url.rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(url).flushdb()
    short = ls.start_gateway(
        stack_dir,
        args=[
            "--queue-url", url, "--lease-seconds", "30",
            "--pickup-timeout", "3", "--request-timeout", "6",
        ],
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {ls.API_KEY}"}

    async def scenario() -> tuple[int, int, int]:
        worker = QueueWorker(short.url, ls.WORKER_TOKEN, max_items=4)
        async with httpx.AsyncClient(base_url=short.url, headers=headers, timeout=60) as c:
            assert await worker.pull(wait=0) == []  # the model is known

            def embed_async(texts: list[str]) -> asyncio.Task[httpx.Response]:
                body = {"model": "m", "input": texts}
                return asyncio.create_task(c.post("/v1/embeddings", json=body))

            leased_req = embed_async(["leased 1", "leased 2"])
            taken: list[dict] = []
            while len(taken) < 2:
                taken += await worker.pull(wait=1)
            queued_req = embed_async(["queued 1", "queued 2"])
            deadline = time.monotonic() + 10
            while metric((await c.get("/metrics")).text, DEPTH, model="m") != 2:
                assert time.monotonic() < deadline, "the second request was not queued"
                await asyncio.sleep(0.05)
            redis.Redis.from_url(url).flushdb()  # Redis loses its data
            await worker.post([result(i, vector_of(i)) for i in taken])  # too late: unknown
            leased, queued = await asyncio.wait_for(asyncio.gather(leased_req, queued_req), 30)
            assert await worker.pull(wait=0) == []  # registered again (its advert was lost)
            again = embed_async(["served again"])
            while not again.done():
                items = await worker.pull(wait=0.5)
                if items:
                    await worker.post([result(i, vector_of(i)) for i in items])
            await worker.http.aclose()
            return leased.status_code, queued.status_code, (await again).status_code

    try:
        leased, queued, again = asyncio.run(scenario())
        assert leased == 200 and queued in (503, 504), (leased, queued)
        assert again == 200
        report("Redis lost its data", leased_client=leased, queued_client=queued, next=again)
    finally:
        short.stop()
