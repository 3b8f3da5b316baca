"""The Redis store on a real Redis Cluster (three ``redis-server --cluster-enabled yes``
primaries, ``redis-cli --cluster create``): every store-level test of the unit layer runs again
on it, and what the cluster adds: a model's keys on one node and the models spread over the
nodes, a worker of models on different nodes, replicas answering each other's clients
through the reply streams beside each model's queue."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.protocol import ItemResult, ModelAdvert, encode_vector
from devstack.localstack import cluster_url
from tests.support import rerun
from tests.support.reports import FAULT_REPORTS
from tests.support.stack import redis_cluster_store_kind
from tests.unit import test_queue_store as on_memory
from tests.unit.test_queue_store import clock, ok, pull, spec, store

__all__ = ["clock", "store"]


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return redis_cluster_store_kind(request)


#: The unit layer's tests that run on a store, collected here again (on the cluster).
globals().update(rerun(on_memory, {"store", "store_kind"}))


def node_of(nodes: list[Any], key: str, skip: Any = None) -> int:
    """The index of the node that holds ``key`` (its keys listed node by node; ``skip``: a
    node that is down)."""
    import redis

    found = []
    for i, node in enumerate(nodes):
        if node is skip:
            continue
        with redis.Redis.from_url(node.url) as client:
            if key.encode() in client.keys("*"):
                found.append(i)
    assert len(found) == 1, (key, found)
    return found[0]


def two_models_on_different_nodes(nodes: list[Any]) -> tuple[str, str]:
    """Two model names whose keys' slots are held by different nodes."""
    from redis.cluster import RedisCluster

    from gateway.queue.redis import keys

    client = RedisCluster.from_url(nodes[0].url)
    try:
        first = "model-0"
        home = client.get_node_from_key(keys.model_key(first)).name
        for i in range(1, 100):
            other = f"model-{i}"
            if client.get_node_from_key(keys.model_key(other)).name != home:
                return first, other
    finally:
        client.close()
    raise AssertionError("every model on one node")


def adverts_of(*models: str) -> list[ModelAdvert]:
    return [ModelAdvert(name=m, checkpoint_name=m, tasks=["embed"]) for m in models]


async def test_each_models_queue_is_on_one_node_and_the_models_spread(store, redis_cluster):
    """Twelve models' requests: every key of one model (its streams, counts, sets, the
    replica's heartbeat and reply stream beside it) is on one node, and the models' queues
    are on more than one node; one worker serving all twelve drains them, each input once."""
    from gateway.queue.redis import keys

    models = [f"model-{i}" for i in range(12)]
    for m in models:
        await store.submit([spec(f"{m} a", model=m), spec(f"{m} b", model=m)])
    assert await store.depth() == dict.fromkeys(models, 2)
    where: dict[str, set[int]] = {}
    for m in models:
        named = [keys.stream_key(m, "embed"), keys.streams(m), keys.active(m)]
        named += [keys.unanswered(m), keys.replica(m, store.replica)]
        where[m] = {node_of(redis_cluster, k) for k in named}
    assert all(len(nodes) == 1 for nodes in where.values()), where
    assert len(set.union(*where.values())) > 1, where
    adverts = adverts_of(*models)
    texts: list[str] = []
    for _ in range(5):
        got = await store.pull("w", adverts, max_items=10, wait_seconds=0.2)
        texts += [i.text for i in got]
        await store.complete("w", [ok(i) for i in got])
    assert sorted(texts) == sorted(f"{m} {x}" for m in models for x in "ab")
    assert await store.depth() == {} and await store.leased() == {}


async def test_a_long_poll_over_models_on_different_nodes_wakes_for_any(store, redis_cluster):
    """A worker of two models whose queues are on different nodes long-polls both (a
    blocking read per node's model); a request for either wakes it, and what the other
    read takes later goes back to the front: nothing is lost or held."""
    import asyncio

    a, b = two_models_on_different_nodes(redis_cluster)
    adverts = adverts_of(a, b)
    poll = asyncio.create_task(store.pull("w", adverts, max_items=4, wait_seconds=5))
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await store.submit([spec("for b", model=b)])
    (item,) = await poll
    assert item.text == "for b" and loop.time() - started < 1.0
    await store.complete("w", [ok(item)])
    await store.submit([spec("for a", model=a)])
    got = await store.pull("w2", adverts, max_items=4, wait_seconds=2)
    assert [i.text for i in got] == ["for a"]  # not held by the first worker's late read
    await store.complete("w2", [ok(i) for i in got])
    assert await store.depth() == {} and await store.leased() == {}


