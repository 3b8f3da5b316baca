"""Bearer credentials: client API keys on the client routes, worker tokens on the queue routes.

The two sets are separate: a worker token on a client route, or an API key on a queue route,
is refused with 401. Keys are compared in constant time. The dependencies are ``async``:
FastAPI runs plain ``def`` dependencies in a thread pool, a thread hop per request.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.errors import APIError
from gateway.settings import GatewaySettings

_bearer = HTTPBearer(auto_error=False)


def _matches(token: str, allowed: list[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)


def _settings(request: Request) -> GatewaySettings:
    settings: GatewaySettings = request.app.state.settings
    return settings


async def client_auth(
    request: Request, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Dependency of the client routes; raises APIError(401, ``invalid_api_key``)."""
    settings = _settings(request)
    if cred is None:
        raise APIError(
            401,
            "You didn't provide an API key: use 'Authorization: Bearer KEY'.",
            code="invalid_api_key",
        )
    if _matches(cred.credentials, settings.worker_tokens):
        raise APIError(
            401,
            "Worker tokens are not accepted on client routes; use an API key.",
            code="invalid_api_key",
        )
    if not _matches(cred.credentials, settings.api_keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def worker_auth(
    request: Request, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    """Dependency of the queue routes; raises APIError(401, ``invalid_worker_token``)."""
    settings = _settings(request)
    if cred is not None and _matches(cred.credentials, settings.worker_tokens):
        return
    what = (
        "API keys are not accepted on queue routes"
        if cred is not None and _matches(cred.credentials, settings.api_keys)
        else "a valid worker token is required"
    )
    raise APIError(401, f"Queue routes need a worker token: {what}.", code="invalid_worker_token")
