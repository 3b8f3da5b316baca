"""The worker's pull -> infer -> post loop, in process (fast layer): a real gateway app (queue,
client API, worker API) reached over ``httpx.ASGITransport``, and a FAKE engine
(``tests.support.FakeEngine``) in place of vLLM, in the manner of arq's in-process worker
fixture. No subprocess, no network, no model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.support import FakeEngine, FaultyTransport, counter, wait_until, worker_config
from worker import metrics
from worker.adverts import model_adverts
from worker.config import Config
from worker.health import Health
from worker.loop import Worker
from worker.queue_client import QueueClient

API_KEY = "client-key-for-tests"
MODEL = "fake"


@pytest.fixture
async def gateway() -> AsyncIterator[FastAPI]:
    settings = GatewaySettings(
        api_keys=[API_KEY],
        worker_tokens=["worker-token-for-tests"],
        lease_seconds=2,
        pickup_timeout_seconds=10,
        request_timeout_seconds=30,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(gateway: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    ) as c:
        yield c


@dataclass
class Running:
    worker: Worker
    engine: FakeEngine
    transport: FaultyTransport
    task: asyncio.Task[int]

    async def stopped(self, timeout: float = 10) -> int:
        self.worker.stop()
        return await asyncio.wait_for(self.task, timeout)


class FakeFacts:
    """The engine facts the adverts need (the fake engine has no tokenizer)."""

    max_model_len = 128
    vocab_size = 1000
    score_type = "causal-lm"
    num_labels = 1

    def token_id(self, token: str) -> int:
        raise ValueError("no tokenizer")


@pytest.fixture
async def start_worker(gateway: FastAPI) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """``await start_worker(**queue_settings)``: a Worker on a FakeEngine, running as a task;
    returns once the gateway knows its model (unless ``registered=False``)."""
    started: list[Running] = []

    async def start(
        engine: FakeEngine | None = None,
        drain_timeout: float = 5,
        registered: bool = True,
        **queue: Any,
    ) -> Running:
        cfg = Config.model_validate(
            {**worker_config(**queue), "drain_timeout_seconds": drain_timeout}
        )
        transport = FaultyTransport(httpx.ASGITransport(app=gateway))
        qc = QueueClient(
            cfg.queue.url,
            "worker-token-for-tests",
            retries=2,
            timeout_seconds=10,
            backoff_initial=0.01,
            backoff_max=0.02,
            transport=transport,
        )
        engine = engine or FakeEngine()
        health = Health()
        health.engine_started(engine)
        worker = Worker(cfg, engine, qc, model_adverts(cfg, FakeFacts()), health)
        running = Running(worker, engine, transport, asyncio.create_task(worker.run()))
        started.append(running)
        if registered:
            await wait_until(lambda: _advertised(gateway))
        return running

    yield start
    for r in started:
        if not r.task.done():
            r.worker.stop()
        await asyncio.wait_for(asyncio.gather(r.task, return_exceptions=True), 30)
        await r.worker.client.aclose()


async def embed(client: httpx.AsyncClient, texts: list[str]) -> httpx.Response:
    return await client.post("/v1/embeddings", json={"model": MODEL, "input": texts})


async def _advertised(gateway: FastAPI) -> bool:
    return await gateway.state.store.advert(MODEL) is not None


def vectors(r: httpx.Response) -> list[list[float]]:
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


async def test_inputs_flow_through_the_queue_and_back(client, start_worker):
    w = await start_worker()
    before = counter(metrics.ITEMS_COMPLETED, MODEL, "embed")
    r = await embed(client, ["a b", "hello there world", "x"])
    assert vectors(r) == [[3.0, 2.0], [17.0, 3.0], [1.0, 1.0]]
    assert r.json()["usage"]["prompt_tokens"] == 3 + 17 + 1  # the prompt lengths
    assert counter(metrics.ITEMS_COMPLETED, MODEL, "embed") == before + 3
    assert w.engine.prepared_batches[0] == 3  # one prepare call for the pulled batch
    assert w.worker.health.ready()
    assert await w.stopped() == 0


async def test_a_bad_input_fails_alone(client, start_worker):
    w = await start_worker()
    before = counter(metrics.ITEMS_FAILED, MODEL, "embed", "context_length_exceeded")
    bad, good = await asyncio.gather(embed(client, ["fine", "invalid:long"]), embed(client, ["ok"]))
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "input[1]: input has 999 tokens"
    assert bad.json()["error"]["code"] == "context_length_exceeded"
    assert vectors(good) == [[2.0, 1.0]]
    assert counter(metrics.ITEMS_FAILED, MODEL, "embed", "context_length_exceeded") == before + 1
    assert await w.stopped() == 0


async def test_an_input_whose_prompt_fails_is_answered_without_running(client, start_worker):
    w = await start_worker()
    r = await embed(client, ["bad-prompt:x", "fine"])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_prompt_template"
    assert [t for t, _ in w.engine.runs] == ["fine"]


async def test_an_unexpected_error_is_retried_on_a_later_delivery(client, start_worker):
    w = await start_worker()
    r = await embed(client, ["crash-once:x y"])
    assert vectors(r) == [[14.0, 2.0]]
    assert w.engine.runs == [("crash-once:x y", 1), ("crash-once:x y", 2)]


async def test_an_unexpected_error_every_time_ends_in_the_dead_letter(client, start_worker, caplog):
    w = await start_worker()
    r = await embed(client, ["crash:always"])
    # retryable each time (another delivery may succeed), then the dead letter quoting it
    assert w.engine.runs == [("crash:always", 1), ("crash:always", 2), ("crash:always", 3)]
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "max_attempts_exceeded"
    assert "the last attempt failed: RuntimeError: injected crash" in error["message"]
    logged = [rec for rec in caplog.records if rec.getMessage().endswith("failed unexpectedly")]
    assert len(logged) == 3  # with the traceback, at ERROR
    assert all(rec.exc_info is not None and rec.levelname == "ERROR" for rec in logged)


async def test_items_in_flight_stay_within_capacity(client, start_worker):
    w = await start_worker(max_items_in_flight=4)
    r = await embed(client, ["slow:0.02:" + str(i) for i in range(24)])
    assert len(vectors(r)) == 24
    assert w.engine.peak_running == 4
    assert w.worker.in_flight == 0


async def test_estimated_tokens_in_flight_stay_within_capacity(client, start_worker):
    w = await start_worker(max_tokens_in_flight=60)
    text = "slow:0.02:" + "w" * 90  # 100 bytes: 27 estimated tokens
    r = await embed(client, [text] * 10)
    assert len(vectors(r)) == 10
    # Two items fit; a pull with any room left still takes one item (the queue always hands
    # out at least one), so the bound is the capacity plus one item, not all ten (270).
    assert 54 <= w.engine.peak_tokens <= 60 + 27


async def test_with_items_in_flight_a_pull_waits_for_an_engine_steps_worth_of_tokens(
    client, start_worker
):
    """Inputs that finish one at a time do not bring pulls of one input each: with work in
    flight, the worker pulls again once ``max_num_batched_tokens`` (here 100) are free."""
    engine = FakeEngine(max_num_batched_tokens=100)
    w = await start_worker(engine=engine, max_tokens_in_flight=200)
    texts = [f"slow:{0.02 * (i % 7 + 1):.2f}:{i}".ljust(100, "w") for i in range(21)]  # 27 tokens
    r = await embed(client, texts)
    assert len(vectors(r)) == 21
    assert w.worker.min_pull_tokens == 100
    # The first pull takes 7 inputs (189 tokens); each later one had >= 100 tokens of room.
    assert engine.prepared_batches[0] == 7
    assert all(n >= 3 for n in engine.prepared_batches[1:-1]), engine.prepared_batches


async def test_while_interactive_inputs_flow_batch_inputs_are_held_and_admitted_few_at_a_time(
    client, gateway, start_worker
):
    """After an interactive input (and for ``interactive_quiet_seconds``), every pull asks for
    at most ``32 - held`` batch inputs, and batch inputs enter the engine only
    ``batch_tokens_beside_interactive`` estimated tokens at a time (here: one at a time)."""
    engine = FakeEngine()
    w = await start_worker(
        engine=engine, interactive_quiet_seconds=60, batch_tokens_beside_interactive=1
    )
    assert len(vectors(await embed(client, ["an interactive input"]))) == 1
    assert w.worker.batch_gate.busy
    pulls_before = len(w.transport.pulls)
    from common.protocol import ItemSpec

    store = gateway.state.store
    batch = await store.submit(
        [
            ItemSpec(model=MODEL, task="embed", text=f"slow:0.01:line {i}", priority=1)
            for i in range(40)
        ]
    )
    results = await store.wait(batch, pickup_timeout=10, request_timeout=30)
    assert all(r.error is None for r in results) and len(results) == 40
    assert engine.peak_batch_running == 1
    asked = [p["max_batch_items"] for p in w.transport.pulls[pulls_before:]]
    assert asked and all(a is not None and 0 <= a <= 32 for a in asked), asked
    assert min(asked) < 32  # some pulls were made while batch inputs were held


async def test_stop_drains_in_flight_items_then_exits_0(client, start_worker):
    w = await start_worker()
    request = asyncio.create_task(embed(client, ["slow:0.3:a", "slow:0.3:b"]))
    await wait_until(lambda: w.engine.running == 2)
    t0 = time.monotonic()
    assert await w.stopped() == 0
    assert time.monotonic() - t0 >= 0.2  # it waited for them
    assert len(vectors(await request)) == 2


async def test_drain_timeout_releases_unfinished_items_to_another_worker(
    client, start_worker, gateway, caplog
):
    first = await start_worker(drain_timeout=0.1)
    request = asyncio.create_task(embed(client, ["slow:30:stuck"]))
    await wait_until(lambda: first.engine.running == 1)
    assert await first.stopped() == 0
    assert not request.done()  # stopped without waiting for the 30 s item
    assert _logged(caplog, "worker.loop") == [
        ("INFO", "stopping: no more pulls; draining 1 in-flight items"),
        ("WARNING", "drain timeout: 1 items unfinished"),
        ("INFO", "released 1 unfinished items back to the queue"),
        ("INFO", "drained; exit code 0"),
    ]
    store = gateway.state.store
    assert await store.depth() == {MODEL: 1} and await store.leased() == {}  # released, not leased
    second = await start_worker(engine=FakeEngine())
    second.engine.run = harmless(second.engine)  # type: ignore[method-assign]
    assert len(vectors(await request)) == 1
    assert second.engine.runs == [("fast:stuck", 1)]  # the release counted no attempt


def _logged(caplog: Any, logger: str) -> list[tuple[str, str]]:
    """(level, message) of ``logger``'s records, in order."""
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == logger]


