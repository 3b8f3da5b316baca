"""Gateway replicas on a real Redis Cluster (``--queue-url redis+cluster://``: three primaries
made by ``redis-cli --cluster create``), with real processes: clients on one replica, the
MiniLM worker on the other, the client's own SDK; answers right, both replicas report the
same models, workers and queue, and the model's queue keys are on one node."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from tests.support import metric
from tests.support.reports import FAULT_REPORTS
from tests.support.stack import (
    MODEL,
    cosine,
    embed_worker_config,
    empty_cluster,
    openai_client,
    unit,
)

GATEWAY_ARGS = ["--lease-seconds", "8", "--pickup-timeout", "30", "--request-timeout", "180"]


@pytest.fixture(scope="module")
def on_cluster(redis_cluster: list[ls.Proc], stack_dir: Path) -> Iterator[list[ls.Proc]]:
    """Two gateway replicas on the session's cluster (emptied first) and a worker that pulls
    through the second only."""
    args = [*GATEWAY_ARGS, "--queue-url", empty_cluster(redis_cluster)]
    a = ls.start_gateway(stack_dir, args=args)
    b = ls.start_gateway(stack_dir, args=args)
    worker = ls.start_worker(embed_worker_config(b.url), stack_dir, "worker-on-cluster")
    try:
        yield [a, b]
    finally:
        assert worker.stop() == 0, worker.log_tail()
        a.stop()
        b.stop()


def test_replicas_on_a_redis_cluster_share_one_queue(
    on_cluster, redis_cluster, reference, stsb_sentences
):
    a, b = on_cluster
    texts = stsb_sentences[:64]
    client = openai_client(a.url, timeout=120)
    got = client.embeddings.create(model=MODEL, input=texts)
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert cosine(vectors, unit(reference.raw(texts))).min() >= 0.999

    def one(text: str) -> list[float]:
        return client.embeddings.create(model=MODEL, input=text).data[0].embedding

    with ThreadPoolExecutor(8) as pool:
        singles = np.array(list(pool.map(one, texts[:32])), dtype=np.float32)
    assert cosine(singles, vectors[:32]).min() >= 0.99999

    headers = {"Authorization": f"Bearer {ls.API_KEY}"}
    listed = [httpx.get(r.url + "/v1/models", headers=headers).json() for r in (a, b)]
    assert listed[0] == listed[1] and MODEL in {m["id"] for m in listed[0]["data"]}
    for replica in (a, b):
        text = httpx.get(replica.url + "/metrics").text
        assert metric(text, "inference_gateway_workers", model=MODEL) == 1
        assert metric(text, "inference_gateway_queue_store_up") == 1
        assert metric(text, "inference_gateway_queue_depth_items", model=MODEL) == 0

    import redis

    from gateway.queue.redis import keys

    holders = []  # the nodes that hold any key of the model
    for node in redis_cluster:
        with redis.Redis.from_url(node.url) as plain:
            if [k for k in plain.keys("*") if k.startswith(keys.model_key(MODEL).encode())]:
                holders.append(node.url)
    assert len(holders) == 1, holders
    FAULT_REPORTS.append(
        f"[redis cluster] 3 primaries; 1 + 32 requests (64 + 32 inputs) through replica A, "
        f"worker on replica B; min cosine {cosine(vectors, unit(reference.raw(texts))).min():.7f}"
    )
