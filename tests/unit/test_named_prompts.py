"""Named prompts (sentence-transformers' ``prompts``): the worker advertises the checkpoint's
``config_sentence_transformers.json`` or its config's; the gateway puts the prompt a request
names (``prompt_name``, Cohere's / Voyage's ``input_type``) or the model's default before each
text input. Fast layer: the real gateway in process, the test playing the worker. On a real
engine: ``tests/e2e/test_embeddings.py::test_named_prompts_embed_as_the_prompted_text``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import InProcessGateway, worker_config
from worker.adverts import model_adverts
from worker.config import Config, ConfigError

QUERY = "Instruct: find passages\nQuery: "
PROMPTED = {
    "name": "qe",
    "checkpoint_name": "qe",
    "tasks": ["embed"],
    "prompts": {"query": QUERY, "document": ""},
}
DEFAULTED = {**PROMPTED, "name": "qd", "default_prompt_name": "query"}
PLAIN = {"name": "plain", "checkpoint_name": "plain", "tasks": ["embed"]}
MODELS = [PROMPTED, DEFAULTED, PLAIN]


@pytest.fixture
async def gw() -> Any:
    async with InProcessGateway(pickup_timeout_seconds=10) as g:
        await g.advertise(MODELS)
        yield g


async def texts(gw: InProcessGateway, model: str, input: Any, **fields: Any) -> list[Any]:
    """The texts (or token ids) the worker is handed for one request."""
    call = gw.client.post("/v1/embeddings", json={"model": model, "input": input, **fields})
    r, items = await gw.answer_while(call, MODELS, lambda i: [0.6, 0.8], prompt_tokens=2)
    assert r.status_code == 200, r.text
    return [i.get("text", i.get("token_ids")) for i in items]


@pytest.mark.parametrize(
    "fields",
    [{"prompt_name": "query"}, {"input_type": "query"}, {"input_type": "search_query"}],
)
async def test_a_named_prompt_goes_before_each_text(gw, fields):
    assert await texts(gw, "qe", ["a", "b"], **fields) == [QUERY + "a", QUERY + "b"]


async def test_a_document_prompt_that_is_empty_and_no_name_leave_the_text_as_it_is(gw):
    assert await texts(gw, "qe", ["a"], input_type="search_document") == ["a"]
    assert await texts(gw, "qe", ["a"]) == ["a"]


async def test_the_default_prompt_applies_to_texts_only_and_a_name_overrides_it(gw):
    assert await texts(gw, "qd", ["a"]) == [QUERY + "a"]
    assert await texts(gw, "qd", ["a"], prompt_name="document") == ["a"]
    assert await texts(gw, "qd", [[5, 6]]) == [[5, 6]]  # token ids are final


async def test_input_type_on_a_model_without_prompts_embeds_the_text_as_it_is(gw):
    assert await texts(gw, "plain", ["a"], input_type="search_document") == ["a"]


@pytest.mark.parametrize(
    ("model", "fields", "param", "needle"),
    [
        ("qe", {"prompt_name": "passage"}, "prompt_name", "its prompts: document, query"),
        ("qe", {"input_type": "clustering"}, "input_type", "its prompts: document, query"),
        ("plain", {"prompt_name": "query"}, "prompt_name", "its prompts: none"),
        ("qe", {"input_type": "poem"}, "input_type", "is not one of query, document"),
    ],
)
async def test_an_unknown_name_is_a_400_listing_the_known_ones(gw, model, fields, param, needle):
    r = await gw.client.post("/v1/embeddings", json={"model": model, "input": "a", **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]
    assert await gw.store.depth() == {}


async def test_a_named_prompt_with_token_ids_is_a_400(gw):
    r = await gw.client.post(
        "/v1/embeddings", json={"model": "qe", "input": [[1, 2]], "prompt_name": "query"}
    )
    assert r.status_code == 400 and "applies to text inputs" in r.json()["error"]["message"]


async def test_models_show_the_prompts(gw):
    cards = {m["id"]: m for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert cards["qd"]["prompts"] == {"query": QUERY, "document": ""}
    assert cards["qd"]["default_prompt_name"] == "query"
    assert cards["plain"]["prompts"] is None


class EmbedFacts:
    """The engine facts the adverts read, of an embedding model."""

    max_model_len = 128
    vocab_size = 1000
    score_type = "bi-encoder"
    num_labels = 0
    labels = ()

    def token_id(self, token: str) -> int:
        raise AssertionError("an embedding model's advert needs no token ids")


def config(tmp_path: Path, st_config: Any = None, **task: Any) -> Config:
    if st_config is not None:
        text = st_config if isinstance(st_config, str) else json.dumps(st_config)
        (tmp_path / "config_sentence_transformers.json").write_text(text)
    raw = worker_config(models={"m": {"embedding_task": {"supported": True, **task}}})
    raw["generator"]["model_path"] = str(tmp_path)
    return Config.model_validate(raw)


def test_the_worker_advertises_the_checkpoints_prompts_or_its_configs(tmp_path):
    st = {"prompts": {"query": QUERY, "document": ""}, "default_prompt_name": "query"}
    (adv,) = model_adverts(config(tmp_path, st), EmbedFacts())
    assert adv.prompts == st["prompts"] and adv.default_prompt_name == "query"
    (adv,) = model_adverts(config(tmp_path, st, prompts={"q": "q: "}), EmbedFacts())
    assert adv.prompts == {"q": "q: "} and adv.default_prompt_name is None  # the config's
    (adv,) = model_adverts(config(tmp_path, st, prompts={}), EmbedFacts())
    assert adv.prompts == {} and adv.default_prompt_name is None  # none


def test_a_checkpoint_without_the_file_has_no_prompts(tmp_path):
    (adv,) = model_adverts(config(tmp_path), EmbedFacts())
    assert adv.prompts == {} and adv.default_prompt_name is None


def test_bad_prompts_are_config_errors_naming_the_key_or_the_file(tmp_path):
    with pytest.raises(
        ConfigError, match=r'queue\.models\."m"\.embedding_task\.default_prompt_name'
    ):
        model_adverts(config(tmp_path, default_prompt_name="query"), EmbedFacts())
    with pytest.raises(ConfigError, match=r"config_sentence_transformers\.json: not readable"):
        model_adverts(config(tmp_path, "{not json"), EmbedFacts())
    with pytest.raises(ValueError, match="is not one of prompts' names"):
        config(tmp_path, prompts={"q": ""}, default_prompt_name="query")
