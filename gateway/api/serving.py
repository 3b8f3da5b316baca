"""The client API's logic: a request becomes queue entries, their results become the response.

Shapes: OpenAI's embeddings and models APIs with Fireworks' extensions (``return_logits``,
``normalize``, ``prompt_template``), Fireworks' ``/v1/rerank`` (with Cohere's and Jina's
``results``) and vLLM's ``/v1/score`` (``gateway/api/models.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from common.protocol import ItemResult, ItemSpec, ModelAdvert, Task, decode_vector
from gateway import metrics
from gateway.api import embedding_options as options
from gateway.api import inputs
from gateway.api.models import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    RankedDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    ScoreUsage,
    SparseValues,
    TextDocument,
    Usage,
)
from gateway.api.quantize import encode_rows, value_range
from gateway.errors import APIError, item_error
from gateway.http.disconnect import ClientGone, Disconnected, unless_disconnected
from gateway.queue.store import NoWorker, QueueFull, QueueStore, RequestTimeout
from gateway.settings import GatewaySettings

_TASK_NAMES = {
    "embed": "embeddings",
    "score": "scoring (rerank, score, return_logits)",
    "classify": "classification",
    "embed_sparse": 'sparse embeddings (embedding_type "sparse", /embed_sparse)',
    "token_embed": "per-token embeddings (return_multivector)",
    "tokenize": "tokenization (/tokenize, /decode)",
}
#: Seconds a client is told to wait (``Retry-After``) after a 429 for a full queue.
QUEUE_FULL_RETRY_AFTER = 5

R = TypeVar("R", bound=BaseModel)


@dataclass
class Prepared(Generic[R]):
    """A checked client request: its queue entries, the request field they come from (for
    error messages: ``field[index]``), and how their results, in order, become the response."""

    specs: list[ItemSpec]
    field: str
    respond: Callable[[list[ItemResult]], R]


class Serving:
    """Runs client requests through the queue ``store``."""

    def __init__(self, store: QueueStore, settings: GatewaySettings):
        self.store = store
        self.settings = settings
        #: Client requests being served now (a draining gateway waits for them).
        self.in_flight = 0

    async def check_model(self, model: str, task: Task) -> ModelAdvert | None:
        """The model's latest advert (None for a model declared with ``--model`` that no
        worker advertised yet). Raises APIError 404 for an unknown model, 400 for a model
        that does not serve ``task``."""
        advert = await self.store.advert(model)
        if advert is None:
            if model in self.settings.models:
                return None
            raise APIError(
                404,
                f"The model '{model}' does not exist or no worker serves it.",
                param="model",
                code="model_not_found",
            )
        if task not in advert.tasks:
            raise APIError(
                400,
                f"The model '{model}' does not support {_TASK_NAMES[task]}; it supports: "
                f"{', '.join(_TASK_NAMES[t] for t in advert.tasks)}.",
                param="model",
                code="unsupported_task",
            )
        return advert

    def _max_chars(self, advert: ModelAdvert | None) -> int:
        return inputs.max_input_chars(advert, self.settings.max_chars_per_token)

    async def run(
        self, specs: list[ItemSpec], field: str, disconnected: Disconnected | None = None
    ) -> list[ItemResult]:
        """Queue ``specs`` (one request's inputs) and wait for every result, in order. A
        client that goes away (``disconnected`` returns) takes its inputs out of the queue.

        Raises APIError 429 (``Retry-After``) if the model's queue is full (nothing queued
        then), 503 if no worker took any input within the pickup timeout, 504 if not all
        were answered within the request timeout, and the error of the first failed input
        (:func:`~gateway.errors.item_error`, naming ``field[index]``)."""
        model, task = specs[0].model, specs[0].task
        try:
            request = await self.store.submit(specs)
        except ValueError as e:  # an input the store cannot encode (the edge checks for it)
            raise APIError(
                400, f"The input cannot be queued: {str(e)[:200]}", param=field
            ) from None
        except QueueFull as e:
            metrics.QUEUE_FULL.labels(model).inc()
            raise APIError(
                429,
                f"The queue of model '{model}' is full ({e.queued} inputs wait; the limit is "
                f"{e.limit}). Try again later.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
            ) from None
        metrics.child(metrics.ITEMS_ENQUEUED, model, task).inc(len(specs))
        self.in_flight += 1
        waiting = self.store.wait(
            request, self.settings.pickup_timeout_seconds, self.settings.request_timeout_seconds
        )
        try:
            if disconnected is None:
                results = await waiting
            else:
                results = await unless_disconnected(waiting, disconnected)
        except ClientGone:  # the wait was cancelled: its inputs left the queue
            raise APIError(499, "The client closed the request.", code="client_closed") from None
        except NoWorker:
            raise APIError(
                503,
                f"No worker for model '{model}' took the request within "
                f"{self.settings.pickup_timeout_seconds:g} s; try again later.",
                type="server_error",
                code="no_worker_available",
            ) from None
        except RequestTimeout:
            raise APIError(
                504,
                f"The request was not answered within {self.settings.request_timeout_seconds:g} s.",
                type="server_error",
                code="timeout",
            ) from None
        finally:
            self.in_flight -= 1
        for index, res in enumerate(results):
            if res.error is not None:
                raise item_error(res.error, field, index, len(results))
        return results

    async def embeddings(
        self, req: EmbeddingRequest, disconnected: Disconnected | None = None
    ) -> EmbeddingResponse:
        """``POST /v1/embeddings``: vectors, or the selected logits with ``return_logits``."""
        prepared = await self.prepare_embeddings(req)
        return prepared.respond(await self.run(prepared.specs, prepared.field, disconnected))

    async def prepare_embeddings(self, req: EmbeddingRequest) -> Prepared[EmbeddingResponse]:
        """Check an embeddings request and turn it into queue entries (raises APIError 4xx
        for what is wrong with it)."""
        inputs.check_request(req)
        req = options.fold_peer_fields(req)
        task = options.embedding_task(req)
        if task == "score":
            inputs.check_logit_ids(req.return_logits or [], None)  # before any copies
        specs = inputs.embedding_specs(req, task)
        advert = await self.check_model(req.model, task)
        if task == "score":
            if advert is not None and inputs.score_type(advert) != "causal-lm":
                raise APIError(
                    400,
                    f"'return_logits' needs a causal-LM scoring model; '{req.model}' scores "
                    f"pairs as {advert.score_type}: use /v1/score or /v1/rerank.",
                    param="return_logits",
                )
            if req.dimensions is not None:
                raise APIError(
                    400, "'dimensions' cannot be combined with 'return_logits'.", param="dimensions"
                )
            if req.embedding_type != "float":
                raise APIError(
                    400,
                    "'embedding_type' cannot be combined with 'return_logits' (logits are float).",
                    param="embedding_type",
                )
            inputs.check_logit_ids(req.return_logits or [], advert)
        options.apply_prompt(specs, req, advert, task)
        options.apply_truncation(specs, req, advert, task)
        inputs.check_sizes(specs, "input", self._max_chars(advert))
        inputs.check_token_ids(specs, "input", advert)

        kind = req.embedding_type
        bounds = value_range(advert)

        def respond(results: list[ItemResult]) -> EmbeddingResponse:
            data = []
            for i, res in enumerate(results):
                assert res.vector_b64 is not None
                emb: Any
                if kind == "sparse":  # lists whatever the encoding_format
                    sparse = res.sparse()
                    emb = SparseValues(
                        indices=sparse.indices.tolist(), values=sparse.values.tolist()
                    )
                elif kind == "float" and res.rows is None and req.encoding_format == "base64":
                    emb = res.vector_b64  # the worker's float32 bytes, as they came
                else:  # each row as a vector of its kind; a single vector is one row
                    single = res.rows is None
                    rows = decode_vector(res.vector_b64)[None, :] if single else res.matrix()
                    emb = encode_rows(rows, kind, bounds, req.encoding_format)
                    emb = emb[0] if single else emb
                data.append(EmbeddingData(index=i, embedding=emb))
            return EmbeddingResponse(data=data, model=req.model, usage=_usage(results))

        return Prepared(specs, "input", respond)

    async def rerank(
        self, req: RerankRequest, disconnected: Disconnected | None = None
    ) -> RerankResponse:
        """``POST /v1/rerank``: documents sorted by their score against the query, cut to
        ``top_n``."""
        prepared = await self.prepare_rerank(req)
        return prepared.respond(await self.run(prepared.specs, prepared.field, disconnected))

    async def prepare_rerank(self, req: RerankRequest) -> Prepared[RerankResponse]:
        """Check a rerank request and turn it into queue entries, one per document (raises
        APIError 4xx for what is wrong with it, 400 for a Cohere field that is not served;
        503 before any worker said how the model scores pairs)."""
        inputs.check_request(req)
        unserved = req.unserved_field()
        if unserved is not None:
            raise APIError(400, f"'{unserved}' is not supported by this server.", param=unserved)
        advert = await self._scoring_advert(req.model)
        if not req.query:
            raise APIError(400, "'query' must not be empty.", param="query")
        documents = req.texts()
        inputs.check_inputs(documents, "documents")
        causal = inputs.score_type(advert) == "causal-lm"
        for field in ("prompt_template", "instruction"):
            if getattr(req, field) is not None and not causal:
                raise APIError(
                    400,
                    f"'{field}' applies to causal-LM rerankers; '{req.model}' scores "
                    f"pairs as {advert.score_type}.",
                    param=field,
                )
        if req.prompt_template is not None:
            inputs.check_template(req.prompt_template)
        pairs = [(req.query, doc) for doc in documents]
        limit = self._max_chars(advert)
        if len(req.query) > limit:
            raise APIError(
                400,
                f"'query' has {len(req.query)} characters; at most {limit} are accepted for "
                f"'{req.model}'.",
                param="query",
                code="context_length_exceeded",
            )
        specs = inputs.pair_specs(
            req.model, pairs, advert, template=req.prompt_template, instruction=req.instruction
        )
        self._check_pairs(pairs, specs, advert, "documents", req.prompt_template, req.instruction)

        def respond(results: list[ItemResult]) -> RerankResponse:
            scores = [
                inputs.pair_score(decode_vector(r.vector_b64 or ""), causal, True) for r in results
            ]
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n or None]
            shown = req.return_documents
            return RerankResponse(
                id=f"rerank-{uuid.uuid4().hex}",
                model=req.model,
                data=[
                    RerankResult(
                        index=i,
                        relevance_score=scores[i],
                        document=documents[i] if shown else None,
                    )
                    for i in order
                ],
                results=[
                    RankedDocument(
                        index=i,
                        relevance_score=scores[i],
                        document=TextDocument(text=documents[i]) if shown else None,
                    )
                    for i in order
                ],
                usage=ScoreUsage(**_usage(results).model_dump()),
            )

        return Prepared(specs, "documents", respond)

    async def score(
        self, req: ScoreRequest, disconnected: Disconnected | None = None
    ) -> ScoreResponse:
        """``POST /v1/score`` (vLLM's shape): one score per (``text_1``, ``text_2``) pair."""
        prepared = await self.prepare_score(req)
        return prepared.respond(await self.run(prepared.specs, prepared.field, disconnected))

    async def prepare_score(self, req: ScoreRequest) -> Prepared[ScoreResponse]:
        """Check a score request and turn it into queue entries, one per pair: 1:1, 1:N (one
        ``text_1`` against every ``text_2``) or N:N, as vLLM pairs them. Raises APIError 4xx
        for what is wrong with it (400 for lists of different lengths)."""
        inputs.check_request(req)
        advert = await self._scoring_advert(req.model)
        first = [req.text_1] if isinstance(req.text_1, str) else list(req.text_1)
        second = [req.text_2] if isinstance(req.text_2, str) else list(req.text_2)
        inputs.check_inputs(first, "text_1")
        inputs.check_inputs(second, "text_2")
        if len(first) == 1:
            first = first * len(second)
        elif len(first) != len(second):
            raise APIError(
                400,
                f"'text_1' has {len(first)} items and 'text_2' {len(second)}: pair them 1:1, "
                "1:N (one text_1) or N:N.",
                param="text_1",
            )
        causal = inputs.score_type(advert) == "causal-lm"
        if causal and req.truncate_prompt_tokens is not None:
            raise APIError(
                400,
                f"'truncate_prompt_tokens' would cut the end of the rerank prompt of "
                f"'{req.model}' (a causal-LM reranker): its template truncates the document "
                "itself.",
                param="truncate_prompt_tokens",
            )
        normalize = req.use_activation is not False
        pairs = list(zip(first, second, strict=True))
        specs = inputs.pair_specs(
            req.model, pairs, advert, normalize=normalize, truncate=req.truncate_prompt_tokens
        )
        self._check_pairs(pairs, specs, advert, "text_2", None)

        def respond(results: list[ItemResult]) -> ScoreResponse:
            data = [
                ScoreData(
                    index=i,
                    score=inputs.pair_score(decode_vector(r.vector_b64 or ""), causal, normalize),
                )
                for i, r in enumerate(results)
            ]
            return ScoreResponse(
                id=f"score-{uuid.uuid4().hex}",
                created=int(time.time()),
                model=req.model,
                data=data,
                usage=ScoreUsage(**_usage(results).model_dump()),
            )

        return Prepared(specs, "text_2", respond)

    async def classify(
        self, req: ClassifyRequest, disconnected: Disconnected | None = None
    ) -> ClassifyResponse:
        """``POST /v1/classify`` (vLLM's shape): each input's class probabilities and label."""
        prepared = await self.prepare_classify(req)
        return prepared.respond(await self.run(prepared.specs, prepared.field, disconnected))

    async def prepare_classify(self, req: ClassifyRequest) -> Prepared[ClassifyResponse]:
        """Check a classify request and turn it into queue entries, one per input (raises
        APIError 4xx as for embeddings: empty input, over-long, a model without the task)."""
        inputs.check_request(req)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        inputs.check_inputs(texts, "input")
        advert = await self.check_model(req.model, "classify")
        normalize = req.normalize is not False and req.use_activation is not False
        specs = [
            ItemSpec(
                model=req.model,
                task="classify",
                text=t,
                normalize=normalize,
                truncate_prompt_tokens=req.truncate_prompt_tokens,
            )
            for t in texts
        ]
        inputs.check_sizes(specs, "input", self._max_chars(advert))

        known = list(advert.labels or []) if advert else []  # none yet: LABEL_<i>

        def respond(results: list[ItemResult]) -> ClassifyResponse:
            data = []
            for i, r in enumerate(results):
                probs = decode_vector(r.vector_b64 or "").tolist()
                best = max(range(len(probs)), key=probs.__getitem__)
                label = known[best] if best < len(known) else f"LABEL_{best}"
                data.append(ClassifyData(index=i, label=label, probs=probs, num_classes=len(probs)))
            return ClassifyResponse(
                id=f"classify-{uuid.uuid4().hex}",
                created=int(time.time()),
                model=req.model,
                data=data,
                usage=ScoreUsage(**_usage(results).model_dump()),
            )

        return Prepared(specs, "input", respond)

    async def _scoring_advert(self, model: str) -> ModelAdvert:
        """The advert of a model that scores pairs; 404 / 400 as :meth:`check_model`, 503
        before any worker advertised how it scores them."""
        advert = await self.check_model(model, "score")
        if advert is None or (inputs.score_type(advert) == "causal-lm" and advert.rerank is None):
            raise APIError(
                503,
                f"No worker has advertised how it scores pairs for '{model}' yet.",
                type="server_error",
                code="no_worker_available",
            )
        return advert

    def _check_pairs(
        self,
        pairs: list[tuple[str, str]],
        specs: list[ItemSpec],
        advert: ModelAdvert,
        field: str,
        template: str | None,
        instruction: str | None = None,
    ) -> None:
        """The request's size limits: all pairs together (``--max-rerank-bytes``; a causal-LM
        prompt adds its instruction and template to each) and each pair (the model's context
        length)."""
        extra = 0
        if advert.rerank is not None and inputs.score_type(advert) == "causal-lm":
            said = advert.rerank.instruction if instruction is None else instruction
            extra = len(said) + len(template or advert.rerank.template)
        inputs.check_pairs_size(pairs, extra, self.settings.max_rerank_bytes, field)
        inputs.check_sizes(specs, field, self._max_chars(advert))

    async def models(self) -> ModelList:
        """``GET /v1/models``: models with a live worker, with what the workers advertise."""
        now = int(time.time())
        available = await self.store.available_models()
        return ModelList(
            data=[
                ModelCard(
                    id=name,
                    created=now,
                    tasks=list(adv.tasks),
                    max_model_len=adv.max_model_len,
                    workers=n,
                    checkpoint_name=adv.checkpoint_name,
                    description=adv.description,
                    score_type=adv.score_type,
                    labels=adv.labels,
                    prompts=adv.prompts or None,
                    default_prompt_name=adv.default_prompt_name,
                )
                for name, (adv, n) in sorted(available.items())
            ]
        )


def _usage(results: list[ItemResult]) -> Usage:
    n = sum(r.prompt_tokens for r in results)
    return Usage(prompt_tokens=n, total_tokens=n)
