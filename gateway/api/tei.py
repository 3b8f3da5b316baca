"""Text Embeddings Inference's routes (``POST /embed``, ``/embed_sparse``, ``/rerank`` with
TEI's body, ``/predict``, ``POST /`` by the model's type, ``/tokenize``, ``/decode``,
``GET /info``), served by the same queue paths as the OpenAI / vLLM routes (``/tokenize`` and
``/decode`` by the worker's tokenizer: ``tokenize`` items), so TEI's clients
(``huggingface_hub.InferenceClient``, LangChain's ``HuggingFaceEndpointEmbeddings``,
llama-index's ``TextEmbeddingsInference``, haystack's TEI components) work unchanged. TEI's
bodies name no model: :func:`model_for` picks one.

Source: TEI's OpenAPI (``router/src/http/types.rs``: ``EmbedRequest`` ``inputs``,
``normalize``, ``truncate``, ``truncation_direction``, ``prompt_name``, ``dimensions``;
``EmbedSparseRequest`` → ``[[SparseValue]]`` (``index``, ``value``);
``RerankRequest`` ``query``, ``texts``, ``raw_scores``, ``return_text``, ``truncate``;
``PredictRequest``; ``TokenizeRequest`` ``inputs``, ``add_special_tokens``, ``prompt_name``
→ ``[[SimpleToken]]``; ``DecodeRequest`` ``ids``, ``skip_special_tokens`` → ``[str]``;
``Info``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from common.protocol import MAX_CHUNKS, ItemSpec, ModelAdvert, Task, Token
from gateway.api import embedding_options as options
from gateway.api import inputs as checks
from gateway.api.models import (
    MAX_INPUTS,
    ClassifyRequest,
    EmbeddingRequest,
    ModelName,
    ScoreRequest,
    SparseValues,
)
from gateway.api.serving import Serving
from gateway.errors import APIError
from gateway.http.disconnect import Disconnected

Direction = Literal["Right", "Left", "right", "left"]


class _TEIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: Not in TEI's body: the model, where the gateway serves several (else
    #: ``--default-model`` or the only one).
    model: ModelName | None = None
    #: Cut an over-long input to the model's context instead of refusing it; unset: the
    #: model's ``long_inputs`` (TEI's ``--auto-truncate``).
    truncate: bool | None = None
    #: ``Right`` cuts the end (keeps the start), ``Left`` the start.
    truncation_direction: Direction = "Right"


class TEIEmbedRequest(_TEIRequest):
    """``POST /embed``: the response is ``[[float, ...], ...]``, one vector per input."""

    inputs: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    normalize: bool = True
    prompt_name: StrictStr | None = None
    dimensions: int | None = Field(default=None, ge=1)


class TEIEmbedSparseRequest(_TEIRequest):
    """``POST /embed_sparse``: the response is ``[[{index, value}, ...], ...]``, one list of
    (token id, weight) per input, by token id."""

    inputs: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    prompt_name: StrictStr | None = None


class TEISparseValue(BaseModel):
    index: int
    value: float


class TEIRerankRequest(_TEIRequest):
    """``POST /rerank`` with TEI's body (``texts``; Cohere's and Jina's have ``documents``)."""

    query: StrictStr
    texts: list[StrictStr]
    raw_scores: bool = False
    return_text: bool = False


class TEIRank(BaseModel):
    index: int
    score: float
    text: str | None = None


class TEIPredictRequest(_TEIRequest):
    """``POST /predict``: one input (a string) or a batch (a list of strings)."""

    inputs: StrictStr | list[StrictStr] = Field(union_mode="left_to_right")
    raw_scores: bool = False


class TEIPrediction(BaseModel):
    score: float
    label: str


class _TEIModelOnly(BaseModel):
    model_config = ConfigDict(extra="ignore")

    #: As :class:`_TEIRequest`'s.
    model: ModelName | None = None


class TEITokenizeRequest(_TEIModelOnly):
    """``POST /tokenize``: the response is ``[[token, ...], ...]``, one list per input
    (:class:`~common.protocol.Token`: ``id``, ``text``, ``special``, ``start``, ``stop``)."""

    inputs: StrictStr | list[StrictStr] = Field(union_mode="left_to_right")
    add_special_tokens: bool = True
    prompt_name: StrictStr | None = None


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]


class TEIDecodeRequest(_TEIModelOnly):
    """``POST /decode``: token ids (one list, or a batch of lists) → ``[text, ...]``."""

    ids: TokenIds | list[TokenIds] = Field(union_mode="left_to_right")
    skip_special_tokens: bool = True


