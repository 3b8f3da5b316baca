"""Connection hygiene the HTTP server (uvicorn) does not do itself, per listener:

- a deadline for a request's head (``--header-timeout``): uvicorn times out idle keep-alive
  connections, but a client that opens a connection and sends its head slowly (or never)
  would hold it for good;
- a deadline for an answer the client does not take (``--write-timeout``): with the send
  buffer full, the connection is closed instead of pinning the answer;
- a connection budget (``--max-connections``) that idle connections cannot exhaust: at the
  limit, a new connection closes the connection idle longest (between requests, or not yet a
  whole request head), and is refused with a 503 only when every connection is serving a
  request. uvicorn's own ``limit_concurrency`` counts idle connections and answers 503 to
  everyone once they fill it.

See :func:`gateway_protocol`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

#: What a connection over the budget is told before it is closed (OpenAI's error shape).
_BUSY = json.dumps(
    {
        "error": {
            "message": "The server is serving as many requests as it takes; try again shortly.",
            "type": "server_error",
            "param": None,
            "code": "overloaded",
        }
    }
).encode()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY)).encode()
    + b"\r\n\r\n"
    + _BUSY
)


class Budget:
    """The open connections of one listener: at most ``limit``; the idle ones in the order
    they became idle (oldest first), so that a new connection closes the oldest."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: set[Any] = set()
        self.idle: OrderedDict[Any, None] = OrderedDict()
        #: Connections closed to make room, and refused with a 503 (all serving requests).
        self.evicted = 0
        self.refused = 0

    def idle_now(self, conn: Any) -> None:
        self.idle.pop(conn, None)
        self.idle[conn] = None

    def make_room(self, new: Any) -> bool:
        """Room for ``new`` (already counted): True if within the limit or an idle connection
        was closed for it; False if every other connection is serving a request."""
        if len(self.open) <= self.limit:
            return True
        while self.idle:
            conn = next(iter(self.idle))  # the oldest (``new`` is the newest)
            if conn is new:
                return False
            del self.idle[conn]
            if conn.serving():  # busy since it became idle: back in line when it is done
                continue
            conn.transport.close()
            self.evicted += 1
            return True
        return False

    def forget(self, conn: Any) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)


def gateway_protocol(
    head_timeout: float, write_timeout: float, budget: Budget
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with the head and
    write deadlines (seconds) and the connection ``budget`` of one listener. Pass as
    ``uvicorn.Config(http=...)``, with ``limit_concurrency`` unset. A request being served
    (its head complete) is never closed for the head deadline or the budget."""
    base: Any
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - httptools is not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class GatewayProtocol(base):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def serving(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            budget.open.add(self)
            budget.idle_now(self)
            if not budget.make_room(self):
                budget.refused += 1
                budget.forget(self)
                transport.write(BUSY_RESPONSE)
                transport.close()
                return
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                budget.idle_now(self)
                self._arm_head_timer()  # the next request's head

        def connection_lost(self, exc: Exception | None) -> None:
            budget.forget(self)
            for timer in (self._head_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.serving() and not self.transport.is_closing():
                log.debug("closing a connection without a request head after %g s", head_timeout)
                self.transport.close()

        def _write_timed_out(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection whose client took no data for %g s", write_timeout)
                self.transport.abort()  # what is buffered for it goes too

    return GatewayProtocol
