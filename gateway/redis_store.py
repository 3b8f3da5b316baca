"""The Redis queue store: one queue shared by stateless gateway replicas (Redis >= 7 or Valkey),
through the official ``redis`` package's asyncio client.

Data model (every key under ``iw:``):

- ``iw:s:<task>:<model>`` — a Stream per (model, task); one entry per input: ``r`` the replica
  that holds the client's connection, ``s`` the :class:`~worker.protocol.ItemSpec` as JSON,
  ``t`` its estimated tokens. Consumer group ``workers``; a worker is a consumer.
- Leases are the group's pending-entries list: a pull claims entries for the worker (delivery
  count = attempt); ``XPENDING ... IDLE <lease>`` finds expired leases, which go back to the
  front by being claimed for the placeholder consumer ``~released`` with an idle time of a
  whole lease (``XCLAIM ... IDLE ... JUSTID``), the way a released input goes back too. A result
  is ``XACK`` + ``XDEL`` of its entry; out of attempts, the dead letter.
- ``iw:reply:<replica>`` — a Stream per gateway replica: results for the clients it holds,
  written by whichever replica a worker posted to, read by its owner (``XREAD BLOCK``).
- ``iw:replica:<replica>`` — the replica's heartbeat (TTL :data:`REPLICA_TTL_SECONDS`); inputs
  of a replica that is gone are dropped instead of processed for nobody.
- ``iw:worker:<worker_id>`` — a worker's adverts, TTL = the worker TTL, refreshed by its pulls
  (also during a long poll); ``iw:advert:<model>`` the latest advert of a model;
  ``iw:streams`` the set of stream keys.

Where two writes must happen together the work is a Lua script (atomic in Redis). Scripts
derive some key names from their arguments: use one Redis server (or a primary), not a Redis
Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import metrics
from gateway.store import (
    Completion,
    QueueFull,
    QueueStore,
    Request,
    StoreUnavailable,
    check_result,
)
from worker.protocol import ItemResult, ItemSpec, ModelAdvert, WorkItem

log = logging.getLogger(__name__)
T = TypeVar("T")
V = TypeVar("V")

PREFIX = "iw:"
GROUP = "workers"
RELEASED = "~released"
#: Seconds an answer that arrived before its request's futures is kept for them.
EARLY_RESULT_SECONDS = 60.0
#: Seconds between two heartbeats of a replica.
HEARTBEAT_SECONDS = 5.0
#: Seconds a replica's heartbeat key (and its reply stream) outlives its last beat: inputs of
#: a replica silent this long are dropped, not worked on for nobody. Long enough to outlast a
#: Redis restart.
REPLICA_TTL_SECONDS = 60

_LUA_HELPERS = """
local function tbl(a) local t = {} for i = 1, #a, 2 do t[a[i]] = a[i + 1] end return t end
local function dead_letter(key, group, id, replica, deliveries, last_error, prefix)
  local msg = 'the input was delivered to workers ' .. deliveries .. ' times without a result'
  if last_error ~= '' then msg = msg .. ' (the last attempt failed: ' .. last_error .. ')' end
  local result = cjson.encode({item_id = id .. '@' .. key, lease_id = '',
    error = {code = 'max_attempts_exceeded', message = msg .. '; giving up', retryable = false}})
  redis.call('XADD', prefix .. 'reply:' .. replica, '*', 'i', id .. '@' .. key, 'r', result)
  redis.call('XACK', key, group, id)
  redis.call('XDEL', key, id)
end
local function counts(key, group)
  local len = redis.call('XLEN', key)
  local pend = redis.call('XPENDING', key, group)
  local released = 0
  if pend[4] then
    for _, c in ipairs(pend[4]) do if c[1] == '~released' then released = tonumber(c[2]) end end
  end
  return len - pend[1] + released, pend[1] - released
end
"""

#: KEYS: stream, streams set. ARGV: group, limit, replica, then (spec, tokens) pairs.
#: Returns {-1, waiting} over the limit, else {0, ids}.
_SUBMIT = (
    _LUA_HELPERS
    + """
