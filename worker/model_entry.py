"""The ``[queue.models."<name>"]`` tables of a worker config (:mod:`worker.config`): a model
name this worker serves as clients call it, the LoRA adapter it may be (``lora_path``), and
the tasks it declares for it (``embedding_task``, ``sparse_embedding_task``,
``token_embedding_task``, ``scoring_task``, ``classification_task``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common import prompts
from common.protocol import LongInputs, Task


class Strict(BaseModel):
    """A config table: unknown keys are errors, values have their TOML type exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class EmbeddingTask(Strict):
    """``[queue.models."<name>".embedding_task]``."""

    supported: bool = False
    #: The range [low, high] each component of an ``int8`` / ``uint8`` embedding is quantized
    #: over (256 steps); the default fits L2-normalised vectors. Narrow it to the model's
    #: observed range for finer steps.
    quantization_range: list[Annotated[float, Field(strict=False)]] = Field(
        default=[-1.0, 1.0], min_length=2, max_length=2
    )
    #: Named prompts (sentence-transformers' ``prompts``: name -> text put before each input),
    #: chosen per request by ``prompt_name`` or ``input_type``. Unset: the checkpoint's
    #: ``config_sentence_transformers.json``; ``{}``: none.
    prompts: (
        dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=2048)]] | None
    ) = Field(default=None, max_length=16)
    #: An input longer than the context when the request does not say: ``refuse`` (a 400),
    #: ``truncate_end`` (keep its start, as TEI's ``--auto-truncate``), ``truncate_start``, or
    #: ``chunk`` (windows of the context embedded apart and pooled by their tokens).
    long_inputs: LongInputs = "refuse"
    #: The prompt of a request that names none (sentence-transformers' ``default_prompt_name``).
    #: Unset: the checkpoint's (with ``prompts`` unset too).
    default_prompt_name: str | None = None

    @field_validator("quantization_range")
    @classmethod
    def _ordered(cls, v: list[float]) -> list[float]:
        if not v[0] < v[1]:
            raise ValueError("expected [low, high] with low < high")
        return v

    @model_validator(mode="after")
    def _default_is_a_prompt(self) -> EmbeddingTask:
        name = self.default_prompt_name
        if name is not None and self.prompts is not None and name not in self.prompts:
            raise ValueError(f"default_prompt_name {name!r} is not one of prompts' names")
        return self


class SparseEmbeddingTask(Strict):
    """``[queue.models."<name>".sparse_embedding_task]``: sparse lexical embeddings
    (``embedding_type = "sparse"``, TEI's ``/embed_sparse``) with a SPLADE model
    (``generator.task = "embed_sparse"``)."""

    supported: bool = False


class TokenEmbeddingTask(Strict):
    """``[queue.models."<name>".token_embedding_task]``: per-token (multi-vector) embeddings
    (``"return_multivector": true``), e.g. a ColBERT's, beside the engine's own task."""

    supported: bool = False


class ClassificationTask(Strict):
    """``[queue.models."<name>".classification_task]``: ``/v1/classify`` with a sequence
    classification model (``generator.task = "classify"``)."""

    supported: bool = False


#: Qwen3-Reranker's instruction and prompt (from its model card); ``{instruction}``,
#: ``{query}`` and ``{document}`` are filled in per document.
QWEN3_RERANK_INSTRUCTION = (
    "Given a web search query, retrieve relevant passages that answer the query"
)
QWEN3_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


class ScoringTask(Strict):
    """``[queue.models."<name>".scoring_task]``: ``return_logits`` scoring and ``/v1/rerank``.

    Rerank scores a document as P(``rerank_true_token``) from the softmax over the logits of
    (``rerank_false_token``, ``rerank_true_token``) after the prompt ``rerank_template``.
    The two tokens are resolved to ids with the model's own tokenizer when the worker starts.
    """

    supported: bool = False
    rerank_instruction: str = QWEN3_RERANK_INSTRUCTION
    rerank_template: str = QWEN3_RERANK_TEMPLATE
    rerank_true_token: str = "yes"
    rerank_false_token: str = "no"

    @field_validator("rerank_template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            used = prompts.fields_used(v)
        except prompts.TemplateError as e:
            raise ValueError(f"expected a prompt template: {e}") from None
        for name in ("query", "document"):
            if name not in used:
                raise ValueError(f"expected a template containing {{{name}}}")
        return v


class ModelEntry(Strict):
    """``[queue.models."<name>"]``: a model name this worker serves, as clients call it."""

    maximum_completion_tokens: int | None = Field(default=None, ge=0)
    description: str = ""
    #: A LoRA adapter of the generator's model (a PEFT folder: ``adapter_config.json`` and
    #: ``adapter_model.safetensors``; relative to the config file, or ``pkg:<module>/<folder>``):
    #: this name is served by the same engine with the adapter applied (vLLM's multi-LoRA;
    #: requests for different adapters share engine steps). Unset: the model itself.
    lora_path: Annotated[Path, Field(strict=False)] | None = None
    embedding_task: EmbeddingTask = EmbeddingTask()
    scoring_task: ScoringTask = ScoringTask()
    classification_task: ClassificationTask = ClassificationTask()
    sparse_embedding_task: SparseEmbeddingTask = SparseEmbeddingTask()
    token_embedding_task: TokenEmbeddingTask = TokenEmbeddingTask()

    def tasks(self) -> list[Task]:
        """Task names advertised to the queue (``embed``, ``embed_sparse``, ``token_embed``,
        ``score``, ``classify``)."""
        out: list[Task] = []
        if self.embedding_task.supported:
            out.append("embed")
        if self.sparse_embedding_task.supported:
            out.append("embed_sparse")
        if self.token_embedding_task.supported:
            out.append("token_embed")
        if self.scoring_task.supported:
            out.append("score")
        if self.classification_task.supported:
            out.append("classify")
        return out


#: The ``[queue.models."<name>"]`` table that declares each engine task.
TASK_TABLES: dict[str, str] = {
    "embed": "embedding_task",
    "embed_sparse": "sparse_embedding_task",
    "score": "scoring_task",
    "classify": "classification_task",
}
