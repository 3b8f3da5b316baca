"""The ``tokenize`` task behind TEI's ``/tokenize`` and ``/decode``: the worker's answer from a
real tokenizer (MiniLM's), the gateway's routes with the test playing the worker, and the
results the gateway refuses. On the real worker and engine: ``tests/e2e/test_embeddings.py``."""

from __future__ import annotations

from typing import Any

import pytest

from common.protocol import MAX_CHUNKS, ItemResult, ItemSpec, Token, WorkItem, encode_vector
from gateway.queue.store import check_result
from tests.support import MINILM_FILES, FakeEngine, InProcessGateway

EMB = {
    "name": "emb",
    "checkpoint_name": "emb",
    "tasks": ["embed", "tokenize"],
    "max_model_len": 128,
    "vocab_size": 30522,
    "prompts": {"query": "q: "},
}
OLD = {"name": "old", "checkpoint_name": "old", "tasks": ["embed"]}  # a worker before tokenize


def item(**kw: Any) -> WorkItem:
    return WorkItem(model="m", task="tokenize", item_id="i", lease_id="l", lease_seconds=5, **kw)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MINILM_FILES))


def test_a_texts_tokens_cover_its_utf8_bytes_and_the_special_tokens_have_no_offsets(tokenizer):
    from worker.engine.tokenize import tokenize

    text = "Héllo wörld, tokens!"
    got = tokenize(tokenizer, item(text=text))
    assert got.error is None and got.vector_b64 is None and got.text is None
    tokens = got.tokens or []
    assert [t.id for t in tokens] == tokenizer(text)["input_ids"]
    assert tokens[0] == Token(id=101, text="[CLS]", special=True)
    assert tokens[-1] == Token(id=102, text="[SEP]", special=True)
    data = text.encode()
    for t in tokens[1:-1]:
        assert not t.special and t.start is not None and t.stop is not None
        assert data[t.start : t.stop].decode() == t.text  # byte offsets, as TEI's
    assert tokens[1] == Token(id=tokens[1].id, text="Héllo", special=False, start=0, stop=6)
    assert tokens[2].start == 7  # after "Héllo " (é is two bytes)
    bare = tokenize(tokenizer, item(text=text, special_tokens=False)).tokens or []
    assert bare == tokens[1:-1]


def test_token_ids_decode_to_text_with_or_without_the_special_tokens(tokenizer):
    from worker.engine.tokenize import tokenize

    ids = tokenizer("hello world")["input_ids"]
    assert tokenize(tokenizer, item(token_ids=ids)).text == "[CLS] hello world [SEP]"
    assert tokenize(tokenizer, item(token_ids=ids, special_tokens=False)).text == "hello world"


async def test_the_engine_tokenizes_short_batches_inline_and_long_ones_alike_off_the_loop():
    from tests.unit.test_adverts import Tokenizing
    from worker.config import GeneratorConfig
    from worker.engine import Engine
    from worker.engine.tokenize import tokenize

    engine = Engine(Tokenizing(), GeneratorConfig(model_path=MINILM_FILES), "m")  # type: ignore[arg-type]
    for text in ("short", "long words " * 300):  # inline, then in a thread
        (got,) = await engine.tokenize([item(text=text)])
        assert got == tokenize(engine.tokenizer, item(text=text))
        assert len(got.tokens or []) == len(engine.tokenizer(text)["input_ids"])


def test_every_models_advert_offers_tokenize_after_its_own_tasks():
    from tests.support import worker_config
    from worker.adverts import model_adverts
    from worker.config import Config

    class Facts:  # the engine facts the adverts read: an embedding model's
        max_model_len, vocab_size, score_type, num_labels, labels = 128, 1000, "bi-encoder", 1, []

    cfg = Config.model_validate(worker_config())
    (advert,) = model_adverts(cfg, Facts())  # type: ignore[arg-type]
    assert advert.tasks == ["embed", "tokenize"]


def test_binary_results_carry_tokens_and_texts():
    from common.results_body import decode_results, encode_results

    tokens = [
        Token(id=101, text="[CLS]", special=True),
        Token(id=5, text="é", special=False, start=0, stop=2),
    ]
    results = [
        ItemResult.tokenized(item(text="é"), tokens=tokens),
        ItemResult.tokenized(item(token_ids=[5]), text="é"),
    ]
    back = decode_results(encode_results("w", results)).results
    assert [(r.tokens, r.text, r.vector_b64) for r in back] == [
        (tokens, None, None),
        (None, "é", None),
    ]


async def test_the_worker_answers_tokenize_items_without_an_engine_step():
    engine = FakeEngine()
    (got,) = await engine.tokenize([item(text="two words")])
    assert [t.text for t in got.tokens or []] == ["[CLS]", "two", "words", "[SEP]"]
    assert engine.runs == []


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10, default_model="emb") as g:
        yield g


