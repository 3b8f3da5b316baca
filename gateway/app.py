"""The gateway: OpenAI-compatible client API in front of the queue, and the worker API of
queue protocol v1 (``docs/queue-protocol.md``), in one FastAPI app.

Client routes (API keys): ``POST /v1/embeddings``, ``POST /v1/rerank``, ``GET /v1/models``.
Worker routes (worker tokens): ``POST /queue/v1/pull``, ``/queue/v1/results``,
``/queue/v1/release``. A worker token is refused on client routes and the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.api_models import (
    MAX_INPUTS,
    APIError,
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
from gateway.queue import NoWorker, RequestTimeout, WorkQueue
from worker import prompts
from worker.protocol import (
    PREFIX,
    ItemResult,
    ItemSpec,
    PullRequest,
    PullResponse,
    ReleaseRequest,
    ReleaseResponse,
    ResultsRequest,
    ResultsResponse,
    decode_vector,
)

log = logging.getLogger(__name__)

#: Worker error codes that are the client's fault (HTTP 400); others are 500.
CLIENT_ERROR_CODES = {
    "invalid_input", "context_length_exceeded", "invalid_dimensions", "invalid_token_ids",
    "invalid_prompt_template",
}


class GatewaySettings(BaseModel):
    """How the gateway runs; set from ``inference-gateway`` flags or environment."""

    api_keys: list[str] = Field(min_length=1)
    worker_tokens: list[str] = Field(min_length=1)
    #: Lease (visibility timeout) of a pulled item, seconds.
    lease_seconds: float = 30.0
    #: Deliveries of one item before it is dead-lettered.
    max_attempts: int = 3
    #: 503 if no worker leases a request's inputs within this many seconds.
    pickup_timeout_seconds: float = 30.0
    #: 504 if a taken request is not answered within this many seconds.
    request_timeout_seconds: float = 600.0
    #: A worker counts as live this long after its last pull.
    worker_ttl_seconds: float = 30.0
    #: Models accepted before any worker advertised them (requests wait for a worker).
    models: list[str] = Field(default_factory=list)


class _QueueCollector:
    """Queue depth, leases and live workers per model, read at scrape time."""

    def __init__(self, queue: WorkQueue):
        self.queue = queue

    def collect(self) -> Any:
        depth = GaugeMetricFamily("inference_gateway_queue_depth_items",
                                  "Inputs waiting for a worker.", labels=["model"])
        for model, n in self.queue.depth().items():
            depth.add_metric([model], n)
        yield depth
        leased = GaugeMetricFamily("inference_gateway_items_leased",
                                   "Inputs leased to workers, not yet answered.", labels=["model"])
        for model, n in self.queue.leased().items():
            leased.add_metric([model], n)
        yield leased
        workers = GaugeMetricFamily("inference_gateway_workers",
                                    "Live workers per model.", labels=["model"])
        for model, (_, n) in self.queue.available_models().items():
            workers.add_metric([model], n)
        yield workers


_bearer = HTTPBearer(auto_error=False)


def _matches(token: str, allowed: list[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)


def create_app(settings: GatewaySettings) -> FastAPI:
    """Build the gateway. Each app has its own queue."""
    queue = WorkQueue(lease_seconds=settings.lease_seconds, max_attempts=settings.max_attempts,
                      worker_ttl_seconds=settings.worker_ttl_seconds)
    collector = _QueueCollector(queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        metrics.REGISTRY.register(collector)  # type: ignore[arg-type]

        async def reaper() -> None:
            while True:
                await asyncio.sleep(0.5)
                queue.reap()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            metrics.REGISTRY.unregister(collector)  # type: ignore[arg-type]

    app = FastAPI(title="inference-gateway", lifespan=lifespan)
    app.state.queue = queue
    app.state.settings = settings

    # --- auth ---------------------------------------------------------------------------
    # Dependencies are ``async def``: FastAPI runs plain ``def`` ones in a thread pool, a
    # thread hop per request for a few string comparisons.
    async def client_auth(cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if cred is None:
            raise APIError(401, "You didn't provide an API key: use 'Authorization: Bearer KEY'.",
                           type="invalid_request_error", code="invalid_api_key")
        if _matches(cred.credentials, settings.worker_tokens):
            raise APIError(401, "Worker tokens are not accepted on client routes; use an API key.",
                           type="invalid_request_error", code="invalid_api_key")
        if not _matches(cred.credentials, settings.api_keys):
            raise APIError(401, "Incorrect API key provided.", type="invalid_request_error",
                           code="invalid_api_key")

    async def worker_auth(cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if cred is None or not _matches(cred.credentials, settings.worker_tokens):
            what = "API keys are not accepted on queue routes" if cred is not None and _matches(
                cred.credentials, settings.api_keys) else "a valid worker token is required"
            raise APIError(401, f"Queue routes need a worker token: {what}.",
                           type="invalid_request_error", code="invalid_worker_token")

    # --- errors -------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.response_json(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        # pydantic reports union members as extra path parts; keep the field name.
        param = loc[0] if loc else None
        if param == "input":
            msg = ("'input' must be a non-empty string, an array of strings, an array of token "
                   "ids, or an array of token-id arrays")
        elif err.get("type") == "missing":
            msg = f"'{param}' is a required property"
        else:
            msg = f"Invalid value for '{'.'.join(loc) or 'body'}': {err.get('msg')}"
        return JSONResponse(
            APIError(400, msg, param=param).response_json(), status_code=400)

    app.add_middleware(RequestMetrics)

    # --- client API ---------------------------------------------------------------------
    def check_model(model: str, task: str) -> None:
        advert = queue.advert(model)
        if advert is None:
            if model in settings.models:
                return
            raise APIError(404, f"The model '{model}' does not exist or no worker serves it.",
                           param="model", code="model_not_found")
        if task not in advert.tasks:
            names = {"embed": "embeddings", "score": "scoring (return_logits, rerank)"}
            raise APIError(
                400, f"The model '{model}' does not support {names[task]}; it supports: "
                f"{', '.join(names[t] for t in advert.tasks)}.",
                param="model", code="unsupported_task")

    async def run_items(model: str, task: str, specs: list[ItemSpec],
                        field: str = "input") -> list[ItemResult]:
        metrics.ITEMS_ENQUEUED.labels(model, task).inc(len(specs))
        items = queue.submit(specs)
        try:
            results = await queue.wait(items, settings.pickup_timeout_seconds,
                                       settings.request_timeout_seconds)
        except NoWorker:
            raise APIError(503, f"No worker for model '{model}' took the request within "
                           f"{settings.pickup_timeout_seconds:g} s; try again later.",
                           type="server_error", code="no_worker_available") from None
        except RequestTimeout:
            raise APIError(504, f"The request was not answered within "
                           f"{settings.request_timeout_seconds:g} s.", type="server_error",
                           code="timeout") from None
        for index, res in enumerate(results):
            if res.error is not None:
                client_fault = res.error.code in CLIENT_ERROR_CODES
                prefix = f"{field}[{index}]: " if len(results) > 1 else ""
                raise APIError(400 if client_fault else 500, prefix + res.error.message,
                               type="invalid_request_error" if client_fault else "server_error",
                               param=field if client_fault else None, code=res.error.code)
        return results

    @app.post("/v1/embeddings", dependencies=[Depends(client_auth)],
              response_model=EmbeddingResponse)
    async def embeddings(req: EmbeddingRequest) -> Response:
        if req.prompt_template is not None:
            _check_template(req.prompt_template)
        inputs = _normalize_input(req.input, req.prompt_template)
        task = "embed" if req.return_logits is None else "score"
        check_model(req.model, task)
        if task == "score":
            if req.dimensions is not None:
                raise APIError(400, "'dimensions' cannot be combined with 'return_logits'.",
                               param="dimensions")
            _check_logit_ids(req.return_logits or [], queue.advert(req.model))
        # Embeddings are L2-normalised unless asked not to; selected logits are returned raw
        # unless "normalize": true asks for their softmax (Fireworks).
        normalize = (task == "embed") if req.normalize is None else req.normalize
        specs = [ItemSpec(model=req.model, task=task, normalize=normalize,
                          dimensions=req.dimensions, return_logits=req.return_logits,
                          truncate_prompt_tokens=req.truncate_prompt_tokens, **inp)
                 for inp in inputs]
        results = await run_items(req.model, task, specs)
        data = []
        for i, res in enumerate(results):
            assert res.vector_b64 is not None
            emb: list[float] | str = (res.vector_b64 if req.encoding_format == "base64"
                                      else decode_vector(res.vector_b64).tolist())
            data.append(EmbeddingData(index=i, embedding=emb))
        n = sum(r.prompt_tokens for r in results)
        body = EmbeddingResponse(data=data, model=req.model,
                                 usage=Usage(prompt_tokens=n, total_tokens=n))
        return _json(body)

    @app.post("/v1/rerank", dependencies=[Depends(client_auth)], response_model=RerankResponse)
    async def rerank(req: RerankRequest) -> Response:
        check_model(req.model, "score")
        if not req.query:
            raise APIError(400, "'query' must not be empty.", param="query")
        _check_inputs(req.documents, "documents")
        advert = queue.advert(req.model)
        spec = advert.rerank if advert is not None else None
        if spec is None:
            raise APIError(503, f"No worker has advertised a rerank prompt for '{req.model}' yet.",
                           type="server_error", code="no_worker_available")
        template = spec.template
        if req.prompt_template is not None:
            template = _check_template(req.prompt_template)
        ids = [spec.false_token_id, spec.true_token_id]
        specs = [ItemSpec(model=req.model, task="score", prompt_template=template,
                          fields={"query": req.query, "document": doc,
                                  "instruction": spec.instruction},
                          return_logits=ids, normalize=True)
                 for doc in req.documents]
        results = await run_items(req.model, "score", specs, field="documents")
        scores = [float(decode_vector(r.vector_b64 or "")[1]) for r in results]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
        data = [RerankResult(index=i, relevance_score=scores[i],
                             document=req.documents[i] if req.return_documents else None)
                for i in order]
        n = sum(r.prompt_tokens for r in results)
        body = RerankResponse(model=req.model, data=data, usage=Usage(prompt_tokens=n, total_tokens=n))
        return _json(body, exclude_none=True)  # "document" only with return_documents

    @app.get("/v1/models", dependencies=[Depends(client_auth)])
    async def models() -> ModelList:
        cards = [
            ModelCard(id=name, created=int(time.time()), tasks=list(adv.tasks),
                      max_model_len=adv.max_model_len, workers=n,
                      checkpoint_name=adv.checkpoint_name, description=adv.description)
            for name, (adv, n) in sorted(queue.available_models().items())
        ]
        return ModelList(data=cards)

    # --- worker API (queue protocol v1) -------------------------------------------------
    @app.post(f"{PREFIX}/pull", dependencies=[Depends(worker_auth)], response_model=PullResponse)
    async def pull(req: PullRequest) -> Response:
        items = await queue.pull(req.worker_id, req.models, req.max_items, req.wait_seconds,
                                 req.max_tokens)
        return _json(PullResponse(items=items), exclude_none=True)

    @app.post(f"{PREFIX}/results", dependencies=[Depends(worker_auth)],
              response_model=ResultsResponse)
    async def results(req: ResultsRequest) -> Response:
        accepted, ignored = queue.complete(req.results)
        return _json(ResultsResponse(accepted=accepted, ignored=ignored))

    @app.post(f"{PREFIX}/release", dependencies=[Depends(worker_auth)])
    async def release(req: ReleaseRequest) -> ReleaseResponse:
        return ReleaseResponse(released=queue.release(req.leases))

    # --- operations ---------------------------------------------------------------------
    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _json(body: BaseModel, *, exclude_none: bool = False) -> Response:
    """A JSON response serialised by pydantic-core in one step (no dict round trip)."""
    return Response(body.model_dump_json(exclude_none=exclude_none), media_type="application/json")


class RequestMetrics:
    """ASGI middleware: ``inference_gateway_requests_total{route,status}`` and
    ``inference_gateway_request_duration_seconds{route}`` (seconds) for the client routes
    (``/v1/...``). Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which costs a
    task group and a memory stream per request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope.get("path", "")
        if scope["type"] != "http" or not route.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        status = 500  # unless a response starts

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_DURATION.labels(route).observe(time.monotonic() - t0)


