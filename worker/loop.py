"""The worker's data path: pull -> infer -> post.

Three concurrent tasks share one event loop with vLLM's ``AsyncLLM``:

1. **pull**: long-polls the queue for as many items as there is free capacity
   (``max_items_in_flight`` minus items in flight, and ``max_tokens_in_flight`` minus their
   estimated prompt tokens; with items in flight, once an engine step's worth of tokens is
   free), prepares the batch's prompts in one call (templates, tokenization), and starts one
   engine request per item, before it pulls again;
2. **infer**: each item runs in the engine (vLLM batches all in-flight requests itself);
   its result or per-item error goes to the outbox. Batch-job items enter the engine behind
   interactive ones, a few at a time while interactive items flow (:mod:`worker.batch_gate`);
3. **post**: sends everything in the outbox in one call, again and again, so posting never
   stalls the engine. A failed post is retried until the items' leases run out (after that
   the queue has redelivered them anyway).

``stop()`` drains: pulling stops, in-flight items finish and are posted within
``drain_timeout_seconds``, and items that cannot finish are released back to the queue.
If the engine dies, the worker stops at once with exit code 1 (no drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.protocol import (
    ErrorCode,
    ItemResult,
    ModelAdvert,
    PullRequest,
    SparseEmbedding,
    WorkItem,
)
from worker import metrics
from worker.batch_gate import BatchGate
from worker.config import Config
from worker.defaults import (
    BATCH_ITEMS_HELD_WHILE_BUSY,
    ENGINE_WATCH_SECONDS,
    ITEMS_IN_FLIGHT_PER_SEQ,
    MIN_PULL_STEPS,
    POST_BACKOFF,
    PULL_BACKOFF,
    TOKENS_IN_FLIGHT_PER_STEP,
)
from worker.engine import EngineDead, InvalidInput, Prompt
from worker.health import Health
from worker.queue_client import QueueClient, QueueError, QueueRejected

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What the loop needs of :class:`worker.engine.Engine` (tests give it a fake)."""

    @property
    def alive(self) -> bool: ...

    @property
    def max_num_batched_tokens(self) -> int: ...

    async def prepare(self, items: list[WorkItem]) -> list[Prompt | InvalidInput]: ...

    async def tokenize(self, items: list[WorkItem]) -> list[ItemResult]: ...

    async def run(
        self, item: WorkItem, prompt: Prompt
    ) -> tuple[np.ndarray | SparseEmbedding, int]: ...

    async def log_stats(self) -> None: ...


@dataclass
class _Leased:
    item: WorkItem
    pulled_at: float

    @property
    def deadline(self) -> float:
        return self.pulled_at + self.item.lease_seconds


