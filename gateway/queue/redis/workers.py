"""The worker side: pull (the PULL script, and long polling on the streams), results
(COMPLETE), release (RELEASE) and lease reaping (REAP), with the worker's registration.

Leases are the groups' pending-entries lists: a pull claims entries for the worker (delivery
count + the entry's earlier attempts = attempt); ``XPENDING ... IDLE <lease>`` finds expired
leases, which go back to the front by being claimed for the placeholder consumer
:data:`~.keys.RELEASED` with an idle time of a whole lease (``lua/helpers.lua``:
``put_back``), the way a released entry goes back too. Out of attempts, the dead letter,
input by input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from common.protocol import ErrorCode, ItemError, ItemResult, ItemSpec, ModelAdvert, WorkItem
from gateway import metrics
from gateway.queue.redis import entries, keys
from gateway.queue.redis.connection import Connection
from gateway.queue.redis.keys import GROUP, PREFIX
from gateway.queue.redis.leases import Leases
from gateway.queue.redis.registry import Registry
from gateway.queue.redis.replies import Replies
from gateway.queue.redis.stamped import Stamped
from gateway.queue.store import (
    Completion,
    StoreUnavailable,
    check_result,
    fits,
    prompt_token_limit,
)


@dataclass(frozen=True)
class Handed:
    """An input this replica handed out: the item as the worker got it, and the id its
    client waits on."""

    item: WorkItem
    client: str


@dataclass(frozen=True)
class _Row:
    """A leased input before it becomes a :class:`WorkItem`."""

    input: entries.Input
    client: str
    attempt: int


class Workers:
    """What workers call. ``advert(model)``: the model's latest advert (for the prompt-token
    bound of its results)."""

    def __init__(
        self,
        conn: Connection,
        leases: Leases,
        replies: Replies,
        *,
        replica: str,
        lease_seconds: float,
        max_attempts: int,
        worker_ttl: float,
        advert_ttl: float,
        advert: Callable[[str], Awaitable[ModelAdvert | None]],
    ):
        self.conn, self.leases, self.replies, self.advert = conn, leases, replies, advert
        self.replica = replica
        self.lease_seconds, self.max_attempts = lease_seconds, max_attempts
        self.worker_ttl = worker_ttl
        self.lease_ms = int(lease_seconds * 1000)
        #: What this replica handed out, by item id: a worker usually posts to the replica it
        #: pulled from, which then checks the results without reading the specs back.
        self.handed: Stamped[Handed] = Stamped()
        self._late: set[asyncio.Future[None]] = set()  # late long-poll reads put back
        self.registry = Registry(conn, replies, worker_ttl=worker_ttl, advert_ttl=advert_ttl)

    def forget_handed(self) -> None:
        """Drop what was handed out more than two leases ago (a result that still comes has
        its spec read from Redis), and the registrations of workers gone a worker TTL."""
        self.handed.forget_older(2 * self.lease_seconds)
        self.registry.forget_older()

    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
        max_batch_items: int | None = None,
    ) -> list[WorkItem]:
        lines = [keys.stream_key(a.name, t) for a in adverts for t in a.tasks]
        deadline = time.monotonic() + wait_seconds
        batch_room = -1 if max_batch_items is None else max_batch_items
        await self.leases.ready()
        while True:
            await self.registry.register(worker_id, adverts)
            out = await self._take(worker_id, lines, max_items, max_tokens, batch_room)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            # Long poll: block until a new entry arrives in any of the streams (or a second
            # passes: expired leases are looked for again, the registration refreshed).
            block_ms = max(1, int(min(remaining, 1.0, self.worker_ttl / 3) * 1000))
            watched = [line for key in lines for line in (key, keys.batch_line(key))]
            if batch_room == 0:  # no batch work wanted: wait for interactive work only
                watched = lines
            streams = [k for w in watched for k in (keys.front(w), w)]
            got = await self._long_poll(worker_id, streams, max_items, block_ms)
            if got:
                # Handed out as they came: waiting for more requests on their way in left
                # the engine idle longer (docs/benchmarks.md).
                out = await self._hand_out(worker_id, got, max_items, max_tokens, batch_room)
                if out:
                    return out

    async def _long_poll(
        self, worker_id: str, streams: list[str], max_items: int, block_ms: int
    ) -> list[Any]:
        """``XREADGROUP`` blocking up to ``block_ms`` on ``streams``: one read, or in a cluster
        one per model (a read's keys share a slot), the first to return taken; the reads still
        blocked hand back what they get later (``unread``: to the front, no attempt spent)."""
        by_model: dict[str, dict[Any, Any]] = {}
        for key in streams:
            model = keys.model_of(key) if self.conn.cluster else ""
            by_model.setdefault(model, {})[key] = ">"

        def read(group: dict[Any, Any]) -> Awaitable[Any]:
            redis = self.conn.redis
            return self.conn.call(
                redis.xreadgroup(GROUP, worker_id, group, count=max_items, block=block_ms)
            )

        if len(by_model) == 1:
            return list(await read(next(iter(by_model.values()))) or [])
        reads: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(read(g)) for g in by_model.values()
        ]
        done: set[asyncio.Future[Any]] = set()
        try:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the others' entries go back; all of them if the pull was cancelled
            for task in reads:
                if task not in done:
                    task.add_done_callback(lambda t: self._unread_late(worker_id, t))
        got: list[Any] = []
        for read_done in done:
            got += read_done.result() or []  # StoreUnavailable: raised to the pull, as one read
        return got

    def _unread_late(self, worker_id: str, task: asyncio.Future[Any]) -> None:
        """What a long poll's read got after the pull returned goes back to the front."""
        if task.cancelled() or task.exception() is not None or not task.result():
            return
        back = [
            x for key, read in task.result() for raw_id, _ in read for x in (key.decode(), raw_id)
        ]
        put_back = asyncio.ensure_future(self._unread(worker_id, back, quiet=True))
        self._late.add(put_back)
        put_back.add_done_callback(self._late.discard)

    async def _unread(self, worker_id: str, back: list[Any], quiet: bool = False) -> None:
        """Entries a long poll read but did not hand out: back to the front, no attempt spent
        (``back``: stream key, entry id, ...; an UNREAD call per model). ``quiet``: a store error
        is left to the lease (the entries come back when it expires), not raised."""
        by_model: dict[str, list[Any]] = {}
        for i in range(0, len(back), 2):
            by_model.setdefault(keys.model_of(back[i]), []).extend(back[i : i + 2])
        for model, pairs in by_model.items():
            args = [PREFIX, GROUP, worker_id, self.lease_ms, *pairs]
            try:
                await self.conn.call(self.conn.scripts.unread.of_model(model, args))
            except (StoreUnavailable, RedisError):
                if not quiet:
                    raise

    async def _hand_out(
        self, worker_id: str, got: Any, max_items: int, max_tokens: int | None, batch_room: int
    ) -> list[WorkItem]:
        """Entries a long poll's XREADGROUP just leased to this worker (first delivery),
        handed out at once while they fit whole in ``max_items``, the token budget and
        ``batch_room`` (-1: no limit); the others go back to the front with no attempt spent.
        Empty if the first does not fit (the next PULL script splits it)."""
        rows: list[_Row] = []
        back: list[Any] = []
        tokens = 0
        for raw_key, read in got:
            key = raw_key.decode()
            batch = keys.is_batch(key)
            for raw_id, raw in read:
                entry_id = raw_id.decode()
                fields = {k.decode(): v for k, v in raw.items()}
                n, t = int(fields["n"]), int(fields["t"])
                no_room = batch and 0 <= batch_room < n
                if back or no_room or not fits(len(rows), tokens, n, t, max_items, max_tokens):
                    back += [key, entry_id]
                    continue
                if batch and batch_room > 0:
                    batch_room -= n
                tokens += t
                attempt = int(fields["a"]) + 1
                request_id = fields["q"].decode()
                lists = fields["k"], fields["x"], fields["s"]
                rows += [
                    _Row(i, f"{request_id}:{i.index}", attempt)
                    for i in entries.inputs(key, entry_id, b"", *lists)
                ]
        if back:
            await self._unread(worker_id, back)
        return await self._work_items(worker_id, rows)

    async def _take(
        self,
        worker_id: str,
        lines: list[str],
        max_items: int,
        max_tokens: int | None,
        batch_room: int = -1,
    ) -> list[WorkItem]:
        """Lease up to ``max_items`` (and ``max_tokens``, at least one input) across
        ``lines`` round-robin: each line a fair share per round, the result interleaved line
        by line. Per line, its batch line only with the room its interactive line leaves (the
        PULL script), ``batch_room`` batch inputs at most (-1: no limit)."""
        if not lines:  # nothing to pull from
            return []
        budget = max_tokens if max_tokens is not None else -1
        taken: dict[str, list[WorkItem]] = {k: [] for k in lines}
        remaining = max_items
        active = list(lines)
        while remaining > 0 and active and budget != 0:
            share = max(1, remaining // len(active))
            for key in list(active):
                if remaining <= 0 or budget == 0:
                    break
                n = min(share, remaining)
                got = await self._take_from(worker_id, key, n, budget, batch_room)
                if batch_room > 0:
                    batch_room = max(0, batch_room - sum(1 for i in got if i.priority))
                taken[key] += got
                remaining -= len(got)
                if budget >= 0:
                    budget = max(0, budget - sum(i.est_tokens for i in got))
                if len(got) < share:
                    active.remove(key)  # drained (or out of room for its next entry)
        out: list[WorkItem] = []
        for turn in range(max((len(v) for v in taken.values()), default=0)):
            out += [v[turn] for v in taken.values() if turn < len(v)]
        return out

    async def _take_from(
        self,
        worker_id: str,
        key: str,
        n: int,
        budget: int,
        batch_room: int,
    ) -> list[WorkItem]:
        """One PULL script call on one model and task's streams; ``budget`` and
        ``batch_room`` -1 for none."""
        args: list[Any] = [PREFIX, GROUP, worker_id, self.lease_ms, n, budget, self.max_attempts]
        args.append(batch_room)
        batch = keys.batch_line(key)
        streams = [keys.front(key), key, keys.front(batch), batch]
        *taken, dead, expired, _dropped = await self.conn.call(
            self.conn.scripts.pull(keys=streams, args=args)
        )
        model = keys.model_of(key)
        if dead:
            metrics.DEAD_LETTERS.labels(model).inc(dead)
        if expired:
            metrics.LEASES_EXPIRED.labels(model).inc(expired)
        rows: list[_Row] = []
        for stream, entry_id, attempt, ks, tokens, indices, specs, request_id in taken:
            request = request_id.decode()
            found = entries.inputs(stream.decode(), entry_id.decode(), ks, tokens, indices, specs)
            rows += [_Row(i, f"{request}:{i.index}", int(attempt)) for i in found]
        return await self._work_items(worker_id, rows)

    async def _work_items(self, worker_id: str, rows: list[_Row]) -> list[WorkItem]:
        """Leased inputs as the worker sees them; counts their queue wait or redelivery. An
        input whose spec cannot be read is not handed out but answered alone with
        ``invalid_input``."""
        out: list[WorkItem] = []
        broken: list[ItemResult] = []
        for row in rows:
            item_id = row.input.item_id
            model = keys.model_of_item(item_id)
            if row.attempt == 1:
                entry_ms = int(item_id.partition("-")[0])
                waited = max(0.0, time.time() * 1000 - entry_ms) / 1000
                metrics.child(metrics.QUEUE_WAIT, model).observe(waited)
            else:
                metrics.REDELIVERIES.labels(model).inc()
            lease_id = self.leases.lease_id(item_id, row.attempt, worker_id)
            try:
                item = WorkItem(
                    item_id=item_id,
                    lease_id=lease_id,
                    lease_seconds=self.lease_seconds,
                    attempt=row.attempt,
                    est_tokens=row.input.est_tokens,
                    **json.loads(row.input.spec),
                )
            except ValueError as e:
                error = ItemError(code=ErrorCode.INVALID_INPUT, message=f"unreadable input: {e}")
                broken.append(ItemResult(item_id=item_id, lease_id=lease_id, error=error))
                continue
            self.handed.keep(item_id, Handed(item, row.client))
            out.append(item)
        if broken:
            await self.complete(worker_id, broken)
        return out

    async def complete(self, worker_id: str, results: list[ItemResult]) -> Completion:
        """Record results; see :meth:`~gateway.queue.store.QueueStore.complete`."""
        done = Completion()
        await self.leases.ready()
        mine: list[tuple[ItemResult, int]] = []  # results with a lease id issued to this worker
        for res in results:
            attempt = self.leases.attempt(res.item_id, res.lease_id, worker_id)
            if attempt is None:
                done.ignored += 1  # forged, another worker's, or no queue entry at all
            else:
                mine.append((res, attempt))
        if not mine:
            return done
        specs = await self._specs([r.item_id for r, _ in mine])
        models = {keys.model_of_item(r.item_id) for r, _ in mine}
        adverts = {m: await self.advert(m) for m in models}
        head: list[Any] = [PREFIX, GROUP, worker_id, self.max_attempts, self.lease_ms]
        head.append(self.replica)
        args: dict[str, list[Any]] = {}  # per model: one COMPLETE call each
        checked_all: list[ItemResult] = []
        clients: list[str] = []  # per result: its client's id where this replica holds it
        answered: set[str] = set()  # item ids whose client was answered before the call
        now = time.monotonic()
        for res, attempt in mine:
            spec = specs.get(res.item_id)
            advert = adverts[keys.model_of_item(res.item_id)]
            vocab = advert.vocab_size if advert is not None else None
            checked = check_result(res, spec, prompt_token_limit(spec, advert), vocab)
            checked_all.append(checked)
            stamped = self.handed.get(res.item_id)
            client, current = "", False
            if stamped is not None:
                handed_at, handed = stamped
                client = handed.client
                # the lease this replica handed out, which cannot have expired yet
                current = handed.item.lease_id == res.lease_id
                current = current and now - handed_at < self.lease_seconds
            # A client of this replica is answered here: its result need not go to Redis.
            local = bool(client) and self.replies.holds(client)
            clients.append(client if local else "")
            if checked.error is not None and checked.error.retryable:
                kind, payload = "retry", checked.error.message  # for the dead letter
            else:
                kind = "ok" if checked.error is None else "final"
                payload = "" if local else checked.model_dump_json(exclude_none=True)
            # A valid vector from the current lease: the client has it before the COMPLETE
            # round trip.
            if kind == "ok" and local and current and self.replies.answer(client, checked):
                answered.add(res.item_id)
            model_args = args.setdefault(keys.model_of_item(res.item_id), list(head))
            model_args += [res.item_id, f"{kind}{attempt}", payload]
        by_item: dict[str, Any] = {}
        for model, model_args in args.items():
            got = await self.conn.call(self.conn.scripts.complete.of_model(model, model_args))
            by_item.update(zip(model_args[len(head) :: 3], got, strict=True))
        statuses = [by_item[res.item_id] for res, _ in mine]
        for (res, _), checked, raw, client in zip(
            mine, checked_all, statuses, clients, strict=True
        ):
            status = raw.decode()
            if status == "i":  # no longer its lease (expired, released) or already answered
                done.ignored += 1
                continue
            self.handed.pop(res.item_id)
            model = keys.model_of_item(res.item_id)
            # A rejected result counts as a failed attempt of its item, not as accepted.
            if checked is not res:
                done.rejected += 1
                metrics.RESULTS_REJECTED.labels(model).inc()
            else:
                done.accepted += 1
            if status.startswith("l") and res.item_id not in answered:
                self.replies.resolve(status[1:] or client, checked)
            elif status == "d":
                metrics.DEAD_LETTERS.labels(model).inc()
        return done

    async def _specs(self, item_ids: list[str]) -> dict[str, ItemSpec]:
        """The specs of the items (to check their results against): what this replica handed
        out, else read from the still-queued entries."""
        out: dict[str, ItemSpec] = {}
        missing: list[tuple[str, str, str, str]] = []  # item id, stream, entry, input
        for item_id in item_ids:
            stamped = self.handed.get(item_id)
            if stamped is not None:
                out[item_id] = stamped[1].item
                continue
            at, _, key = item_id.partition("@")
            entry, _, k = at.partition("/")
            if keys.ITEM_ID.match(item_id):
                missing.append((item_id, key, entry, k))
        if not missing:
            return out
        async with self.conn.redis.pipeline(transaction=False) as p:
            for _, key, entry, _ in missing:
                p.xrange(key, min=entry, max=entry, count=1)
            rows = await self.conn.call(p.execute())
        for (item_id, _, _, k), found in zip(missing, rows, strict=True):
            specs = found[0][1].get(b"s", b"").split(b"\n") if found else []
            if 1 <= int(k) <= len(specs):
                out[item_id] = ItemSpec.model_validate_json(specs[int(k) - 1])
        return out

    async def release(
        self, worker_id: str, leases: list[tuple[str, str]], count_attempt: bool = False
    ) -> int:
        await self.leases.ready()
        args: dict[str, list[Any]] = {}  # per model: one RELEASE call each
        for item_id, lease_id in leases:
            attempt = self.leases.attempt(item_id, lease_id, worker_id)
            if attempt is not None:
                model = keys.model_of_item(item_id)
                head = [PREFIX, GROUP, worker_id, self.lease_ms, int(count_attempt)]
                args.setdefault(model, head).extend((item_id, attempt))
        released = 0
        for model, model_args in args.items():
            released += int(
                await self.conn.call(self.conn.scripts.release.of_model(model, model_args))
            )
        return released

    async def reap(self) -> None:
        """Expired leases of every model back to the front (a REAP call per model)."""
        args: list[Any] = [PREFIX, GROUP, self.lease_ms, self.max_attempts]

        async def reap_model(model: str) -> None:
            self._count_reaped(await self.conn.call(self.conn.scripts.reap.of_model(model, args)))

        # a cluster node down: the other models are reaped
        await self.conn.each_model(await self.registry.models(), reap_model)

    def _count_reaped(self, flat: list[Any]) -> None:
        for i in range(0, len(flat), 3):
            model, expired, dead = (
                keys.model_of(flat[i].decode()),
                int(flat[i + 1]),
                int(flat[i + 2]),
            )
            if expired:
                metrics.LEASES_EXPIRED.labels(model).inc(expired)
            if dead:
                metrics.DEAD_LETTERS.labels(model).inc(dead)
