"""The worker's data path: pull -> infer -> post.

Three concurrent tasks share one event loop with vLLM's ``AsyncLLM``:

1. **pull**: long-polls the queue for as many items as there is free capacity
   (``max_items_in_flight`` minus items in flight, and ``max_tokens_in_flight`` minus their
   estimated prompt tokens), tokenizes the batch's texts in one call, and starts one engine
   request per item;
2. **infer**: each item runs in the engine (vLLM batches all in-flight requests itself);
   its result or per-item error goes to the outbox;
3. **post**: sends everything in the outbox in one call, again and again, so posting never
   stalls the engine. A failed post is retried until the items' leases run out (after that
   the queue has redelivered them anyway).

``stop()`` drains: pulling stops, in-flight items finish and are posted within
``drain_timeout_seconds``, and items that cannot finish are released back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass

from worker import metrics
from worker.config import Config
from worker.engine import Engine, EngineDead, InvalidInput, Prompt
from worker.protocol import ItemResult, ModelAdvert, PullRequest, WorkItem
from worker.queue_client import QueueClient, QueueError, QueueRejected

log = logging.getLogger(__name__)


@dataclass
class _Leased:
    item: WorkItem
    pulled_at: float

    @property
    def deadline(self) -> float:
        return self.pulled_at + self.item.lease_seconds


class Worker:
    """Runs the pull -> infer -> post loop until :meth:`stop` or engine death."""

    def __init__(self, cfg: Config, engine: Engine, client: QueueClient, adverts: list[ModelAdvert]):
        self.cfg = cfg
        self.engine = engine
        self.client = client
        self.adverts = adverts
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.capacity = cfg.queue.max_items_in_flight or 2 * cfg.generator.max_num_seqs
        self.token_capacity = cfg.queue.max_tokens_in_flight or 4 * engine.max_num_batched_tokens
        self._tokens_in_flight = 0
        self._leased: dict[str, _Leased] = {}
        self._outbox: list[tuple[ItemResult, _Leased]] = []
        self._outbox_ready = asyncio.Event()
        self._capacity_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.queue_ok = False
        self.exit_code = 0

    @property
    def in_flight(self) -> int:
        return len(self._leased)

    # --- pull ---------------------------------------------------------------------------
    async def _pull_loop(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            free = self.capacity - self.in_flight
            free_tokens = self.token_capacity - self._tokens_in_flight
            if free <= 0 or free_tokens <= 0:
                self._capacity_freed.clear()
                await self._capacity_freed.wait()
                continue
            req = PullRequest(
                worker_id=self.worker_id,
                models=self.adverts,
                max_items=free,
                max_tokens=free_tokens,
                wait_seconds=self.cfg.queue.pull_wait_seconds,
            )
            t0 = time.monotonic()
            try:
                items = await self.client.pull(req)
            except QueueError as e:
                self.queue_ok = False
                metrics.QUEUE_REACHABLE.set(0)
                level = logging.ERROR if isinstance(e, QueueRejected) else logging.WARNING
                log.log(level, "pull failed: %s; next try in %.1f s", e, backoff)
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            self.queue_ok = True
            metrics.QUEUE_REACHABLE.set(1)
            metrics.PULL_DURATION.observe(time.monotonic() - t0)
            if items:
                metrics.PULL_BATCH_SIZE.observe(len(items))
            now = time.monotonic()
            batch = []
            for item in items:
                leased = _Leased(item, now)
                self._leased[item.item_id] = leased
                self._tokens_in_flight += item.est_tokens
                metrics.ITEMS_PULLED.labels(item.model, item.task).inc()
                batch.append(leased)
            metrics.ITEMS_IN_FLIGHT.set(self.in_flight)
            self._spawn(self._start(batch))  # the next pull does not wait for it

    async def _start(self, batch: list[_Leased]) -> None:
        """Prepare one pulled batch's prompts in one call (templates, tokenization), then start
        one engine request per item; an item whose prompt failed is answered at once."""
        prompts = await self.engine.prepare([lz.item for lz in batch])
        for leased, prompt in zip(batch, prompts):
            if isinstance(prompt, InvalidInput):
                self._answer(ItemResult.failed(leased.item, prompt.code, prompt.message), leased)
            else:
                self._spawn(self._infer(leased, prompt))

    # --- infer --------------------------------------------------------------------------
    async def _infer(self, leased: _Leased, prompt: Prompt) -> None:
        item = leased.item
        try:
            vector, n_tokens = await self.engine.run(item, prompt)
            result = ItemResult.ok(item, vector, n_tokens)
            metrics.PROMPT_TOKENS.labels(item.model, item.task).inc(n_tokens)
        except InvalidInput as e:
            result = ItemResult.failed(item, e.code, e.message)
        except EngineDead as e:
            log.error("vLLM engine died: %s", e)
            self.exit_code = 1
            self._stopping.set()
            return  # the item stays leased; it is released (or its lease expires)
        except Exception as e:  # noqa: BLE001 - one item never sinks the rest
            if not self.engine.alive:
                self.exit_code = 1
                self._stopping.set()
                return
            log.exception("item %s failed unexpectedly", item.item_id)
            result = ItemResult.failed(item, "internal_error", f"{type(e).__name__}: {e}", retryable=True)
        self._answer(result, leased)

    def _answer(self, result: ItemResult, leased: _Leased) -> None:
        """Queue a result for the post loop."""
        self._outbox.append((result, leased))
        self._outbox_ready.set()

    # --- post ---------------------------------------------------------------------------
    async def _post_loop(self) -> None:
        backoff = 0.5
        while True:
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            batch, self._outbox = self._outbox, []
            try:
                await self.client.post_results(self.worker_id, [r for r, _ in batch])
            except QueueError as e:
                now = time.monotonic()
                keep = [(r, lz) for r, lz in batch if lz.deadline > now]
                log.warning("posting %d results failed: %s; %d kept for retry",
                            len(batch), e, len(keep))
                self._outbox = keep + self._outbox
                for r, lz in batch:
                    if lz.deadline <= now:
                        self._forget(lz)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            now = time.monotonic()
            for result, lz in batch:
                item = lz.item
                if result.error is None:
                    metrics.ITEMS_COMPLETED.labels(item.model, item.task).inc()
                else:
                    metrics.ITEMS_FAILED.labels(item.model, item.task, result.error.code).inc()
                metrics.ITEM_DURATION.labels(item.model, item.task).observe(now - lz.pulled_at)
                self._forget(lz)

    def _forget(self, lz: _Leased) -> None:
        if self._leased.pop(lz.item.item_id, None) is not None:
            self._tokens_in_flight -= lz.item.est_tokens
        metrics.ITEMS_IN_FLIGHT.set(self.in_flight)
        self._capacity_freed.set()

    # --- lifecycle ----------------------------------------------------------------------
    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _watch_engine(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.alive:
                log.error("vLLM engine is no longer alive; stopping")
                self.exit_code = 1
                self._stopping.set()
                return
            try:
                await self.engine.log_stats()
            except Exception:  # noqa: BLE001 - stats are best effort
                log.debug("log_stats failed", exc_info=True)
            await self._sleep_unless_stopping(1.0)

    def stop(self) -> None:
        """Begin draining (signal handlers call this)."""
        if not self._stopping.is_set():
            log.info("stopping: no more pulls; draining %d in-flight items", self.in_flight)
        self._stopping.set()

    async def run(self) -> int:
        """Serve until stopped; returns the process exit code (0 after a clean drain)."""
        puller = asyncio.create_task(self._pull_loop(), name="pull")
        poster = asyncio.create_task(self._post_loop(), name="post")
        watcher = asyncio.create_task(self._watch_engine(), name="engine-watch")
        await self._stopping.wait()
        puller.cancel()
        await asyncio.gather(puller, return_exceptions=True)
        budget = self.cfg.drain_timeout_seconds if self.exit_code == 0 else 0.0
        deadline = time.monotonic() + budget
        while self._leased and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in [poster, watcher, *self._tasks]:
            task.cancel()
        await asyncio.gather(poster, watcher, *self._tasks, return_exceptions=True)
        await self._hand_back()
        log.info("drained; exit code %d", self.exit_code)
        return self.exit_code

    async def _hand_back(self) -> None:
        """After the drain: post what finished, release what did not."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                await self.client.post_results(self.worker_id, [r for r, _ in batch])
                for _, lz in batch:
                    self._forget(lz)
            except QueueError as e:
                log.warning("final post failed (%s); those items will be redelivered", e)
        rest = [lz.item for lz in self._leased.values()]
        if rest:
            try:
                n = await self.client.release(self.worker_id, rest)
                log.info("released %d unfinished items back to the queue", n)
            except QueueError as e:
                log.warning("release failed (%s); %d items return after their lease", e, len(rest))
