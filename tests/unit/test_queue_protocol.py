"""Queue protocol v1 as documented in docs/queue-protocol.md, driven over HTTP against the real
gateway app in process, on both queue stores: memory (fast layer) and Redis (slow, a real
redis-server). The test plays the worker (pull / results / release), so it decides exactly when
to answer, answer twice, or never answer. On the memory store leases and worker liveness run on
a clock the test advances; on Redis (whose clock is its own) the same tests run with leases and
TTLs scaled down to a twentieth, in real time. Nothing sleeps to arrange an order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from common.protocol import encode_vector
from tests.support import FakeClock, InProcessGateway, metric, wait_until

MODEL = "proto-model"
LEASE = 10.0
ADVERT = {"name": MODEL, "checkpoint_name": "proto-ckpt", "tasks": ["embed"], "max_model_len": 64}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


#: Lease and TTL seconds on Redis, as a share of the memory store's (which advance by a clock).
REDIS_SCALE = 0.05


@pytest.fixture
async def gw(
    store_kind: str, redis_url: str | None, clock: FakeClock
) -> AsyncIterator[InProcessGateway]:
    scale = 1.0 if store_kind == "memory" else REDIS_SCALE
    async with InProcessGateway(
        clock,
        queue_url=redis_url or "memory",
        lease_seconds=LEASE * scale,
        max_attempts=3,
        pickup_timeout_seconds=0.5,
        request_timeout_seconds=2,
        worker_ttl_seconds=30 * scale,
        models=["declared-only"],
    ) as g:
        g.scale = scale
        yield g


async def elapse(gw: InProcessGateway, clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` (memory-store seconds) pass: the clock at once, or a scaled real wait."""
    if gw.scale == 1.0:
        clock.advance(seconds)
    else:
        await asyncio.sleep(seconds * gw.scale)


async def pull(
    gw: InProcessGateway,
    max_items: int = 16,
    wait: float = 5.0,
    worker_id: str = "test-worker",
    **body: Any,
) -> list[dict[str, Any]]:
    r = await gw.worker.post(
        "/pull",
        json={
            "worker_id": worker_id,
            "models": [ADVERT],
            "max_items": max_items,
            "wait_seconds": wait,
            **body,
        },
    )
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def ok(item: dict[str, Any], vec: list[float], tokens: int = 3) -> dict[str, Any]:
    return {
        "item_id": item["item_id"],
        "lease_id": item["lease_id"],
        "vector_b64": encode_vector(np.array(vec, dtype=np.float32)),
        "prompt_tokens": tokens,
    }


def error(item: dict[str, Any], code: str, message: str, retryable: bool = False) -> dict[str, Any]:
    return {
        "item_id": item["item_id"],
        "lease_id": item["lease_id"],
        "error": {"code": code, "message": message, "retryable": retryable},
    }


async def post(
    gw: InProcessGateway, results: list[dict[str, Any]], worker_id: str = "test-worker"
) -> dict[str, Any]:
    r = await gw.worker.post("/results", json={"worker_id": worker_id, "results": results})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def embed(
    gw: InProcessGateway, inputs: Any, model: str = MODEL, **extra: Any
) -> asyncio.Task[httpx.Response]:
    """A client request running in the background."""
    return asyncio.create_task(
        gw.client.post("/v1/embeddings", json={"model": model, "input": inputs, **extra})
    )


async def queued(gw: InProcessGateway, n: int) -> None:
    """Wait until ``n`` inputs of MODEL wait in the queue (its depth gauge)."""

    async def depth() -> bool:
        return metric(await gw.metrics(), "inference_gateway_queue_depth_items", model=MODEL) == n

    await wait_until(depth, what=f"queue depth {n}")


async def test_long_poll_returns_empty_after_its_wait(gw):
    t0 = time.monotonic()
    assert await pull(gw, wait=0.3) == []
    assert time.monotonic() - t0 >= 0.28  # it waited (a hang fails on the test's timeout)


