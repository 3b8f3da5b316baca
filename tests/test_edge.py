"""The gateway's edge against hostile or careless clients (fast layer: the real app in
process over ``httpx.ASGITransport``): what a request can cost the gateway is bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support import FakeClock, InProcessGateway, metric


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
