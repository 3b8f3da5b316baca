"""The client side's answers: the futures of the clients this replica holds, resolved from its
reply streams (one per model, ``iw:{<model>}:reply:<replica>``, written by whichever replica a
worker posted to: beside the model's queue, so that one script writes both) or in place, when
the worker posted to this replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.exceptions import RedisError

from common.protocol import ItemResult
from gateway.queue.redis import keys
from gateway.queue.redis.connection import Connection
from gateway.queue.redis.stamped import Stamped
from gateway.queue.store import StoreUnavailable

log = logging.getLogger("gateway.queue.redis")

#: Seconds an answer that arrived before its request's futures is kept for them.
EARLY_RESULT_SECONDS = 60.0


class Replies:
    """The futures of this replica's waiting clients, by client id (``<request id>:<index>``),
    and the answers that came before them."""

    def __init__(self, conn: Connection, replica: str):
        self.conn, self.replica = conn, replica
        #: The models this replica has had clients of, and a reader of each one's reply stream.
        self.readers: dict[str, asyncio.Task[None]] = {}
        self._futures: dict[str, asyncio.Future[ItemResult]] = {}
        #: Results read before submit registered their futures (a busy event loop can see a
        #: fast worker's answer before the SUBMIT reply).
        self._early: Stamped[ItemResult] = Stamped()
        self.closing = False

    def closed(self) -> bool:
        """True once the store began to close (a call, not the attribute: read after awaits)."""
        return self.closing

    def key(self, model: str) -> str:
        """This replica's reply stream for its clients of ``model``."""
        return keys.reply(model, self.replica)

    def expect(self, client_ids: list[str]) -> list[asyncio.Future[ItemResult]]:
        """Futures for these clients, resolved at once where their answers came early."""
        loop = asyncio.get_running_loop()
        futures = []
        for client_id in client_ids:
            future: asyncio.Future[ItemResult] = loop.create_future()
            early = self._early.pop(client_id)
            if early is not None:
                future.set_result(early[1])
            else:
                self._futures[client_id] = future
            futures.append(future)
        return futures

    def holds(self, client_id: str) -> bool:
        """True while a client of this replica waits on ``client_id``."""
        return client_id in self._futures

    def drop(self, client_id: str) -> None:
        self._futures.pop(client_id, None)

    def answer(self, client_id: str, result: ItemResult) -> bool:
        """Answer the client waiting on ``client_id`` (one that went away is left as it is);
        False if none is registered for it."""
        future = self._futures.pop(client_id, None)
        if future is None:
            return False
        if not future.done():
            future.set_result(result)
        return True

    def resolve(self, client_id: str, result: ItemResult) -> None:
        """Answer a waiting client of this replica, or keep the answer for its futures."""
        if not self.answer(client_id, result):
            self._early.keep(client_id, result)

    def read(self, model: str) -> None:
        """Read ``model``'s reply stream from now until the store closes (a reader per model:
        in a cluster one blocking read holds the keys of one slot)."""
        if model not in self.readers and not self.closing:
            task = asyncio.create_task(self.read_forever(model), name=f"redis-replies-{model}")
            self.readers[model] = task

    async def read_forever(self, model: str) -> None:
        """Resolve this replica's waiting clients of ``model`` from its reply stream. Ends once
        the store closes, even where redis-py swallowed the task's cancellation mid-read (the
        loop would otherwise reconnect and read on: a session's event loop then never
        finished)."""
        key, last = self.key(model), "0"
        while not self.closing:
            try:
                got: Any = await self.conn.call(
                    self.conn.replies.xread({key: last}, count=1000, block=1000)
                )
            except (StoreUnavailable, RedisError) as e:
                if self.closed():  # its client closed under it
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
                    self.resolve(fields[b"i"].decode(), result)
                self._early.forget_older(EARLY_RESULT_SECONDS)
                with contextlib.suppress(RedisError, OSError):
                    await self.conn.redis.xdel(key, *ids)
