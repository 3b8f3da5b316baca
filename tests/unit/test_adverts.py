"""What the worker tells the queue about its model (``worker/adverts.py``), and the rerank
tokens resolved with the model's tokenizer (fast layer: MiniLM's tokenizer files, no engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tests.support import MINILM_FILES, worker_config
from worker.adverts import model_adverts
from worker.config import Config, ConfigError, GeneratorConfig
from worker.engine import Engine


class Tokenizing:
    """FAKE of vLLM's ``AsyncLLM`` as far as :meth:`Engine.token_id` reads it: the tokenizer."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(MINILM_FILES)
        self.model_config = SimpleNamespace(max_model_len=256, score_type="bi-encoder")

    def get_tokenizer(self) -> Any:
        return self.tok


def test_a_rerank_token_is_one_token_of_the_tokenizer_or_an_error() -> None:
    engine = Engine(Tokenizing(), GeneratorConfig(model_path=MINILM_FILES), "m")
    tok = engine.tokenizer
    assert engine.token_id("yes") == tok.convert_tokens_to_ids("yes")
    assert engine.token_id("no") == tok.convert_tokens_to_ids("no")
    with pytest.raises(ValueError, match="is not a single token of this tokenizer"):
        engine.token_id("unquestionably yes")


class CausalFacts:
    """The engine facts the adverts read, of a causal LM whose tokenizer knows only "no"."""

    max_model_len = 128
    vocab_size = 1000
    score_type = "causal-lm"
    num_labels = 1

    def token_id(self, token: str) -> int:
        if token == "no":
            return 7
        raise ValueError(f"{token!r} is not a single token of this tokenizer ([1, 2])")


def test_a_rerank_token_that_is_not_one_token_is_a_config_error_naming_the_key() -> None:
    raw = worker_config(models={"m": {"scoring_task": {"supported": True}}})
    raw["generator"]["task"] = "score"
    cfg = Config.model_validate(raw)
    with pytest.raises(ConfigError) as e:
        model_adverts(cfg, CausalFacts())
    assert 'queue.models."m".scoring_task.rerank_true_token: ' in str(e.value)
    assert "'yes' is not a single token" in str(e.value)
