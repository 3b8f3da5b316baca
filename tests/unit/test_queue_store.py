"""The queue store's guarantees, in process, against both backends: the memory store (fast
layer; time passes by a clock the test advances) and the Redis store on a real redis-server
(slow; sub-second leases in real time). FIFO, long polling, token-aware pulls, round-robin,
leases, redelivery, idempotent results, release, dead letter, cancellation, timeouts, the
bounded queue, malformed results, and the views behind ``/metrics`` and ``/v1/models``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from common.protocol import (
    BATCH_PRIORITY,
    ErrorCode,
    ItemError,
    ItemResult,
    ItemSpec,
    ModelAdvert,
    encode_vector,
)
from gateway import metrics
from gateway.queue.store import NoWorker, QueueFull, QueueStore, RequestTimeout
from tests.support import FakeClock, age, counter, make_store, pull_waiting, wait_until

LEASE = 0.5
#: A deadline for what must happen at once (or after a short wait): far above any delay of a
#: loaded machine, far below the long polls' 60 s, so a test fails only if the store waited.
DEADLINE = 20
TTL = 1.0
ADVERT = ModelAdvert(name="m", checkpoint_name="c", tasks=["embed"])


def spec(text: str, model: str = "m", **kw: Any) -> ItemSpec:
    return ItemSpec(model=model, task="embed", text=text, **kw)


def ok(item: Any, value: float = 1.0) -> ItemResult:
    return ItemResult(
        item_id=item.item_id,
        lease_id=item.lease_id,
        prompt_tokens=3,
        vector_b64=encode_vector(np.array([value], dtype=np.float32)),
    )


def failed(item: Any, retryable: bool, code: ErrorCode = ErrorCode.INTERNAL_ERROR) -> ItemResult:
    return ItemResult(
        item_id=item.item_id,
        lease_id=item.lease_id,
        error=ItemError(code=code, message="boom", retryable=retryable),
    )


def value(result: ItemResult) -> float:
    assert result.error is None and result.vector_b64 is not None
    return float(np.frombuffer(__import__("base64").b64decode(result.vector_b64), "<f4")[0])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


#: The lease of a test marked ``lease``: it holds leases while it checks counts, and no
#: stall of a busy host (the Redis store's leases run in real time) may reap them meanwhile.
HELD = 60


@pytest.fixture
async def store(
    store_kind: str, redis_url: str | None, clock: FakeClock, request: pytest.FixtureRequest
) -> AsyncIterator[QueueStore]:
    marker = request.node.get_closest_marker("lease")
    s = make_store(
        store_kind,
        redis_url,
        clock,
        lease_seconds=marker.args[0] if marker else LEASE,
        max_attempts=3,
        worker_ttl_seconds=TTL,
        max_queued=20,
    )
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def later(store_kind: str, clock: FakeClock, seconds: float) -> None:
    await age(store_kind, clock, seconds)


async def pull(
    store: QueueStore,
    n: int = 10,
    wait: float = 0,
    worker: str = "w",
    adverts: list[ModelAdvert] | None = None,
    **kw: Any,
) -> list[Any]:
    return await store.pull(worker, adverts or [ADVERT], max_items=n, wait_seconds=wait, **kw)


async def test_pull_returns_waiting_items_at_once_in_fifo_order(store):
    await store.submit([spec("a"), spec("b")])
    await store.submit([spec("c")])
    # at once: long before the long poll's 60 s
    items = await asyncio.wait_for(pull(store, wait=60), DEADLINE)
    assert [i.text for i in items] == ["a", "b", "c"]
    assert all(i.attempt == 1 and i.lease_seconds == LEASE and i.model == "m" for i in items)
    assert len({i.item_id for i in items}) == 3 and all(i.lease_id for i in items)


async def test_a_tokenize_items_tokens_and_a_decode_items_text_reach_the_client(store):
    """The ``tokenize`` task through the store: its results carry tokens or a text, not a
    vector (on Redis: the item ids of its streams are known, its results checked and kept)."""
    from common.protocol import Token

    tokenizing = ModelAdvert(name="m", checkpoint_name="c", tasks=["embed", "tokenize"])
    request = await store.submit(
        [
            ItemSpec(model="m", task="tokenize", text="ab"),
            ItemSpec(model="m", task="tokenize", token_ids=[7]),
        ]
    )
    text, ids = await pull(store, n=2, adverts=[tokenizing])
    assert (text.task, text.text, ids.token_ids) == ("tokenize", "ab", [7])
    tokens = [Token(id=3, text="ab", special=False, start=0, stop=2)]
    done = [
        ItemResult(item_id=text.item_id, lease_id=text.lease_id, tokens=tokens),
        ItemResult(item_id=ids.item_id, lease_id=ids.lease_id, text="ab"),
    ]
    assert (await store.complete("w", done)).accepted == 2
    first, second = await store.wait(request, pickup_timeout=DEADLINE, request_timeout=DEADLINE)
    assert first.tokens == tokens and second.text == "ab" and first.vector_b64 is None


def test_a_store_made_without_settings_has_the_gateways_defaults(store_kind, redis_url, clock):
    """One set of defaults: a store built without them leases, retries and keeps workers as
    the gateway's settings (``--lease-seconds``, ``--max-attempts``, ``--worker-ttl``) say."""
    from gateway.settings import GatewaySettings

    made = make_store(store_kind, redis_url, clock)
    fields = GatewaySettings.model_fields
    assert made.lease_seconds == fields["lease_seconds"].default
    assert made.max_attempts == fields["max_attempts"].default
    assert made.worker_ttl == fields["worker_ttl_seconds"].default


async def test_max_items_caps_a_pull(store):
    await store.submit([spec(str(i)) for i in range(5)])
    first = await pull(store, n=2)
    rest = await pull(store, n=10)
    assert [i.text for i in first] == ["0", "1"] and [i.text for i in rest] == ["2", "3", "4"]


async def test_long_poll_returns_empty_after_its_wait(store):
    t0 = time.monotonic()
    assert await asyncio.wait_for(pull(store, n=1, wait=0.3), DEADLINE) == []
    assert time.monotonic() - t0 >= 0.28