async def test_a_release_that_fails_is_logged_and_the_lease_runs_out(
    client, start_worker, gateway, caplog
):
    first = await start_worker(drain_timeout=0.1)
    request = asyncio.create_task(embed(client, ["slow:30:stuck"]))
    await wait_until(lambda: first.engine.running == 1)
    first.transport.fail["/queue/v1/release"] = 10  # the client's retries and more
    assert await first.stopped() == 0
    released = [m for lvl, m in _logged(caplog, "worker.loop") if m.startswith("release failed")]
    assert len(released) == 1 and released[0].endswith("; 1 items return after their lease")
    assert "injected: queue unreachable" in released[0]
    assert await gateway.state.store.leased() == {MODEL: 1}  # still leased: not released
    request.cancel()


async def test_a_refused_pull_is_an_error_a_failed_one_a_warning(start_worker, caplog):
    w = await start_worker(registered=False)
    w.transport.fail["/queue/v1/pull"] = 3
    await wait_until(lambda: w.transport.calls.get("/queue/v1/pull", 0) >= 4)
    failed = [(lvl, m) for lvl, m in _logged(caplog, "worker.loop") if "pull failed" in m]
    assert failed and failed[0][0] == "WARNING"
    assert (
        failed[0][1].startswith("pull failed: ") and "injected: queue unreachable" in failed[0][1]
    )
    assert failed[0][1].endswith(" s") and "; next try in 0." in failed[0][1]
    caplog.clear()
    w.transport.status, w.transport.fail["/queue/v1/pull"] = 401, 1
    await wait_until(lambda: any("pull failed" in m for _, m in _logged(caplog, "worker.loop")))
    assert [lvl for lvl, m in _logged(caplog, "worker.loop") if "pull failed" in m] == ["ERROR"]
    assert not w.worker.health.ready()


