"""OpenAI's Batch API over the queue: create, get, list and cancel batch jobs.

A batch's record (:class:`~gateway.batch.models.BatchRecord`) lives in the queue store, so
every replica answers for it; :mod:`gateway.batch.runner` runs it. Lifecycle (OpenAI's):
``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed``; ``failed`` when the input
file is malformed (``errors`` names the lines); ``cancelling`` -> ``cancelled`` after a cancel;
``expired`` after the 24 h completion window. Output and error files keep what was done.

What one key keeps is bounded: ``--max-batches-per-key`` running, ``--max-batch-records-per-key``
records (a new batch forgets the key's oldest ended ones), each record for
``--batch-retention`` after it ended (:meth:`Batches.forget_expired`), its metadata as
OpenAI's (16 pairs, keys up to 64 characters, values up to 512).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from gateway.batch.files import FileStore
from gateway.batch.models import TERMINAL, Batch, BatchCreate, BatchList, BatchRecord
from gateway.errors import APIError
from gateway.queue.store import QueueStore
from gateway.settings import GatewaySettings

#: Seconds of OpenAI's only completion window, "24h".
COMPLETION_WINDOW_SECONDS = 24 * 3600


def new_batch_id() -> str:
    """``batch_`` and 24 hex digits: the creation time in ms, then 48 random bits, so that
    batches created in the same second still list in the order they were made."""
    return f"batch_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


class Batches:
    """The Batch API's operations for one API key (``owner``) each."""

    def __init__(
        self,
        store: QueueStore,
        files: FileStore,
        settings: GatewaySettings,
        on_create: Callable[[], None] = lambda: None,
    ):
        self.store = store
        self.files = files
        self.settings = settings
        #: Called after a batch was created (the runner looks for it at once).
        self.on_create = on_create

    async def create(self, req: BatchCreate, owner: str) -> Batch:
        """``POST /v1/batches``. Raises APIError 404 for an unknown input file, 400 for a
        file that is not a batch input, 429 past ``--max-batches-per-key`` running."""
        stored = self.files.get(req.input_file_id, owner)
        if stored.purpose != "batch":
            raise APIError(
                400,
                f"The file {req.input_file_id} has purpose '{stored.purpose}'; a batch needs "
                "a file uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        running = await self.store.running_batches(owner)
        if len(running) >= self.settings.max_batches_per_key:
            raise APIError(
                429,
                f"This API key has {len(running)} batches running (the limit is "
                f"{self.settings.max_batches_per_key}); wait for one to finish.",
                type="rate_limit_error",
                code="too_many_batches",
                headers={"Retry-After": "60"},
            )
        now = int(time.time())
        record = BatchRecord(
            id=new_batch_id(),
            endpoint=req.endpoint,
            input_file_id=req.input_file_id,
            completion_window=req.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + COMPLETION_WINDOW_SECONDS,
            metadata=req.metadata,
            owner=owner,
        )
        keep = self.settings.max_batch_records_per_key - 1
        self._delete_files(await self.store.trim_batches(owner, keep))
        await self.store.save_batch(record.id, record.model_dump_json(), record.index())
        self.on_create()
        return record.wire()

    async def get(self, batch_id: str, owner: str) -> Batch:
        """``GET /v1/batches/{id}``; raises APIError 404 for another key's or no batch."""
        return (await self._record(batch_id, owner)).wire()

    async def page(self, owner: str, after: str | None, limit: int) -> BatchList:
        """``GET /v1/batches``: newest first, ``limit`` after the batch ``after`` (the page's
        records are read, no others)."""
        raws, more = await self.store.owner_batches(owner, after, limit)
        page = [await self._with_cancel(BatchRecord.model_validate_json(raw)) for raw in raws]
        return BatchList(
            data=[b.wire() for b in page],
            first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None,
            has_more=more,
        )

    async def cancel(self, batch_id: str, owner: str) -> Batch:
        """``POST /v1/batches/{id}/cancel``: ``cancelling`` at once; the runner stops the
        batch, keeps what was done and marks it ``cancelled``. Raises APIError 409 for a
        batch that has ended."""
        record = await self._record(batch_id, owner)
        if record.status in TERMINAL:
            raise APIError(
                409,
                f"The batch {batch_id} is {record.status}; only a running batch can be cancelled.",
                code="batch_not_running",
            )
        await self.store.cancel_batch(batch_id)
        return (await self._record(batch_id, owner)).wire()

    async def _record(self, batch_id: str, owner: str) -> BatchRecord:
        raw = await self.store.load_batch(batch_id)
        record = BatchRecord.model_validate_json(raw) if raw is not None else None
        if record is None or record.owner != owner:
            raise APIError(
                404, f"No such Batch object: {batch_id}", param="batch_id", code="batch_not_found"
            )
        return await self._with_cancel(record)

    async def check_unused(self, file_id: str, owner: str) -> None:
        """Raises APIError 409 (``file_in_use``) if a running batch of ``owner`` reads the
        file: deleting it would fail the batch."""
        for batch_id in await self.store.running_batches(owner):
            raw = await self.store.load_batch(batch_id)
            if raw is not None and BatchRecord.model_validate_json(raw).input_file_id == file_id:
                raise APIError(
                    409,
                    f"The file {file_id} is the input of the running batch {batch_id}; cancel "
                    "the batch first, or delete the file once it has ended.",
                    param="file_id",
                    code="file_in_use",
                )

    async def running_inputs(self) -> set[str]:
        """The input files of every running batch (they do not expire under it)."""
        out = set()
        for batch_id in await self.store.running_batches():
            raw = await self.store.load_batch(batch_id)
            if raw is not None:
                out.add(BatchRecord.model_validate_json(raw).input_file_id)
        return out

    async def forget_expired(self, now: float) -> int:
        """Forget the batches that ended ``--batch-retention`` ago, with their output files;
        returns how many."""
        n = 0
        while raws := await self.store.expire_batches(now - self.settings.batch_retention_seconds):
            self._delete_files(raws)
            n += len(raws)
        return n

    def _delete_files(self, raws: list[str]) -> None:
        """The output and error files of forgotten batches' records."""
        for raw in raws:
            record = BatchRecord.model_validate_json(raw)
            for file_id in (record.output_file_id, record.error_file_id):
                if file_id is not None:
                    self.files.remove(file_id, record.owner)

    async def _with_cancel(self, record: BatchRecord) -> BatchRecord:
        """A running batch that was asked to cancel is ``cancelling`` from that moment, also
        before its runner saw it."""
        if record.status in TERMINAL or record.status == "cancelling":
            return record
        asked = await self.store.batch_cancelled(record.id)
        if asked is None:
            return record
        return record.model_copy(update={"status": "cancelling", "cancelling_at": asked})
