"""Helpers of the fast test layer: a clock tests advance, the fake engine (named as one), and
metric readers."""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client import Counter

from common.protocol import ErrorCode, ItemResult, WorkItem
from worker.engine import EngineDead, InvalidInput, Prompt

#: all-MiniLM-L6-v2's config and tokenizer, no weights (``data/all-minilm-l6-v2-tokenizer``):
#: what the fast layer reads of a model, without the model package.
MINILM_FILES = Path(__file__).resolve().parents[2] / "data" / "all-minilm-l6-v2-tokenizer"


class FakeClock:
    """A monotonic clock that moves only when told (:meth:`advance`)."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def counter(metric: Counter, *labels: str) -> float:
    """The current value of one labelled series of a prometheus-client counter."""
    return float(metric.labels(*labels)._value.get())


class FakeEngine:
    """FAKE of :class:`worker.engine.Engine` for the fast layer (no vLLM, no model).

    A text embeds as ``[len(text), words]``; its prompt is the text's character codes. Texts
    steer failures: ``invalid:...`` (InvalidInput when run), ``bad-prompt:...`` (InvalidInput
    when prepared), ``crash-once:...`` (RuntimeError on its first run only), ``crash:...``
    (always), ``die:...`` (the engine dies), ``slow:<seconds>:...`` (runs that long).
    Records the runs, and the peak of concurrent runs and of their prompt tokens.
    """

    def __init__(self, max_num_batched_tokens: int = 2048):
        self.max_num_batched_tokens = max_num_batched_tokens
        self.alive = True
        self.runs: list[tuple[str, int]] = []  # (text, attempt)
        self.running = 0
        self.peak_running = 0
        self.tokens_running = 0
        self.peak_tokens = 0
        self.batch_running = 0  # batch-job (priority) inputs among the runs
        self.peak_batch_running = 0
        self.prepared_batches: list[int] = []
        self._crashed: set[str] = set()
        self.tokenizer: Any = None

    async def prepare(self, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        self.prepared_batches.append(len(items))
        out: list[Prompt | InvalidInput] = []
        for item in items:
            text = item.text or ""
            if text.startswith("bad-prompt:"):
                out.append(InvalidInput(ErrorCode.INVALID_PROMPT_TEMPLATE, "prompt_template: bad"))
            else:
                out.append([ord(c) for c in text])
        return out

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray, int]:
        text = item.text or ""
        self.runs.append((text, item.attempt))
        self.running += 1
        self.tokens_running += item.est_tokens
        self.peak_running = max(self.peak_running, self.running)
        self.peak_tokens = max(self.peak_tokens, self.tokens_running)
        self.batch_running += bool(item.priority)
        self.peak_batch_running = max(self.peak_batch_running, self.batch_running)
        try:
            if text.startswith("slow:"):
                await asyncio.sleep(float(text.split(":")[1]))
            else:
                await asyncio.sleep(0)
            if text.startswith("invalid:"):
                raise InvalidInput(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "input has 999 tokens")
            if text.startswith("crash:") or (
                text.startswith("crash-once:") and text not in self._crashed
            ):
                self._crashed.add(text)
                raise RuntimeError("injected crash")
            if text.startswith("die:"):
                self.alive = False
                raise EngineDead("injected engine death")
            return np.array([len(text), len(text.split())], dtype=np.float32), len(prompt)
        finally:
            self.running -= 1
            self.tokens_running -= item.est_tokens
            self.batch_running -= bool(item.priority)

    async def tokenize(self, items: list[WorkItem]) -> list[ItemResult]:
        """``tokenize`` items, by the real worker code on MiniLM's real tokenizer."""
        from transformers import AutoTokenizer

        from worker.engine.tokenize import tokenize

        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(str(MINILM_FILES))
        return [tokenize(self.tokenizer, item) for item in items]

    async def log_stats(self) -> None:
        pass


