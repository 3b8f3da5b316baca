"""A batch's lines in flight: each line's request, its queue entries and results
(:class:`Line`), the pieces its inputs enter the queue in (:class:`Piece`), and its answer, the
output line (:class:`Answer`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.protocol import ItemResult, ItemSpec
from gateway.api.models import EmbeddingRequest, RerankRequest
from gateway.api.serving import Prepared
from gateway.errors import item_error
from gateway.queue.store import new_id


@dataclass
class Answer:
    """A line's answer: its status, and its output line (JSON, :class:`BatchOutputLine`)."""

    status: int
    text: str


@dataclass
class Line:
    """One input line of a chunk: its custom id, its request (parsed), then the queue
    entries it became and their results; or its answer where it was refused."""

    custom_id: str
    request: EmbeddingRequest | RerankRequest | None = None
    prepared: Prepared[Any] | None = None
    results: list[ItemResult | None] = field(default_factory=list)
    answer: Answer | None = None


@dataclass
class Piece:
    """Inputs of a chunk that enter the queue as one store request (one task, at most the
    piece size): their specs, and the line and input each result goes to."""

    specs: list[ItemSpec] = field(default_factory=list)
    places: list[tuple[Line, int]] = field(default_factory=list)


def answer(custom_id: str, status: int, body: str) -> Answer:
    """The output line of a request answered with ``status`` and ``body`` (JSON), in the
    shape of :class:`BatchOutputLine` (ids of 24 and 32 hex digits, from
    :func:`gateway.queue.store.new_id`), serialised once."""
    head = json.dumps({"id": f"batch_req_{new_id()}", "custom_id": custom_id})
    response = f'{{"status_code": {status}, "request_id": "{new_id(20)}", "body": {body}}}'
    return Answer(status, f'{head[:-1]}, "response": {response}, "error": null}}')


def pieces(lines: list[Line], size: int) -> list[Piece]:
    """The prepared lines' inputs as pieces of at most ``size`` inputs of one task each, in
    input order."""
    by_task: dict[str, list[Piece]] = {}
    for line in lines:
        if line.prepared is None:
            continue
        pieces = by_task.setdefault(line.prepared.specs[0].task, [Piece()])
        for i, spec in enumerate(line.prepared.specs):
            if len(pieces[-1].specs) >= size:
                pieces.append(Piece())
            pieces[-1].specs.append(spec)
            pieces[-1].places.append((line, i))
    return [piece for pieces in by_task.values() for piece in pieces if piece.specs]


def respond(line: Line) -> Answer:
    """A line's answer from its inputs' results: the endpoint's response, or the error of its
    first failed input (as the interactive endpoint answers it)."""
    assert line.prepared is not None
    results = [r for r in line.results if r is not None]
    assert len(results) == len(line.results)
    for index, res in enumerate(results):
        if res.error is not None:
            e = item_error(res.error, line.prepared.field, index, len(results))
            return answer(line.custom_id, e.status, json.dumps(e.response_json()))
    body = line.prepared.respond(results)
    return answer(line.custom_id, 200, body.model_dump_json(exclude_none=True))


def succeeded(answer: Answer) -> bool:
    return answer.status == 200
