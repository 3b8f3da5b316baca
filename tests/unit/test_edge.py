"""The gateway's edge against hostile or careless clients (fast layer: the real app in
process over ``httpx.ASGITransport``): what a request can cost the gateway is bounded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import FakeClock, InProcessGateway, RawCall, metric, wait_until

#: A pull that makes model ``m`` known (embed and score, with a rerank prompt).
ADVERTISE = {
    "worker_id": "w",
    "models": [
        {
            "name": "m",
            "checkpoint_name": "c",
            "tasks": ["embed", "score"],
            "max_model_len": 128,
            "rerank": {
                "template": "{query} {document}",
                "instruction": "",
                "false_token_id": 0,
                "true_token_id": 1,
            },
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
    assert (await gw.worker.post("/pull", json=ADVERTISE)).status_code == 200
    r = await gw.client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"{where} is not valid Unicode: a lone surrogate")
    assert error["type"] == "invalid_request_error"
    assert await gw.store.depth() == {}


async def test_return_logits_is_capped_in_the_gateway(gw):
    """Finding: ``return_logits`` was not capped in the gateway (the README says 128 ids): a
    300 KB body became one 51 MB pull. Now a 400 before anything is queued."""
    assert (await gw.worker.post("/pull", json=ADVERTISE)).status_code == 200
    ids = list(range(50_000))
    body = {"model": "m", "input": ["x"] * 2048, "return_logits": ids}
    r = await gw.client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_token_ids" and error["param"] == "return_logits"
    assert error["message"] == ("'return_logits' lists 50000 token ids; at most 128 are allowed.")
    assert await gw.store.depth() == {}


BIG = [b'{"model": "m", "input": ["' + b"x" * 1_000_000] * 3 + [b'"]}']


async def test_credentials_are_checked_before_the_body_is_read(gw):
    """Finding: the whole body was read and parsed before the API key was checked (a 205 MB
    request without credentials took the gateway from 65 to 665 MB before its 401)."""
    for path, headers, code in [
        ("/v1/embeddings", {}, "invalid_api_key"),
        ("/v1/embeddings", {"Authorization": "Bearer wrong-key-0123456789"}, "invalid_api_key"),
        ("/queue/v1/pull", {}, "invalid_worker_token"),
    ]:
        call = await RawCall(BIG).run(gw.app, path, headers)
        assert call.status == 401 and call.error()["code"] == code
        assert call.reads == 0  # not a byte of the body was read
        assert call.headers[b"connection"] == b"close"


async def test_every_route_but_the_open_ones_needs_credentials(gw):
    """Default deny: each route of the app (a route added later included) answers 401 without
    credentials, before its body is read, unless it is one of the edge's open paths."""
    from gateway.http.edge import OPEN_PATHS

    # every route, from the app's OpenAPI schema (how FastAPI holds routes differs by version:
    # 0.165 keeps included routers whole), and the schema's own paths
    paths = gw.app.openapi()["paths"]
    routes = {p: {m.upper() for m in ops} for p, ops in paths.items()}
    routes.update({"/openapi.json": {"GET"}, "/docs": {"GET"}, "/redoc": {"GET"}})
    guarded = [(p, m) for p, methods in routes.items() if p not in OPEN_PATHS for m in methods]
    assert ("POST", "/v2/rerank") in {(m, p) for p, m in guarded}  # the peers' paths too
    assert ("POST", "/rerank") in {(m, p) for p, m in guarded}
    for path, method in guarded:
        concrete = path.replace("{file_id}", "file-x").replace("{batch_id}", "batch_x")
        call = await RawCall(BIG).run(gw.app, concrete, {}, method=method)
        assert call.status == 401, (method, path)
        assert call.reads == 0, (method, path)
    assert (await RawCall(BIG).run(gw.app, "/no-such-path", {})).status == 401  # unknown too
    open_ = set(routes) & OPEN_PATHS
    assert {"/healthz", "/readyz", "/metrics"} <= open_
    assert (await gw.client.get("/healthz", headers={"Authorization": ""})).status_code == 200


