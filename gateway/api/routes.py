"""Client routes (API keys, checked by :mod:`gateway.http.edge`): ``POST /v1/embeddings``,
``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``, as vLLM serves it for Cohere and
Jina clients, and with TEI's body), Cohere's ``POST /v2/embed`` and ``/v1/embed``
(:mod:`gateway.api.cohere`), TEI's ``/embed``, ``/predict``, ``/``, ``/tokenize``,
``/decode``, ``GET /info``
(:mod:`gateway.api.tei`),
``POST /v1/score``, ``POST /v1/classify``, ``GET /v1/models``. Thin handlers; the logic is in
:mod:`gateway.api.serving`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from common.protocol import Token
from gateway.api import cohere, tei
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
from gateway.api.serving import Serving
from gateway.errors import APIError
from gateway.http.disconnect import watch

#: Built once: a TypeAdapter compiles its serializer when made.
_LIST = TypeAdapter(list[Any])
#: TEI's tokens keep their null offsets (special tokens), unlike ``json_list``.
_TOKENS = TypeAdapter(list[list[Token]])


def json_list(items: list[Any]) -> Response:
    """A JSON array of wire models (TEI's responses are bare arrays)."""
    return Response(_LIST.dump_json(items, exclude_none=True), media_type="application/json")


#: Credentials are checked before the body is read: :class:`gateway.http.edge.Edge`. The POST
#: routes are served as direct routes (:mod:`gateway.http.routing`): ``(body, request)``.
router = APIRouter(prefix="/v1")
#: The same routes at the paths other APIs use (Cohere's ``/v2/...``, vLLM's unversioned ones).
peer_router = APIRouter()


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


def _serving_open(request: Request) -> Serving:
    """The serving object; 503 while the gateway drains (after SIGTERM)."""
    if getattr(request.app.state, "draining", False):
        raise APIError(
            503,
            "This gateway is shutting down; send the request again.",
            type="server_error",
            code="draining",
            headers={"Retry-After": "1"},
        )
    return _serving(request)


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_response(await serving.embeddings(req, watch(request)))


@router.post("/rerank", response_model=RerankResponse)
@peer_router.post("/v2/rerank", response_model=RerankResponse)
async def rerank(req: RerankRequest, request: Request) -> Response:
    serving = _serving_open(request)
    # "document" only with return_documents
    return json_response(await serving.rerank(req, watch(request)), exclude_none=True)


@peer_router.post("/rerank", response_model=RerankResponse | list[tei.TEIRank])
async def rerank_any(req: RerankRequest | tei.TEIRerankRequest, request: Request) -> Response:
    """Cohere's / Jina's body (``documents``) as ``/v1/rerank``, or TEI's (``texts``)."""
    if isinstance(req, RerankRequest):
        return await rerank(req, request)
    serving = _serving_open(request)
    ranks = await tei.rerank(serving, req, watch(request))
    return json_list(ranks)


@peer_router.post("/embed", response_model=list[list[float]])
async def tei_embed(req: tei.TEIEmbedRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return JSONResponse(await tei.embed(serving, req, watch(request)))


@peer_router.post("/embed_sparse", response_model=list[list[tei.TEISparseValue]])
async def tei_embed_sparse(req: tei.TEIEmbedSparseRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_list(await tei.embed_sparse(serving, req, watch(request)))


@peer_router.post(
    "/predict", response_model=list[tei.TEIPrediction] | list[list[tei.TEIPrediction]]
)
async def tei_predict(req: tei.TEIPredictRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_list(await tei.predict(serving, req, watch(request)))


@peer_router.post("/")
async def tei_root(req: tei.TEIEmbedRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_list(await tei.root(serving, req, watch(request)))


@peer_router.post("/tokenize", response_model=list[list[Token]])
async def tei_tokenize(req: tei.TEITokenizeRequest, request: Request) -> Response:
    serving = _serving_open(request)
    tokens = await tei.tokenize(serving, req, watch(request))
    return Response(_TOKENS.dump_json(tokens), media_type="application/json")


@peer_router.post("/decode", response_model=list[str])
async def tei_decode(req: tei.TEIDecodeRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return JSONResponse(await tei.decode(serving, req, watch(request)))


@peer_router.get("/info")
async def tei_info(request: Request, model: str | None = None) -> Response:
    return JSONResponse(await tei.info(_serving(request), model))


@peer_router.post("/v2/embed", response_model=cohere.CohereEmbedResponse)
async def cohere_embed_v2(req: cohere.CohereEmbedRequest, request: Request) -> Response:
    serving = _serving_open(request)
    answer = await cohere.embed(serving, req, 2, watch(request))
    return json_response(answer, exclude_none=True)


@peer_router.post("/v1/embed", response_model=cohere.CohereEmbedResponse)
async def cohere_embed_v1(req: cohere.CohereEmbedRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_response(await cohere.embed(serving, req, 1, watch(request)), exclude_none=True)


@router.post("/score", response_model=ScoreResponse)
async def score(req: ScoreRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_response(await serving.score(req, watch(request)))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(req: ClassifyRequest, request: Request) -> Response:
    serving = _serving_open(request)
    return json_response(await serving.classify(req, watch(request)))


@router.get("/models", response_model=ModelList)
async def models(request: Request) -> Response:
    return json_response(await _serving(request).models())
