"""Queue protocol v1: the wire models shared by the worker and the gateway.

Documented in ``docs/queue-protocol.md``. All bodies are JSON. Vectors travel as base64 of
little-endian float32 (``vector_b64``), the same encoding the OpenAI embeddings API uses for
``encoding_format="base64"``, so neither side builds a JSON float list on the hot path.
"""

from __future__ import annotations

import base64
from enum import Enum
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

PREFIX = "/queue/v1"
#: Token ids per ``return_logits`` (vLLM caps ``logprob_token_ids`` per request at this many).
MAX_LOGIT_IDS = 128
#: Windows an input may be split into (``ItemSpec.chunk_tokens``): an input longer than this
#: many contexts is refused.
MAX_CHUNKS = 16
#: Characters of a model name (clients' ``model``, adverts' ``name``), of a worker id, an
#: item id and a lease id at most: what the gateway keys by is bounded, whoever sends it.
MAX_NAME_LENGTH = 256
#: Characters of an item error's message kept (a longer one is cut).
MAX_ERROR_MESSAGE = 4096
#: Models one pull may advertise.
MAX_MODELS_PER_PULL = 256

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]

#: What a worker does with an item: ``embed`` (pooled embedding), ``embed_sparse`` (a sparse
#: lexical embedding: weights of vocabulary token ids, as SPLADE), ``token_embed`` (one vector
#: per token: a multi-vector embedding, as ColBERT's), ``score`` (a pair's score,
#: or logits of chosen token ids at the last position), ``classify`` (a sequence classifier's
#: class probabilities or logits) or ``tokenize`` (the model's tokenizer alone, no engine
#: step: a text's tokens, or the text of token ids; every worker serves it for its models).
Task = Literal["embed", "embed_sparse", "token_embed", "score", "classify", "tokenize"]
#: The tasks an engine is started for (``generator.task``): all but ``tokenize``.
EngineTask = Literal["embed", "embed_sparse", "score", "classify"]

#: How a scoring model turns a (query, document) pair into a score, as vLLM names them plus
#: this project's causal-LM recipe: ``causal-lm`` (the raw logits of chosen token ids at the
#: last position of a rendered prompt; ``return_logits``), ``cross-encoder`` (a 1-label
#: sequence classifier on the pair, one forward pass), ``late-interaction`` (ColBERT MaxSim
#: over the two texts' token embeddings), ``bi-encoder`` (cosine of the two embeddings).
ScoreType = Literal["causal-lm", "cross-encoder", "late-interaction", "bi-encoder"]
#: The score types whose items are (``text``, ``text_pair``) pairs answered with one score.
PAIR_SCORE_TYPES: frozenset[str] = frozenset({"cross-encoder", "late-interaction", "bi-encoder"})


class ErrorCode(str, Enum):
    """Why an item failed: one stable name per cause, the same on both sides of the queue.
    The gateway maps them to HTTP in one place (``gateway/errors.py``)."""

    INVALID_INPUT = "invalid_input"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_DIMENSIONS = "invalid_dimensions"
    INVALID_TOKEN_IDS = "invalid_token_ids"
    INVALID_PROMPT_TEMPLATE = "invalid_prompt_template"
    #: An unexpected failure in the worker (retryable: another worker may succeed).
    INTERNAL_ERROR = "internal_error"
    #: The queue gave up on the item after its last delivery (dead letter).
    MAX_ATTEMPTS_EXCEEDED = "max_attempts_exceeded"


#: The codes that are the client's fault (HTTP 400); the others are the server's (HTTP 500).
CLIENT_ERRORS = frozenset(
    {
        ErrorCode.INVALID_INPUT,
        ErrorCode.CONTEXT_LENGTH_EXCEEDED,
        ErrorCode.INVALID_DIMENSIONS,
        ErrorCode.INVALID_TOKEN_IDS,
        ErrorCode.INVALID_PROMPT_TEMPLATE,
    }
)


class Wire(BaseModel):
    """A wire model: keys it does not know are ignored (a newer peer's fields)."""

    model_config = ConfigDict(extra="ignore")


class RerankSpec(Wire):
    """How the gateway turns (query, document) into a scoring item for this model: the prompt
    template (:mod:`common.prompts` syntax; fields ``query``, ``document``, ``instruction``),
    rendered by the worker."""

    template: str = Field(max_length=65_536)
    instruction: str = Field(max_length=65_536)
    #: Token ids (from the model's tokenizer) whose logits are compared: [false, true].
    false_token_id: int
    true_token_id: int