async def test_long_poll_answers_as_soon_as_work_arrives(store):
    await pull(store, n=1)  # the model's queue exists
    waiting = asyncio.create_task(pull(store, n=5, wait=60))
    await wait_until(lambda: pull_waiting(store), what="the pull waiting")
    await store.submit([spec("late")])
    items = await asyncio.wait_for(waiting, DEADLINE)  # long before the long poll's 60 s
    assert [i.text for i in items] == ["late"]


async def test_pull_only_takes_advertised_model_and_task(store):
    await store.submit([spec("other", model="x")])
    await store.submit([ItemSpec(model="m", task="score", text="s", return_logits=[1])])
    assert await pull(store) == []
    scorer = ModelAdvert(name="m", checkpoint_name="c", tasks=["score"])
    assert [i.text for i in await pull(store, adverts=[scorer])] == ["s"]


async def test_pull_size_follows_the_token_budget(store):
    long_text = "word " * 200  # 1000 bytes: 252 estimated tokens
    await store.submit([spec(long_text) for _ in range(6)])
    first = await pull(store, n=100, max_tokens=600)
    assert len(first) == 2 and all(i.est_tokens == 252 for i in first)
    one = await pull(store, n=100, max_tokens=10)
    assert len(one) == 1  # at least one item, even over budget
    rest = await pull(store, n=100)
    assert len(rest) == 3
    assert all(i.attempt == 1 for i in rest)  # the one that did not fit spent no attempt


async def test_entries_past_the_token_budget_stay_first_in_line(store):
    # Five one-input requests (five stream entries on Redis, read together by one pull):
    # those past the budget go back in their order, first in line, with no attempt spent.
    long_text = "word " * 200  # 252 estimated tokens
    for i in range(5):
        await store.submit([spec(f"{i} {long_text}")])
    await store.submit([spec("later")])
    first = await pull(store, n=100, max_tokens=600)
    assert [i.text.split()[0] for i in first] == ["0", "1"]
    rest = await pull(store, n=100)
    assert [i.text.split()[0] for i in rest] == ["2", "3", "4", "later"]
    assert all(i.attempt == 1 for i in first + rest)


async def test_entries_past_the_pull_size_stay_first_in_line(store):
    # Requests of 1, 8, 1 and 1 inputs: a pull of 10 takes the first three whole; the last
    # (read together with them on Redis) stays first in line, no attempt spent.
    await store.submit([spec("a")])
    await store.submit([spec(f"m{i}") for i in range(8)])
    await store.submit([spec("b")])
    await store.submit([spec("c")])
    first = await pull(store, n=10)
    assert [i.text for i in first] == ["a", *[f"m{i}" for i in range(8)], "b"]
    await store.submit([spec("d")])
    rest = await pull(store, n=10)
    assert [i.text for i in rest] == ["c", "d"]
    assert all(i.attempt == 1 for i in first + rest)


async def test_round_robin_across_models(store):
    other = ModelAdvert(name="n", checkpoint_name="c", tasks=["embed"])
    await store.submit([spec("m1"), spec("m2"), spec("m3")])
    await store.submit([spec("n1", model="n"), spec("n2", model="n")])
    items = await pull(store, n=4, adverts=[ADVERT, other])
    assert [i.text for i in items] == ["m1", "n1", "m2", "n2"]


@pytest.mark.lease(HELD)
async def test_results_answer_in_order_and_the_first_result_wins(store):
    request = await store.submit([spec("a"), spec("b")])
    x, y = await pull(store, n=2)
    done = await store.complete("w", [ok(y, 2.0), ok(x, 1.0)])
    assert (done.accepted, done.ignored, done.rejected) == (2, 0, 0)
    again = await store.complete("w", [ok(x, 9.0)])  # a duplicate post
    assert (again.accepted, again.ignored) == (0, 1)
    results = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert [value(r) for r in results] == [1.0, 2.0]
    assert await store.depth() == {} and await store.leased() == {}


async def test_expired_lease_goes_back_to_the_front_for_another_attempt(store, store_kind, clock):
    await store.submit([spec("x"), spec("y")])
    (first,) = await pull(store, n=1, worker="dies")
    before = counter(metrics.LEASES_EXPIRED, "m")
    await later(store_kind, clock, LEASE + 0.2)
    await store.reap()
    assert counter(metrics.LEASES_EXPIRED, "m") == before + 1
    assert await store.depth() == {"m": 2} and await store.leased() == {}
    again, after = await pull(store, n=2, worker="survives")
    assert again.item_id == first.item_id and again.lease_id != first.lease_id
    assert again.attempt == 2 and after.text == "y"


async def test_a_pull_takes_expired_leases_itself(store, store_kind, clock):
    await store.submit([spec("x")])
    (first,) = await pull(store, n=1, worker="dies")
    await later(store_kind, clock, LEASE + 0.2)
    (again,) = await pull(store, n=1, worker="other")
    assert again.item_id == first.item_id and again.attempt == 2


async def test_a_result_after_its_lease_expired_is_ignored(store, store_kind, clock):
    """Only the current lease answers: the slow worker's late result is ignored and the
    input is handed to the next worker, whose answer the client gets."""
    request = await store.submit([spec("x")])
    (first,) = await pull(store, n=1, worker="slow")
    await later(store_kind, clock, LEASE + 0.2)
    await store.reap()
    assert (await store.complete("slow", [ok(first, 5.0)])).ignored == 1
    (again,) = await pull(store, n=1, worker="other")
    assert again.item_id == first.item_id and again.attempt == 2
    assert (await store.complete("other", [ok(again, 6.0)])).accepted == 1
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert value(result) == 6.0


async def test_a_retryable_error_from_a_lease_no_longer_current_is_ignored(
    store, store_kind, clock
):
    request = await store.submit([spec("x")])
    (first,) = await pull(store, n=1, worker="slow")
    await later(store_kind, clock, LEASE + 0.2)
    (second,) = await pull(store, n=1, worker="other")
    late = await store.complete("slow", [failed(first, retryable=True)])
    assert (late.accepted, late.ignored) == (0, 1)
    assert await pull(store, n=1, worker="third") == []  # still leased to "other", not requeued
    await store.complete("other", [ok(second, 4.0)])
    assert value((await store.wait(request, pickup_timeout=1, request_timeout=5))[0]) == 4.0