def answer(i: dict[str, Any]) -> dict[str, Any]:
    """The test as a worker: each word a token, [CLS] before (when asked); ids → "w<id>"."""
    if i.get("token_ids") is not None:
        return {"text": " ".join(f"w{t}" for t in i["token_ids"])}
    tokens = [{"id": 101, "text": "[CLS]", "special": True}] if i["special_tokens"] else []
    at = 0
    for n, word in enumerate(i["text"].split(" ")):
        tokens.append(
            {"id": n, "text": word, "special": False, "start": at, "stop": at + len(word)}
        )
        at += len(word) + 1
    return {"tokens": tokens}


async def test_tokenize_answers_teis_nested_lists_with_null_offsets_for_special_tokens(gw):
    await gw.advertise([EMB])
    r, items = await gw.answer_while(
        gw.client.post("/tokenize", json={"inputs": "a bc"}), [EMB], answer, 0
    )
    assert r.status_code == 200, r.text
    assert r.json() == [
        [
            {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None},
            {"id": 0, "text": "a", "special": False, "start": 0, "stop": 1},
            {"id": 1, "text": "bc", "special": False, "start": 2, "stop": 4},
        ]
    ]
    assert [(i["task"], i["model"], i["special_tokens"]) for i in items] == [
        ("tokenize", "emb", True)
    ]
    body = {"inputs": ["x", "y z"], "add_special_tokens": False, "prompt_name": "query"}
    r, items = await gw.answer_while(gw.client.post("/tokenize", json=body), [EMB], answer, 0)
    assert [i["text"] for i in items] == ["q: x", "q: y z"]  # the named prompt, as /embed
    assert [[t["text"] for t in one] for one in r.json()] == [["q:", "x"], ["q:", "y", "z"]]


async def test_decode_answers_one_text_per_list_of_ids(gw):
    await gw.advertise([EMB])
    r, items = await gw.answer_while(
        gw.client.post("/decode", json={"ids": [5, 6]}), [EMB], answer, 0
    )
    assert r.status_code == 200 and r.json() == ["w5 w6"]
    assert items[0]["token_ids"] == [5, 6] and items[0]["special_tokens"] is False  # skipped
    body = {"ids": [[1], [2, 3]], "skip_special_tokens": False}
    r, items = await gw.answer_while(gw.client.post("/decode", json=body), [EMB], answer, 0)
    assert r.json() == ["w1", "w2 w3"] and all(i["special_tokens"] for i in items)


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/decode", {"ids": [1, 30522]}, "ids", "invalid_token_ids"),  # outside the vocabulary
        ("/decode", {"ids": []}, "ids", None),
        ("/decode", {"ids": [[1], []]}, "ids", None),
        ("/decode", {"ids": [-1]}, None, None),
        ("/tokenize", {"inputs": []}, "inputs", None),
        ("/tokenize", {"inputs": "x", "prompt_name": "nope"}, "prompt_name", "unknown_prompt_name"),
        ("/tokenize", {"inputs": "too long"}, "inputs", "context_length_exceeded"),
        ("/tokenize", {"inputs": "x", "model": "old"}, "model", "unsupported_task"),
    ],
)
async def test_bad_tokenize_and_decode_requests_are_400_naming_the_field(
    gw, path, body, param, code
):
    await gw.advertise([EMB, OLD])
    if body["inputs" if path == "/tokenize" else "ids"] == "too long":
        # MAX_CHUNKS times what the model takes whole, and one character more
        body["inputs"] = "x" * (128 * gw.settings.max_chars_per_token * MAX_CHUNKS + 1)
    r = await gw.client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_the_gateway_refuses_tokenize_results_that_cannot_be_right():
    text_spec = ItemSpec(model="m", task="tokenize", text="ab")
    ids_spec = ItemSpec(model="m", task="tokenize", token_ids=[1])
    embed_spec = ItemSpec(model="m", task="embed", text="ab")

    def result(**kw: Any) -> ItemResult:
        return ItemResult(item_id="i", lease_id="l", **kw)

    def why(res: ItemResult, spec: ItemSpec) -> str | None:
        checked = check_result(res, spec)
        return None if checked.error is None else checked.error.message

    good = [Token(id=1, text="ab", special=False, start=0, stop=2)]
    assert why(result(tokens=good), text_spec) is None
    assert why(result(text="ab"), ids_spec) is None
    past = [Token(id=1, text="ab", special=False, start=0, stop=3)]
    assert "outside the text (2 bytes)" in str(why(result(tokens=past), text_spec))
    backwards = [Token(id=1, text="", special=False, start=2, stop=1)]
    assert "outside the text" in str(why(result(tokens=backwards), text_spec))
    assert "without its tokens" in str(why(result(text="ab"), text_spec))
    assert "without its text" in str(why(result(tokens=good), ids_spec))
    vector = encode_vector(__import__("numpy").ones(2, "float32"))
    assert "a vector for a tokenize item" in str(why(result(vector_b64=vector), text_spec))
    assert "not a tokenize item" in str(why(result(tokens=good), embed_spec))