async def test_pull_answers_at_once_when_work_arrives_and_results_are_idempotent(gw):
    await pull(gw, wait=0)  # registers the model
    # The longest wait allowed (60 s) is longer than the test's timeout (30 s): only a pull
    # woken by the work's arrival lets the test pass.
    waiting = asyncio.create_task(pull(gw, wait=60))
    req = embed(gw, ["a", "b"])
    items = await waiting
    assert [i["text"] for i in items] == ["a", "b"]
    assert all(i["attempt"] == 1 and i["task"] == "embed" and i["normalize"] for i in items)
    assert all(
        i["lease_seconds"] == gw.settings.lease_seconds and i["est_tokens"] == 2 for i in items
    )
    assert "token_ids" not in items[0] and "dimensions" not in items[0]  # unset: left out
    results = [ok(items[0], [1, 0]), ok(items[1], [0, 1])]
    assert await post(gw, results) == {"accepted": 2, "ignored": 0, "rejected": 0}
    assert await post(gw, results) == {
        "accepted": 0,
        "ignored": 2,
        "rejected": 0,
    }  # a duplicate post
    body = (await req).json()
    assert [d["embedding"] for d in body["data"]] == [[1.0, 0.0], [0.0, 1.0]]
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


async def test_expired_lease_is_redelivered_and_a_late_duplicate_ignored(gw, clock):
    await pull(gw, wait=0)
    before = await gw.metrics()
    req = embed(gw, "x")
    (first,) = await pull(gw, worker_id="dies")
    await elapse(gw, clock, LEASE + 0.1)
    (second,) = await pull(gw, worker_id="survives")
    assert second["item_id"] == first["item_id"] and second["lease_id"] != first["lease_id"]
    assert second["attempt"] == 2
    assert (await post(gw, [ok(second, [0.5])], "survives"))["accepted"] == 1
    assert (await post(gw, [ok(first, [9.0])], "dies"))["ignored"] == 1  # late, harmless
    assert (await req).json()["data"][0]["embedding"] == [0.5]
    after = await gw.metrics()
    for name in ("inference_gateway_leases_expired_total", "inference_gateway_redeliveries_total"):
        assert metric(after, name, model=MODEL) - metric(before, name, model=MODEL) == 1


async def test_a_result_after_its_lease_expired_is_ignored_and_the_input_redelivered(gw, clock):
    """A result counts only from the input's current lease: once it expired, the slow
    worker's answer is ignored and the input goes to the next worker."""
    await pull(gw, wait=0)
    req = embed(gw, "slow")
    (item,) = await pull(gw, worker_id="slow")
    await elapse(gw, clock, LEASE + 0.1)
    await gw.store.reap()  # the lease expires: back in the queue
    assert (await post(gw, [ok(item, [7.0])], "slow")) == {
        "accepted": 0,
        "ignored": 1,
        "rejected": 0,
    }
    (again,) = await pull(gw, worker_id="next")
    assert again["item_id"] == item["item_id"] and again["attempt"] == 2
    assert (await post(gw, [ok(again, [8.0])], "next"))["accepted"] == 1
    assert (await req).json()["data"][0]["embedding"] == [8.0]


async def test_item_that_never_succeeds_is_dead_lettered(gw, clock):
    await pull(gw, wait=0)
    before = await gw.metrics()
    req = embed(gw, "poison")
    attempts = []
    for _ in range(3):
        attempts += [i["attempt"] for i in await pull(gw)]
        await elapse(gw, clock, LEASE + 0.1)
    assert await pull(gw, wait=0) == []  # out of attempts: not cycling
    r = await req
    assert attempts == [1, 2, 3]
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "max_attempts_exceeded"
    after = await gw.metrics()
    dead = "inference_gateway_dead_letters_total"
    assert metric(after, dead, model=MODEL) - metric(before, dead, model=MODEL) == 1


async def test_retryable_errors_to_the_last_attempt_are_dead_lettered(gw):
    """Only retryable errors: answered ``max_attempts_exceeded``, the counter moves by one."""
    await pull(gw, wait=0)
    before = await gw.metrics()
    req = embed(gw, "flaky")
    for attempt in (1, 2, 3):
        (item,) = await pull(gw)
        assert item["attempt"] == attempt
        await post(gw, [error(item, "internal_error", "boom", retryable=True)])
    r = await req
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "max_attempts_exceeded" and err["type"] == "server_error"
    assert "3 times" in err["message"] and "boom" in err["message"]
    dead = "inference_gateway_dead_letters_total"
    assert metric(await gw.metrics(), dead, model=MODEL) - metric(before, dead, model=MODEL) == 1


