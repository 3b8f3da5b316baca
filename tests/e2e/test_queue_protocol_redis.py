"""Queue protocol v1 over HTTP (``tests/unit/test_queue_protocol.py``) on the Redis store: every
test of the unit layer runs again here against the real gateway app on a real redis-server,
with leases and TTLs scaled down to a twentieth, in real time."""

from __future__ import annotations

import pytest

from tests.support import rerun
from tests.support.stack import redis_store_kind
from tests.unit import test_queue_protocol as on_memory
from tests.unit.test_queue_protocol import clock, gw

__all__ = ["clock", "gw"]


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return redis_store_kind(request)


#: The unit layer's tests that run on a store, collected here again (on Redis).
globals().update(rerun(on_memory, {"gw", "store_kind"}))
