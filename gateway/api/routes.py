"""Client routes (API keys, checked by :mod:`gateway.http.edge`): ``POST /v1/embeddings``,
``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``, as vLLM serves it for Cohere and
Jina clients), Cohere's ``POST /v2/embed`` and ``/v1/embed`` (:mod:`gateway.api.cohere`),
``POST /v1/score``, ``POST /v1/classify``, ``GET /v1/models``. Thin handlers; the logic is in
:mod:`gateway.api.serving`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from gateway.api import cohere
from gateway.api.models import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelList,
    RerankRequest,
    RerankResponse,
    ScoreRequest,
    ScoreResponse,
    json_response,
)
from gateway.api.serving import Disconnected, Serving
from gateway.errors import APIError

#: Credentials are checked before the body is read: :class:`gateway.http.edge.Edge`.
router = APIRouter(prefix="/v1")
#: The same routes at the paths other APIs use (Cohere's ``/v2/...``, vLLM's unversioned ones).
peer_router = APIRouter()


async def _serving(request: Request) -> Serving:
    """(``async``: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop
    per request.)"""
    serving: Serving = request.app.state.serving
    return serving


def _disconnected(request: Request) -> Disconnected:
    """Returns once the client has closed its connection (the body is read already, so the
    next ASGI message is the disconnect)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


async def _serving_open(request: Request) -> Serving:
    """The serving object; 503 while the gateway drains (after SIGTERM)."""
    if getattr(request.app.state, "draining", False):
        raise APIError(
            503,
            "This gateway is shutting down; send the request again.",
            type="server_error",
            code="draining",
            headers={"Retry-After": "1"},
        )
    return await _serving(request)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(
    req: EmbeddingRequest, request: Request, serving: Serving = Depends(_serving_open)
) -> Response:
    return json_response(await serving.embeddings(req, _disconnected(request)))


@router.post("/rerank", response_model=RerankResponse)
@peer_router.post("/rerank", response_model=RerankResponse)
@peer_router.post("/v2/rerank", response_model=RerankResponse)
async def rerank(
    req: RerankRequest, request: Request, serving: Serving = Depends(_serving_open)
) -> Response:
    # "document" only with return_documents
    return json_response(await serving.rerank(req, _disconnected(request)), exclude_none=True)


@peer_router.post("/v2/embed", response_model=cohere.CohereEmbedResponse)
async def cohere_embed_v2(
    req: cohere.CohereEmbedRequest, request: Request, serving: Serving = Depends(_serving_open)
) -> Response:
    answer = await cohere.embed(serving, req, 2, _disconnected(request))
    return json_response(answer, exclude_none=True)


@peer_router.post("/v1/embed", response_model=cohere.CohereEmbedResponse)
async def cohere_embed_v1(
    req: cohere.CohereEmbedRequest, request: Request, serving: Serving = Depends(_serving_open)
) -> Response:
    return json_response(
        await cohere.embed(serving, req, 1, _disconnected(request)), exclude_none=True
    )


@router.post("/score", response_model=ScoreResponse)
async def score(
    req: ScoreRequest, request: Request, serving: Serving = Depends(_serving_open)
) -> Response:
    return json_response(await serving.score(req, _disconnected(request)))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    req: ClassifyRequest, request: Request, serving: Serving = Depends(_serving_open)
) -> Response:
    return json_response(await serving.classify(req, _disconnected(request)))


@router.get("/models", response_model=ModelList)
async def models(serving: Serving = Depends(_serving)) -> Response:
    return json_response(await serving.models())
