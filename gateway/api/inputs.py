"""Client inputs -> queue entries (:class:`~common.protocol.ItemSpec`), with a clear 400 for
every input the gateway can reject before anything is queued."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from common import prompts
from common.protocol import MAX_CHUNKS, MAX_LOGIT_IDS, ItemSpec, ModelAdvert, Task
from gateway.api.models import MAX_INPUTS, EmbeddingRequest
from gateway.errors import APIError


def embedding_specs(req: EmbeddingRequest, task: Task) -> list[ItemSpec]:
    """One spec per input of ``POST /v1/embeddings``. Embeddings are L2-normalised unless asked
    not to; selected logits (``task="score"``) are raw unless ``"normalize": true`` asks for
    their softmax (Fireworks). Raises APIError(400) as :func:`input_fields` does."""
    if req.prompt_template is not None:
        check_template(req.prompt_template)
    normalize = task in ("embed", "token_embed") if req.normalize is None else req.normalize
    return [
        ItemSpec(
            model=req.model,
            task=task,
            normalize=normalize,
            dimensions=req.dimensions,
            return_logits=req.return_logits,
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            **fields,
        )
        for fields in input_fields(req.input, req.prompt_template)
    ]


def pair_specs(
    model: str,
    pairs: list[tuple[str, str]],
    advert: ModelAdvert,
    *,
    normalize: bool = True,
    truncate: int | None = None,
    template: str | None = None,
    instruction: str | None = None,
) -> list[ItemSpec]:
    """One scoring spec per (query, document) pair, as the model's score type wants it
    (:func:`score_type`): ``causal-lm``: the model's rerank prompt (or ``template``) with
    fields ``query``, ``document``, ``instruction`` (the model's, or ``instruction``),
    answered with the logits of its (false,
    true) tokens (their softmax when ``normalize``); other types: the pair itself (``text``,
    ``text_pair``), answered with one score. The caller checked the texts
    (:func:`check_inputs`) and that a causal-LM advert has its ``rerank``."""
    if score_type(advert) != "causal-lm":
        return [
            ItemSpec(
                model=model,
                task="score",
                text=query,
                text_pair=document,
                normalize=normalize,
                truncate_prompt_tokens=truncate,
            )
            for query, document in pairs
        ]
    spec = advert.rerank
    assert spec is not None
    ids = [spec.false_token_id, spec.true_token_id]
    return [
        ItemSpec(
            model=model,
            task="score",
            prompt_template=spec.template if template is None else template,
            fields={
                "query": query,
                "document": document,
                "instruction": spec.instruction if instruction is None else instruction,
            },
            return_logits=ids,
            normalize=normalize,
        )
        for query, document in pairs
    ]


def pair_score(values: Any, causal: bool, normalize: bool) -> float:
    """A pair's score from its item's vector (float32 [1], or [2] logits of a causal LM's
    (false, true) tokens): the one score; P(true) when normalized; else the log-odds
    ``logit(true) - logit(false)`` (whose sigmoid is P(true), as a cross-encoder's raw logit's
    sigmoid is its score)."""
    if not causal:
        return float(values[0])
    return float(values[1]) if normalize else float(values[1] - values[0])


def score_type(advert: ModelAdvert) -> str:
    """The advert's score type; an advert from a worker that predates score types and has a
    rerank prompt is ``causal-lm``."""
    return advert.score_type or "causal-lm"


def input_fields(value: Any, template: str | None) -> list[dict[str, Any]]:
    """OpenAI / Fireworks ``input`` -> the input fields of one spec per input: ``text``,
    ``token_ids``, or ``prompt_template`` + ``fields`` (an object's fields; a string is field
    ``text`` when a template is given).

    Raises APIError(400) for empty input, empty strings, arrays or objects, negative ids, more
    than :data:`MAX_INPUTS` inputs, objects without a template, or a template with token ids.
    """
    if isinstance(value, (str, dict)):
        items: list[Any] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]  # one token array
    else:
        items = list(value)
    check_inputs(items, "input")
    out: list[dict[str, Any]] = []
    for i, v in enumerate(items):
        if isinstance(v, dict):
            if template is None:
                raise APIError(
                    400,
                    f"input[{i}] is an object; objects are the fields of a "
                    "'prompt_template', which this request does not give.",
                    param="input",
                )
            out.append({"prompt_template": template, "fields": v})
        elif isinstance(v, str):
            out.append(
                {"prompt_template": template, "fields": {"text": v}} if template else {"text": v}
            )
        else:
            if template is not None:
                raise APIError(
                    400,
                    "'prompt_template' cannot be used with token-id input.",
                    param="prompt_template",
                )
            if min(v) < 0:
                raise APIError(400, f"input[{i}] has a negative token id.", param="input")
            out.append({"token_ids": v})
    return out


def check_inputs(items: list[Any], field: str) -> None:
    """The limits shared by ``input`` and ``documents``: not empty, at most
    :data:`MAX_INPUTS` items, no empty string, token array or object. Raises APIError(400)."""
    if not items:
        raise APIError(400, f"'{field}' must not be empty.", param=field)
    if len(items) > MAX_INPUTS:
        raise APIError(
            400,
            f"'{field}' has {len(items)} items; at most {MAX_INPUTS} inputs are "
            "allowed per request.",
            param=field,
        )
    for i, v in enumerate(items):
        if not v:
            what = (
                "string"
                if isinstance(v, str)
                else "object"
                if isinstance(v, dict)
                else "token array"
            )
            raise APIError(400, f"{field}[{i}] is an empty {what}.", param=field)


#: The context length assumed for a model whose workers did not say (``--model`` declared).
FALLBACK_MAX_MODEL_LEN = 32_768


def max_model_len(advert: ModelAdvert | None) -> int:
    """A model's context length in tokens (:data:`FALLBACK_MAX_MODEL_LEN` until a worker says)."""
    return advert.max_model_len if advert and advert.max_model_len else FALLBACK_MAX_MODEL_LEN


def max_input_chars(advert: ModelAdvert | None, chars_per_token: int) -> int:
    """The longest input accepted for a model, in characters (or token ids): its
    ``max_model_len`` times ``chars_per_token`` (``--max-chars-per-token``)."""
    return max_model_len(advert) * chars_per_token


def _size(spec: ItemSpec) -> int:
    """An input's size: characters of its text or template fields, or its token ids."""
    if spec.token_ids is not None:
        return len(spec.token_ids)
    if spec.fields:
        return _chars(spec.fields)
    return len(spec.text or "") + len(spec.text_pair or "")


def _chars(value: Any) -> int:
    """Characters of a structured input: its strings (keys too), and 8 for any other value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(k) + _chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_chars(v) for v in value) + len(value)
    return 8


def check_sizes(specs: list[ItemSpec], field: str, limit: int) -> None:
    """Raises APIError(400, ``context_length_exceeded``) naming the first input larger than
    ``limit`` (see :func:`max_input_chars`): such an input cannot fit the model, even
    truncated it is no use, and it would cost the gateway and the worker its size."""
    for i, spec in enumerate(specs):
        size = _size(spec)
        if size > limit * (MAX_CHUNKS if spec.chunk_tokens else 1):  # chunked: that many windows
            unit = "token ids" if spec.token_ids is not None else "characters"
            raise APIError(
                400,
                f"{field}[{i}] has {size} {unit}; at most {limit} are accepted for "
                f"'{spec.model}' (its context length times --max-chars-per-token).",
                param=field,
                code="context_length_exceeded",
            )


def check_pairs_size(pairs: list[tuple[str, str]], extra: int, limit: int, field: str) -> None:
    """A query goes into the prompt of every pair it is in: raises APIError(400, param
    ``field``) when the pairs' texts (plus ``extra`` characters each: a rerank prompt's
    instruction and template) would total more than ``limit`` characters
    (``--max-rerank-bytes``)."""
    total = sum(len(q) + len(d) + extra for q, d in pairs)
    if total > limit:
        raise APIError(
            400,
            f"The {len(pairs)} pairs would total {total} characters (the query is repeated "
            f"in each pair); at most {limit} are accepted: send fewer documents per request "
            "or a shorter query.",
            param=field,
            code="request_too_large",
        )


#: Nesting of a structured input (an object of ``prompt_template`` fields): objects and
#: arrays inside it, at most this deep.
MAX_FIELD_DEPTH = 16
#: The largest token id accepted where the model's vocabulary is not known yet (int32).
MAX_TOKEN_ID = 2**31 - 1


def check_value(value: Any, where: str, depth: int = 0, structured: bool = False) -> None:
    """Raises APIError(400) naming the place (e.g. ``input[3]``) of the first part of
    ``value`` (a request's field) that no worker could be handed: a string that is not
    Unicode text (a lone surrogate such as ``"\\ud800"`` is valid JSON but cannot be encoded),
    a number that is not finite (``1e999``, ``NaN``), or, inside a structured input
    (``structured``: an object and what it holds), nesting deeper than
    :data:`MAX_FIELD_DEPTH`. Arrays of token ids at the top of a typed field (every element an
    int, as the request model validated) are not walked."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(
                400,
                f"{_place(where)} is not valid Unicode: a lone surrogate at character {e.start}.",
                param=where.split("[", 1)[0],
            ) from None
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise APIError(
                400,
                f"{_place(where)} holds a number that is not finite ({value}).",
                param=where.split("[", 1)[0],
            )
    elif isinstance(value, dict) or (structured and isinstance(value, list)):
        if depth >= MAX_FIELD_DEPTH:
            raise APIError(
                400,
                f"{_place(where)} nests objects and arrays more than {MAX_FIELD_DEPTH} deep.",
                param=where.split("[", 1)[0],
            )
        if isinstance(value, dict):
            for k, v in value.items():
                check_value(k, where, depth + 1, True)
                check_value(v, where, depth + 1, True)
        else:
            for v in value:
                check_value(v, where, depth + 1, True)
    elif isinstance(value, list) and value and not isinstance(value[0], int):
        for i, v in enumerate(value):  # a typed field's strings, objects or token arrays
            check_value(v, f"{where}[{i}]" if where in _LISTS else where)
    elif isinstance(value, BaseModel):  # a typed object (a document's ``{"text": ...}``)
        for name in type(value).model_fields:
            check_value(getattr(value, name), where, depth, structured)


