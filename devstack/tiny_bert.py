"""Tiny random-weight BERT models, built on the spot: a ``BertForSequenceClassification``
with one label (a cross-encoder, as ms-marco-MiniLM is) or several (a classifier), an
embedder (``BertModel`` with mean pooling, the benchmarks' fast engine), and a
ColBERT (``HF_ColBERT``: BERT + a linear projection of every token, as vLLM's ``ColBERTModel``
loads it).

For tests and benchmarks of the scoring modes on CPU without downloading weights: fixed seed,
``head_dim`` 32 (vLLM's CPU attention needs >= 32), and all-MiniLM-L6-v2's WordPiece tokenizer
(copied from the bundled model), so the pair encoding and token type ids are a real BERT's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from devstack import localstack as ls

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def _bert_config(hidden_size: int, layers: int, max_positions: int) -> dict[str, Any]:
    source = json.loads((ls.minilm_path() / "config.json").read_text())
    return {
        "vocab_size": source["vocab_size"],
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden_size // 32,
        "intermediate_size": 2 * hidden_size,
        "max_position_embeddings": max_positions,
        "type_vocab_size": 2,
        "pad_token_id": source.get("pad_token_id", 0),
    }


def _copy_tokenizer(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        shutil.copy(ls.minilm_path() / name, path / name)


def build_cross_encoder(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_positions: int = 512,
    labels: tuple[str, ...] = (),
) -> Path:
    """Write a ``BertForSequenceClassification`` + tokenizer to ``path``; return it. One label
    (a cross-encoder reranker) unless ``labels`` names the classes of a classifier (its
    ``id2label``, in order)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    _copy_tokenizer(path)
    torch.manual_seed(seed)
    config = BertConfig(**_bert_config(hidden_size, layers, max_positions))
    config.num_labels = max(1, len(labels))
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    untyped: Any = BertForSequenceClassification  # an unannotated __init__
    model = untyped(config)
    with torch.no_grad():  # a wider spread of logits than the default init: no near-ties
        model.classifier.weight.normal_(0.0, 1.0)
        if labels:  # centred on STS sentences, so the predicted class depends on the input
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            texts = ls.stsb_sentences(("dev",))[:64]
            logits = model.eval()(**tok(texts, padding=True, return_tensors="pt")).logits
            model.classifier.bias -= logits.mean(0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_embedder(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 2,
    max_positions: int = 512,
) -> Path:
    """Write a tiny random-weight ``BertModel`` embedder to ``path`` in sentence-transformers'
    layout (``modules.json``: Transformer -> mean Pooling -> Normalize, as all-MiniLM-L6-v2),
    with MiniLM's tokenizer; return it. vLLM, sentence-transformers, and Infinity (torch or
    ONNX) all load the same model from it. The benchmarks' "fast engine": a model so cheap
    that the serving path around it, not its forward pass, sets the pace (as on a GPU)."""
    import torch
    from transformers import BertConfig, BertModel

    _copy_tokenizer(path)
    torch.manual_seed(seed)
    config = BertConfig(**_bert_config(hidden_size, layers, max_positions))
    untyped: Any = BertModel  # transformers leaves its __init__ unannotated
    untyped(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    source = ls.minilm_path()
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copy(source / name, path / name)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = hidden_size
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (path / "2_Normalize").mkdir(exist_ok=True)
    return path


def build_colbert(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_positions: int = 512,
    colbert_dim: int = 32,
) -> Path:
    """Write a ColBERT (``HF_ColBERT``: weights ``bert.*`` and ``linear.weight``
    [colbert_dim, hidden]) + tokenizer to ``path``; return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    _copy_tokenizer(path)
    torch.manual_seed(seed)
    config = BertConfig(**_bert_config(hidden_size, layers, max_positions))
    untyped: Any = BertModel  # transformers leaves its __init__ unannotated
    bert = untyped(config, add_pooling_layer=False)
    linear = torch.nn.Linear(hidden_size, colbert_dim, bias=False)
    tensors = {f"bert.{k}": v.contiguous() for k, v in bert.state_dict().items()}
    tensors["linear.weight"] = linear.weight.detach().contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    # No colbert_dim key: vLLM 0.32 takes the projection's size from linear.weight (given
    # in the config, its ColBERTModel builds the layer before nn.Module.__init__ and fails).
    cfg.update(architectures=["HF_ColBERT"], dtype="float32")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


class ColBERTReference:
    """float32 ``transformers`` forward pass of a :func:`build_colbert` model: every token's
    projected, L2-normalised embedding, and MaxSim (the sum over query tokens of the best dot
    product with a document token)."""

    def __init__(self, path: Path) -> None:
        import torch
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BertConfig, BertModel

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        weights = load_file(str(path / "model.safetensors"))
        untyped: Any = BertModel  # transformers leaves its __init__ unannotated
        self.bert = untyped(BertConfig.from_pretrained(path), add_pooling_layer=False).eval()
        self.bert.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("bert.")})
        self.linear = weights["linear.weight"]

    def tokens(self, text: str) -> Any:
        """float32 [n_tokens, colbert_dim], each row L2-normalised."""
        with self.torch.no_grad():
            enc = self.tok(text, return_tensors="pt")
            hidden = self.bert(**enc).last_hidden_state[0] @ self.linear.T
            return self.torch.nn.functional.normalize(hidden, dim=-1)

    def maxsim(self, query: str, document: str) -> float:
        q, d = self.tokens(query), self.tokens(document)
        return float((q @ d.T).amax(dim=-1).sum())


def build_splade(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_positions: int = 512,
    bias: float = -5.0,
) -> Path:
    """Write a SPLADE model (a ``BertForMaskedLM``, as naver/splade-v3 is) + tokenizer to
    ``path``; return it. The MLM head's output weights are scaled up (logits of about unit
    spread) and its bias is ``bias``, so that few vocabulary logits are positive: a sparse
    embedding of tens to hundreds of tokens, as a trained SPLADE's."""
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMaskedLM

    _copy_tokenizer(path)
    torch.manual_seed(seed)
    config = BertConfig(**_bert_config(hidden_size, layers, max_positions))
    untyped: Any = BertForMaskedLM  # transformers leaves its __init__ unannotated
    model = untyped(config)
    with torch.no_grad():
        model.cls.predictions.decoder.weight.mul_(10.0)  # tied: the input embeddings too
        model.cls.predictions.bias.fill_(bias)
    model.save_pretrained(path, safe_serialization=True)
    # Every tensor under its own name, the tied decoder's too (as a PyTorch-era checkpoint
    # holds them): vLLM's SPLADE loader reads ``cls.predictions.decoder.{weight,bias}`` and
    # leaves what is missing unset, where save_pretrained writes only one name of a tied pair.
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


class SpladeReference:
    """float32 ``transformers`` forward pass of a :func:`build_splade` model: SPLADE's
    ``max over tokens of log(1 + relu(logits))`` (naver's and sentence-transformers'
    ``SpladePooling``), as {token id: weight} of the non-zero weights."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoTokenizer, BertForMaskedLM

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        untyped: Any = BertForMaskedLM  # transformers leaves its from_pretrained untyped
        self.model = untyped.from_pretrained(path, torch_dtype=torch.float32).eval()

    def weights(self, text: str) -> dict[int, float]:
        with self.torch.no_grad():
            logits = self.model(**self.tok(text, return_tensors="pt")).logits[0]
            pooled = self.torch.log1p(self.torch.relu(logits)).amax(dim=0)
        (ids,) = self.torch.nonzero(pooled, as_tuple=True)
        return {int(i): float(pooled[i]) for i in ids}


def build_bge_m3(
    path: Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    max_positions: int = 514,
) -> Path:
    """Write a model of BGE-M3's shape (an ``XLMRobertaModel`` with ``sparse_linear.pt``, a
    [1, hidden] head of per-token lexical weights, and ``colbert_linear.pt``) + MiniLM's
    WordPiece tokenizer to ``path`` (its [CLS] / [SEP] as the model's BOS / EOS); return it.
    vLLM serves it as ``BgeM3EmbeddingModel``: dense (CLS), sparse and per-token vectors."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    _copy_tokenizer(path)
    torch.manual_seed(seed)
    base = _bert_config(hidden_size, layers, max_positions)
    base.update(type_vocab_size=1, bos_token_id=101, eos_token_id=102)
    config = XLMRobertaConfig(**base)
    untyped: Any = XLMRobertaModel  # transformers leaves its __init__ unannotated
    untyped(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    sparse = torch.nn.Linear(hidden_size, 1)
    with torch.no_grad():  # about half the tokens get a weight, as BGE-M3's
        sparse.weight.normal_(0.0, 0.5)
        sparse.bias.zero_()
    torch.save(sparse.state_dict(), path / "sparse_linear.pt")
    torch.save(torch.nn.Linear(hidden_size, hidden_size).state_dict(), path / "colbert_linear.pt")
    return path


class BgeM3Reference:
    """float32 ``transformers`` pass of a :func:`build_bge_m3` model, BGE-M3's three outputs as
    FlagEmbedding computes them: the dense vector (CLS, L2-normalised), the lexical weights
    (``relu(sparse_linear(hidden))`` per token, the largest per token id, the tokenizer's
    CLS / EOS / PAD / UNK left out) and the per-token vectors (``colbert_linear`` of every
    token but the first, L2-normalised)."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoTokenizer, XLMRobertaModel

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        untyped: Any = XLMRobertaModel  # transformers leaves its from_pretrained untyped
        self.model = untyped.from_pretrained(path, add_pooling_layer=False).eval()
        self.sparse = torch.nn.Linear(self.model.config.hidden_size, 1)
        self.sparse.load_state_dict(torch.load(path / "sparse_linear.pt"))
        self.colbert = torch.nn.Linear(self.model.config.hidden_size, self.model.config.hidden_size)
        self.colbert.load_state_dict(torch.load(path / "colbert_linear.pt"))
        tok = self.tok
        self.unused = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id}

    def _hidden(self, text: str) -> Any:
        with self.torch.no_grad():
            return self.model(**self.tok(text, return_tensors="pt")).last_hidden_state[0]

    def dense(self, text: str) -> Any:
        """float32 [hidden]."""
        return self.torch.nn.functional.normalize(self._hidden(text)[0], dim=-1).numpy()

    def tokens(self, text: str) -> Any:
        """float32 [tokens - 1, hidden]."""
        with self.torch.no_grad():
            rows = self.colbert(self._hidden(text)[1:])
        return self.torch.nn.functional.normalize(rows, dim=-1).numpy()

    def weights(self, text: str) -> dict[int, float]:
        enc = self.tok(text, return_tensors="pt")
        with self.torch.no_grad():
            per_token = self.torch.relu(self.sparse(self._hidden(text))).squeeze(-1)
        out: dict[int, float] = {}
        for weight, tid in zip(per_token.tolist(), enc["input_ids"][0].tolist(), strict=True):
            if tid not in self.unused and weight > out.get(tid, 0.0):
                out[tid] = weight
        return out