def harmless(engine: FakeEngine) -> Any:
    """The engine's run with ``slow:<s>:x`` and ``die:x`` inputs run as a plain ``fast:x``."""
    original = engine.run

    async def run(item: Any, prompt: Any) -> Any:
        text = item.text or ""
        if text.startswith(("slow:", "die:")):
            item = item.model_copy(update={"text": "fast:" + text.rsplit(":", 1)[1]})
        return await original(item, prompt)

    return run


async def test_engine_death_exits_1_and_releases_with_the_attempt_counted(client, start_worker):
    first = await start_worker()
    request = asyncio.create_task(embed(client, ["die:now", "slow:0.5:bystander"]))
    assert await asyncio.wait_for(first.task, 10) == 1
    assert not first.worker.health.alive()
    second = await start_worker(engine=FakeEngine())
    second.engine.run = harmless(second.engine)  # type: ignore[method-assign]
    assert len(vectors(await request)) == 2
    # Released at once, and the death counted as an attempt of both (the queue cannot know
    # which input killed the engine; one that kills every engine ends in the dead letter).
    assert sorted(second.engine.runs) == [("fast:bystander", 2), ("fast:now", 2)]


async def test_engine_death_is_logged_once_with_its_cause(client, start_worker, caplog):
    w = await start_worker()
    request = asyncio.create_task(embed(client, ["die:one", "die:two"]))
    assert await asyncio.wait_for(w.task, 10) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["vLLM engine failed (injected engine death); stopping"]
    request.cancel()  # its inputs wait for another worker