async def test_every_wrong_credential_gets_the_same_401(gw):
    """A worker token on a client route, an API key on a queue route and a made-up key are
    told apart by nothing: the message does not say which credentials exist."""
    body = {"model": "m", "input": "x"}
    for wrong in (gw.WORKER_TOKEN, "made-up-key-0123456789"):
        r = await gw.client.post("/v1/embeddings", json=body, headers=_bearer(wrong))
        assert (
            r.status_code == 401 and r.json()["error"]["message"] == "Incorrect API key provided."
        )
    for wrong in (gw.API_KEY, "made-up-token-0123456789", None):
        r = await gw.worker.post("/pull", json=ADVERTISE, headers=_bearer(wrong))
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "Queue routes need a valid worker token."


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/embeddings", {"model": "m", "input": ["a", "b"]}),
        ("/v1/rerank", {"model": "m", "query": "q", "documents": ["a", "b"]}),
    ],
)
async def test_a_client_that_goes_away_takes_its_inputs_out_of_the_queue(path, body):
    """The body arrives whole, the inputs are queued, then the client disconnects: the
    gateway takes them out of the queue at once, with no worker ever pulling them."""
    async with InProcessGateway(FakeClock(), pickup_timeout_seconds=600) as g:
        assert (await g.worker.post("/pull", json=ADVERTISE)).status_code == 200
        call = RawCall([json.dumps(body).encode()])
        call.gone = asyncio.Event()
        headers = {"Authorization": f"Bearer {g.API_KEY}", "Content-Type": "application/json"}
        running = asyncio.create_task(call.run(g.app, path, headers))
        await wait_until(lambda: depth_is(g, {"m": 2}), timeout=5, what="inputs queued")
        assert not running.done()
        call.gone.set()
        await asyncio.wait_for(running, 5)
        assert await g.store.depth() == {} and await g.store.leased() == {}
        pulled = await g.worker.post("/pull", json=ADVERTISE)
        assert pulled.json()["items"] == []


async def test_a_disconnect_seen_as_the_answer_arrives_leaves_the_answer_alone():
    """The client's disconnect and its answer come in one turn of the loop, the disconnect
    first: the wait has its answer, and the request goes on (to send it) uncancelled."""
    from gateway.http.disconnect import unless_disconnected

    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    gone = asyncio.Event()

    async def request() -> int:
        result = await unless_disconnected(answer, gone.wait)
        await asyncio.sleep(0.05)  # what follows the wait: sending the answer
        return result

    running = asyncio.create_task(request())
    await asyncio.sleep(0)
    gone.set()  # the watcher ends first; its done callback runs after the request resumes
    answer.set_result(7)
    assert await asyncio.wait_for(running, 5) == 7


async def depth_is(g: InProcessGateway, want: dict[str, int]) -> bool:
    return bool(await g.store.depth() == want)


def near_misses(secret: str) -> list[str]:
    """Credentials one step from ``secret``: its last character changed, one character
    dropped or added at the end, its first character changed, its case changed."""
    last = "0" if secret[-1] != "0" else "1"
    first = "Z" if secret[0] != "Z" else "Y"
    return [secret[:-1] + last, secret[:-1], secret + "x", first + secret[1:], secret.upper()]


async def test_a_credential_one_character_off_is_refused(gw):
    """Every character of a key or token counts, not a prefix of it."""
    body = {"model": "m", "input": "x"}
    for wrong in near_misses(gw.API_KEY):
        r = await gw.client.post("/v1/embeddings", json=body, headers=_bearer(wrong))
        assert r.status_code == 401, wrong
    for wrong in near_misses(gw.WORKER_TOKEN):
        r = await gw.worker.post("/pull", json=ADVERTISE, headers=_bearer(wrong))
        assert r.status_code == 401, wrong
    # the real ones pass the same checks
    assert (await gw.worker.post("/pull", json=ADVERTISE)).status_code == 200
    assert (await gw.client.get("/v1/models")).status_code == 200


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}" if token else ""}