async def test_dead_letter_after_max_attempts_without_a_result(store, store_kind, clock):
    request = await store.submit([spec("poison")])
    before = counter(metrics.DEAD_LETTERS, "m")
    attempts = []
    for _ in range(3):
        attempts += [i.attempt for i in await pull(store, n=1)]
        await later(store_kind, clock, LEASE + 0.2)
        await store.reap()
    assert attempts == [1, 2, 3]
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.error is not None and result.error.code == ErrorCode.MAX_ATTEMPTS_EXCEEDED
    assert result.error.message == (
        "the input was delivered to workers 3 times without a result; giving up"
    )
    assert result.lease_id == ""
    assert counter(metrics.DEAD_LETTERS, "m") == before + 1
    assert await pull(store, n=1) == []  # not cycling


async def test_retryable_error_is_redelivered(store):
    request = await store.submit([spec("flaky")])
    (first,) = await pull(store, n=1, worker="w1")
    assert (await store.complete("w1", [failed(first, retryable=True)])).accepted == 1
    (second,) = await pull(store, n=1, worker="w2")
    assert second.item_id == first.item_id and second.attempt == 2
    await store.complete("w2", [ok(second)])
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.error is None


async def test_retryable_errors_to_the_last_attempt_are_dead_lettered(store):
    """docs/queue-protocol.md: only retryable errors: ``max_attempts_exceeded`` (quoting the
    last error), and the dead-letter counter moves by one."""
    request = await store.submit([spec("flaky")])
    before = counter(metrics.DEAD_LETTERS, "m")
    for attempt in (1, 2, 3):
        (leased,) = await pull(store, n=1)
        assert leased.attempt == attempt
        await store.complete("w", [failed(leased, retryable=True)])
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.error is not None and result.error.code == ErrorCode.MAX_ATTEMPTS_EXCEEDED
    assert result.error.message == (
        "the input was delivered to workers 3 times without a result "
        "(the last attempt failed: boom); giving up"
    )
    assert counter(metrics.DEAD_LETTERS, "m") == before + 1
    assert await pull(store, n=1) == []


async def test_a_client_error_answers_the_item_at_once(store):
    request = await store.submit([spec("too long")])
    (leased,) = await pull(store, n=1)
    await store.complete(
        "w", [failed(leased, retryable=False, code=ErrorCode.CONTEXT_LENGTH_EXCEEDED)]
    )
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.error is not None and result.error.code == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert await pull(store, n=1) == []


MALFORMED = [
    ("AAA", "not base64 of whole float32"),
    (encode_vector(np.array([1.0, np.nan], np.float32)), "not finite"),
    (encode_vector(np.array([1.0, 2.0, 3.0], np.float32)), "3 values, 2 were asked for"),
    (encode_vector(np.array([1.0], np.float32)), "1 values, 2 were asked for"),
]


@pytest.mark.parametrize("vector,want", MALFORMED)
async def test_a_malformed_result_is_rejected_and_the_item_retried(store, vector, want):
    request = await store.submit([spec("x", dimensions=2)])
    (first,) = await pull(store, n=1, worker="bad")
    bad = ItemResult(item_id=first.item_id, lease_id=first.lease_id, vector_b64=vector)
    done = await store.complete("bad", [bad])
    assert (done.accepted, done.rejected) == (0, 1)
    (second,) = await pull(store, n=1, worker="good")
    assert second.item_id == first.item_id and second.attempt == 2
    good = encode_vector(np.array([0.6, 0.8], np.float32))
    await store.complete(
        "good", [ItemResult(item_id=second.item_id, lease_id=second.lease_id, vector_b64=good)]
    )
    assert (await store.wait(request, pickup_timeout=1, request_timeout=5))[0].vector_b64 == good


@pytest.mark.parametrize("vector,want", MALFORMED)
async def test_a_result_malformed_on_every_attempt_tells_the_client_why(store, vector, want):
    request = await store.submit([spec("x", dimensions=2)])
    for attempt in (1, 2, 3):  # max_attempts
        (item,) = await pull(store, n=1, worker=f"bad-{attempt}")
        assert item.attempt == attempt
        bad = ItemResult(item_id=item.item_id, lease_id=item.lease_id, vector_b64=vector)
        assert (await store.complete(f"bad-{attempt}", [bad])).rejected == 1
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.error is not None and result.vector_b64 is None
    assert result.error.code == ErrorCode.MAX_ATTEMPTS_EXCEEDED
    assert "the last attempt failed: the worker sent a bad result: " in result.error.message
    assert want in result.error.message


async def test_release_hands_back_to_the_front_without_counting_an_attempt(store):
    await store.submit([spec("x"), spec("y")])
    (x,) = await pull(store, n=1, worker="draining")
    assert await store.release("draining", [(x.item_id, "not-the-lease")]) == 0
    assert await store.release("someone-else", [(x.item_id, x.lease_id)]) == 0
    assert await store.release("draining", [(x.item_id, x.lease_id)]) == 1
    assert await store.release("draining", [(x.item_id, x.lease_id)]) == 0  # no longer leased
    no_lease = failed(x, retryable=True).model_copy(update={"lease_id": ""})
    assert (await store.complete("draining", [no_lease])).ignored == 1  # waiting, not leased
    again, y = await pull(store, n=2, worker="other")
    assert again.item_id == x.item_id and again.attempt == 1 and y.text == "y"
    assert await store.release("other", [(i.item_id, i.lease_id) for i in (again, y)]) == 2
    assert sorted((i.text, i.attempt) for i in await pull(store, n=2)) == [("x", 1), ("y", 1)]


async def test_a_dying_workers_release_counts_the_attempt(store):
    """An input that kills every engine it reaches is dead-lettered, not cycled forever."""
    request = await store.submit([spec("poison")])
    for attempt in (1, 2, 3):
        (leased,) = await pull(store, n=1)
        assert leased.attempt == attempt
        assert (
            await store.release("w", [(leased.item_id, leased.lease_id)], count_attempt=True) == 1
        )
    assert await pull(store, n=1) == []
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.error is not None and result.error.code == ErrorCode.MAX_ATTEMPTS_EXCEEDED


