"""Queue routes (worker tokens, checked by :mod:`gateway.http.edge`): queue protocol v1,
``docs/queue-protocol.md``.
Thin handlers over the queue store (:class:`gateway.queue.store.QueueStore`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from common.protocol import (
    PREFIX,
    ErrorCode,
    ItemError,
    ItemResult,
    PullRequest,
    PullResponse,
    ReleaseRequest,
    ReleaseResponse,
    ResultEncoding,
    ResultsRequest,
    ResultsResponse,
    WorkItem,
)
from common.results_body import RESULTS_BINARY, decode_results
from gateway.api.models import json_response
from gateway.errors import APIError, invalid_body
from gateway.http.auth import WorkerScope
from gateway.queue.store import QueueStore

#: Worker tokens are checked before the body is read (:class:`gateway.http.edge.Edge`); a scoped
#: token's models are checked here (403). Served as direct routes (:mod:`gateway.http.routing`).
router = APIRouter(prefix=PREFIX)


def _store(request: Request) -> QueueStore:
    store: QueueStore = request.app.state.store
    return store


def _scope(request: Request) -> WorkerScope:
    scope: WorkerScope = request.state.worker_scope
    return scope


def _check_items(scope: WorkerScope, store: QueueStore, item_ids: list[str]) -> None:
    """403 if any of the (known) items is of a model the token may not serve."""
    if scope.models is not None:
        scope.check([m for m in map(store.item_model, item_ids) if m is not None])


@router.post("/pull", response_model=PullResponse)
async def pull(req: PullRequest, request: Request) -> Response:
    """Lease up to ``max_items`` items, long-polling up to ``wait_seconds``."""
    store, scope = _store(request), _scope(request)
    scope.check([m.name for m in req.models])
    items = await store.pull(
        req.worker_id,
        req.models,
        req.max_items,
        req.wait_seconds,
        req.max_tokens,
        req.max_batch_items,
    )
    try:
        body = PullResponse(items=items, result_encodings=RESULT_ENCODINGS).model_dump_json(
            exclude_none=True
        )
    except ValueError:  # an item that is not JSON: the others go out, it is answered alone
        body = await _item_by_item(store, req.worker_id, items)
    return Response(body, media_type="application/json")


#: The results bodies this gateway takes, told to workers in every pull answer.
RESULT_ENCODINGS: list[ResultEncoding] = ["json", "binary"]


async def _item_by_item(store: QueueStore, worker_id: str, items: list[WorkItem]) -> str:
    """A pull answer serialised item by item: an item that cannot be (what the edge let
    through and JSON cannot carry) is not handed out but answered at once with
    ``invalid_input``, so that it never fails a pull nor comes back beside other inputs."""
    parts, failed = [], []
    for item in items:
        try:
            parts.append(item.model_dump_json(exclude_none=True))
        except ValueError as e:
            error = ItemError(
                code=ErrorCode.INVALID_INPUT,
                message=f"the input cannot be sent to a worker: {str(e)[:200]}",
            )
            failed.append(ItemResult(item_id=item.item_id, lease_id=item.lease_id, error=error))
    if failed:
        await store.complete(worker_id, failed)
    encodings = ",".join(f'"{e}"' for e in RESULT_ENCODINGS)
    return f'{{"items":[{",".join(parts)}],"result_encodings":[{encodings}]}}'


@router.post(
    "/results",
    response_model=ResultsResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ResultsRequest.model_json_schema()},
                RESULTS_BINARY: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def results(request: Request) -> Response:
    """Answer items; idempotent (the first result wins). The body is JSON
    (:class:`~common.protocol.ResultsRequest`) or binary (``RESULTS_BINARY``); a malformed
    one is a 400 naming what is wrong."""
    store, scope = _store(request), _scope(request)
    body = await request.body()
    binary = request.headers.get("content-type", "").split(";")[0].strip() == RESULTS_BINARY
    try:
        req = decode_results(body) if binary else ResultsRequest.model_validate_json(body)
    except ValidationError as e:
        error = e.errors()[0]
        if binary and error["type"] == "json_invalid":  # the JSON header, not the body
            detail = (error.get("ctx") or {}).get("error", "")
            message = f"Invalid binary results body: its header is not JSON: {detail}"
            raise APIError(400, message) from None
        raise invalid_body(error) from None
    except ValueError as e:
        raise APIError(400, f"Invalid binary results body: {e}") from None
    _check_items(scope, store, [r.item_id for r in req.results])
    done = await store.complete(req.worker_id, req.results)
    return json_response(
        ResultsResponse(accepted=done.accepted, ignored=done.ignored, rejected=done.rejected)
    )


@router.post("/release", response_model=ReleaseResponse)
async def release(req: ReleaseRequest, request: Request) -> Response:
    """Hand leased items back at once (drain)."""
    store, scope = _store(request), _scope(request)
    _check_items(scope, store, [item_id for item_id, _ in req.leases])
    released = await store.release(req.worker_id, req.leases, count_attempt=req.count_attempt)
    return json_response(ReleaseResponse(released=released))