async def test_cluster_replicas_answer_whoever_holds_the_client(redis_cluster, store_kind):
    """Two replicas on the cluster: a worker pulls through one and posts through the other;
    the answer reaches the client's replica through its reply stream beside the model."""
    from gateway.queue.redis import RedisStore

    url = cluster_url(redis_cluster)
    a, b = (RedisStore(url, lease_seconds=5, max_attempts=3) for _ in range(2))
    await a.start()
    await b.start()
    try:
        two = encode_vector(np.array([0.6, 0.8], np.float32))
        waits = []
        for m in two_models_on_different_nodes(redis_cluster):
            mine = await a.submit([spec("x", model=m, dimensions=2)])
            (x,) = await pull(b, n=1, worker="w", adverts=adverts_of(m))
            done = ItemResult(item_id=x.item_id, lease_id=x.lease_id, vector_b64=two)
            assert (await b.complete("w", [done])).accepted == 1
            waits.append(a.wait(mine, pickup_timeout=1, request_timeout=5))
        for wait in waits:
            (result,) = await wait
            assert result.vector_b64 == two
    finally:
        await a.close()
        await b.close()


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A cluster of this module's own (a node of it is stopped), whose nodes up serve their
    slots while another is down (``cluster-require-full-coverage no``)."""
    from devstack import localstack as ls

    nodes = ls.start_redis_cluster(tmp_path_factory.mktemp("own-cluster"), full_coverage=False)
    yield nodes
    for node in nodes:
        node.stop()


async def test_a_node_down_stops_its_models_alone_and_loses_nothing(own_cluster, caplog):
    """The node holding model A's queue is stopped (SIGTERM: its AOF written) with two of A's
    inputs queued: A's requests fail with StoreUnavailable (503 at the gateway), quickly;
    the replica stays ready; model B, on another node, is served meanwhile (submit, pull,
    results), its heartbeat kept. The node restarted
    on its port and folder: A's two inputs are still queued and served, nothing lost. The
    node's outage is logged once when it starts and once when it ends."""
    import asyncio
    import logging
    import time

    import redis

    from devstack import localstack as ls
    from gateway.queue.redis import RedisStore, keys
    from gateway.queue.store import StoreUnavailable

    caplog.set_level(logging.INFO, "gateway.queue.redis")
    a, b = two_models_on_different_nodes(own_cluster)
    store = RedisStore(cluster_url(own_cluster), lease_seconds=5)
    await store.start()
    try:
        await store.submit([spec("a1", model=a), spec("a2", model=a)])
        down = own_cluster[node_of(own_cluster, keys.stream_key(a, "embed"))]
        port = down.port
        assert own_cluster[0] is not down  # the URL's node stays up
        assert down.stop(30) == 0, down.log_tail()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.submit([spec("a3", model=a)])
        refused_in = time.monotonic() - started
        assert refused_in < 10
        assert await store.ping() and await store.ping()  # ready: the other primaries answer
        waiting = await store.submit([spec("b1", model=b)])
        (item,) = await pull(store, n=4, adverts=adverts_of(b))
        assert item.text == "b1"
        assert (await store.complete("w", [ok(item)])).accepted == 1
        (result,) = await store.wait(waiting, pickup_timeout=5, request_timeout=10)
        assert result.error is None
        heartbeat = keys.replica(b, store.replica)
        up = own_cluster[node_of(own_cluster, heartbeat, skip=down)]
        with redis.Redis.from_url(up.url) as plain:
            await asyncio.sleep(1.5)  # the heartbeat's TTL runs down: 1.5 s under a fresh one
            before = plain.pttl(heartbeat)
            with pytest.raises(StoreUnavailable):  # A's beat
                await store._beat()  # the background's step, with A's node down
            assert plain.pttl(heartbeat) > before
            b_streams = keys.streams(b)
            assert plain.scard(b_streams) > 0
            plain.delete(keys.advert(b))  # B's workers gone: its empty streams may go
            with pytest.raises(StoreUnavailable):  # A's model, walked first (sorted)
                await store._forget_models()
            assert plain.scard(b_streams) == 0  # B's streams dropped all the same
        restarted = ls.start_redis(down.log_path.parent.parent, port=port, cluster=True)
        down.popen = restarted.popen  # the fixture stops this one
        texts: list[str] = []
        deadline = time.monotonic() + 60
        while len(texts) < 2 and time.monotonic() < deadline:
            try:
                got = await pull(store, n=4, wait=1, adverts=adverts_of(a))
            except StoreUnavailable:
                await asyncio.sleep(0.5)
                continue
            texts += [i.text for i in got]
            await store.complete("w", [ok(i) for i in got])
        assert sorted(texts) == ["a1", "a2"], texts
        assert await store.ping()
        node = f"127.0.0.1:{port}"
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.getMessage() for r in warned if r.name == "gateway.queue.redis"] == [
            f"queue store: Redis Cluster node {node} unreachable; retrying",
            f"queue store: Redis Cluster node {node} reachable",
        ]  # once each, whatever the calls that failed meanwhile
        FAULT_REPORTS.append(
            f"[redis cluster node down] its model refused in {refused_in:.2f} s, the other "
            f"model served; restarted: queued 2, served {len(texts)}, lost {2 - len(texts)}"
        )
    finally:
        await store.close()
