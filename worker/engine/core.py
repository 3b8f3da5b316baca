"""What :class:`~worker.engine.engine.Engine` uses of an engine core: the part of vLLM's
``AsyncLLM`` interface that ``AsyncLLM`` itself, :class:`~worker.engine.thread.ThreadedLLM`
(vLLM's ``LLMEngine`` stepped by a thread of the worker) and
:class:`~worker.engine.process.ProcessLLM` (that engine in a process of the worker's own)
all offer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class EngineCore(Protocol):
    @property
    def model_config(self) -> Any:
        """vLLM's ``ModelConfig`` of the engine (``max_model_len``, ``hf_config`` ...)."""

    @property
    def vllm_config(self) -> Any:
        """vLLM's ``VllmConfig`` (``scheduler_config.max_num_batched_tokens`` ...)."""

    @property
    def errored(self) -> bool:
        """True once the engine has failed (or was shut down)."""

    def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer, as vLLM loaded it."""

    def encode(
        self,
        prompt: Any,
        params: Any,
        /,
        *,
        request_id: str,
        lora_request: Any = None,
        priority: int = 0,
    ) -> AsyncIterator[Any]:
        """A pooling request's outputs (the last is final), with the LoRA adapter
        ``lora_request`` names (vLLM's ``LoRARequest``; None: the base model); refusals raise
        vLLM's error."""

    def generate(
        self,
        prompt: Any,
        params: Any,
        /,
        *,
        request_id: str,
        lora_request: Any = None,
        priority: int = 0,
    ) -> AsyncIterator[Any]:
        """A generate request's outputs (the last is final)."""

    async def do_log_stats(self) -> None:
        """Log vLLM's stats and update its metrics."""

    def shutdown(self) -> None:
        """Stop the engine (blocking)."""
