"""The queue store: where client inputs wait for workers, behind one interface.

Two backends implement :class:`QueueStore`:

- :class:`gateway.queue.memory.MemoryStore` — in this process (the default; one gateway);
- :class:`gateway.queue.redis.RedisStore` — Redis >= 7 Streams with a consumer group, shared
  by any number of stateless gateway replicas (``--queue-url redis://...``).

Both give queue protocol v1's guarantees (``docs/queue-protocol.md``): leases with redelivery,
idempotent results, release to the front, the dead letter, long polling. What differs is where
the state lives; ``docs/queue-protocol.md`` ("Queue store") says what survives which failure.

Common to both (this module): the client side of a request — futures per input resolved by
the store, the pickup and request timeouts — and the checks of a worker's result.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from common.protocol import (
    BATCH_PRIORITY,
    MAX_CHUNKS,
    ErrorCode,
    ItemError,
    ItemResult,
    ItemSpec,
    ModelAdvert,
    WorkItem,
    decode_indices,
    decode_vector,
)


class NoWorker(Exception):
    """No worker leased any of the request's inputs within the pickup timeout."""


class RequestTimeout(Exception):
    """Workers took the request but did not answer all of it within the request timeout."""


class QueueFull(Exception):
    """Enqueueing the request would put more than the per-model limit of unanswered inputs
    (waiting or leased) in the queue; nothing of it was enqueued."""

    def __init__(self, model: str, queued: int, limit: int):
        super().__init__(f"{queued} inputs wait for '{model}' (limit {limit})")
        self.model, self.queued, self.limit = model, queued, limit


#: :func:`new_id`'s parts: 48 random bits per gateway process, then a counter.
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count()


