"""LoRA adapters (``queue.models."<name>".lora_path``): each adapter is a model name of its
own on the queue, served by the one engine of its base model with vLLM's multi-LoRA
(``enable_lora``; requests for different adapters share engine steps).

:class:`Adapters` gives every model name its ``LoRARequest`` (None: the base model) and the
engine arguments that fit the adapters. On a CPU host the base model's requests run through
a zero adapter (its weights all 0, so the base model's numbers) whenever adapters are
served: vLLM 0.32's CPU LoRA kernels apply the last adapter slot to the tokens of a request
without one when both share a step (vllm-project/vllm#48421, #49656).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The ranks vLLM's ``max_lora_rank`` accepts (``vllm.config.lora.MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: The adapter folder's files: PEFT's config and weights.
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: The zero adapter's name in vLLM (never a queue model name: those come from the config).
ZERO_ADAPTER = "base-model (zero LoRA)"


class AdapterError(ValueError):
    """An adapter folder that cannot be served; the message says what is wrong."""


def adapter_rank(folder: Path) -> int:
    """The rank ``r`` of the PEFT LoRA adapter in ``folder``; AdapterError if its
    ``adapter_config.json`` is missing or unreadable, it is not a LoRA, or its rank is past
    the largest vLLM takes (512)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except OSError as e:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise AdapterError(f"{folder / ADAPTER_CONFIG} is not JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder / ADAPTER_CONFIG} is not a PEFT LoRA adapter's config")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{folder / ADAPTER_CONFIG}: expected a positive integer r")
    if rank > VLLM_LORA_RANKS[-1]:
        raise AdapterError(f"rank {rank} is past the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return rank


def engine_lora_kwargs(ranks: list[int], slots: int) -> dict[str, Any]:
    """vLLM engine arguments for adapters of ``ranks``, ``slots`` of them in one step:
    ``enable_lora``, ``max_loras`` (all of them: every adapter may share a step) and the
    smallest ``max_lora_rank`` vLLM accepts that fits the largest rank."""
    rank = next(r for r in VLLM_LORA_RANKS if r >= max(ranks))
    return {"enable_lora": True, "max_loras": slots, "max_lora_rank": rank}


def unsupported_model_class(architectures: list[str]) -> str | None:
    """The vLLM model class that would serve the first of ``architectures`` vLLM knows, if
    it does not support LoRA (e.g. ``BertForSequenceClassification``); None if it does or
    vLLM knows none of them (vLLM then says so when it starts). Imports vLLM."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    for arch in architectures:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is not None:
            return None if supports_lora(cls) else cls.__name__
    return None


class Adapters:
    """The LoRA adapters of one engine: model name -> adapter folder (the names without an
    adapter are the base model). ``requests`` maps every model name to its vLLM
    ``LoRARequest`` (None for the base model, or the zero adapter; see the module's doc).
    Call :meth:`close` when the engine is gone (it removes the zero adapter's folder)."""

    def __init__(self, folders: Mapping[str, Path | None], *, zero_for_base: bool) -> None:
        from vllm.lora.request import LoRARequest

        self._tmp: Path | None = None
        served = {name: folder for name, folder in folders.items() if folder is not None}
        self.ranks = [adapter_rank(folder) for folder in served.values()]
        self.requests: dict[str, Any] = {}
        for number, (name, folder) in enumerate(served.items(), start=1):
            self.requests[name] = LoRARequest(name, number, str(folder))
        base = [name for name, folder in folders.items() if folder is None]
        zero = None
        if served and base and zero_for_base:
            self._tmp = Path(tempfile.mkdtemp(prefix="zero-lora-"))
            write_zero_adapter(next(iter(served.values())), self._tmp)
            zero = LoRARequest(ZERO_ADAPTER, len(served) + 1, str(self._tmp))
        self.requests.update(dict.fromkeys(base, zero))

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        """The engine arguments they need (:func:`engine_lora_kwargs`); {} without adapters."""
        if not self.ranks:
            return {}
        slots = len({r.lora_int_id for r in self.requests.values() if r is not None})
        return engine_lora_kwargs(self.ranks, slots)

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def write_zero_adapter(source: Path, target: Path) -> None:
    """Write to ``target`` the adapter in ``source`` with every weight 0: the same
    ``adapter_config.json``, its tensors' names, shapes and dtypes."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copy(source / ADAPTER_CONFIG, target / ADAPTER_CONFIG)
    tensors = load_file(str(source / ADAPTER_WEIGHTS))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(target / ADAPTER_WEIGHTS))
