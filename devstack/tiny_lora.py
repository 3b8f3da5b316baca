"""Random LoRA adapters of tiny models, built on the spot with ``peft`` (fixed seed): of an
embedder (:func:`devstack.tiny_bert.build_embedder`), a causal LM
(:func:`devstack.tiny_qwen3.build`) and a RoBERTa sequence classifier
(:func:`build_roberta_classifier`, vLLM gives LoRA to RoBERTa's classifier, not BERT's); and
the float32 ``transformers`` reference of an adapted model: ``peft``'s merged weights."""

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
    """Write a PEFT LoRA adapter of ``base`` (any of the tiny models above) to ``path``: rank
    ``rank`` on ``target_modules``, both matrices random (``init_lora_weights=False``, so it
    changes the outputs), no other module saved; return ``path``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(target_modules),
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(str(path))
    return path


def load(base: Path, adapter: Path | None = None) -> Any:
    """float32 ``transformers`` model of ``base`` by its ``config.json`` architecture (a
    ``BertModel`` without its pooler), with ``adapter`` merged into its weights (``peft``'s
    ``merge_and_unload``) when given; in eval mode."""
    import json

    import torch
    import transformers

    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, arch)
    extra = {"add_pooling_layer": False} if arch == "BertModel" else {}
    model = cls.from_pretrained(base, dtype=torch.float32, **extra)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def build_roberta_classifier(path: Path, *, seed: int, labels: tuple[str, ...]) -> Path:
    """Write a tiny random ``XLMRobertaForSequenceClassification`` (hidden 64, 2 layers, one
    class per label) with MiniLM's WordPiece tokenizer (its [CLS] / [SEP] as BOS / EOS, as
    :func:`devstack.tiny_bert.build_bge_m3`) to ``path``; return it."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    from devstack import tiny_bert

    tiny_bert._copy_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_bert._bert_config(64, 2, 514)
    config.update(type_vocab_size=1, bos_token_id=101, eos_token_id=102)
    config["id2label"] = dict(enumerate(labels))
    config["label2id"] = {label: i for i, label in enumerate(labels)}
    untyped: Any = XLMRobertaForSequenceClassification  # transformers leaves it unannotated
    model = untyped(XLMRobertaConfig(**config))
    with torch.no_grad():  # logits of a few units: probabilities apart, not all about 1/3
        model.classifier.out_proj.weight.normal_(0.0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


class MergedEmbedder:
    """float32 ``transformers`` forward pass of ``base`` with ``adapter`` merged into its
    weights (``peft``'s ``merge_and_unload``; None: the base model): ``embed(texts)`` ->
    float32 [n, hidden], mean-pooled over the tokens and L2-normalised."""

    def __init__(self, base: Path, adapter: Path | None) -> None:
        import torch
        from transformers import AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(base)
        self.model = load(base, adapter)

    def embed(self, texts: list[str]) -> Any:
        rows = []
        with self.torch.no_grad():
            for text in texts:
                hidden = self.model(**self.tok(text, return_tensors="pt")).last_hidden_state[0]
                pooled = hidden.mean(dim=0)
                rows.append((pooled / pooled.norm()).numpy())
        import numpy as np

        return np.stack(rows)