async def test_no_worker_within_the_pickup_timeout(store):
    request = await store.submit([spec("a"), spec("b")])
    with pytest.raises(NoWorker):
        await store.wait(request, pickup_timeout=0.1, request_timeout=5)
    assert await store.depth() == {}  # cancelled: left the queue at once
    assert await pull(store, n=5) == []


async def test_no_worker_only_when_none_of_the_inputs_was_taken(store):
    """A request being worked on waits for its other inputs past the pickup timeout."""
    request = await store.submit([spec("a"), spec("b"), spec("c")])
    (first,) = await pull(store, n=1, worker="slow")
    waiting = asyncio.create_task(store.wait(request, pickup_timeout=0.1, request_timeout=5))
    await asyncio.sleep(0.3)  # past the pickup timeout: "b" and "c" are still untaken
    assert not waiting.done()
    await store.complete("slow", [ok(first)])
    rest = await pull(store, n=5, worker="slow")
    await store.complete("slow", [ok(i) for i in rest])
    assert [r.error for r in await waiting] == [None, None, None]


@pytest.mark.lease(HELD)
async def test_taken_but_unanswered_within_the_request_timeout(store):
    request = await store.submit([spec("a")])
    await pull(store, n=1)
    t0 = time.monotonic()
    with pytest.raises(RequestTimeout):  # the request timeout counts from the start
        await asyncio.wait_for(
            store.wait(request, pickup_timeout=0.2, request_timeout=0.3), DEADLINE
        )
    assert time.monotonic() - t0 >= 0.25
    assert await store.leased() == {}


@pytest.mark.lease(HELD)
async def test_cancelled_inputs_leave_the_queue_at_once(store):
    first = await store.submit([spec("a"), spec("b")])
    await store.submit([spec("c")])
    await store.cancel(first)
    assert await store.depth() == {"m": 1}
    assert [i.text for i in await pull(store, n=5)] == ["c"]


async def test_a_cancelled_wait_cancels_the_inputs(store):
    """A client that goes away: its wait is cancelled, its inputs leave the queue."""
    request = await store.submit([spec("a"), spec("b")])
    waiting = asyncio.create_task(store.wait(request, pickup_timeout=30, request_timeout=30))
    await asyncio.sleep(0)  # one turn of the loop: the wait has begun
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await store.depth() == {}


async def test_the_queue_is_bounded(store):
    await store.submit([spec(str(i)) for i in range(15)])
    with pytest.raises(QueueFull) as e:
        await store.submit([spec(str(i)) for i in range(6)])  # 15 + 6 > 20
    assert (e.value.model, e.value.queued, e.value.limit) == ("m", 15, 20)
    assert str(e.value) == "15 inputs wait for 'm' (limit 20)"
    assert await store.depth() == {"m": 15}  # nothing of it was queued
    await store.submit([spec(str(i)) for i in range(5)])  # 20 is still fine
    items = await pull(store, n=10)
    assert await store.depth() == {"m": 10}
    with pytest.raises(QueueFull):  # leased inputs count: they are not answered yet
        await store.submit([spec("x")])
    await store.complete("w", [ok(i) for i in items])
    await store.submit([spec(str(i)) for i in range(10)])  # answered ones do not


async def test_inputs_back_in_line_count_once_toward_the_bound(store, store_kind, clock):
    """Leased inputs that go back to the line (released, failed retryably, lease expired)
    count once, as waiting again; answered ones stop counting."""
    await store.submit([spec(str(i)) for i in range(20)])  # full: 20 of 20
    items = await pull(store, n=10)
    assert len(items) == 10
    await store.release("w", [(i.item_id, i.lease_id) for i in items[:5]])
    await store.complete("w", [failed(i, retryable=True) for i in items[5:7]])
    await age(store_kind, clock, LEASE * 1.5)  # the last 3 leases expire
    await store.reap()
    with pytest.raises(QueueFull) as e:  # all 20 wait again: nothing counted twice or lost
        await store.submit([spec("x")])
    assert e.value.queued == 20
    again = await pull(store, n=20)
    assert len(again) == 20
    await store.complete("w", [ok(i) for i in again])
    await store.submit([spec(str(i)) for i in range(20)])  # none of them counts now


async def test_concurrent_submits_are_each_whole_and_bounded_one_by_one(store):
    """Requests submitted at once (the Redis store sends them in one call): each answered with
    its own inputs in its own order; over the limit, exactly the requests that do not fit fail
    and leave nothing queued."""
    got = await asyncio.gather(
        *(store.submit([spec(f"{10 * i + j}") for j in range(3)]) for i in range(8)),
        return_exceptions=True,
    )
    full = [g for g in got if isinstance(g, QueueFull)]
    requests = [g for g in got if not isinstance(g, BaseException)]
    assert (len(requests), len(full)) == (6, 2)  # 6 x 3 = 18 <= 20; a 7th would make 21
    assert await store.depth() == {"m": 18}
    items = await pull(store, n=20)
    assert len(items) == 18
    await store.complete("w", [ok(i, value=float(i.text)) for i in items])
    answers = [
        [value(r) for r in await store.wait(q, pickup_timeout=5, request_timeout=5)]
        for q in requests
    ]
    firsts = sorted(a[0] for a in answers)
    assert all(a == [a[0], a[0] + 1, a[0] + 2] for a in answers), answers
    assert len(set(firsts)) == 6 and all(f % 10 == 0 for f in firsts)


@pytest.mark.lease(HELD)
async def test_depth_and_leased_per_model(store):
    await store.submit([spec("a"), spec("b"), spec("c")])
    await store.submit([spec("n", model="n")])
    await pull(store, n=1)
    assert await store.depth() == {"m": 2, "n": 1}
    assert await store.leased() == {"m": 1}
    # per model: its tasks' queues add up
    await store.submit([ItemSpec(model="m", task="score", text="s", return_logits=[1])])
    assert await store.depth() == {"m": 3, "n": 1}


@pytest.mark.lease(HELD)
async def test_cancel_ends_the_unanswered_inputs_and_can_be_repeated(store):
    request = await store.submit([spec("a"), spec("b"), spec("c")])
    (a,) = await pull(store, n=1)
    await store.complete("w", [ok(a)])
    (b,) = await pull(store, n=1)  # leased while the client goes away
    await store.cancel(request)
    await store.cancel(request)  # again: nothing left to do, no error
    assert request.futures[0].done() and not request.futures[0].cancelled()
    assert all(f.cancelled() for f in request.futures[1:])
    assert await store.depth() == {} and await store.leased() == {}
    assert (await store.complete("w", [ok(b)])).ignored == 1  # its late result goes nowhere


