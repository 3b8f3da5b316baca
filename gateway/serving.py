"""The client API's logic: a request becomes queue entries, their results become the response.

Shapes: OpenAI's embeddings and models APIs with Fireworks' extensions (``return_logits``,
``normalize``, ``prompt_template``) and Fireworks' ``/v1/rerank`` (``gateway/api_models.py``).
"""

from __future__ import annotations

import time

from gateway import inputs, metrics
from gateway.api_models import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    RerankRequest,
    RerankResponse,
    RerankResult,
    Usage,
)
from gateway.errors import APIError, item_error
from gateway.queue import NoWorker, RequestTimeout, WorkQueue
from gateway.settings import GatewaySettings
from worker.protocol import ItemResult, ItemSpec, ModelAdvert, Task, decode_vector

_TASK_NAMES = {"embed": "embeddings", "score": "scoring (return_logits, rerank)"}


class Serving:
    """Runs client requests through ``queue``."""

    def __init__(self, queue: WorkQueue, settings: GatewaySettings):
        self.queue = queue
        self.settings = settings

    def check_model(self, model: str, task: Task) -> ModelAdvert | None:
        """The model's latest advert (None for a model declared with ``--model`` that no
        worker advertised yet). Raises APIError 404 for an unknown model, 400 for a model
        that does not serve ``task``."""
        advert = self.queue.advert(model)
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

    async def run(self, specs: list[ItemSpec], field: str) -> list[ItemResult]:
        """Queue ``specs`` (one request's inputs) and wait for every result, in order.

        Raises APIError 503 if no worker took any of them within the pickup timeout, 504 if
        they were not all answered within the request timeout, and the error of the first
        failed input (:func:`~gateway.errors.item_error`, naming ``field[index]``)."""
        model, task = specs[0].model, specs[0].task
        metrics.ITEMS_ENQUEUED.labels(model, task).inc(len(specs))
        items = self.queue.submit(specs)
        try:
            results = await self.queue.wait(
                items, self.settings.pickup_timeout_seconds, self.settings.request_timeout_seconds
            )
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
        for index, res in enumerate(results):
            if res.error is not None:
                raise item_error(res.error, field, index, len(results))
        return results

    async def embeddings(self, req: EmbeddingRequest) -> EmbeddingResponse:
        """``POST /v1/embeddings``: vectors, or the selected logits with ``return_logits``."""
        task: Task = "embed" if req.return_logits is None else "score"
        specs = inputs.embedding_specs(req, task)
        advert = self.check_model(req.model, task)
        if task == "score":
            if req.dimensions is not None:
                raise APIError(
                    400, "'dimensions' cannot be combined with 'return_logits'.", param="dimensions"
                )
            inputs.check_logit_ids(req.return_logits or [], advert)
        results = await self.run(specs, "input")
        data = []
        for i, res in enumerate(results):
            assert res.vector_b64 is not None
            emb: list[float] | str = (
                res.vector_b64
                if req.encoding_format == "base64"
                else decode_vector(res.vector_b64).tolist()
            )
            data.append(EmbeddingData(index=i, embedding=emb))
        return EmbeddingResponse(data=data, model=req.model, usage=_usage(results))

    async def rerank(self, req: RerankRequest) -> RerankResponse:
        """``POST /v1/rerank``: documents sorted by P(true token), cut to ``top_n``."""
        advert = self.check_model(req.model, "score")
        if advert is None or advert.rerank is None:
            raise APIError(
                503,
                f"No worker has advertised a rerank prompt for '{req.model}' yet.",
                type="server_error",
                code="no_worker_available",
            )
        results = await self.run(inputs.rerank_specs(req, advert.rerank), "documents")
        scores = [float(decode_vector(r.vector_b64 or "")[1]) for r in results]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
        data = [
            RerankResult(
                index=i,
                relevance_score=scores[i],
                document=req.documents[i] if req.return_documents else None,
            )
            for i in order
        ]
        return RerankResponse(model=req.model, data=data, usage=_usage(results))

    def models(self) -> ModelList:
        """``GET /v1/models``: models with a live worker, with what the workers advertise."""
        now = int(time.time())
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
                )
                for name, (adv, n) in sorted(self.queue.available_models().items())
            ]
        )


def _usage(results: list[ItemResult]) -> Usage:
    n = sum(r.prompt_tokens for r in results)
    return Usage(prompt_tokens=n, total_tokens=n)
