"""What vLLM and its processes print, relayed through the worker's own logging.

vLLM's engine core and model processes inherit the worker's stdout and stderr and print their
own log lines and, when something fails, long tracebacks. :class:`OutputRelay` points file
descriptors 1 and 2 of this process (and so of every process it starts) at a pipe, and a thread
turns each line back into a log record of the ``worker.vllm`` logger:

- vLLM's ``(EngineCore pid=..) INFO 11-23 06:38:34 [core.py:133] message`` lines keep their
  level, without vLLM's own timestamp (``LOG_FORMAT=json`` then covers them too);
- vLLM's ERROR lines and raw Python tracebacks are kept at DEBUG: the worker reports a failed
  start or a dead engine itself, in one line with the root cause (:meth:`root_cause`);
- everything else is INFO.

The worker's own log handler writes to :attr:`stderr`, the original standard error.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from typing import IO

log = logging.getLogger("worker.vllm")

#: vLLM's log format: ``(<process> pid=<pid>) <LEVEL> <mm-dd hh:mm:ss> [<file>:<line>] <msg>``.
_VLLM_LINE = re.compile(
    r"^\((?P<proc>[^)]*)\) (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[(?P<where>[^\]]*)\] ?(?P<msg>.*)$"
)
#: The last line of a Python traceback: ``ValueError: message`` (or a bare exception name).
_EXCEPTION = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?(?:[A-Z]\w*)?(?:Error|Exception|Exit|Interrupt)\b(?::.*)?$"
)
_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


def classify(line: str) -> tuple[int, str, str | None]:
    """One printed line -> (log level, message, exception line or None).

    The exception line is set where the line ends a traceback (``KeyError: 'x'``); such lines
    and the rest of a traceback are DEBUG, as are vLLM's ERROR lines."""
    m = _VLLM_LINE.match(line)
    if m:
        msg = m["msg"]
        level = _LEVELS[m["level"]]
        text = f"({m['proc']}) [{m['where']}] {msg}"
        exc = msg.strip() if _EXCEPTION.match(msg.strip()) else None
        if level >= logging.ERROR:
            level = logging.DEBUG
        return level, text, exc
    stripped = line.strip()
    if _EXCEPTION.match(stripped):
        return logging.DEBUG, line, stripped
    if (
        line[:1].isspace()
        or stripped.startswith("Traceback (most recent call last)")
        or re.match(r"^Process [\w-]+:$", stripped)
    ):
        return logging.DEBUG, line, None
    return logging.INFO, line, None


class OutputRelay:
    """Captures file descriptors 1 and 2 of this process into the ``worker.vllm`` logger.

    Use :attr:`stderr` for the worker's own log handler. :meth:`close` restores both
    descriptors and relays what is left.
    """

    def __init__(self) -> None:
        self._saved_out = os.dup(1)
        self._saved_err = os.dup(2)
        #: The original standard error, for the worker's own log lines.
        self.stderr: IO[str] = os.fdopen(
            os.dup(self._saved_err), "w", buffering=1, encoding="utf-8", errors="replace"
        )
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._exceptions: collections.deque[tuple[float, str]] = collections.deque(maxlen=64)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vllm-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._emit(raw.decode("utf-8", errors="replace").rstrip("\r"))
        if pending:
            self._emit(pending.decode("utf-8", errors="replace"))
        os.close(self._read_fd)

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        level, text, exc = classify(line)
        if exc is not None:
            with self._lock:
                self._exceptions.append((time.monotonic(), exc))
        log.log(level, "%s", text)

    def root_cause(self, since: float = 0.0, wait_seconds: float = 1.0) -> str | None:
        """The first exception line printed by vLLM's processes after ``since`` (a
        ``time.monotonic()`` value); waits up to ``wait_seconds`` for one to arrive."""
        deadline = time.monotonic() + wait_seconds
        while True:
            with self._lock:
                found = [exc for t, exc in self._exceptions if t >= since]
            if found or time.monotonic() >= deadline:
                return found[0] if found else None
            time.sleep(0.05)

    def close(self, timeout: float = 2.0) -> None:
        """Give descriptors 1 and 2 back; relay what the pipe still holds (its last writers
        are this process and any child still alive)."""
        os.dup2(self._saved_out, 1)
        os.dup2(self._saved_err, 2)
        os.close(self._saved_out)
        os.close(self._saved_err)
        self._thread.join(timeout)