@pytest.mark.lease(HELD)
async def test_one_requests_inputs_split_across_workers_answer_in_order(store):
    """A request's inputs can be leased to several workers (the Redis store keeps up to 32 of
    them in one stream entry and splits it when a pull has less room)."""
    request = await store.submit([spec(str(i)) for i in range(20)])
    a = await pull(store, n=5, worker="a")
    b = await pull(store, n=100, worker="b")
    assert [i.text for i in a + b] == [str(i) for i in range(20)]
    assert await store.leased() == {"m": 20} and await store.depth() == {}
    await store.complete("b", [ok(i, float(i.text)) for i in b[::-1]])
    assert await store.leased() == {"m": 5}
    await store.complete("a", [ok(i, float(i.text)) for i in a])
    results = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert [value(r) for r in results] == [float(i) for i in range(20)]
    assert await store.depth() == {} and await store.leased() == {}


@pytest.mark.lease(HELD)
async def test_only_the_failed_input_of_a_pull_is_redelivered(store):
    request = await store.submit([spec("a"), spec("b"), spec("c")])
    a, b, c = await pull(store, n=3, worker="w1")
    done = await store.complete("w1", [ok(a, 1.0), failed(b, retryable=True), ok(c, 3.0)])
    assert done.accepted == 3
    assert await store.depth() == {"m": 1} and await store.leased() == {}
    (again,) = await pull(store, n=3, worker="w2")
    assert (again.text, again.attempt) == ("b", 2)
    late = await store.complete("w1", [ok(b, 9.0)])  # the old lease no longer answers
    assert (late.accepted, late.ignored) == (0, 1)
    assert (await store.complete("w2", [ok(again, 2.0)])).accepted == 1
    results = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert [value(r) for r in results] == [1.0, 2.0, 3.0]


async def test_an_expired_lease_redelivers_only_the_unanswered_inputs(store, store_kind, clock):
    request = await store.submit([spec(t) for t in "abcd"])
    a, _, c, _ = await pull(store, n=4, worker="dies")
    await store.complete("dies", [ok(a, 1.0), ok(c, 3.0)])
    await later(store_kind, clock, LEASE + 0.2)
    again = await pull(store, n=10, worker="other")
    assert [(i.text, i.attempt) for i in again] == [("b", 2), ("d", 2)]
    await store.complete("other", [ok(again[0], 2.0), ok(again[1], 4.0)])
    results = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert [value(r) for r in results] == [1.0, 2.0, 3.0, 4.0]


async def test_a_partly_answered_pull_released_hands_back_the_rest(store):
    request = await store.submit([spec(t) for t in "abc"])
    a, b, c = await pull(store, n=3, worker="draining")
    await store.complete("draining", [ok(a, 1.0)])
    leases = [(i.item_id, i.lease_id) for i in (a, b, c)]
    assert await store.release("draining", leases) == 2  # a is answered already
    again = await pull(store, n=10, worker="other")
    assert [(i.text, i.attempt) for i in again] == [("b", 1), ("c", 1)]
    await store.complete("other", [ok(i, 7.0) for i in again])
    results = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert [value(r) for r in results] == [1.0, 7.0, 7.0]


async def test_a_pull_out_of_attempts_dead_letters_each_unanswered_input(store, store_kind, clock):
    request = await store.submit([spec(t) for t in "abc"])
    before = counter(metrics.DEAD_LETTERS, "m")
    for attempt in (1, 2, 3):
        items = await pull(store, n=3)
        assert [i.attempt for i in items] == [attempt] * (3 if attempt < 3 else 2)
        if attempt == 2:
            await store.complete("w", [ok(items[0], 1.0)])
        await later(store_kind, clock, LEASE + 0.2)
        await store.reap()
    results = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert value(results[0]) == 1.0
    assert all(r.error is not None and r.error.code == "max_attempts_exceeded" for r in results[1:])
    assert counter(metrics.DEAD_LETTERS, "m") == before + 2
    assert await store.depth() == {} and await store.leased() == {}


@pytest.mark.lease(HELD)
async def test_cancel_takes_out_inputs_split_off_a_pull(store):
    request = await store.submit([spec(str(i)) for i in range(10)])
    (first,) = await pull(store, n=1)
    assert await store.depth() == {"m": 9}
    await store.cancel(request)
    assert await store.depth() == {} and await store.leased() == {}
    assert await pull(store, n=10) == []
    assert (await store.complete("w", [ok(first)])).ignored == 1


@pytest.mark.lease(HELD)
async def test_batch_inputs_get_only_the_room_interactive_ones_leave(store):
    await store.submit([spec("b1", priority=BATCH_PRIORITY), spec("b2", priority=BATCH_PRIORITY)])
    await store.submit([spec("i1")])
    assert [i.text for i in await pull(store, n=2)] == ["i1", "b1"]
    await store.submit([spec("i2")])
    assert [i.text for i in await pull(store, n=1)] == ["i2"]  # ahead of the waiting b2
    (b2,) = await pull(store, n=5)
    assert (b2.text, b2.priority) == ("b2", BATCH_PRIORITY)
    assert await store.depth() == {} and await store.leased() == {"m": 4}


async def test_a_pull_takes_at_most_max_batch_items_batch_inputs(store):
    await store.submit([spec(f"b{i}", priority=BATCH_PRIORITY) for i in range(4)])
    await store.submit([spec("i1"), spec("i2")])
    got = await pull(store, n=10, max_batch_items=1)
    assert [i.text for i in got] == ["i1", "i2", "b0"]
    assert await pull(store, n=10, max_batch_items=0) == []
    waiting = asyncio.create_task(pull(store, n=10, wait=60, max_batch_items=0))
    await wait_until(lambda: pull_waiting(store), what="the pull waiting")
    assert not waiting.done()  # a long poll for interactive work only
    await store.submit([spec("i3")])
    assert [i.text for i in await waiting] == ["i3"]
    assert [i.text for i in await pull(store, n=10)] == ["b1", "b2", "b3"]


