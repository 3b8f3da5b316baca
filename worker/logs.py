"""Logging: one line per event; level from ``LOG_LEVEL`` (default INFO); ``LOG_FORMAT=json``
for JSON lines. Inputs, tokens and keys are never logged at INFO."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO


def setup(stream: IO[str] | None = None) -> None:
    """Log to ``stream`` (default: standard error) at ``$LOG_LEVEL``, as text or JSON lines."""
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("LOG_FORMAT", "").lower() == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
