"""Retry policy of the worker's queue client: 5xx / 429 / connection errors are retried with
backoff up to ``http_request_retries``; other 4xx are not.

FAULT INJECTION: ``FaultInjectingQueue`` is a deliberately broken HTTP server that answers
scripted status codes; the real gateway cannot be made to return them on demand.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Response

from common.protocol import ModelAdvert, PullRequest
from devstack import localstack as ls
from worker import metrics
from worker.queue_client import QueueClient, QueueRejected, QueueUnavailable

#: A scripted status that is no answer at first: the server waits 1 s (past the client's
#: timeout), then answers 200.
HANG = 0


class FaultInjectingQueue:
    """Answers ``/queue/v1/pull`` with the next scripted status (then 200 with no items);
    :data:`HANG` waits a second instead of answering."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.calls = 0
        app = FastAPI()

        @app.post("/queue/v1/pull")
        async def pull() -> Response:
            self.calls += 1
            status = self.script.pop(0) if self.script else 200
            if status == HANG:
                await asyncio.sleep(1.0)
            body = '{"items": []}' if status in (200, HANG) else '{"error": "injected"}'
            return Response(body, status_code=status or 200, media_type="application/json")

        self.port = ls.free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FaultInjectingQueue:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "the fault-injecting server failed to start"
            assert time.monotonic() < deadline, "the fault-injecting server did not start in 30 s"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        assert not self.thread.is_alive(), "the fault-injecting server did not stop in 5 s"


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


@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 413, 422])
async def test_other_4xx_are_not_retried(faulty, status):
    faulty.script = [status]
    client = _client(faulty.port, retries=5)
    with pytest.raises(QueueRejected) as e:
        await client.pull(REQ)
    await client.aclose()
    assert e.value.status == status
    assert faulty.calls == 1


async def test_a_read_timeout_is_retried(faulty):
    """The transport (aiohttp's, behind httpx's API) reports a read timeout as httpx does."""
    faulty.script = [HANG]
    client = QueueClient(
        f"http://127.0.0.1:{faulty.port}", "t", retries=2, timeout_seconds=0.3,
        backoff_initial=0.01, backoff_max=0.05,
    )  # fmt: skip
    before = metrics.QUEUE_RETRIES.labels("pull")._value.get()
    assert await client.pull(REQ) == []
    await client.aclose()
    assert faulty.calls == 2
    assert metrics.QUEUE_RETRIES.labels("pull")._value.get() - before == 1


class DroppingServer:
    """FAULT INJECTION: accepts a connection, reads the request and closes the connection
    without an answer (a gateway that died mid-call)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.calls = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                self.calls += 1


async def test_a_connection_closed_without_an_answer_is_retried_then_unavailable():
    """Named as httpx names it (the worker's log and ``queue_errors_total``)."""
    server = DroppingServer()
    client = _client(server.port, retries=2)
    before = metrics.QUEUE_ERRORS.labels("pull", "RemoteProtocolError")._value.get()
    with pytest.raises(QueueUnavailable, match="RemoteProtocolError: Server disconnected"):
        await client.pull(REQ)
    await client.aclose()
    server.sock.close()
    assert server.calls == 3
    assert metrics.QUEUE_ERRORS.labels("pull", "RemoteProtocolError")._value.get() == before + 1


async def test_connection_refused_is_retried_then_unavailable():
    client = _client(ls.free_port(), retries=2)
    before = metrics.QUEUE_RETRIES.labels("pull")._value.get()
    with pytest.raises(QueueUnavailable, match="ConnectError: Cannot connect to host"):
        await client.pull(REQ)
    await client.aclose()
    assert metrics.QUEUE_RETRIES.labels("pull")._value.get() - before == 2


def test_retries_wait_a_random_time_up_to_an_exponential_cap():
    """Full jitter: the n-th retry waits a random time in [0, min(initial * 2**n, max)]; the
    pull loop's own backoff doubles up to 5 s and stays there."""
    from tenacity import RetryCallState

    from worker.defaults import PULL_BACKOFF

    client = _client(1, retries=7)  # initial 0.01, max 0.05 (see _client)
    waits: dict[int, list[float]] = {}
    for attempt in (1, 2, 3, 6):
        state = RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        waits[attempt] = [client._wait(state) for _ in range(200)]
    for attempt, got in waits.items():
        cap = min(0.01 * 2 ** (attempt - 1), 0.05)
        assert all(0 <= w <= cap + 1e-9 for w in got), (attempt, max(got))
        assert len(set(got)) > 100  # random, not a fixed schedule
    assert max(waits[6]) > 0.04  # the cap is reached, not exceeded
    wait, seen = PULL_BACKOFF.initial, []
    for _ in range(8):
        seen.append(wait)
        wait = PULL_BACKOFF.after(wait)
    assert seen == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
