"""What the worker tells the queue about each model it serves (``queue.models."<name>"``),
once its engine runs: :func:`model_adverts`."""

from __future__ import annotations

from typing import Protocol

from common.protocol import ModelAdvert, RerankSpec, ScoreType
from worker.config import Config, ConfigError


class EngineFacts(Protocol):
    """What the adverts need from the started engine (:class:`worker.engine.Engine`)."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def token_id(self, token: str) -> int: ...

    @property
    def score_type(self) -> ScoreType: ...

    @property
    def num_labels(self) -> int: ...

    @property
    def labels(self) -> list[str]: ...


def model_adverts(cfg: Config, engine: EngineFacts) -> list[ModelAdvert]:
    """What the worker tells the queue about each ``queue.models."<name>"``, with the engine's
    context length; for a model that scores, the engine's score type and, for ``causal-lm``,
    the vocabulary size and the rerank prompt with its (false, true) token ids resolved by the
    model's tokenizer; for a classifier its labels; for embeddings the int8 / uint8 range.
    Raises :class:`ConfigError` naming the key if a rerank token is not one token of the
    tokenizer, or a classifying engine's model is not a sequence classifier."""
    gen = cfg.generator
    if gen.task == "classify" and engine.score_type != "cross-encoder":
        raise ConfigError(
            f'{cfg.source}: generator.task: "classify" needs a sequence classification model '
            f"(e.g. *ForSequenceClassification); vLLM serves this one as {engine.score_type}"
        )
    if gen.task == "score" and gen.score_type not in (None, engine.score_type):
        raise ConfigError(
            f'{cfg.source}: generator.score_type: "{gen.score_type}" does not fit this '
            f'checkpoint: vLLM serves it as "{engine.score_type}" (leave the key out, or '
            "convert the model with generator.engine_args, e.g. convert / hf_overrides)"
        )
    if gen.task == "score" and engine.score_type == "cross-encoder" and engine.num_labels != 1:
        raise ConfigError(
            f"{cfg.source}: generator.model_path: a cross-encoder reranker has one label; "
            f"this sequence classifier has {engine.num_labels}"
        )
    out = []
    for name, entry in cfg.queue.models.items():
        tasks = entry.tasks()
        score_type = engine.score_type if "score" in tasks else None
        causal = score_type == "causal-lm"
        rerank = None
        if causal:
            st = entry.scoring_task
            ids = {}
            for key in ("rerank_false_token", "rerank_true_token"):
                try:
                    ids[key] = engine.token_id(getattr(st, key))
                except ValueError as e:
                    raise ConfigError(
                        f'{cfg.source}: queue.models."{name}".scoring_task.{key}: {e}'
                    ) from None
            rerank = RerankSpec(
                template=st.rerank_template,
                instruction=st.rerank_instruction,
                false_token_id=ids["rerank_false_token"],
                true_token_id=ids["rerank_true_token"],
            )
        out.append(
            ModelAdvert(
                name=name,
                checkpoint_name=cfg.queue.checkpoint_name,
                version=cfg.queue.version,
                tags=cfg.queue.tags,
                tasks=tasks,
                max_model_len=engine.max_model_len,
                description=entry.description,
                vocab_size=engine.vocab_size,
                rerank=rerank,
                score_type=score_type,
                labels=engine.labels if "classify" in tasks else None,
                quantization_range=(
                    entry.embedding_task.quantization_range if "embed" in tasks else None
                ),
            )
        )
    return out
