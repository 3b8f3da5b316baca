"""Client routes (API keys): ``POST /v1/embeddings``, ``POST /v1/rerank``, ``GET /v1/models``.
Thin handlers; the logic is in :mod:`gateway.serving`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway.api_models import (
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
    json_response,
)
from gateway.auth import client_auth
from gateway.serving import Serving

router = APIRouter(prefix="/v1", dependencies=[Depends(client_auth)])


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(req: EmbeddingRequest, serving: Serving = Depends(_serving)) -> Response:
    return json_response(await serving.embeddings(req))


@router.post("/rerank", response_model=RerankResponse)
async def rerank(req: RerankRequest, serving: Serving = Depends(_serving)) -> Response:
    # "document" only with return_documents
    return json_response(await serving.rerank(req), exclude_none=True)


@router.get("/models", response_model=ModelList)
async def models(serving: Serving = Depends(_serving)) -> Response:
    return json_response(serving.models())
