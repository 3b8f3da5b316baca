"""Lease ids: ``<attempt>:<tag>``, the tag an HMAC-SHA256 of (item, attempt, worker) under a
random key every replica shares through Redis (:data:`~.keys.LEASE_KEY`, made by the first
replica). Unguessable without the key and checked without a Redis read; whether the lease is
still the current one (the entry's holder and attempt) is for the scripts to say."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from gateway.queue.redis import keys
from gateway.queue.redis.connection import Connection


class Leases:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.key: bytes | None = None

    async def agree(self) -> None:
        """Read the shared key, setting ours where there is none (the first replica, or after
        Redis lost its data: whichever replica comes first sets it again for all)."""
        async with self.conn.redis.pipeline(transaction=False) as p:
            p.set(keys.LEASE_KEY, self.key or secrets.token_bytes(32), nx=True)
            p.get(keys.LEASE_KEY)
            _, key = await self.conn.call(p.execute())
        self.key = key

    async def ready(self) -> None:
        """The key is known (read now if the replica started while Redis was unreachable)."""
        if self.key is None:
            await self.agree()

    def lease_id(self, item_id: str, attempt: int, worker_id: str) -> str:
        """The lease id of ``item_id``'s delivery ``attempt`` to ``worker_id`` (128 bits of
        the HMAC shown)."""
        assert self.key is not None
        message = f"{item_id}\n{attempt}\n{worker_id}".encode()
        return f"{attempt}:{hmac.new(self.key, message, hashlib.sha256).hexdigest()[:32]}"

    def attempt(self, item_id: str, lease_id: str, worker_id: str) -> int | None:
        """The attempt of a lease id issued for ``item_id`` to ``worker_id``; None for any
        other (forged, another worker's, an item id that names no queue entry)."""
        attempt = lease_id.partition(":")[0]
        if not (attempt.isdigit() and keys.ITEM_ID.match(item_id)):
            return None
        mine = self.lease_id(item_id, int(attempt), worker_id)
        return int(attempt) if hmac.compare_digest(mine, lease_id) else None
