"""Queue protocol v1 wire models and the vector codec, against independent references."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest
from pydantic import ValidationError

from common.protocol import ItemSpec, WorkItem, decode_vector, encode_vector


def test_vectors_are_base64_of_little_endian_float32():
    values = [1.0, -2.5, 3.1415927, 1e-30, 65504.0]
    wire = encode_vector(np.array(values, dtype=np.float64))  # any float input
    # Reference: the struct module packs little-endian IEEE-754 binary32.
    assert wire == base64.b64encode(struct.pack("<5f", *values)).decode("ascii")
    assert list(decode_vector(wire)) == list(struct.unpack("<5f", struct.pack("<5f", *values)))
    # What the openai SDK does with encoding_format=base64: numpy float32 from the bytes.
    v = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    sdk = np.frombuffer(base64.b64decode(encode_vector(v)), dtype="float32")
    assert np.array_equal(sdk, v)


@pytest.mark.parametrize("bad", ["abc", "AAA=!", base64.b64encode(b"12345").decode()])
def test_bad_vectors_are_refused(bad):
    with pytest.raises(ValueError):
        decode_vector(bad)


def test_item_spec_forbids_unknown_keys():
    """A misspelled key is an error, not silently dropped (it once became None)."""
    with pytest.raises(ValidationError, match="truncate_prompt_token"):
        ItemSpec(model="m", task="embed", text="x", truncate_prompt_token=5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"text": "a", "token_ids": [1]},
        {"fields": {"a": "b"}},  # fields without their template
        {"text": "a", "prompt_template": "{text}"},  # a template without fields
    ],
)
def test_item_spec_has_exactly_one_input(fields):
    with pytest.raises(ValidationError):
        ItemSpec(model="m", task="embed", **fields)


def test_estimated_tokens():
    assert ItemSpec(model="m", task="embed", token_ids=[5, 6, 7]).estimate_tokens() == 3
    assert ItemSpec(model="m", task="embed", text="x" * 40).estimate_tokens() == 12
    assert ItemSpec(model="m", task="embed", text="é" * 20).estimate_tokens() == 12  # UTF-8 bytes
    templated = ItemSpec(
        model="m", task="embed", prompt_template="q: {text}", fields={"text": "y" * 31}
    )
    assert templated.estimate_tokens() == (9 + 31) // 4 + 2


def test_work_item_is_lease_plus_spec():
    item = WorkItem.model_validate_json(
        '{"item_id": "i", "lease_id": "l", "lease_seconds": 30, "attempt": 2, "est_tokens": 4,'
        ' "model": "m", "task": "score", "text": "t", "return_logits": [1, 2], "normalize": false}'
    )
    assert (item.attempt, item.return_logits, item.normalize) == (2, [1, 2], False)
    with pytest.raises(ValidationError):
        WorkItem.model_validate_json(
            '{"item_id": "i", "lease_id": "l", "lease_seconds": 30,'
            ' "model": "m", "task": "embed", "text": "t", "extra": 1}'
        )


def test_the_binary_results_body_carries_what_its_json_twin_does():
    """``RESULTS_BINARY``: a JSON header and the float32 values back to back; decoded, it is
    the ResultsRequest the JSON body would be, vectors bit for bit."""
    from common.protocol import ErrorCode, ItemResult, ResultsRequest
    from common.results_body import decode_results, encode_results

    item = WorkItem(item_id="a", lease_id="1", lease_seconds=30, model="m", task="embed", text="t")
    v = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    results = [
        ItemResult.ok(item, v, 7),
        ItemResult.failed(item.model_copy(update={"item_id": "b"}), ErrorCode.INVALID_INPUT, "no"),
        ItemResult.ok(item.model_copy(update={"item_id": "c"}), np.array([0.5, -1.0]), 3),
    ]
    body = encode_results("w", results)
    assert body[:4] == b"IQR1"
    header = int.from_bytes(body[4:8], "little")
    assert len(body) == 8 + header + 4 * (384 + 2)  # the values, and nothing else
    assert np.array_equal(np.frombuffer(body[8 + header :][: 384 * 4], "<f4"), v)
    json_twin = ResultsRequest(worker_id="w", results=results)
    assert decode_results(body).model_dump() == json_twin.model_dump()


@pytest.mark.parametrize(
    "cut,why",
    [
        (lambda b: b"JSON" + b[4:], "no IQR1"),
        (lambda b: b[:-4], "the header counts 12"),
        (lambda b: b + b"\0\0\0\0", "the header counts 12"),
        (lambda b: b[:8] + b"[" + b[9:], "Invalid JSON"),
    ],
)
def test_a_malformed_binary_results_body_is_refused_saying_why(cut, why):
    from common.protocol import ItemResult
    from common.results_body import decode_results, encode_results

    item = WorkItem(item_id="a", lease_id="1", lease_seconds=30, model="m", task="embed", text="t")
    body = encode_results("w", [ItemResult.ok(item, np.ones(3), 1)])
    with pytest.raises(ValueError, match=why):  # pydantic's ValidationError is a ValueError
        decode_results(cut(body))