async def test_one_bad_item_does_not_sink_its_batch(gw):
    await pull(gw, wait=0)
    bad_req = embed(gw, ["ok", "bad"])
    await queued(gw, 2)
    good_req = embed(gw, "fine")
    await queued(gw, 3)
    items = await pull(gw)
    assert [i["text"] for i in items] == ["ok", "bad", "fine"]  # one batch, FIFO
    await post(
        gw,
        [
            ok(items[0], [1.0]),
            error(items[1], "context_length_exceeded", "input has 99 tokens, more than 64"),
            ok(items[2], [2.0]),
        ],
    )
    bad, good = await bad_req, await good_req
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "input[1]: input has 99 tokens, more than 64",
        "type": "invalid_request_error",
        "param": "input",
        "code": "context_length_exceeded",
    }
    assert good.status_code == 200 and good.json()["data"][0]["embedding"] == [2.0]


async def test_release_hands_items_back_to_the_front_at_once(gw):
    await pull(gw, wait=0)
    req = embed(gw, ["drain me", "next"])
    await queued(gw, 2)
    (item,) = await pull(gw, max_items=1, worker_id="draining")
    r = await gw.worker.post(
        "/release", json={"worker_id": "draining", "leases": [[item["item_id"], item["lease_id"]]]}
    )
    assert r.json() == {"released": 1}
    again, following = await pull(gw, worker_id="other")  # at once, not after the lease
    assert again["item_id"] == item["item_id"] and again["attempt"] == 1  # not an attempt
    assert following["text"] == "next"
    await post(gw, [ok(again, [3.0]), ok(following, [4.0])], "other")
    assert (await req).status_code == 200


async def test_no_worker_gives_503_after_the_pickup_timeout(gw):
    t0 = time.monotonic()
    r = await gw.client.post("/v1/embeddings", json={"model": "declared-only", "input": "x"})
    assert time.monotonic() - t0 >= 0.45  # the pickup timeout, not the request timeout:
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_worker_available"
    assert "0.5 s" in r.json()["error"]["message"]
    assert metric(await gw.metrics(), "inference_gateway_queue_depth_items") == 0  # cancelled


async def test_taken_but_unanswered_gives_504_after_the_request_timeout(gw):
    await pull(gw, wait=0)
    t0 = time.monotonic()
    req = embed(gw, "never answered")
    (item,) = await pull(gw)
    r = await req
    assert time.monotonic() - t0 >= 1.9
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "timeout" and "2 s" in r.json()["error"]["message"]
    assert (await post(gw, [ok(item, [1.0])]))["ignored"] == 1  # gone with the request


async def test_scoring_request_to_an_embedding_model_is_400(gw):
    await pull(gw, wait=0)
    r = await gw.client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "x", "return_logits": [1, 2]}
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_task" and "supports: embeddings" in err["message"]


async def test_models_follow_the_worker_ttl(gw, clock):
    async def listed() -> dict[str, Any]:
        return {m["id"]: m for m in (await gw.client.get("/v1/models")).json()["data"]}

    assert await listed() == {}  # "declared-only" is accepted, but no worker serves it
    await pull(gw, wait=0, worker_id="w1")
    await pull(gw, wait=0, worker_id="w2")
    card = (await listed())[MODEL]
    assert card["workers"] == 2 and card["tasks"] == ["embed"] and card["max_model_len"] == 64
    assert card["object"] == "model" and card["checkpoint_name"] == "proto-ckpt"
    assert metric(await gw.metrics(), "inference_gateway_workers", model=MODEL) == 2
    await elapse(gw, clock, 20)
    await pull(gw, wait=0, worker_id="w2")
    await elapse(gw, clock, 20)  # w1 last pulled 40 s ago, w2 20 s ago (TTL 30 s)
    assert (await listed())[MODEL]["workers"] == 1
    await elapse(gw, clock, 20)
    assert await listed() == {}
    assert metric(await gw.metrics(), "inference_gateway_workers", model=MODEL) == 0


