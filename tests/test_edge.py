"""The gateway's edge against hostile or careless clients (fast layer: the real app in
process over ``httpx.ASGITransport``): what a request can cost the gateway is bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import FakeClock, InProcessGateway, metric

#: A pull that makes model ``m`` known (embed and score, with a rerank prompt).
ADVERTISE = {
    "worker_id": "w",
    "models": [
        {
            "name": "m",
            "checkpoint_name": "c",
            "tasks": ["embed", "score"],
            "rerank": {"template": "{query} {document}", "false_token_id": 0, "true_token_id": 1},
        }
    ],
    "max_items": 1,
    "wait_seconds": 0,
}


@pytest.fixture
async def gw() -> AsyncIterator[InProcessGateway]:
    async with InProcessGateway(FakeClock(), pickup_timeout_seconds=0.2) as g:
        yield g


async def test_made_up_paths_share_one_route_label(gw):
    """Finding: the ``route`` label was the raw path (1,500 made-up paths grew /metrics from
    5 KB to 2.5 MB). Labels come from route templates; unknown paths share ``unmatched``."""
    await gw.client.get("/v1/models")
    before = await gw.metrics()
    for i in range(300):
        assert (await gw.client.get(f"/v1/made-up-{i}")).status_code == 404
    after = await gw.metrics()
    assert "made-up" not in after
    assert (
        metric(after, "inference_gateway_requests_total", route="unmatched", status="404")
        - metric(before, "inference_gateway_requests_total", route="unmatched", status="404")
        == 300
    )
    assert len(after) - len(before) < 2_000  # one new label set, not 300
    assert metric(after, "inference_gateway_requests_total", route="/v1/models") >= 1


@pytest.mark.parametrize(
    "path,body,where",
    [
        ("/v1/embeddings", b'{"model":"m","input":["fine","bad \\ud800 text"]}', "input[1]"),
        (
            "/v1/embeddings",
            b'{"model":"m","input":[{"a":"\\ud800"}],"prompt_template":"{a}"}',
            "input[0]",
        ),
        (
            "/v1/embeddings",
            b'{"model":"m","input":"x","prompt_template":"{text}\\udfff"}',
            "'prompt_template'",
        ),
        ("/v1/embeddings", b'{"model":"m\\ud800","input":"x"}', "'model'"),
        ("/v1/rerank", b'{"model":"m","query":"q","documents":["a","\\ud800"]}', "documents[1]"),
        ("/v1/rerank", b'{"model":"m","query":"\\ud800","documents":["a"]}', "'query'"),
    ],
)
async def test_a_lone_surrogate_is_a_400_naming_the_input_and_nothing_is_queued(
    gw, path, body, where
):
    """Finding: a lone surrogate (valid JSON, not Unicode) was a plain-text 500 and the
    request's earlier inputs stayed orphaned in the queue."""
    await gw.worker.post("/pull", json=ADVERTISE)
    r = await gw.client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"{where} is not valid Unicode: a lone surrogate")
    assert error["type"] == "invalid_request_error"
    assert await gw.store.depth() == {}


async def test_return_logits_is_capped_in_the_gateway(gw):
    """Finding: ``return_logits`` was not capped in the gateway (the README says 128 ids): a
    300 KB body became one 51 MB pull. Now a 400 before anything is queued."""
    await gw.worker.post("/pull", json=ADVERTISE)
    ids = list(range(50_000))
    body = {"model": "m", "input": ["x"] * 2048, "return_logits": ids}
    r = await gw.client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_token_ids" and error["param"] == "return_logits"
    assert error["message"] == ("'return_logits' lists 50000 token ids; at most 128 are allowed.")
    assert await gw.store.depth() == {}
