"""The Redis store's connection and background loops on a redis-server of the module's own
(stopped and restarted here, so not the session's): a password given apart from the URL, a
``unix://`` URL, an outage logged once and its end once, the reply reader living through a
Redis restart and a key of the wrong type, its blocking reads, and the streams of abandoned
models dropped."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.protocol import ItemResult, ModelAdvert, encode_vector
from devstack import localstack as ls
from gateway.queue.redis import RedisStore
from gateway.queue.store import StoreUnavailable
from tests.support import wait_until
from tests.unit.test_queue_store import pull, spec

pytestmark = pytest.mark.slow

LOGGER = "gateway.queue.redis"


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Proc]:
    """A redis-server (AOF on) for this module alone."""
    proc = ls.start_redis(tmp_path_factory.mktemp("own-redis"))
    yield proc
    proc.stop()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= 30]


async def test_a_password_given_apart_wins_over_the_urls_for_both_clients(own_redis):
    import redis

    from gateway.queue.redis.connection import Connection

    plain = redis.Redis.from_url(own_redis.url)
    plain.config_set("requirepass", "s3cret")
    host = own_redis.url.removeprefix("redis://")
    try:
        right = Connection(f"redis://:wrong@{host}", password="s3cret")
        assert await right.call(right.redis.ping()) is True
        assert await right.call(right.replies.ping()) is True  # the reply reader's client
        await right.redis.aclose()
        await right.replies.aclose()
        wrong = Connection(f"redis://{host}")  # no password: refused, as an outage
        with pytest.raises(StoreUnavailable):
            await wrong.call(wrong.redis.ping())
        await wrong.redis.aclose()
        await wrong.replies.aclose()
    finally:
        redis.Redis.from_url(own_redis.url, password="s3cret").config_set("requirepass", "")
        plain.close()


async def test_an_outage_is_logged_once_and_its_end_once(tmp_path, caplog):
    from gateway.queue.redis.connection import Connection

    caplog.set_level(logging.INFO, LOGGER)
    port = ls.free_port()
    conn = Connection(f"redis://127.0.0.1:{port}/0")
    for _ in range(3):
        with pytest.raises(StoreUnavailable, match=r"^Redis: "):
            await conn.call(conn.redis.ping())
    (down,) = warnings(caplog)
    assert down.startswith("queue store unreachable (Redis: ") and down.endswith("); retrying")
    assert f"connecting to 127.0.0.1:{port}" in down  # the cause, as redis-py gives it
    server = ls.start_redis(tmp_path, port=port)
    try:
        for _ in range(3):
            assert await conn.call(conn.redis.ping()) is True
        assert warnings(caplog) == [down, "queue store reachable"]  # once, not per call
    finally:
        await conn.redis.aclose()
        await conn.replies.aclose()
        server.stop()


async def exchange(a: RedisStore, b: RedisStore, text: str) -> None:
    """A's client asks, a worker pulls and answers through B: the answer reaches A through
    its reply stream (read by A's reply reader)."""
    mine = await a.submit([spec(text, dimensions=2)])
    (x,) = await pull(b, n=1, worker="w")
    two = encode_vector(np.array([0.6, 0.8], np.float32))
    done = ItemResult(item_id=x.item_id, lease_id=x.lease_id, vector_b64=two)
    assert (await b.complete("w", [done])).accepted == 1
    (result,) = await a.wait(mine, pickup_timeout=5, request_timeout=10)
    assert result.vector_b64 == two


async def test_a_unix_socket_url_reaches_a_redis_on_the_same_host():
    """``--queue-url unix://<socket>?db=0`` (accepted by the gateway's settings): two
    replicas on one redis-server through its Unix socket, a worker answering through the
    other replica than the client's."""
    folder = Path(tempfile.mkdtemp(prefix="iw-unix-"))  # short: a socket's path is bounded
    server = ls.start_redis(folder, unix_socket=True)
    a, b = (RedisStore(server.url, lease_seconds=5) for _ in range(2))
    try:
        assert server.url.startswith(f"unix://{folder}/") and server.url.endswith("?db=0")
        await a.start()
        await b.start()
        await exchange(a, b, "over a unix socket")
        clients = redis_clients(server)
        assert clients and all(c["addr"].startswith(f"{folder}/") for c in clients), clients
    finally:
        await a.close()
        await b.close()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def redis_clients(server: ls.Proc) -> list[dict]:
    """The stores' connections as ``CLIENT LIST`` gives them (this check's own left out);
    a Unix socket client's ``addr`` is ``<socket path>:0``."""
    import redis

    with redis.Redis.from_url(server.url) as plain:
        me = plain.client_id()
        return [c for c in plain.client_list() if int(c["id"]) != me]


async def test_the_reply_reader_reads_on_after_a_restart_and_a_key_of_the_wrong_type(
    own_redis, caplog
):
    """A Redis restart (seen as StoreUnavailable: the connection logs it, the reader does
    not) and a reply key that is not a stream (a Redis error, logged by the reader): the
    reader waits and reads on; answers after either reach the client. Between answers it
    blocks in XREAD (about one call a second), not polling."""
    import redis

    from gateway.queue.redis import keys

    caplog.set_level(logging.INFO, LOGGER)
    plain = redis.Redis.from_url(own_redis.url)
    plain.flushdb()
    a, b = (RedisStore(own_redis.url, lease_seconds=5) for _ in range(2))
    await a.start()
    await b.start()
    try:
        await exchange(a, b, "before")
        plain.config_resetstat()
        await asyncio.sleep(2.0)
        stats = plain.info("commandstats")
        assert stats["cmdstat_xread"]["calls"] <= 8  # two readers, blocking 1 s per call

        own_redis.stop()
        await asyncio.sleep(1.5)  # both readers meet the outage
        port = own_redis.port
        # the same port and data folder (its AOF: the streams and their groups come back)
        restarted = ls.start_redis(own_redis.log_path.parent.parent, port=port)
        own_redis.popen = restarted.popen  # the module's fixture stops this one
        await exchange(a, b, "after the restart")
        assert not [m for m in warnings(caplog) if m.startswith("queue store (replies)")]

        plain.delete(keys.reply("m", a.replica))
        plain.set(keys.reply("m", a.replica), "not a stream")
        await wait_until(
            lambda: any(m.startswith("queue store (replies): WRONGTYPE") for m in warnings(caplog)),
            what="the reader's warning",
        )
        plain.delete(keys.reply("m", a.replica))
        await exchange(a, b, "after the wrong type")
    finally:
        await a.close()
        await b.close()
        plain.close()


async def test_the_streams_of_an_abandoned_model_are_dropped_after_its_advert_ttl(
    own_redis, caplog
):
    """The background loop (every lease/2 seconds here) drops the empty streams of models
    whose adverts expired, and logs how many."""
    import redis

    caplog.set_level(logging.INFO, LOGGER)
    plain = redis.Redis.from_url(own_redis.url)
    plain.flushdb()
    store = RedisStore(own_redis.url, lease_seconds=0.4, advert_ttl_seconds=1.0)
    await store.start()
    try:
        gone = ModelAdvert(name="abandoned", checkpoint_name="c", tasks=["embed", "score"])
        await pull(store, adverts=[gone])
        streams = [k for k in plain.keys("*abandoned*") if plain.type(k) == b"stream"]
        assert streams
        await wait_until(
            lambda: not [k for k in plain.keys("*") if b"abandoned" in k],
            timeout=15,
            what="the abandoned model's streams dropped",
        )
        dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
        assert dropped == [f"dropped {len(streams)} empty streams of models no worker serves"], (
            dropped
        )
    finally:
        await store.close()
        plain.close()


async def test_a_replicas_keys_expire_unless_it_beats_and_go_when_it_closes(own_redis):
    """A replica's heartbeat key beside a model it has clients of expires (a replica that
    dies silently is forgotten after REPLICA_TTL_SECONDS); closing deletes it and the
    replica's reply stream of that model at once."""
    import redis

    from gateway.queue.redis import keys
    from gateway.queue.redis.store import REPLICA_TTL_SECONDS

    plain = redis.Redis.from_url(own_redis.url)
    store = RedisStore(own_redis.url, lease_seconds=5)
    await store.start()
    try:
        await store.submit([spec("a client of model m")])
        mine = [keys.replica("m", store.replica), keys.reply("m", store.replica)]
        plain.xadd(mine[1], {"i": "nobody", "r": "{}"})  # the stream exists while it runs
        assert 0 < plain.ttl(mine[0]) <= REPLICA_TTL_SECONDS
    finally:
        await store.close()
    assert plain.exists(*mine) == 0
    plain.close()


async def test_a_cancel_that_redis_refuses_is_logged_and_the_request_left(own_redis, caplog):
    """A client gone away whose CANCEL fails (here: its line is no longer a stream) costs a
    warning naming Redis' error, never an exception in the request's handler."""
    import redis

    from gateway.queue.redis.keys import stream_key
    from tests.unit.test_queue_store import spec

    caplog.set_level(logging.INFO, LOGGER)
    plain = redis.Redis.from_url(own_redis.url)
    plain.flushdb()
    store = RedisStore(own_redis.url, lease_seconds=5)
    await store.start()
    try:
        request = await store.submit([spec("going away")])
        line = stream_key("m", "embed")
        plain.delete(line)
        plain.set(line, "not a stream")
        await store.cancel(request)
        (logged,) = [m for m in warnings(caplog) if "cancel" in m]
        assert logged.startswith("cancel: WRONGTYPE Operation against a key holding the wrong")
    finally:
        plain.delete(line)
        await store.close()
        plain.close()