async def test_round_robin_takes_turns_within_one_pull(gw):
    other = {**ADVERT, "name": "other-model"}
    both = {"worker_id": "w", "models": [ADVERT, other], "wait_seconds": 0}
    await gw.worker.post("/pull", json={**both, "max_items": 1})
    reqs = [embed(gw, ["m1", "m2", "m3"])]
    await queued(gw, 3)
    reqs.append(embed(gw, ["o1", "o2"], model="other-model"))

    async def other_queued() -> bool:
        text = await gw.metrics()
        return metric(text, "inference_gateway_queue_depth_items", model="other-model") == 2

    await wait_until(other_queued)
    items = (await gw.worker.post("/pull", json={**both, "max_items": 4})).json()["items"]
    assert [i["text"] for i in items] == ["m1", "o1", "m2", "o2"]
    items += (await gw.worker.post("/pull", json={**both, "max_items": 4})).json()["items"]
    await post(gw, [ok(i, [1.0]) for i in items], "w")
    for req in reqs:
        assert (await req).status_code == 200


async def test_pull_size_follows_token_capacity(gw):
    await pull(gw, wait=0)
    long_text = "word " * 200  # 1000 bytes: 252 estimated tokens each
    req = embed(gw, [long_text] * 6)
    await queued(gw, 6)
    first = await pull(gw, max_items=100, max_tokens=600)
    assert len(first) == 2 and all(i["est_tokens"] == 252 for i in first)
    one = await pull(gw, max_items=100, max_tokens=10)
    assert len(one) == 1  # at least one item, even over budget
    rest = await pull(gw, max_items=100)
    assert len(rest) == 3
    await post(gw, [ok(i, [1.0]) for i in first + one + rest])
    assert (await req).status_code == 200


async def test_gateway_metrics_move_as_documented(gw):
    await pull(gw, wait=0)
    before = await gw.metrics()
    req = embed(gw, ["a", "b", "c"])
    await queued(gw, 3)
    text = await gw.metrics()
    assert (
        metric(text, "inference_gateway_items_enqueued_total", model=MODEL, task="embed")
        - metric(before, "inference_gateway_items_enqueued_total", model=MODEL, task="embed")
        == 3
    )
    items = await pull(gw, max_items=2)
    text = await gw.metrics()
    assert metric(text, "inference_gateway_queue_depth_items", model=MODEL) == 1
    assert metric(text, "inference_gateway_items_leased", model=MODEL) == 2
    assert (
        metric(text, "inference_gateway_queue_wait_seconds_count", model=MODEL)
        - metric(before, "inference_gateway_queue_wait_seconds_count", model=MODEL)
        == 2
    )
    items += await pull(gw)
    await post(gw, [ok(i, [1.0]) for i in items])
    assert (await req).status_code == 200
    bad = await gw.client.post("/v1/embeddings", json={"model": MODEL, "input": []})
    assert bad.status_code == 400
    after = await gw.metrics()
    for status, n in (("200", 1), ("400", 1)):
        labels = {"route": "/v1/embeddings", "status": status}
        assert (
            metric(after, "inference_gateway_requests_total", **labels)
            - metric(before, "inference_gateway_requests_total", **labels)
            == n
        )
    assert (
        metric(after, "inference_gateway_request_duration_seconds_count", route="/v1/embeddings")
        - metric(before, "inference_gateway_request_duration_seconds_count", route="/v1/embeddings")
        == 2
    )
    assert metric(after, "inference_gateway_items_leased", model=MODEL) == 0


async def test_a_full_queue_is_429_with_retry_after_and_nothing_of_it_queued(
    store_kind, redis_url, clock
):
    async with InProcessGateway(
        clock, queue_url=redis_url or "memory", max_queued_inputs=3, pickup_timeout_seconds=5
    ) as g:
        await g.worker.post(
            "/pull", json={"worker_id": "w", "models": [ADVERT], "max_items": 1, "wait_seconds": 0}
        )
        waiting = embed(g, ["a", "b"])
        await queued(g, 2)
        r = await g.client.post("/v1/embeddings", json={"model": MODEL, "input": ["c", "d"]})
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "5"
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert "limit is 3" in err["message"]
        await queued(g, 2)  # nothing of the refused request was queued
        text = await g.metrics()
        assert metric(text, "inference_gateway_queue_full_total", model=MODEL) >= 1
        items = (
            await g.worker.post(
                "/pull",
                json={"worker_id": "w", "models": [ADVERT], "max_items": 8, "wait_seconds": 0},
            )
        ).json()["items"]
        assert [i["text"] for i in items] == ["a", "b"]
        await g.worker.post(
            "/results", json={"worker_id": "w", "results": [ok(i, [1.0]) for i in items]}
        )
        assert (await waiting).status_code == 200


