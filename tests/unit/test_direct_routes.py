"""The client POST routes and the queue routes are direct routes
(:class:`gateway.http.routing.DirectRoute`): FastAPI declares them, the body is validated in
one pydantic-core call and the endpoint called without FastAPI's dependency solving. What a
client or worker sees must not change: the schema, the errors, the metrics' route labels."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import APIRouter, Depends, Request, Response

from gateway.http.routing import DirectRoutes
from tests.support import FakeClock, InProcessGateway, RawCall, metric

MODEL = {"name": "m", "checkpoint_name": "c", "tasks": ["embed"], "max_model_len": 128}


@pytest.fixture
async def gw() -> AsyncIterator[InProcessGateway]:
    async with InProcessGateway(FakeClock(), pickup_timeout_seconds=5) as g:
        await g.advertise([MODEL])
        yield g


@pytest.mark.parametrize(
    "body,where",
    [
        (b'{"model": "m", "input": ["a",', "line 1, column 30"),
        (b'{"model": "m",\n "input": tru}', "line 2, column 11"),
        (b"", "line 1, column 1"),
        (b'{"model": "m", "input": "\xff"}', "JSON"),  # not UTF-8
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    ],
)
async def test_a_body_that_is_not_json_is_a_400_saying_where(gw, body, where):
    before = await gw.metrics()
    r = await gw.client.post(
        "/v1/embeddings", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith("The request body is not valid JSON"), error
    assert where in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert await gw.store.depth() == {}
    # the route label is still the route's template
    count = {"route": "/v1/embeddings", "status": "400"}
    after = await gw.metrics()
    assert metric(after, "inference_gateway_requests_total", **count) == (
        metric(before, "inference_gateway_requests_total", **count) + 1
    )


@pytest.mark.parametrize(
    "route",
    [
        "client /v1/batches",  # FastAPI's route, not a direct one
        "worker /results",  # the results route parses its own (JSON or binary) body
    ],
)
async def test_every_post_route_words_a_body_that_is_not_json_alike(gw, route):
    """Whichever parser meets it (the direct route's, FastAPI's or pydantic-core's), a body
    that is not JSON gets the same 400, saying where."""
    who, path = route.split()
    http = gw.client if who == "client" else gw.worker
    body = b'{"worker_id": "w",\n "x": tru}'
    r = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("The request body is not valid JSON: "), message
    assert "line 2" in message and "column" in message, message
    assert message.endswith("."), message


async def test_a_body_that_does_not_validate_names_the_field(gw):
    for path, body, param in [
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": "many"}, "dimensions"),
        ("/v1/rerank", {"model": "m", "query": "q"}, "documents"),
        ("/embed", {"inputs": 3}, "inputs"),
    ]:
        r = await gw.client.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == param, (path, r.text)
    assert await gw.store.depth() == {}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_the_body_is_json_whatever_its_content_type(gw, content_type):
    """curl's ``-d`` says ``application/x-www-form-urlencoded``: the body is still read as
    JSON (as the OpenAI API does), and the answer is the same."""
    headers = {"content-type": content_type} if content_type else {}

    def vector(item: dict) -> list[float]:
        return [3.0, 4.0]

    call = gw.client.post("/v1/embeddings", content=b'{"model":"m","input":"x"}', headers=headers)
    r, items = await gw.answer_while(call, [MODEL], vector, prompt_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["embedding"] == [3.0, 4.0]
    assert len(items) == 1


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/score", "/v1/classify", "/v2/embed", "/embed"])
async def test_every_inference_route_reads_a_text_plain_body_as_json(gw, path):
    """A body missing a required field, sent as ``text/plain``: the 400 names the field, so
    the body was read as JSON (FastAPI refused it as not an object)."""
    r = await gw.client.post(
        path, content=b'{"model": "m", "truncate": "END"}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] not in (None, "body"), r.text


async def test_the_schema_still_declares_each_routes_body(gw):
    paths = gw.app.openapi()["paths"]

    def body_ref(path: str) -> str:
        content = paths[path]["post"]["requestBody"]["content"]["application/json"]
        return str(content["schema"])

    assert "EmbeddingRequest" in body_ref("/v1/embeddings")
    assert "RerankRequest" in body_ref("/v1/rerank")
    assert "TEIRerankRequest" in body_ref("/rerank")  # the union of both bodies
    assert "CohereEmbedRequest" in body_ref("/v2/embed")
    assert "PullRequest" in body_ref("/queue/v1/pull")
    assert "ResultsRequest" in body_ref("/queue/v1/results")
    assert "get" in paths["/v1/models"] and "get" in paths["/info"]


def test_a_direct_route_takes_body_and_request_or_request_alone():
    async def fine(request: Request) -> Response:
        return Response()

    async def with_a_dependency(request: Request, other: str = Depends(lambda: "x")) -> Response:
        return Response()

    async def no_request(body: dict) -> Response:
        return Response()

    for endpoint, error in ((fine, None), (with_a_dependency, TypeError), (no_request, TypeError)):
        router = APIRouter()
        router.post("/x")(endpoint)
        router.get("/y")(with_a_dependency)  # not POST: left to FastAPI
        if error is None:
            assert list(DirectRoutes(None, [router]).routes) == ["/x"]  # type: ignore[arg-type]
        else:
            with pytest.raises(error, match="takes \\(body, request\\) or \\(request\\)"):
                DirectRoutes(None, [router])  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/queue/v1/results"])
async def test_a_client_gone_before_its_body_arrived_is_no_error(gw, path):
    """Found by the e2e edge test: starlette's ClientDisconnect out of a direct route was an
    "Exception in ASGI application" traceback in the gateway's log."""
    key = gw.WORKER_TOKEN if path.startswith("/queue") else gw.API_KEY
    call = RawCall([b'{"model":'], stall=True)  # more body announced, then the client is gone
    call.gone = asyncio.Event()
    call.gone.set()
    await call.run(gw.app, path, {"Authorization": f"Bearer {key}"})  # raised ClientDisconnect
    assert call.status == 0 and call.body == b""  # no answer started
    assert await gw.store.depth() == {}


def test_the_metric_children_cache_is_the_labelled_child_and_bounded():
    """``gateway.metrics.child`` returns what ``labels()`` returns (the counts land in the
    same series) and holds at most 4,096 children, whatever label values arrive."""
    from gateway import metrics

    assert metrics.child(metrics.QUEUE_WAIT, "m") is metrics.QUEUE_WAIT.labels("m")
    assert metrics.child.cache_info().maxsize == 4096