async def test_a_line_first_made_by_a_pull_is_counted_and_reaped(store, store_kind, clock):
    """A worker pulls before any client submits (the usual order): the model's line is then
    counted in depth / leased and its expired leases are reaped by the store itself."""
    assert await pull(store, n=1) == []
    await store.submit([spec("a"), spec("b"), spec("c")])
    await pull(store, n=2, worker="dies")
    assert await store.depth() == {"m": 1} and await store.leased() == {"m": 2}
    before = counter(metrics.LEASES_EXPIRED, "m")
    await later(store_kind, clock, LEASE + 0.2)
    await store.reap()
    assert counter(metrics.LEASES_EXPIRED, "m") == before + 2
    assert await store.depth() == {"m": 3} and await store.leased() == {}


async def test_workers_and_adverts_follow_the_ttl(store, store_kind, clock):
    assert await store.available_models() == {} and await store.advert("m") is None
    await pull(store, n=1, worker="w1")
    await pull(store, n=1, worker="w2")
    models = await store.available_models()
    assert models["m"][1] == 2 and models["m"][0].checkpoint_name == "c"
    await later(store_kind, clock, TTL * 0.6)
    newer = ModelAdvert(name="m", checkpoint_name="c2", tasks=["embed"])
    await pull(store, n=1, worker="w2", adverts=[newer])
    await later(store_kind, clock, TTL * 0.6)  # w1 last seen 1.2 TTL ago, w2 0.6
    assert (await store.available_models())["m"][1] == 1
    if store_kind == "redis":
        await asyncio.sleep(1.1)  # the advert cache of a replica lives a second
    assert await store.advert("m") == newer
    await later(store_kind, clock, TTL * 1.5)
    assert await store.available_models() == {}
    assert await store.advert("m") == newer  # the last advert is kept for validation


async def test_a_model_served_with_different_tasks_lists_every_task(store):
    await pull(store, n=1, worker="w1", adverts=[ADVERT])  # tasks ["embed"]
    both = ADVERT.model_copy(update={"tasks": ["embed", "score"]})
    await pull(store, n=1, worker="w2", adverts=[both])
    advert, workers = (await store.available_models())["m"]
    assert workers == 2 and advert.tasks == ["embed", "score"]


async def test_a_worker_in_a_long_poll_stays_live(store, store_kind, clock):
    waiting = asyncio.create_task(pull(store, n=1, wait=60, worker="polling"))
    await wait_until(lambda: pull_waiting(store), what="the pull waiting")
    await later(store_kind, clock, TTL * 2)
    assert (await store.available_models())["m"][1] == 1
    await store.submit([spec("x")])
    assert len(await waiting) == 1


def test_redis_entries_carry_each_inputs_spec_index_and_tokens_whole():
    """The Redis store's entry lists (no server): a request cut into entries by inputs and
    estimated tokens, read back input by input — texts with newlines, commas and non-ASCII
    included — and a part of an entry read by its input numbers."""
    from gateway.queue.redis.entries import INPUTS_PER_ENTRY, TOKENS_PER_ENTRY, Input, cut, inputs

    specs = [spec(f"line {i}\nnext, ünïcode", dimensions=i + 1) for i in range(70)]
    specs.insert(40, spec("word " * 4000))  # over TOKENS_PER_ENTRY alone: an entry of its own
    entries = cut(specs)
    assert [e.inputs for e in entries] == [INPUTS_PER_ENTRY, 8, 1, 30]
    assert all(e.tokens <= TOKENS_PER_ENTRY or e.inputs == 1 for e in entries)
    got: list[Input] = []
    for e in entries:
        read = inputs("iw:s:embed:m", "1-0", b"", e.k.encode(), e.x.encode(), e.s.encode())
        assert len(read) == e.inputs and sum(i.est_tokens for i in read) == e.tokens
        got += read
    assert [int(i.index) for i in got] == list(range(71))
    assert [ItemSpec.model_validate_json(i.spec) for i in got] == specs
    assert [i.est_tokens for i in got] == [s.estimate_tokens() for s in specs]
    assert got[1].item_id == "1-0/2@iw:s:embed:m"
    part = inputs("iw:f:embed:m", "2-0", b"2,5", b"7,9", b"11,14", b"{}\n[]")
    assert part == [
        Input("2-0/2@iw:f:embed:m", 7, "11", b"{}"),
        Input("2-0/5@iw:f:embed:m", 9, "14", b"[]"),
    ]


def test_redis_entries_are_cut_at_exactly_their_token_and_input_budgets():
    """Token ids estimate exactly: inputs filling an entry's token budget to the token stay
    together, one more token starts an entry; an input alone over the budget is one entry."""
    from gateway.queue.redis.entries import INPUTS_PER_ENTRY, TOKENS_PER_ENTRY, cut

    def ids(n: int) -> ItemSpec:
        return ItemSpec(model="m", task="embed", token_ids=[1] * n)

    half = TOKENS_PER_ENTRY // 2
    assert [e.inputs for e in cut([ids(half), ids(half)])] == [2]  # exactly the budget
    assert [e.tokens for e in cut([ids(half), ids(half + 1)])] == [half, half + 1]
    assert [e.inputs for e in cut([ids(TOKENS_PER_ENTRY + 5), ids(1)])] == [1, 1]
    assert [e.inputs for e in cut([ids(1)] * (INPUTS_PER_ENTRY + 1))] == [INPUTS_PER_ENTRY, 1]


async def test_a_worker_is_listed_for_exactly_the_worker_ttl(clock):
    """Memory store: the TTL boundary on its clock (Redis' key TTL is Redis' own)."""
    from gateway.queue.memory import MemoryStore

    store = MemoryStore(clock=clock, lease_seconds=LEASE, worker_ttl_seconds=TTL)
    await store.start()
    try:
        await pull(store, n=1, worker="w1")
        clock.advance(TTL)
        assert (await store.available_models())["m"][1] == 1
        clock.advance(0.001)
        assert await store.available_models() == {}
    finally:
        await store.close()