class FaultyTransport(httpx.AsyncBaseTransport):
    """FAULT INJECTION around a real transport: the next ``fail[path]`` calls to a path end
    in a connection error (``status`` None) or an HTTP status, the gateway never seeing them.
    The real gateway cannot be made to fail like this on demand."""

    def __init__(self, inner: httpx.AsyncBaseTransport):
        self.inner = inner
        self.fail: dict[str, int] = {}
        self.status: int | None = None
        self.calls: dict[str, int] = {}
        self.pulls: list[dict[str, Any]] = []  # every pull's request body, as sent

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] = self.calls.get(path, 0) + 1
        if path.endswith("/pull"):
            self.pulls.append(json.loads(request.content))
        if self.fail.get(path, 0) > 0:
            self.fail[path] -= 1
            if self.status is None:
                raise httpx.ConnectError("injected: queue unreachable", request=request)
            return httpx.Response(self.status, json={"error": "injected"}, request=request)
        return await self.inner.handle_async_request(request)


def worker_config(**queue: Any) -> dict[str, Any]:
    """A worker config (edition 1) for the fast tests, as the dict a TOML file would give."""
    return {
        "edition": 1,
        "generator": {"model_path": "/fake-model", "max_num_seqs": 8},
        "queue": {
            "url": "http://gateway",
            "token": "worker-token-for-tests",
            "checkpoint_name": "fake",
            "pull_wait_seconds": 1,
            "models": {"fake": {"embedding_task": {"supported": True}}},
            **queue,
        },
        "drain_timeout_seconds": 5,
    }


def make_store(kind: str, redis_url: str | None, clock: FakeClock, **settings: Any) -> Any:
    """A queue store of ``kind`` (``memory`` on ``clock``, or ``redis`` at ``redis_url``)."""
    if kind == "memory":
        from gateway.queue.memory import MemoryStore

        return MemoryStore(clock=clock, **settings)
    from gateway.queue.redis import RedisStore

    assert redis_url is not None
    return RedisStore(redis_url, **settings)


def rerun(module: Any, fixtures: set[str]) -> dict[str, Any]:
    """The tests of ``module`` that take any of ``fixtures`` (the store-level tests of the unit
    layer), by name: put in another module's namespace, they run again there, on that
    module's ``store_kind``."""
    out = {}
    for name, test in vars(module).items():
        parameters = inspect.signature(test).parameters if inspect.isfunction(test) else {}
        if name.startswith("test_") and fixtures & set(parameters):
            out[name] = test
    return out


async def pull_waiting(store: Any) -> bool:
    """True while a long poll waits in ``store``: on the memory store an open pull of any
    worker (it holds the loop only between its awaits), on Redis a client blocked in
    ``XREADGROUP`` (``CLIENT LIST`` flag ``b``)."""
    from gateway.queue.memory import MemoryStore

    if isinstance(store, MemoryStore):
        return any(w.pulls_open for w in store._workers.values())
    if store.conn.cluster:  # every node's clients
        by_node = await store.redis.client_list(target_nodes="all")
        clients = [c for node in by_node.values() for c in node]
    else:
        clients = await store.redis.client_list()
    return any("b" in c.get("flags", "") for c in clients)


