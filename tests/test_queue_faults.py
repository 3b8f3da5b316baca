"""Faults with real processes: a worker killed mid-batch, and the queue going away."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import numpy as np
import pytest

from devstack import localstack as ls
from tests.conftest import MODEL, cosine, embed_worker_config, unit
from tests.conftest import metric as _metric

pytestmark = pytest.mark.slow  # real processes on loopback


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


def test_worker_survives_queue_outage_and_resumes(gateway, embed_worker, client, stack_dir):
    port = int(gateway.url.rsplit(":", 1)[1])
    gateway.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(embed_worker.url + "/readyz").status_code == 503:
            break
        time.sleep(0.25)
    assert httpx.get(embed_worker.url + "/readyz").status_code == 503  # queue unreachable
    time.sleep(3)
    assert embed_worker.popen.poll() is None
    assert httpx.get(embed_worker.url + "/livez").status_code == 200
    log = embed_worker.log_path.read_text()
    assert re.search(r"pull failed: queue pull: ConnectError", log)
    restarted = ls.start_gateway(
        stack_dir, port=port, args=["--lease-seconds", "8", "--pickup-timeout", "40"]
    )
    gateway.popen = restarted.popen  # the session fixture now owns the new process
    # The new gateway knows the model once the worker's next pull advertises it.
    deadline = time.monotonic() + 30
    while httpx.get(embed_worker.url + "/readyz").status_code != 200:
        assert time.monotonic() < deadline, "worker did not come back"
        time.sleep(0.25)
    resp = client.embeddings.create(model=MODEL, input=["back again"], encoding_format="float")
    assert len(resp.data[0].embedding) == 384
    assert httpx.get(embed_worker.url + "/readyz").status_code == 200