def new_id(counter_digits: int = 12) -> str:
    """A new id of 12 + ``counter_digits`` hex digits (24 by default) for a request, an input
    or a batch output line: unique in this process (a counter) and across processes and
    restarts (a random prefix per process). Not secret: leases are what a worker cannot
    guess. A counter: a ``uuid4()`` for each input was a visible share of the queue's
    per-input path."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):0{counter_digits}x}"


class StoreUnavailable(Exception):
    """The store (Redis) cannot be reached right now."""


@dataclass(eq=False)
class Request:
    """One client request's inputs in the store: their ids (in input order) and the futures
    the store resolves with their results."""

    model: str
    task: str
    item_ids: list[str]
    futures: list[asyncio.Future[ItemResult]]
    request_id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class BatchIndex:
    """What a batch record is found by: its owner (an API key's hash), when it was created and
    when it ended (Unix s; None while it runs)."""

    owner: str
    created_at: int
    ended_at: int | None = None


@dataclass
class Completion:
    """What ``POST /queue/v1/results`` did with a batch of results."""

    accepted: int = 0
    #: Already answered, cancelled, unknown, or a retryable error from a lease not current.
    ignored: int = 0
    #: Malformed (not finite, wrong length, bad base64): treated as a retryable failure.
    rejected: int = 0


#: ``prompt_tokens`` a result may claim for a model whose context length is not known.
MAX_PROMPT_TOKENS = 1 << 20


def prompt_token_limit(spec: ItemSpec | None, advert: ModelAdvert | None) -> int:
    """The most prompt tokens a result for ``spec`` may claim: the model's context length
    (twice for a pair, whose two texts a bi-encoder or late-interaction model embeds apart;
    :data:`~common.protocol.MAX_CHUNKS` times for a chunked input);
    :data:`MAX_PROMPT_TOKENS` where the advert does not say."""
    limit = advert.max_model_len if advert is not None and advert.max_model_len else None
    if limit is None:
        return MAX_PROMPT_TOKENS
    if spec is not None and spec.chunk_tokens:  # every window's tokens are counted
        return limit * MAX_CHUNKS
    return limit * (2 if spec is not None and spec.text_pair is not None else 1)


def check_result(
    result: ItemResult,
    spec: ItemSpec | None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    vocab_size: int | None = None,
) -> ItemResult:
    """``result`` if it can answer a client, else a retryable ``internal_error`` saying why:
    a vector must be base64 of whole little-endian float32s, all finite, of the expected
    length (``dimensions`` when set; ``len(return_logits)`` for logits, 1 for a pair's score;
    not checked for class probabilities or without ``spec``; a per-token embedding's ``rows``
    of ``dimensions`` each, at most ``max_prompt_tokens`` rows); a sparse embedding's indices
    one per weight, increasing, below ``vocab_size`` (the model's, when known); and
    ``prompt_tokens`` at most ``max_prompt_tokens`` (:func:`prompt_token_limit`)."""
    if result.error is not None:
        return result
    why = None
    sparse = spec is not None and spec.task == "embed_sparse"
    if spec is not None and spec.task == "tokenize":
        why = _tokenize_fault(result, spec)
    elif result.tokens is not None or result.text is not None:
        why = "tokens or a text for an item that is not a tokenize item"
    elif result.prompt_tokens > max_prompt_tokens:
        why = (
            f"{result.prompt_tokens} prompt tokens, more than the model takes ({max_prompt_tokens})"
        )
    elif sparse or result.indices_b64 is not None:
        why = _sparse_fault(result, vocab_size) if sparse else "indices for a dense result"
    elif spec is not None and (result.rows is None) == (spec.task == "token_embed"):
        why = "a matrix without rows" if result.rows is None else "rows for a single vector"
    elif result.rows is not None and result.rows > max_prompt_tokens:
        why = f"{result.rows} rows, more than the prompt's tokens ({max_prompt_tokens})"
    elif result.vector_b64 is None:
        why = "a result without a vector or an error"
    else:
        vec, _ = result.words()  # a binary body's values, as they came (no base64 to decode)
        if vec is None:
            try:
                raw = base64.b64decode(result.vector_b64, validate=True)
            except (binascii.Error, ValueError):
                raw = None
            if raw is not None and len(raw) % 4 == 0 and raw:
                vec = np.frombuffer(raw, dtype="<f4")
        if vec is None or not vec.size:
            why = "the vector is not base64 of whole float32 values"
        else:
            want = _values_asked(result.rows, spec)
            if result.rows is not None and vec.size % result.rows:
                why = f"the matrix has {vec.size} values, not {result.rows} whole rows"
            elif want is not None and vec.size != want:
                why = f"the vector has {vec.size} values, {want} were asked for"
            elif not np.isfinite(vec).all():
                why = "the vector has values that are not finite"
    if why is None:
        return result
    return ItemResult(
        item_id=result.item_id,
        lease_id=result.lease_id,
        error=ItemError(
            code=ErrorCode.INTERNAL_ERROR,
            message=f"the worker sent a bad result: {why}",
            retryable=True,
        ),
    )


def _values_asked(rows: int | None, spec: ItemSpec | None) -> int | None:
    """The values a result's vector must have where the request fixes them: ``dimensions``
    (of each of a matrix's ``rows``), ``len(return_logits)`` for logits, 1 for a pair's
    score; None for class probabilities, or without ``spec``."""
    if spec is None:
        return None
    if rows is not None:
        return rows * spec.dimensions if spec.dimensions else None
    if spec.task == "embed":
        return spec.dimensions
    if spec.task == "classify":  # one value per class of the model
        return None
    return 1 if spec.text_pair is not None else len(spec.return_logits or [])


def _sparse_fault(result: ItemResult, vocab_size: int | None) -> str | None:
    """What is wrong with an ``embed_sparse`` result: weights (finite float32s) and as many
    indices (uint32s), increasing and below ``vocab_size``."""
    if result.vector_b64 is None or result.indices_b64 is None:
        return "a sparse embedding without its weights and indices"
    try:
        values, indices = decode_vector(result.vector_b64), decode_indices(result.indices_b64)
    except (binascii.Error, ValueError):
        return "the weights or indices are not base64 of whole 32-bit values"
    why = None
    if values.size != indices.size:
        why = f"{indices.size} indices for {values.size} weights"
    elif not np.isfinite(values).all():
        why = "the weights have values that are not finite"
    elif indices.size and (np.diff(indices.astype(np.int64)) <= 0).any():
        why = "the indices are not increasing"
    elif indices.size and vocab_size is not None and int(indices[-1]) >= vocab_size:
        why = f"an index ({int(indices[-1])}) outside the vocabulary ({vocab_size} tokens)"
    return why


def _tokenize_fault(result: ItemResult, spec: ItemSpec) -> str | None:
    """What is wrong with a ``tokenize`` result: a text's answer lists tokens whose offsets
    lie within the text (UTF-8 bytes); token ids' answer is a text; never a vector."""
    if result.vector_b64 is not None:
        return "a vector for a tokenize item"
    if spec.token_ids is not None:
        return "a tokenize result without its text" if result.text is None else None
    if result.tokens is None:
        return "a tokenize result without its tokens"
    size = len((spec.text or "").encode("utf-8", "surrogatepass"))
    for t in result.tokens:
        if t.start is not None and (t.stop is None or not t.start <= t.stop <= size):
            return f"a token's offsets ({t.start}, {t.stop}) outside the text ({size} bytes)"
    return None


def fits(
    taken: int, tokens: int, size: int, est: int, max_items: int, budget: float | None
) -> bool:
    """The token-budget rule of a pull, one for both stores (the Redis PULL script's
    ``fitting`` applies the same in Lua): a part of ``size`` inputs and ``est`` estimated
    tokens fits a pull that took ``taken`` inputs and ``tokens`` tokens if the pull stays
    within ``max_items`` and, but for its first input, within ``budget`` tokens (None: no
    budget)."""
    within_budget = taken == 0 or budget is None or tokens + est <= budget
    return taken + size <= max_items and within_budget


def count_advert(models: dict[str, tuple[ModelAdvert, int]], advert: ModelAdvert) -> None:
    """Count one live worker's ``advert`` into ``models`` (name -> (advert, workers)): the
    first advert seen stands for the model, with the tasks of all of them (in the order first
    seen), so that a model two workers serve with different tasks lists each task."""
    seen = models.get(advert.name)
    if seen is None:
        models[advert.name] = (advert, 1)
        return
    first, n = seen
    tasks = list(first.tasks) + [t for t in advert.tasks if t not in first.tasks]
    if tasks != list(first.tasks):
        first = first.model_copy(update={"tasks": tasks})
    models[advert.name] = (first, n + 1)


#: The dead letter's message (``%d``: the deliveries); the Redis scripts use it too.
DEAD_LETTER = "the input was delivered to workers %d times without a result"


def dead_letter(item_id: str, attempts: int, last_error: str | None = None) -> ItemResult:
    """The answer of an item out of attempts: ``max_attempts_exceeded``."""
    message = DEAD_LETTER % attempts
    if last_error is not None:
        message += f" (the last attempt failed: {last_error})"
    return ItemResult(
        item_id=item_id,
        lease_id="",
        error=ItemError(code=ErrorCode.MAX_ATTEMPTS_EXCEEDED, message=message + "; giving up"),
    )


class QueueStore(ABC):
    """Where inputs wait: the client side (:meth:`submit`, :meth:`wait`, :meth:`cancel`), the
    worker side (:meth:`pull`, :meth:`complete`, :meth:`release`), and the views behind
    ``/metrics`` and ``/v1/models``. All methods are coroutines of the event loop; store
    errors surface as :class:`StoreUnavailable`."""

    def __init__(
        self,
        *,
        lease_seconds: float,
        max_attempts: int,
        worker_ttl_seconds: float,
        max_queued: int,
        max_queued_batch: int | None = None,
        advert_ttl_seconds: float = 3600.0,
    ) -> None:
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.worker_ttl = worker_ttl_seconds
        #: Unanswered interactive inputs (waiting or leased) per model; more is a
        #: :class:`QueueFull`.
        self.max_queued = max_queued
        #: The same for batch jobs' inputs (``priority`` :data:`BATCH_PRIORITY`), counted
        #: apart: a batch never takes the room of interactive requests.
        self.max_queued_batch = max_queued if max_queued_batch is None else max_queued_batch
        #: Seconds a model's advert is kept after the last pull of a worker serving it; then
        #: the model is unknown (404) and its empty lines are dropped.
        self.advert_ttl = advert_ttl_seconds

    def queue_limit(self, priority: int | None) -> int:
        """The unanswered inputs a model's line of ``priority`` may hold."""
        return self.max_queued_batch if priority == BATCH_PRIORITY else self.max_queued

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:  # noqa: B027 - a no-op unless the store has tasks
        """Connect and start background tasks (reaper, reply reader)."""

    async def close(self) -> None:  # noqa: B027 - a no-op unless the store has tasks
        """Stop background tasks and disconnect."""

    async def ping(self) -> bool:
        """True while the store is reachable (gateway readiness)."""
        return True

    # --- client side --------------------------------------------------------------------
    @abstractmethod
    async def submit(self, specs: list[ItemSpec]) -> Request:
        """Enqueue one request's inputs (one model, task and priority), all or none. Raises
        :class:`QueueFull` over the model's limit for that priority (:meth:`queue_limit`)."""

    @abstractmethod
    async def cancel(self, request: Request) -> None:
        """Take the request's unanswered inputs out of the queue at once (nobody waits)."""

    @abstractmethod
    async def any_taken(self, request: Request) -> bool:
        """True once a worker has leased any of the request's inputs."""

    async def wait(
        self, request: Request, pickup_timeout: float, request_timeout: float
    ) -> list[ItemResult]:
        """Every input's result, in order.

        Raises :class:`NoWorker` if none of the inputs was leased within ``pickup_timeout``
        seconds, :class:`RequestTimeout` if not all were answered within ``request_timeout``
        (from the start); both cancel the request's remaining inputs, as does cancelling the
        wait itself (a client that went away)."""
        futures = request.futures
        start = time.monotonic()
        try:
            _, pending = await asyncio.wait(futures, timeout=pickup_timeout)
            if pending and not await self._taken_or_unknown(request):
                raise NoWorker()
            if pending:
                left = max(0.0, request_timeout - (time.monotonic() - start))
                _, pending = await asyncio.wait(pending, timeout=left)
                if pending:
                    raise RequestTimeout()
        except BaseException:
            await asyncio.shield(self.cancel(request))
            raise
        return [f.result() for f in futures]

    async def _taken_or_unknown(self, request: Request) -> bool:
        """:meth:`any_taken`, but True while the store cannot tell (unreachable): a request
        is not failed for want of an answer the store will give once it is back."""
        try:
            return await self.any_taken(request)
        except StoreUnavailable:
            return True

    # --- worker side --------------------------------------------------------------------
    @abstractmethod
    def item_model(self, item_id: str) -> str | None:
        """The model of an item in the store (None: not known here)."""

    @abstractmethod
    async def pull(
        self,
        worker_id: str,
        adverts: list[ModelAdvert],
        max_items: int,
        wait_seconds: float,
        max_tokens: int | None = None,
        max_batch_items: int | None = None,
    ) -> list[WorkItem]:
        """Lease up to ``max_items`` inputs (and about ``max_tokens`` estimated tokens, at least
        one) of the advertised models and tasks, interactive ones first and at most
        ``max_batch_items`` batch-job inputs: at once when work waits, else after up to
        ``wait_seconds`` (long polling), possibly none. Registers the worker."""

    @abstractmethod
    async def complete(self, worker_id: str, results: list[ItemResult]) -> Completion:
        """Record results (checked by :func:`check_result`; a malformed one counts in
        ``inference_gateway_results_rejected_total``). A result counts only from the item's
        current lease: its lease id (unguessable, issued to ``worker_id``) while the lease
        holds; any other is ignored. The first result wins; a retryable error redelivers the
        item (or dead-letters it on its last attempt)."""

    @abstractmethod
    async def release(
        self, worker_id: str, leases: list[tuple[str, str]], count_attempt: bool = False
    ) -> int:
        """Hand leased inputs back to the front at once; see ``ReleaseRequest``."""

    @abstractmethod
    async def reap(self) -> None:
        """Requeue inputs whose lease expired; dead-letter those out of attempts."""

    # --- batch jobs ---------------------------------------------------------------------
    @abstractmethod
    async def save_batch(self, batch_id: str, record: str, index: BatchIndex) -> None:
        """Keep a batch's record (JSON, :class:`~gateway.batch.models.BatchRecord`), new or
        changed, indexed by ``index``: by its owner, newest first, and among the running
        batches until it ends."""

    @abstractmethod
    async def load_batch(self, batch_id: str) -> str | None:
        """A batch's record, or None."""

    @abstractmethod
    async def running_batches(self, owner: str | None = None) -> list[str]:
        """The ids of the batches that have not ended: ``owner``'s, or every key's."""

    @abstractmethod
    async def owner_batches(
        self, owner: str, after: str | None, limit: int
    ) -> tuple[list[str], bool]:
        """Up to ``limit`` of ``owner``'s records, newest first, after the batch ``after``
        (none if it is not ``owner``'s), and whether more follow: a page reads only its
        records."""

    @abstractmethod
    async def trim_batches(self, owner: str, keep: int) -> list[str]:
        """Forget ``owner``'s oldest ended batches until at most ``keep`` remain (running ones
        are kept); returns the records forgotten (their files are the caller's to delete)."""

    @abstractmethod
    async def expire_batches(self, ended_before: float) -> list[str]:
        """Forget up to 100 batches that ended before ``ended_before`` (Unix s), oldest first;
        returns their records."""

    @abstractmethod
    async def claim_batch(self, batch_id: str, runner: str, seconds: float) -> bool:
        """True if ``runner`` now holds the right to run the batch for ``seconds`` (it was
        free, expired, or already ``runner``'s): one runner per batch across replicas."""

    @abstractmethod
    async def cancel_batch(self, batch_id: str) -> int:
        """Ask for the batch to be cancelled; returns when that was first asked (Unix s)."""

    @abstractmethod
    async def batch_cancelled(self, batch_id: str) -> int | None:
        """When cancelling the batch was asked (Unix s), or None."""

    # --- views --------------------------------------------------------------------------
    @abstractmethod
    async def depth(self) -> dict[str, int]:
        """Inputs waiting for a worker, per model."""

    @abstractmethod
    async def leased(self) -> dict[str, int]:
        """Inputs leased to workers and not answered, per model."""

    @abstractmethod
    async def available_models(self) -> dict[str, tuple[ModelAdvert, int]]:
        """Model name -> (advert, live workers), for workers that pulled within the worker TTL
        or are pulling now; the advert's tasks are every live worker's (:func:`count_advert`)."""

    @abstractmethod
    async def advert(self, model: str) -> ModelAdvert | None:
        """The latest advert of ``model`` by any worker, or None."""
