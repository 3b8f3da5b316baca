"""What the worker tells the queue about each model it serves (``queue.models."<name>"``),
once its engine runs: :func:`model_adverts`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from common.protocol import ModelAdvert, RerankSpec, ScoreType
from worker.config import Config, ConfigError
from worker.model_entry import ModelEntry

#: sentence-transformers' file of a checkpoint's named prompts (``prompts``,
#: ``default_prompt_name``).
SENTENCE_TRANSFORMERS_CONFIG = "config_sentence_transformers.json"


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
                tasks=[*tasks, "tokenize"],  # its tokenizer, for every model
                max_model_len=engine.max_model_len,
                description=entry.description,
                vocab_size=engine.vocab_size,
                rerank=rerank,
                score_type=score_type,
                labels=engine.labels if "classify" in tasks else None,
                quantization_range=(
                    entry.embedding_task.quantization_range if "embed" in tasks else None
                ),
                **(named_prompts(cfg, name, entry) if "embed" in tasks else {}),
            )
        )
    return out


def named_prompts(cfg: Config, name: str, entry: ModelEntry) -> dict[str, Any]:
    """``prompts``, ``default_prompt_name`` (and ``long_inputs``) of an embedding model's
    advert: the config's
    (``queue.models."<name>".embedding_task``), else the checkpoint's
    ``config_sentence_transformers.json`` (none where it is missing or has none). Raises
    :class:`ConfigError` naming the file for a checkpoint file that is not valid."""
    task = entry.embedding_task
    found: dict[str, Any] = {}
    path = Path(cfg.generator.model_path) / SENTENCE_TRANSFORMERS_CONFIG
    if task.prompts is None:
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            found = {}
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not readable as JSON: {e}") from None
        if not isinstance(found, dict):
            raise ConfigError(f"{path}: expected a JSON object")
    prompts = task.prompts if task.prompts is not None else found.get("prompts") or {}
    default = task.default_prompt_name
    if default is None and task.prompts is None:
        default = found.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise ConfigError(f"{path}: 'prompts' must map names to strings")
    if default is not None and default not in prompts:
        where = f'queue.models."{name}".embedding_task.default_prompt_name'
        raise ConfigError(f"{cfg.source}: {where}: {default!r} is not one of {sorted(prompts)}")
    return {"prompts": prompts, "default_prompt_name": default, "long_inputs": task.long_inputs}
