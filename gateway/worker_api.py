"""Queue routes (worker tokens): queue protocol v1, ``docs/queue-protocol.md``.
Thin handlers over :class:`gateway.queue.WorkQueue`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway.api_models import json_response
from gateway.auth import worker_auth
from gateway.queue import WorkQueue
from worker.protocol import (
    PREFIX,
    PullRequest,
    PullResponse,
    ReleaseRequest,
    ReleaseResponse,
    ResultsRequest,
    ResultsResponse,
)

router = APIRouter(prefix=PREFIX, dependencies=[Depends(worker_auth)])


def _queue(request: Request) -> WorkQueue:
    queue: WorkQueue = request.app.state.queue
    return queue


@router.post("/pull", response_model=PullResponse)
async def pull(req: PullRequest, queue: WorkQueue = Depends(_queue)) -> Response:
    """Lease up to ``max_items`` items, long-polling up to ``wait_seconds``."""
    items = await queue.pull(
        req.worker_id, req.models, req.max_items, req.wait_seconds, req.max_tokens
    )
    return json_response(PullResponse(items=items), exclude_none=True)


@router.post("/results", response_model=ResultsResponse)
async def results(req: ResultsRequest, queue: WorkQueue = Depends(_queue)) -> Response:
    """Answer items; idempotent (the first result wins)."""
    accepted, ignored = queue.complete(req.results)
    return json_response(ResultsResponse(accepted=accepted, ignored=ignored))


@router.post("/release", response_model=ReleaseResponse)
async def release(req: ReleaseRequest, queue: WorkQueue = Depends(_queue)) -> Response:
    """Hand leased items back at once (drain)."""
    return json_response(ReleaseResponse(released=queue.release(req.leases)))