#: An over-long input: refused (400), cut to the context keeping its start or its end, or
#: split into windows of the context, embedded apart and pooled (``chunk``).
LongInputs = Literal["refuse", "truncate_end", "truncate_start", "chunk"]


class ModelAdvert(Wire):
    """One model a worker serves, as clients name it (``queue.models."<name>"``)."""

    name: Name
    checkpoint_name: Name
    version: int = 1
    tags: list[Name] = Field(default_factory=list, max_length=64)
    tasks: list[Task] = Field(max_length=6)
    #: Longest prompt in tokens the engine accepts (vLLM ``max_model_len``).
    max_model_len: int | None = Field(default=None, ge=1)
    description: str = Field(default="", max_length=4096)
    #: The model's vocabulary size, so the gateway can refuse token ids (inputs,
    #: ``return_logits``) outside it before they are queued.
    vocab_size: int | None = Field(default=None, ge=1)
    #: Scoring workers (causal-lm): the rerank prompt and the yes/no token ids.
    rerank: RerankSpec | None = None
    #: Workers that serve ``score``: how the model scores a pair (:data:`ScoreType`).
    score_type: ScoreType | None = None
    #: Workers that serve ``classify``: the class labels in index order (the model's
    #: ``id2label``).
    labels: list[Annotated[str, Field(max_length=MAX_NAME_LENGTH)]] | None = Field(
        default=None, max_length=16_384
    )
    #: Workers that serve ``embed``: the calibration range [low, high] of ``int8`` / ``uint8``
    #: embeddings (each component's range; values outside it are clipped).
    quantization_range: list[float] | None = Field(default=None, min_length=2, max_length=2)
    #: Workers that serve ``embed``: named prompts (name -> text put before an input, as
    #: sentence-transformers' ``prompts``) and the one used when a request names none.
    prompts: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=2048)]] = (
        Field(default_factory=dict, max_length=16)
    )
    default_prompt_name: str | None = Field(default=None, max_length=64)
    #: Workers that serve ``embed``: what happens to an input longer than ``max_model_len``
    #: when the request does not say (:data:`LongInputs`).
    long_inputs: LongInputs = "refuse"


class PullRequest(Wire):
    """``POST /queue/v1/pull``: lease up to ``max_items`` items, waiting up to ``wait_seconds``."""

    worker_id: Name
    models: list[ModelAdvert] = Field(min_length=1, max_length=MAX_MODELS_PER_PULL)
    max_items: int = Field(ge=1, le=4096)
    #: Free token capacity: the queue stops adding items once their estimated prompt tokens
    #: (``WorkItem.est_tokens``) exceed it; at least one item is always returned.
    max_tokens: int | None = Field(default=None, ge=1)
    wait_seconds: float = Field(default=10.0, ge=0, le=60)
    #: At most this many of the items may be batch-job inputs (``priority`` 1; None: up to
    #: ``max_items``). A worker busy with interactive items keeps it small.
    max_batch_items: int | None = Field(default=None, ge=0)


#: ``ItemSpec.priority`` of a batch job's inputs (interactive inputs: None, i.e. 0).
BATCH_PRIORITY = 1