async def test_an_unexpected_error_from_a_dead_engine_is_engine_death(client, start_worker, caplog):
    engine = FakeEngine()

    async def dies_oddly(item: Any, prompt: Any) -> Any:
        engine.alive = False
        raise OSError("pipe closed")

    engine.run = dies_oddly  # type: ignore[method-assign]
    w = await start_worker(engine=engine)
    request = asyncio.create_task(embed(client, ["a", "b"]))
    assert await asyncio.wait_for(w.task, 10) == 1
    assert not w.worker.health.alive()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["vLLM engine failed (OSError: pipe closed); stopping"]
    request.cancel()  # its inputs wait for another worker


async def test_an_engine_that_dies_idle_is_noticed(start_worker, caplog):
    w = await start_worker()
    await wait_until(w.worker.health.ready)
    w.engine.alive = False
    assert await asyncio.wait_for(w.task, 5) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["vLLM engine failed (the engine is no longer alive); stopping"]


async def test_queue_unreachable_then_back(client, start_worker, gateway):
    engine = FakeEngine()
    w = await start_worker(engine=engine, registered=False)
    w.transport.fail["/queue/v1/pull"] = 3  # the client's 2 retries, then the loop backs off
    await wait_until(lambda: w.transport.calls.get("/queue/v1/pull", 0) >= 3)
    assert not w.worker.health.ready() and w.worker.health.alive()
    await wait_until(lambda: _advertised(gateway))  # after its backoff
    assert vectors(await embed(client, ["back"])) == [[4.0, 1.0]]
    assert w.worker.health.ready()


async def test_results_whose_post_fails_are_posted_again(client, start_worker):
    w = await start_worker()
    w.transport.status = 503
    w.transport.fail["/queue/v1/results"] = 3  # more than the client's 2 retries
    r = await embed(client, ["posted twice"])
    assert vectors(r) == [[12.0, 2.0]]
    assert w.transport.calls["/queue/v1/results"] == 4
    assert w.worker.in_flight == 0


async def test_worker_metrics_move_as_documented(client, start_worker):
    def read() -> dict[str, float]:
        return {
            "pulled": counter(metrics.ITEMS_PULLED, MODEL, "embed"),
            "completed": counter(metrics.ITEMS_COMPLETED, MODEL, "embed"),
            "failed": counter(metrics.ITEMS_FAILED, MODEL, "embed", "context_length_exceeded"),
            "tokens": counter(metrics.PROMPT_TOKENS, MODEL, "embed"),
            "batches": metrics.PULL_BATCH_SIZE._sum.get(),
            "durations": sum(
                b.get() for b in metrics.ITEM_DURATION.labels(MODEL, "embed")._buckets
            ),
            "retries": counter(metrics.QUEUE_RETRIES, "pull"),
            "errors": counter(metrics.QUEUE_ERRORS, "pull", "ConnectError"),
        }

    def seconds() -> tuple[float, float]:
        """Sums of the pull and item durations, seconds."""
        return (
            metrics.PULL_DURATION._sum.get(),
            metrics.ITEM_DURATION.labels(MODEL, "embed")._sum.get(),
        )

    w = await start_worker(registered=False)
    w.transport.fail["/queue/v1/pull"] = 3  # 2 retries, then one failed pull
    before, t0, secs0 = read(), time.monotonic(), seconds()
    await wait_until(w.worker.health.ready)
    r = await embed(client, ["a b", "cc", "invalid:x"])
    assert r.status_code == 400
    await wait_until(lambda: w.worker.in_flight == 0)
    after, elapsed, secs1 = read(), time.monotonic() - t0, seconds()
    # durations are elapsed times: positive, within the test's own
    assert all(0 < b - a <= elapsed * 3 for a, b in zip(secs0, secs1, strict=True))
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {
        "pulled": 3,
        "completed": 2,
        "failed": 1,
        "tokens": 3 + 2,
        "batches": 3,
        "durations": 3,
        "retries": 2,
        "errors": 1,
    }
    assert metrics.ITEMS_IN_FLIGHT._value.get() == 0
    assert metrics.QUEUE_REACHABLE._value.get() == 1


async def test_results_ready_together_go_in_one_post(client, start_worker):
    """The worker posts whatever results are ready in one call, not one call per item."""
    w = await start_worker()
    before = w.transport.calls.get("/queue/v1/results", 0)
    r = await embed(client, [f"sentence {i}" for i in range(16)])  # one pull (capacity 16)
    assert len(vectors(r)) == 16
    posts = w.transport.calls.get("/queue/v1/results", 0) - before
    assert 1 <= posts <= 2, posts
