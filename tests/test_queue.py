"""The in-memory queue's guarantees, in process (fast layer): FIFO, long polling, token-aware
pulls, round-robin, leases, redelivery, idempotent results, release, dead letter, cancellation,
timeouts and the views behind ``/metrics`` and ``/v1/models``.

Lease expiry and worker liveness read the queue's clock; these tests give it a clock they
advance (``FakeClock``), so nothing sleeps for a lease.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from gateway import metrics
from gateway.queue import NoWorker, RequestTimeout, WorkQueue
from tests.support import FakeClock, counter
from worker.protocol import ErrorCode, ItemError, ItemResult, ItemSpec, ModelAdvert, encode_vector

ADVERT = ModelAdvert(name="m", checkpoint_name="c", tasks=["embed"])


def spec(text: str, model: str = "m", **kw: object) -> ItemSpec:
    return ItemSpec(model=model, task="embed", text=text, **kw)  # type: ignore[arg-type]


def ok(item_id: str, lease_id: str, value: float = 1.0) -> ItemResult:
    return ItemResult(
        item_id=item_id,
        lease_id=lease_id,
        vector_b64=encode_vector(np.array([value], dtype=np.float32)),
        prompt_tokens=3,
    )


def failed(
    item_id: str, lease_id: str, retryable: bool, code: ErrorCode = ErrorCode.INTERNAL_ERROR
) -> ItemResult:
    return ItemResult(
        item_id=item_id,
        lease_id=lease_id,
        error=ItemError(code=code, message="boom", retryable=retryable),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(clock: FakeClock) -> WorkQueue:
    return WorkQueue(lease_seconds=10, max_attempts=3, worker_ttl_seconds=30, clock=clock)


async def test_pull_returns_waiting_items_at_once_in_fifo_order(queue):
    queue.submit([spec("a"), spec("b")])
    queue.submit([spec("c")])
    t0 = time.monotonic()
    items = await queue.pull("w", [ADVERT], max_items=10, wait_seconds=5)
    assert time.monotonic() - t0 < 0.5
    assert [i.text for i in items] == ["a", "b", "c"]
    assert all(i.attempt == 1 and i.lease_seconds == 10 and i.model == "m" for i in items)
    assert len({i.lease_id for i in items}) == 3


async def test_max_items_caps_a_pull(queue):
    queue.submit([spec(str(i)) for i in range(5)])
    first = await queue.pull("w", [ADVERT], max_items=2, wait_seconds=0)
    rest = await queue.pull("w", [ADVERT], max_items=10, wait_seconds=0)
    assert [i.text for i in first] == ["0", "1"] and [i.text for i in rest] == ["2", "3", "4"]


async def test_long_poll_returns_empty_after_its_wait(queue):
    t0 = time.monotonic()
    assert await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0.2) == []
    assert 0.18 <= time.monotonic() - t0 < 1.0


async def test_long_poll_answers_as_soon_as_work_arrives(queue):
    pull = asyncio.create_task(queue.pull("w", [ADVERT], max_items=5, wait_seconds=10))
    await asyncio.sleep(0)  # the pull is waiting
    t0 = time.monotonic()
    queue.submit([spec("late")])
    items = await pull
    assert [i.text for i in items] == ["late"]
    assert time.monotonic() - t0 < 0.5


async def test_pull_only_takes_advertised_model_and_task(queue):
    queue.submit([spec("other", model="x")])
    queue.submit([ItemSpec(model="m", task="score", text="s", return_logits=[1])])
    assert await queue.pull("w", [ADVERT], max_items=5, wait_seconds=0) == []
    scorer = ModelAdvert(name="m", checkpoint_name="c", tasks=["score"])
    assert [i.text for i in await queue.pull("w", [scorer], max_items=5, wait_seconds=0)] == ["s"]


async def test_pull_size_follows_the_token_budget(queue):
    long_text = "word " * 200  # 1000 bytes: 252 estimated tokens
    queue.submit([spec(long_text) for _ in range(6)])
    first = await queue.pull("w", [ADVERT], max_items=100, max_tokens=600, wait_seconds=0)
    assert len(first) == 2 and all(i.est_tokens == 252 for i in first)
    one = await queue.pull("w", [ADVERT], max_items=100, max_tokens=10, wait_seconds=0)
    assert len(one) == 1  # at least one item, even over budget
    assert len(await queue.pull("w", [ADVERT], max_items=100, wait_seconds=0)) == 3


async def test_round_robin_across_models(queue):
    other = ModelAdvert(name="n", checkpoint_name="c", tasks=["embed"])
    queue.submit([spec("m1"), spec("m2"), spec("m3")])
    queue.submit([spec("n1", model="n"), spec("n2", model="n")])
    items = await queue.pull("w", [ADVERT, other], max_items=4, wait_seconds=0)
    assert [i.text for i in items] == ["m1", "n1", "m2", "n2"]


async def test_results_answer_in_order_and_the_first_result_wins(queue):
    a, b = queue.submit([spec("a"), spec("b")])
    x, y = await queue.pull("w", [ADVERT], max_items=2, wait_seconds=0)
    assert queue.complete([ok(y.item_id, y.lease_id, 2.0), ok(x.item_id, x.lease_id, 1.0)]) == (
        2,
        0,
    )
    assert queue.complete([ok(x.item_id, x.lease_id, 9.0)]) == (0, 1)  # a duplicate post
    results = await queue.wait([a, b], pickup_timeout=1, request_timeout=1)
    assert [r.vector_b64 for r in results] == [
        encode_vector(np.array([1.0], np.float32)),
        encode_vector(np.array([2.0], np.float32)),
    ]
    assert queue.complete([ok("unknown", "l")]) == (0, 1)
    assert queue.depth() == {} and queue.leased() == {}


async def test_expired_lease_goes_back_to_the_front_for_another_attempt(queue, clock):
    queue.submit([spec("x"), spec("y")])
    (first,) = await queue.pull("dies", [ADVERT], max_items=1, wait_seconds=0)
    before = counter(metrics.LEASES_EXPIRED, "m")
    clock.advance(9.9)
    assert queue.reap() == 0
    clock.advance(0.2)
    assert queue.reap() == 1
    assert counter(metrics.LEASES_EXPIRED, "m") == before + 1
    again, after = await queue.pull("survives", [ADVERT], max_items=2, wait_seconds=0)
    assert again.item_id == first.item_id and again.lease_id != first.lease_id
    assert again.attempt == 2 and after.text == "y"


async def test_a_pull_reaps_expired_leases_itself(queue, clock):
    queue.submit([spec("x")])
    (first,) = await queue.pull("dies", [ADVERT], max_items=1, wait_seconds=0)
    clock.advance(11)
    (again,) = await queue.pull("other", [ADVERT], max_items=1, wait_seconds=0)
    assert again.item_id == first.item_id and again.attempt == 2


async def test_late_result_after_lease_expiry_is_accepted_while_unanswered(queue, clock):
    (item,) = queue.submit([spec("x")])
    (first,) = await queue.pull("slow", [ADVERT], max_items=1, wait_seconds=0)
    clock.advance(11)
    queue.reap()
    assert queue.complete([ok(first.item_id, first.lease_id, 5.0)]) == (1, 0)
    (result,) = await queue.wait([item], pickup_timeout=1, request_timeout=1)
    assert result.vector_b64 == encode_vector(np.array([5.0], np.float32))
    assert await queue.pull("other", [ADVERT], max_items=1, wait_seconds=0) == []  # not again


async def test_dead_letter_after_max_attempts_without_a_result(queue, clock):
    (item,) = queue.submit([spec("poison")])
    before = counter(metrics.DEAD_LETTERS, "m")
    attempts = []
    for _ in range(3):
        attempts += [
            i.attempt for i in await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0)
        ]
        clock.advance(11)
        queue.reap()
    assert attempts == [1, 2, 3]
    (result,) = await queue.wait([item], pickup_timeout=1, request_timeout=1)
    assert result.error is not None and result.error.code == ErrorCode.MAX_ATTEMPTS_EXCEEDED
    assert "3 times" in result.error.message
    assert counter(metrics.DEAD_LETTERS, "m") == before + 1
    assert await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0) == []  # not cycling


async def test_retryable_error_is_redelivered(queue):
    (item,) = queue.submit([spec("flaky")])
    (first,) = await queue.pull("w1", [ADVERT], max_items=1, wait_seconds=0)
    assert queue.complete([failed(first.item_id, first.lease_id, retryable=True)]) == (1, 0)
    (second,) = await queue.pull("w2", [ADVERT], max_items=1, wait_seconds=0)
    assert second.item_id == first.item_id and second.attempt == 2
    queue.complete([ok(second.item_id, second.lease_id)])
    (result,) = await queue.wait([item], pickup_timeout=1, request_timeout=1)
    assert result.error is None


async def test_a_client_error_answers_the_item_at_once(queue):
    (item,) = queue.submit([spec("too long")])
    (leased,) = await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0)
    queue.complete(
        [
            failed(
                leased.item_id,
                leased.lease_id,
                retryable=False,
                code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            )
        ]
    )
    (result,) = await queue.wait([item], pickup_timeout=1, request_timeout=1)
    assert result.error is not None and result.error.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0) == []


async def test_release_hands_back_to_the_front_without_counting_an_attempt(queue):
    queue.submit([spec("x"), spec("y")])
    (x,) = await queue.pull("draining", [ADVERT], max_items=1, wait_seconds=0)
    assert queue.release([(x.item_id, "not-the-lease"), ("unknown", "l")]) == 0
    assert queue.release([(x.item_id, x.lease_id)]) == 1
    assert queue.release([(x.item_id, x.lease_id)]) == 0  # no longer leased
    again, y = await queue.pull("other", [ADVERT], max_items=2, wait_seconds=0)
    assert again.item_id == x.item_id and again.attempt == 1 and y.text == "y"


async def test_no_worker_within_the_pickup_timeout(queue):
    items = queue.submit([spec("a"), spec("b")])
    with pytest.raises(NoWorker):
        await queue.wait(items, pickup_timeout=0.05, request_timeout=5)
    assert queue.depth() == {}  # cancelled: nothing lingers
    assert await queue.pull("w", [ADVERT], max_items=5, wait_seconds=0) == []


async def test_taken_but_unanswered_within_the_request_timeout(queue):
    items = queue.submit([spec("a")])
    await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout):
        await queue.wait(items, pickup_timeout=0.05, request_timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 1.0
    assert queue.leased() == {}


async def test_cancelled_items_are_never_handed_out(queue):
    a, _ = queue.submit([spec("a"), spec("b")])
    queue.cancel([a])
    assert queue.depth() == {"m": 1}
    assert [i.text for i in await queue.pull("w", [ADVERT], max_items=5, wait_seconds=0)] == ["b"]


async def test_depth_and_leased_per_model(queue):
    queue.submit([spec("a"), spec("b"), spec("c")])
    queue.submit([spec("n", model="n")])
    await queue.pull("w", [ADVERT], max_items=1, wait_seconds=0)
    assert queue.depth() == {"m": 2, "n": 1}
    assert queue.leased() == {"m": 1}


async def test_workers_and_adverts_follow_the_ttl(queue, clock):
    assert queue.available_models() == {} and queue.advert("m") is None
    await queue.pull("w1", [ADVERT], max_items=1, wait_seconds=0)
    await queue.pull("w2", [ADVERT], max_items=1, wait_seconds=0)
    models = queue.available_models()
    assert models["m"][1] == 2 and models["m"][0].checkpoint_name == "c"
    clock.advance(29)
    newer = ModelAdvert(name="m", checkpoint_name="c2", tasks=["embed"])
    await queue.pull("w2", [newer], max_items=1, wait_seconds=0)
    clock.advance(2)  # w1 last seen 31 s ago, w2 2 s ago
    assert queue.available_models()["m"][1] == 1
    assert queue.advert("m") == newer
    clock.advance(60)
    assert queue.available_models() == {}
    assert queue.advert("m") == newer  # the last advert is kept for validation


async def test_a_worker_in_a_long_poll_stays_live(queue, clock):
    pull = asyncio.create_task(queue.pull("polling", [ADVERT], max_items=1, wait_seconds=10))
    await asyncio.sleep(0)
    clock.advance(100)
    assert queue.available_models()["m"][1] == 1
    queue.submit([spec("x")])
    await pull