async def test_a_body_over_the_limit_is_413_before_it_is_read():
    async with InProcessGateway(FakeClock(), max_body_bytes=100_000) as g:
        auth = {"Authorization": f"Bearer {g.API_KEY}"}
        declared = await RawCall(BIG).run(
            g.app, "/v1/embeddings", {**auth, "Content-Length": str(3_000_030)}
        )
        assert declared.status == 413 and declared.reads == 0
        assert declared.error() == {
            "message": "The request body is 3000030 bytes; at most 100000 bytes are accepted.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
        chunked = await RawCall(BIG).run(g.app, "/v1/embeddings", auth)  # no Content-Length
        assert chunked.status == 413 and chunked.reads == 1  # stopped at the first 1 MB
        assert chunked.error()["code"] == "request_too_large"
        fine = await g.client.post("/v1/embeddings", json={"model": "m", "input": "x" * 90_000})
        assert fine.status_code != 413


async def test_a_body_that_does_not_arrive_is_408():
    async with InProcessGateway(FakeClock(), body_timeout_seconds=0.3) as g:
        auth = {"Authorization": f"Bearer {g.API_KEY}"}
        t0 = time.monotonic()
        call = await RawCall([b'{"model": "m", "inp'], stall=True).run(
            g.app, "/v1/embeddings", auth
        )
        assert call.status == 408 and call.error()["code"] == "request_timeout"
        assert time.monotonic() - t0 >= 0.25  # after the deadline; a hang fails on the test timeout


async def test_the_body_timeout_ends_with_the_body():
    """A client whose body has arrived waits for its answer as long as the request takes:
    the body timeout does not apply to that wait (the gateway listens for a disconnect)."""
    async with InProcessGateway(
        FakeClock(), body_timeout_seconds=0.2, pickup_timeout_seconds=0.6
    ) as g:
        assert (await g.worker.post("/pull", json=ADVERTISE)).status_code == 200
        auth = {"Authorization": f"Bearer {g.API_KEY}", "Content-Type": "application/json"}
        body = [b'{"model": "m", "input": "x"}']
        call = await RawCall(body, stall=True, complete=True).run(g.app, "/v1/embeddings", auth)
        assert call.status == 503 and call.error()["code"] == "no_worker_available"


async def test_a_scoped_worker_token_serves_only_its_models(tmp_path):
    scoped = "scoped-worker-token-0001"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{scoped} m  # only model m\n")
    async with InProcessGateway(FakeClock(), worker_token_file=str(tokens)) as g:
        other = {**ADVERTISE, "models": [{"name": "n", "checkpoint_name": "c", "tasks": ["embed"]}]}
        r = await g.worker.post("/pull", json=other, headers=_bearer(scoped))
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        assert r.json()["error"]["message"] == "This worker token may not serve 'n'."
        # an item of model n, leased by an unscoped worker: the scoped token cannot answer it
        await g.worker.post("/pull", json=other)  # model n is known
        request = asyncio.create_task(
            g.client.post("/v1/embeddings", json={"model": "n", "input": "x"})
        )
        (item,) = (await g.worker.post("/pull", json={**other, "wait_seconds": 5})).json()["items"]
        result = {
            "item_id": item["item_id"],
            "lease_id": item["lease_id"],
            "prompt_tokens": 1,
            "vector_b64": "AACAPw==",
        }
        post = {"worker_id": "w", "results": [result]}
        r = await g.worker.post("/results", json=post, headers=_bearer(scoped))
        assert r.status_code == 403
        r = await g.worker.post(
            "/release",
            json={"worker_id": "w", "leases": [[item["item_id"], item["lease_id"]]]},
            headers=_bearer(scoped),
        )
        assert r.status_code == 403
        assert (
            await g.worker.post("/pull", json=ADVERTISE, headers=_bearer(scoped))
        ).status_code == 200
        assert (await g.worker.post("/results", json=post)).json()["accepted"] == 1
        assert (await request).status_code == 200


async def test_an_input_longer_than_the_model_can_take_is_a_400_before_it_is_queued(gw):
    """Finding: no cap on a text's length. The cap: the model's max_model_len (128 here)
    times --max-chars-per-token (16)."""
    assert (await gw.worker.post("/pull", json=ADVERTISE)).status_code == 200
    r = await gw.client.post("/v1/embeddings", json={"model": "m", "input": ["ok", "x" * 2049]})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "input[1] has 2049 characters; at most 2048 are accepted for 'm' (its "
        "context length times --max-chars-per-token).",
        "type": "invalid_request_error",
        "param": "input",
        "code": "context_length_exceeded",
    }
    ids = await gw.client.post("/v1/embeddings", json={"model": "m", "input": [[1] * 2049]})
    assert ids.status_code == 400 and "2049 token ids" in ids.json()["error"]["message"]
    fits = await gw.client.post("/v1/embeddings", json={"model": "m", "input": "x" * 2048})
    assert fits.status_code == 503  # queued: no worker took it within the pickup timeout
    assert await gw.store.depth() == {}


