"""The Redis store's connection: its clients (one Redis server or primary, or a Redis Cluster)
and scripts, and every call through :meth:`Connection.call`, which turns connection trouble
into :class:`~gateway.queue.store.StoreUnavailable` (logged once per outage)."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.queue.redis.scripts import Scripts
from gateway.queue.store import StoreUnavailable

log = logging.getLogger("gateway.queue.redis")
T = TypeVar("T")


#: What a call raises when the store cannot be reached (a cluster: no node for the slot).
UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    RedisClusterUnreachableError,
    SlotNotCoveredError,
    OSError,
)
#: URL schemes that name a Redis Cluster (or Valkey cluster), and the scheme of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
#: Connections per cluster node at most (blocking reads hold one each: long polls, replies).
CLUSTER_CONNECTIONS_PER_NODE = 1024


class Connection:
    """``url``: ``redis://[:password@]host:port/db``, ``rediss://`` (TLS), or
    ``redis+cluster://`` / ``rediss+cluster://`` and any node of a Redis Cluster (the others
    are found from it); ``password`` wins over the URL's. ``redis`` serves every call;
    ``replies`` only the reply reader's blocking ``XREAD`` (a client of its own, so that
    closing it ends the read even where redis-py does not act on a task's cancellation)."""

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
        scheme = url.partition("://")[0]
        #: True for a Redis Cluster: a script or a multi-key command touches one slot (the
        #: keys of one model, keys.py), and blocking reads go one model at a time.
        self.cluster = scheme in CLUSTER_SCHEMES
        if self.cluster:
            url = CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
            kwargs["max_connections"] = CLUSTER_CONNECTIONS_PER_NODE
            self.redis: Any = RedisCluster.from_url(url, **kwargs)
            self.replies: Any = RedisCluster.from_url(url, **kwargs)
        else:
            self.redis = aioredis.from_url(url, **kwargs)
            self.replies = aioredis.from_url(url, **kwargs)
        self.scripts = Scripts(self.redis)
        self._reachable = True  # until a call fails (then logged once)
        self._down: set[str] = set()  # a cluster's primaries that did not answer, by name

    async def call(self, op: Awaitable[T]) -> T:
        """Await a Redis call; connection trouble becomes :class:`StoreUnavailable`. An outage
        of one Redis is logged once when it starts and once when it ends; a cluster's nodes
        are logged one by one by :meth:`watch_nodes` (a call knows no node)."""
        try:
            result = await op
        except UNREACHABLE as e:
            if self._reachable and not self.cluster:  # once per outage, not per call
                log.warning("queue store unreachable (Redis: %s); retrying", e)
                self._reachable = False
            raise StoreUnavailable(f"Redis: {e}") from None
        if not self._reachable:  # never false on a cluster
            log.warning("queue store reachable")
            self._reachable = True
        return result

    async def watch_nodes(self) -> bool:
        """A cluster's primaries pinged side by side; a node that stops or starts answering
        is logged (once per change). True if any answers."""
        nodes = self.redis.get_primaries()
        pings = [self.call(self.redis.ping(target_nodes=node)) for node in nodes]
        answers = await asyncio.gather(*pings, return_exceptions=True)
        for node, answer in zip(nodes, answers, strict=True):
            if answer is True and node.name in self._down:
                self._down.discard(node.name)
                log.warning("queue store: Redis Cluster node %s reachable", node.name)
            elif answer is not True and node.name not in self._down:
                self._down.add(node.name)
                log.warning("queue store: Redis Cluster node %s unreachable; retrying", node.name)
        return any(a is True for a in answers)

    async def call_each(self, ops: Sequence[Awaitable[Any]]) -> list[Any]:
        """Await Redis calls side by side, each on its own (in a cluster, a node down fails
        its keys' calls alone); raises the first :class:`StoreUnavailable` once all ended.
        For writes that one Redis takes in one round trip, see :meth:`write_each`."""
        results = await asyncio.gather(*(self.call(op) for op in ops), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, StoreUnavailable):
                raise r
        for r in results:
            if isinstance(r, StoreUnavailable):
                raise r
        return results

    async def each_model(
        self, models: Iterable[str], step: Callable[[str], Awaitable[object]]
    ) -> None:
        """``await step(model)`` for each model in turn. A :class:`StoreUnavailable` (in a
        cluster, a node down: its models' steps alone) does not end the walk: the first is
        raised once every model had its step; any other error ends the walk at once."""
        unreachable: StoreUnavailable | None = None
        for model in models:
            try:
                await step(model)
            except StoreUnavailable as e:
                unreachable = unreachable or e
        if unreachable is not None:
            raise unreachable

    async def write_each(self, build: Callable[[Any], None]) -> None:
        """Commands ``build(client)`` queues on a client: one pipeline (one round trip) on one
        Redis; in a cluster each command on its own (:meth:`call_each`), so that a node down
        fails its keys alone. Raises :class:`StoreUnavailable`."""
        if not self.cluster:
            async with self.redis.pipeline(transaction=False) as p:
                build(p)
                await self.call(p.execute())
            return
        ops: list[Awaitable[Any]] = []
        build(_Collect(self.redis, ops))
        await self.call_each(ops)


class _Collect:
    """A stand-in for a pipeline that calls the client's command at once and keeps the
    awaitable (:meth:`Connection.write_each` in a cluster)."""

    def __init__(self, client: Any, ops: list[Awaitable[Any]]):
        self._client, self._ops = client, ops

    def __getattr__(self, name: str) -> Callable[..., None]:
        command = getattr(self._client, name)
        return lambda *args, **kwargs: self._ops.append(command(*args, **kwargs))


def without_password(url: str) -> str:
    """``url`` with the password of its user info left out (the user name kept)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + parts.netloc.rpartition("@")[2]).geturl()
