"""The Redis store itself: a thin :class:`~gateway.queue.store.QueueStore` over the package's
parts, with the replica's lifecycle (heartbeat, lease reaping, forgetting dead models) and the
views behind ``/metrics`` and ``/v1/models``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.protocol import ItemResult, ItemSpec, ModelAdvert, WorkItem
from gateway.queue.redis import keys
from gateway.queue.redis.batches import BatchRecords
from gateway.queue.redis.connection import Connection
from gateway.queue.redis.keys import GROUP, PREFIX
from gateway.queue.redis.leases import Leases
from gateway.queue.redis.replies import Replies
from gateway.queue.redis.submit import Submissions
from gateway.queue.redis.workers import Workers
from gateway.queue.store import (
    BatchIndex,
    Completion,
    QueueStore,
    Request,
    StoreUnavailable,
    count_advert,
)

log = logging.getLogger("gateway.queue.redis")

#: Seconds between two heartbeats of a replica.
HEARTBEAT_SECONDS = 5.0
#: Seconds a replica's heartbeat key (and its reply stream) outlives its last beat: inputs of
#: a replica silent this long are dropped, not worked on for nobody. Long enough to outlast a
#: Redis restart.
REPLICA_TTL_SECONDS = 60
#: Models whose adverts one replica caches (a name a client made up is one of them).
ADVERTS_CACHED = 1024
#: Seconds between two passes over the streams for those of models no worker serves.
FORGET_SECONDS = 60.0
#: The longest each step of :meth:`RedisStore.close` waits.
CLOSE_SECONDS = 5.0


class RedisStore(QueueStore):
    """:class:`~gateway.queue.store.QueueStore` on Redis Streams (see the package).

    ``url``: ``redis://[:password@]host:port/db`` or ``rediss://`` (TLS); ``password`` (e.g.
    read from ``GATEWAY_QUEUE_PASSWORD_FILE``) wins over the URL's."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        worker_ttl_seconds: float = 30.0,
        max_queued: int = 100_000,
        max_queued_batch: int | None = None,
        advert_ttl_seconds: float = 3600.0,
    ):
        super().__init__(
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            worker_ttl_seconds=worker_ttl_seconds,
            max_queued=max_queued,
            max_queued_batch=max_queued_batch,
            advert_ttl_seconds=advert_ttl_seconds,
        )
        self.conn = Connection(url, password)
        self.redis = self.conn.redis
        self.replica = uuid.uuid4().hex[:12]
        self.leases = Leases(self.conn)
        self.replies = Replies(self.conn, self.replica)
        self.submissions = Submissions(
            self.conn, self.replies, self.replica, self.queue_limit, REPLICA_TTL_SECONDS
        )
        self.workers = Workers(
            self.conn,
            self.leases,
            self.replies,
            replica=self.replica,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            worker_ttl=worker_ttl_seconds,
            advert_ttl=advert_ttl_seconds,
            advert=self.advert,
        )
        self.batches = BatchRecords(self.conn)
        #: model -> (monotonic s, advert or None), at most :data:`ADVERTS_CACHED` models.
        self._adverts: OrderedDict[str, tuple[float, ModelAdvert | None]] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._forgotten_at = 0.0  # monotonic s of the last pass over dead models' streams

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.leases.agree()
            await self.batches.index_old_records()
        self._tasks = [asyncio.create_task(self._background(), name="redis-beat-reap")]

    async def close(self) -> None:
        """Stop the background tasks and leave Redis; every step bounded (``CLOSE_SECONDS``
        each), so a stuck connection cannot hold a closing gateway."""
        self.replies.closing = True
        readers = list(self.replies.readers.values())
        for task in [*self._tasks, *readers, *self.submissions.tasks]:
            task.cancel()
        await _bounded(self.conn.replies.aclose())
        if self._tasks or readers:
            await asyncio.wait([*self._tasks, *readers], timeout=CLOSE_SECONDS)
        await _bounded(self._leave())
        await _bounded(self.redis.aclose())

    async def _leave(self) -> None:
        """Delete this replica's heartbeats and reply streams (a call per model: in a cluster
        each model's keys are in its slot)."""
        mine = [(keys.replica(m, self.replica), self.replies.key(m)) for m in self.replies.readers]
        await asyncio.gather(*(self.redis.delete(*pair) for pair in mine))

    async def ping(self) -> bool:
        """True while Redis answers; on a cluster, while any primary answers (a node down
        stops its models alone, not the replica)."""
        if self.conn.cluster:
            return await self.conn.watch_nodes()
        try:
            await self.conn.call(self.redis.ping())
        except StoreUnavailable:
            return False
        return True

    async def _beat(self) -> None:
        """The replica's heartbeat beside each model it has had clients of (with its reply
        stream's TTL) and those models in :data:`~.keys.MODELS`
        (:meth:`~.connection.Connection.write_each`: in a cluster a node down stops the beats
        of its models alone)."""
        models = list(self.replies.readers)

        def writes(r: Any) -> None:
            r.sadd(keys.MODELS, *models)  # walked by reaping and counts
            for model in models:
                r.set(keys.replica(model, self.replica), "1", ex=REPLICA_TTL_SECONDS)
                r.expire(self.replies.key(model), REPLICA_TTL_SECONDS)

        if models:
            await self.conn.write_each(writes)

    async def _background(self) -> None:
        """Heartbeat, the lease key, lease reaping, every :data:`HEARTBEAT_SECONDS` (reaping
        also at every pull), and the streams of models no worker serves dropped; each step on
        its own (one failing does not skip the others); survives Redis outages; ends once the
        store closes."""
        while not self.replies.closing:
            await asyncio.sleep(min(HEARTBEAT_SECONDS, self.lease_seconds / 2))
            self.workers.forget_handed()
            forget = time.monotonic() - self._forgotten_at >= min(FORGET_SECONDS, self.advert_ttl)
            steps: list[Callable[[], Awaitable[object]]] = [self._beat, self.leases.agree]
            steps.append(self.reap)
            if self.conn.cluster:
                steps.append(self.conn.watch_nodes)
            for step in [*steps, self._forget_models] if forget else steps:
                try:
                    await step()
                except StoreUnavailable:
                    pass  # logged by the connection, once per outage
                except RedisError as e:
                    log.warning("queue store: %s", e)

    async def _forget_models(self) -> None:
        """Drop the empty streams of models whose adverts expired (the advert TTL): what
        workers advertise and then abandon costs nothing after that."""
        self._forgotten_at = time.monotonic()
        deleted = 0

        async def forget_model(model: str) -> None:
            nonlocal deleted
            n, left = await self.conn.call(
                self.conn.scripts.forget.of_model(model, [PREFIX, GROUP])
            )
            deleted += int(n)
            if not left:  # taken up again by its workers' next registration, if any
                await self.conn.call(self.redis.srem(keys.MODELS, model))

        try:  # a cluster node down skips its models alone
            await self.conn.each_model(await self._models(), forget_model)
        finally:
            if deleted:
                log.info("dropped %d empty streams of models no worker serves", deleted)

    # --- client side --------------------------------------------------------------------
    async def submit(self, specs: list[ItemSpec]) -> Request:
        return await self.submissions.submit(specs)

    async def cancel(self, request: Request) -> None:
        await self.submissions.cancel(request)

    async def any_taken(self, request: Request) -> bool:
        return await self.submissions.any_taken(request)

    # --- worker side --------------------------------------------------------------------
    def item_model(self, item_id: str) -> str | None:
        """From the item id (``<entry>/<input>@<stream key>``): the stream key names the model;
        None for an id that names no queue entry (:data:`~.keys.ITEM_ID`)."""
        return keys.model_of_item(item_id) if keys.ITEM_ID.match(item_id) else None

    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
        max_batch_items: int | None = None,
    ) -> list[WorkItem]:
        return await self.workers.pull(
            worker_id, adverts, max_items, wait_seconds, max_tokens, max_batch_items
        )

    async def complete(self, worker_id: str, results: list[ItemResult]) -> Completion:
        return await self.workers.complete(worker_id, results)

    async def release(
        self, worker_id: str, leases: list[tuple[str, str]], count_attempt: bool = False
    ) -> int:
        return await self.workers.release(worker_id, leases, count_attempt)

    async def reap(self) -> None:
        await self.workers.reap()

    # --- batch jobs ---------------------------------------------------------------------
    async def save_batch(self, batch_id: str, record: str, index: BatchIndex) -> None:
        await self.batches.save(batch_id, record, index)

    async def load_batch(self, batch_id: str) -> str | None:
        return await self.batches.load(batch_id)

    async def running_batches(self, owner: str | None = None) -> list[str]:
        return await self.batches.running(owner)

    async def owner_batches(
        self, owner: str, after: str | None, limit: int
    ) -> tuple[list[str], bool]:
        return await self.batches.page(owner, after, limit)

    async def trim_batches(self, owner: str, keep: int) -> list[str]:
        return await self.batches.trim(owner, keep)

    async def expire_batches(self, ended_before: float) -> list[str]:
        return await self.batches.expire(ended_before)

    async def claim_batch(self, batch_id: str, runner: str, seconds: float) -> bool:
        return await self.batches.claim(batch_id, runner, seconds)

    async def cancel_batch(self, batch_id: str) -> int:
        return await self.batches.cancel(batch_id)

    async def batch_cancelled(self, batch_id: str) -> int | None:
        return await self.batches.cancelled(batch_id)

    # --- views --------------------------------------------------------------------------
    async def _models(self) -> list[str]:
        """The models with keys: :data:`~.keys.MODELS`, and those this replica knows (its
        clients', its workers'), which are all it has while that set cannot be read (in a
        cluster, its node down)."""
        return await self.workers.registry.models()

    async def _queue_counts(self) -> list[tuple[str, int, int]]:
        """(model, waiting, leased) inputs: a COUNTS call per model, side by side."""
        models = await self._models()
        counts = self.conn.scripts.counts
        found = await self.conn.call_each([counts.of_model(m, [PREFIX, GROUP]) for m in models])
        return [
            (model, max(0, int(unanswered) - int(leased)), int(leased))
            for model, (unanswered, leased) in zip(models, found, strict=True)
        ]

    async def depth(self) -> dict[str, int]:
        return {model: waiting for model, waiting, _ in await self._queue_counts() if waiting}

    async def leased(self) -> dict[str, int]:
        return {model: leased for model, _, leased in await self._queue_counts() if leased}

    async def _workers(self) -> AsyncIterator[list[ModelAdvert]]:
        found = [k async for k in self.redis.scan_iter(match=keys.worker("*"), count=500)]
        if not found:
            return
        mget = self.redis.mget_nonatomic if self.conn.cluster else self.redis.mget
        blobs: Any = await self.conn.call(mget(found))
        for blob in blobs:
            if blob is not None:
                yield [ModelAdvert.model_validate(a) for a in json.loads(blob)]

    async def available_models(self) -> dict[str, tuple[ModelAdvert, int]]:
        out: dict[str, tuple[ModelAdvert, int]] = {}
        try:
            async for adverts in self._workers():
                for adv in adverts:
                    count_advert(out, adv)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"Redis: {e}") from None
        return out

    async def advert(self, model: str) -> ModelAdvert | None:
        """The model's latest advert (cached for a second: every client request asks; at most
        :data:`ADVERTS_CACHED` models, the oldest looked up dropped first: clients choose the
        names)."""
        at, cached = self._adverts.get(model, (0.0, None))
        if time.monotonic() - at < 1.0:
            return cached
        blob = await self.conn.call(self.redis.get(keys.advert(model)))
        advert = ModelAdvert.model_validate_json(blob) if blob is not None else None
        self._adverts.pop(model, None)
        self._adverts[model] = (time.monotonic(), advert)
        while len(self._adverts) > ADVERTS_CACHED:
            self._adverts.popitem(last=False)
        return advert


async def _bounded(step: Awaitable[object]) -> None:
    """One step of :meth:`RedisStore.close`: given up after :data:`CLOSE_SECONDS`, and its
    Redis or connection error ignored (the store is going away)."""
    with contextlib.suppress(TimeoutError, RedisError, OSError):
        async with asyncio.timeout(CLOSE_SECONDS):
            await step