async def test_a_rerank_is_bounded_by_its_prompts_in_total():
    """Finding: rerank copies the query into every document (a 110 KB body cost 200 MB)."""
    async with InProcessGateway(
        FakeClock(), pickup_timeout_seconds=0.2, max_rerank_bytes=1_000_000
    ) as g:
        assert (await g.worker.post("/pull", json=ADVERTISE)).status_code == 200
        body = {"model": "m", "query": "q" * 1000, "documents": ["d"] * 1000}
        r = await g.client.post("/v1/rerank", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents"
        assert r.json()["error"]["message"].startswith(
            "The 1000 pairs would total 1019000 characters (the query is repeated in each "
            "pair); at most 1000000 are accepted"
        )
        long_query = {"model": "m", "query": "q" * 2049, "documents": ["d"]}
        r = await g.client.post("/v1/rerank", json=long_query)
        assert r.status_code == 400 and r.json()["error"]["param"] == "query"
        assert await g.store.depth() == {}


# --- what a worker will be handed is checked at the edge (docs/security.md) -----------------

VOCAB_ADVERT = {
    **ADVERTISE,
    "models": [{**ADVERTISE["models"][0], "vocab_size": 1000}],
}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "body,code_or_where",
    [
        ({"input": [{"a": [0, "\ud800"]}], "prompt_template": "{a}"}, "input[0]"),
        ({"input": [{"a": nested(16)}], "prompt_template": "{a}"}, "input[0]"),
        ({"input": {"a": {"b": nested(15)}}, "prompt_template": "{a}"}, "'input'"),
        ({"input": [[5, 1000]]}, "invalid_token_ids"),
        ({"input": [5, 2**80]}, "invalid_token_ids"),
        ({"model": "m" * 257, "input": "x"}, "model"),
    ],
)
async def test_what_no_worker_could_use_is_refused_before_it_is_queued(gw, body, code_or_where):
    assert (await gw.worker.post("/pull", json=VOCAB_ADVERT)).status_code == 200
    raw = json.dumps({"model": "m", **body}).encode()  # \ud800 escaped, as a client may send it
    r = await gw.client.post(
        "/v1/embeddings", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert code_or_where in (error["code"], error["param"]) or error["message"].startswith(
        code_or_where
    ), error
    assert await gw.store.depth() == {}


@pytest.mark.parametrize("number", [b"1e999", b"NaN", b"-Infinity"])
async def test_a_number_that_is_not_finite_is_refused(gw, number):
    assert (await gw.worker.post("/pull", json=VOCAB_ADVERT)).status_code == 200
    body = b'{"model":"m","input":[{"a":' + number + b'}],"prompt_template":"{a}"}'
    r = await gw.client.post(
        "/v1/embeddings", content=body, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not finite" in r.json()["error"]["message"]
    assert await gw.store.depth() == {}


async def test_within_the_bounds_a_structured_input_is_queued_and_handed_out(gw):
    assert (await gw.worker.post("/pull", json=VOCAB_ADVERT)).status_code == 200
    call = asyncio.ensure_future(
        gw.client.post(
            "/v1/embeddings",
            json={"model": "m", "input": [{"a": nested(15)}], "prompt_template": "{a}"},
        )
    )
    pulled = await gw.worker.post("/pull", json={**VOCAB_ADVERT, "wait_seconds": 5})
    (item,) = pulled.json()["items"]
    assert item["fields"] == {"a": nested(15)}
    call.cancel()


async def test_errors_of_starlette_itself_are_in_openais_shape(gw):
    unknown = await gw.client.post("/v1/nothing", json={})
    deep = await gw.client.post(
        "/v1/embeddings",
        content=b"[" * 50_000 + b"]" * 50_000,
        headers={"content-type": "application/json"},
    )
    for r, status in ((unknown, 404), (deep, 400)):
        assert r.status_code == status
        assert sorted(r.json()["error"]) == ["code", "message", "param", "type"], r.text
    assert unknown.json()["error"]["message"] == "Invalid URL (POST /v1/nothing)"


def test_the_connection_budget_evicts_the_idle_longest_and_refuses_only_when_all_serve():
    from gateway.http.connections import Budget

    class Conn:
        def __init__(self, busy: bool = False):
            self.busy, self.closed = busy, False
            self.transport = self

        def serving(self) -> bool:
            return self.busy

        def close(self) -> None:
            self.closed = True

    budget = Budget(3)
    conns = [Conn() for _ in range(3)]
    for c in conns:
        budget.open.add(c)
        budget.idle_now(c)
        assert budget.make_room(c)
    conns[0].busy = True  # serving a request: not evicted
    new = Conn()
    budget.open.add(new)
    budget.idle_now(new)
    assert budget.make_room(new) and conns[1].closed and not conns[0].closed
    budget.forget(conns[1])
    for c in (conns[2], new):
        c.busy = True
    last = Conn()
    budget.open.add(last)
    budget.idle_now(last)
    assert not budget.make_room(last)  # every other connection serves a request
    assert budget.evicted == 1
