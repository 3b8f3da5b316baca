"""Cohere's embed API (``POST /v2/embed``, ``POST /v1/embed``), served by the embeddings path:
a Cohere request becomes an OpenAI-shaped :class:`EmbeddingRequest` (``texts`` -> ``input``,
``input_type`` -> a named prompt, ``output_dimension`` -> matryoshka ``dimensions``,
``truncate`` / ``max_tokens`` -> truncation), its float32 vectors are encoded once per asked
``embedding_types`` entry.

Source: Cohere's API reference (embed v2 and v1: ``texts``, ``input_type``, ``embedding_types``
``float`` / ``int8`` / ``uint8`` / ``binary`` / ``ubinary`` / ``base64``, ``truncate``
``NONE`` / ``START`` / ``END``, ``max_tokens``, ``output_dimension``; the response's
``embeddings`` by type, ``texts``, ``meta.billed_units.input_tokens``; v1 without
``embedding_types``: ``response_type: "embeddings_floats"`` and a plain list)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from common.protocol import decode_vector
from gateway.api.models import EmbeddingRequest, ModelName
from gateway.api.quantize import encode_rows, value_range
from gateway.api.serving import Serving
from gateway.errors import APIError
from gateway.http.disconnect import Disconnected

CohereType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(BaseModel):
    """``POST /v2/embed`` and ``POST /v1/embed``: texts only (``images`` and ``inputs``, the
    multimodal forms, are a 400)."""

    model_config = ConfigDict(extra="ignore")

    model: ModelName
    texts: list[StrictStr] | None = None
    images: Any = None
    inputs: Any = None
    #: ``search_query`` / ``search_document`` / ``classification`` / ``clustering``: the
    #: model's named prompt of that kind (:func:`gateway.api.embedding_options.apply_prompt`).
    input_type: StrictStr | None = None
    embedding_types: list[CohereType] | None = Field(default=None, min_length=1, max_length=6)
    output_dimension: int | None = Field(default=None, ge=1)
    #: Truncate each text to this many tokens (v2).
    max_tokens: int | None = Field(default=None, ge=1)
    #: ``END`` (Cohere's default): cut the end of an over-long text; ``START``: its start;
    #: ``NONE``: refuse it.
    truncate: Literal["NONE", "START", "END"] | None = None


class CohereEmbedResponse(BaseModel):
    """Cohere's response: ``embeddings`` by type (v2, and v1 with ``embedding_types``), or a
    list of float vectors (v1 without, ``response_type: "embeddings_floats"``)."""

    id: str
    embeddings: dict[str, list[list[float]] | list[list[int]] | list[str]] | list[list[float]]
    texts: list[str]
    meta: dict[str, Any]
    response_type: str | None = None


def _encode(vectors: np.ndarray, kind: CohereType, bounds: list[float]) -> list[Any]:
    if kind == "base64":  # the float32 bytes, little-endian
        return encode_rows(vectors, "float", bounds, "base64")
    return encode_rows(vectors, kind, bounds, "float")


async def embed(
    serving: Serving, req: CohereEmbedRequest, version: int, disconnected: Disconnected
) -> CohereEmbedResponse:
    """Embed ``req.texts`` through the queue and answer in Cohere's shape for API ``version``
    (1 or 2). Raises APIError 400 for what Cohere's API would refuse or this server does not
    serve (no texts, images), and the embeddings path's errors."""
    for field in ("images", "inputs"):
        if getattr(req, field) is not None:
            raise APIError(400, f"'{field}' (images) is not supported; send 'texts'.", param=field)
    if not req.texts:
        raise APIError(400, "'texts' must list at least one text.", param="texts")
    inner = EmbeddingRequest(
        model=req.model,
        input=req.texts,
        dimensions=req.output_dimension,
        input_type=req.input_type,
        truncate_prompt_tokens=req.max_tokens,
        truncation=req.truncate != "NONE",
        truncation_side="start" if req.truncate == "START" else None,
    )
    prepared = await serving.prepare_embeddings(inner)
    results = await serving.run(prepared.specs, "texts", disconnected)
    # the float32 vectors as the worker sent them (not through the OpenAI response's lists)
    vectors = np.stack([decode_vector(r.vector_b64 or "") for r in results])
    bounds = value_range(await serving.store.advert(req.model))
    meta = {
        "api_version": {"version": str(version)},
        "billed_units": {"input_tokens": sum(r.prompt_tokens for r in results)},
    }
    ident = f"embed-{uuid.uuid4().hex}"
    if version == 1 and req.embedding_types is None:
        return CohereEmbedResponse(
            id=ident,
            embeddings=vectors.tolist(),
            texts=req.texts,
            meta=meta,
            response_type="embeddings_floats",
        )
    asked: list[CohereType] = req.embedding_types or ["float"]
    kinds = list(dict.fromkeys(asked))  # each once, in the order asked
    return CohereEmbedResponse(
        id=ident,
        embeddings={k: _encode(vectors, k, bounds) for k in kinds},
        texts=req.texts,
        meta=meta,
        response_type="embeddings_by_type" if version == 1 else None,
    )
