"""Queue protocol v1 guarantees, driven over HTTP against a real gateway.

Here the test itself plays the worker with ``httpx`` (pull / results / release), which lets it
decide exactly when to answer, answer twice, or never answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from worker.protocol import decode_vector, encode_vector

pytestmark = pytest.mark.slow  # real processes on loopback

MODEL = "proto-model"
LEASE = 1.5
ADVERT = {"name": MODEL, "checkpoint_name": "proto-ckpt", "tasks": ["embed"], "max_model_len": 64}


@pytest.fixture(scope="module")
def proto_gateway(stack_dir) -> Iterator[ls.Proc]:
    proc = ls.start_gateway(
        stack_dir,
        args=[
            "--lease-seconds",
            str(LEASE),
            "--max-attempts",
            "3",
            "--pickup-timeout",
            "3",
            "--model",
            "declared-only",
        ],
    )
    yield proc
    proc.stop()


def _client(gw: ls.Proc) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gw.url, timeout=30, headers={"Authorization": f"Bearer {ls.API_KEY}"}
    )


def _worker(gw: ls.Proc) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=gw.url + "/queue/v1",
        timeout=30,
        headers={"Authorization": f"Bearer {ls.WORKER_TOKEN}"},
    )


async def _pull(
    w: httpx.AsyncClient, max_items: int = 16, wait: float = 5.0, worker_id: str = "test-worker"
) -> list[dict]:
    r = await w.post(
        "/pull",
        json={
            "worker_id": worker_id,
            "models": [ADVERT],
            "max_items": max_items,
            "wait_seconds": wait,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _ok(item: dict, vec: list[float], tokens: int = 3) -> dict:
    return {
        "item_id": item["item_id"],
        "lease_id": item["lease_id"],
        "vector_b64": encode_vector(np.array(vec, dtype=np.float32)),
        "prompt_tokens": tokens,
    }


async def _post(w: httpx.AsyncClient, results: list[dict]) -> dict:
    r = await w.post("/results", json={"worker_id": "test-worker", "results": results})
    assert r.status_code == 200, r.text
    return r.json()


async def test_long_poll_returns_empty_after_wait(proto_gateway):
    async with _worker(proto_gateway) as w:
        t0 = time.monotonic()
        assert await _pull(w, wait=1.0) == []
        assert time.monotonic() - t0 >= 0.9


async def test_pull_answers_at_once_and_results_are_idempotent(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)  # registers the model
        req = asyncio.create_task(
            c.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
        )
        t0 = time.monotonic()
        items = await _pull(w, wait=10)
        assert time.monotonic() - t0 < 2.0
        assert [i["text"] for i in items] == ["a", "b"]
        assert all(i["attempt"] == 1 and i["task"] == "embed" for i in items)
        results = [_ok(items[0], [1, 0]), _ok(items[1], [0, 1])]
        assert await _post(w, results) == {"accepted": 2, "ignored": 0}
        assert await _post(w, results) == {"accepted": 0, "ignored": 2}  # duplicate post
        body = (await req).json()
        assert [d["embedding"] for d in body["data"]] == [[1.0, 0.0], [0.0, 1.0]]
        assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


async def test_expired_lease_is_redelivered(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        req = asyncio.create_task(c.post("/v1/embeddings", json={"model": MODEL, "input": "x"}))
        first = (await _pull(w, wait=10, worker_id="dies"))[0]
        second = (await _pull(w, wait=LEASE + 3, worker_id="survives"))[0]
        assert second["item_id"] == first["item_id"]
        assert second["lease_id"] != first["lease_id"]
        assert second["attempt"] == 2
        assert (await _post(w, [_ok(second, [0.5])]))["accepted"] == 1
        assert (await _post(w, [_ok(first, [9.0])]))["ignored"] == 1  # late, harmless
        assert (await req).json()["data"][0]["embedding"] == [0.5]


async def test_item_that_never_succeeds_is_dead_lettered(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        req = asyncio.create_task(
            c.post("/v1/embeddings", json={"model": MODEL, "input": "poison"})
        )
        attempts = []
        for _ in range(3):
            attempts += [i["attempt"] for i in await _pull(w, wait=LEASE + 3)]
        r = await req
        assert attempts == [1, 2, 3]
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "max_attempts_exceeded"
        assert await _pull(w, wait=LEASE + 0.5) == []  # not cycling


async def test_retryable_error_is_retried_then_dead_lettered(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        req = asyncio.create_task(c.post("/v1/embeddings", json={"model": MODEL, "input": "flaky"}))
        for attempt in (1, 2, 3):
            (item,) = await _pull(w, wait=5)
            assert item["attempt"] == attempt
            await _post(
                w,
                [
                    {
                        "item_id": item["item_id"],
                        "lease_id": item["lease_id"],
                        "error": {"code": "internal_error", "message": "boom", "retryable": True},
                    }
                ],
            )
        r = await req
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "boom"


async def test_one_bad_item_does_not_sink_its_batch(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        bad_req = asyncio.create_task(
            c.post("/v1/embeddings", json={"model": MODEL, "input": ["ok", "bad"]})
        )
        await asyncio.sleep(0.2)
        good_req = asyncio.create_task(
            c.post("/v1/embeddings", json={"model": MODEL, "input": "fine"})
        )
        await asyncio.sleep(0.2)
        items = await _pull(w, wait=5)
        assert [i["text"] for i in items] == ["ok", "bad", "fine"]  # one batch, FIFO
        await _post(
            w,
            [
                _ok(items[0], [1.0]),
                {
                    "item_id": items[1]["item_id"],
                    "lease_id": items[1]["lease_id"],
                    "error": {
                        "code": "context_length_exceeded",
                        "message": "input has 99 tokens, more than 64",
                    },
                },
                _ok(items[2], [2.0]),
            ],
        )
        bad, good = await bad_req, await good_req
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "input[1]: input has 99 tokens, more than 64"
        assert bad.json()["error"]["code"] == "context_length_exceeded"
        assert good.status_code == 200 and good.json()["data"][0]["embedding"] == [2.0]


async def test_release_hands_items_back_at_once(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        req = asyncio.create_task(
            c.post("/v1/embeddings", json={"model": MODEL, "input": "drain me"})
        )
        (item,) = await _pull(w, wait=5, worker_id="draining")
        r = await w.post(
            "/release",
            json={"worker_id": "draining", "leases": [[item["item_id"], item["lease_id"]]]},
        )
        assert r.json() == {"released": 1}
        t0 = time.monotonic()
        (again,) = await _pull(w, wait=5, worker_id="other")
        assert time.monotonic() - t0 < 1.0  # not after the lease
        assert again["item_id"] == item["item_id"] and again["attempt"] == 1
        await _post(w, [_ok(again, [3.0])])
        assert (await req).status_code == 200


async def test_no_worker_gives_503(proto_gateway):
    async with _client(proto_gateway) as c:
        r = await c.post("/v1/embeddings", json={"model": "declared-only", "input": "x"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_worker_available"
        assert "3 s" in r.json()["error"]["message"]


async def test_scoring_request_to_embedding_model_is_400(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        r = await c.post(
            "/v1/embeddings", json={"model": MODEL, "input": "x", "return_logits": [1, 2]}
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "unsupported_task" and "embeddings" in err["message"]


async def test_models_lists_only_live_workers(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        assert MODEL in ids and "declared-only" not in ids


def test_vector_codec_roundtrip():
    v = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    assert np.array_equal(decode_vector(encode_vector(v)), v)
    with pytest.raises(ValueError):
        decode_vector("abc")


async def test_pull_size_follows_token_capacity(proto_gateway):
    async with _client(proto_gateway) as c, _worker(proto_gateway) as w:
        await _pull(w, wait=0)
        long_text = "word " * 200  # ~252 estimated tokens each
        req = asyncio.create_task(
            c.post("/v1/embeddings", json={"model": MODEL, "input": [long_text] * 6})
        )
        await asyncio.sleep(0.2)
        r = await w.post(
            "/pull",
            json={
                "worker_id": "tok",
                "models": [ADVERT],
                "max_items": 100,
                "max_tokens": 600,
                "wait_seconds": 5,
            },
        )
        first = r.json()["items"]
        assert len(first) == 2 and all(i["est_tokens"] == 252 for i in first)
        r = await w.post(
            "/pull",
            json={
                "worker_id": "tok",
                "models": [ADVERT],
                "max_items": 100,
                "max_tokens": 10,
                "wait_seconds": 5,
            },
        )
        assert len(r.json()["items"]) == 1  # at least one item, even over budget
        rest = await _pull(w, max_items=100, wait=5)
        assert len(rest) == 3
        await _post(w, [_ok(i, [1.0]) for i in first + r.json()["items"] + rest])
        assert (await req).status_code == 200
