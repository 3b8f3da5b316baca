"""HTTP client of the central queue (protocol v1, ``docs/queue-protocol.md``).

Transient failures (connection errors, timeouts, HTTP 5xx and 429) are retried with
exponential backoff and full jitter (a random wait up to ``initial * 2**n``, capped), up to
``queue.http_request_retries`` times; other 4xx answers are not retried and raise
:class:`QueueRejected`.

The calls are made with httpx's API over aiohttp's connections (``httpx-aiohttp``'s
transport; :class:`AiohttpErrorsAsHttpx` names aiohttp's errors as httpx's own transport
does), which costs the worker less CPU per call than httpx's own transport
(``docs/benchmarks.md``); a one-sentence request costs the worker two calls (pull and post).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from pydantic import BaseModel
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from common.protocol import (
    JSON_ONLY,
    PREFIX,
    ItemResult,
    PullRequest,
    PullResponse,
    ReleaseRequest,
    ReleaseResponse,
    ResultEncoding,
    ResultsRequest,
    ResultsResponse,
    WorkItem,
)
from common.results_body import RESULTS_BINARY, encode_results
from worker import metrics
from worker.config import QueueConfig

log = logging.getLogger(__name__)
R = TypeVar("R", bound=BaseModel)


class QueueError(Exception):
    """The queue could not be reached or refused the call."""


class QueueUnavailable(QueueError):
    """Transient failures persisted through every retry."""


class QueueRejected(QueueError):
    """The queue answered 4xx (not 429): retrying the same call will not help."""

    def __init__(self, status: int, body: str):
        super().__init__(f"queue refused the call with HTTP {status}: {body[:300]}")
        self.status = status


#: aiohttp's errors and the httpx errors httpx's own transport raises for the same failure,
#: most specific first (``httpx-aiohttp``'s table calls a refused connection a timeout).
AIOHTTP_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ClientError, httpx.NetworkError),
    (asyncio.TimeoutError, httpx.TimeoutException),
)


class AiohttpErrorsAsHttpx(AiohttpTransport):
    """``httpx-aiohttp``'s transport whose connection errors are the httpx errors httpx's own
    transport raises (``ConnectError`` for a refused connection, ``RemoteProtocolError`` for
    a server gone mid-call, ...): the retry policy and the worker's logs name them alike."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except (httpx.TransportError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            cause = e.__cause__ if isinstance(e, httpx.TransportError) else e
            for theirs, ours in AIOHTTP_ERRORS:
                if isinstance(cause, theirs):
                    raise ours(str(cause) or type(cause).__name__, request=request) from cause
            raise


def is_transient(exc: BaseException) -> bool:
    """Connection errors, timeouts, 5xx and 429 are worth retrying."""
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return code >= 500 or code == 429
    return False


class QueueClient:
    """Talks to the queue at ``base_url`` with a worker token (``Authorization: Bearer``)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        retries: int = 7,
        timeout_seconds: float = 10.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        """``transport``: httpx's, e.g. ``httpx.ASGITransport(app)`` to talk to a gateway app in
        this process (the fast tests); default: HTTP over the network, through aiohttp."""
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=8)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_seconds,
            transport=transport or AiohttpErrorsAsHttpx(limits=limits),
        )
        self._retries = retries
        self._timeout = timeout_seconds
        #: The results bodies the queue said (in its last pull answer) it takes.
        self.result_encodings: list[ResultEncoding] = list(JSON_ONLY)
        self._wait = wait_random_exponential(multiplier=backoff_initial, max=backoff_max)

    @classmethod
    def for_config(cls, queue: QueueConfig) -> QueueClient:
        """The client a worker's ``[queue]`` table describes (``token`` resolved by
        :func:`worker.config.load_config`)."""
        return cls(
            queue.url,
            queue.token or "",
            retries=queue.http_request_retries,
            timeout_seconds=queue.http_timeout_seconds,
        )

    async def pull(self, req: PullRequest) -> list[WorkItem]:
        """Lease up to ``req.max_items`` items; may wait ``req.wait_seconds`` at the queue."""
        timeout = self._timeout + req.wait_seconds
        resp = await self._call("pull", "/pull", _json(req), PullResponse, timeout)
        self.result_encodings = resp.result_encodings
        return resp.items

    async def post_results(self, worker_id: str, results: list[ItemResult]) -> ResultsResponse:
        """Post results; safe to repeat (the queue ignores results it already has). As a binary
        body (:data:`~common.results_body.RESULTS_BINARY`) where the queue takes one, else JSON."""
        if "binary" in self.result_encodings:
            body = (encode_results(worker_id, results), RESULTS_BINARY)
        else:
            encoded = [r.encoded() for r in results]  # the worker's are left unencoded
            body = _json(ResultsRequest(worker_id=worker_id, results=encoded))
        return await self._call("results", "/results", body, ResultsResponse, self._timeout)

    async def release(
        self, worker_id: str, items: list[WorkItem], count_attempt: bool = False
    ) -> int:
        """Hand leased items back to the queue at once (``count_attempt``: see
        :class:`~common.protocol.ReleaseRequest`). Returns how many it took back."""
        req = ReleaseRequest(
            worker_id=worker_id,
            leases=[(i.item_id, i.lease_id) for i in items],
            count_attempt=count_attempt,
        )
        resp = await self._call("release", "/release", _json(req), ReleaseResponse, self._timeout)
        return resp.released

    async def _call(
        self, op: str, path: str, body: tuple[bytes, str], out: type[R], timeout: float
    ) -> R:
        """POST ``body`` (content, content type), with the retries above."""

        def _before_sleep(state: RetryCallState) -> None:
            metrics.QUEUE_RETRIES.labels(op).inc()
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "queue %s failed (%s); retry %d/%d",
                op,
                _short(exc),
                state.attempt_number,
                self._retries,
            )

        payload, content_type = body
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(is_transient),
                stop=stop_after_attempt(self._retries + 1),
                wait=self._wait,
                before_sleep=_before_sleep,
                reraise=True,
            ):
                with attempt:
                    r = await self._http.post(
                        path,
                        content=payload,
                        timeout=timeout,
                        headers={"Content-Type": content_type},
                    )
                    r.raise_for_status()
                    return out.model_validate_json(r.content)
        except httpx.HTTPStatusError as e:
            metrics.QUEUE_ERRORS.labels(op, str(e.response.status_code)).inc()
            if is_transient(e):
                raise QueueUnavailable(f"queue {op}: HTTP {e.response.status_code}") from None
            raise QueueRejected(e.response.status_code, e.response.text) from None
        except httpx.TransportError as e:
            metrics.QUEUE_ERRORS.labels(op, type(e).__name__).inc()
            raise QueueUnavailable(f"queue {op}: {_short(e)}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._http.aclose()


def _json(body: BaseModel) -> tuple[bytes, str]:
    return body.model_dump_json(exclude_none=True).encode(), "application/json"


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