class Worker:
    """Runs the pull -> infer -> post loop until :meth:`stop` or engine death."""

    def __init__(
        self,
        cfg: Config,
        engine: EngineLike,
        client: QueueClient,
        adverts: list[ModelAdvert],
        health: Health | None = None,
    ):
        self.cfg = cfg
        self.engine = engine
        self.client = client
        self.adverts = adverts
        self.health = health or Health()
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        gen = cfg.generator
        self.capacity = (
            cfg.queue.max_items_in_flight
            or ITEMS_IN_FLIGHT_PER_SEQ * gen.max_num_seqs * gen.replicas
        )
        self.token_capacity = (
            cfg.queue.max_tokens_in_flight
            or TOKENS_IN_FLIGHT_PER_STEP * engine.max_num_batched_tokens
        )
        #: With items in flight, a pull waits until this many estimated tokens are free.
        self.min_pull_tokens = min(
            MIN_PULL_STEPS * engine.max_num_batched_tokens, self.token_capacity // 2
        )
        self._tokens_in_flight = 0
        self._batch_held = 0  # batch-job items leased
        self.batch_gate = BatchGate(
            cfg.queue.batch_tokens_beside_interactive, cfg.queue.interactive_quiet_seconds
        )
        self._leased: dict[str, _Leased] = {}
        self._outbox: list[tuple[ItemResult, _Leased]] = []
        self._outbox_ready = asyncio.Event()
        self._capacity_freed = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing is leased
        self._idle.set()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.exit_code = 0

    @property
    def in_flight(self) -> int:
        return len(self._leased)

    # --- pull ---------------------------------------------------------------------------
    async def _pull_loop(self) -> None:
        wait = PULL_BACKOFF.initial
        while not self._stopping.is_set():
            free = self.capacity - self.in_flight
            free_tokens = self.token_capacity - self._tokens_in_flight
            if free <= 0 or free_tokens < (self.min_pull_tokens if self._leased else 1):
                self._capacity_freed.clear()
                await self._capacity_freed.wait()
                continue
            max_batch, wait_seconds = None, self.cfg.queue.pull_wait_seconds
            if self.batch_gate.busy:  # keep room for interactive items; look again once quiet
                max_batch = max(0, BATCH_ITEMS_HELD_WHILE_BUSY - self._batch_held)
                wait_seconds = min(wait_seconds, self.batch_gate.quiet_seconds)
            req = PullRequest(
                worker_id=self.worker_id,
                models=self.adverts,
                max_items=free,
                max_tokens=free_tokens,
                wait_seconds=wait_seconds,
                max_batch_items=max_batch,
            )
            t0 = time.monotonic()
            try:
                items = await self.client.pull(req)
            except QueueError as e:
                self.health.queue_reached(False)
                level = logging.ERROR if isinstance(e, QueueRejected) else logging.WARNING
                log.log(level, "pull failed: %s; next try in %.1f s", e, wait)
                await self._sleep_unless_stopping(wait)
                wait = PULL_BACKOFF.after(wait)
                continue
            wait = PULL_BACKOFF.initial
            self.health.queue_reached(True)
            metrics.PULL_DURATION.observe(time.monotonic() - t0)
            if items:
                metrics.PULL_BATCH_SIZE.observe(len(items))
                # Prepared (a small batch on the loop, a large one in a thread) and its engine
                # requests started before the next pull.
                await self._start(self._lease(items))

    def _lease(self, items: list[WorkItem]) -> list[_Leased]:
        """Count pulled items as in flight (they hold capacity until posted or released)."""
        now = time.monotonic()
        batch = []
        for item in items:
            leased = _Leased(item, now)
            self._leased[item.item_id] = leased
            self._tokens_in_flight += item.est_tokens
            if item.priority:
                self._batch_held += 1
            else:
                self.batch_gate.saw_interactive()
            metrics.for_items(item.model, item.task).pulled.inc()
            batch.append(leased)
        self._idle.clear()
        metrics.ITEMS_IN_FLIGHT.set(self.in_flight)
        return batch

    async def _start(self, batch: list[_Leased]) -> None:
        """Prepare one pulled batch's prompts in one call (templates, tokenization), then start
        one engine request per item; an item whose prompt failed is answered at once, and a
        batch whose preparation failed unexpectedly is answered with a retryable error.
        ``tokenize`` items are answered by the tokenizer alone."""
        tokenizing = [lz for lz in batch if lz.item.task == "tokenize"]
        if tokenizing:
            batch = [lz for lz in batch if lz.item.task != "tokenize"]
            await self._tokenize(tokenizing)
        if not batch:
            return
        try:
            prompts = await self.engine.prepare([lz.item for lz in batch])
        except Exception as e:
            log.exception("preparing %d pulled items failed unexpectedly", len(batch))
            for leased in batch:
                self._answer(self._unexpected(leased.item, e), leased)
            return
        for leased, prompt in zip(batch, prompts, strict=True):
            if isinstance(prompt, InvalidInput):
                self._answer(ItemResult.failed(leased.item, prompt.code, prompt.message), leased)
            else:
                self._spawn(self._infer(leased, prompt))

    async def _tokenize(self, batch: list[_Leased]) -> None:
        try:
            results = await self.engine.tokenize([lz.item for lz in batch])
        except Exception as e:
            log.exception("tokenizing %d pulled items failed unexpectedly", len(batch))
            results = [self._unexpected(lz.item, e) for lz in batch]
        for leased, result in zip(batch, results, strict=True):
            self._answer(result, leased)

    # --- infer --------------------------------------------------------------------------
    async def _infer(self, leased: _Leased, prompt: Prompt) -> None:
        item = leased.item
        try:
            if item.priority:  # a batch job's input: after interactive ones (batch_gate)
                async with self.batch_gate.admit(item.est_tokens):
                    vector, n_tokens = await self.engine.run(item, prompt)
            else:
                vector, n_tokens = await self.engine.run(item, prompt)
            result = ItemResult.ok(
                item, vector, n_tokens, encoded=False
            )  # base64 if posted as JSON
            metrics.for_items(item.model, item.task).prompt_tokens.inc(n_tokens)
        except InvalidInput as e:
            result = ItemResult.failed(item, e.code, e.message)
        except EngineDead as e:
            self._engine_failed(str(e))
            return  # the item stays leased; it is released (or its lease expires)
        except Exception as e:
            if not self.engine.alive:
                self._engine_failed(f"{type(e).__name__}: {e}")
                return
            log.exception("item %s failed unexpectedly", item.item_id)
            result = self._unexpected(item, e)
        self._answer(result, leased)

    @staticmethod
    def _unexpected(item: WorkItem, exc: Exception) -> ItemResult:
        """The result of an item that failed for a reason of this worker's, not of its input:
        retryable (another worker, or this one later, may serve it)."""
        return ItemResult.failed(
            item, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", retryable=True
        )

    def _answer(self, result: ItemResult, leased: _Leased) -> None:
        """Queue a result for the post loop."""
        self._outbox.append((result, leased))
        self._outbox_ready.set()

    def _engine_failed(self, reason: str) -> None:
        """The one path for a dead engine: stop pulling and exit 1, without a drain."""
        if self.exit_code == 0:
            log.error("vLLM engine failed (%s); stopping", reason)
        self.exit_code = 1
        self._stopping.set()

    # --- post ---------------------------------------------------------------------------
    async def _post_loop(self) -> None:
        wait = POST_BACKOFF.initial
        while True:
            if not self._outbox:
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            batch, self._outbox = self._outbox, []
            try:
                await self._post(batch)
            except QueueError as e:
                now = time.monotonic()
                keep = [(r, lz) for r, lz in batch if lz.deadline > now]
                log.warning(
                    "posting %d results failed: %s; %d kept for retry", len(batch), e, len(keep)
                )
                self._outbox = keep + self._outbox
                self._forget([lz for _, lz in batch if lz.deadline <= now])
                await asyncio.sleep(wait)
                wait = POST_BACKOFF.after(wait)
                continue
            wait = POST_BACKOFF.initial

    async def _post(self, batch: list[tuple[ItemResult, _Leased]]) -> None:
        """Post ``batch`` in one call, then count its items done and free their capacity.
        Raises :class:`QueueError` (nothing is forgotten then)."""
        await self.client.post_results(self.worker_id, [r for r, _ in batch])
        now = time.monotonic()
        for result, lz in batch:
            item = lz.item
            counted = metrics.for_items(item.model, item.task)
            if result.error is None:
                counted.completed.inc()
            else:
                metrics.ITEMS_FAILED.labels(item.model, item.task, result.error.code.value).inc()
            counted.duration.observe(now - lz.pulled_at)
        self._forget([lz for _, lz in batch])

    def _forget(self, batch: list[_Leased]) -> None:
        """Free the capacity ``batch`` held (posted, or past its lease)."""
        for lz in batch:
            if self._leased.pop(lz.item.item_id, None) is not None:
                self._tokens_in_flight -= lz.item.est_tokens
                self._batch_held -= bool(lz.item.priority)
        if not self._leased:
            self._idle.set()
        metrics.ITEMS_IN_FLIGHT.set(self.in_flight)
        self._capacity_freed.set()

    # --- lifecycle ----------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _watch_engine(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.alive:
                self._engine_failed("the engine is no longer alive")
                return
            try:
                await self.engine.log_stats()
            except Exception:
                log.debug("log_stats failed", exc_info=True)
            await self._sleep_unless_stopping(ENGINE_WATCH_SECONDS)

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
        if self.exit_code == 0:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.cfg.drain_timeout_seconds)
            except asyncio.TimeoutError:
                log.warning("drain timeout: %d items unfinished", self.in_flight)
        for task in [poster, watcher, *self._tasks]:
            task.cancel()
        await asyncio.gather(poster, watcher, *self._tasks, return_exceptions=True)
        await self._hand_back()
        log.info("drained; exit code %d", self.exit_code)
        return self.exit_code

    async def _hand_back(self) -> None:
        """After the drain: post what finished, release what did not (after an engine death
        with the attempt counted: one of them may be what killed it)."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                await self._post(batch)
            except QueueError as e:
                log.warning("final post failed (%s); those items will be redelivered", e)
        rest = [lz.item for lz in self._leased.values()]
        if rest:
            try:
                n = await self.client.release(
                    self.worker_id, rest, count_attempt=self.exit_code != 0
                )
                log.info("released %d unfinished items back to the queue", n)
            except QueueError as e:
                log.warning("release failed (%s); %d items return after their lease", e, len(rest))
