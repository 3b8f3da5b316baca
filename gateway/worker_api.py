"""Queue routes (worker tokens): queue protocol v1, ``docs/queue-protocol.md``.
Thin handlers over the queue store (:class:`gateway.store.QueueStore`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway.api_models import json_response
from gateway.auth import worker_auth
from gateway.store import QueueStore
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


def _store(request: Request) -> QueueStore:
    store: QueueStore = request.app.state.store
    return store


@router.post("/pull", response_model=PullResponse)
async def pull(req: PullRequest, store: QueueStore = Depends(_store)) -> Response:
    """Lease up to ``max_items`` items, long-polling up to ``wait_seconds``."""
    items = await store.pull(
        req.worker_id, req.models, req.max_items, req.wait_seconds, req.max_tokens
    )
    return json_response(PullResponse(items=items), exclude_none=True)


@router.post("/results", response_model=ResultsResponse)
async def results(req: ResultsRequest, store: QueueStore = Depends(_store)) -> Response:
    """Answer items; idempotent (the first result wins)."""
    done = await store.complete(req.worker_id, req.results)
    return json_response(
        ResultsResponse(accepted=done.accepted, ignored=done.ignored, rejected=done.rejected)
    )


@router.post("/release", response_model=ReleaseResponse)
async def release(req: ReleaseRequest, store: QueueStore = Depends(_store)) -> Response:
    """Hand leased items back at once (drain)."""
    released = await store.release(req.worker_id, req.leases, count_attempt=req.count_attempt)
    return json_response(ReleaseResponse(released=released))