async def age(kind: str, clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` pass for the store: the memory store's clock at once, Redis' in real
    time (its tests use sub-second leases)."""
    if kind == "memory":
        clock.advance(seconds)
    else:
        await asyncio.sleep(seconds)


class InProcessGateway:
    """The real gateway app (:func:`gateway.app.create_app`) in this process, reached over
    ``httpx.ASGITransport``: ``client`` with an API key, ``worker`` with a worker token (on
    ``/queue/v1``). On the memory store (``clock``) unless ``queue_url`` names a Redis. Use as
    ``async with InProcessGateway(clock, **settings) as gw``."""

    API_KEY = "client-key-for-tests"
    WORKER_TOKEN = "worker-token-for-tests"

    def __init__(self, clock: Any = None, **settings: Any):
        import tempfile
        import time

        from gateway.app import create_app
        from gateway.settings import GatewaySettings

        settings.setdefault("files_dir", tempfile.mkdtemp(prefix="gateway-files-"))
        settings.setdefault("api_keys", [self.API_KEY])
        self.settings = GatewaySettings(worker_tokens=[self.WORKER_TOKEN], **settings)
        self.app = create_app(self.settings, clock=clock or time.monotonic)
        self.transport = httpx.ASGITransport(app=self.app)
        self.client = httpx.AsyncClient(
            transport=self.transport,
            base_url="http://gateway",
            timeout=30,
            headers={"Authorization": f"Bearer {self.API_KEY}"},
        )
        self.worker = httpx.AsyncClient(
            transport=self.transport,
            base_url="http://gateway/queue/v1",
            timeout=30,
            headers={"Authorization": f"Bearer {self.WORKER_TOKEN}"},
        )
        self._lifespan: Any = None
        #: Seconds of this gateway per second of the memory store's (tests on Redis scale).
        self.scale = 1.0

    @property
    def store(self) -> Any:
        return self.app.state.store

    async def __aenter__(self) -> InProcessGateway:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        await self.worker.aclose()
        await self._lifespan.__aexit__(None, None, None)

    async def metrics(self) -> str:
        return (await self.client.get("/metrics")).text

    async def advertise(self, models: list[dict[str, Any]], worker_id: str = "w") -> None:
        """Make ``models`` known as a worker does: a pull advertising them that takes nothing
        (the queue must be empty)."""
        body = {"worker_id": worker_id, "models": models, "max_items": 1, "wait_seconds": 0}
        assert (await self.worker.post("/pull", json=body)).json()["items"] == []

    async def answer_while(
        self, call: Any, models: list[dict[str, Any]], values: Any, prompt_tokens: int
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Await ``call`` (a client request coroutine) while playing the worker of ``models``:
        pull its items and answer each with ``values(item)`` (a float32 list) and
        ``prompt_tokens``, or with the result fields ``values(item)`` gives as a dict (e.g. a
        tokenize item's ``tokens``). Returns (the response, the items pulled)."""
        import asyncio
        import base64

        import numpy as np

        response = asyncio.ensure_future(call)
        items: list[dict[str, Any]] = []
        while not response.done():
            body = {"worker_id": "w", "models": models, "max_items": 64, "wait_seconds": 0.2}
            got = (await self.worker.post("/pull", json=body)).json()["items"]
            items += got
            if got:
                results = []
                for i in got:
                    answer = values(i)
                    if not isinstance(answer, dict):
                        packed = np.array(answer, dtype="<f4").tobytes()
                        answer = {
                            "prompt_tokens": prompt_tokens,
                            "vector_b64": base64.b64encode(packed).decode(),
                        }
                    results.append({"item_id": i["item_id"], "lease_id": i["lease_id"], **answer})
                await self.worker.post("/results", json={"worker_id": "w", "results": results})
        return await response, items


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (exact family sample name) in a /metrics text whose
    labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        if head != name and not head.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def wait_until(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check()`` (sync or async) every 10 ms until true; fail after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        await asyncio.sleep(0.01)


class RawCall:
    """One request straight into the ASGI app, its body served by ``chunks`` (then, with
    ``stall``, a receive that never returns): records how many body messages were read."""

    def __init__(self, chunks: list[bytes], stall: bool = False, complete: bool = False):
        self.chunks, self.stall, self.reads = list(chunks), stall, 0
        self.complete = complete  # the last chunk ends the body (then a stall is the wait)
        self.status = 0
        self.body = b""
        self.headers: dict[bytes, bytes] = {}

    #: Set to end a stalled receive with ``http.disconnect`` (the client goes away).
    gone: asyncio.Event | None = None

    async def run(
        self, app: Any, path: str, headers: dict[str, str], method: str = "POST"
    ) -> RawCall:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 1),
            "server": ("gateway", 80),
            "state": {},
        }

        async def receive() -> dict[str, Any]:
            self.reads += 1
            if self.chunks:
                chunk = self.chunks.pop(0)
                more = bool(self.chunks) or (self.stall and not self.complete)
                return {"type": "http.request", "body": chunk, "more_body": more}
            if self.gone is not None:
                await self.gone.wait()
            elif self.stall:
                await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.headers = dict(message["headers"])
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")

        await app(scope, receive, send)
        return self

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]
