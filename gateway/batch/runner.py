"""Runs batch jobs: their lines go through the same queue and workers as interactive requests,
at batch priority (handed out only with the room interactive inputs leave), and their answers
go to the output and error files.

Every replica runs a :class:`BatchRunner`. A batch is run by one replica at a time: the one
that holds its claim in the queue store (renewed while it runs; another replica takes over
once it lapses, e.g. after the replica died). The work of a running batch is kept in
``<files dir>/batches/<batch id>/``: ``plan.json`` (where each chunk of
:data:`CHUNK_LINES` lines starts in the input file) and, per chunk done, ``<k>.out`` and
``<k>.err`` (its output and error lines, written to a temporary name and renamed: a chunk is
done when ``<k>.out`` exists). A runner that takes over redoes only the chunks not done, so
every line is answered exactly once in the output, even when queue inputs were delivered
twice. The data path of a chunk reads top to bottom: read and parse lines (in a thread) ->
prepare (as the interactive endpoint) -> submit at batch priority, in pieces that fit the
queue -> wait -> write the chunk's lines.

What a batch costs is bounded by configuration, not by its file: a line over
``--max-batch-line-bytes`` fails validation unread, a chunk holds at most :data:`CHUNK_LINES`
lines and :data:`CHUNK_BYTES` bytes, and its inputs enter the queue in pieces of at most
``--batch-inputs-in-flight`` (and the queue's batch room, ``--max-queued-batch-inputs``),
never more than that many of one batch at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from common.protocol import BATCH_PRIORITY, ItemResult, ItemSpec, Task
from gateway import metrics
from gateway.api.models import EmbeddingRequest, RerankRequest
from gateway.api.serving import Prepared, Serving
from gateway.batch.files import FileStore, new_file_id
from gateway.batch.jobs import Batches
from gateway.batch.models import (
    TERMINAL,
    BatchError,
    BatchErrors,
    BatchInputLine,
    BatchRecord,
)
from gateway.errors import APIError, invalid_body, item_error
from gateway.queue.store import QueueFull, QueueStore, Request, StoreUnavailable
from gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

#: Lines per chunk: the unit of work written at once (and redone after a takeover).
CHUNK_LINES = 256
#: Bytes of input lines per chunk at most (a longer line is a chunk of its own).
CHUNK_BYTES = 16 * 1024 * 1024
#: Seconds a runner's claim on a batch lasts; renewed every third of it.
CLAIM_SECONDS = 15.0
#: Seconds between two looks for batches to run (and for a cancel of a running one).
SCAN_SECONDS = 1.0
#: Problems of a malformed input file listed in the failed batch's ``errors``.
MAX_REPORTED_ERRORS = 100
#: Seconds between two passes that forget expired batches and delete expired files (less
#: where a retention is shorter).
SWEEP_SECONDS = 60.0


class _Plan(BaseModel):
    lines: int
    offsets: list[int]  # byte offset of each chunk's first line
    model: str


@dataclass
class _Answer:
    """A line's answer: its status, and its output line (JSON, :class:`BatchOutputLine`)."""

    status: int
    text: str


@dataclass
class _Line:
    """One input line of a chunk: its custom id, its request (parsed), then the queue
    entries it became and their results; or its answer where it was refused."""

    custom_id: str
    request: EmbeddingRequest | RerankRequest | None = None
    prepared: Prepared[Any] | None = None
    results: list[ItemResult | None] = field(default_factory=list)
    answer: _Answer | None = None


@dataclass
class _Piece:
    """Inputs of a chunk that enter the queue as one store request (one task, at most the
    piece size): their specs, and the line and input each result goes to."""

    specs: list[ItemSpec] = field(default_factory=list)
    places: list[tuple[_Line, int]] = field(default_factory=list)


