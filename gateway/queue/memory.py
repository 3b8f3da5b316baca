"""The in-memory queue store: the embedded default, one gateway process, no extra server.

Per-(model, task) FIFO queues with leases (visibility timeouts) and long polling. A pulled
input is leased for ``lease_seconds``; without a result in time the lease expires and the
input goes back to the front of its queue for another attempt. The first result wins; after
``max_attempts`` deliveries without one (or with only retryable errors) the input is
dead-lettered: its client gets ``max_attempts_exceeded``. Everything is lost with the process:
for replicas and restarts use :class:`gateway.queue.redis.RedisStore`.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.protocol import BATCH_PRIORITY, ItemResult, ItemSpec, ModelAdvert, WorkItem
from gateway import metrics
from gateway.queue.store import (
    BatchIndex,
    Completion,
    QueueFull,
    QueueStore,
    Request,
    check_result,
    count_advert,
    dead_letter,
    fits,
    new_id,
    prompt_token_limit,
)


@dataclass(eq=False)
class Item:
    """One input waiting for, or leased to, a worker."""

    item_id: str
    spec: ItemSpec
    future: asyncio.Future[ItemResult]
    enqueued_at: float = 0.0
    attempt: int = 0
    lease_id: str | None = None
    lease_deadline: float = 0.0
    worker_id: str | None = None
    est_tokens: int = 1

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def queue(self) -> tuple[str, str, int]:
        """Its line: (model, task, priority)."""
        return (self.spec.model, self.spec.task, self.spec.priority or 0)


@dataclass
class _WorkerSeen:
    adverts: list[ModelAdvert]
    last_seen: float
    pulls_open: int = 0


@dataclass
class _Batch:
    record: str
    index: BatchIndex


class MemoryStore(QueueStore):
    """:class:`~gateway.queue.store.QueueStore` in this process. Every method runs on the event loop
    thread and never blocks; ``clock`` (seconds) drives leases and worker liveness (tests
    give one they advance); long polls wait in real time."""

    def __init__(
        self,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        worker_ttl_seconds: float = 30.0,
        max_queued: int = 100_000,
        max_queued_batch: int | None = None,
        advert_ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            worker_ttl_seconds=worker_ttl_seconds,
            max_queued=max_queued,
            max_queued_batch=max_queued_batch,
            advert_ttl_seconds=advert_ttl_seconds,
        )
        self._clock = clock
        self._batches: dict[str, _Batch] = {}
        self._batch_runners: dict[str, tuple[str, float]] = {}  # id -> (runner, until)
        self._batch_cancels: dict[str, int] = {}
        #: (model, task, priority) -> the inputs waiting, in line order.
        self._pending: dict[tuple[str, str, int], OrderedDict[str, Item]] = {}
        self._items: dict[str, Item] = {}
        self._leased: dict[str, Item] = {}
        #: (model, priority) -> its inputs in :attr:`_leased` (read at every submit).
        self._leased_count: collections.Counter[tuple[str, int]] = collections.Counter()
        self._waiters: set[asyncio.Future[None]] = set()
        self._workers: dict[str, _WorkerSeen] = {}
        #: The latest advert per model name, and when a worker last pulled for it.
        self._adverts: dict[str, tuple[ModelAdvert, float]] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def reap_forever() -> None:
            rounds = 0
            while True:
                await asyncio.sleep(min(0.5, self.lease_seconds / 4))
                await self.reap()
                rounds += 1
                if rounds % 10 == 0:
                    self._forget()

        self._reaper = asyncio.create_task(reap_forever(), name="memory-store-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)

    # --- client side --------------------------------------------------------------------
    async def submit(self, specs: list[ItemSpec]) -> Request:
        model, task, priority = specs[0].model, specs[0].task, specs[0].priority or 0
        unanswered, limit = self._unanswered(model, priority), self.queue_limit(priority)
        if unanswered + len(specs) > limit:
            raise QueueFull(model, unanswered, limit)
        loop = asyncio.get_running_loop()
        now = self._clock()
        queue = self._pending.setdefault((model, task, priority), OrderedDict())
        items = []
        for spec in specs:
            item = Item(
                new_id(),
                spec,
                loop.create_future(),
                enqueued_at=now,
                est_tokens=spec.estimate_tokens(),
            )
            self._items[item.item_id] = item
            queue[item.item_id] = item
            items.append(item)
        self._wake()
        return Request(model, task, [i.item_id for i in items], [i.future for i in items])

    def _unanswered(self, model: str, priority: int) -> int:
        """The model's inputs of ``priority`` waiting or leased (what :meth:`queue_limit`
        bounds)."""
        waiting = sum(
            len(q) for (m, _, p), q in self._pending.items() if (m, p) == (model, priority)
        )
        return waiting + self._leased_count[(model, priority)]

    def _unlease(self, item_id: str) -> None:
        """Out of :attr:`_leased` (answered, requeued, cancelled), if it was there."""
        item = self._leased.pop(item_id, None)
        if item is not None:
            self._leased_count[(item.model, item.queue[2])] -= 1

    async def cancel(self, request: Request) -> None:
        for item_id in request.item_ids:
            item = self._items.pop(item_id, None)
            if item is None:
                continue
            self._unlease(item_id)
            self._pending.get(item.queue, OrderedDict()).pop(item_id, None)
            if not item.future.done():
                item.future.cancel()

    def item_model(self, item_id: str) -> str | None:
        item = self._items.get(item_id)
        return item.model if item is not None else None

    async def any_taken(self, request: Request) -> bool:
        for item_id, future in zip(request.item_ids, request.futures, strict=True):
            item = self._items.get(item_id)
            if future.done() or (item is not None and item.attempt > 0):
                return True
        return False

    # --- worker side --------------------------------------------------------------------
    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
        max_batch_items: int | None = None,
    ) -> list[WorkItem]:
        seen = self._workers.setdefault(worker_id, _WorkerSeen(adverts, self._clock()))
        seen.adverts = adverts
        seen.last_seen = self._clock()
        for adv in adverts:
            self._adverts[adv.name] = (adv, seen.last_seen)
        keys = [(a.name, t) for a in adverts for t in a.tasks]
        deadline = time.monotonic() + wait_seconds  # long polling runs in real time
        seen.pulls_open += 1
        try:
            while True:
                await self.reap()
                leased = self._take(worker_id, keys, max_items, max_tokens, max_batch_items)
                remaining = deadline - time.monotonic()
                if leased or remaining <= 0:
                    return leased
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
                try:  # asyncio.timeout: Python 3.11's wait_for can swallow a cancellation
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await waiter
                except TimeoutError:
                    pass
                finally:
                    self._waiters.discard(waiter)
        finally:
            seen.pulls_open -= 1
            seen.last_seen = self._clock()

    def _take(
        self,
        worker_id: str,
        keys: Sequence[tuple[str, str]],
        max_items: int,
        max_tokens: int | None,
        max_batch_items: int | None = None,
    ) -> list[WorkItem]:
        """Lease inputs round-robin across ``keys``: up to ``max_items``, and no more estimated
        tokens than ``max_tokens`` (at least one input). Batch inputs only with the room that
        interactive ones leave, ``max_batch_items`` at most."""
        out: list[WorkItem] = []
        now = self._clock()
        tokens = 0
        budget = max_tokens if max_tokens is not None else float("inf")
        for priority in (0, BATCH_PRIORITY):
            lines = [(model, task, priority) for model, task in keys]
            limit = max_items
            if priority == BATCH_PRIORITY and max_batch_items is not None:
                limit = min(max_items, len(out) + max_batch_items)
            progress = True
            while len(out) < limit and tokens < budget and progress:
                progress = False
                for line in lines:
                    queue = self._pending.get(line)
                    if not queue:
                        continue
                    item = next(iter(queue.values()))
                    if not fits(len(out), tokens, 1, item.est_tokens, limit, max_tokens):
                        continue  # does not fit this pull; first in line next time
                    del queue[item.item_id]
                    out.append(self._lease(item, worker_id, now))
                    tokens += item.est_tokens
                    progress = True
                    if len(out) >= limit or tokens >= budget:
                        break
        return out

    def _lease(self, item: Item, worker_id: str, now: float) -> WorkItem:
        item.attempt += 1
        item.lease_id = secrets.token_hex(16)  # unguessable: only its holder can answer
        item.lease_deadline = now + self.lease_seconds
        item.worker_id = worker_id
        if item.item_id not in self._leased:
            self._leased_count[(item.model, item.queue[2])] += 1
        self._leased[item.item_id] = item
        if item.attempt == 1:
            metrics.child(metrics.QUEUE_WAIT, item.model).observe(now - item.enqueued_at)
        else:
            metrics.REDELIVERIES.labels(item.model).inc()
        return WorkItem(
            item_id=item.item_id,
            lease_id=item.lease_id,
            lease_seconds=self.lease_seconds,
            attempt=item.attempt,
            est_tokens=item.est_tokens,
            # its fields; dict(spec) would first look for a .keys() through pydantic's
            # __getattr__, which raises
            **item.spec.__dict__,
        )

    async def complete(self, worker_id: str, results: list[ItemResult]) -> Completion:
        done = Completion()
        for res in results:
            item = self._items.get(res.item_id)
            if (
                item is None
                or item.future.done()
                or item.lease_id != res.lease_id  # not (or no longer) its lease
                or item.worker_id != worker_id
            ):
                done.ignored += 1
                continue
            advert = self._adverts.get(item.model, (None, 0.0))[0]
            vocab = advert.vocab_size if advert is not None else None
            checked = check_result(res, item.spec, prompt_token_limit(item.spec, advert), vocab)
            if checked is not res:
                done.rejected += 1
                metrics.RESULTS_REJECTED.labels(item.model).inc()
            if checked.error is not None and checked.error.retryable:
                # Another worker may succeed; after the last attempt: the dead letter.
                self._requeue(item, last_error=checked.error.message)
                done.accepted += checked is res
                continue
            self._finish(item, checked)
            done.accepted += 1
        return done

    async def release(
        self, worker_id: str, leases: list[tuple[str, str]], count_attempt: bool = False
    ) -> int:
        n = 0
        for item_id, lease_id in reversed(leases):  # each to the front: their order kept
            item = self._leased.get(item_id)
            current = item is not None and item.lease_id == lease_id
            if item is not None and current and item.worker_id == worker_id:
                if not count_attempt:
                    item.attempt -= 1
                self._requeue(item)
                n += 1
        return n

    async def reap(self) -> None:
        now = self._clock()
        expired = [i for i in self._leased.values() if i.lease_deadline <= now]
        for item in reversed(expired):  # each to the front: their order kept
            metrics.LEASES_EXPIRED.labels(item.model).inc()
            self._requeue(item)

    def _forget(self) -> None:
        """Drop what no live worker stands for (the reaper, every few seconds): workers silent
        past the worker TTL, adverts past the advert TTL, and lines with nothing in them."""
        now = self._clock()
        for worker_id, w in list(self._workers.items()):
            if w.pulls_open == 0 and now - w.last_seen > self.worker_ttl:
                del self._workers[worker_id]
            elif w.pulls_open:  # a long poll is a worker seen now
                for adv in w.adverts:
                    self._adverts[adv.name] = (adv, now)
        for model, (_, seen) in list(self._adverts.items()):
            if now - seen > self.advert_ttl:
                del self._adverts[model]
        for line, queue in list(self._pending.items()):
            if not queue:
                del self._pending[line]

    def _requeue(self, item: Item, last_error: str | None = None) -> None:
        """Back to the front of its queue for another attempt, or, out of attempts, the
        dead letter."""
        self._unlease(item.item_id)
        item.lease_id = None
        item.worker_id = None
        if item.attempt >= self.max_attempts:
            self._finish(item, dead_letter(item.item_id, item.attempt, last_error))
            metrics.DEAD_LETTERS.labels(item.model).inc()
            return
        queue = self._pending.setdefault(item.queue, OrderedDict())
        queue[item.item_id] = item
        queue.move_to_end(item.item_id, last=False)
        self._wake()

    def _finish(self, item: Item, result: ItemResult) -> None:
        self._items.pop(item.item_id, None)
        self._unlease(item.item_id)
        self._pending.get(item.queue, OrderedDict()).pop(item.item_id, None)
        if not item.future.done():
            item.future.set_result(result)

    def _wake(self) -> None:
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    # --- batch jobs ---------------------------------------------------------------------
    async def save_batch(self, batch_id: str, record: str, index: BatchIndex) -> None:
        self._batches[batch_id] = _Batch(record, index)

    async def load_batch(self, batch_id: str) -> str | None:
        batch = self._batches.get(batch_id)
        return batch.record if batch is not None else None

    async def running_batches(self, owner: str | None = None) -> list[str]:
        return [
            batch_id
            for batch_id, b in self._batches.items()
            if b.index.ended_at is None and owner in (None, b.index.owner)
        ]

    def _owned(self, owner: str) -> list[str]:
        """``owner``'s batch ids, newest first."""
        mine = [(b.index.created_at, i) for i, b in self._batches.items() if b.index.owner == owner]
        return [i for _, i in sorted(mine, reverse=True)]

    async def owner_batches(
        self, owner: str, after: str | None, limit: int
    ) -> tuple[list[str], bool]:
        ids = self._owned(owner)
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        return [self._batches[i].record for i in ids[:limit]], len(ids) > limit

    async def trim_batches(self, owner: str, keep: int) -> list[str]:
        ids = self._owned(owner)
        ended = [i for i in reversed(ids) if self._batches[i].index.ended_at is not None]
        return [self._drop_batch(i) for i in ended[: max(0, len(ids) - keep)]]

    async def expire_batches(self, ended_before: float) -> list[str]:
        old = [
            (b.index.ended_at, i)
            for i, b in self._batches.items()
            if b.index.ended_at is not None and b.index.ended_at < ended_before
        ]
        return [self._drop_batch(i) for _, i in sorted(old)[:100]]

    def _drop_batch(self, batch_id: str) -> str:
        self._batch_runners.pop(batch_id, None)
        self._batch_cancels.pop(batch_id, None)
        return self._batches.pop(batch_id).record

    async def claim_batch(self, batch_id: str, runner: str, seconds: float) -> bool:
        holder, until = self._batch_runners.get(batch_id, (runner, 0.0))
        now = self._clock()
        if holder != runner and until > now:
            return False
        self._batch_runners[batch_id] = (runner, now + seconds)
        return True

    async def cancel_batch(self, batch_id: str) -> int:
        return self._batch_cancels.setdefault(batch_id, int(time.time()))

    async def batch_cancelled(self, batch_id: str) -> int | None:
        return self._batch_cancels.get(batch_id)

    # --- views --------------------------------------------------------------------------
    async def depth(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (model, _, _), queue in self._pending.items():
            if queue:
                out[model] = out.get(model, 0) + len(queue)
        return out

    async def leased(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self._leased.values():
            out[item.model] = out.get(item.model, 0) + 1
        return out

    async def available_models(self) -> dict[str, tuple[ModelAdvert, int]]:
        now = self._clock()
        out: dict[str, tuple[ModelAdvert, int]] = {}
        for w in self._workers.values():
            if w.pulls_open > 0 or now - w.last_seen <= self.worker_ttl:
                for adv in w.adverts:
                    count_advert(out, adv)
        return out

    async def advert(self, model: str) -> ModelAdvert | None:
        known = self._adverts.get(model)  # past the advert TTL: dropped by _forget()
        return known[0] if known is not None else None
