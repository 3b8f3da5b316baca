"""Runs batch jobs: their lines go through the same queue and workers as interactive requests,
at batch priority (handed out only with the room interactive inputs leave), and their answers
go to the output and error files.

Every replica runs a :class:`BatchRunner`. A batch is run by one replica at a time: the one
that holds its claim in the queue store (renewed while it runs; another replica takes over
once it lapses, e.g. after the replica died). The work of a running batch
(:class:`~gateway.batch.job.Job`) is kept in ``<files dir>/batches/<batch id>/``:
``plan.json`` (where each chunk starts in the input file: :mod:`gateway.batch.validate`) and,
per chunk done, ``<k>.out`` and ``<k>.err`` (its output and error lines, written to a
temporary name and renamed: a chunk is done when ``<k>.out`` exists). A runner that takes over
redoes only the chunks not done, so every line is answered exactly once in the output, even
when queue inputs were delivered twice. The data path of a chunk reads top to bottom: read and
parse lines (in a thread) -> prepare (as the interactive endpoint) -> submit at batch
priority, in pieces that fit the queue -> wait -> write the chunk's lines.

What a batch costs is bounded by configuration, not by its file: a line over
``--max-batch-line-bytes`` fails validation unread, a chunk holds a bounded number of lines
and bytes, and its inputs enter the queue in pieces of at most ``--batch-inputs-in-flight``
(and the queue's batch room, ``--max-queued-batch-inputs``), never more than that many of one
batch at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from gateway.api.serving import Serving
from gateway.batch import job
from gateway.batch.batches import Batches
from gateway.batch.files import FileStore
from gateway.batch.job import Job
from gateway.batch.models import TERMINAL, BatchRecord
from gateway.queue.store import QueueStore, StoreUnavailable
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

#: Seconds a runner's claim on a batch lasts; renewed every third of it.
CLAIM_SECONDS = 15.0
#: Seconds between two passes that forget expired batches and delete expired files (less
#: where a retention is shorter).
SWEEP_SECONDS = 60.0
#: The longest :meth:`BatchRunner.close` waits for its tasks to end.
CLOSE_SECONDS = 5.0


class BatchRunner:
    """Finds batches that need a runner, claims them, and runs them (see the module); forgets
    expired batches and deletes expired files."""

    def __init__(
        self,
        store: QueueStore,
        files: FileStore,
        serving: Serving,
        settings: GatewaySettings,
        batches: Batches,
    ):
        self.store = store
        self.files = files
        self.serving = serving
        self.settings = settings
        self.batches = batches
        self._swept = 0.0  # monotonic s of the last sweep
        self.runner_id = uuid.uuid4().hex[:12]
        self.work_root = files.root / "batches"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._scan: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()
        #: Set by :meth:`close`: the scan ends at its next turn even where a store call
        #: swallowed the task's cancellation (redis-py can, mid-read).
        self._closing = False

    async def start(self) -> None:
        self._scan = asyncio.create_task(self._scan_forever(), name="batch-scan")

    async def close(self) -> None:
        """Stop scanning and running batches (a batch is taken up again by a replica that
        runs): waits for the tasks at most :data:`CLOSE_SECONDS`."""
        self._closing = True
        self._woken.set()
        tasks = [t for t in [self._scan, *self._running.values()] if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
            if late:
                log.warning("batch runner: %d tasks still running at close", len(late))

    def wake(self) -> None:
        """Look for batches to run now (a batch was just created here), not at the next scan."""
        self._woken.set()

    async def _scan_forever(self) -> None:
        while not self._closing:
            self._woken.clear()
            try:
                await self._scan_once()
            except StoreUnavailable:
                pass  # logged by the store
            except Exception:
                log.exception("batch scan failed")
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow the task's
            # cancellation, and the scan then outlived close() (a test's teardown hung)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(job.SCAN_SECONDS):
                    await self._woken.wait()

    async def _scan_once(self) -> None:
        every = min(
            SWEEP_SECONDS,
            self.settings.batch_retention_seconds / 2,
            self.settings.file_expiry_seconds / 2,
        )
        if time.monotonic() - self._swept >= every:
            await self._sweep()
        for batch_id in await self.store.running_batches():
            if batch_id in self._running:
                continue
            raw = await self.store.load_batch(batch_id)
            if raw is None or BatchRecord.model_validate_json(raw).status in TERMINAL:
                continue
            if await self.store.claim_batch(batch_id, self.runner_id, CLAIM_SECONDS):
                task = asyncio.create_task(self._run(batch_id), name=f"batch-{batch_id}")
                self._running[batch_id] = task
                task.add_done_callback(self._ended)

    async def _sweep(self) -> None:
        """Forget batches past their retention and delete expired files (but the inputs of
        running batches)."""
        self._swept = time.monotonic()
        now = time.time()
        forgotten = await self.batches.forget_expired(now)
        keep = await self.batches.running_inputs()
        deleted = await asyncio.to_thread(self.files.expire, now, keep)
        if forgotten or deleted:
            log.info("forgot %d ended batches; deleted %d expired files", forgotten, deleted)

    def _ended(self, task: asyncio.Task[None]) -> None:
        for batch_id, running in list(self._running.items()):
            if running is task:
                del self._running[batch_id]

    async def _run(self, batch_id: str) -> None:
        """Run one batch to its end while holding its claim."""
        running = Job(self, batch_id)
        work = asyncio.create_task(running.run())
        try:
            while not work.done():
                done, _ = await asyncio.wait({work}, timeout=CLAIM_SECONDS / 3)
                if done:
                    break
                if not await self.store.claim_batch(batch_id, self.runner_id, CLAIM_SECONDS):
                    log.warning("batch %s: claim lost; another replica runs it", batch_id)
                    work.cancel()
            await work
        except asyncio.CancelledError:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise
        except Exception:
            log.exception("batch %s: runner failed; it is taken up again", batch_id)