def _normalize_input(value: Any, template: str | None) -> list[dict[str, Any]]:
    """OpenAI / Fireworks ``input`` -> the input fields of one :class:`ItemSpec` per input:
    ``text``, ``token_ids``, or ``prompt_template`` + ``fields`` (an object's fields; a string
    is field ``text`` when a template is given).

    Raises APIError(400) for empty input, empty strings, arrays or objects, negative ids, more
    than :data:`MAX_INPUTS` inputs (see :func:`_check_inputs`), objects without a template,
    or a template with token-id input.
    """
    if isinstance(value, (str, dict)):
        items: list[Any] = [value]
    elif value and all(isinstance(v, int) for v in value):
        items = [value]  # one token array
    else:
        items = list(value)
    _check_inputs(items, "input")
    out: list[dict[str, Any]] = []
    for i, v in enumerate(items):
        if isinstance(v, dict):
            if template is None:
                raise APIError(400, f"input[{i}] is an object; objects are the fields of a "
                               "'prompt_template', which this request does not give.",
                               param="input")
            out.append({"prompt_template": template, "fields": v})
        elif isinstance(v, str):
            out.append({"prompt_template": template, "fields": {"text": v}} if template
                       else {"text": v})
        else:
            if template is not None:
                raise APIError(400, "'prompt_template' cannot be used with token-id input.",
                               param="prompt_template")
            if min(v) < 0:
                raise APIError(400, f"input[{i}] has a negative token id.", param="input")
            out.append({"token_ids": v})
    return out