async def model_for(serving: Serving, asked: str | None, task: Task) -> str:
    """The model of a TEI request: the one it names, else ``--default-model``, else the only
    model served. Raises APIError 400 when none can be chosen."""
    if asked is not None:
        return asked
    if serving.settings.default_model is not None:
        return serving.settings.default_model
    served = await serving.store.available_models()
    if len(served) == 1:
        return next(iter(served))
    raise APIError(
        400,
        f"The request names no model and this gateway serves {len(served)}: add 'model', or "
        "start the gateway with --default-model.",
        param="model",
    )


def _side(req: _TEIRequest) -> Literal["end", "start"]:
    return "start" if req.truncation_direction.lower() == "left" else "end"


async def embed(
    serving: Serving, req: TEIEmbedRequest, disconnected: Disconnected
) -> list[list[float]]:
    """``POST /embed``: the vectors, in input order (the embeddings path's 400s)."""
    inner = EmbeddingRequest(
        model=await model_for(serving, req.model, "embed"),
        input=req.inputs,
        normalize=req.normalize,
        dimensions=req.dimensions,
        prompt_name=req.prompt_name,
        truncation=req.truncate,
        truncation_side=_side(req),
    )
    answer = await serving.embeddings(inner, disconnected)
    return [d.embedding for d in answer.data]  # type: ignore[misc]


async def embed_sparse(
    serving: Serving, req: TEIEmbedSparseRequest, disconnected: Disconnected
) -> list[list[TEISparseValue]]:
    """``POST /embed_sparse``: each input's sparse embedding, by token id (the embeddings
    path's 400s; a model without sparse embeddings: 400)."""
    inner = EmbeddingRequest(
        model=await model_for(serving, req.model, "embed_sparse"),
        input=req.inputs,
        embedding_type="sparse",
        prompt_name=req.prompt_name,
        truncation=req.truncate,
        truncation_side=_side(req),
    )
    answer = await serving.embeddings(inner, disconnected)
    out = []
    for d in answer.data:
        assert isinstance(d.embedding, SparseValues)
        pairs = zip(d.embedding.indices, d.embedding.values, strict=True)
        out.append([TEISparseValue(index=i, value=v) for i, v in pairs])
    return out


async def rerank(
    serving: Serving, req: TEIRerankRequest, disconnected: Disconnected
) -> list[TEIRank]:
    """``POST /rerank`` (TEI's body): every text's score against the query, best first; the
    model's activation on it unless ``raw_scores``."""
    inner = ScoreRequest(
        model=await model_for(serving, req.model, "score"),
        text_1=req.query,
        text_2=req.texts,
        use_activation=not req.raw_scores,
    )
    if req.truncate:  # the end of each pair (the document's end for a cross-encoder)
        inner.truncate_prompt_tokens = await _max_model_len(serving, inner.model)
    answer = await serving.score(inner, disconnected)
    ranked = sorted(answer.data, key=lambda d: -d.score)
    return [
        TEIRank(index=d.index, score=d.score, text=req.texts[d.index] if req.return_text else None)
        for d in ranked
    ]


async def predict(
    serving: Serving, req: TEIPredictRequest, disconnected: Disconnected
) -> list[TEIPrediction] | list[list[TEIPrediction]]:
    """``POST /predict``: each input's labels with their scores (the softmax of the class
    logits, or the logits with ``raw_scores``), best first; one list for one input."""
    inner = ClassifyRequest(
        model=await model_for(serving, req.model, "classify"),
        input=req.inputs,
        use_activation=not req.raw_scores,
    )
    if req.truncate:
        inner.truncate_prompt_tokens = await _max_model_len(serving, inner.model)
    answer = await serving.classify(inner, disconnected)
    labels = await _labels(serving, inner.model)
    out = []
    for d in answer.data:
        named = [
            TEIPrediction(score=p, label=labels[i] if i < len(labels) else f"LABEL_{i}")
            for i, p in enumerate(d.probs)
        ]
        out.append(sorted(named, key=lambda x: -x.score))
    return out[0] if isinstance(req.inputs, str) else out


async def root(
    serving: Serving, req: TEIEmbedRequest, disconnected: Disconnected
) -> list[list[float]] | list[TEIPrediction] | list[list[TEIPrediction]]:
    """``POST /`` (where ``huggingface_hub.InferenceClient`` posts): :func:`embed` for an
    embedding model, :func:`predict` for a classifier (TEI routes by the model's type)."""
    model = await model_for(serving, req.model, "embed")
    advert = await serving.store.advert(model)
    if advert is not None and "embed" not in advert.tasks and "classify" in advert.tasks:
        if not isinstance(req.inputs, str) and not all(isinstance(x, str) for x in req.inputs):
            raise APIError(400, "A classifier takes texts.", param="inputs")
        asked = TEIPredictRequest(
            model=model,
            inputs=req.inputs,  # type: ignore[arg-type]
            truncate=req.truncate,
            truncation_direction=req.truncation_direction,
        )
        return await predict(serving, asked, disconnected)
    return await embed(serving, req.model_copy(update={"model": model}), disconnected)


