"""The gateway's edge: what is checked before a request's body is read, in the ASGI layer.

For every route but the open ones (:data:`OPEN_PATHS`: probes, metrics, the API's schema),
that is the client routes (``/v1/...``, ``/v2/...``, ``/rerank``, ...) and the queue routes
(``/queue/v1/...``), in this order:

1. credentials (:class:`gateway.http.auth.Credentials`): 401 without reading the body;
2. the body's size: 413 at once when ``Content-Length`` passes ``--max-body-bytes``, or as soon
   as the bytes read pass it (chunked bodies);
3. the body's arrival: 408 if it has not fully arrived ``--body-timeout`` seconds after the
   request's head.

Errors are in OpenAI's shape (:mod:`gateway.errors`). The worker token's scope goes to the
queue routes in ``request.state.worker_scope``. Plain ASGI (as :class:`RequestMetrics`).
"""

from __future__ import annotations

import asyncio
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.protocol import PREFIX
from gateway.errors import APIError
from gateway.http.auth import Credentials


class _BodyLimit(Exception):
    """The body broke a limit (too large, too slow); raised out of ``receive``."""


#: Paths anyone may call; every other path needs credentials (a route added later is guarded
#: unless it is listed here).
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
#: The upload route, and what a multipart form may add to a file's own bytes.
UPLOADS = "/v1/files"
UPLOAD_OVERHEAD_BYTES = 64 * 1024


class Edge:
    """ASGI middleware: credentials, then body size and arrival time (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        credentials: Credentials,
        max_body_bytes: int,
        body_timeout: float,
        max_upload_bytes: int | None = None,
    ):
        self.app = app
        self.credentials = credentials
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        #: ``POST /v1/files`` (a whole file in a multipart form): its own limit.
        self.max_upload_bytes = max_upload_bytes or max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            if path.startswith(PREFIX + "/"):
                worker_scope = self.credentials.worker(authorization)
                scope.setdefault("state", {})["worker_scope"] = worker_scope
            else:
                self.credentials.client(authorization)
            limit = self.max_body_bytes
            if path == UPLOADS and scope.get("method") == "POST":
                limit = self.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise self._too_large(int(length), limit)
        except APIError as e:
            await _respond(scope, receive, send, e)
            return
        started = False
        seen = 0
        deadline = time.monotonic() + self.body_timeout
        tripped: APIError | None = None  # the limit the body broke, answered instead of the app
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal seen, tripped, body_done
            if body_done:  # e.g. waiting for the client to disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                tripped = APIError(
                    408,
                    f"The request body did not arrive within {self.body_timeout:g} seconds.",
                    code="request_timeout",
                )
                raise _BodyLimit from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    tripped = self._too_large(None, limit)
                    raise _BodyLimit
                body_done = not message.get("more_body", False)
            else:
                body_done = True  # disconnected
            return message

        async def guarded_send(message: Message) -> None:
            # FastAPI answers an error while reading the body with its own 400: replaced.
            nonlocal started
            if tripped is None:
                started = started or message["type"] == "http.response.start"
                await send(message)
            elif not started and message["type"] == "http.response.start":
                started = True
                await _respond(scope, receive, send, tripped)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except _BodyLimit:
            if started or tripped is None:
                raise
            await _respond(scope, receive, send, tripped)

    def _too_large(self, length: int | None, limit: int) -> APIError:
        size = f"{length} bytes" if length is not None else "larger"
        return APIError(
            413,
            f"The request body is {size}; at most {limit} bytes are accepted.",
            code="request_too_large",
        )


async def _respond(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    """The error as :mod:`gateway.errors` renders it, and the connection closed after it: the
    body was not (all) read."""
    headers = {**(error.headers or {}), "Connection": "close"}
    await JSONResponse(error.response_json(), error.status, headers)(scope, receive, send)