class ItemSpec(BaseModel):
    """What one queue entry asks of a worker: one input of one client request and how to
    process it. Built by the gateway; unknown keys are an error, not silently dropped.

    The input is exactly one of ``text``, ``token_ids``, or ``prompt_template`` with ``fields``
    (rendered by the worker, :mod:`common.prompts`).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    task: Task
    text: str | None = None
    token_ids: list[int] | None = None
    #: Jinja2 template (``{field}`` shorthand) rendered with ``fields`` and the model's
    #: ``truncate_tokens``: Fireworks' ``prompt_template``, and every rerank prompt.
    prompt_template: str | None = None
    fields: dict[str, Any] | None = None
    #: score, pair score types (:data:`PAIR_SCORE_TYPES`): the document; ``text`` is the
    #: query. The item's result is one float, the pair's score.
    text_pair: str | None = None
    #: Matryoshka dimensions to keep (embed only).
    dimensions: int | None = None
    #: embed: L2-normalise the vector. score: softmax over the selected logits (causal-lm);
    #: the model's activation, e.g. a sigmoid, on a cross-encoder's logit. classify: softmax
    #: over the class logits.
    normalize: bool = True
    #: Truncate the prompt to this many tokens (keeping the start); ``None``: over-long is an
    #: error.
    truncate_prompt_tokens: int | None = None
    #: ``start``: truncation cuts the start instead (keeps the end; special tokens kept).
    truncate_side: Literal["start"] | None = None
    #: embed, text inputs: one longer than this many tokens is split into windows of at most
    #: this many (each with the special tokens), embedded apart and pooled, weighted by their
    #: tokens (at most :data:`MAX_CHUNKS` windows).
    chunk_tokens: int | None = None
    #: score: token ids whose last-position logits are returned, in this order.
    return_logits: list[int] | None = None
    #: tokenize: a text's tokens with the tokenizer's special tokens added; token ids' text
    #: with the special tokens kept (False: left out, TEI's ``skip_special_tokens``).
    special_tokens: bool = True
    #: ``None`` / 0: interactive. 1 (:data:`BATCH_PRIORITY`): a batch job's input, handed out
    #: only when no interactive input waits; the worker passes it to vLLM's priority
    #: scheduling (lower first).
    priority: int | None = None

    @model_validator(mode="after")
    def _one_input(self) -> ItemSpec:
        given = [self.text is not None, self.token_ids is not None, self.fields is not None]
        if sum(given) != 1:
            raise ValueError("exactly one of text, token_ids and fields must be set")
        if (self.fields is None) != (self.prompt_template is None):
            raise ValueError("fields and prompt_template go together")
        if self.text_pair is not None and (self.text is None or self.task != "score"):
            raise ValueError("text_pair goes with text, on a score item")
        return self

    def estimate_tokens(self) -> int:
        """The prompt's tokens as the queue estimates them, without a tokenizer: exact for
        token ids, else UTF-8 bytes / 4 plus 2 special tokens (close for English BPE and
        WordPiece vocabularies); a template counts with its fields. Total: a lone surrogate
        (which the tokenizer will refuse) counts its 3 bytes."""
        if self.token_ids is not None:
            return max(1, len(self.token_ids))
        if self.fields is not None:
            size = _utf8_size(self.prompt_template) + sum(
                _utf8_size(str(v)) for v in self.fields.values()
            )
            return size // 4 + 2
        return (_utf8_size(self.text) + _utf8_size(self.text_pair)) // 4 + 2


def _utf8_size(text: str | None) -> int:
    return len((text or "").encode("utf-8", "surrogatepass"))


class WorkItem(ItemSpec):
    """One input to embed or score (:class:`ItemSpec`), leased to the worker until
    ``lease_seconds`` from now."""

    item_id: str
    lease_id: str
    lease_seconds: float
    #: 1 on first delivery; higher when redelivered after an expired lease.
    attempt: int = 1
    #: The queue's estimate of the prompt tokens (:meth:`ItemSpec.estimate_tokens`).
    est_tokens: int = 1


#: The encodings of a results body: ``json`` (:class:`ResultsRequest`) and ``binary``
#: (:data:`RESULTS_BINARY`, :func:`encode_results`).
ResultEncoding = Literal["json", "binary"]
JSON_ONLY: tuple[ResultEncoding, ...] = ("json",)


class PullResponse(Wire):
    items: list[WorkItem] = Field(default_factory=list)
    #: The results bodies this queue takes; a queue that does not say takes JSON only.
    result_encodings: list[ResultEncoding] = Field(default_factory=lambda: list(JSON_ONLY))


class ItemError(Wire):
    """Why one item failed. ``retryable`` errors are redelivered (up to the queue's limit)."""

    code: ErrorCode
    message: str
    retryable: bool = False

    @field_validator("message")
    @classmethod
    def _cut(cls, message: str) -> str:
        return message if len(message) <= MAX_ERROR_MESSAGE else message[:MAX_ERROR_MESSAGE] + "..."


#: Tokens a ``tokenize`` result may list, and characters of a decoded text.
MAX_TOKENS = 1 << 20
MAX_TEXT = 1 << 24


class Token(Wire):
    """One token of a text (``tokenize``), as TEI's ``/tokenize`` gives it: its ``id``, its
    ``text`` (the input's bytes it covers; the token itself for a special token), and the
    UTF-8 byte offsets [``start``, ``stop``) in the input (None for a special token)."""

    id: int = Field(ge=0)
    text: str = Field(max_length=MAX_TEXT)
    special: bool
    start: int | None = Field(default=None, ge=0)
    stop: int | None = Field(default=None, ge=0)


class SparseEmbedding(NamedTuple):
    """A sparse embedding (``embed_sparse``): the vocabulary token ids with a weight, in
    increasing order (uint32 [nnz]), and their weights (float32 [nnz])."""

    indices: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, indices: Any, values: Any) -> SparseEmbedding:
        """Any pair of same-length sequences, sorted by index, as uint32 / float32 arrays.
        Raises ValueError for lengths that differ or an index repeated or negative."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        val = np.asarray(values, dtype=np.float64).reshape(-1)
        if idx.size != val.size:
            raise ValueError(f"{idx.size} indices for {val.size} values")
        order = np.argsort(idx, kind="stable")
        idx, val = idx[order], val[order]
        if idx.size and (idx[0] < 0 or (np.diff(idx) <= 0).any()):
            raise ValueError("indices must be distinct and not negative")
        return cls(idx.astype("<u4"), val.astype("<f4"))

    @classmethod
    def from_dense(cls, weights: np.ndarray) -> SparseEmbedding:
        """The non-zero entries of a vocabulary-sized weight vector ``[vocab_size]``."""
        weights = np.asarray(weights, dtype=np.float32).reshape(-1)
        (idx,) = np.nonzero(weights)
        return cls(idx.astype("<u4"), weights[idx].astype("<f4"))


class ItemResult(Wire):
    """The outcome of one item: a vector and its prompt-token count, or an error; for an
    ``embed_sparse`` item, its weights as the vector and their token ids (``indices_b64``);
    for a ``tokenize`` item, the text's ``tokens`` or the token ids' ``text`` instead of a
    vector."""

    item_id: Name
    lease_id: Annotated[str, Field(max_length=MAX_NAME_LENGTH)]
    #: base64 of little-endian float32 [dim]; set when ``error`` is None.
    vector_b64: str | None = None
    #: ``embed_sparse``: base64 of little-endian uint32 [nnz], the token ids of the vector's
    #: [nnz] weights, increasing.
    indices_b64: str | None = None
    #: ``token_embed``: the vector is a matrix [rows, dim] (one row per token), row-major.
    rows: int | None = Field(default=None, ge=1)
    tokens: list[Token] | None = Field(default=None, max_length=MAX_TOKENS)
    text: str | None = Field(default=None, max_length=MAX_TEXT)
    #: Tokens of the input's prompt, as the engine counted them (the gateway refuses more
    #: than the model's context length as a bad result).
    prompt_tokens: int = Field(default=0, ge=0)
    error: ItemError | None = None

    #: The vector itself (float32) and a sparse one's indices (uint32), kept by :meth:`ok`
    #: for the binary body.
    _vector: np.ndarray | None = PrivateAttr(default=None)
    _indices: np.ndarray | None = PrivateAttr(default=None)

    @classmethod
    def ok(
        cls,
        item: WorkItem,
        vector: np.ndarray | SparseEmbedding,
        prompt_tokens: int,
        *,
        encoded: bool = True,
    ) -> ItemResult:
        """A vector's result (a sparse embedding: its weights, with their indices; a matrix
        [rows, dim]: its rows, row-major, with ``rows``). ``encoded=False``: the words are
        kept as they are and base64 is left to :meth:`encoded`, for a sender that may post
        them as a binary body (the worker: results encoded once, for the body it sends)."""
        indices, rows = None, None
        if isinstance(vector, SparseEmbedding):
            indices = np.ascontiguousarray(vector.indices, dtype="<u4")
            vector = vector.values
        elif vector.ndim == 2:  # per-token vectors [rows, dim]
            rows = int(vector.shape[0])
        vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
        result = cls(
            item_id=item.item_id, lease_id=item.lease_id, rows=rows, prompt_tokens=prompt_tokens
        )
        result.keep_words(vector, indices)
        return result.encoded() if encoded else result

    def keep_words(self, vector: np.ndarray | None, indices: np.ndarray | None = None) -> None:
        """Keep the vector's float32 words (and a sparse one's uint32 indices) beside the
        result, for the binary body (:meth:`words`)."""
        # Their dict directly: private attributes go through BaseModel.__getattr__/__setattr__.
        private = self.__pydantic_private__
        assert private is not None
        private["_vector"], private["_indices"] = vector, indices

    def words(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(float32 [n] values, uint32 [nnz] indices or None) as :meth:`keep_words` kept
        them (by :meth:`ok`, or a binary body's decoder); (None, None) where none were kept."""
        private = self.__pydantic_private__
        assert private is not None
        return private["_vector"], private["_indices"]

    def encoded(self) -> ItemResult:
        """This result with ``vector_b64`` (and a sparse one's ``indices_b64``) set from the
        words :meth:`ok` kept, where ``ok(encoded=False)`` left them out; returns self."""
        vector, indices = self.words()
        if self.vector_b64 is None and vector is not None:
            self.vector_b64 = encode_vector(vector)
            if indices is not None:
                self.indices_b64 = encode_indices(indices)
        return self

    def matrix(self) -> np.ndarray:
        """A ``token_embed`` result's vectors, float32 [rows, dim]; ValueError if it has none."""
        if self.vector_b64 is None or self.rows is None:
            raise ValueError("not a per-token embedding result")
        return decode_vector(self.vector_b64).reshape(self.rows, -1)

    def sparse(self) -> SparseEmbedding:
        """An ``embed_sparse`` result's embedding; ValueError if it has none."""
        if self.vector_b64 is None or self.indices_b64 is None:
            raise ValueError("not a sparse embedding result")
        return SparseEmbedding(decode_indices(self.indices_b64), decode_vector(self.vector_b64))

    @classmethod
    def tokenized(
        cls, item: WorkItem, tokens: list[Token] | None = None, text: str | None = None
    ) -> ItemResult:
        """A ``tokenize`` item's answer: a text's ``tokens``, or token ids' ``text``."""
        return cls(item_id=item.item_id, lease_id=item.lease_id, tokens=tokens, text=text)

    @classmethod
    def failed(
        cls, item: WorkItem, code: ErrorCode, message: str, retryable: bool = False
    ) -> ItemResult:
        return cls(
            item_id=item.item_id,
            lease_id=item.lease_id,
            error=ItemError(code=code, message=message, retryable=retryable),
        )