local key, group, limit, replica = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
pcall(redis.call, 'XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
redis.call('SADD', KEYS[2], key)
local waiting = counts(key, group)
local n = (#ARGV - 3) / 2
if waiting + n > limit then return {-1, waiting} end
local ids = {}
for i = 0, n - 1 do
  ids[#ids + 1] = redis.call('XADD', key, '*', 'r', replica, 's', ARGV[4 + 2 * i],
                             't', ARGV[5 + 2 * i])
end
return {0, ids}
"""
)

#: KEYS: stream. ARGV: group, worker, lease_ms, max_items, token budget (-1: none),
#: max_attempts, key prefix, then the worker's registration (none: ''): its adverts as JSON,
#: their TTL in ms, then (model, advert JSON) pairs. Takes expired and released leases first
#: (oldest first), then new entries. Returns {{id, spec, attempt, tokens}..., dead, expired,
#: dropped}.
_PULL = (
    _LUA_HELPERS
    + """
local key, group, worker = KEYS[1], ARGV[1], ARGV[2]
local lease_ms, max_items = tonumber(ARGV[3]), tonumber(ARGV[4])
local budget, max_att, prefix = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
if ARGV[8] ~= '' then
  redis.call('SET', prefix .. 'worker:' .. worker, ARGV[8], 'PX', ARGV[9])
  for i = 10, #ARGV, 2 do redis.call('SET', prefix .. 'advert:' .. ARGV[i], ARGV[i + 1]) end
end
pcall(redis.call, 'XGROUP', 'CREATE', key, group, '0', 'MKSTREAM')
local out, dead, expired, dropped, tokens = {}, 0, 0, 0, 0
local function full() return #out >= max_items or (budget >= 0 and tokens >= budget) end
local function fits(t) return #out == 0 or budget < 0 or tokens + t <= budget end
local function alive(replica) return redis.call('EXISTS', prefix .. 'replica:' .. replica) == 1 end
local waiting = redis.call('XPENDING', key, group, 'IDLE', lease_ms, '-', '+', max_items + 64)
for _, p in ipairs(waiting) do
  if full() then break end
  local id, owner, deliveries = p[1], p[2], tonumber(p[4])
  local entry = redis.call('XRANGE', key, id, id)[1]
  if entry == nil then
    redis.call('XACK', key, group, id)
  else
    local f = tbl(entry[2])
    if not alive(f.r) then
      redis.call('XACK', key, group, id); redis.call('XDEL', key, id); dropped = dropped + 1
    elseif deliveries >= max_att then
      dead_letter(key, group, id, f.r, deliveries, '', prefix); dead = dead + 1
    elseif fits(tonumber(f.t)) then
      redis.call('XCLAIM', key, group, worker, 0, id, 'RETRYCOUNT', deliveries + 1, 'JUSTID')
      out[#out + 1] = {id, f.s, deliveries + 1, f.t}
      tokens = tokens + tonumber(f.t)
      if owner ~= '~released' then expired = expired + 1 end
    end
  end
end
if not full() then
  local got = redis.call('XREADGROUP', 'GROUP', group, worker, 'COUNT', max_items - #out,
                         'STREAMS', key, '>')
  if got then
    for _, entry in ipairs(got[1][2]) do
      local id, f = entry[1], tbl(entry[2])
      if not alive(f.r) then
        redis.call('XACK', key, group, id); redis.call('XDEL', key, id); dropped = dropped + 1
      elseif fits(tonumber(f.t)) then
        out[#out + 1] = {id, f.s, 1, f.t}
        tokens = tokens + tonumber(f.t)
      else  -- does not fit this pull: first in line next time, no attempt spent
        redis.call('XCLAIM', key, group, '~released', 0, id, 'IDLE', lease_ms,
                   'RETRYCOUNT', 0, 'JUSTID')
      end
    end
  end
end
out[#out + 1] = dead; out[#out + 1] = expired; out[#out + 1] = dropped
return out
"""
)

#: ARGV: group, worker, max_attempts, lease_ms, prefix, this replica, then per result: item
#: id, lease deliveries, kind (ok | final | retry), result JSON, error message. Returns a
#: status per result: 'a' accepted (answer in its replica's reply stream, or requeued), 'l'
#: accepted, the client is this replica's (answer it here: no reply stream), 'd' dead letter,
#: 'i' ignored.
_COMPLETE = (
    _LUA_HELPERS
    + """
local group, worker, max_att, lease_ms, prefix, here = ARGV[1], ARGV[2], tonumber(ARGV[3]),
  tonumber(ARGV[4]), ARGV[5], ARGV[6]
local out = {}
for i = 7, #ARGV, 5 do
  local item, lease_d, kind, result, message = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2],
    ARGV[i + 3], ARGV[i + 4]
  local at = string.find(item, '@', 1, true)
  local status, p = 'i', {}
  if at then
    local id, key = string.sub(item, 1, at - 1), string.sub(item, at + 1)
    local ok, pend = pcall(redis.call, 'XPENDING', key, group, 'IDLE', 0, id, id, 1)
    if ok then p = pend end
    if #p == 1 then
      local owner, deliveries = p[1][2], tonumber(p[1][4])
      local entry = redis.call('XRANGE', key, id, id)[1]
      if entry == nil then
        redis.call('XACK', key, group, id)
      elseif kind == 'retry' then
        if owner == worker and deliveries == lease_d then
          if deliveries >= max_att then
            dead_letter(key, group, id, tbl(entry[2]).r, deliveries, message, prefix)
            status = 'd'
          else
            redis.call('XCLAIM', key, group, '~released', 0, id, 'IDLE', lease_ms, 'JUSTID')
            status = 'a'
          end
        end
      else
        local replica = tbl(entry[2]).r
        if replica == here then
          status = 'l'
        else
          redis.call('XADD', prefix .. 'reply:' .. replica, '*', 'i', item, 'r', result)
          status = 'a'
        end
        redis.call('XACK', key, group, id); redis.call('XDEL', key, id)
      end
    end
  end
  out[#out + 1] = status
end
return out
"""
)

#: ARGV: group, worker, lease_ms, count_attempt (0 | 1), then (item id, lease deliveries).
_RELEASE = """
local group, worker, lease_ms, count = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local n = 0
for i = 5, #ARGV, 2 do
  local item, lease_d = ARGV[i], tonumber(ARGV[i + 1])
  local at = string.find(item, '@', 1, true)
  if at then
    local id, key = string.sub(item, 1, at - 1), string.sub(item, at + 1)
    local ok, p = pcall(redis.call, 'XPENDING', key, group, 'IDLE', 0, id, id, 1)
    if ok and #p == 1 and p[1][2] == worker and tonumber(p[1][4]) == lease_d then
      local retry = lease_d
      if not count then retry = lease_d - 1 end
      redis.call('XCLAIM', key, group, '~released', 0, id, 'IDLE', lease_ms,
                 'RETRYCOUNT', retry, 'JUSTID')
      n = n + 1
    end
  end
end
return n
"""

#: KEYS: stream. ARGV: group, lease_ms, max_attempts, prefix. Returns {expired, dead}.
_REAP = (
    _LUA_HELPERS
    + """
local key, group, lease_ms, max_att, prefix = KEYS[1], ARGV[1], tonumber(ARGV[2]),
  tonumber(ARGV[3]), ARGV[4]
local expired, dead = 0, 0
local ok, pend = pcall(redis.call, 'XPENDING', key, group, 'IDLE', lease_ms, '-', '+', 1000)
if not ok then return {0, 0} end
for _, p in ipairs(pend) do
  local id, owner, deliveries = p[1], p[2], tonumber(p[4])
  if owner ~= '~released' then
    local entry = redis.call('XRANGE', key, id, id)[1]
    if entry == nil then
      redis.call('XACK', key, group, id)
    elseif deliveries >= max_att then
      dead_letter(key, group, id, tbl(entry[2]).r, deliveries, '', prefix); dead = dead + 1
    else
      redis.call('XCLAIM', key, group, '~released', 0, id, 'IDLE', lease_ms, 'JUSTID')
      expired = expired + 1
    end
  end
end
return {expired, dead}
"""
)

#: KEYS: streams set. Returns {key, waiting, leased, ...}.
_COUNTS = (
    _LUA_HELPERS
    + """
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ok, waiting, leased = pcall(counts, key, 'workers')
  if ok then out[#out + 1] = key; out[#out + 1] = waiting; out[#out + 1] = leased end
end
return out
"""
)


def _keep(cache: dict[str, tuple[float, V]], key: str, value: V) -> None:
    """Store ``value`` stamped now, last in the dict: its order stays the order of the
    stamps (what :func:`_forget_older` relies on)."""
    cache.pop(key, None)
    cache[key] = (time.monotonic(), value)


def _forget_older(cache: dict[str, tuple[float, Any]], seconds: float) -> None:
    """Drop the entries stamped by :func:`_keep` more than ``seconds`` ago (oldest first)."""
    cutoff = time.monotonic() - seconds
    while cache:
        oldest = next(iter(cache))
        if cache[oldest][0] >= cutoff:
            break
        del cache[oldest]


def stream_key(model: str, task: str) -> str:
    return f"{PREFIX}s:{task}:{model}"


def _model_of(key: str) -> str:
    return key.split(":", 3)[3]


class RedisStore(QueueStore):
    """:class:`~gateway.store.QueueStore` on Redis Streams (see the module docstring).

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
    ):
        super().__init__(
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            worker_ttl_seconds=worker_ttl_seconds,
            max_queued=max_queued,
        )
        kwargs: dict[str, Any] = {
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 10,
            # A pooled connection that Redis closed (a restart) is reconnected and the
            # command sent again, twice at most, within about a second; then StoreUnavailable.
            "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if password is not None:
            kwargs["password"] = password
        self.redis: aioredis.Redis = aioredis.from_url(url, **kwargs)
        # The reply reader blocks in XREAD: a client of its own, so that closing it ends the
        # read even where redis-py does not act on a task's cancellation.
        self._replies: aioredis.Redis = aioredis.from_url(url, **kwargs)
        self.replica = uuid.uuid4().hex[:12]
        self._reply_key = f"{PREFIX}reply:{self.replica}"
        self._futures: dict[str, asyncio.Future[ItemResult]] = {}
        #: Results read before submit() registered their futures (a busy event loop can see a
        #: fast worker's answer before the SUBMIT reply): item id -> (monotonic s, result).
        self._early: dict[str, tuple[float, ItemResult]] = {}
        #: Specs of the items this replica handed out (item id -> (monotonic s, the item)):
        #: a worker usually posts to the replica it pulled from, which then checks the results
        #: without reading the specs back from Redis.
        self._handed: dict[str, tuple[float, ItemSpec]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._adverts: dict[str, tuple[float, ModelAdvert | None]] = {}  # model -> (at, advert)
        self._lease_ms = int(lease_seconds * 1000)
        self._submit = self.redis.register_script(_SUBMIT)
        self._pull = self.redis.register_script(_PULL)
        self._complete = self.redis.register_script(_COMPLETE)
        self._release = self.redis.register_script(_RELEASE)
        self._reap = self.redis.register_script(_REAP)
        self._counts = self.redis.register_script(_COUNTS)
        self._reachable = True  # until a call fails (then logged once)
        self._closing = False

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._beat()
        self._tasks = [
            asyncio.create_task(self._read_replies(), name="redis-replies"),
            asyncio.create_task(self._background(), name="redis-beat-reap"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await self._replies.aclose()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(f"{PREFIX}replica:{self.replica}", self._reply_key)
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            await self._call(self.redis.ping())
        except StoreUnavailable:
            return False
        return True

    async def _call(self, op: Awaitable[T]) -> T:
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

    async def _beat(self) -> None:
        ttl = REPLICA_TTL_SECONDS
        async with self.redis.pipeline(transaction=False) as p:
            p.set(f"{PREFIX}replica:{self.replica}", "1", ex=ttl)
            p.expire(self._reply_key, ttl)
            await self._call(p.execute())

    async def _background(self) -> None:
        """Heartbeat and lease reaping, every :data:`HEARTBEAT_SECONDS` (reaping also at
        every pull); survives Redis outages."""
        while True:
            await asyncio.sleep(min(HEARTBEAT_SECONDS, self.lease_seconds / 2))
            self._forget_handed()
            try:
                await self._beat()
                await self.reap()
            except StoreUnavailable:
                pass  # logged by _call, once per outage
            except RedisError as e:
                log.warning("queue store: %s", e)

    async def _read_replies(self) -> None:
        """Resolve this replica's waiting clients from its reply stream."""
        last = "0"
        while True:
            try:
                got: Any = await self._call(
                    self._replies.xread({self._reply_key: last}, count=1000, block=1000)
                )
            except (StoreUnavailable, RedisError) as e:
                if self._closing:
                    return
                if not isinstance(e, StoreUnavailable):
                    log.warning("queue store (replies): %s", e)
                await asyncio.sleep(0.5)
                continue
            for _, entries in got or []:
                ids = []
                for entry_id, fields in entries:
                    ids.append(entry_id)
                    last = entry_id
                    result = ItemResult.model_validate_json(fields[b"r"])
                    self._resolve(fields[b"i"].decode(), result)
                self._forget_early()
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.xdel(self._reply_key, *ids)

    def _resolve(self, item_id: str, result: ItemResult) -> None:
        """Answer a waiting client of this replica (or keep the answer for submit())."""
        future = self._futures.pop(item_id, None)
        if future is None:  # answered before submit() registered its futures
            _keep(self._early, item_id, result)
        elif not future.done():
            future.set_result(result)

    def _forget_early(self) -> None:
        """Drop early results nobody claimed within :data:`EARLY_RESULT_SECONDS`."""
        _forget_older(self._early, EARLY_RESULT_SECONDS)

    def _forget_handed(self) -> None:
        """Drop cached specs of items handed out more than two leases ago (their results, if
        any come, have the specs read from Redis)."""
        _forget_older(self._handed, 2 * self.lease_seconds)

    # --- client side --------------------------------------------------------------------
    async def submit(self, specs: list[ItemSpec]) -> Request:
        model, task = specs[0].model, specs[0].task
        key = stream_key(model, task)
        args: list[Any] = [GROUP, self.max_queued, self.replica]
        for spec in specs:
            args += [spec.model_dump_json(exclude_none=True), spec.estimate_tokens()]
        status, value = await self._call(self._submit(keys=[key, f"{PREFIX}streams"], args=args))
        if status == -1:
            raise QueueFull(model, int(value), self.max_queued)
        loop = asyncio.get_running_loop()
        item_ids = [f"{entry.decode()}@{key}" for entry in value]
        futures = [loop.create_future() for _ in item_ids]
        self._futures.update(zip(item_ids, futures, strict=True))
        for item_id, future in zip(item_ids, futures, strict=True):
            early = self._early.pop(item_id, None)
            if early is not None:
                self._futures.pop(item_id, None)
                future.set_result(early[1])
        return Request(model, task, item_ids, futures)

    async def cancel(self, request: Request) -> None:
        by_key: dict[str, list[str]] = defaultdict(list)
        for item_id, future in zip(request.item_ids, request.futures, strict=True):
            self._futures.pop(item_id, None)
            if not future.done():
                future.cancel()
                entry, _, key = item_id.partition("@")
                by_key[key].append(entry)
        if not by_key:
            return
        try:
            async with self.redis.pipeline(transaction=False) as p:
                for key, entries in by_key.items():
                    p.xack(key, GROUP, *entries)
                    p.xdel(key, *entries)
                await self._call(p.execute())
        except (StoreUnavailable, RedisError) as e:  # the inputs are dropped at pull then
            log.warning("cancel: %s", e)

    async def any_taken(self, request: Request) -> bool:
        if any(f.done() for f in request.futures):
            return True
        async with self.redis.pipeline(transaction=False) as p:
            for item_id in request.item_ids:
                entry, _, key = item_id.partition("@")
                p.xpending_range(key, GROUP, min=entry, max=entry, count=1)
            found = await self._call(p.execute())
        return any(rows and rows[0]["times_delivered"] > 0 for rows in found)

    def item_model(self, item_id: str) -> str | None:
        """From the item id (``<entry>@<stream key>``): the stream key names the model."""
        _, at, key = item_id.partition("@")
        if not at or not key.startswith(f"{PREFIX}s:") or key.count(":") < 3:
            return None
        return _model_of(key)

    # --- worker side --------------------------------------------------------------------
    def _registration(self, adverts: list[ModelAdvert]) -> list[Any]:
        """The PULL script's registration arguments: the worker's adverts (TTL = the worker
        TTL) and each model's latest advert."""
        blob = json.dumps([a.model_dump(exclude_none=True) for a in adverts])
        out: list[Any] = [blob, max(1, int(self.worker_ttl * 1000))]
        for adv in adverts:
            out += [adv.name, adv.model_dump_json(exclude_none=True)]
        return out

    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
    ) -> list[WorkItem]:
        keys = [stream_key(a.name, t) for a in adverts for t in a.tasks]
        deadline = time.monotonic() + wait_seconds
        while True:
            out = await self._take(worker_id, keys, max_items, max_tokens, adverts)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            # Long poll: block until a new entry arrives in any of the streams (or a second
            # passes: expired leases are looked for again, the registration refreshed).
            block_ms = max(1, int(min(remaining, 1.0, self.worker_ttl / 3) * 1000))
            got: Any = await self._call(
                self.redis.xreadgroup(
                    GROUP, worker_id, dict.fromkeys(keys, ">"), count=max_items, block=block_ms
                )
            )
            if got:
                return await self._hand_out(worker_id, got, max_items, max_tokens)

    async def _hand_out(
        self, worker_id: str, got: Any, max_items: int, max_tokens: int | None
    ) -> list[WorkItem]:
        """Entries a long poll's XREADGROUP just leased to this worker (attempt 1), handed out
        at once; those past ``max_items`` (XREADGROUP counts per stream) or the token budget
        (at least one is handed out) go back to the front with no attempt spent."""
        out: list[WorkItem] = []
        back: list[Any] = []
        tokens = 0
        for raw_key, entries in got:
            key = raw_key.decode()
            for entry_id, fields in entries:
                t = int(fields[b"t"])
                over_budget = max_tokens is not None and tokens + t > max_tokens
                if out and (len(out) >= max_items or over_budget):
                    back += [f"{entry_id.decode()}@{key}", 1]
                    continue
                tokens += t
                out.append(self._work_item(worker_id, key, entry_id.decode(), fields[b"s"], 1, t))
        if back:
            await self._call(self._release(args=[GROUP, worker_id, self._lease_ms, 0, *back]))
        return out

    async def _take(
        self,
        worker_id: str,
        keys: list[str],
        max_items: int,
        max_tokens: int | None,
        adverts: list[ModelAdvert],
    ) -> list[WorkItem]:
        """Register the worker and lease up to ``max_items`` (and ``max_tokens``, at least one
        input) across ``keys`` round-robin: each key a fair share per round, the result
        interleaved key by key."""
        register = self._registration(adverts)
        if not keys:  # nothing to pull from: the registration alone
            await self._call(
                self.redis.set(f"{PREFIX}worker:{worker_id}", register[0], px=register[1])
            )
            return []
        taken: dict[str, list[WorkItem]] = {k: [] for k in keys}
        remaining = max_items
        budget = max_tokens if max_tokens is not None else -1
        active = list(keys)
        while remaining > 0 and active and budget != 0:
            share = max(1, remaining // len(active))
            for key in list(active):
                if remaining <= 0 or budget == 0:
                    break
                got = await self._take_from(worker_id, key, min(share, remaining), budget, register)
                register = [""]  # registered by the first call
                taken[key] += got
                remaining -= len(got)
                if budget >= 0:
                    budget = max(0, budget - sum(i.est_tokens for i in got))
                if len(got) < share:
                    active.remove(key)  # drained (or out of token budget)
        out: list[WorkItem] = []
        for turn in range(max((len(v) for v in taken.values()), default=0)):
            out += [v[turn] for v in taken.values() if turn < len(v)]
        return out

    async def _take_from(
        self, worker_id: str, key: str, n: int, budget: int, register: list[Any]
    ) -> list[WorkItem]:
        """One PULL script call on one stream; ``budget`` -1 for none; ``register``: see
        :meth:`_registration` (``[""]``: none)."""
        args: list[Any] = [GROUP, worker_id, self._lease_ms, n, budget, self.max_attempts, PREFIX]
        rows = await self._call(self._pull(keys=[key], args=args + register))
        *taken, dead, expired, _dropped = rows
        model = _model_of(key)
        if dead:
            metrics.DEAD_LETTERS.labels(model).inc(dead)
        if expired:
            metrics.LEASES_EXPIRED.labels(model).inc(expired)
        return [
            self._work_item(worker_id, key, entry.decode(), spec, int(attempt), int(tokens))
            for entry, spec, attempt, tokens in taken
        ]

    def _work_item(
        self, worker_id: str, key: str, entry_id: str, spec: bytes, attempt: int, tokens: int
    ) -> WorkItem:
        """A leased entry as the worker sees it; counts its queue wait or redelivery."""
        model = _model_of(key)
        if attempt == 1:
            waited_ms = time.time() * 1000 - int(entry_id.partition("-")[0])
            metrics.QUEUE_WAIT.labels(model).observe(max(0.0, waited_ms) / 1000)
        else:
            metrics.REDELIVERIES.labels(model).inc()
        item_id = f"{entry_id}@{key}"
        item = WorkItem(
            item_id=item_id,
            lease_id=f"{attempt}:{worker_id}",
            lease_seconds=self.lease_seconds,
            attempt=attempt,
            est_tokens=tokens,
            **json.loads(spec),
        )
        _keep(self._handed, item_id, item)
        return item

    async def complete(self, worker_id: str, results: list[ItemResult]) -> Completion:
        done = Completion()
        specs = await self._specs([r.item_id for r in results])
        args: list[Any] = [
            GROUP,
            worker_id,
            self.max_attempts,
            self._lease_ms,
            PREFIX,
            self.replica,
        ]
        checked_all: list[ItemResult] = []
        for res in results:
            spec = specs.get(res.item_id)
            checked = res if spec is None else check_result(res, spec)
            checked_all.append(checked)
            if checked is not res:
                done.rejected += 1
            if checked.error is None:
                kind = "ok"
            else:
                kind = "retry" if checked.error.retryable else "final"
            deliveries = res.lease_id.partition(":")[0] or "0"
            args += [
                res.item_id,
                deliveries if deliveries.isdigit() else "0",
                kind,
                checked.model_dump_json(exclude_none=True),
                checked.error.message if checked.error else "",
            ]
        statuses = await self._call(self._complete(args=args))
        for res, checked, raw in zip(results, checked_all, statuses, strict=True):
            status = raw.decode()
            if status == "i":
                done.ignored += 1
                continue
            self._handed.pop(res.item_id, None)
            # A rejected result counts as a failed attempt of its item, not as accepted.
            done.accepted += checked is res
            if status == "l":
                self._resolve(res.item_id, checked)
            elif status == "d":
                metrics.DEAD_LETTERS.labels(_model_of(res.item_id.partition("@")[2])).inc()
        return done

    async def _specs(self, item_ids: list[str]) -> dict[str, ItemSpec]:
        """The specs of the items (to check their results against): this replica's cache of
        what it handed out, else read from the still-queued entries."""
        out: dict[str, ItemSpec] = {}
        missing: list[str] = []
        for item_id in item_ids:
            cached = self._handed.get(item_id)
            if cached is None:
                missing.append(item_id)
            else:
                out[item_id] = cached[1]
        if not missing:
            return out
        async with self.redis.pipeline(transaction=False) as p:
            for item_id in missing:
                entry, _, key = item_id.partition("@")
                p.xrange(key, min=entry, max=entry, count=1)
            rows = await self._call(p.execute())
        for item_id, found in zip(missing, rows, strict=True):
            if found:
                out[item_id] = ItemSpec.model_validate_json(found[0][1][b"s"])
        return out

    async def release(
        self, worker_id: str, leases: list[tuple[str, str]], count_attempt: bool = False
    ) -> int:
        args: list[Any] = [GROUP, worker_id, self._lease_ms, int(count_attempt)]
        for item_id, lease_id in leases:
            deliveries, _, holder = lease_id.partition(":")
            if holder == worker_id and deliveries.isdigit():
                args += [item_id, deliveries]
        if len(args) == 4:
            return 0
        return int(await self._call(self._release(args=args)))

    async def reap(self) -> None:
        keys: Any = await self._call(self.redis.smembers(f"{PREFIX}streams"))
        for raw in keys:
            key = raw.decode()
            expired, dead = await self._call(
                self._reap(keys=[key], args=[GROUP, self._lease_ms, self.max_attempts, PREFIX])
            )
            if expired:
                metrics.LEASES_EXPIRED.labels(_model_of(key)).inc(expired)
            if dead:
                metrics.DEAD_LETTERS.labels(_model_of(key)).inc(dead)

    # --- views --------------------------------------------------------------------------
    async def _queue_counts(self) -> list[tuple[str, int, int]]:
        flat = await self._call(self._counts(keys=[f"{PREFIX}streams"]))
        return [
            (_model_of(flat[i].decode()), int(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    async def depth(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for model, waiting, _ in await self._queue_counts():
            if waiting:
                out[model] = out.get(model, 0) + waiting
        return out

    async def leased(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for model, _, leased in await self._queue_counts():
            if leased:
                out[model] = out.get(model, 0) + leased
        return out

    async def _workers(self) -> AsyncIterator[list[ModelAdvert]]:
        keys = [k async for k in self.redis.scan_iter(match=f"{PREFIX}worker:*", count=500)]
        if not keys:
            return
        for blob in await self._call(self.redis.mget(keys)):
            if blob is not None:
                yield [ModelAdvert.model_validate(a) for a in json.loads(blob)]

    async def available_models(self) -> dict[str, tuple[ModelAdvert, int]]:
        out: dict[str, tuple[ModelAdvert, int]] = {}
        try:
            async for adverts in self._workers():
                for adv in adverts:
                    _, n = out.get(adv.name, (adv, 0))
                    out[adv.name] = (adv, n + 1)
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise StoreUnavailable(f"Redis: {e}") from None
        return out

    async def advert(self, model: str) -> ModelAdvert | None:
        """The model's latest advert (cached for a second: every client request asks)."""
        at, cached = self._adverts.get(model, (0.0, None))
        if time.monotonic() - at < 1.0:
            return cached
        blob = await self._call(self.redis.get(f"{PREFIX}advert:{model}"))
        advert = ModelAdvert.model_validate_json(blob) if blob is not None else None
        self._adverts[model] = (time.monotonic(), advert)
        return advert
