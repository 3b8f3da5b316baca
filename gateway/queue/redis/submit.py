"""The client side: a request into the queue (SUBMIT, coalesced per line), out of it again
(cancel), and whether a worker took any of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from common.protocol import ItemSpec
from gateway.queue.redis import entries, keys
from gateway.queue.redis.connection import Connection
from gateway.queue.redis.keys import GROUP, PREFIX
from gateway.queue.redis.replies import Replies
from gateway.queue.store import QueueFull, Request, StoreUnavailable, new_id

log = logging.getLogger("gateway.queue.redis")

#: Inputs per SUBMIT call at most: requests of one line that arrive while a SUBMIT of that
#: line is in flight go together in the next call, up to this many inputs (one request always
#: whole).
INPUTS_PER_SUBMIT = 1024


@dataclass(eq=False)
class StreamRequest(Request):
    """A request in the Redis store: also its entries (``<entry id>@<main stream>``)."""

    entries: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Submission:
    """A request waiting to be sent: its id, specs, stream entries and the caller's waiter."""

    request_id: str
    specs: list[ItemSpec]
    entries: list[entries.Entry]
    waiter: asyncio.Future[Request]


class Submissions:
    """Requests of this replica's clients into and out of the queue. ``limit(priority)``: the
    unanswered inputs a model's line of that priority may hold."""

    def __init__(
        self,
        conn: Connection,
        replies: Replies,
        replica: str,
        limit: Callable[[int | None], int],
        replica_ttl: float,
    ):
        self.conn, self.replies, self.replica, self.limit = conn, replies, replica, limit
        self.replica_ttl_ms = max(1, int(replica_ttl * 1000))
        #: Requests waiting to be sent, per line (stream key).
        self._waiting: dict[str, list[_Submission]] = {}
        self._sending: set[str] = set()  # lines with a SUBMIT call in flight
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, specs: list[ItemSpec]) -> Request:
        """Enqueue one request. Requests of one line (model, task, priority) that arrive while
        a SUBMIT of that line is in flight wait for it and then go in one call together (one
        round trip and one script run for many one-input requests); a request arriving at an
        idle line is sent at once. The request is encoded here, in its caller's task: what
        cannot be encoded (ValueError) fails this request alone, before any other joins it."""
        key = keys.stream_key(specs[0].model, specs[0].task, specs[0].priority)
        waiter: asyncio.Future[Request] = asyncio.get_running_loop().create_future()
        submission = _Submission(new_id(), specs, entries.cut(specs), waiter)
        self._waiting.setdefault(key, []).append(submission)
        if key not in self._sending:
            self._sending.add(key)
            task = asyncio.create_task(self._send(key), name="redis-submit")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await waiter

    async def _send(self, key: str) -> None:
        """Send the line's waiting requests, :data:`INPUTS_PER_SUBMIT` inputs per SUBMIT call,
        until none wait; each waiter gets its request, :class:`QueueFull` or the error of its
        own call (:meth:`_send_alone`)."""
        waiting: list[_Submission] = []
        try:
            while waiting := self._waiting.pop(key, []):
                take, inputs = 0, 0
                while take < len(waiting) and (
                    take == 0 or inputs + len(waiting[take].specs) <= INPUTS_PER_SUBMIT
                ):
                    inputs += len(waiting[take].specs)
                    take += 1
                if take < len(waiting):  # the rest go first in the next call
                    self._waiting[key] = waiting[take:] + self._waiting.get(key, [])
                await self._send_alone(key, waiting[:take])
        finally:  # cancelled (the store closing): no waiter is left waiting
            self._sending.discard(key)
            for sub in waiting + self._waiting.pop(key, []):
                sub.waiter.cancel()

    async def _send_alone(self, key: str, batch: list[_Submission]) -> None:
        """:meth:`_call`; if Redis refuses the call itself (a script error, not an outage),
        each request of it is sent again on its own, so that a request that breaks the script
        fails alone and never the requests coalesced with it."""
        try:
            await self._call(key, batch)
        except StoreUnavailable as e:
            _fail(batch, e)
        except Exception as e:  # noqa: BLE001 - whatever it is, it is this call's alone
            if len(batch) == 1:
                log.warning("SUBMIT of one request failed: %s", e)
                _fail(batch, e)
                return
            for one in batch:
                await self._send_alone(key, [one])

    async def _call(self, key: str, batch: list[_Submission]) -> None:
        """One SUBMIT call for ``batch`` (requests of the line ``key``)."""
        first = batch[0].specs[0]
        model, task, limit = first.model, first.task, self.limit(first.priority)
        args: list[Any] = [PREFIX, GROUP, limit, self.replica, self.replica_ttl_ms]
        for sub in batch:
            args += [sub.request_id, len(sub.specs), len(sub.entries)]
            for entry in sub.entries:
                args += entry.args()
        lines = [key, keys.front(key), keys.streams(model), keys.active(model)]
        lines += [keys.unanswered(model, keys.is_batch(key)), keys.replica(model, self.replica)]
        if model not in self.replies.readers:  # the replica's first request of the model
            # also written by the heartbeat: not this request's to fail (in a cluster, the
            # set's node may be down while the model's is up)
            with contextlib.suppress(StoreUnavailable):
                await self.conn.call(self.conn.redis.sadd(keys.MODELS, model))
        rows = await self.conn.call(self.conn.scripts.submit(keys=lines, args=args))
        for sub, (status, value) in zip(batch, rows, strict=True):
            if status == -1:
                if not sub.waiter.done():
                    sub.waiter.set_exception(QueueFull(model, int(value), limit))
                continue
            client_ids = [f"{sub.request_id}:{i}" for i in range(len(sub.specs))]
            self.replies.read(model)  # its reply stream, from now on
            futures = self.replies.expect(client_ids)
            queued = [f"{entry.decode()}@{key}" for entry in value]
            request = StreamRequest(model, task, client_ids, futures, sub.request_id, queued)
            if sub.waiter.done():  # the client went away while its request was being sent
                await self.cancel(request)
            else:
                sub.waiter.set_result(request)

    async def cancel(self, request: Request) -> None:
        """Take the request's unanswered inputs out of the queue (its entries, and their parts
        split off to the front)."""
        unanswered = False
        for client_id, future in zip(request.item_ids, request.futures, strict=True):
            self.replies.drop(client_id)
            if not future.done():
                future.cancel()
                unanswered = True
        if not unanswered or not isinstance(request, StreamRequest):
            return
        key = request.entries[0].partition("@")[2]
        ids = [e.partition("@")[0] for e in request.entries]
        args = [PREFIX, GROUP, request.request_id, *ids]
        try:
            await self.conn.call(self.conn.scripts.cancel(keys=[keys.front(key), key], args=args))
        except (StoreUnavailable, RedisError) as e:  # the inputs are worked on for nobody
            log.warning("cancel: %s", e)

    async def any_taken(self, request: Request) -> bool:
        """True if a future is done, or an entry of the request was delivered or is gone
        (answered: its answer may still be on its way to this replica; or lost with Redis'
        data, stream and consumer group included)."""
        if any(f.done() for f in request.futures):
            return True
        assert isinstance(request, StreamRequest)
        async with self.conn.redis.pipeline(transaction=False) as p:
            for at in request.entries:
                entry, _, key = at.partition("@")
                p.xpending_range(key, GROUP, min=entry, max=entry, count=1)
                p.xrange(key, min=entry, max=entry, count=1)
            # NOGROUP: the stream and its group are gone (Redis lost its data): so is the entry
            found = await self.conn.call(p.execute(raise_on_error=False))
        found = [[] if isinstance(f, ResponseError) else f for f in found]
        for pending, present in zip(found[::2], found[1::2], strict=True):
            if not present or (pending and pending[0]["times_delivered"] > 0):
                return True
        return False


def _fail(batch: list[_Submission], error: Exception) -> None:
    for sub in batch:
        if not sub.waiter.done():
            sub.waiter.set_exception(error)
