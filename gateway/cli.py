"""``inference-gateway``: the reference queue and OpenAI-compatible front door.

Every setting is a flag or a ``GATEWAY_*`` environment variable (:mod:`gateway.settings`);
secrets are best given in the environment: ``GATEWAY_API_KEYS`` and ``GATEWAY_WORKER_TOKENS``
(comma-separated). Exit 2 for bad settings.
"""

from __future__ import annotations

import sys

import uvicorn

from gateway.app import create_app
from gateway.settings import parse


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level == "debug",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