async def test_a_store_that_cannot_tell_whether_inputs_were_taken_keeps_waiting(clock):
    """FAKE fault: a memory store whose ``any_taken`` raises StoreUnavailable, as the Redis
    store's does while Redis is down. The request is not failed as "no worker" (503) at the
    pickup timeout; it waits to the request timeout."""
    from gateway.queue.memory import MemoryStore
    from gateway.queue.store import StoreUnavailable

    class Unreachable(MemoryStore):
        async def any_taken(self, request: Any) -> bool:
            raise StoreUnavailable("Redis: injected")

    store = Unreachable(lease_seconds=LEASE)
    await store.start()
    try:
        request = await store.submit([spec("a")])
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await store.wait(request, pickup_timeout=0.05, request_timeout=0.3)
        assert time.monotonic() - t0 >= 0.25
    finally:
        await store.close()


B64 = encode_vector  # numpy float32 -> base64, the wire's own codec


@pytest.mark.parametrize(
    "vector,task,want",
    [
        (None, "embed", "a result without a vector or an error"),
        ("", "embed", "the vector is not base64 of whole float32 values"),
        ("AAA", "embed", "the vector is not base64 of whole float32 values"),
        ("AACAPw=*", "embed", "the vector is not base64 of whole float32 values"),  # not base64
        ("AACA", "embed", "the vector is not base64 of whole float32 values"),  # 3 bytes
        (
            B64(np.array([1, np.inf], np.float32)),
            "embed",
            "the vector has values that are not finite",
        ),
        (
            B64(np.array([1, 2, 3], np.float32)),
            "embed",
            "the vector has 3 values, 2 were asked for",
        ),
        (
            B64(np.array([1, 2, 3], np.float32)),
            "score",
            "the vector has 3 values, 2 were asked for",
        ),
        (B64(np.array([0.6, 0.8], np.float32)), "embed", None),
        (B64(np.array([0.1, 0.9], np.float32)), "score", None),
    ],
)
def test_check_result_says_what_is_wrong_with_a_result(vector, task, want):
    from gateway.queue.store import check_result

    kw = {"dimensions": 2} if task == "embed" else {"return_logits": [5, 7]}
    item_spec = ItemSpec(model="m", task=task, text="x", **kw)
    result = ItemResult(item_id="i", lease_id="1:w", vector_b64=vector)
    checked = check_result(result, item_spec)
    if want is None:
        assert checked is result
        return
    assert checked.error is not None and checked.vector_b64 is None
    assert checked.error.code == ErrorCode.INTERNAL_ERROR and checked.error.retryable
    assert checked.error.message == f"the worker sent a bad result: {want}"
    assert (checked.item_id, checked.lease_id) == ("i", "1:w")


async def test_the_memory_stores_reaper_expires_leases_by_itself(clock):
    """No pull and no explicit reap: the store's own task hands an expired lease back."""
    from gateway.queue.memory import MemoryStore

    store = MemoryStore(clock=clock, lease_seconds=0.2)
    await store.start()
    try:
        before = counter(metrics.LEASES_EXPIRED, "m")
        await store.submit([spec("a")])
        await pull(store, n=1)
        clock.advance(0.3)
        await wait_until(lambda: counter(metrics.LEASES_EXPIRED, "m") == before + 1, timeout=2)
        assert await store.depth() == {"m": 1} and await store.leased() == {}
    finally:
        await store.close()
    assert store._reaper is not None and store._reaper.done()


# --- the trust boundary (docs/security.md) --------------------------------------------------


async def test_a_lease_lasts_exactly_lease_seconds(clock):
    """A lease is the worker's until ``lease_seconds`` after the pull, and not an instant longer:
    at the deadline itself it has expired (memory store, whose clock the test sets)."""
    from gateway.queue.memory import MemoryStore

    store = MemoryStore(clock=clock, lease_seconds=LEASE)
    await store.submit([spec("a")])
    (first,) = await pull(store, n=1, worker="slow")
    clock.advance(LEASE / 2)
    await store.reap()
    assert await store.leased() == {"m": 1}
    clock.advance(LEASE / 2)  # the deadline itself
    await store.reap()
    assert await store.leased() == {} and await store.depth() == {"m": 1}
    assert (await store.complete("slow", [ok(first)])).ignored == 1
    (again,) = await pull(store, n=1, worker="other")
    assert again.item_id == first.item_id and again.attempt == 2


async def test_a_result_needs_the_lease_issued_to_the_posting_worker(store):
    """A result with a lease id the store did not issue for this delivery, or posted by
    another worker, is ignored; only the holder answers."""
    request = await store.submit([spec("x")])
    (item,) = await pull(store, n=1, worker="holder")
    forged = [
        ItemResult(**{**ok(item, 6.0).model_dump(), "lease_id": lease})
        for lease in ("1:holder", "1:thief", "0" * 32, item.lease_id[:-1] + "x", "")
    ]
    assert (await store.complete("holder", forged)).ignored == len(forged)
    assert (await store.complete("thief", [ok(item, 6.0)])).ignored == 1  # not its lease
    assert (await store.complete("thief", [failed(item, retryable=True)])).ignored == 1
    assert await store.release("thief", [(item.item_id, item.lease_id)]) == 0
    assert (await store.complete("holder", [ok(item, 2.0)])).accepted == 1
    assert value((await store.wait(request, pickup_timeout=1, request_timeout=5))[0]) == 2.0


async def test_prompt_tokens_past_the_context_are_a_rejected_result(store):
    before = counter(metrics.RESULTS_REJECTED, "m")
    advert = ModelAdvert(name="m", checkpoint_name="c", tasks=["embed"], max_model_len=64)
    request = await store.submit([spec("x")])
    (item,) = await pull(store, n=1, adverts=[advert])
    too_many = ok(item, 1.0).model_copy(update={"prompt_tokens": 2**70})
    done = await store.complete("w", [too_many])
    assert (done.accepted, done.rejected) == (0, 1)
    assert counter(metrics.RESULTS_REJECTED, "m") == before + 1
    (again,) = await pull(store, n=1, adverts=[advert])  # a failed attempt: delivered again
    assert again.attempt == 2
    await store.complete("w", [ok(again, 1.0).model_copy(update={"prompt_tokens": 64})])
    (result,) = await store.wait(request, pickup_timeout=1, request_timeout=5)
    assert result.prompt_tokens == 64