def _check_template(template: str) -> str:
    """Compile a client's template once to report a syntax error before anything is queued.
    Returns it; raises APIError(400, param ``prompt_template``)."""
    try:
        prompts.compile_template(template)
    except prompts.TemplateError as e:
        raise APIError(400, f"'prompt_template': {e}", param="prompt_template",
                       code="invalid_prompt_template") from None
    return template


def _check_inputs(items: list[Any], field: str) -> None:
    """The limits shared by ``input`` and ``documents``: not empty, at most
    :data:`MAX_INPUTS` items, no empty string or token array. Raises APIError(400)."""
    if not items:
        raise APIError(400, f"'{field}' must not be empty.", param=field)
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"'{field}' has {len(items)} items; at most {MAX_INPUTS} inputs are "
                       "allowed per request.", param=field)
    for i, v in enumerate(items):
        if not v:
            what = {str: "string", dict: "object"}.get(type(v), "token array")
            raise APIError(400, f"{field}[{i}] is an empty {what}.", param=field)


def _check_logit_ids(ids: list[int], advert: Any) -> None:
    """Reject an empty ``return_logits`` or ids outside the model's vocabulary up front."""
    if not ids:
        raise APIError(400, "'return_logits' must list at least one token id.",
                       param="return_logits", code="invalid_token_ids")
    vocab = getattr(advert, "vocab_size", None)
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise APIError(400, f"'return_logits' has token ids outside the vocabulary"
                       f"{f' (size {vocab})' if vocab else ''}: {bad[:10]}",
                       param="return_logits", code="invalid_token_ids")

