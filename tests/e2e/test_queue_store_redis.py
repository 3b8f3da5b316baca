"""The queue store's guarantees (``tests/unit/test_queue_store.py``) on the Redis store: every
store-level test of the unit layer runs again here on a real redis-server (sub-second leases,
in real time), and what only the Redis store does: replicas answering each other's clients,
few stream entries per request, SUBMIT coalescing, a long poll handing out what woke it, a
replica answering its own client before the COMPLETE round trip."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from common.protocol import ItemResult, encode_vector
from tests.support import rerun, wait_until
from tests.support.stack import redis_store_kind
from tests.unit import test_queue_store as on_memory
from tests.unit.test_queue_store import clock, ok, pull, spec, store, value

__all__ = ["clock", "store"]


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return redis_store_kind(request)


#: The unit layer's tests that run on a store, collected here again (on Redis).
globals().update(rerun(on_memory, {"store", "store_kind"}))


async def test_redis_replicas_answer_whoever_holds_the_client(redis_server):
    """Two Redis store replicas: a worker pulls through one and posts through either. A
    result reaches the client's replica (answered in place, or through its reply stream), and
    a replica that did not hand the item out checks the result against the spec in Redis."""
    import redis

    from gateway.queue.redis import RedisStore

    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    redis.Redis.from_url(url).flushdb()
    a, b = (RedisStore(url, lease_seconds=5, max_attempts=3) for _ in range(2))
    await a.start()
    await b.start()
    try:
        mine = await a.submit([spec("x", dimensions=2), spec("y", dimensions=3)])
        x, y = await pull(b, n=2, worker="w")
        three = encode_vector(np.array([0.6, 0.8, 0.0], np.float32))  # y's length, not x's
        bad = ItemResult(item_id=x.item_id, lease_id=x.lease_id, vector_b64=three)
        assert (await a.complete("w", [bad])).rejected == 1  # x's spec read from Redis
        two = encode_vector(np.array([0.6, 0.8], np.float32))
        # y answered through B (A's reply stream), x's retry through A (in place)
        y_done = ItemResult(item_id=y.item_id, lease_id=y.lease_id, vector_b64=three)
        assert (await b.complete("w", [y_done])).accepted == 1
        (x2,) = await pull(b, n=1, worker="w")
        x_done = ItemResult(item_id=x2.item_id, lease_id=x2.lease_id, vector_b64=two)
        assert (await a.complete("w", [x_done])).accepted == 1
        results = await a.wait(mine, pickup_timeout=1, request_timeout=5)
        assert [r.vector_b64 for r in results] == [two, three]
        assert await a.depth() == {} and await b.leased() == {}
    finally:
        await a.close()
        await b.close()


async def test_a_reply_stream_is_read_again_and_again_and_emptied(redis_server):
    """Answers posted through another replica reach the client's replica one after another
    through its reply stream (the reader keeps reading after each batch, forgets old early
    answers, and deletes what it read): three requests in turn, the stream empty after each."""
    import redis

    from gateway.queue.redis import RedisStore, keys

    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    plain = redis.Redis.from_url(url)
    plain.flushdb()
    a, b = (RedisStore(url, lease_seconds=5, max_attempts=3) for _ in range(2))
    await a.start()
    await b.start()
    try:
        for n in range(3):
            mine = await a.submit([spec(f"x{n}", dimensions=2)])
            (x,) = await pull(b, n=1, worker="w")
            two = encode_vector(np.array([0.6, 0.8], np.float32))
            done = ItemResult(item_id=x.item_id, lease_id=x.lease_id, vector_b64=two)
            assert (await b.complete("w", [done])).accepted == 1  # through A's reply stream
            (result,) = await a.wait(mine, pickup_timeout=1, request_timeout=5)
            assert result.vector_b64 == two
            emptied = lambda key=keys.reply("m", a.replica): plain.xlen(key) == 0  # noqa: E731
            await wait_until(emptied, what="stream read")
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def redis_db2(redis_server: Any) -> AsyncIterator[tuple[Any, Any]]:
    """A Redis store on database 2 of the session's redis-server (emptied first), and a
    plain ``redis`` client on that database to look at its keys."""
    import redis

    from gateway.queue.redis import RedisStore

    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    r = redis.Redis.from_url(url)
    r.flushdb()
    store = RedisStore(url, lease_seconds=5)
    await store.start()
    try:
        yield r, store
    finally:
        await store.close()


async def test_redis_keeps_a_requests_inputs_in_few_stream_entries(redis_db2):
    """A 2,048-input request is 64 stream entries of 32 inputs, not 2,048 entries; entries are
    bounded by estimated tokens too."""
    from gateway.queue.redis.entries import INPUTS_PER_ENTRY, TOKENS_PER_ENTRY
    from gateway.queue.redis.keys import stream_key

    r, store = redis_db2
    await store.submit([spec(str(i)) for i in range(2048)])
    assert r.xlen(stream_key("m", "embed")) == 2048 // INPUTS_PER_ENTRY == 64
    long_text = "word " * 800  # 1,000 estimated tokens each
    await store.submit([spec(long_text, model="long") for _ in range(10)])
    per_entry = TOKENS_PER_ENTRY // 1000
    assert r.xlen(stream_key("long", "embed")) == -(-10 // per_entry)
    assert await store.depth() == {"m": 2048, "long": 10}


async def test_redis_sends_concurrent_submits_together(redis_db2):
    """64 one-input requests at once: one or two SUBMIT script calls (Redis' own command
    counts), not 64; a client that goes away while its request is being sent leaves nothing
    queued."""
    r, store = redis_db2
    await store.submit([spec("warm")])  # the script is loaded
    r.config_resetstat()
    requests = await asyncio.gather(*(store.submit([spec(str(i))]) for i in range(64)))
    calls = int(r.info("commandstats")["cmdstat_evalsha"]["calls"])
    print(f"64 concurrent one-input submits: {calls} SUBMIT call(s)")
    assert 1 <= calls <= 2
    assert len({q.request_id for q in requests}) == 64
    assert await store.depth() == {"m": 65}
    gone = asyncio.create_task(store.submit([spec("gone")]))
    await asyncio.sleep(0)  # queued for the sender, not sent yet
    gone.cancel()
    await wait_until(lambda: not store.submissions.tasks, timeout=5)
    await asyncio.sleep(0.1)
    assert await store.depth() == {"m": 65}
    texts = [i.text for i in await pull(store, n=100)]
    assert "gone" not in texts and len(texts) == 65


async def test_redis_long_poll_hands_out_what_woke_it(redis_db2, redis_server):
    """A long poll returns the entries that woke it at once: no further PULL call for requests
    still on their way in, even while this replica has a SUBMIT of the pull's line in flight
    (a top-up that was measured to leave the engine idle longer)."""
    from gateway.queue.redis import RedisStore
    from gateway.queue.redis.keys import stream_key

    _, a = redis_db2
    b = RedisStore(redis_server.url.rsplit("/", 1)[0] + "/2", lease_seconds=5)  # a replica
    await b.start()
    try:
        # as while a SUBMIT of the line is in flight
        a.submissions._sending.add(stream_key("m", "embed"))
        takes: list[int] = []  # a SPY on A's PULL calls
        take = a.workers._take

        async def spy(*args: Any, **kw: Any) -> Any:
            takes.append(1)
            return await take(*args, **kw)

        a.workers._take = spy  # type: ignore[method-assign]
        poll = asyncio.ensure_future(pull(a, n=100, wait=5))
        await asyncio.sleep(0.3)  # the poll made its PULL and is blocked in XREADGROUP now
        assert takes == [1]
        await b.submit([spec("one")])
        assert [i.text for i in await asyncio.wait_for(poll, 5)] == ["one"]
        assert takes == [1]  # no PULL after the wake
    finally:
        a.submissions._sending.clear()
        await b.close()


async def test_redis_answers_its_own_client_before_the_complete_round_trip(redis_db2):
    """A valid result for a client of the replica the worker posts to answers that client
    before the COMPLETE script runs (a SPY around the script call looks at the client's
    future); the entry is still completed in Redis, and a second post of it is ignored."""
    _, store = redis_db2
    request = await store.submit([spec("x")])
    (item,) = await pull(store, n=1)
    seen: list[bool] = []
    script = store.conn.scripts.complete
    run = script.of_model

    def spy(model: str, args: Any) -> Any:
        seen.append(all(f.done() for f in request.futures))
        return run(model, args)

    script.of_model = spy  # type: ignore[method-assign]
    done = await store.complete("w", [ok(item, 2.0)])
    assert seen == [True] and done.accepted == 1
    assert [value(res) for res in await store.wait(request, 1, 5)] == [2.0]
    assert await store.depth() == {} and await store.leased() == {}
    assert (await store.complete("w", [ok(item, 3.0)])).ignored == 1
    assert not len(store.replies._early)  # nothing kept for a client that was answered


async def test_a_dead_replicas_queued_inputs_are_dropped_once_its_heartbeat_is_gone(
    redis_db2, redis_server
):
    """Inputs queued through a replica are worked on while its heartbeat lives (another
    replica's worker takes them), and dropped once it is gone (its clients are gone with it):
    the heartbeat key's TTL is 60 s; here it is deleted as if it had run out."""
    from gateway.queue.redis import RedisStore
    from gateway.queue.redis.keys import replica

    r, b = redis_db2
    a = RedisStore(redis_server.url.rsplit("/", 1)[0] + "/2", lease_seconds=5)
    await a.start()
    try:
        await a.submit([spec("alive 1"), spec("alive 2")])
        assert [i.text for i in await pull(b, n=5, worker="w")] == ["alive 1", "alive 2"]
        await a.submit([spec("orphan 1"), spec("orphan 2")])
        assert await b.depth() == {"m": 2}
    finally:
        await a.close()
    r.delete(replica("m", a.replica))  # gone (a closing replica deletes it; a killed one's expires)
    assert await pull(b, n=5, worker="w") == []
    assert await b.depth() == {}


async def test_a_redis_call_that_never_returns_does_not_hold_close(redis_server):
    """FAKE Redis calls (the fault, not producible on demand): the replica's last ``DELETE``
    and the client's close never return. ``close()`` still ends, each step bounded."""
    from gateway.queue.redis import RedisStore
    from gateway.queue.redis import store as redis_store

    url = redis_server.url.rsplit("/", 1)[0] + "/3"
    store = RedisStore(url, lease_seconds=5)
    await store.start()
    await store.submit([spec("a client's request")])  # a heartbeat and reply stream to delete
    real_close = store.redis.aclose

    async def forever(*_: Any) -> None:
        await asyncio.sleep(3600)

    store.redis.delete = forever  # type: ignore[method-assign]
    store.redis.aclose = forever  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(4 * redis_store.CLOSE_SECONDS):
        await store.close()
    assert loop.time() - started >= 2 * redis_store.CLOSE_SECONDS  # both steps timed out
    await real_close()


async def test_batch_records_of_the_layout_before_the_hash_tags_are_taken_over(redis_server):
    """Batch records a gateway of the layout before kept (``iw:batches``, its indexes and
    ``iw:batch-cancels``) are taken over by the first replica that starts: found, listed,
    running or ended as they were, a cancel kept; the old keys gone."""
    import redis

    from gateway.batch.models import BatchRecord
    from gateway.queue.redis import RedisStore

    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    plain = redis.Redis.from_url(url)
    plain.flushdb()
    common = {"endpoint": "/v1/embeddings", "input_file_id": "file-1", "owner": "o"}
    running = BatchRecord(id="batch_a", status="in_progress", created_at=10, **common)
    ended = BatchRecord(id="batch_b", status="completed", created_at=20, completed_at=30, **common)
    plain.hset("iw:batches", mapping={r.id: r.model_dump_json() for r in (running, ended)})
    plain.hset("iw:batch-cancels", "batch_a", 1234)
    plain.sadd("iw:batches:running", "batch_a")
    store = RedisStore(url, lease_seconds=5)
    await store.start()
    try:
        assert await store.load_batch("batch_a") == running.model_dump_json()
        assert await store.running_batches("o") == ["batch_a"]
        page, more = await store.owner_batches("o", None, 10)
        assert not more
        assert [BatchRecord.model_validate_json(r).id for r in page] == ["batch_b", "batch_a"]
        assert await store.batch_cancelled("batch_a") == 1234
        assert await store.expire_batches(31) == [ended.model_dump_json()]
        assert plain.exists("iw:batches", "iw:batch-cancels", "iw:batches:running") == 0
    finally:
        await store.close()
        plain.close()
