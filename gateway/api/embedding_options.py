"""The options of an embeddings request that shape its queue entries beyond the inputs
themselves: which task it asks for (vectors, sparse weights, per-token vectors, logits), the
peers' names for the same settings (Voyage AI's), the model's named prompts and where an
over-long input is cut."""

from __future__ import annotations

from typing import Any

from common.protocol import ItemSpec, ModelAdvert, Task
from gateway.api.inputs import max_model_len
from gateway.api.models import EmbeddingRequest
from gateway.errors import APIError


def embedding_task(req: EmbeddingRequest) -> Task:
    """The task of ``POST /v1/embeddings``: ``token_embed`` with ``return_multivector``,
    ``score`` with ``return_logits``, ``embed_sparse`` for ``embedding_type="sparse"``, else
    ``embed``. Raises APIError(400) for options that do not go together."""
    if req.return_multivector:
        return check_multivector(req)
    if req.return_logits is not None:
        return "score"
    return check_sparse(req) if req.embedding_type == "sparse" else "embed"


#: The tasks of ``/v1/embeddings`` that embed an input (prompts and truncation apply).
EMBEDDING_TASKS: tuple[Task, ...] = ("embed", "embed_sparse", "token_embed")


def check_sparse(req: EmbeddingRequest) -> Task:
    """The task of a sparse embeddings request (``embedding_type="sparse"``). Raises
    APIError(400) for a field that does not apply to sparse weights (``dimensions``,
    ``normalize``)."""
    for field, value in (("dimensions", req.dimensions), ("normalize", req.normalize)):
        if value:
            raise APIError(400, f"'{field}' does not apply to sparse embeddings.", param=field)
    return "embed_sparse"


def check_multivector(req: EmbeddingRequest) -> Task:
    """The task of a per-token embeddings request (``return_multivector``). Raises
    APIError(400) with ``return_logits`` or a sparse ``embedding_type``."""
    for field, given in (
        ("return_logits", req.return_logits is not None),
        ("embedding_type", req.embedding_type == "sparse"),
    ):
        if given:
            raise APIError(
                400, f"'{field}' cannot be combined with 'return_multivector'.", param=field
            )
    return "token_embed"


def fold_peer_fields(req: EmbeddingRequest) -> EmbeddingRequest:
    """``req`` with Voyage AI's fields in the project's: ``output_dimension`` -> ``dimensions``,
    ``output_dtype`` -> ``embedding_type`` (the same five names). Raises APIError(400) when
    both names of one setting are given different values."""
    update: dict[str, Any] = {}
    for theirs, ours, default in (
        ("output_dimension", "dimensions", None),
        ("output_dtype", "embedding_type", "float"),
    ):
        value, own = getattr(req, theirs), getattr(req, ours)
        if value is None:
            continue
        if own not in (default, value):
            raise APIError(
                400, f"'{theirs}' and '{ours}' are the same setting; give one.", param=theirs
            )
        update[ours] = value
    return req.model_copy(update=update) if update else req


def apply_truncation(
    specs: list[ItemSpec], req: EmbeddingRequest, advert: ModelAdvert | None, task: Task
) -> None:
    """Where an embedding's input is cut: the client's fields win (``truncate_prompt_tokens``:
    that many tokens; ``truncation`` true: the model's context, false: an over-long input is
    refused), else the model's ``long_inputs`` (``truncate_end`` / ``truncate_start``: the
    model's context; ``chunk``: text inputs split into windows of it; ``refuse``);
    ``truncation_side`` or the policy says which end. Sparse and per-token embeddings are not
    chunked (their windows are not pooled): ``chunk`` refuses them."""
    if task not in EMBEDDING_TASKS:
        return
    limit, side = req.truncate_prompt_tokens, req.truncation_side
    policy = advert.long_inputs if advert is not None else "refuse"
    if policy == "chunk" and task != "embed":
        policy = "refuse"
    if limit is None and req.truncation:
        limit = max_model_len(advert)
    elif limit is None and req.truncation is None and policy == "chunk":
        for spec in specs:
            spec.chunk_tokens = max_model_len(advert) if spec.text is not None else None
        return
    elif limit is None and req.truncation is None and policy != "refuse":
        limit = max_model_len(advert)
        side = side or ("start" if policy == "truncate_start" else "end")
    for spec in specs:
        spec.truncate_prompt_tokens = limit
        spec.truncate_side = "start" if limit is not None and side == "start" else None


#: Cohere's and Voyage's ``input_type`` -> the prompt name it asks for.
INPUT_TYPE_PROMPTS = {
    "query": "query",
    "document": "document",
    "search_query": "query",
    "search_document": "document",
    "classification": "classification",
    "clustering": "clustering",
}


def apply_prompt(
    specs: list[ItemSpec], req: EmbeddingRequest, advert: ModelAdvert | None, task: Task
) -> None:
    """Put the model's named prompt before each text input, as sentence-transformers does: the
    one ``prompt_name`` names, else the one ``input_type`` asks for (:data:`INPUT_TYPE_PROMPTS`;
    on a model without prompts it changes nothing), else the model's ``default_prompt_name``
    (text inputs only). Raises APIError(400) for a name the model does not have (listing
    those it has), an unknown ``input_type``, or a named prompt with token-id or templated
    inputs, or with ``return_logits`` (``task`` ``score``)."""
    if task not in EMBEDDING_TASKS:
        for field in ("prompt_name", "input_type"):
            if getattr(req, field) is not None:
                raise APIError(400, f"'{field}' applies to embeddings.", param=field)
        return
    known = advert.prompts if advert is not None else {}
    name, param = req.prompt_name, "prompt_name"
    if name is None and req.input_type is not None:
        param = "input_type"
        name = INPUT_TYPE_PROMPTS.get(req.input_type)
        if name is None:
            raise APIError(
                400,
                f"'input_type' {req.input_type!r} is not one of {', '.join(INPUT_TYPE_PROMPTS)}.",
                param=param,
            )
        if not known:
            return  # a model without prompts embeds every input type as it is
    explicit = name is not None
    if name is None:
        name = advert.default_prompt_name if advert is not None else None
        if name is None:
            return
    if name not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise APIError(
            400,
            f"'{param}': the model '{req.model}' has no prompt named {name!r}; its prompts: "
            f"{listed}.",
            param=param,
            code="unknown_prompt_name",
        )
    prompt = known[name]
    for i, spec in enumerate(specs):
        if spec.text is not None:
            spec.text = prompt + spec.text
        elif explicit:
            raise APIError(
                400,
                f"input[{i}]: a named prompt ('{param}') applies to text inputs, not to token "
                "ids or 'prompt_template' objects.",
                param=param,
            )
