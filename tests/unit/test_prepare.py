"""The worker's prompt preparation (:meth:`worker.engine.Engine.prepare`) with the real
all-MiniLM-L6-v2 tokenizer and a FAKE vLLM engine object (only ``model_config`` and
``get_tokenizer``; no vLLM): texts are tokenized, and truncated, off the event loop (a small
batch on it)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from common.protocol import WorkItem
from devstack import localstack as ls
from tests.support import MINILM_FILES
from worker.config import GeneratorConfig
from worker.defaults import PREPARE_INLINE_TOKENS
from worker.engine import Engine


class FakeLLM:
    """FAKE of vLLM's ``AsyncLLM``: the model's context length and its real tokenizer."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(MINILM_FILES)
        self.model_config = type(
            "ModelConfig",
            (),
            {"max_model_len": 256, "score_type": "cross-encoder", "use_sep_token": True},
        )()

    def get_tokenizer(self) -> Any:
        return self.tok


def item(text: str, task: str = "embed", **kw: Any) -> WorkItem:
    return WorkItem(
        item_id="i",
        lease_id="1:w",
        lease_seconds=30,
        attempt=1,
        model="m",
        task=task,
        text=text,
        **kw,
    )


async def test_a_long_text_is_tokenized_and_truncated_off_the_event_loop():
    """Finding: an over-long text was tokenized on the worker's event loop (a 1 MB text
    blocked it ~600 ms). Now, while it is tokenized, the loop is free: a callback handed to
    it from the tokenizing thread runs before the tokenizing goes on."""
    llm = FakeLLM()
    engine = Engine(llm, GeneratorConfig(model_path=MINILM_FILES), "m")
    text = "the quick brown fox jumps over the lazy dog " * 25_000  # 1.1 MB
    loop = asyncio.get_running_loop()
    preparer = engine.preparer
    encode = preparer.encode_texts
    loop_ran = threading.Event()

    def spy(texts: list[str]) -> list[Any]:
        loop.call_soon_threadsafe(loop_ran.set)  # runs only if the loop is not blocked here
        assert loop_ran.wait(20), "the event loop was blocked while tokenizing"
        return encode(texts)

    preparer.encode_texts = spy  # type: ignore[method-assign]
    truncated, whole = await engine.prepare([item(text, truncate_prompt_tokens=100), item(text)])
    assert loop_ran.is_set()
    want = llm.tok(text, truncation=True, max_length=100)["input_ids"]
    assert truncated == want and len(want) == 100 and want[-1] == llm.tok.sep_token_id
    assert isinstance(whole, list) and len(whole) > 200_000  # the 400 is worded from this


async def test_a_small_batch_is_tokenized_on_the_event_loop_a_large_one_in_a_thread():
    """Up to ``PREPARE_INLINE_TOKENS`` estimated tokens a pulled batch is tokenized where it was
    pulled (a thread hop costs more than its tokenization); a larger one in a worker thread."""
    engine = Engine(FakeLLM(), GeneratorConfig(model_path=MINILM_FILES), "m")
    threads: list[int] = []
    preparer = engine.preparer
    encode = preparer.encode_texts

    def spy(texts: list[str]) -> list[Any]:
        threads.append(threading.get_ident())
        return encode(texts)

    preparer.encode_texts = spy  # type: ignore[method-assign]
    small = [item("a short sentence"), item("another one")]
    large = [item("word " * 200)]  # 1,000 bytes: 252 estimated tokens, with the one above 258
    assert sum(i.estimate_tokens() for i in small) <= PREPARE_INLINE_TOKENS
    assert sum(i.estimate_tokens() for i in [*large, small[0]]) > PREPARE_INLINE_TOKENS
    await engine.prepare(small)
    await engine.prepare([*large, small[0]])
    assert threads[0] == threading.get_ident()
    assert threads[1] != threading.get_ident()


async def test_a_batch_gets_the_ids_the_tokenizer_gives_each_text():
    """The batch encoding (``encode_batch_fast`` of the Rust backend, no truncation) gives
    every text the ids of ``tokenizer(text)``: 300 STS sentences and ten texts of 30 of them
    each (200+ tokens: longer than MiniLM's ``model_max_length`` of 128, and not cut)."""
    llm = FakeLLM()
    engine = Engine(llm, GeneratorConfig(model_path=MINILM_FILES), "m")
    sents = ls.stsb_sentences(("dev",))[:300]
    docs = [" ".join(sents[i : i + 30]) for i in range(0, 300, 30)]
    got = await engine.prepare([item(t) for t in sents + docs])
    want = [llm.tok(t, add_special_tokens=True)["input_ids"] for t in sents + docs]
    assert got == want
    assert min(len(ids) for ids in got[300:]) > 200


async def test_cross_encoder_pairs_are_encoded_together_as_the_tokenizer_encodes_a_pair():
    """A pulled batch's cross-encoder pairs: one tokenizer call, the ids and token type ids of
    each pair as ``tokenizer(query, document)`` gives them; a truncated pair keeps its query
    whole; an item that cannot be encoded fails alone."""
    llm = FakeLLM()
    engine = Engine(llm, GeneratorConfig(model_path=MINILM_FILES, task="score"), "m")
    assert engine.score_type == "cross-encoder"
    docs = ["Paris is the capital of France.", "Cats purr.", "word " * 40]
    pairs = [item("capital of France?", text_pair=d, task="score") for d in docs]
    pairs.append(item("q", text_pair="word " * 40, task="score", truncate_prompt_tokens=12))
    pairs.append(item("q", text_pair="bad \ud800", task="score"))
    got = await engine.prepare(pairs)
    for prompt, doc in zip(got[:3], docs, strict=True):
        want = llm.tok("capital of France?", doc)
        assert prompt.first == want["input_ids"] and prompt.second is None
        assert prompt.token_type_ids == want["token_type_ids"]
    truncated = got[3]
    cls_q, sep = llm.tok("q")["input_ids"][:2], llm.tok.sep_token_id
    assert len(truncated.first) == 12 and truncated.first[:3] == [*cls_q, sep]  # query whole
    assert truncated.token_type_ids == [0, 0, 0] + [1] * 9
    assert "cannot encode" in got[4].message