async def test_results_may_come_as_a_binary_body_which_the_gateway_offers(gw):
    """A pull answer lists the results bodies the gateway takes; the worker's queue client
    then posts the binary one (float32 values, no base64): the client gets the same vector,
    and a malformed binary body is a 400 saying what is wrong."""
    from common.protocol import ItemResult, PullRequest, WorkItem
    from common.results_body import RESULTS_BINARY
    from worker.queue_client import QueueClient

    await pull(gw, wait=0)  # registers the model before the client asks for it
    request = embed(gw, ["a", "b"])
    qc = QueueClient("http://gateway", gw.WORKER_TOKEN, transport=gw.transport, retries=0)
    sent: list[str] = []

    async def record(req: httpx.Request) -> None:
        sent.append(req.headers["content-type"])

    qc._http.event_hooks["request"].append(record)
    pulled: list[WorkItem] = []
    for _ in range(5):  # bounded: a request that failed leaves nothing to pull
        pulled += await qc.pull(
            PullRequest(worker_id="w", models=[ADVERT], max_items=8, wait_seconds=2)
        )
        if len(pulled) == 2 or request.done():
            break
    assert len(pulled) == 2, request.result().text if request.done() else pulled
    assert qc.result_encodings == ["json", "binary"]
    vectors = {"a": [0.25, -1.5, 3.0], "b": [1.0, 2.0, 0.0]}
    results = [  # as the worker makes them: no base64 until a JSON body needs it
        ItemResult.ok(i, np.array(vectors[i.text or ""]), 2, encoded=False) for i in pulled
    ]
    done = await qc.post_results("w", results)
    assert (done.accepted, done.rejected) == (2, 0)
    assert sent[-1] == RESULTS_BINARY
    assert [r.vector_b64 for r in results] == [None, None]  # the words were encoded once
    body = (await request).json()
    assert [d["embedding"] for d in body["data"]] == [vectors["a"], vectors["b"]]
    head = b'{"worker_id": "w", "results": [{"item_id": "x", "lease_id": "y", "values": 3}]}'
    bad = await gw.worker.post(
        "/results",
        content=b"IQR1" + len(head).to_bytes(4, "little") + head + b"\0" * 8,  # 2 of 3 values
        headers={"Content-Type": RESULTS_BINARY},
    )
    message = bad.json()["error"]["message"]
    assert bad.status_code == 400 and "binary results body" in message and "12" in message
    head = b'{"worker_id": "w", "results": [{'
    bad = await gw.worker.post(
        "/results",
        content=b"IQR1" + len(head).to_bytes(4, "little") + head,
        headers={"Content-Type": RESULTS_BINARY},
    )
    message = bad.json()["error"]["message"]
    assert bad.status_code == 400, bad.text
    assert message.startswith("Invalid binary results body: its header is not JSON: "), message
    await qc.aclose()


async def test_a_queue_that_does_not_offer_the_binary_body_gets_json():
    """An older queue answers pulls without ``result_encodings``: JSON results, as before,
    with the vectors a worker left unencoded as base64."""
    from common.protocol import ItemResult, ResultsRequest, SparseEmbedding, WorkItem, decode_vector
    from worker.queue_client import QueueClient

    seen: list[tuple[str, bytes]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.headers["content-type"], req.content))
        if req.url.path.endswith("/pull"):
            return httpx.Response(200, json={"items": []})
        return httpx.Response(200, json={"accepted": 1, "ignored": 0})

    qc = QueueClient("http://old-queue", "t", transport=httpx.MockTransport(handler), retries=0)
    from common.protocol import PullRequest

    await qc.pull(PullRequest(worker_id="w", models=[ADVERT], max_items=1, wait_seconds=0))
    item = WorkItem(
        item_id="i", lease_id="l", lease_seconds=30, model=MODEL, task="embed", text="t"
    )
    sparse = item.model_copy(update={"item_id": "s", "task": "embed_sparse"})
    await qc.post_results(  # as the worker makes them: base64 left to the JSON body
        "w",
        [
            ItemResult.ok(item, np.array([0.5, -2.0]), 1, encoded=False),
            ItemResult.ok(sparse, SparseEmbedding.of([7, 3], [1.5, 0.25]), 1, encoded=False),
        ],
    )
    ctype, content = seen[-1]
    assert ctype == "application/json"
    dense, weights = ResultsRequest.model_validate_json(content).results
    assert decode_vector(dense.vector_b64 or "").tolist() == [0.5, -2.0]
    assert weights.sparse().indices.tolist() == [3, 7]
    assert weights.sparse().values.tolist() == [0.25, 1.5]
    await qc.aclose()


