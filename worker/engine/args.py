"""A ``[generator]`` table as vLLM's engine arguments, and what the config tells of the engine
before it starts: its score type and where its engine core runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from common.protocol import MAX_LOGIT_IDS, ScoreType
from worker.config import GeneratorConfig

#: Where an engine core runs (:func:`engine_core_of`).
EngineCoreKind = Literal["asyncllm", "process", "thread"]


def score_type_of(gen: GeneratorConfig) -> ScoreType | None:
    """The score type the config or the checkpoint calls for before vLLM starts:
    ``generator.score_type`` if set; ``bi-encoder`` for an embedding engine; for scoring,
    None when the checkpoint's ``config.json`` names architectures and none of them is a
    causal LM (``*ForCausalLM`` / ``*LMHeadModel``): vLLM's pooling runner then tells the
    type once started; else ``causal-lm`` (also when ``config.json`` cannot be read)."""
    if gen.score_type is not None:
        return gen.score_type
    if gen.task in ("embed", "embed_sparse"):
        return "bi-encoder"
    archs = [str(a) for a in gen.checkpoint_config().get("architectures") or []]
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return None
    return "causal-lm"


def engine_core_of(gen: GeneratorConfig) -> EngineCoreKind:
    """Where the engine core runs: ``generator.engine_core``; ``auto`` (left so on GPU hosts
    by :func:`worker.cpu_host.resolve`) is ``asyncllm``, vLLM's own online setup."""
    return "asyncllm" if gen.engine_core == "auto" else gen.engine_core


def engine_kwargs(gen: GeneratorConfig, lora: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``vllm.AsyncEngineArgs`` keyword arguments for a ``[generator]`` table, with ``lora``
    (the LoRA arguments of the adapters served, :attr:`worker.engine.lora.Adapters.engine_kwargs`).

    Keys left unset in the config are not passed, so vLLM's defaults apply.
    ``generator.engine_args`` entries are passed through last and win.
    """
    causal = gen.task == "score" and score_type_of(gen) == "causal-lm"
    kw: dict[str, Any] = {
        "model": str(gen.model_path),
        "runner": "generate" if causal else "pooling",
        "dtype": gen.dtype,
        "max_num_seqs": gen.max_num_seqs,
        "tensor_parallel_size": gen.tensor_parallel_size,
        "pipeline_parallel_size": gen.pipeline_parallel_size,
        "trust_remote_code": gen.trust_remote_code,
        "disable_log_stats": False,
        # Batch jobs' inputs (priority 1) wait in the engine behind interactive ones.
        "scheduling_policy": "priority",
    }
    override = gen.architecture_override()  # a SPLADE or a BGE-M3 as vLLM's sparse model
    if override is not None:
        kw["hf_overrides"] = {"architectures": [override]}
    if causal:
        kw["logprobs_mode"] = "raw_logits"
        kw["max_logprobs"] = MAX_LOGIT_IDS
        # Rerank prompts share a long prefix (instruction + query): reuse its KV cache.
        kw["enable_prefix_caching"] = True
    optional = {
        "max_model_len": gen.max_model_len,
        "tokenizer": str(gen.tokenizer_path) if gen.tokenizer_path else None,
        "gpu_memory_utilization": gen.gpu_memory_utilization,
        "enforce_eager": gen.enforce_eager,
        "max_num_batched_tokens": gen.max_num_batched_tokens,
        "enable_prefix_caching": gen.enable_prefix_caching,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    kw.update(lora or {})
    kw.update(gen.engine_args)
    return kw


def config_object(name: str, value: Any) -> Any:
    """A TOML table given for an ``AsyncEngineArgs`` field whose type is one of vLLM's config
    dataclasses (``pooler_config``, ``compilation_config`` ...) -> an instance of it, as vLLM's
    own CLI builds it from JSON. Other values are returned unchanged."""
    import typing

    from vllm import AsyncEngineArgs

    if not isinstance(value, dict):
        return value
    field = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}.get(name)
    if field is None:
        return value
    for cls in (field.type, *typing.get_args(field.type)):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls(**value)
    return value
