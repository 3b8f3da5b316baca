"""Client inputs -> queue entries, and the 400s the gateway gives before queueing anything."""

from __future__ import annotations

import pytest

from common.protocol import ModelAdvert, RerankSpec
from gateway.api.inputs import (
    check_logit_ids,
    embedding_specs,
    input_fields,
    pair_score,
    pair_specs,
)
from gateway.api.models import MAX_INPUTS, EmbeddingRequest
from gateway.errors import APIError


@pytest.mark.parametrize(
    "value,want",
    [
        ("one", [{"text": "one"}]),
        (["a", "b"], [{"text": "a"}, {"text": "b"}]),
        ([1, 2, 3], [{"token_ids": [1, 2, 3]}]),  # one token array
        ([[1, 2], [3]], [{"token_ids": [1, 2]}, {"token_ids": [3]}]),
    ],
)
def test_openai_input_forms(value, want):
    assert input_fields(value, None) == want


def test_templates_turn_strings_and_objects_into_fields():
    assert input_fields("q", "t: {text}") == [
        {"prompt_template": "t: {text}", "fields": {"text": "q"}}
    ]
    assert input_fields({"a": 1}, "{a}") == [{"prompt_template": "{a}", "fields": {"a": 1}}]
    assert len(input_fields([{"a": 1}, {"a": 2}], "{a}")) == 2


@pytest.mark.parametrize(
    "value,template,param,needle",
    [
        ([], None, "input", "must not be empty"),
        (["ok", ""], None, "input", "input[1] is an empty string"),
        ([[1], []], None, "input", "input[1] is an empty token array"),
        ([{"a": 1}, {}], "{a}", "input", "input[1] is an empty object"),
        (["x"] * (MAX_INPUTS + 1), None, "input", f"at most {MAX_INPUTS}"),
        ([[1, -2]], None, "input", "input[0] has a negative token id"),
        ({"a": 1}, None, "input", "'prompt_template'"),
        ([[1, 2]], "{text}", "prompt_template", "token-id input"),
    ],
)
def test_bad_inputs(value, template, param, needle):
    with pytest.raises(APIError) as e:
        input_fields(value, template)
    assert e.value.status == 400 and e.value.body.param == param
    assert needle in e.value.body.message


def test_normalize_defaults_follow_the_task():
    """Embeddings are L2-normalised by default; selected logits are raw unless asked."""
    req = EmbeddingRequest(model="m", input="x")
    assert embedding_specs(req, "embed")[0].normalize is True
    logits = EmbeddingRequest(model="m", input="x", return_logits=[1])
    assert embedding_specs(logits, "score")[0].normalize is False
    asked = EmbeddingRequest(model="m", input="x", return_logits=[1], normalize=True)
    assert embedding_specs(asked, "score")[0].normalize is True


def test_a_template_that_does_not_compile_is_refused_before_queueing():
    with pytest.raises(APIError) as e:
        embedding_specs(EmbeddingRequest(model="m", input="x", prompt_template="{% if %}"), "embed")
    assert (
        e.value.body.param == "prompt_template" and e.value.body.code == "invalid_prompt_template"
    )


def test_pair_specs_use_the_models_prompt_or_the_requests():
    spec = RerankSpec(
        template="Q: {query} D: {document} I: {instruction}",
        instruction="judge",
        false_token_id=3,
        true_token_id=7,
    )
    causal = ModelAdvert(
        name="m", checkpoint_name="c", tasks=["score"], score_type="causal-lm", rerank=spec
    )
    specs = pair_specs("m", [("q", "d1"), ("q", "d2")], causal)
    assert [s.fields for s in specs] == [
        {"query": "q", "document": "d1", "instruction": "judge"},
        {"query": "q", "document": "d2", "instruction": "judge"},
    ]
    assert all(
        s.prompt_template == spec.template and s.return_logits == [3, 7] and s.normalize
        for s in specs
    )
    own = pair_specs("m", [("q", "d")], causal, template="{query}|{document}")
    assert own[0].prompt_template == "{query}|{document}"
    legacy = causal.model_copy(update={"score_type": None})  # a worker from before score types
    assert pair_specs("m", [("q", "d")], legacy)[0].return_logits == [3, 7]
    cross = ModelAdvert(name="m", checkpoint_name="c", tasks=["score"], score_type="cross-encoder")
    pair = pair_specs("m", [("q", "d")], cross, normalize=False, truncate=9)[0]
    assert (pair.text, pair.text_pair, pair.return_logits, pair.normalize) == (
        "q",
        "d",
        None,
        False,
    )
    assert pair.truncate_prompt_tokens == 9 and pair.estimate_tokens() == 2


def test_a_pairs_score_from_its_vector():
    assert pair_score([0.25], causal=False, normalize=True) == 0.25
    assert pair_score([0.2, 0.8], causal=True, normalize=True) == 0.8  # P(true)
    assert pair_score([1.0, 3.5], causal=True, normalize=False) == 2.5  # log-odds


def test_logit_ids_are_checked_against_the_vocabulary():
    advert = ModelAdvert(name="m", checkpoint_name="c", tasks=["score"], vocab_size=100)
    check_logit_ids([0, 99], advert)
    with pytest.raises(APIError, match=r"outside the vocabulary \(size 100\): \[100\]"):
        check_logit_ids([5, 100], advert)
    with pytest.raises(APIError, match="at least one"):
        check_logit_ids([], advert)
