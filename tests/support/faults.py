"""FAULT INJECTION for tests: an HTTP proxy between a worker and the real gateway.

``FaultInjectingProxy`` forwards ``/queue/v1/*`` to the gateway and, in ``faults`` mode, answers
a seeded share of calls with 500 or 429, delays others, or forwards a call and then answers 500
anyway (the gateway acted, the worker never hears of it — the hardest case for at-least-once
delivery and idempotent results). In ``down`` mode it refuses connections at the TCP level, as
an unreachable queue does. The real gateway cannot be made to do any of this on demand.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

from devstack import localstack as ls


class FaultInjectingProxy:
    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 7,
        p_500: float = 0.15,
        p_429: float = 0.1,
        p_slow: float = 0.1,
        p_lost: float = 0.05,
        slow_seconds: float = 1.5,
    ):
        self.upstream = upstream
        self.mode = "pass"  # "pass" | "faults"
        self.rng = random.Random(seed)
        self.p = (p_500, p_429, p_slow, p_lost)
        self.slow_seconds = slow_seconds
        self.injected: Counter[str] = Counter()
        self.port = ls.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._http = None  # created in the server's loop
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request) -> Response:
            return await self._handle(path, request)

        self._server: uvicorn.Server | None = None
        self._app = app
        self._thread: threading.Thread | None = None

    async def _handle(self, path: str, request: Request) -> Response:
        fault = "none"
        if self.mode == "faults":
            r = self.rng.random()
            p500, p429, pslow, plost = self.p
            if r < p500:
                fault = "500"
            elif r < p500 + p429:
                fault = "429"
            elif r < p500 + p429 + pslow:
                fault = "slow"
            elif r < p500 + p429 + pslow + plost:
                fault = "lost"
        self.injected[fault] += 1
        if fault == "500":
            return Response('{"error": "injected 500"}', status_code=500)
        if fault == "429":
            return Response(
                '{"error": "injected 429"}', status_code=429, headers={"Retry-After": "0"}
            )
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        body = await request.body()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type")
        }
        up = await self._http.request(request.method, "/" + path, content=body, headers=headers)
        if fault == "lost":
            return Response('{"error": "injected: upstream answer dropped"}', status_code=500)
        return Response(
            up.content, status_code=up.status_code, media_type=up.headers.get("content-type")
        )

    # --- lifecycle: "down" stops the listener so connections are refused ----------------
    def up(self) -> None:
        if self._thread is not None:
            return
        self._server = uvicorn.Server(
            uvicorn.Config(self._app, host="127.0.0.1", port=self.port, log_level="error")
        )
        self._http = None
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.01)

    def down(self) -> None:
        if self._thread is None:
            return
        assert self._server is not None
        self._server.should_exit = True
        self._thread.join(10)
        self._thread = None
        with socket.socket() as s:  # confirm the port refuses connections
            assert s.connect_ex(("127.0.0.1", self.port)) != 0