async def test_batch_inputs_have_a_room_of_their_own(store_kind, redis_url, clock):
    s = make_store(
        store_kind,
        redis_url,
        clock,
        lease_seconds=LEASE,
        worker_ttl_seconds=TTL,
        max_queued=3,
        max_queued_batch=5,
    )
    await s.start()
    try:
        await s.submit([spec(f"b{i}", priority=BATCH_PRIORITY) for i in range(5)])
        with pytest.raises(QueueFull) as full:
            await s.submit([spec("b5", priority=BATCH_PRIORITY)])
        assert full.value.limit == 5
        await s.submit([spec(f"i{i}") for i in range(3)])  # the interactive room is whole
        with pytest.raises(QueueFull) as full:
            await s.submit([spec("i3")])
        assert (full.value.queued, full.value.limit) == (3, 3)
        assert await s.depth() == {"m": 8}
    finally:
        await s.close()


def record(batch_id: str, owner: str, created: int, ended: int | None = None) -> str:
    return f'{{"id": "{batch_id}", "owner": "{owner}", "created_at": {created}, "ended": {ended}}}'


async def test_batch_records_by_owner_running_trimmed_and_expired(store):
    from gateway.queue.store import BatchIndex

    for i in range(6):  # a0..a5 of owner a (a0, a1, a3 ended), b0 of owner b
        ended = 100 + i if i in (0, 1, 3) else None
        await store.save_batch(f"a{i}", record(f"a{i}", "a", i, ended), BatchIndex("a", i, ended))
    await store.save_batch("b0", record("b0", "b", 3, None), BatchIndex("b", 3))
    assert sorted(await store.running_batches("a")) == ["a2", "a4", "a5"]
    assert sorted(await store.running_batches()) == ["a2", "a4", "a5", "b0"]
    page, more = await store.owner_batches("a", None, 4)
    assert [r.split('"')[3] for r in page] == ["a5", "a4", "a3", "a2"] and more
    page, more = await store.owner_batches("a", "a2", 4)
    assert [r.split('"')[3] for r in page] == ["a1", "a0"] and not more
    assert await store.owner_batches("a", "b0", 4) == ([], False)  # another owner's cursor
    # a batch ends: out of the running ones
    await store.save_batch("a2", record("a2", "a", 2, 150), BatchIndex("a", 2, 150))
    assert sorted(await store.running_batches("a")) == ["a4", "a5"]
    # keep 4 of a's 6: the two oldest ended go (a0, a1), running ones stay
    gone = await store.trim_batches("a", 4)
    assert sorted(r.split('"')[3] for r in gone) == ["a0", "a1"]
    assert await store.load_batch("a0") is None and await store.load_batch("a4") is not None
    # ended before 149: a3 (103); a2 (150) stays
    expired = await store.expire_batches(149)
    assert [r.split('"')[3] for r in expired] == ["a3"]
    page, _ = await store.owner_batches("a", None, 10)
    assert [r.split('"')[3] for r in page] == ["a5", "a4", "a2"]
    assert await store.load_batch("b0") is not None


async def test_the_memory_store_forgets_silent_workers_and_old_adverts(clock):
    from gateway.queue.memory import MemoryStore

    s = MemoryStore(lease_seconds=LEASE, worker_ttl_seconds=TTL, advert_ttl_seconds=10, clock=clock)
    adverts = [
        ModelAdvert(name=f"made-up-{i}", checkpoint_name="c", tasks=["embed"]) for i in range(50)
    ]
    for i in range(0, 50, 10):
        await s.pull(f"flood-{i}", adverts[i : i + 10], max_items=1, wait_seconds=0)
    assert len(await s.available_models()) == 50 and await s.advert("made-up-3") is not None
    clock.advance(5)
    s._forget()
    assert len(s._workers) == 0  # past the worker TTL
    assert await s.advert("made-up-3") is not None  # within the advert TTL
    clock.advance(6)
    s._forget()
    assert await s.advert("made-up-3") is None and s._adverts == {} and s._pending == {}


async def test_a_sparse_embedding_reaches_the_client_and_a_bad_one_is_refused(store):
    """The ``embed_sparse`` task through the store: its weights and their token ids reach the
    client (on Redis: kept through the reply stream); indices past the model's vocabulary are
    a bad result, redelivered."""
    from common.protocol import SparseEmbedding

    sparse = ModelAdvert(name="m", checkpoint_name="c", tasks=["embed_sparse"], vocab_size=100)
    request = await store.submit(
        [ItemSpec(model="m", task="embed_sparse", text=t) for t in ("ab", "cd")]
    )
    first, second = await pull(store, n=2, adverts=[sparse])
    assert (first.task, second.task) == ("embed_sparse", "embed_sparse")
    good = SparseEmbedding.of([7, 99], [0.5, 1.25])
    outside = SparseEmbedding.of([3, 100], [0.5, 1.0])
    done = await store.complete(
        "w", [ItemResult.ok(first, good, 2), ItemResult.ok(second, outside, 2)]
    )
    assert (done.accepted, done.rejected) == (1, 1)
    (again,) = await pull(store, n=2, adverts=[sparse])  # the bad one, redelivered
    assert again.item_id == second.item_id and again.attempt == 2
    empty = SparseEmbedding.of([], [])  # a text none of whose logits is positive
    assert (await store.complete("w", [ItemResult.ok(again, empty, 2)])).accepted == 1
    got = await store.wait(request, pickup_timeout=DEADLINE, request_timeout=DEADLINE)
    assert [r.sparse().indices.tolist() for r in got] == [[7, 99], []]
    assert [r.sparse().values.tolist() for r in got] == [[0.5, 1.25], []]


def test_new_ids_are_distinct_24_hex_digits_after_this_processs_random_prefix():
    from gateway.queue.store import _ID_PREFIX, new_id

    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 24 and i.startswith(_ID_PREFIX) and int(i, 16) >= 0 for i in ids)
    assert len(_ID_PREFIX) == 12 and _ID_PREFIX != "0" * 12
    wide = new_id(20)  # a batch output line's request_id: 32 hex digits
    assert len(wide) == 32 and wide.startswith(_ID_PREFIX) and wide not in ids
