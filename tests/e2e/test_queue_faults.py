"""Faults with real processes: a worker killed mid-batch, and the queue going away."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import numpy as np

from devstack import localstack as ls
from tests.support import metric as _metric
from tests.support.stack import MODEL, cosine, embed_worker_config, unit


def test_items_of_a_killed_worker_are_redelivered(
    gateway, embed_worker, client, reference, stsb_sentences, stack_dir
):
    victim = ls.start_worker(embed_worker_config(gateway.url, max_num_seqs=64), stack_dir, "victim")
    try:
        texts = (stsb_sentences * 10)[:2000]
        before = httpx.get(gateway.url + "/metrics").text
        result: dict = {}

        def call() -> None:
            result["resp"] = client.embeddings.create(
                model=MODEL, input=texts, encoding_format="float"
            )

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 60
        pulled = 0.0
        while time.monotonic() < deadline:
            m = httpx.get(victim.url + "/metrics").text
            pulled = _metric(m, "inference_worker_items_pulled_total")
            if pulled > 0:
                break
            time.sleep(0.02)
        completed = _metric(m, "inference_worker_items_completed_total")
        victim.signal(signal.SIGKILL, group=True)  # the worker and its vLLM engine, mid-batch
        assert pulled > completed, "victim had nothing in flight when killed"
        t.join(120)
        assert not t.is_alive()
        got = np.array([d.embedding for d in result["resp"].data], dtype=np.float32)
        assert got.shape == (2000, 384)
        want = unit(reference.raw(stsb_sentences))
        want = np.concatenate([want] * 10)[:2000]
        assert cosine(got, want).min() >= 0.999
        after = httpx.get(gateway.url + "/metrics").text
        expired = _metric(after, "inference_gateway_leases_expired_total") - _metric(
            before, "inference_gateway_leases_expired_total"
        )
        redelivered = _metric(after, "inference_gateway_redeliveries_total") - _metric(
            before, "inference_gateway_redeliveries_total"
        )
        assert expired >= 1 and redelivered >= 1
    finally:
        victim.stop()


def test_worker_survives_a_gateway_restart_and_resumes(stack_dir):
    """The gateway process stops and comes back on the same port: the worker stays alive,
    turns not-ready, retries, and serves again. Its own gateway and worker (both are stopped)."""
    from openai import OpenAI

    gw = ls.start_gateway(stack_dir, args=["--lease-seconds", "8", "--pickup-timeout", "40"])
    worker = None
    try:
        worker = ls.start_worker(embed_worker_config(gw.url), stack_dir, "restart-survivor")
        port = gw.port
        gw.stop()
        deadline = time.monotonic() + 30
        while httpx.get(worker.url + "/readyz").status_code != 503:  # queue unreachable
            assert time.monotonic() < deadline, "worker stayed ready without its queue"
            time.sleep(0.1)
        time.sleep(3)  # a while without a queue: still alive, still retrying
        assert worker.popen.poll() is None
        assert httpx.get(worker.url + "/livez").status_code == 200
        assert re.search(r"pull failed: queue pull: ConnectError", worker.log_path.read_text())
        gw = ls.start_gateway(
            stack_dir, port=port, args=["--lease-seconds", "8", "--pickup-timeout", "40"]
        )
        # The new gateway knows the model once the worker's next pull advertises it.
        deadline = time.monotonic() + 30
        while httpx.get(worker.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "worker did not come back"
            time.sleep(0.1)
        client = OpenAI(base_url=gw.url + "/v1", api_key=ls.API_KEY, max_retries=0, timeout=60)
        resp = client.embeddings.create(model=MODEL, input=["back again"], encoding_format="float")
        assert len(resp.data[0].embedding) == 384
    finally:
        if worker is not None:
            assert worker.stop() == 0, worker.log_tail()
        gw.stop()
