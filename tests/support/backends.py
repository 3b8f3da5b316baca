"""The end-to-end stack on both queue stores: a module that imports these fixtures runs each
of its tests twice, against the session gateway on the memory store and against the one on
the Redis store (each with its own all-MiniLM-L6-v2 worker). Tests read ``gateway``,
``embed_worker``, ``client`` and ``http`` as usual."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import localstack as ls
from tests.support.stack import api_client, openai_client

STORES = ["memory", "redis"]


@pytest.fixture(scope="module", params=STORES)
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def gateway(store: str, request: pytest.FixtureRequest) -> ls.Proc:
    name = "memory_gateway" if store == "memory" else "redis_gateway"
    proc: ls.Proc = request.getfixturevalue(name)
    return proc


@pytest.fixture(scope="module")
def embed_worker(store: str, request: pytest.FixtureRequest) -> ls.Proc:
    name = "memory_embed_worker" if store == "memory" else "redis_embed_worker"
    proc: ls.Proc = request.getfixturevalue(name)
    return proc


@pytest.fixture(scope="module")
def client(gateway: ls.Proc, embed_worker: ls.Proc) -> Any:
    return openai_client(gateway.url, timeout=120)


@pytest.fixture(scope="module")
def http(gateway: ls.Proc, embed_worker: ls.Proc) -> Iterator[httpx.Client]:
    with api_client(gateway.url) as c:
        yield c
