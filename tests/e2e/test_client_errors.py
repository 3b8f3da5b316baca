"""Bad input gets the documented status and OpenAI-shaped error; the worker keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from devstack import localstack as ls

# Every test here runs on both queue stores (the session gateways on memory and on Redis).
from tests.support.backends import client, embed_worker, gateway, http, store  # noqa: F401
from tests.support.stack import MODEL


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_empty_input_list(http):
    err = _error(http.post("/v1/embeddings", json={"model": MODEL, "input": []}), 400)
    assert err["param"] == "input" and "empty" in err["message"]


def test_empty_string(http):
    err = _error(http.post("/v1/embeddings", json={"model": MODEL, "input": ["ok", ""]}), 400)
    assert "input[1]" in err["message"]


def test_over_long_text_names_token_count_and_limit(http, reference):
    text = "word " * 400
    n = reference.n_tokens([text])[0]
    err = _error(http.post("/v1/embeddings", json={"model": MODEL, "input": ["fine", text]}), 400)
    assert err["code"] == "context_length_exceeded"
    assert f"{n} tokens" in err["message"] and "256" in err["message"]
    assert err["message"].startswith("input[1]")


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no-such-model", input="hi")
    assert e.value.body["code"] == "model_not_found"


def test_wrong_api_key(gateway, embed_worker):
    from openai import OpenAI

    bad = OpenAI(base_url=gateway.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=MODEL, input="hi")


def test_worker_token_refused_on_client_routes(gateway):
    r = httpx.post(
        gateway.url + "/v1/embeddings",
        json={"model": MODEL, "input": "x"},
        headers={"Authorization": f"Bearer {ls.WORKER_TOKEN}"},
    )
    err = _error(r, 401)
    assert err["message"] == "Incorrect API key provided."  # as for any wrong key


def test_api_key_refused_on_queue_routes(gateway):
    body = {
        "worker_id": "w",
        "models": [{"name": MODEL, "checkpoint_name": MODEL, "tasks": ["embed"]}],
        "max_items": 1,
        "wait_seconds": 0,
    }
    r = httpx.post(
        gateway.url + "/queue/v1/pull", json=body, headers={"Authorization": f"Bearer {ls.API_KEY}"}
    )
    err = _error(r, 401)
    assert err["message"] == "Queue routes need a valid worker token."  # as for any wrong one
    r = httpx.post(gateway.url + "/queue/v1/pull", json=body)
    assert _error(r, 401)["message"] == err["message"]


def test_2049_inputs(http):
    err = _error(http.post("/v1/embeddings", json={"model": MODEL, "input": ["a"] * 2049}), 400)
    assert "2049" in err["message"] and "2048" in err["message"]


def test_2048_inputs_are_fine(http):
    r = http.post(
        "/v1/embeddings",
        json={"model": MODEL, "input": ["tiny input"] * 2048, "encoding_format": "base64"},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2048


def test_bad_encoding_format(http):
    err = _error(
        http.post("/v1/embeddings", json={"model": MODEL, "input": "x", "encoding_format": "int8"}),
        400,
    )
    assert err["param"] == "encoding_format"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": "x"}, "model"),
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": [1, "a"]}, "input"),
        ({"model": MODEL, "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_malformed_bodies(http, body, param):
    err = _error(http.post("/v1/embeddings", json=body), 400)
    assert err["param"] == param


def test_worker_keeps_serving_after_bad_input(http, client, embed_worker):
    """Bad input of its own first (whatever ran before): each refused, then served."""
    for body in (
        {"model": MODEL, "input": ["ok", ""]},
        {"model": MODEL, "input": "x" * 100_000},
        {"model": MODEL, "input": [1, "a"]},
        {"model": MODEL, "input": "x", "dimensions": 0},
    ):
        assert http.post("/v1/embeddings", json=body).status_code == 400
    resp = client.embeddings.create(model=MODEL, input=["still alive", "yes"])
    assert len(resp.data) == 2
    assert embed_worker.popen.poll() is None
    assert httpx.get(embed_worker.url + "/livez").status_code == 200
