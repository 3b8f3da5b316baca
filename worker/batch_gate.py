"""How much batch-job work (``priority`` 1) the worker lets into the vLLM engine at once.

vLLM does not interrupt an engine step: an interactive input that arrives while the engine
runs a step of batch work waits for that step. So while interactive inputs flow (one was
pulled within ``quiet_seconds``), batch inputs enter the engine only up to
``tokens_beside_interactive`` estimated tokens at a time: every step holds little batch work
and an interactive input waits about one short step (vLLM's priority scheduling puts it ahead
of the batch inputs waiting in the engine). Once interactive traffic has been quiet that long,
batch work may fill the worker's whole capacity again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable


class BatchGate:
    """Admission of batch inputs to the engine (see the module)."""

    def __init__(
        self,
        tokens_beside_interactive: int,
        quiet_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tokens_beside_interactive = tokens_beside_interactive
        self.quiet_seconds = quiet_seconds
        self._clock = clock
        self._last_interactive = float("-inf")
        self._tokens = 0  # estimated tokens of batch inputs in the engine now
        self._changed = asyncio.Condition()

    @property
    def busy(self) -> bool:
        """True while interactive inputs flow."""
        return self._clock() - self._last_interactive < self.quiet_seconds

    def saw_interactive(self) -> None:
        self._last_interactive = self._clock()

    def _admits(self, tokens: int) -> bool:
        if not self.busy:
            return True
        # At least one batch input at a time, so that batch work always moves.
        return self._tokens == 0 or self._tokens + tokens <= self.tokens_beside_interactive

    @contextlib.asynccontextmanager
    async def admit(self, tokens: int) -> AsyncIterator[None]:
        """Wait until a batch input of ``tokens`` estimated tokens may enter the engine, and
        count it there until the block ends."""
        async with self._changed:
            while not self._admits(tokens):
                # Re-checked when batch work leaves, and when the interactive traffic may
                # have gone quiet.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=self.quiet_seconds)
            self._tokens += tokens
        try:
            yield
        finally:
            async with self._changed:
                self._tokens -= tokens
                self._changed.notify_all()
