"""The worker's vLLM engine: :class:`Engine` (:mod:`.engine`) over an engine core — vLLM's
``AsyncLLM``, or its ``LLMEngine`` stepped in a thread (:mod:`.thread`) or in a process of the
worker's own (:mod:`.process`), several of them as one (:mod:`.replicas`); engine arguments
from the config (:mod:`.args`), input preparation (:mod:`.prepare`), the task runners
(:mod:`.tasks`), per-input errors and vLLM's refusals (:mod:`.errors`)."""

from worker.engine.args import engine_core_of, engine_kwargs, score_type_of
from worker.engine.engine import Engine
from worker.engine.errors import EngineDead, InvalidInput
from worker.engine.prepare import PairPrompt, Prompt

__all__ = [
    "Engine",
    "EngineDead",
    "InvalidInput",
    "PairPrompt",
    "Prompt",
    "engine_core_of",
    "engine_kwargs",
    "score_type_of",
]
