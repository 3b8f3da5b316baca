"""The worker registry: what a worker's pull registers (its adverts, each model's latest
advert, the models in :data:`~.keys.MODELS`) and the models the replica walks one by one
(lease reaping, counts, dead models)."""

from __future__ import annotations

import json
import time
from typing import Any

from common.protocol import ModelAdvert
from gateway.queue.redis import keys
from gateway.queue.redis.connection import Connection
from gateway.queue.redis.replies import Replies
from gateway.queue.store import StoreUnavailable

#: Seconds between two registrations of a worker whose adverts are the same (its pulls come
#: more often; a third of the worker TTL if that is less).
REGISTER_SECONDS = 1.0


class Registry:
    def __init__(self, conn: Connection, replies: Replies, *, worker_ttl: float, advert_ttl: float):
        self.conn, self.replies = conn, replies
        self.worker_ttl, self.advert_ttl = worker_ttl, advert_ttl
        #: worker id -> (monotonic s, adverts as JSON, their models) of its last registration.
        self._registered: dict[str, tuple[float, str, tuple[str, ...]]] = {}

    async def register(self, worker_id: str, adverts: list[ModelAdvert]) -> None:
        """The worker's adverts (TTL = the worker TTL), each model's latest advert (TTL = the
        advert TTL) and the models in :data:`~.keys.MODELS`: written at a pull at most every
        :data:`REGISTER_SECONDS` (a third of the worker TTL if less) while they are the same
        (:meth:`~.connection.Connection.write_each`: in a cluster a node down fails its keys
        alone). What cannot be written now is written at the next pull; the pull goes on."""
        blob = json.dumps([a.model_dump(exclude_none=True) for a in adverts])
        now = time.monotonic()
        at, last, _ = self._registered.get(worker_id, (0.0, "", ()))
        if blob == last and now - at < min(REGISTER_SECONDS, self.worker_ttl / 3):
            return
        worker_ms = max(1, int(self.worker_ttl * 1000))
        advert_ms = max(1, int(self.advert_ttl * 1000))
        names = tuple(a.name for a in adverts)

        def writes(r: Any) -> None:
            r.set(keys.worker(worker_id), blob, px=worker_ms)
            for adv in adverts:
                r.set(keys.advert(adv.name), adv.model_dump_json(exclude_none=True), px=advert_ms)
            if names:
                r.sadd(keys.MODELS, *names)

        try:
            await self.conn.write_each(writes)
        except StoreUnavailable:
            return  # the pull itself says whether its streams can be reached
        self._registered.pop(worker_id, None)  # most recent last: forgotten oldest first
        self._registered[worker_id] = (now, blob, names)

    def forget_older(self) -> None:
        """Forget the registrations of workers silent a worker TTL."""
        cutoff = time.monotonic() - self.worker_ttl
        for worker_id in [w for w, (at, _, _) in self._registered.items() if at < cutoff]:
            del self._registered[worker_id]

    async def models(self) -> list[str]:
        """The models with keys: :data:`~.keys.MODELS` (when it can be read; in a cluster its
        node may be down), the models of this replica's clients and of the workers registered
        here."""
        known = set(self.replies.readers)
        for _, _, names in self._registered.values():
            known.update(names)
        try:
            found: Any = await self.conn.call(self.conn.redis.smembers(keys.MODELS))
        except StoreUnavailable:
            if not known:
                raise
            found = []
        return sorted(known | {m.decode() for m in found})
