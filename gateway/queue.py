"""In-memory work queue with leases (visibility timeouts) and long polling.

Delivery is at-least-once: a pulled item is leased for ``lease_seconds``; if no result arrives
in time, the lease expires and the item goes back to the front of its queue for another
worker. An item is answered once: the first result wins, later ones are ignored (idempotent
posts). After ``max_attempts`` deliveries without an answer (or with retryable errors) the item
is dead-lettered: its client gets an ``max_attempts_exceeded`` error instead of a loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway import metrics
from worker.protocol import ErrorCode, ItemError, ItemResult, ItemSpec, ModelAdvert, WorkItem


class NoWorker(Exception):
    """No worker leased the request's items within the pickup timeout."""


class RequestTimeout(Exception):
    """Workers took the request but did not answer within the request timeout."""


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
    def done(self) -> bool:
        return self.future.done()


@dataclass
class _WorkerSeen:
    adverts: list[ModelAdvert]
    last_seen: float
    pulls_open: int = 0


class WorkQueue:
    """Per-(model, task) FIFO queues shared by the client API and the worker API.

    All methods run on the event loop thread; none blocks.
    """

    def __init__(
        self,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        worker_ttl_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        #: Seconds, for leases and worker liveness (tests give a clock they advance).
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.worker_ttl = worker_ttl_seconds
        self._pending: dict[tuple[str, str], deque[Item]] = {}
        self._items: dict[str, Item] = {}
        self._leased: dict[str, Item] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self._workers: dict[str, _WorkerSeen] = {}
        self._adverts: dict[str, ModelAdvert] = {}  # latest advert per model name

    # --- client side --------------------------------------------------------------------
    def submit(self, specs: list[ItemSpec]) -> list[Item]:
        """Enqueue one item per spec (all of one request: same model and task)."""
        loop = asyncio.get_running_loop()
        items = []
        for spec in specs:
            q = self._pending.setdefault((spec.model, spec.task), deque())
            item = Item(
                uuid.uuid4().hex,
                spec,
                loop.create_future(),
                enqueued_at=self._clock(),
                est_tokens=spec.estimate_tokens(),
            )
            self._items[item.item_id] = item
            q.append(item)
            items.append(item)
        self._wake()
        return items

    async def wait(
        self, items: list[Item], pickup_timeout: float, request_timeout: float
    ) -> list[ItemResult]:
        """Wait for every item's result, in order.

        Raises :class:`NoWorker` if some item was not leased within ``pickup_timeout`` seconds,
        :class:`RequestTimeout` if not all were answered within ``request_timeout``; both
        cancel the request's remaining items.
        """
        futures = [i.future for i in items]
        start = time.monotonic()
        try:
            _, pending = await asyncio.wait(futures, timeout=pickup_timeout)
            if pending and any(i.attempt == 0 for i in items if not i.done):
                raise NoWorker()
            if pending:
                left = max(0.0, request_timeout - (time.monotonic() - start))
                _, pending = await asyncio.wait(pending, timeout=left)
                if pending:
                    raise RequestTimeout()
        except BaseException:
            self.cancel(items)
            raise
        return [f.result() for f in futures]

    def cancel(self, items: list[Item]) -> None:
        """Forget items nobody waits for any more (pending copies are skipped lazily)."""
        for item in items:
            self._items.pop(item.item_id, None)
            self._leased.pop(item.item_id, None)
            if not item.future.done():
                item.future.cancel()

    # --- worker side --------------------------------------------------------------------
    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
    ) -> list[WorkItem]:
        """Lease up to ``max_items`` items (and about ``max_tokens`` estimated prompt tokens,
        at least one item) of the advertised models and tasks.

        Returns at once when work is waiting, else after ``wait_seconds`` (long polling),
        possibly with an empty list.
        """
        seen = self._workers.setdefault(worker_id, _WorkerSeen(adverts, self._clock()))
        seen.adverts = adverts
        seen.last_seen = self._clock()
        for adv in adverts:
            self._adverts[adv.name] = adv
        keys = [(a.name, t) for a in adverts for t in a.tasks]
        deadline = time.monotonic() + wait_seconds  # long polling runs in real time
        seen.pulls_open += 1
        try:
            while True:
                self.reap()
                leased = self._take(worker_id, keys, max_items, max_tokens)
                remaining = deadline - time.monotonic()
                if leased or remaining <= 0:
                    return leased
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
                try:
                    await asyncio.wait_for(waiter, timeout=min(remaining, 1.0))
                except asyncio.TimeoutError:
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
        max_tokens: int | None = None,
    ) -> list[WorkItem]:
        out: list[WorkItem] = []
        now = self._clock()
        tokens = 0
        budget = max_tokens if max_tokens is not None else float("inf")
        progress = True
        while len(out) < max_items and tokens < budget and progress:
            progress = False
            for key in keys:  # round-robin across the worker's models and tasks
                q = self._pending.get(key)
                while q:
                    item = q.popleft()
                    if item.done or item.item_id not in self._items or item.lease_id is not None:
                        continue  # cancelled, answered or already leased again
                    if out and tokens + item.est_tokens > budget:
                        q.appendleft(item)  # does not fit this pull; first in line next time
                        break
                    item.attempt += 1
                    item.lease_id = uuid.uuid4().hex[:16]
                    item.lease_deadline = now + self.lease_seconds
                    item.worker_id = worker_id
                    self._leased[item.item_id] = item
                    if item.attempt == 1:
                        metrics.QUEUE_WAIT.labels(item.model).observe(now - item.enqueued_at)
                    else:
                        metrics.REDELIVERIES.labels(item.model).inc()
                    out.append(
                        WorkItem(
                            item_id=item.item_id,
                            lease_id=item.lease_id,
                            lease_seconds=self.lease_seconds,
                            attempt=item.attempt,
                            est_tokens=item.est_tokens,
                            **dict(item.spec),
                        )
                    )
                    tokens += item.est_tokens
                    progress = True
                    break
                if len(out) >= max_items or tokens >= budget:
                    break
        return out

    def complete(self, results: list[ItemResult]) -> tuple[int, int]:
        """Record results; returns (accepted, ignored). The first result for an item wins."""
        accepted = ignored = 0
        for res in results:
            item = self._items.get(res.item_id)
            if item is None or item.done:
                ignored += 1
                continue
            if res.error is not None and res.error.retryable and item.attempt < self.max_attempts:
                self._requeue(item)  # another worker may succeed
                accepted += 1
                continue
            self._finish(item, res)
            accepted += 1
        return accepted, ignored

    def release(self, leases: list[tuple[str, str]]) -> int:
        """Put leased items back at the front of their queues at once (worker drain)."""
        n = 0
        for item_id, lease_id in leases:
            item = self._leased.get(item_id)
            if item is not None and item.lease_id == lease_id and not item.done:
                item.attempt -= 1  # a clean hand-back is not a failed attempt
                self._requeue(item)
                n += 1
        return n

    def reap(self) -> int:
        """Requeue items whose lease expired; dead-letter those out of attempts."""
        now = self._clock()
        expired = [i for i in self._leased.values() if i.lease_deadline <= now]
        for item in expired:
            metrics.LEASES_EXPIRED.labels(item.model).inc()
            self._requeue(item)
        return len(expired)

    def _requeue(self, item: Item) -> None:
        self._leased.pop(item.item_id, None)
        item.lease_id = None
        item.worker_id = None
        if item.attempt >= self.max_attempts:
            self._finish(
                item,
                ItemResult(
                    item_id=item.item_id,
                    lease_id="",
                    error=ItemError(
                        code=ErrorCode.MAX_ATTEMPTS_EXCEEDED,
                        message=(
                            f"the input was delivered to workers {item.attempt} times without a "
                            "result; giving up"
                        ),
                    ),
                ),
            )
            metrics.DEAD_LETTERS.labels(item.model).inc()
            return
        self._pending.setdefault((item.model, item.task), deque()).appendleft(item)
        self._wake()

    def _finish(self, item: Item, result: ItemResult) -> None:
        self._items.pop(item.item_id, None)
        self._leased.pop(item.item_id, None)
        if not item.future.done():
            item.future.set_result(result)

    def _wake(self) -> None:
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    # --- views --------------------------------------------------------------------------
    def live_workers(self) -> dict[str, list[ModelAdvert]]:
        """Workers that pulled within ``worker_ttl_seconds`` (or are pulling now)."""
        now = self._clock()
        return {
            wid: w.adverts
            for wid, w in self._workers.items()
            if w.pulls_open > 0 or now - w.last_seen <= self.worker_ttl
        }

    def available_models(self) -> dict[str, tuple[ModelAdvert, int]]:
        """Model name -> (latest advert, number of live workers serving it)."""
        out: dict[str, tuple[ModelAdvert, int]] = {}
        for adverts in self.live_workers().values():
            for adv in adverts:
                _, n = out.get(adv.name, (adv, 0))
                out[adv.name] = (adv, n + 1)
        return out

    def advert(self, model: str) -> ModelAdvert | None:
        """The latest advert of ``model`` by any worker since start, or None."""
        return self._adverts.get(model)

    def depth(self) -> dict[str, int]:
        """Items waiting (not leased) per model."""
        out: dict[str, int] = {}
        for item in self._items.values():
            if item.lease_id is None and not item.done:
                out[item.model] = out.get(item.model, 0) + 1
        return out

    def leased(self) -> dict[str, int]:
        """Items leased to workers and not yet answered, per model."""
        out: dict[str, int] = {}
        for item in self._leased.values():
            out[item.model] = out.get(item.model, 0) + 1
        return out