#: Request fields whose items an error names by index (``input[3]``).
_LISTS = ("input", "documents", "text_1", "text_2")


def _place(where: str) -> str:
    return where if "[" in where else repr(where)


def check_request(req: BaseModel) -> None:
    """:func:`check_value` over every field of a client request, before anything else."""
    for name in type(req).model_fields:
        check_value(getattr(req, name), name)


def check_token_ids(specs: list[ItemSpec], field: str, advert: ModelAdvert | None) -> None:
    """Raises APIError(400, ``invalid_token_ids``) for the first input with a token id outside
    the model's vocabulary (``advert.vocab_size``; :data:`MAX_TOKEN_ID` where no worker said
    yet)."""
    vocab = advert.vocab_size if advert is not None and advert.vocab_size else MAX_TOKEN_ID + 1
    for i, spec in enumerate(specs):
        if spec.token_ids is not None and max(spec.token_ids) >= vocab:
            raise APIError(
                400,
                f"{field}[{i}] has a token id outside the vocabulary of '{spec.model}' "
                f"(ids are below {vocab}).",
                param=field,
                code="invalid_token_ids",
            )


def check_template(template: str) -> str:
    """Compile a client's template once to report a syntax error before anything is queued.
    Returns it; raises APIError(400, param ``prompt_template``)."""
    try:
        prompts.compile_template(template)
    except prompts.TemplateError as e:
        raise APIError(
            400, f"'prompt_template': {e}", param="prompt_template", code="invalid_prompt_template"
        ) from None
    return template


def check_logit_ids(ids: list[int], advert: ModelAdvert | None) -> None:
    """Reject an empty ``return_logits``, more than :data:`MAX_LOGIT_IDS` ids, or ids outside
    the model's vocabulary up front (APIError 400, code ``invalid_token_ids``)."""
    if not ids:
        raise APIError(
            400,
            "'return_logits' must list at least one token id.",
            param="return_logits",
            code="invalid_token_ids",
        )
    if len(ids) > MAX_LOGIT_IDS:
        raise APIError(
            400,
            f"'return_logits' lists {len(ids)} token ids; at most {MAX_LOGIT_IDS} are allowed.",
            param="return_logits",
            code="invalid_token_ids",
        )
    vocab = advert.vocab_size if advert is not None else None
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise APIError(
            400,
            f"'return_logits' has token ids outside the vocabulary"
            f"{f' (size {vocab})' if vocab else ''}: {bad[:10]}",
            param="return_logits",
            code="invalid_token_ids",
        )
