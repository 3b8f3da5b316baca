"""Queue protocol v1: the wire models shared by the worker and the gateway.

Documented in ``docs/queue-protocol.md``. All bodies are JSON. Vectors travel as base64 of
little-endian float32 (``vector_b64``), the same encoding the OpenAI embeddings API uses for
``encoding_format="base64"``, so neither side builds a JSON float list on the hot path.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PREFIX = "/queue/v1"

Task = Literal["embed", "score"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RerankSpec(_Wire):
    """How the gateway turns (query, document) into a scoring item for this model."""

    template: str
    instruction: str
    #: Token ids (from the model's tokenizer) whose logits are compared: [false, true].
    false_token_id: int
    true_token_id: int

    def prompt(self, query: str, document: str) -> str:
        return (self.template.replace("{instruction}", self.instruction)
                .replace("{query}", query).replace("{document}", document))


class ModelAdvert(_Wire):
    """One model a worker serves, as clients name it (``queue.models."<name>"``)."""

    name: str
    checkpoint_name: str
    version: int = 1
    tags: list[str] = Field(default_factory=list)
    tasks: list[Task]
    #: Longest prompt in tokens the engine accepts (vLLM ``max_model_len``).
    max_model_len: int | None = None
    description: str = ""
    #: Scoring workers: vocabulary size of the logits, so the gateway can reject bad ids early.
    vocab_size: int | None = None
    #: Scoring workers: the rerank prompt and the yes/no token ids.
    rerank: RerankSpec | None = None


class PullRequest(_Wire):
    """``POST /queue/v1/pull``: lease up to ``max_items`` items, waiting up to ``wait_seconds``."""

    worker_id: str
    models: list[ModelAdvert] = Field(min_length=1)
    max_items: int = Field(ge=1, le=4096)
    #: Free token capacity: the queue stops adding items once their estimated prompt tokens
    #: (``WorkItem.est_tokens``) exceed it; at least one item is always returned.
    max_tokens: int | None = Field(default=None, ge=1)
    wait_seconds: float = Field(default=10.0, ge=0, le=60)


class WorkItem(_Wire):
    """One input to embed or score, leased to the worker until ``lease_seconds`` from now."""

    item_id: str
    lease_id: str
    lease_seconds: float
    #: 1 on first delivery; higher when redelivered after an expired lease.
    attempt: int = 1
    #: The queue's estimate of the prompt tokens (token ids: exact; text: ~4 bytes per token).
    est_tokens: int = 1
    model: str
    task: Task
    #: Exactly one of ``text`` and ``token_ids`` is set.
    text: str | None = None
    token_ids: list[int] | None = None
    #: Matryoshka dimensions to keep (embed only).
    dimensions: int | None = None
    #: embed: L2-normalise the vector. score: softmax over the selected logits.
    normalize: bool = True
    #: Truncate the prompt to this many tokens (keeping the start); ``None`` = over-long is an error.
    truncate_prompt_tokens: int | None = None
    #: score: token ids whose last-position logits are returned, in this order.
    return_logits: list[int] | None = None


class PullResponse(_Wire):
    items: list[WorkItem] = Field(default_factory=list)


class ItemError(_Wire):
    """Why one item failed. ``retryable`` errors are redelivered (up to the queue's limit)."""

    code: str
    message: str
    retryable: bool = False


class ItemResult(_Wire):
    """The outcome of one item: a vector and its prompt-token count, or an error."""

    item_id: str
    lease_id: str
    #: base64 of little-endian float32 [dim]; set when ``error`` is None.
    vector_b64: str | None = None
    prompt_tokens: int = 0
    error: ItemError | None = None

    @classmethod
    def ok(cls, item: WorkItem, vector: np.ndarray, prompt_tokens: int) -> "ItemResult":
        return cls(
            item_id=item.item_id,
            lease_id=item.lease_id,
            vector_b64=encode_vector(vector),
            prompt_tokens=prompt_tokens,
        )

    @classmethod
    def failed(cls, item: WorkItem, code: str, message: str, retryable: bool = False) -> "ItemResult":
        return cls(
            item_id=item.item_id,
            lease_id=item.lease_id,
            error=ItemError(code=code, message=message, retryable=retryable),
        )


class ResultsRequest(_Wire):
    """``POST /queue/v1/results``: idempotent; a result for an item already answered is ignored."""

    worker_id: str
    results: list[ItemResult]


class ResultsResponse(_Wire):
    accepted: int
    #: Items already answered (a duplicate post) or no longer known (cancelled, timed out).
    ignored: int


class ReleaseRequest(_Wire):
    """``POST /queue/v1/release``: hand leased items back at once (drain), instead of waiting
    for their leases to expire."""

    worker_id: str
    leases: list[tuple[str, str]] = Field(description="(item_id, lease_id) pairs")


class ReleaseResponse(_Wire):
    released: int


def estimate_tokens(text: str | None, token_ids: list[int] | None) -> int:
    """Prompt tokens of an input, without a tokenizer: exact for token ids, else UTF-8 bytes / 4
    plus 2 special tokens (close for English BPE / WordPiece vocabularies)."""
    if token_ids is not None:
        return max(1, len(token_ids))
    return len((text or "").encode("utf-8")) // 4 + 2


def encode_vector(vector: np.ndarray) -> str:
    """float vector [dim] -> base64 of little-endian float32 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(data: str) -> np.ndarray:
    """base64 of little-endian float32 -> float32 [dim]. Raises ValueError on bad input."""
    raw = base64.b64decode(data, validate=True)
    if len(raw) % 4:
        raise ValueError("vector byte length is not a multiple of 4")
    return np.frombuffer(raw, dtype="<f4")
