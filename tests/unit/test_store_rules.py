"""The queue store interface's shared rules (``gateway/queue/store.py``), used by both stores
and mirrored by the Redis scripts: the token budget of a pull (:func:`fits`), the prompt
tokens a result may claim (:func:`prompt_token_limit`) and what a result must hold
(:func:`check_result`). The stores themselves: ``test_queue_store.py``."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from common.protocol import MAX_CHUNKS, ItemResult, ItemSpec, ModelAdvert
from gateway.queue.store import MAX_PROMPT_TOKENS, check_result, fits, prompt_token_limit


@pytest.mark.parametrize(
    ("taken", "tokens", "size", "est", "max_items", "budget", "want"),
    [
        (0, 0, 1, 900, 8, 100.0, True),  # the first input always fits, over budget or not
        (1, 60, 1, 40, 8, 100.0, True),  # exactly at the budget
        (1, 60, 1, 41, 8, 100.0, False),  # one token over
        (7, 0, 1, 1, 8, None, True),  # exactly at max_items
        (7, 0, 2, 1, 8, None, False),  # a part of two would pass it
        (3, 10**9, 5, 10**9, 8, None, True),  # no budget
        (8, 0, 1, 1, 8, None, False),
    ],
)
def test_a_part_fits_a_pull_within_max_items_and_but_for_the_first_the_budget(
    taken, tokens, size, est, max_items, budget, want
):
    assert fits(taken, tokens, size, est, max_items, budget) is want


def advert(max_model_len: int | None) -> ModelAdvert:
    return ModelAdvert(name="m", checkpoint_name="m", tasks=["embed"], max_model_len=max_model_len)


def test_a_result_may_claim_the_context_or_twice_it_for_a_pair():
    one = ItemSpec(model="m", task="embed", text="a")
    pair = ItemSpec(model="m", task="score", text="q", text_pair="d")
    assert prompt_token_limit(one, advert(512)) == 512
    assert prompt_token_limit(pair, advert(512)) == 1024
    assert prompt_token_limit(None, advert(512)) == 512
    assert prompt_token_limit(pair, advert(None)) == MAX_PROMPT_TOKENS
    assert prompt_token_limit(one, None) == MAX_PROMPT_TOKENS
    chunked = ItemSpec(model="m", task="embed", text="a", chunk_tokens=512)
    assert prompt_token_limit(chunked, advert(512)) == 512 * MAX_CHUNKS


def vector(*values: float) -> str:
    return base64.b64encode(np.array(values, dtype="<f4").tobytes()).decode()


@pytest.mark.parametrize(
    ("spec", "values", "ok"),
    [
        (ItemSpec(model="m", task="classify", text="a"), (0.1, 0.2, 0.7), True),  # any length
        (ItemSpec(model="m", task="score", text="q", text_pair="d"), (0.5,), True),
        (ItemSpec(model="m", task="score", text="q", text_pair="d"), (0.5, 0.5), False),
        (ItemSpec(model="m", task="score", text="q", return_logits=[1, 2, 3]), (1, 2, 3), True),
        (ItemSpec(model="m", task="score", text="q", return_logits=[1, 2, 3]), (1, 2), False),
        (ItemSpec(model="m", task="embed", text="a", dimensions=2), (0.6, 0.8), True),
        (ItemSpec(model="m", task="embed", text="a", dimensions=2), (0.6,), False),
    ],
)
def test_a_result_holds_the_values_its_input_asked_for(spec, values, ok):
    result = ItemResult(item_id="i", lease_id="l", vector_b64=vector(*values), prompt_tokens=1)
    checked = check_result(result, spec)
    assert (checked is result) is ok
    if not ok:
        assert checked.error is not None and checked.error.retryable
        assert "values" in checked.error.message


@pytest.mark.parametrize("b64", ["", "AAA", "not base64!", "AAAAAAA="])
def test_a_vector_that_is_not_whole_float32s_is_refused(b64):
    result = ItemResult(item_id="i", lease_id="l", vector_b64=b64, prompt_tokens=1)
    checked = check_result(result, ItemSpec(model="m", task="embed", text="a"))
    assert checked.error is not None and "whole float32" in checked.error.message
