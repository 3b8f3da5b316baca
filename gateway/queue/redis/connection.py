"""The Redis store's connection: its clients and scripts, and every call through
:meth:`Connection.call`, which turns connection trouble into
:class:`~gateway.queue.store.StoreUnavailable` (logged once per outage)."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.queue.redis.scripts import Scripts
from gateway.queue.store import StoreUnavailable

log = logging.getLogger("gateway.queue.redis")
T = TypeVar("T")


class Connection:
    """``url``: ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS); ``password``
    wins over the URL's. ``redis`` serves every call; ``replies`` only the reply reader's
    blocking ``XREAD`` (a client of its own, so that closing it ends the read even where
    redis-py does not act on a task's cancellation)."""

    def __init__(self, url: str, password: str | None = None):
        kwargs: dict[str, Any] = {
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            # A pooled connection that Redis closed (a restart) is reconnected and the
            # command sent again, twice at most, within about a second; then StoreUnavailable.
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if password is not None:  # redis-py lets the URL's win: it is taken out of the URL
            kwargs["password"] = password
            url = without_password(url)
        self.redis: aioredis.Redis = aioredis.from_url(url, **kwargs)
        self.replies: aioredis.Redis = aioredis.from_url(url, **kwargs)
        self.scripts = Scripts(self.redis)
        self._reachable = True  # until a call fails (then logged once)

    async def call(self, op: Awaitable[T]) -> T:
        """Await a Redis call; connection trouble becomes :class:`StoreUnavailable`."""
        try:
            result = await op
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            if self._reachable:  # logged once per outage, not per call
                log.warning("queue store unreachable (Redis: %s); retrying", e)
            self._reachable = False
            raise StoreUnavailable(f"Redis: {e}") from None
        if not self._reachable:
            log.warning("queue store reachable")
        self._reachable = True
        return result


def without_password(url: str) -> str:
    """``url`` with the password of its user info left out (the user name kept)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + parts.netloc.rpartition("@")[2]).geturl()