@dataclass
class _Counts:
    completed: int = 0
    failed: int = 0
    inputs_in_flight: int = 0
    room: asyncio.Condition = field(default_factory=asyncio.Condition)
    in_order: asyncio.Lock = field(default_factory=asyncio.Lock)  # chunks enter the queue


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

    async def start(self) -> None:
        self._scan = asyncio.create_task(self._scan_forever(), name="batch-scan")

    async def close(self) -> None:
        tasks = [t for t in [self._scan, *self._running.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look for batches to run now (a batch was just created here), not at the next scan."""
        self._woken.set()

    async def _scan_forever(self) -> None:
        while True:
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
                async with asyncio.timeout(SCAN_SECONDS):
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
        job = _Job(self, batch_id)
        work = asyncio.create_task(job.run())
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


class _Job:
    """One batch run by this replica: its record, its work directory, its chunks."""

    def __init__(self, runner: BatchRunner, batch_id: str):
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
        errors, plan = await asyncio.to_thread(self._check_lines, self._source())
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

    def _check_lines(self, source: Path) -> tuple[list[BatchError], _Plan | None]:
        errors: list[BatchError] = []
        offsets: list[int] = []
        seen: set[str] = set()
        models: set[str] = set()
        settings = self.runner.settings
        limit, max_line = settings.max_batch_lines, settings.max_batch_line_bytes
        n = 0
        chunk_lines = chunk_bytes = 0

        def problem(code: str, message: str, line: int, param: str | None = None) -> None:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(BatchError(code=code, message=message, param=param, line=line))

        with source.open("rb") as f:
            offset = 0
            for raw, size in _lines(f, max_line):
                start, offset = offset, offset + size
                if raw is not None and not raw.strip():
                    continue
                if chunk_lines == 0 or chunk_lines >= CHUNK_LINES or chunk_bytes >= CHUNK_BYTES:
                    offsets.append(start)
                    chunk_lines = chunk_bytes = 0
                chunk_lines, chunk_bytes = chunk_lines + 1, chunk_bytes + size
                n += 1
                if n > limit:
                    problem("too_many_requests", f"A batch has at most {limit} lines.", n)
                    break
                if raw is None:  # not read: over the limit
                    problem(
                        "request_too_large",
                        f"The line has {size} bytes; at most {max_line} are accepted "
                        "(--max-batch-line-bytes).",
                        n,
                    )
                    continue
                try:
                    line = BatchInputLine.model_validate_json(raw)
                except ValidationError as e:
                    err = e.errors()[0]
                    where = ".".join(str(p) for p in err["loc"])
                    problem("invalid_request", f"{where}: {err['msg']}", n, where or None)
                    continue
                model = line.body.get("model")
                if not isinstance(model, str):
                    problem("invalid_request", "body.model: a string is required", n, "body.model")
                    continue
                if line.url != self.record.endpoint:
                    problem(
                        "invalid_url",
                        f"The line's url is '{line.url[:200]}'; this batch's endpoint is "
                        f"'{self.record.endpoint}'.",
                        n,
                        "url",
                    )
                if line.custom_id in seen:
                    problem("duplicate_custom_id", f"custom_id '{line.custom_id}' again.", n)
                seen.add(line.custom_id)
                models.add(model)
                if len(models) > 1:
                    problem(
                        "mismatched_model",
                        f"All lines of a batch must use one model; this one uses '{model[:256]}'.",
                        n,
                        "body.model",
                    )
                    models = {next(iter(models - {model}), model)}
        if n == 0:
            problem("empty_file", "The input file has no lines.", 1)
        if errors or not models:
            return errors, None
        return errors, _Plan(lines=n, offsets=offsets, model=next(iter(models)))

    # --- in progress --------------------------------------------------------------------
    async def _process(self) -> None:
        """Run the chunks not done yet; stop early for a cancel or the end of the window."""
        plan = _Plan.model_validate_json((self.work / "plan.json").read_text())
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

    async def _chunk(self, plan: _Plan, k: int) -> None:
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
                for piece in _pieces(lines, self._piece_size()):
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
                line.answer = _respond(line)
        await asyncio.to_thread(self._write_chunk, k, lines)
        for line in lines:
            assert line.answer is not None
            ok = _succeeded(line.answer)
            if ok:
                self.counts.completed += 1
            else:
                self.counts.failed += 1
            metrics.BATCH_LINES.labels(plan.model, "completed" if ok else "failed").inc()

    def _read_chunk(self, plan: _Plan, k: int) -> list[_Line]:
        """The chunk's lines, parsed (their bodies as the endpoint's request; a body the
        endpoint refuses is that line's 400). Runs in a thread: a long line does not hold the
        event loop while it is parsed."""
        end = plan.offsets[k + 1] if k + 1 < len(plan.offsets) else None
        out: list[_Line] = []
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

    def _parse(self, raw: bytes) -> _Line:
        line = BatchInputLine.model_validate_json(raw)  # checked while validating
        out = _Line(line.custom_id)
        model = EmbeddingRequest if self.record.endpoint == "/v1/embeddings" else RerankRequest
        try:
            out.request = model.model_validate(line.body)
        except ValidationError as e:  # the body's own problems: a 400, as interactively
            err = invalid_body(e.errors()[0])
            out.answer = _answer(line.custom_id, 400, json.dumps(err.response_json()))
        return out

    async def _prepare(self, line: _Line) -> None:
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
            line.answer = _answer(line.custom_id, e.status, json.dumps(e.response_json()))
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

    async def _collect(self, piece: _Piece, request: Request) -> None:
        """Wait for every result of a piece, put each in its line; the piece's room goes
        back to the batch."""
        try:
            window = max(1.0, (self.record.expires_at or 0) - time.time())
            results = await self.store.wait(request, pickup_timeout=window, request_timeout=window)
        finally:
            await self._release(len(piece.specs))
        for (line, i), result in zip(piece.places, results, strict=True):
            line.results[i] = result

    def _write_chunk(self, k: int, lines: list[_Line]) -> None:
        out = [line.answer for line in lines if line.answer and _succeeded(line.answer)]
        err = [line.answer for line in lines if line.answer and not _succeeded(line.answer)]
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


#: Output-line ids: a random prefix per gateway process and a counter (unique across
#: replicas and restarts; two ``uuid4()`` per line cost 25 us of the gateway's CPU).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count()


def _lines(f: BinaryIO, max_line: int) -> Iterator[tuple[bytes | None, int]]:
    """The lines of ``f`` with their sizes in bytes (newline included); a line longer than
    ``max_line`` comes as (None, its size) and is never held in memory whole."""
    while raw := f.readline(max_line + 1):
        if len(raw) <= max_line or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        size = len(raw)
        while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
            size += len(rest)
        yield None, size + len(rest)


def _answer(custom_id: str, status: int, body: str) -> _Answer:
    """The output line of a request answered with ``status`` and ``body`` (JSON), in the
    shape of :class:`BatchOutputLine` (ids of 24 and 32 hex digits), serialised once."""
    n = next(_ID_COUNTER)
    head = json.dumps({"id": f"batch_req_{_ID_PREFIX}{n:012x}", "custom_id": custom_id})
    response = f'{{"status_code": {status}, "request_id": "{_ID_PREFIX}{n:020x}", "body": {body}}}'
    return _Answer(status, f'{head[:-1]}, "response": {response}, "error": null}}')


def _pieces(lines: list[_Line], size: int) -> list[_Piece]:
    """The prepared lines' inputs as pieces of at most ``size`` inputs of one task each, in
    input order."""
    by_task: dict[str, list[_Piece]] = {}
    for line in lines:
        if line.prepared is None:
            continue
        pieces = by_task.setdefault(line.prepared.specs[0].task, [_Piece()])
        for i, spec in enumerate(line.prepared.specs):
            if len(pieces[-1].specs) >= size:
                pieces.append(_Piece())
            pieces[-1].specs.append(spec)
            pieces[-1].places.append((line, i))
    return [piece for pieces in by_task.values() for piece in pieces if piece.specs]


def _respond(line: _Line) -> _Answer:
    """A line's answer from its inputs' results: the endpoint's response, or the error of its
    first failed input (as the interactive endpoint answers it)."""
    assert line.prepared is not None
    results = [r for r in line.results if r is not None]
    assert len(results) == len(line.results)
    for index, res in enumerate(results):
        if res.error is not None:
            e = item_error(res.error, line.prepared.field, index, len(results))
            return _answer(line.custom_id, e.status, json.dumps(e.response_json()))
    body = line.prepared.respond(results)
    return _answer(line.custom_id, 200, body.model_dump_json(exclude_none=True))


def _succeeded(answer: _Answer) -> bool:
    return answer.status == 200
