"""The gateway's trust boundary from outside, on a real ``inference-gateway`` process (memory and
Redis stores): an attacker holding one ordinary client key (or a worker token) against the
other tenants. The worker is the tests' own, speaking queue protocol v1 over HTTP
(:class:`tests.support.queue_worker.QueueWorker`); no vLLM. Every test asserts that the other
tenants' requests are served and that what the attack costs the gateway is bounded, and
reports its figures in the run's summary ("figures of the fault, fuzz and batch tests").
``docs/security.md`` is the trust model these tests hold the gateway to."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from devstack import localstack as ls
from tests.support import metric, wait_until
from tests.support.queue_worker import ADVERT, QueueWorker, result, vector_of
from tests.support.reports import FAULT_REPORTS

ATTACKER = "sk-attacker-key-000000000001"
VICTIM = "sk-victim-key-0000000000002"
FILER = "sk-filer-key-00000000000003"  # fills its file quota (a key of its own)
SCOPED = "scoped-worker-token-0000003"
MAX_QUEUED = 2000
MAX_CONNECTIONS = 64
WRITE_TIMEOUT = 2.0
ADVERT_TTL = 2.0
RETENTION = 3.0


class Gateway:
    """The module's gateway on one store: its process, the Redis it uses (or None), URLs."""

    def __init__(self, proc: ls.Proc, store: str, redis_url: str | None, internal: str):
        self.proc = proc
        self.store = store
        self.redis_url = redis_url
        self.url = proc.url
        #: The listener for workers and probes (``--internal-port``).
        self.internal = internal

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20

    def client(self, key: str = VICTIM, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw
        )

    def worker(self, **kw: Any) -> QueueWorker:
        return QueueWorker(self.url, ls.WORKER_TOKEN, **kw)

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")


def start(
    log_dir: Path, store: str, redis_url: str | None, args: list[str] | None = None
) -> Gateway:
    tokens = log_dir / "worker-tokens"
    tokens.write_text(f"{ls.WORKER_TOKEN}\n{SCOPED} m\n")
    internal = ls.free_port()
    env = {
        "GATEWAY_API_KEYS": f"{ATTACKER},{VICTIM},{FILER}",
        "GATEWAY_WORKER_TOKEN_FILE": str(tokens),
        "GATEWAY_INTERNAL_PORT": str(internal),
        "GATEWAY_WRITE_TIMEOUT_SECONDS": str(WRITE_TIMEOUT),
        "GATEWAY_ADVERT_TTL_SECONDS": str(ADVERT_TTL),
        "GATEWAY_BATCH_RETENTION_SECONDS": str(RETENTION),
        "GATEWAY_MAX_FILES_PER_KEY": "40",
        "LOG_LEVEL": "info",
    }
    cmd_args = [
        "--lease-seconds",
        "3",
        "--pickup-timeout",
        "5",
        "--request-timeout",
        "30",
        "--worker-ttl",
        "2",
        "--max-queued-inputs",
        str(MAX_QUEUED),
        "--max-connections",
        str(MAX_CONNECTIONS),
        *(["--queue-url", redis_url] if redis_url else []),
        *(args or []),
    ]
    proc = ls.start_gateway(log_dir, args=cmd_args, env=env)
    return Gateway(proc, store, redis_url, f"http://127.0.0.1:{internal}")


@pytest.fixture(scope="module")
def trust_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Proc]:
    proc = ls.start_redis(tmp_path_factory.mktemp("trust-redis"), appendonly=False)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module", params=["memory", "redis"])
def gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    store = str(request.param)
    url = None
    if store == "redis":
        url = request.getfixturevalue("trust_redis").url
        redis.Redis.from_url(url).flushdb()
    g = start(tmp_path_factory.mktemp(f"trust-{store}"), store, url)
    try:
        yield g
    finally:
        g.proc.stop()


