"""One batch run by this replica (:class:`Job`): validating, its chunks in progress, and its
end (output and error files, ``completed``, ``cancelled`` or ``expired``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from common.protocol import BATCH_PRIORITY, ItemSpec, Task
from gateway import metrics
from gateway.api.models import EmbeddingRequest, RerankRequest
from gateway.api.serving import Serving
from gateway.batch.files import FileStore, new_file_id
from gateway.batch.lines import Line, Piece, answer, pieces, respond, succeeded
from gateway.batch.models import TERMINAL, BatchError, BatchErrors, BatchInputLine, BatchRecord
from gateway.batch.validate import Plan, check_lines
from gateway.errors import APIError, invalid_body
from gateway.queue.store import QueueFull, QueueStore, Request
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.batch.runner")

#: Seconds between two looks for batches to run (:mod:`gateway.batch.runner`), and for a cancel
#: of a running batch (its progress saved then).
SCAN_SECONDS = 1.0


@dataclass
class _Counts:
    completed: int = 0
    failed: int = 0
    inputs_in_flight: int = 0
    room: asyncio.Condition = field(default_factory=asyncio.Condition)
    in_order: asyncio.Lock = field(default_factory=asyncio.Lock)  # chunks enter the queue


class Runs(Protocol):
    """What a job needs of the runner that runs it (:class:`gateway.batch.runner.BatchRunner`)."""

    store: QueueStore
    files: FileStore
    serving: Serving
    settings: GatewaySettings
    work_root: Path


class Job:
    """One batch run by this replica: its record, its work directory, its chunks."""

    def __init__(self, runner: Runs, batch_id: str):
        self.runner = runner
        self.store = runner.store
        self.batch_id = batch_id
        self.work = runner.work_root / batch_id
        self.record: BatchRecord
        self.counts = _Counts()
        self._input: Path | None = None

    async def run(self) -> None:
        raw = await self.store.load_batch(self.batch_id)
        assert raw is not None
        self.record = BatchRecord.model_validate_json(raw)
        while self.record.status not in TERMINAL:
            try:
                await self._step()
            except APIError as e:
                if e.body.code != "file_not_found":
                    raise
                await self._input_gone()

    async def _step(self) -> None:
        if await self._stop_asked() is not None and self.record.status != "finalizing":
            await self._finish()
        elif self.record.status == "validating":
            await self._validate()
        elif self.record.status == "in_progress":
            await self._process()
        else:  # finalizing, cancelling
            await self._finish()

    async def _input_gone(self) -> None:
        """The input file went (expired) under a running batch: it fails, once, with what was
        done kept."""
        log.warning("batch %s: its input file %s is gone", self.batch_id, self.record.input_file_id)
        error = BatchError(
            code="file_not_found",
            message=f"The input file {self.record.input_file_id} no longer exists.",
            param="input_file_id",
        )
        await self._save(
            status="failed", failed_at=int(time.time()), errors=BatchErrors(data=[error])
        )
        await asyncio.to_thread(shutil.rmtree, self.work, True)

    def _source(self) -> Path:
        """The input file (looked up once per run of the job)."""
        if self._input is None:
            _, self._input = self.runner.files.path(self.record.input_file_id, self.record.owner)
        return self._input

    async def _save(self, **changes: Any) -> None:
        self.record = self.record.model_copy(update=changes)
        await self.store.save_batch(
            self.batch_id, self.record.model_dump_json(), self.record.index()
        )

    async def _stop_asked(self) -> str | None:
        """``cancelled`` or ``expired`` once the batch must stop, else None."""
        if await self.store.batch_cancelled(self.batch_id) is not None:
            return "cancelled"
        if self.record.expires_at is not None and time.time() >= self.record.expires_at:
            return "expired"
        return None

    # --- validating ---------------------------------------------------------------------
    async def _validate(self) -> None:
        """Check every line (JSON, shape, url = the batch's endpoint, one model, unique custom
        ids); a malformed file fails the batch with the lines named. A body the endpoint
        refuses is that line's 400 in the error file, as OpenAI answers it."""
        errors, plan = await asyncio.to_thread(
            check_lines, self._source(), self.record.endpoint, self.runner.settings
        )
        if plan is not None and not errors:
            try:
                task: Task = "embed" if self.record.endpoint == "/v1/embeddings" else "score"
                await self.runner.serving.check_model(plan.model, task)
            except APIError as e:
                errors.append(BatchError(code=e.body.code, message=e.body.message, line=1))
        now = int(time.time())
        if errors or plan is None:
            await self._save(status="failed", failed_at=now, errors=BatchErrors(data=errors))
            return
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "plan.json").write_text(plan.model_dump_json())
        counts = self.record.request_counts.model_copy(update={"total": plan.lines})
        await self._save(
            status="in_progress", in_progress_at=now, request_counts=counts, model=plan.model
        )

    # --- in progress --------------------------------------------------------------------
    async def _process(self) -> None:
        """Run the chunks not done yet; stop early for a cancel or the end of the window."""
        plan = Plan.model_validate_json((self.work / "plan.json").read_text())
        todo = []
        for k in range(len(plan.offsets)):
            if (self.work / f"{k}.out").exists():
                self._count_done(k)
            else:
                todo.append(k)
        await self._save_counts()
        chunks = [asyncio.create_task(self._chunk(plan, k)) for k in todo]
        try:
            while chunks:
                done, _ = await asyncio.wait(chunks, timeout=SCAN_SECONDS)
                for task in done:
                    task.result()  # a failure ends this run; the batch is taken up again
                chunks = [c for c in chunks if not c.done()]
                await self._save_counts()
                if chunks and await self._stop_asked() is not None:
                    return  # the loop in run() finishes it
        finally:
            for task in chunks:
                task.cancel()
            await asyncio.gather(*chunks, return_exceptions=True)
        await self._save(status="finalizing", finalizing_at=int(time.time()))

    def _count_done(self, k: int) -> None:
        for suffix, attr in (("out", "completed"), ("err", "failed")):
            path = self.work / f"{k}.{suffix}"
            if path.exists():
                with path.open("rb") as f:
                    n = sum(1 for _ in f)
                setattr(self.counts, attr, getattr(self.counts, attr) + n)

    async def _save_counts(self) -> None:
        counts = self.record.request_counts.model_copy(
            update={"completed": self.counts.completed, "failed": self.counts.failed}
        )
        if counts != self.record.request_counts:
            await self._save(request_counts=counts)

    async def _chunk(self, plan: Plan, k: int) -> None:
        """Chunk ``k`` of the input (the lines from ``plan.offsets[k]`` to the next chunk's):
        read and parsed in a thread, prepared as the interactive endpoint prepares them,
        queued at batch priority in pieces (chunks in input order), answered into ``<k>.out``
        / ``<k>.err``."""
        waits: list[asyncio.Task[None]] = []
        try:
            async with self.counts.in_order:
                lines = await asyncio.to_thread(self._read_chunk, plan, k)
                for line in lines:
                    await self._prepare(line)
                for piece in pieces(lines, self._piece_size()):
                    await self._reserve(len(piece.specs))
                    try:
                        request = await self._submit(piece.specs)
                    except BaseException:
                        await self._release(len(piece.specs))
                        raise
                    waits.append(asyncio.create_task(self._collect(piece, request)))
            metrics.BATCH_LINES.labels(plan.model, "queued").inc(len(lines))
            await asyncio.gather(*waits)
        finally:
            for wait in waits:
                wait.cancel()
        for line in lines:
            if line.answer is None:
                line.answer = respond(line)
        await asyncio.to_thread(self._write_chunk, k, lines)
        for line in lines:
            assert line.answer is not None
            ok = succeeded(line.answer)
            if ok:
                self.counts.completed += 1
            else:
                self.counts.failed += 1
            metrics.BATCH_LINES.labels(plan.model, "completed" if ok else "failed").inc()

    def _read_chunk(self, plan: Plan, k: int) -> list[Line]:
        """The chunk's lines, parsed (their bodies as the endpoint's request; a body the
        endpoint refuses is that line's 400). Runs in a thread: a long line does not hold the
        event loop while it is parsed."""
        end = plan.offsets[k + 1] if k + 1 < len(plan.offsets) else None
        out: list[Line] = []
        with self._source().open("rb") as f:
            f.seek(plan.offsets[k])
            at = plan.offsets[k]
            for raw in f:
                if end is not None and at >= end:
                    break
                at += len(raw)
                if raw.strip():
                    out.append(self._parse(raw))
        return out

    def _parse(self, raw: bytes) -> Line:
        line = BatchInputLine.model_validate_json(raw)  # checked while validating
        out = Line(line.custom_id)
        model = EmbeddingRequest if self.record.endpoint == "/v1/embeddings" else RerankRequest
        try:
            out.request = model.model_validate(line.body)
        except ValidationError as e:  # the body's own problems: a 400, as interactively
            err = invalid_body(e.errors()[0])
            out.answer = answer(line.custom_id, 400, json.dumps(err.response_json()))
        return out

    async def _prepare(self, line: Line) -> None:
        """The line's queue entries, as the interactive endpoint makes them (or its 4xx)."""
        if line.request is None:
            return
        serving = self.runner.serving
        try:
            if isinstance(line.request, EmbeddingRequest):
                line.prepared = await serving.prepare_embeddings(line.request)
            else:
                line.prepared = await serving.prepare_rerank(line.request)
        except APIError as e:
            line.answer = answer(line.custom_id, e.status, json.dumps(e.response_json()))
            return
        line.results = [None] * len(line.prepared.specs)

    def _piece_size(self) -> int:
        """Inputs per store request: what may be in flight for one batch, and what the
        queue's batch room takes."""
        return max(1, min(self.runner.settings.batch_inputs_in_flight, self.store.max_queued_batch))

    async def _reserve(self, n: int) -> None:
        """Wait for room: at most ``--batch-inputs-in-flight`` of this batch's inputs in the
        queue."""
        counts, limit = self.counts, self.runner.settings.batch_inputs_in_flight
        async with counts.room:
            await counts.room.wait_for(
                lambda: counts.inputs_in_flight == 0 or counts.inputs_in_flight + n <= limit
            )
            counts.inputs_in_flight += n

    async def _release(self, n: int) -> None:
        async with self.counts.room:
            self.counts.inputs_in_flight -= n
            self.counts.room.notify_all()

    async def _submit(self, specs: list[ItemSpec]) -> Request:
        """Queue a piece's inputs at batch priority, waiting while the queue's batch room is
        full (a piece always fits an empty one)."""
        for spec in specs:  # the lines' own specs: set in place, no copy per input
            spec.priority = BATCH_PRIORITY
        while True:
            try:
                return await self.store.submit(specs)
            except QueueFull:
                await asyncio.sleep(1.0)  # the batch room is taken: wait for it

    async def _collect(self, piece: Piece, request: Request) -> None:
        """Wait for every result of a piece, put each in its line; the piece's room goes
        back to the batch."""
        try:
            window = max(1.0, (self.record.expires_at or 0) - time.time())
            results = await self.store.wait(request, pickup_timeout=window, request_timeout=window)
        finally:
            await self._release(len(piece.specs))
        for (line, i), result in zip(piece.places, results, strict=True):
            line.results[i] = result

    def _write_chunk(self, k: int, lines: list[Line]) -> None:
        out = [line.answer for line in lines if line.answer and succeeded(line.answer)]
        err = [line.answer for line in lines if line.answer and not succeeded(line.answer)]
        for suffix, answers in (("err", err), ("out", out)):  # .out last: it marks the chunk
            tmp = self.work / f"{k}.{suffix}.tmp"
            with tmp.open("w", encoding="utf-8") as f:
                for answer in answers:
                    f.write(answer.text + "\n")
            os.replace(tmp, self.work / f"{k}.{suffix}")

    # --- finalizing ---------------------------------------------------------------------
    async def _finish(self) -> None:
        """Write the output and error files from the chunks done, and end the batch:
        ``completed``, or ``cancelled`` / ``expired`` with what was done."""
        stop = await self._stop_asked()
        if stop == "cancelled" and self.record.status not in ("finalizing", "cancelling"):
            asked = await self.store.batch_cancelled(self.batch_id)
            await self._save(status="cancelling", cancelling_at=asked)
        if self.record.output_file_id is None:  # ids first: a takeover writes the same files
            await self._save(output_file_id=new_file_id(), error_file_id=new_file_id())
        assert self.record.output_file_id is not None and self.record.error_file_id is not None
        chunks = sorted(
            (int(p.stem) for p in self.work.glob("*.out")) if self.work.exists() else []
        )
        self.counts = _Counts()
        for k in chunks:
            self._count_done(k)
        owner, files = self.record.owner, self.runner.files
        await files.write_lines(
            self.record.output_file_id,
            [self.work / f"{k}.out" for k in chunks],
            f"{self.batch_id}_output.jsonl",
            "batch_output",
            owner,
        )
        error_file: str | None = self.record.error_file_id
        if self.counts.failed:
            await files.write_lines(
                self.record.error_file_id,
                [self.work / f"{k}.err" for k in chunks if (self.work / f"{k}.err").exists()],
                f"{self.batch_id}_error.jsonl",
                "batch_output",
                owner,
            )
        else:
            error_file = None
        now = int(time.time())
        if self.record.status == "finalizing":
            end: dict[str, Any] = {"status": "completed", "completed_at": now}
        elif stop == "expired":
            end = {"status": "expired", "expired_at": now}
        else:
            end = {"status": "cancelled", "cancelled_at": now}
        counts = self.record.request_counts.model_copy(
            update={"completed": self.counts.completed, "failed": self.counts.failed}
        )
        await self._save(error_file_id=error_file, request_counts=counts, **end)
        await asyncio.to_thread(shutil.rmtree, self.work, True)
