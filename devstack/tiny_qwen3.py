"""A tiny random-weight ``Qwen3ForCausalLM`` with a word-level tokenizer, built on the spot.

For tests and benchmarks of the scoring mode on CPU without downloading weights: same
architecture as Qwen3-Reranker, fixed seed, ``head_dim`` 32 (vLLM's CPU attention needs >= 32),
untied ``lm_head``. Its tokenizer has the chat markers of Qwen3's prompt as special tokens and
"yes" / "no" as ordinary single tokens, so Qwen3-Reranker's prompt works unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "[UNK]"]
_WORD = re.compile(r"\w+|[^\w\s]")


def build(
    path: Path,
    corpus: Iterable[str],
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_positions: int = 4096,
) -> Path:
    """Write model + tokenizer to ``path`` (a Hugging Face folder) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    words: dict[str, None] = {}
    from worker.model_entry import QWEN3_RERANK_INSTRUCTION, QWEN3_RERANK_TEMPLATE

    for text in [QWEN3_RERANK_TEMPLATE, QWEN3_RERANK_INSTRUCTION, "yes no Yes No", *corpus]:
        for w in _WORD.findall(text):
            words.setdefault(w)
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:5],
    )
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    heads = hidden_size // 32
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
        dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init, so rankings are not ties
        model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path
