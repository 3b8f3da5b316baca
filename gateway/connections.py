"""Connection hygiene the HTTP server (uvicorn) does not do itself: a deadline for a request's
head. uvicorn times out idle keep-alive connections, but a client that opens a connection and
sends its request head slowly (or never finishes it) holds the connection for good; many of
them hold the server. See :func:`head_timeout_protocol`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def head_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) that closes a
    connection which has not sent a whole request head ``seconds`` after it opened or after
    its last response. A request being served (its head complete) is not affected. Pass as
    ``uvicorn.Config(http=...)``."""
    base: Any
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover - httptools is not installed
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class HeadTimeoutProtocol(base):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()  # the next request's head

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            serving = self.cycle is not None and not self.cycle.response_complete
            if not serving and not self.transport.is_closing():
                log.debug("closing a connection without a request head after %g s", seconds)
                self.transport.close()

    return HeadTimeoutProtocol