@pytest.fixture(scope="module")
def memory_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway on the memory store, for what does not depend on the store (connections)."""
    g = start(tmp_path_factory.mktemp("trust-edge"), "memory", None)
    try:
        yield g
    finally:
        g.proc.stop()


def report(gw: Gateway, finding: str, text: str) -> None:
    FAULT_REPORTS.append(f"[trust {gw.store}] {finding}: {text}")


async def post_raw(c: httpx.AsyncClient, path: str, body: bytes) -> httpx.Response:
    return await c.post(path, content=body, headers={"Content-Type": "application/json"})


def nested(depth: int) -> str:
    return "[" * depth + '"x"' + "]" * depth


# --- 1. poison input -----------------------------------------------------------------------

#: Inputs that are valid JSON but that no worker could be handed or use.
POISON = {
    "lone surrogate in a list field": b'{"model":"m","input":[{"a":[0,"\\ud800"]}],'
    b'"prompt_template":"{{ a }}"}',
    "300 nested lists": (
        '{"model":"m","input":[{"a":' + nested(300) + '}],"prompt_template":"{{ a }}"}'
    ).encode(),
    "a number that is not finite": b'{"model":"m","input":[{"a":1e999}],'
    b'"prompt_template":"{{ a }}"}',
    "NaN": b'{"model":"m","input":[{"a":NaN}],"prompt_template":"{{ a }}"}',
    "a token id outside the vocabulary": b'{"model":"m","input":[[5, 1000000000000]]}',
    "a huge token id": b'{"model":"m","input":[[5, 1180591620717411303424]]}',
}


async def test_poison_inputs_are_refused_at_the_edge_and_never_sink_other_tenants(gw):
    """Finding 1: a lone surrogate inside a list field or 300 nested lists was queued; every
    pull that leased it failed with 500 and other keys' requests pulled beside it ended
    ``max_attempts_exceeded`` (memory), or the SUBMIT they were coalesced into failed
    (Redis: 5 of 40 victims got 500)."""
    statuses: dict[str, list[int]] = {name: [] for name in POISON}
    victims_ok, victims = 0, 0
    async with gw.worker() as worker, gw.client(ATTACKER) as bad, gw.client(VICTIM) as good:
        for rnd in range(3):
            texts = [f"victim {rnd} {i}" + "!" * i for i in range(40)]
            calls = [post_raw(bad, "/v1/embeddings", body) for body in POISON.values()]
            calls += [good.post("/v1/embeddings", json={"model": "m", "input": t}) for t in texts]
            answers = await asyncio.gather(*calls)
            for name, r in zip(POISON, answers, strict=False):
                statuses[name].append(r.status_code)
            for text, r in zip(texts, answers[len(POISON) :], strict=True):
                victims += 1
                victims_ok += r.status_code == 200 and r.json()["data"][0]["embedding"][0] == float(
                    len(text)
                )
        pull_errors = list(worker.pull_errors)
    report(
        gw,
        "poison input",
        f"poison statuses {statuses}; victims answered 200 {victims_ok}/{victims}; "
        f"worker pulls failed {len(pull_errors)}",
    )
    assert victims_ok == victims
    assert pull_errors == []
    for name, got in statuses.items():
        assert got == [400, 400, 400], (name, got)


async def test_a_pull_never_fails_because_of_one_item(gw):
    """What the edge lets through is handed out item by item: a whole pull answers 200, and
    an input the worker reports as invalid is answered alone (400 to its own client)."""
    async with gw.client(ATTACKER) as bad, gw.client(VICTIM) as good:
        worker = gw.worker()
        await worker.register()
        # deep but within the bound: accepted, handed out, rendered by the worker
        body = {"model": "m", "input": [{"a": json.loads(nested(10))}], "prompt_template": "{a}"}
        attack = asyncio.ensure_future(bad.post("/v1/embeddings", json=body))
        victim = asyncio.ensure_future(
            good.post("/v1/embeddings", json={"model": "m", "input": "v"})
        )
        items: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(items) < 2 and time.monotonic() < deadline:
            items += await worker.pull(wait=0.5)
        assert len(items) == 2 and worker.pull_errors == []
        bad_item = next(i for i in items if i.get("fields"))
        good_item = next(i for i in items if i.get("text") == "v")
        error = {
            "item_id": bad_item["item_id"],
            "lease_id": bad_item["lease_id"],
            "error": {"code": "invalid_input", "message": "cannot render", "retryable": False},
        }
        r = await worker.post([error, result(good_item, vector_of(good_item))])
        assert r.status_code == 200 and r.json()["accepted"] == 2
        assert (await attack).status_code == 400
        assert (await victim).status_code == 200
        await worker.http.aclose()


# --- 2. batch metadata ---------------------------------------------------------------------


def batch_line(i: int, body: dict[str, Any], url: str = "/v1/embeddings") -> str:
    return json.dumps({"custom_id": f"l{i}", "method": "POST", "url": url, "body": body})


async def post_batch(c: httpx.AsyncClient, file_id: str, **extra: Any) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    return await c.post("/v1/batches", json={**body, **extra})


async def create_batch(c: httpx.AsyncClient, lines: list[str]) -> tuple[str, str]:
    """Upload ``lines`` and start a batch on them: (file id, batch id)."""
    file_id = (await upload(c, ("\n".join(lines) + "\n").encode())).json()["id"]
    r = await post_batch(c, file_id)
    assert r.status_code == 200, r.text
    return file_id, str(r.json()["id"])


async def register(gw: Gateway) -> None:
    """Make model ``m`` known (a worker's pull that takes nothing)."""
    worker = gw.worker(worker_id="reg")
    await worker.register()
    await worker.http.aclose()


async def upload(c: httpx.AsyncClient, data: bytes, **form: str) -> httpx.Response:
    return await c.post(
        "/v1/files",
        files={"file": ("in.jsonl", io.BytesIO(data), "application/jsonl")},
        data={"purpose": "batch", **form},
    )


class Prober:
    """``/healthz`` every 5 ms from a thread of its own: the slowest answer while it ran."""

    def __init__(self, gw: Gateway):
        self.url, self.worst, self.stop = gw.url + "/healthz", 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                c.get(self.url)
                self.worst = max(self.worst, time.monotonic() - t0)
                time.sleep(0.005)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def idle_cpu(gw: Gateway, seconds: float = 3.0) -> float:
    """The gateway's CPU share over ``seconds`` (a blocking wait: call it while idle)."""
    proc = psutil.Process(gw.proc.pid)
    t0 = proc.cpu_times()
    time.sleep(seconds)
    t1 = proc.cpu_times()
    return (t1.user + t1.system - t0.user - t0.system) / seconds


def peak_rss(gw: Gateway) -> tuple[threading.Event, list[float]]:
    """Sample the gateway's RSS every 5 ms until the event is set; the samples (MB)."""
    stop, samples = threading.Event(), [gw.rss_mb()]

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                samples.append(gw.rss_mb())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    return stop, samples


async def test_batch_metadata_is_bounded_as_openais(gw):
    """Finding 2: ``metadata`` values were not length-checked: 16 batches with 2.5 MiB of
    values took the gateway from 174 to 1,403 MiB; listing them peaked at 2.7 GiB."""
    async with gw.client(ATTACKER) as c:
        file_id = (
            await upload(c, (batch_line(0, {"model": "nobody", "input": "x"}) + "\n").encode())
        ).json()["id"]
        before = gw.rss_mb()
        statuses = []
        for b in range(16):
            meta = {f"k{j}": f"{b}{j}" + "v" * (160 * 1024) for j in range(16)}
            statuses.append((await post_batch(c, file_id, metadata=meta)).status_code)
        stop, samples = peak_rss(gw)
        listed = await c.get("/v1/batches", params={"limit": 100})
        stop.set()
        after = gw.rss_mb()
        cpu = await asyncio.to_thread(idle_cpu, gw)
        edges = {}
        for name, meta in {
            "512-character value": {"k": "v" * 512},
            "513-character value": {"k": "v" * 513},
            "64-character key": {"k" * 64: "v"},
            "65-character key": {"k" * 65: "v"},
        }.items():
            r = await post_batch(c, file_id, metadata=meta)
            edges[name] = r.status_code
            if r.status_code == 400:
                assert r.json()["error"]["param"] == "metadata", r.text
    report(
        gw,
        "batch metadata",
        f"16 batches with 2.5 MiB of metadata: {sorted(set(statuses))}; gateway RSS "
        f"{before:.0f} -> {after:.0f} MB, listing peaked at {max(samples):.0f} MB; idle CPU "
        f"then {cpu:.0%}; limits {edges}",
    )
    assert set(statuses) == {400} and listed.status_code == 200
    assert after - before < 30 and max(samples) - before < 60, (before, after, max(samples))
    assert cpu < 0.05
    assert edges == {
        "512-character value": 200,
        "513-character value": 400,
        "64-character key": 200,
        "65-character key": 400,
    }


async def test_ended_batch_records_expire(gw):
    """Finding 2: no batch record was ever deleted. An ended batch's record (and its files)
    go ``--batch-retention`` after it ended."""
    async with gw.client(ATTACKER) as c:
        lines = [batch_line(0, {"model": "nobody-serves-this", "input": "x"})]
        _, batch_id = await create_batch(c, lines)

        async def status() -> int:
            return (await c.get(f"/v1/batches/{batch_id}")).status_code

        async def failed() -> bool:
            return (await c.get(f"/v1/batches/{batch_id}")).json().get("status") == "failed"

        await wait_until(failed, 10, "the batch failed")
        t0 = time.monotonic()
        gone = True
        try:
            await wait_until(lambda: status_is(status, 404), RETENTION + 8, "record expired")
        except AssertionError:
            gone = False
        listed = [b["id"] for b in (await c.get("/v1/batches")).json()["data"]]
    report(
        gw,
        "batch records",
        f"a failed batch's record {'gone' if gone else 'still kept'} "
        f"{time.monotonic() - t0:.1f} s after it failed (retention {RETENTION:g} s)",
    )
    assert gone and batch_id not in listed


async def status_is(call: Any, want: int) -> bool:
    return bool(await call() == want)


# --- 3. made-up model names ----------------------------------------------------------------


async def test_made_up_model_names_cost_nothing(gw):
    """Finding 3 (Redis store): an advert cache keyed by any client-supplied name: 20,000
    requests naming distinct 20 KB models grew RSS 74 -> 493 MiB, 20 names of 16 MB +1.16 GB,
    never released. RSS is compared between two rounds of the same attack: what a round
    leaves behind grows it again, a peak of the first round does not."""
    async with gw.client(ATTACKER) as c:
        await c.get("/v1/models")
        sem = asyncio.Semaphore(32)
        statuses: dict[str, set[int]] = {"20 KB": set(), "200 chars": set(), "16 MB": set()}
        longest = 0  # bytes of the longest error body: it must not quote a name in full

        async def one(kind: str, name: str) -> None:
            nonlocal longest
            async with sem:
                r = await c.post("/v1/embeddings", json={"model": name, "input": "x"})
                statuses[kind].add(r.status_code)
                longest = max(longest, len(r.content))

        rss = [gw.rss_mb()]
        for rnd in range(2):
            await asyncio.gather(*(one("20 KB", f"{rnd}-{i}" + "m" * 20_000) for i in range(3000)))
            rss.append(gw.rss_mb())
        await asyncio.gather(*(one("200 chars", f"{i}" + "m" * 200) for i in range(5000)))
        for rnd in range(2):
            for i in range(2):
                await one("16 MB", f"{rnd}-{i}" + "m" * 16_000_000)
            rss.append(gw.rss_mb())
    report(
        gw,
        "made-up model names",
        f"2 rounds of 3,000 x 20 KB names, 5,000 x 200 chars, 2 rounds of 2 x 16 MB: "
        f"{statuses}; gateway RSS {' -> '.join(f'{m:.0f}' for m in rss)} MB; longest error "
        f"body {longest} bytes",
    )
    assert statuses == {"20 KB": {400}, "200 chars": {404}, "16 MB": {400}}
    assert longest < 4096
    # a round of 20 KB names leaves nothing behind; 16 MB bodies raise the peak once (they
    # are read and parsed), and leave nothing either (a cache of them grew by 300 MB)
    assert rss[2] - rss[1] < 15 and rss[4] - rss[2] < 100, rss


# --- 4. connections ------------------------------------------------------------------------


def open_idle(url: str, n: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    out = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=5)
        out.append(s)
    return out


async def test_idle_connections_do_not_lock_out_requests_probes_or_workers(memory_gw):
    """Finding 4: 2,100 idle TCP connections (no credentials) made every request 503 for 10 s,
    worker pulls and ``/healthz`` included; reconnecting kept it so. Here the limit is
    --max-connections 64 and the flood 200 connections, reopened as they are closed."""
    gw = memory_gw
    stop = threading.Event()
    host, port = gw.url.removeprefix("http://").split(":")

    def flood() -> None:  # keep 200 idle connections open, reconnecting as they are cut
        held: list[socket.socket] = []
        while not stop.is_set():
            held = [s for s in held if not _closed(s)]
            while len(held) < 200 and not stop.is_set():
                with contextlib.suppress(OSError):
                    held.append(socket.create_connection((host, int(port)), timeout=5))
            time.sleep(0.05)
        for s in held:
            s.close()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    await asyncio.sleep(1.0)
    results: dict[str, list[int]] = {"healthz": [], "pull": [], "embeddings": [], "internal": []}
    # A fresh connection per request: at the limit the gateway closes the connection idle longest,
    # which may be a kept-alive one the client is about to reuse, or a fresh one whose request it
    # has not read yet when the flood's next connections arrive (it cannot tell the two kinds of
    # new connection apart before they send). A request it never read is sent once more, as a
    # client resends one the server closed the connection on without answering.
    fresh = httpx.Limits(max_keepalive_connections=0)
    cut: list[str] = []

    async def send(name: str, call: Callable[[], Awaitable[httpx.Response]]) -> None:
        for _attempt in range(2):
            try:
                results[name].append((await call()).status_code)
                return
            except (httpx.RemoteProtocolError, httpx.ReadError):
                cut.append(name)
        results[name].append(0)  # cut twice: locked out

    async with (
        gw.worker() as _worker,
        gw.client(limits=fresh) as c,
        httpx.AsyncClient(timeout=10, limits=fresh) as probe,
    ):
        for _ in range(10):
            await send("healthz", lambda: probe.get(gw.url + "/healthz"))
            await send(
                "pull",
                lambda: probe.post(
                    gw.url + "/queue/v1/pull",
                    headers={"Authorization": f"Bearer {ls.WORKER_TOKEN}"},
                    json={"worker_id": "p", "models": [ADVERT], "max_items": 1, "wait_seconds": 0},
                ),
            )
            await send(
                "embeddings",
                lambda: c.post("/v1/embeddings", json={"model": "m", "input": "hello"}),
            )
            await send("internal", lambda: probe.get(gw.internal + "/healthz"))
            await asyncio.sleep(0.2)
    stop.set()
    flooder.join(10)
    report(gw, "idle connections", f"200 idle connections, reopened: {results}; resent once: {cut}")
    for name, got in results.items():
        assert set(got) == {200}, (name, got)
    assert len(cut) <= 10  # of 40 requests: a race at the edges of the flood's bursts


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


async def test_a_client_that_never_reads_its_answer_is_cut_after_the_write_timeout(memory_gw):
    """Finding 4: no write timeout: clients that never read pinned their responses."""
    gw = memory_gw
    size = 32 * 2**20
    async with gw.client() as c:
        file_id = (await upload(c, b"0" * size)).json()["id"]
    host, port = gw.url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(
        f"GET /v1/files/{file_id}/content HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {VICTIM}\r\n\r\n".encode()
    )
    await asyncio.sleep(WRITE_TIMEOUT + 3)  # never reading
    got = 0
    s.settimeout(5)
    with contextlib.suppress(OSError):  # a reset, or a read timeout: what came is counted
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    s.close()
    report(
        gw,
        "write timeout",
        f"a {size >> 20} MB answer never read for {WRITE_TIMEOUT + 3:g} s: {got >> 10} KB "
        f"then {'the connection was closed' if got < size else 'all of it (never cut)'}",
    )
    assert got < size


# --- 5. forged results ---------------------------------------------------------------------


async def test_results_are_accepted_only_with_the_current_lease(gw):
    """Finding 5: a result was accepted from any worker for any item of its models, with any
    lease id; Redis lease ids were ``<attempt>:<worker id>``; ``prompt_tokens`` was
    unbounded (2**70 reached a client's usage)."""
    async with gw.client(VICTIM) as c:
        honest, forger = gw.worker(worker_id="honest"), gw.worker(worker_id="forger")
        await honest.register()
        call = asyncio.ensure_future(c.post("/v1/embeddings", json={"model": "m", "input": "abc"}))
        items: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not items and time.monotonic() < deadline:
            items = await honest.pull(wait=0.5, max_items=1)
        (item,) = items
        guesses = [
            "1:honest",
            "1:forger",
            "0123456789abcdef",
            item["lease_id"][:-1] + ("0" if item["lease_id"][-1] != "0" else "1"),
        ]
        forged = []
        for lease in guesses:
            fake = result({**item, "lease_id": lease}, [666.0, 6.0, 6.0, 6.0])
            forged.append((await forger.post([fake])).json())
            fake_honest = {**fake, "lease_id": lease}
            forged.append((await honest.post([fake_honest])).json())
        await asyncio.sleep(0.2)
        waiting = not call.done()
        await honest.post([result(item, vector_of(item), prompt_tokens=2**70)])
        items = []
        deadline = time.monotonic() + 10
        while not items and not call.done() and time.monotonic() < deadline:
            items = await honest.pull(wait=0.5, max_items=1)
        for i in items:  # redelivered after the rejected result
            await honest.post([result(i, vector_of(i), prompt_tokens=3)])
        r = await call
        await honest.http.aclose()
        await forger.http.aclose()
    body = r.json()
    report(
        gw,
        "forged results",
        f"{len(guesses) * 2} forged results: accepted {sum(f['accepted'] for f in forged)}; the "
        f"client got {body['data'][0]['embedding'][:2]}, usage {body['usage']['prompt_tokens']}",
    )
    assert waiting and sum(f["accepted"] for f in forged) == 0
    assert body["data"][0]["embedding"][0] == 3.0
    assert body["usage"]["prompt_tokens"] <= ADVERT["max_model_len"]


# --- 6. batch jobs vs interactive traffic ---------------------------------------------------


async def batch_status(c: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    return dict((await c.get(f"/v1/batches/{batch_id}")).json())


async def test_a_batch_never_fills_the_queue_interactive_requests_use(gw):
    """Finding 6: a batch chunk went into the model's queue whole (49,999 of 50,000 inputs):
    every other key got 429 until it drained."""
    async with gw.client(ATTACKER) as bad, gw.client(VICTIM) as good:
        await register(gw)
        inputs = [f"b{i}" for i in range(MAX_QUEUED - 10)]
        _, batch_id = await create_batch(bad, [batch_line(0, {"model": "m", "input": inputs})])
        await wait_until(
            lambda: status_is_in(bad, batch_id, "in_progress"), 10, "batch in progress"
        )
        await asyncio.sleep(1.5)  # its inputs are queued (no worker serves them yet)
        call = asyncio.ensure_future(
            good.post("/v1/embeddings", json={"model": "m", "input": [f"v{i}" for i in range(64)]})
        )
        await asyncio.sleep(0.5)
        early = call.result().status_code if call.done() else None
        async with gw.worker(max_items=256):
            r = await call
            await wait_until(
                lambda: status_is_in(bad, batch_id, "completed"), 30, "batch completed"
            )
    report(
        gw,
        "batch vs interactive",
        f"a {len(inputs)}-input batch line queued, then a 64-input interactive request: "
        f"{r.status_code} ({'refused at once' if early else 'waited for a worker'})",
    )
    assert early is None and r.status_code == 200


async def status_is_in(c: httpx.AsyncClient, batch_id: str, *statuses: str) -> bool:
    return (await batch_status(c, batch_id)).get("status") in statuses


async def test_a_batch_chunk_larger_than_the_queue_is_split_not_stuck(gw):
    """Finding 6: a 25-line file of 2,048 inputs a line never fit the queue and sat
    ``in_progress 0/25`` until expiry, holding a running slot."""
    async with gw.client(ATTACKER) as c, gw.worker(max_items=512):
        lines = [
            batch_line(i, {"model": "m", "input": [f"l{i} t{j}" for j in range(2048)]})
            for i in range(2)
        ]
        _, batch_id = await create_batch(c, lines)
        t0 = time.monotonic()
        done = True
        try:
            await wait_until(lambda: status_is_in(c, batch_id, "completed"), 60, "completed")
        except AssertionError:
            done = False
        got = await batch_status(c, batch_id)
    report(
        gw,
        "batch chunk > queue",
        f"2 lines x 2,048 inputs with --max-queued-inputs {MAX_QUEUED}: {got['status']} "
        f"{got['request_counts']} after {time.monotonic() - t0:.1f} s",
    )
    assert done and got["request_counts"]["completed"] == 2


async def test_deleting_the_input_file_of_a_running_batch_is_refused(gw):
    """Finding 6: deleting the input file of a running batch logged a traceback every ~1.2 s
    until the batch expired."""
    async with gw.client(ATTACKER) as c:
        await register(gw)
        file_id, batch_id = await create_batch(c, [batch_line(0, {"model": "m", "input": "x"})])
        await wait_until(lambda: status_is_in(c, batch_id, "in_progress"), 10, "in progress")
        tracebacks = gw.log().count("Traceback")
        deleted = await c.delete(f"/v1/files/{file_id}")
        await asyncio.sleep(3)
        new_tracebacks = gw.log().count("Traceback") - tracebacks
        await c.post(f"/v1/batches/{batch_id}/cancel")
        await wait_until(lambda: status_is_in(c, batch_id, "cancelled", "failed"), 10, "ended")
        after_end = await c.delete(f"/v1/files/{file_id}")
    report(
        gw,
        "input file of a running batch",
        f"delete: {deleted.status_code}; tracebacks logged in 3 s: {new_tracebacks}; delete "
        f"after the batch ended: {after_end.status_code}",
    )
    assert deleted.status_code == 409 and deleted.json()["error"]["code"] == "file_in_use"
    assert new_tracebacks == 0 and after_end.status_code == 200


# --- 7. unbounded stores -------------------------------------------------------------------


async def test_files_per_key_are_bounded(gw):
    """Finding 7: no count or byte quota per key for files. A key fills its quota (40 files
    here), then gets 429; another key is not affected."""
    async with gw.client(FILER) as c, gw.client(VICTIM) as other:
        kept = len((await c.get("/v1/files")).json()["data"])
        statuses = [(await upload(c, b"{}\n")).status_code for _ in range(45 - kept)]
        listed = len((await c.get("/v1/files")).json()["data"])
        victim = (await upload(other, b"{}\n")).status_code
    report(
        gw,
        "files per key",
        f"{45 - kept} uploads on top of {kept} files with a quota of 40: "
        f"{statuses.count(200)} stored, then {sorted(set(statuses[40 - kept :]))}; the key "
        f"lists {listed} files; another key's upload: {victim}",
    )
    assert statuses == [200] * (40 - kept) + [429] * 5
    assert listed == 40 and victim == 200


def live_keys(r: Any) -> int:
    """Keys alive in Redis: a SCAN skips (and removes) keys past their TTL, which ``DBSIZE``
    still counts until Redis's background expiry reaches them (with thousands expiring at
    once, seconds later on a busy host)."""
    return sum(1 for _ in r.scan_iter(count=1000))


async def test_models_no_worker_serves_are_forgotten(gw):
    """Finding 7: 2,000 distinct advertised models left 24,008 streams and 2,000 advert keys
    with no TTL; the reaper's cost grew with them (idle gateway 25-42 % CPU)."""
    models = [
        dict(ADVERT, name=f"made-up-{i}", tasks=["embed", "score", "classify"]) for i in range(2000)
    ]
    base_keys = 0
    r = redis.Redis.from_url(gw.redis_url) if gw.redis_url else None
    if r is not None:
        base_keys = live_keys(r)
    async with httpx.AsyncClient(
        base_url=gw.url + "/queue/v1",
        headers={"Authorization": f"Bearer {ls.WORKER_TOKEN}"},
        timeout=60,
    ) as w:
        statuses = set()
        for i in range(0, len(models), 50):
            got = await w.post(
                "/pull",
                json={
                    "worker_id": f"flood-{i}",
                    "models": models[i : i + 50],
                    "max_items": 1,
                    "wait_seconds": 0,
                },
            )
            statuses.add(got.status_code)
    peak_keys = r.dbsize() if r is not None else 0
    proc = psutil.Process(gw.proc.pid)
    await asyncio.sleep(ADVERT_TTL + 6)  # the models' workers and adverts are gone by now
    cpu0 = proc.cpu_times()
    await asyncio.sleep(5)
    cpu1 = proc.cpu_times()
    idle_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / 5
    left_keys = live_keys(r) if r is not None else 0
    async with gw.client() as c:
        listed = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        known = (
            await c.post("/v1/embeddings", json={"model": "made-up-7", "input": "x"})
        ).status_code
    report(
        gw,
        "made-up models",
        f"2,000 advertised models: pulls {statuses}; Redis keys {base_keys} -> {peak_keys} -> "
        f"{left_keys} after {ADVERT_TTL + 6:g} s; idle gateway CPU {idle_cpu:.0%}; a request "
        f"for one of them then: {known}",
    )
    assert statuses == {200}
    assert not [m for m in listed if m.startswith("made-up-")]
    assert known == 404 and idle_cpu < 0.05
    if r is not None:
        assert left_keys <= base_keys + 20, (base_keys, peak_keys, left_keys)


async def test_a_huge_batch_line_is_never_parsed_and_a_big_one_off_the_event_loop(gw):
    """Finding 7: a 150 MiB batch line was parsed on the event loop (``/healthz`` stalled
    222 ms). A line over --max-batch-line-bytes (8 MiB) fails the batch's validation without
    being read whole; a 3 MB line within it is parsed in a thread. A thread of the test asks
    ``/healthz`` every 5 ms meanwhile: the slowest answer stays under 100 ms."""
    async with gw.client(ATTACKER) as c, gw.worker(max_items=512):
        huge = batch_line(0, {"model": "m", "input": ["y" * 75_000] * 2000})  # 150 MB
        big = batch_line(0, {"model": "m", "input": ["z" * 1_500] * 2000})  # 3 MB
        ended, worst = [], []
        for line in (huge, big):
            file_id = (await upload(c, (line + "\n").encode())).json()["id"]
            with Prober(gw) as prober:  # from the batch's creation to its end
                batch_id = (await post_batch(c, file_id)).json()["id"]
                await wait_until(
                    lambda b=batch_id: status_is_in(c, b, "completed", "failed"), 60, "ended"
                )
            worst.append(prober.worst)
            ended.append(await batch_status(c, batch_id))
    errors = (ended[0].get("errors") or {}).get("data") or [{}]
    report(
        gw,
        "big batch lines",
        f"a 150 MB line: {ended[0]['status']} ({errors[0].get('code')}), slowest /healthz "
        f"meanwhile {worst[0] * 1000:.0f} ms; a 3 MB line of 2,000 inputs: {ended[1]['status']} "
        f"{ended[1]['request_counts']}, slowest /healthz {worst[1] * 1000:.0f} ms",
    )
    assert ended[0]["status"] == "failed" and errors[0]["code"] == "request_too_large"
    assert ended[1]["status"] == "completed" and ended[1]["request_counts"]["completed"] == 1
    assert max(worst) < 0.1, worst


# --- 8. the smaller findings -----------------------------------------------------------------


async def test_an_item_id_naming_another_redis_key_is_ignored(gw):
    """Finding 8: a scoped token posting a result for a non-queue key reached Redis as a key
    (WRONGTYPE, a plain-text 500)."""
    async with httpx.AsyncClient(
        base_url=gw.url + "/queue/v1", headers={"Authorization": f"Bearer {SCOPED}"}, timeout=10
    ) as w:
        answers = []
        named = ["1-0/1@iw:{m}:advert", "1-0/1@iw:{m}:n", "0-1/1@iw:worker:x:y", "x", "1/1@"]
        named += ["1-0/1@iw:{m}:replica:x:embed", "1-0/1@iw:s:embed:m"]  # the layout before
        for item_id in named:
            fake = {"item_id": item_id, "lease_id": "1:w", "vector_b64": "AACAPw=="}
            try:
                got = await w.post("/results", json={"worker_id": "w", "results": [fake]})
                leases = [[item_id, "1:w"]]
                rel = await w.post("/release", json={"worker_id": "w", "leases": leases})
                answers.append((got.status_code, got.headers.get("content-type"), rel.status_code))
            except httpx.HTTPError as e:  # the gateway dropped the connection
                answers.append((0, type(e).__name__, 0))
    report(gw, "item ids naming other keys", f"{answers}")
    assert set(answers) == {(200, "application/json", 200)}


async def test_errors_are_in_openais_shape_and_name_no_internals(memory_gw):
    """Finding 8: deep JSON and bad multipart answered ``{"detail": ...}``, not OpenAI's
    error shape."""
    gw = memory_gw
    async with gw.client() as c:
        deep = await post_raw(c, "/v1/embeddings", b"[" * 100_000 + b"]" * 100_000)
        bad_multipart = await c.post(
            "/v1/files",
            content=b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbat',
            headers={"Content-Type": "multipart/form-data; boundary=xx"},
        )
        unknown = await c.post("/v1/nothing-here", json={})
    shapes = {}
    for name, r in {
        "deep JSON": deep,
        "bad multipart": bad_multipart,
        "unknown route": unknown,
    }.items():
        body = r.json()
        shapes[name] = (
            r.status_code,
            sorted(body.get("error", {})) if "error" in body else sorted(body),
        )
    report(gw, "error shapes", f"{shapes}")
    want = ["code", "message", "param", "type"]
    assert shapes == {
        "deep JSON": (400, want),
        "bad multipart": (400, want),
        "unknown route": (404, want),
    }


def test_an_unreachable_redis_is_a_503_that_names_no_internals(tmp_path):
    """Finding 8: 503 bodies carried raw Redis errors (host, port, errno)."""
    port = ls.free_port()
    proc = ls.start_gateway(
        tmp_path,
        args=["--queue-url", f"redis://127.0.0.1:{port}/0", "--pickup-timeout", "1"],
    )
    try:
        r = httpx.post(
            proc.url + "/v1/embeddings",
            headers={"Authorization": f"Bearer {ls.API_KEY}"},
            json={"model": "m", "input": "x"},
            timeout=30,
        )
    finally:
        proc.stop()
    FAULT_REPORTS.append(f"[trust redis] 503 body: {r.status_code} {r.text[:200]}")
    assert r.status_code == 503
    assert str(port) not in r.text and "refused" not in r.text.lower()
    assert r.json()["error"]["code"] == "queue_unavailable"


def test_a_redis_password_on_the_command_line_is_warned_and_a_placeholder_refused(tmp_path):
    """Finding 8: ``--queue-url redis://:pw@...`` was visible in ``ps`` without a warning and
    the manifests' placeholder Redis password was accepted."""
    port = ls.free_port()
    proc = ls.start_gateway(
        tmp_path, args=["--queue-url", f"redis://:a-real-looking-secret-1234@127.0.0.1:{port}/0"]
    )
    proc.stop()
    warned = "visible to every user of this host" in proc.log_tail(200)
    placeholder = tmp_path / "redis-password"
    placeholder.write_text("REPLACE-with-a-random-redis-password\n")
    env = {**os.environ, "GATEWAY_API_KEYS": ls.API_KEY, "GATEWAY_WORKER_TOKENS": ls.WORKER_TOKEN}
    refused = []
    binary = str(Path(sys.executable).with_name("inference-gateway"))
    for args in (
        ["--queue-url", f"redis://127.0.0.1:{port}/0", "--queue-password-file", str(placeholder)],
        ["--queue-url", f"redis://:REPLACE-with-a-random-redis-password@127.0.0.1:{port}/0"],
    ):
        run = subprocess.Popen(
            [binary, "--port", str(ls.free_port()), *args],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        try:
            _, err = run.communicate(timeout=20)
        except subprocess.TimeoutExpired:  # it started serving
            run.kill()
            _, err = run.communicate()
        refused.append((run.returncode, "placeholder" in err))
    FAULT_REPORTS.append(f"[trust] Redis password: warned {warned}; placeholder runs {refused}")
    assert warned and refused == [(2, True), (2, True)]


async def test_rejected_results_are_counted(gw):
    """Finding 8: ``inference_gateway_results_rejected_total`` was documented but never
    incremented."""
    async with gw.client() as c:
        before = metric((await c.get("/metrics")).text, "inference_gateway_results_rejected_total")
        worker = gw.worker(worker_id="nan")
        await worker.register()
        call = asyncio.ensure_future(c.post("/v1/embeddings", json={"model": "m", "input": "abc"}))
        items: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while not items and time.monotonic() < deadline:
            items = await worker.pull(wait=0.5, max_items=1)
        got = (await worker.post([result(items[0], [float("nan")] * 4)])).json()
        for _ in range(20):
            items = await worker.pull(wait=0.5, max_items=1)
            if items:
                await worker.post([result(i, vector_of(i)) for i in items])
                break
        assert (await call).status_code == 200
        await worker.http.aclose()
        after = metric((await c.get("/metrics")).text, "inference_gateway_results_rejected_total")
    report(gw, "rejected results", f"a NaN vector: {got}; metric {before:g} -> {after:g}")
    assert got["rejected"] == 1 and after - before == 1
