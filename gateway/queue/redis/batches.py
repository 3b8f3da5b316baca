"""Batch records in Redis: the records (a hash by batch id) and their indexes, kept together by
one script (``lua/save_batch.lua``): by owner (a sorted set by creation), the running ones (a
set of all, one per owner), the ended ones (a sorted set by end), each batch's owner; and the
cancels and the runner claims (:data:`~.keys.BATCH_CANCELS`, :func:`~.keys.batch_runner`)."""

from __future__ import annotations

import time
from typing import Any

from gateway.queue.redis import keys
from gateway.queue.redis.connection import Connection
from gateway.queue.redis.keys import BATCHES
from gateway.queue.store import BatchIndex

BY_OWNER = f"{BATCHES}:by-owner:"
RUNNING = f"{BATCHES}:running"
ENDED = f"{BATCHES}:ended"
OWNERS = f"{BATCHES}:owners"
#: Set once the records of a gateway from before the indexes are indexed.
INDEXED = f"{BATCHES}:indexed"


class BatchRecords:
    """The batch half of :class:`~gateway.queue.store.QueueStore` on Redis."""

    def __init__(self, conn: Connection):
        self.conn = conn

    async def save(self, batch_id: str, record: str, index: BatchIndex) -> None:
        ended = "" if index.ended_at is None else index.ended_at
        args: list[Any] = [batch_id, record, index.created_at, ended, index.owner]
        owner = index.owner
        streams = [BATCHES, BY_OWNER + owner, RUNNING, f"{RUNNING}:{owner}", ENDED, OWNERS]
        await self.conn.call(self.conn.scripts.save_batch(keys=streams, args=args))

    async def index_old_records(self) -> None:
        """Index the records kept under the key of the layout before the hash tags
        (:data:`~.keys.OLD_BATCHES`, whether indexed then or not; once per Redis), then drop
        that layout's batch keys."""
        from gateway.batch.models import BatchRecord

        redis = self.conn.redis
        if await self.conn.call(redis.exists(INDEXED)):
            return
        if not self.conn.cluster:  # a cluster never had the old layout (it was refused)
            async for batch_id, raw in redis.hscan_iter(keys.OLD_BATCHES):
                record = BatchRecord.model_validate_json(raw)
                await self.save(batch_id.decode(), raw.decode(), record.index())
            cancels: Any = await self.conn.call(redis.hgetall(keys.OLD_BATCH_CANCELS))
            if cancels:
                await self.conn.call(redis.hset(keys.BATCH_CANCELS, mapping=cancels))
            old = [k async for k in redis.scan_iter(match=f"{keys.OLD_BATCHES}:*", count=500)]
            await self.conn.call(redis.delete(keys.OLD_BATCHES, keys.OLD_BATCH_CANCELS, *old))
        await self.conn.call(redis.set(INDEXED, 1))

    async def load(self, batch_id: str) -> str | None:
        raw: Any = await self.conn.call(self.conn.redis.hget(BATCHES, batch_id))
        return raw.decode() if raw is not None else None

    async def running(self, owner: str | None = None) -> list[str]:
        key = RUNNING + (f":{owner}" if owner is not None else "")
        ids: Any = await self.conn.call(self.conn.redis.smembers(key))
        return [i.decode() for i in ids]

    async def page(self, owner: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        redis, index = self.conn.redis, BY_OWNER + owner
        start = 0
        if after is not None:
            rank = await self.conn.call(redis.zrevrank(index, after))
            if rank is None:
                return [], False
            start = int(rank) + 1
        ids: Any = await self.conn.call(redis.zrevrange(index, start, start + limit))
        page = ids[:limit]
        records: Any = await self.conn.call(redis.hmget(BATCHES, page)) if page else []
        return [r.decode() for r in records if r is not None], len(ids) > limit

    async def trim(self, owner: str, keep: int) -> list[str]:
        redis, index = self.conn.redis, BY_OWNER + owner
        over = int(await self.conn.call(redis.zcard(index))) - keep
        if over <= 0:
            return []
        # the oldest first; running ones (at most --max-batches-per-key) are passed over
        oldest: Any = await self.conn.call(redis.zrange(index, 0, over + 64))
        async with redis.pipeline(transaction=False) as p:
            for batch_id in oldest:
                p.zscore(ENDED, batch_id)
            ended = await self.conn.call(p.execute())
        gone = [i.decode() for i, at in zip(oldest, ended, strict=True) if at is not None]
        return await self._drop(gone[:over])

    async def expire(self, ended_before: float) -> list[str]:
        query = self.conn.redis.zrangebyscore(ENDED, "-inf", f"({ended_before}", 0, 100)
        ids: Any = await self.conn.call(query)
        return await self._drop([i.decode() for i in ids])

    async def _drop(self, batch_ids: list[str]) -> list[str]:
        """Forget the batches: records, indexes, cancels, runner claims. Their records."""
        if not batch_ids:
            return []
        redis = self.conn.redis
        raws: Any = await self.conn.call(redis.hmget(BATCHES, batch_ids))
        owners: Any = await self.conn.call(redis.hmget(OWNERS, batch_ids))
        async with redis.pipeline(transaction=True) as p:
            for batch_id, owner in zip(batch_ids, owners, strict=True):
                if owner is not None:
                    p.zrem(BY_OWNER + owner.decode(), batch_id)
                    p.srem(f"{RUNNING}:{owner.decode()}", batch_id)
                p.hdel(BATCHES, batch_id)
                p.hdel(OWNERS, batch_id)
                p.srem(RUNNING, batch_id)
                p.zrem(ENDED, batch_id)
                p.hdel(keys.BATCH_CANCELS, batch_id)
                p.delete(keys.batch_runner(batch_id))
            await self.conn.call(p.execute())
        return [raw.decode() for raw in raws if raw is not None]

    async def claim(self, batch_id: str, runner: str, seconds: float) -> bool:
        ms = max(1, int(seconds * 1000))
        claim = self.conn.scripts.claim(keys=[keys.batch_runner(batch_id)], args=[runner, ms])
        return bool(await self.conn.call(claim))

    async def cancel(self, batch_id: str) -> int:
        redis = self.conn.redis
        await self.conn.call(redis.hsetnx(keys.BATCH_CANCELS, batch_id, int(time.time())))
        return int(await self.conn.call(redis.hget(keys.BATCH_CANCELS, batch_id)))

    async def cancelled(self, batch_id: str) -> int | None:
        raw: Any = await self.conn.call(self.conn.redis.hget(keys.BATCH_CANCELS, batch_id))
        return int(raw) if raw is not None else None
