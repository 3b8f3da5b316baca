"""The gateway fuzzed with schemathesis (property-based, from its own OpenAPI schema) on real
processes: the client routes of the session's gateway with a real vLLM worker behind it, the
queue routes of a gateway of their own (fuzzed pulls would advertise made-up models on the
shared one). Every answer: no 5xx (asserted per request), every error body in OpenAI's shape;
the session gateway's RSS is bounded. A bounded number of examples per operation keeps it to
about a minute."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from common.results_body import RESULTS_BINARY
from devstack import localstack as ls
from tests.support.reports import FAULT_REPORTS

EXAMPLES = 30
#: Requests sent and statuses seen, per gateway ("client", "queue").
SEEN: dict[str, Counter[int]] = {"client": Counter(), "queue": Counter()}


@pytest.fixture(scope="module")
def queue_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Proc]:
    proc = ls.start_gateway(tmp_path_factory.mktemp("fuzz"))
    try:
        yield proc
    finally:
        proc.stop()


# The binary results body (docs/queue-protocol.md) is fuzzed as raw bytes, as octet-stream.
schemathesis.serializer.alias(RESULTS_BINARY, "application/octet-stream")


def _check(kind: str, case: schemathesis.Case, token: str) -> None:
    if case.path.endswith("/pull") and isinstance(case.body, dict):
        # a long poll waits up to 60 s (10 s when not given) for work that never comes here:
        # kept short; wrong types are left to test validation
        wait = case.body.get("wait_seconds", 10.0)
        if isinstance(wait, (int, float)) and not isinstance(wait, bool):
            case.body["wait_seconds"] = min(wait, 0.1)
    response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=120)
    SEEN[kind][response.status_code] += 1
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) == {"message", "type", "param", "code"}, error


def _fuzz(kind: str, url: str, token: str, client_routes: bool) -> list[str]:
    """Every operation of the gateway's schema at ``url`` (client routes or the others),
    :data:`EXAMPLES` generated cases each (hypothesis, through schemathesis' strategies).
    Returns the operations fuzzed."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    done = []
    for result in schema.get_all_operations():
        op = result.ok()
        if _is_client_route(op.path) != client_routes:
            continue

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            _check(kind, case, token)

        run()
        done.append(f"{op.method.upper()} {op.path}")
    return done


def _is_client_route(path: str) -> bool:
    """A route clients call with an API key: not the queue's, the probes or /metrics."""
    return not path.startswith("/queue/") and path not in {"/metrics", "/healthz", "/readyz"}


def _report(kind: str, done: list[str], extra: str = "") -> None:
    seen = SEEN[kind]
    FAULT_REPORTS.append(
        f"fuzz {kind} routes (schemathesis, {EXAMPLES} examples per operation, "
        f"{len(done)} operations): {sum(seen.values())} requests, "
        f"{sum(n for s, n in seen.items() if s >= 500)} 5xx; statuses {dict(seen)}{extra}"
    )


def test_fuzzed_client_routes(gateway: ls.Proc, embed_worker: ls.Proc) -> None:
    """With the real worker behind the session gateway; its RSS stays bounded."""
    before = psutil.Process(gateway.pid).memory_info().rss / 2**20
    done = _fuzz("client", gateway.url, ls.API_KEY, client_routes=True)
    after = psutil.Process(gateway.pid).memory_info().rss / 2**20
    _report("client", done, f"; session gateway RSS {before:.0f} -> {after:.0f} MB")
    assert set(done) == {
        "POST /v1/embeddings",
        "POST /v1/rerank",
        "POST /v1/score",
        "POST /v1/classify",
        "GET /v1/models",
        "POST /v1/files",
        "GET /v1/files",
        "GET /v1/files/{file_id}",
        "GET /v1/files/{file_id}/content",
        "DELETE /v1/files/{file_id}",
        "POST /v1/batches",
        "GET /v1/batches",
        "GET /v1/batches/{batch_id}",
        "POST /v1/batches/{batch_id}/cancel",
        "POST /rerank",
        "POST /v2/rerank",
        "POST /v2/embed",
        "POST /v1/embed",
        "POST /embed",
        "POST /embed_sparse",
        "POST /predict",
        "POST /",
        "GET /info",
        "POST /tokenize",
        "POST /decode",
    }
    assert sum(SEEN["client"].values()) >= 3 * 5  # the examples were sent
    assert after - before < 100


def test_fuzzed_queue_and_operator_routes(queue_gateway: ls.Proc) -> None:
    done = _fuzz("queue", queue_gateway.url, ls.WORKER_TOKEN, client_routes=False)
    _report("queue", done)
    assert "POST /queue/v1/pull" in done and "GET /metrics" in done
    assert sum(SEEN["queue"].values()) >= len(done) * 5
