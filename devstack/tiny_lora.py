"""Random LoRA adapters for a tiny embedder (:func:`devstack.tiny_bert.build_embedder`), built
on the spot with ``peft`` (fixed seed), and the float32 ``transformers`` reference of the
adapted model: ``peft``'s merged weights, mean pooling, L2 normalisation (the embedder's
sentence-transformers modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_adapter(
    base: Path,
    path: Path,
    *,
    seed: int,
    rank: int = 8,
    target_modules: tuple[str, ...] = ("query", "value"),
) -> Path:
    """Write a PEFT LoRA adapter of ``base`` (a ``BertModel``) to ``path``: rank ``rank`` on
    ``target_modules``, both matrices random (``init_lora_weights=False``, so it changes the
    vectors); return ``path``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(base, add_pooling_layer=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(target_modules),
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(str(path))
    return path


class MergedEmbedder:
    """float32 ``transformers`` forward pass of ``base`` with ``adapter`` merged into its
    weights (``peft``'s ``merge_and_unload``; None: the base model): ``embed(texts)`` ->
    float32 [n, hidden], mean-pooled over the tokens and L2-normalised."""

    def __init__(self, base: Path, adapter: Path | None) -> None:
        import torch
        from transformers import AutoTokenizer, BertModel

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(base)
        model: Any = BertModel.from_pretrained(base, add_pooling_layer=False)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        self.model = model.eval()

    def embed(self, texts: list[str]) -> Any:
        rows = []
        with self.torch.no_grad():
            for text in texts:
                hidden = self.model(**self.tok(text, return_tensors="pt")).last_hidden_state[0]
                pooled = hidden.mean(dim=0)
                rows.append((pooled / pooled.norm()).numpy())
        import numpy as np

        return np.stack(rows)
