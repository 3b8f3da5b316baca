"""Validating a batch input file, line by line, without holding any long line in memory;
a good file's :class:`Plan`: where each chunk of at most :data:`CHUNK_LINES` lines and
:data:`CHUNK_BYTES` bytes starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ValidationError

from gateway.batch.models import BatchError, BatchInputLine
from gateway.settings import GatewaySettings

#: Lines per chunk: the unit of work written at once (and redone after a takeover).
CHUNK_LINES = 256
#: Bytes of input lines per chunk at most (a longer line is a chunk of its own).
CHUNK_BYTES = 16 * 1024 * 1024
#: Problems of a malformed input file listed in the failed batch's ``errors``.
MAX_REPORTED_ERRORS = 100


class Plan(BaseModel):
    """A validated batch: its lines, the byte offset of each chunk's first line, its model."""

    lines: int
    offsets: list[int]  # byte offset of each chunk's first line
    model: str


def check_lines(
    source: Path, endpoint: str, settings: GatewaySettings
) -> tuple[list[BatchError], Plan | None]:
    """Check every line of a batch input file (JSON, shape, url = the batch's ``endpoint``,
    one model, unique custom ids, at most ``--max-batch-lines`` lines of at most
    ``--max-batch-line-bytes``): the problems (at most :data:`MAX_REPORTED_ERRORS`, 1-based
    lines) and, for a good file, its :class:`Plan`. Blocking: run it in a thread."""
    errors: list[BatchError] = []
    offsets: list[int] = []
    seen: set[str] = set()
    models: set[str] = set()
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
            if line.url != endpoint:
                problem(
                    "invalid_url",
                    f"The line's url is '{line.url[:200]}'; this batch's endpoint is '{endpoint}'.",
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
    return errors, Plan(lines=n, offsets=offsets, model=next(iter(models)))


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