@pytest.mark.parametrize(
    "change,field",
    [
        ({"max_items": 0}, "max_items"),
        ({"max_items": 4097}, "max_items"),
        ({"wait_seconds": -1}, "wait_seconds"),
        ({"wait_seconds": 61}, "wait_seconds"),
    ],
)
async def test_a_pull_outside_the_documented_bounds_is_refused(gw, change, field):
    """``max_items`` 1–4,096 and ``wait_seconds`` 0–60 (docs/queue-protocol.md); the bounds
    themselves are accepted."""
    body = {"worker_id": "w", "models": [ADVERT], "max_items": 1, "wait_seconds": 0, **change}
    r = await gw.worker.post("/pull", json=body)
    assert r.status_code in (400, 422), r.text
    assert field in r.text
    for edge in ({"max_items": 4096}, {"wait_seconds": 0}, {"max_items": 1}):
        ok_body = {**body, "max_items": 1, "wait_seconds": 0, **edge}
        assert (await gw.worker.post("/pull", json=ok_body)).status_code == 200


async def test_results_rejected_and_the_store_gauge_move_as_documented(gw):
    """``inference_gateway_results_rejected_total{model}`` counts a malformed result;
    ``inference_gateway_queue_store_up`` is 1 while the store answers."""
    await gw.advertise([ADVERT])  # known before the request (not by the pull racing it)
    before = await gw.metrics()
    req = embed(gw, ["a"], dimensions=2)
    (item,) = await pull(gw, max_items=1)
    await post(gw, [ok(item, [1.0, 2.0, 3.0])])  # 3 values, 2 asked for
    after = await gw.metrics()
    assert (
        metric(after, "inference_gateway_results_rejected_total", model=MODEL)
        - metric(before, "inference_gateway_results_rejected_total", model=MODEL)
        == 1
    )
    assert metric(after, "inference_gateway_queue_store_up") == 1
    (again,) = await pull(gw, max_items=1)
    await post(gw, [ok(again, [0.6, 0.8])])
    assert (await req).status_code == 200


async def test_a_binary_bodys_values_are_checked_as_jsons_are(gw):
    """The gateway checks the float32 words of a binary body as they came (no base64 round
    trip): a value that is not finite is refused and the input redelivered, the good result
    beside it is accepted."""
    from common.protocol import ItemResult, PullRequest, WorkItem
    from worker.queue_client import QueueClient

    await pull(gw, wait=0)
    request = embed(gw, ["good", "nan"])
    qc = QueueClient("http://gateway", gw.WORKER_TOKEN, transport=gw.transport, retries=0)
    pulled: list[WorkItem] = []
    for _ in range(5):
        pulled += await qc.pull(
            PullRequest(worker_id="w", models=[ADVERT], max_items=8, wait_seconds=2)
        )
        if len(pulled) == 2:
            break
    assert qc.result_encodings == ["json", "binary"]
    vectors = {"good": [1.0, 0.0], "nan": [float("nan"), 1.0]}
    done = await qc.post_results(
        "w", [ItemResult.ok(i, np.array(vectors[i.text or ""]), 2) for i in pulled]
    )
    assert (done.accepted, done.rejected) == (1, 1)
    again = await qc.pull(PullRequest(worker_id="w", models=[ADVERT], max_items=8, wait_seconds=2))
    assert [i.text for i in again] == ["nan"]  # redelivered
    done = await qc.post_results("w", [ItemResult.ok(again[0], np.array([0.5, 0.5]), 2)])
    body = (await request).json()
    assert [d["embedding"] for d in body["data"]] == [[1.0, 0.0], [0.5, 0.5]]
    await qc.aclose()
