"""``inference-gateway``: the reference queue and OpenAI-compatible front door.

Secrets come from the environment: ``GATEWAY_API_KEYS`` and ``GATEWAY_WORKER_TOKENS``
(comma-separated), or the ``--api-key`` / ``--worker-token`` flags (repeatable).
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from pydantic import ValidationError

from gateway.app import GatewaySettings, create_app


def _split(env: str) -> list[str]:
    return [v.strip() for v in os.environ.get(env, "").split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inference-gateway", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], help="client API key (repeatable)")
    p.add_argument("--worker-token", action="append", default=[], help="worker token (repeatable)")
    p.add_argument("--model", action="append", default=[],
                   help="accept requests for this model before a worker advertises it")
    p.add_argument("--lease-seconds", type=float, default=30.0)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--pickup-timeout", type=float, default=30.0,
                   help="503 if no worker takes a request within this many seconds")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--worker-ttl", type=float, default=30.0)
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "info").lower())
    a = p.parse_args(argv)
    try:
        settings = GatewaySettings(
            api_keys=a.api_key or _split("GATEWAY_API_KEYS"),
            worker_tokens=a.worker_token or _split("GATEWAY_WORKER_TOKENS"),
            models=a.model, lease_seconds=a.lease_seconds, max_attempts=a.max_attempts,
            pickup_timeout_seconds=a.pickup_timeout, request_timeout_seconds=a.request_timeout,
            worker_ttl_seconds=a.worker_ttl,
        )
    except ValidationError as e:
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            print(f"inference-gateway: {key}: {err['msg']} (set GATEWAY_API_KEYS / "
                  "GATEWAY_WORKER_TOKENS or the flags)", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level=a.log_level,
                access_log=a.log_level == "debug")
    return 0


if __name__ == "__main__":
    sys.exit(main())
