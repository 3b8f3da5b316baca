"""Direct routes: the hot POST routes (the client routes, the queue routes) served by one plain
ASGI layer instead of FastAPI's per-request machinery.

FastAPI declares these routes (paths, body schemas at ``/openapi.json``) and could serve them
as they are. Per request it reads a JSON body through ``json.loads``, validates the dict with
pydantic, solves the endpoint's dependencies, opens two exit stacks and passes the router's
middleware: much of the gateway's CPU per one-input request (figures: ``docs/benchmarks.md``,
"The hot routes served directly"). :class:`DirectRoutes` reads the body, validates it in one
pydantic-core call, calls the same endpoint and sends its response. It relies on the ASGI spec
and on ``APIRouter.routes`` alone, not on how a FastAPI version routes.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_response, invalid_body, invalid_json


class DirectRoute:
    """One POST route, called as ``await endpoint(body, request)``: ``body`` is the request's
    JSON body validated as the endpoint's first parameter's type (a pydantic model or a union
    of them), whatever the ``Content-Type``. An endpoint that reads its own body (another
    encoding) takes ``(request)`` alone. Raises ``TypeError`` for any other signature (the
    endpoint must not need FastAPI's dependency injection)."""

    def __init__(self, route: APIRoute):
        self.route = route
        endpoint = route.endpoint
        hints = typing.get_type_hints(endpoint)
        params = list(inspect.signature(endpoint).parameters)
        if not 1 <= len(params) <= 2 or hints.get(params[-1]) is not Request:
            raise TypeError(
                f"{route.path}: a direct route's endpoint takes (body, request) or (request)"
            )
        self.endpoint: Callable[..., Awaitable[Response]] = endpoint
        self.body: TypeAdapter[Any] | None = None
        if len(params) == 2:
            self.body = TypeAdapter(hints[params[0]])

    async def __call__(self, request: Request) -> Response:
        if self.body is None:
            return await self.endpoint(request)
        return await self.endpoint(self.parse(await request.body()), request)

    def parse(self, raw: bytes) -> Any:
        """The body validated; raises :class:`~gateway.errors.APIError` 400 if it is not JSON
        (:func:`gateway.errors.invalid_json`) or does not validate (naming the field:
        :func:`gateway.errors.invalid_body`, from pydantic's first error)."""
        assert self.body is not None
        try:
            return self.body.validate_json(raw)
        except ValidationError:
            pass
        # Parsed again as FastAPI parses, so that the error names the field: JSON that is not
        # Unicode (a lone surrogate) fails pydantic-core's parser as a whole.
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise invalid_json(e) from None
        try:
            return self.body.validate_python(data)
        except ValidationError as e:
            raise invalid_body(e.errors()[0]) from None


class DirectRoutes:
    """ASGI middleware: a POST to one of ``routers``' POST routes is served by its
    :class:`DirectRoute`; every other request goes on to ``app``. Sets ``scope["route"]`` to
    the FastAPI route, as FastAPI's router does (the request metrics' ``route`` label). A
    client gone before its body arrived gets no answer and leaves no traceback. Errors
    are rendered by :func:`gateway.errors.error_response`, as the app's exception handlers
    render them; any other exception goes on to the app's outermost handler (a 500, logged).
    Sits inside :class:`gateway.http.edge.Edge`: credentials and body limits come first."""

    def __init__(self, app: ASGIApp, routers: Sequence[APIRouter]):
        self.app = app
        self.routes: dict[str, DirectRoute] = {}
        for router in routers:
            for route in router.routes:
                if isinstance(route, APIRoute) and route.methods == {"POST"}:
                    # the first route of a path wins, as in FastAPI's router
                    self.routes.setdefault(route.path, DirectRoute(route))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        direct = None
        if scope["type"] == "http" and scope["method"] == "POST":
            direct = self.routes.get(scope["path"])
        if direct is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = direct.route
        try:
            response = await direct(Request(scope, receive, send))
        except ClientDisconnect:  # gone before its body was read: no one to answer
            return
        except Exception as e:
            failed = error_response(e)
            if failed is None:
                raise
            response = failed
        await response(scope, receive, send)
