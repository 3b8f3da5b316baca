"""Client-facing wire models: the OpenAI embeddings API with Fireworks' extensions
(``dimensions``, ``normalize``, ``return_logits``) and quantized types (``embedding_type``),
Fireworks' ``/v1/rerank``, vLLM's ``/v1/score`` and ``/v1/classify``.

Sources: OpenAI API reference (embeddings, models, errors); Fireworks API reference
(``/v1/embeddings`` with ``return_logits``, ``normalize``, ``prompt_template``; ``/v1/rerank``);
vLLM's score API (``vllm/entrypoints/pooling/scoring/protocol.py``: ``ScoreTextRequest``,
``ScoreResponse``) and classify API (``vllm/entrypoints/pooling/classify/protocol.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from common.protocol import MAX_NAME_LENGTH
from gateway.api.quantize import EmbeddingType

#: Inputs per request, as OpenAI's embeddings endpoint allows.
MAX_INPUTS = 2048
#: A model as a client names it: what the gateway looks up is bounded in length.
ModelName = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_LENGTH)]

#: OpenAI's input forms, plus Fireworks' structured objects (fields for ``prompt_template``).
EmbeddingInput = (
    StrictStr
    | list[StrictStr]
    | list[StrictInt]
    | list[list[StrictInt]]
    | dict[str, Any]
    | list[dict[str, Any]]
)


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    #: Matryoshka: keep the first ``dimensions`` components (OpenAI / Fireworks).
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    #: Fireworks: L2-normalise embeddings (default true); with ``return_logits``, a softmax over
    #: the selected logits (default false: raw logits).
    normalize: bool | None = None
    #: Fireworks: Jinja2 template (``{field}`` shorthand) turning each input (a structured
    #: object, or a string as field ``text``) into the text to embed; ``truncate_tokens()``.
    prompt_template: StrictStr | None = None
    #: Fireworks: return the last-position logits of these token ids instead of an embedding.
    return_logits: list[StrictInt] | None = None
    #: vLLM extension: truncate each input to this many tokens instead of refusing it.
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    #: Quantized vectors (sentence-transformers' precisions, :mod:`gateway.api.quantize`):
    #: ``int8`` / ``uint8`` integers per component, ``binary`` / ``ubinary`` packed sign bits
    #: (``dim / 8`` integers); with ``encoding_format="base64"`` the bytes of those integers.
    embedding_type: EmbeddingType = "float"


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[int] | list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` (Fireworks)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName
    query: StrictStr
    documents: list[StrictStr]
    #: The best ``top_n`` documents; None or 0 (vLLM's default): all of them.
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = False
    #: Replaces the model's rerank prompt for this request: fields ``query``, ``document``,
    #: ``instruction`` (:mod:`common.prompts` syntax, as ``prompt_template`` on embeddings).
    prompt_template: StrictStr | None = None


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = None


class RerankResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[RerankResult]
    usage: Usage


class ScoreRequest(BaseModel):
    """``POST /v1/score`` (vLLM's ``ScoreTextRequest``): pairs (``text_1[i]``, ``text_2[i]``),
    1:1, 1:N (one ``text_1`` for every ``text_2``) or N:N."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName
    text_1: StrictStr | list[StrictStr]
    text_2: StrictStr | list[StrictStr]
    #: vLLM: truncate each pair's prompt to this many tokens instead of refusing it.
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    #: vLLM: the model's activation on the score (a cross-encoder's sigmoid; P(true token)
    #: for a causal-LM reranker); false: the raw logit (log-odds). None: true.
    use_activation: bool | None = None


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ScoreResponse(BaseModel):
    """vLLM's ``ScoreResponse``."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: ScoreUsage


class ClassifyRequest(BaseModel):
    """``POST /v1/classify`` (vLLM's ``ClassificationRequest``)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName
    input: StrictStr | list[StrictStr]
    #: vLLM: truncate each input to this many tokens instead of refusing it.
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    #: ``probs`` are the softmax over the class logits (default); false: the raw logits.
    normalize: bool | None = None
    #: vLLM's name for ``normalize``; either false gives the raw logits.
    use_activation: bool | None = None


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    """vLLM's ``ClassificationResponse``."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: ScoreUsage


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models`` (OpenAI shape plus what the workers advertise)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inference-worker"
    tasks: list[str]
    max_model_len: int | None = None
    workers: int
    checkpoint_name: str
    description: str = ""
    #: How the model scores (query, document) pairs, for models with task ``score``:
    #: ``causal-lm``, ``cross-encoder``, ``late-interaction`` or ``bi-encoder``.
    score_type: str | None = None
    #: A classifier's class labels, in index order.
    labels: list[str] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


def json_response(body: BaseModel, *, exclude_none: bool = False) -> Response:
    """A JSON response serialised by pydantic-core in one step (no dict round trip)."""
    return Response(body.model_dump_json(exclude_none=exclude_none), media_type="application/json")
