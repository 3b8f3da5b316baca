"""Retry policy of the worker's queue client: 5xx / 429 / connection errors are retried with
backoff up to ``http_request_retries``; other 4xx are not.

FAULT INJECTION: ``FaultInjectingQueue`` is a deliberately broken HTTP server that answers
scripted status codes; the real gateway cannot be made to return them on demand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Response

from devstack import localstack as ls
from worker import metrics
from worker.protocol import ModelAdvert, PullRequest
from worker.queue_client import QueueClient, QueueRejected, QueueUnavailable


class FaultInjectingQueue:
    """Answers ``/queue/v1/pull`` with the next scripted status (then 200 with no items)."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.calls = 0
        app = FastAPI()

        @app.post("/queue/v1/pull")
        async def pull() -> Response:
            self.calls += 1
            status = self.script.pop(0) if self.script else 200
            body = '{"items": []}' if status == 200 else '{"error": "injected"}'
            return Response(body, status_code=status, media_type="application/json")

        self.port = ls.free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FaultInjectingQueue:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def faulty() -> Iterator[FaultInjectingQueue]:
    with FaultInjectingQueue() as f:
        yield f


REQ = PullRequest(
    worker_id="w",
    max_items=1,
    wait_seconds=0,
    models=[ModelAdvert(name="m", checkpoint_name="m", tasks=["embed"])],
)


def _client(port: int, retries: int) -> QueueClient:
    return QueueClient(
        f"http://127.0.0.1:{port}",
        "t",
        retries=retries,
        timeout_seconds=2,
        backoff_initial=0.01,
        backoff_max=0.05,
    )


@pytest.mark.parametrize("script", [[503, 500], [429], [502, 429, 504]])
async def test_transient_statuses_are_retried(faulty, script):
    faulty.script = list(script)
    before = metrics.QUEUE_RETRIES.labels("pull")._value.get()
    client = _client(faulty.port, retries=3)
    assert await client.pull(REQ) == []
    await client.aclose()
    assert faulty.calls == len(script) + 1
    assert metrics.QUEUE_RETRIES.labels("pull")._value.get() - before == len(script)


async def test_retries_are_bounded(faulty):
    faulty.script = [503] * 10
    client = _client(faulty.port, retries=2)
    with pytest.raises(QueueUnavailable):
        await client.pull(REQ)
    await client.aclose()
    assert faulty.calls == 3


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_are_not_retried(faulty, status):
    faulty.script = [status]
    client = _client(faulty.port, retries=5)
    with pytest.raises(QueueRejected) as e:
        await client.pull(REQ)
    await client.aclose()
    assert e.value.status == status
    assert faulty.calls == 1


async def test_connection_refused_is_retried_then_unavailable():
    client = _client(ls.free_port(), retries=2)
    before = metrics.QUEUE_RETRIES.labels("pull")._value.get()
    t0 = time.monotonic()
    with pytest.raises(QueueUnavailable):
        await client.pull(REQ)
    await client.aclose()
    assert metrics.QUEUE_RETRIES.labels("pull")._value.get() - before == 2
    assert time.monotonic() - t0 < 5