class ResultsRequest(Wire):
    """``POST /queue/v1/results``: idempotent; a result for an item already answered is ignored."""

    worker_id: Name
    results: list[ItemResult]


class ResultsResponse(Wire):
    accepted: int
    #: Items already answered (a duplicate post), no longer known (cancelled, timed out), or a
    #: retryable error from a lease that is not the item's current one.
    ignored: int
    #: Malformed results (bad base64, not finite, wrong length): counted as a failed attempt.
    rejected: int = 0


class ReleaseRequest(Wire):
    """``POST /queue/v1/release``: hand leased items back at once (drain), instead of waiting
    for their leases to expire."""

    worker_id: Name
    leases: list[tuple[Name, Annotated[str, Field(max_length=MAX_NAME_LENGTH)]]] = Field(
        description="(item_id, lease_id) pairs"
    )
    #: False (a drain): the delivery does not count as an attempt. True: the items failed with
    #: their worker (its engine died), so the delivery counts; an input that kills every
    #: engine it reaches is dead-lettered after ``max_attempts`` instead of cycling.
    count_attempt: bool = False


class ReleaseResponse(Wire):
    released: int


def encode_vector(vector: np.ndarray) -> str:
    """float vector [dim] -> base64 of little-endian float32 bytes."""
    return _encode_words(vector, "<f4")


def decode_vector(data: str) -> np.ndarray:
    """base64 of little-endian float32 -> float32 [dim]. Raises ValueError on bad input."""
    return _decode_words(data, "<f4", "vector")


def encode_indices(indices: np.ndarray) -> str:
    """Token ids [nnz] -> base64 of little-endian uint32 bytes."""
    return _encode_words(indices, "<u4")


def decode_indices(data: str) -> np.ndarray:
    """base64 of little-endian uint32 -> uint32 [nnz]. Raises ValueError on bad input."""
    return _decode_words(data, "<u4", "indices")


def _encode_words(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def _decode_words(data: str, dtype: str, what: str) -> np.ndarray:
    raw = base64.b64decode(data, validate=True)
    if len(raw) % 4:
        raise ValueError(f"{what} byte length is not a multiple of 4")
    return np.frombuffer(raw, dtype=dtype)
