"""Bearer credentials: client API keys on the client routes (``/v1/...``), worker tokens on the
queue routes (``/queue/v1/...``), checked by :class:`gateway.http.edge.Edge` from the request's
headers before any of its body is read.

The two sets are separate: a worker token on a client route, or an API key on a queue route,
is refused with the same 401 as any wrong credential. Keys are compared in constant time. A
worker token may be scoped to models (``--worker-token-file`` lines ``TOKEN MODEL ...``): its
pulls, results and releases for other models are refused with 403.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from gateway.errors import APIError
from gateway.settings import GatewaySettings, read_secrets_file

#: The answer to a wrong credential on the client routes, whatever was wrong about it.
WRONG_API_KEY = "Incorrect API key provided."
#: The answer to a missing or wrong credential on the queue routes.
WRONG_WORKER_TOKEN = "Queue routes need a valid worker token."


def _matches(token: str, allowed: list[str]) -> bool:
    return any(hmac.compare_digest(token.encode(), a.encode()) for a in allowed)


@dataclass(frozen=True)
class WorkerScope:
    """What a worker token may serve: ``models`` (None: every model)."""

    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check(self, models: list[str]) -> None:
        """Raises APIError(403, ``model_not_allowed``) for the first model outside the scope."""
        for model in models:
            if not self.allows(model):
                raise APIError(
                    403,
                    f"This worker token may not serve '{model}'.",
                    type="permission_error",
                    code="model_not_allowed",
                )


@dataclass
class Credentials:
    """The gateway's API keys and worker tokens (from flags, environment and files)."""

    api_keys: list[str]
    worker_tokens: dict[str, WorkerScope] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: GatewaySettings) -> Credentials:
        """From ``settings`` (the files read now; :class:`GatewaySettings` validated them)."""
        keys = list(settings.api_keys)
        if settings.api_key_file:
            keys += [key for key, _ in read_secrets_file(settings.api_key_file)]
        tokens = {t: WorkerScope() for t in settings.worker_tokens}
        if settings.worker_token_file:
            for token, models in read_secrets_file(settings.worker_token_file):
                tokens[token] = WorkerScope(frozenset(models) if models else None)
        return cls(keys, tokens)

    def client(self, authorization: str | None) -> None:
        """Check a client route's ``Authorization`` header; raises APIError(401,
        ``invalid_api_key``)."""
        token = bearer_token(authorization)
        if token is None:
            raise APIError(
                401,
                "You didn't provide an API key: use 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )
        if not _matches(token, self.api_keys):
            raise APIError(401, WRONG_API_KEY, code="invalid_api_key")

    def worker(self, authorization: str | None) -> WorkerScope:
        """Check a queue route's ``Authorization`` header; returns the token's scope; raises
        APIError(401, ``invalid_worker_token``)."""
        token = bearer_token(authorization)
        if token is not None:
            for known, scope in self.worker_tokens.items():
                if hmac.compare_digest(token.encode(), known.encode()):
                    return scope
        raise APIError(401, WRONG_WORKER_TOKEN, code="invalid_worker_token")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
