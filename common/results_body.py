"""The binary results body of queue protocol v1 (``POST /queue/v1/results``), offered beside
JSON (:class:`~common.protocol.ResultsRequest`; ``PullResponse.result_encodings``): the same
results with their vectors as raw little-endian 32-bit words instead of base64 in JSON.
Documented in ``docs/queue-protocol.md``."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from pydantic import Field

from common.protocol import (
    MAX_NAME_LENGTH,
    MAX_TEXT,
    MAX_TOKENS,
    ItemError,
    ItemResult,
    Name,
    ResultsRequest,
    Token,
    Wire,
    decode_indices,
    decode_vector,
)

#: ``Content-Type`` of the binary results body, offered beside JSON (``PullResponse.
#: result_encodings``): ``b"IQR1"``, the length of a JSON header as a little-endian uint32,
#: the header (:class:`BinaryResultsHeader`: every result but its vector, with the number of
#: ``values`` it has and of a sparse embedding's ``indices``), then, in the header's order,
#: every result's little-endian float32 values followed by its little-endian uint32 indices,
#: back to back. No base64 and no JSON for the vectors; ``docs/queue-protocol.md``.
RESULTS_BINARY = "application/vnd.inference-queue.results-v1+binary"
_MAGIC = b"IQR1"


class BinaryResult(Wire):
    """One result in a binary body's header: :class:`ItemResult` with ``values`` (the length
    of its vector in the body) in place of ``vector_b64``, ``indices`` (of its sparse
    embedding's indices) in place of ``indices_b64``."""

    item_id: Name
    lease_id: Annotated[str, Field(max_length=MAX_NAME_LENGTH)]
    values: int = Field(default=0, ge=0)
    #: A sparse embedding's (None: not one; 0: one with no weight).
    indices: int | None = Field(default=None, ge=0)
    #: A per-token embedding's rows (its values are [rows, dim], row-major).
    rows: int | None = Field(default=None, ge=1)
    prompt_tokens: int = Field(default=0, ge=0)
    error: ItemError | None = None
    tokens: list[Token] | None = Field(default=None, max_length=MAX_TOKENS)
    text: str | None = Field(default=None, max_length=MAX_TEXT)


class BinaryResultsHeader(Wire):
    worker_id: Name
    results: list[BinaryResult]


def encode_results(worker_id: str, results: list[ItemResult]) -> bytes:
    """``results`` as a binary body (:data:`RESULTS_BINARY`)."""
    words: list[bytes] = []  # every result's float32 values, then its uint32 indices
    header = []
    for r in results:
        vec, idx = r.words()
        if vec is None and r.vector_b64 is not None:
            vec = decode_vector(r.vector_b64)
        if idx is None and r.indices_b64 is not None:
            idx = decode_indices(r.indices_b64)
        for part, dtype in ((vec, "<f4"), (idx, "<u4")):
            if part is not None:
                words.append(np.ascontiguousarray(part, dtype=dtype).tobytes())
        header.append(
            BinaryResult(
                item_id=r.item_id,
                lease_id=r.lease_id,
                values=0 if vec is None else int(vec.size),
                indices=None if idx is None else int(idx.size),
                rows=r.rows,
                prompt_tokens=r.prompt_tokens,
                error=r.error,
                tokens=r.tokens,
                text=r.text,
            )
        )
    head = BinaryResultsHeader(worker_id=worker_id, results=header).model_dump_json(
        exclude_none=True
    )
    raw = head.encode()
    return b"".join((_MAGIC, len(raw).to_bytes(4, "little"), raw, *words))


def decode_results(body: bytes) -> ResultsRequest:
    """A binary body -> the :class:`ResultsRequest` its JSON twin would give (vectors as
    ``vector_b64``; each result's float32 values also kept as they came, in
    ``ItemResult.words()``). Raises ValueError for a body that is not one (bad framing, a
    length that does not match the values the header counts), pydantic's ValidationError for
    a bad header."""
    if len(body) < 8 or body[:4] != _MAGIC:
        raise ValueError("not a binary results body (no IQR1 header)")
    size = int.from_bytes(body[4:8], "little")
    if 8 + size > len(body):
        raise ValueError("the header is longer than the body")
    header = BinaryResultsHeader.model_validate_json(body[8 : 8 + size])
    data = memoryview(body)[8 + size :]
    want = 4 * sum(r.values + (r.indices or 0) for r in header.results)
    if len(data) != want:
        raise ValueError(f"the body has {len(data)} bytes of values, the header counts {want}")
    out, at = [], 0

    def take(count: int | None, empty: str | None = None) -> str | None:
        nonlocal at
        if not count:
            return empty
        chunk = data[at : at + 4 * count]
        at += 4 * count
        return base64.b64encode(chunk).decode("ascii")

    for r in header.results:
        sparse = r.indices is not None  # a sparse embedding may have no weight at all
        start = at
        vector = take(r.values, "" if sparse else None)
        indices = take(r.indices, "" if sparse else None)
        result = ItemResult(
            item_id=r.item_id,
            lease_id=r.lease_id,
            vector_b64=vector,
            indices_b64=indices,
            rows=r.rows,
            prompt_tokens=r.prompt_tokens,
            error=r.error,
            tokens=r.tokens,
            text=r.text,
        )
        if r.values:  # the values as they came: checked without decoding the base64 again
            result.keep_words(np.frombuffer(data[start : start + 4 * r.values], dtype="<f4"))
        out.append(result)
    return ResultsRequest(worker_id=header.worker_id, results=out)
