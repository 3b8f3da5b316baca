"""Intra-op threads per engine step on a CPU host: a small step runs on one thread.

vLLM's CPU backend runs each engine step's tensor operations on an OpenMP team of all the
cores it binds (``torch.get_num_threads()``). The worker makes idle OpenMP threads sleep
(``OMP_WAIT_POLICY=PASSIVE``, :mod:`worker.cpu_host`), so every parallel region of a step
first wakes the others: a few hundred regions per forward pass. For a step of a few sentences
that wake-up costs more than the second core gains (measured per model and step size in
``docs/cpu-hosts.md``).

So before each step :class:`StepThreads` sets the thread count from the prompt tokens the
step will run: one thread up to ``generator.one_thread_step_tokens``, all of them above.
vLLM's CPU worker replaces ``torch.set_num_threads`` with a function that refuses (threads
must not be added after it bound them to cores); this keeps torch's own function, captured
before the engine starts, and only ever moves between one thread and the count vLLM bound
(never above it); steps on all threads after a switch run as fast as on an engine that never
switched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

E = TypeVar("E")


class StepThreads:
    """The intra-op thread count of each engine step: 1 for a step of at most ``max_tokens``
    prompt tokens, else the count vLLM bound. Create with :meth:`build_engine` in the thread
    that will step the engine, then call :meth:`before_step` (same thread) with the step's
    prompt tokens."""

    def __init__(self, set_threads: Callable[[int], None], max_tokens: int):
        self._set_threads = set_threads
        self.max_tokens = max_tokens
        #: The engine's own thread count (vLLM's binding), read by :meth:`engine_started`.
        self.full = 1
        self.current = 1

    @classmethod
    def build_engine(
        cls, make_engine: Callable[[], E], max_tokens: int | None
    ) -> tuple[E, StepThreads | None]:
        """``make_engine()`` (vLLM's ``LLMEngine``; call in the thread that will step it, which
        vLLM's CPU backend binds to the cores) with torch's ``set_num_threads`` captured
        before it, and the thread count it bound read after it: (engine, its thread policy),
        None as the policy when ``max_tokens`` is None or 0. Raises what ``make_engine``
        raises."""
        threads = cls.before_engine(max_tokens)
        engine = make_engine()
        if threads is not None:
            threads.engine_started()
        return engine, threads

    @classmethod
    def before_engine(cls, max_tokens: int | None) -> StepThreads | None:
        """torch's ``set_num_threads`` captured for steps of at most ``max_tokens`` tokens;
        None when ``max_tokens`` is None or 0 (every step on all threads)."""
        if not max_tokens:
            return None
        import torch

        return cls(torch.set_num_threads, max_tokens)

    def engine_started(self) -> None:
        """Read the thread count vLLM bound (call in the stepping thread, after the engine
        was built)."""
        import torch

        self.full = self.current = torch.get_num_threads()

    def before_step(self, tokens: int) -> None:
        """Set the thread count for a step of ``tokens`` prompt tokens (a no-op when it is
        already right)."""
        self.set(1 if tokens <= self.max_tokens else self.full)

    def set(self, threads: int) -> None:
        """Run the next steps on ``threads`` intra-op threads (1 ... :attr:`full`; a no-op
        when that is the count already)."""
        if threads != self.current:
            self._set_threads(threads)
            self.current = threads


def prompt_tokens(prompt: Any) -> int | None:
    """Token ids in a vLLM prompt given as token ids (``TokensInput``: a mapping with
    ``prompt_token_ids``); None for a prompt of another form (text: unknown until vLLM
    tokenizes it)."""
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, Mapping) else None
    return len(ids) if ids is not None else None