async def _max_model_len(serving: Serving, model: str) -> int | None:
    advert = await serving.store.advert(model)
    return advert.max_model_len if advert is not None else None


async def _labels(serving: Serving, model: str) -> list[str]:
    advert = await serving.store.advert(model)
    return list(advert.labels or []) if advert is not None else []


async def info(serving: Serving, model: str | None) -> dict[str, Any]:
    """``GET /info``: TEI's ``Info`` for the model (``?model=``, else as :func:`model_for`):
    ``model_id``, ``model_type`` (``embedding``, with ``pooling: "splade"`` for a sparse
    model, ``reranker`` or ``classifier`` with its labels), ``max_input_length``,
    ``max_client_batch_size``. 404 for a model no worker serves."""
    name = await model_for(serving, model, "embed")
    advert = await serving.store.advert(name)
    if advert is None:
        raise APIError(
            404, f"No worker serves the model '{name}'.", param="model", code="model_not_found"
        )
    if "embed" in advert.tasks:
        kind: dict[str, Any] = {"embedding": {"pooling": "model"}}
    elif "embed_sparse" in advert.tasks:  # as TEI describes a SPLADE model
        kind = {"embedding": {"pooling": "splade"}}
    elif "classify" in advert.tasks:
        labels = advert.labels or []
        kind = {"classifier": {"id2label": dict(enumerate(labels)), "label2id": {}}}
        kind["classifier"]["label2id"] = {label: i for i, label in enumerate(labels)}
    else:
        kind = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    return {
        "model_id": name,
        "model_type": kind,
        "max_input_length": advert.max_model_len,
        "max_client_batch_size": MAX_INPUTS,
        "prompts": advert.prompts or None,
    }


async def tokenize(
    serving: Serving, req: TEITokenizeRequest, disconnected: Disconnected
) -> list[list[Token]]:
    """``POST /tokenize``: each input's tokens from the model's tokenizer (on a worker), with
    the named prompt (``prompt_name``, else the model's default) before the text, as
    ``/embed`` puts it. A text may be up to :data:`~common.protocol.MAX_CHUNKS` times what the
    model takes whole (to see where to split it); 400 past that."""
    texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    model = await model_for(serving, req.model, "tokenize")
    advert = await _tokenizing(serving, model, len(texts), "inputs")
    specs = [
        ItemSpec(model=model, task="tokenize", text=t, special_tokens=req.add_special_tokens)
        for t in texts
    ]
    named = EmbeddingRequest(model=model, input="", prompt_name=req.prompt_name)
    options.apply_prompt(specs, named, advert, "embed")
    checks.check_sizes(specs, "inputs", serving._max_chars(advert) * MAX_CHUNKS)
    results = await serving.run(specs, "inputs", disconnected)
    return [r.tokens or [] for r in results]


async def decode(serving: Serving, req: TEIDecodeRequest, disconnected: Disconnected) -> list[str]:
    """``POST /decode``: each list of token ids as text, by the model's tokenizer (on a
    worker), its special tokens left out unless ``skip_special_tokens`` is false; one list
    gives one text. 400 for an id outside the vocabulary."""
    batch = req.ids if req.ids and isinstance(req.ids[0], list) else [req.ids]
    if not all(batch):
        raise APIError(400, "'ids': a list of token ids is empty.", param="ids")
    model = await model_for(serving, req.model, "tokenize")
    advert = await _tokenizing(serving, model, len(batch), "ids")
    specs = [
        ItemSpec(
            model=model,
            task="tokenize",
            token_ids=list(ids),  # type: ignore[arg-type]
            special_tokens=not req.skip_special_tokens,
        )
        for ids in batch
    ]
    checks.check_sizes(specs, "ids", serving._max_chars(advert) * MAX_CHUNKS)
    checks.check_token_ids(specs, "ids", advert)
    results = await serving.run(specs, "ids", disconnected)
    return [r.text or "" for r in results]


async def _tokenizing(serving: Serving, model: str, n: int, field: str) -> ModelAdvert | None:
    """The advert of a model whose workers tokenize; 400 for 0 or more than
    :data:`~gateway.api.models.MAX_INPUTS` inputs."""
    if not 1 <= n <= MAX_INPUTS:
        raise APIError(400, f"'{field}' must have 1 to {MAX_INPUTS} entries.", param=field)
    return await serving.check_model(model, "tokenize")
