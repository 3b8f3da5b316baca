"""Client-facing wire models: the OpenAI embeddings API with Fireworks' extensions
(``dimensions``, ``normalize``, ``return_logits``) and quantized types (``embedding_type``),
Fireworks' ``/v1/rerank`` with Cohere's and Jina's shape beside it, vLLM's ``/v1/score`` and
``/v1/classify``.

Sources: OpenAI API reference (embeddings, models, errors); Fireworks API reference
(``/v1/embeddings`` with ``return_logits``, ``normalize``, ``prompt_template``; ``/v1/rerank``);
Cohere's rerank API (v1 and v2: ``results[].relevance_score``, ``document.text``) and Jina's;
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
    #: ``sparse``: a sparse model's lexical weights (:class:`SparseValues`), always as lists.
    embedding_type: EmbeddingType | Literal["sparse"] = "float"
    #: Jina's: one vector per token ([tokens, dim] per input, a ColBERT's), ``dimensions``,
    #: ``normalize``, ``embedding_type`` and ``encoding_format`` applying to each row.
    return_multivector: bool = False
    #: Voyage AI's fields (the ``voyageai`` SDK sends them), honoured, never dropped:
    #: ``output_dimension`` as ``dimensions``, ``output_dtype`` as ``embedding_type``,
    #: ``truncation: true`` as truncating each input to the model's context length;
    #: ``input_type`` as ``prompt_name`` (Voyage's ``query`` / ``document``, and Cohere's
    #: ``search_query`` / ``search_document`` / ``classification`` / ``clustering``).
    #: Extension: which end ``truncate_prompt_tokens`` / ``truncation`` cut: ``end`` (keep the
    #: start, the default) or ``start`` (keep the end; Cohere's ``START``, TEI's ``Left``).
    truncation_side: Literal["end", "start"] | None = None
    #: TEI: the model's named prompt to put before each text input (its ``prompts``).
    prompt_name: StrictStr | None = None
    output_dimension: int | None = Field(default=None, ge=1)
    output_dtype: EmbeddingType | None = None
    truncation: bool | None = None
    input_type: StrictStr | None = None


class SparseValues(BaseModel):
    """A sparse embedding (``embedding_type="sparse"``): the vocabulary token ids that have a
    weight, increasing, and their weights (Qdrant's and Milvus' sparse vector shape)."""

    indices: list[int]
    values: list[float]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: (
        list[int]
        | list[float]
        | str
        | SparseValues
        | list[list[float]]
        | list[list[int]]
        | list[str]
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ScoreUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class TextDocument(BaseModel):
    """A document as an object (Cohere v1, Jina): its ``text``; other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    text: StrictStr


class RerankRequest(BaseModel):
    """``POST /v1/rerank`` (Fireworks), ``/rerank`` and ``/v2/rerank`` (Cohere, Jina, vLLM):
    documents as strings or ``{"text": ...}`` objects."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName
    query: StrictStr
    documents: list[StrictStr | TextDocument]
    #: The best ``top_n`` documents; None or 0 (vLLM's default): all of them.
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = False
    #: Replaces the model's rerank prompt for this request: fields ``query``, ``document``,
    #: ``instruction`` (:mod:`common.prompts` syntax, as ``prompt_template`` on embeddings).
    prompt_template: StrictStr | None = None
    #: Replaces the model's rerank instruction for this request (a causal-LM reranker's
    #: ``instruction`` field: Qwen3-Reranker's ``<Instruct>``).
    instruction: StrictStr | None = None
    #: Cohere's fields that would change the result; refused with a 400 when set (never
    #: silently dropped): ``max_tokens_per_doc``, ``relevant_spans`` (v2, unless its ``mode``
    #: is ``disabled``), ``rank_fields``, ``max_chunks_per_doc`` (v1).
    max_tokens_per_doc: Any = None
    relevant_spans: Any = None
    rank_fields: Any = None
    max_chunks_per_doc: Any = None

    def unserved_field(self) -> str | None:
        """The first Cohere field set that this server does not serve, or None."""
        spans = self.relevant_spans
        if spans is not None and not (isinstance(spans, dict) and spans.get("mode") == "disabled"):
            return "relevant_spans"
        for name in ("max_tokens_per_doc", "rank_fields", "max_chunks_per_doc"):
            if getattr(self, name) is not None:
                return name
        return None

    def texts(self) -> list[str]:
        """The documents as strings, in order."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


class RerankResult(BaseModel):
    """Fireworks' shape (in ``data``): the document as a string."""

    index: int
    relevance_score: float
    document: str | None = None


class RankedDocument(BaseModel):
    """Cohere's and Jina's shape (in ``results``): the document as ``{"text": ...}``."""

    index: int
    relevance_score: float
    document: TextDocument | None = None


class RerankResponse(BaseModel):
    """Both shapes in one body: Fireworks' ``data`` and Cohere's / Jina's / vLLM's
    ``results`` (the same ranking), with ``id``, ``model`` and ``usage``."""

    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[RerankResult]
    results: list[RankedDocument]
    #: ``completion_tokens`` (0) too: aleph-alpha-client reads it.
    usage: ScoreUsage


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
    #: An embedding model's named prompts (name -> the text put before an input) and the one
    #: used when a request names none.
    prompts: dict[str, str] | None = None
    default_prompt_name: str | None = None


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
