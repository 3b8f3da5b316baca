"""A worker of the tests' own that speaks queue protocol v1 over HTTP (no engine): it pulls for
its adverts and answers each input with :func:`vector_of` of its input, so that a test can
drive a real gateway process from outside, as a worker and as an attacker holding a worker
token would."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import numpy as np

#: The model the tests' worker advertises: embeddings, with a vocabulary and a context.
ADVERT: dict[str, Any] = {
    "name": "m",
    "checkpoint_name": "ckpt",
    "tasks": ["embed"],
    "max_model_len": 256,
    "vocab_size": 1000,
}


def vector_of(item: dict[str, Any]) -> list[float]:
    """The answer to an input: [its size, 1, 2, 3] (size: characters of its text or fields,
    or its token ids)."""
    if item.get("text") is not None:
        size = len(item["text"])
    elif item.get("token_ids") is not None:
        size = len(item["token_ids"])
    else:
        size = len(json.dumps(item.get("fields"), ensure_ascii=False))
    return [float(size), 1.0, 2.0, 3.0][: item.get("dimensions") or 4]


def result(item: dict[str, Any], values: list[float], prompt_tokens: int = 1) -> dict[str, Any]:
    """A result for ``item`` (JSON body form)."""
    return {
        "item_id": item["item_id"],
        "lease_id": item["lease_id"],
        "prompt_tokens": prompt_tokens,
        "vector_b64": base64.b64encode(np.array(values, dtype="<f4").tobytes()).decode(),
    }


class QueueWorker:
    """Pulls and answers over HTTP at ``url`` (``/queue/v1``) with ``token``. ``async with``
    serves in the background until the block ends; :meth:`pull` and :meth:`post` are single
    calls. Counts pulls answered with an error status in ``pull_errors``."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        worker_id: str = "w",
        adverts: list[dict[str, Any]] | None = None,
        max_items: int = 64,
        delay: float = 0.0,
    ):
        self.http = httpx.AsyncClient(
            base_url=url + "/queue/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        self.worker_id = worker_id
        self.adverts = adverts or [ADVERT]
        self.max_items = max_items
        self.delay = delay
        self.pull_errors: list[int] = []
        self.answered = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def pull(self, wait: float = 0.5, max_items: int | None = None) -> list[dict[str, Any]]:
        body = {
            "worker_id": self.worker_id,
            "models": self.adverts,
            "max_items": max_items or self.max_items,
            "wait_seconds": wait,
        }
        r = await self.http.post("/pull", json=body)
        if r.status_code != 200:
            self.pull_errors.append(r.status_code)
            return []
        return list(r.json()["items"])

    async def register(self) -> None:
        """One pull that waits for nothing: the gateway knows the adverts' models from now
        (what it happened to take goes back at once)."""
        items = await self.pull(wait=0, max_items=1)
        if items:
            leases = [[i["item_id"], i["lease_id"]] for i in items]
            await self.http.post("/release", json={"worker_id": self.worker_id, "leases": leases})

    async def post(self, results: list[dict[str, Any]]) -> httpx.Response:
        return await self.http.post(
            "/results", json={"worker_id": self.worker_id, "results": results}
        )

    async def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                items = await self.pull()
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
                continue
            if items:
                if self.delay:
                    await asyncio.sleep(self.delay)
                results = [result(i, vector_of(i)) for i in items]
                # A connection the gateway cut (e.g. the idlest one, at its connection limit)
                # is resent on once, as the worker's own client retries transport errors;
                # cut twice, the leases run out and the gateway hands the items out again.
                for _attempt in range(2):
                    try:
                        await self.post(results)
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
                        continue
                    self.answered += len(items)
                    break

    async def __aenter__(self) -> QueueWorker:
        await self.register()
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 35)
        await self.http.aclose()
