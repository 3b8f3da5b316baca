"""vLLM's engine core in the worker process, stepped by one thread (``engine_core = "thread"``).

vLLM's online server runs its ``EngineCore`` in a process of its own (``AsyncLLM``): every
request is serialised to it over ZeroMQ, every output back, and on a CPU host that process
(and, with vLLM's multiprocess executor, a third one for the model) competes for the same
cores as the worker. Here vLLM's offline engine (``LLMEngine`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=0``: its engine core and model runner in this process) is
driven by a thread: requests reach it in batches through a queue, and the outputs of each
engine step go back to the event loop in one call. Measured on a 2-core host with a tiny BERT
(README "Performance"): about 40 % less CPU per input than ``AsyncLLM`` for the same work.

:class:`ThreadedLLM` offers the part of ``AsyncLLM``'s interface :class:`worker.engine.Engine`
uses (``encode``, ``generate``, ``model_config``, ``vllm_config``, ``get_tokenizer``,
``errored``, ``do_log_stats``, ``shutdown``), so the engine code is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from worker.engine import EngineDead

log = logging.getLogger(__name__)

#: Seconds the engine thread may take to start the engine before :meth:`ThreadedLLM.start`
#: gives up (loading a large checkpoint on CPU takes minutes).
START_TIMEOUT_SECONDS = 1800.0


@dataclass
class _Submit:
    request_id: str
    prompt: Any
    params: Any
    priority: int
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class ThreadedLLM:
    """A vLLM ``LLMEngine`` stepped by a thread of its own; create with :meth:`start`."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[_Submit | str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._stop = False
        self._log_stats = False
        self._pending: dict[str, _Submit] = {}
        self._start_error: BaseException | None = None
        #: Why the engine stopped working (an exception of ``step``), or None.
        self.error: BaseException | None = None
        self.engine: Any = None
        self._thread = threading.Thread(target=self._run_thread, name="vllm-engine", daemon=True)

    @classmethod
    def start(cls, make_engine: Callable[[], Any]) -> ThreadedLLM:
        """Build the engine with ``make_engine()`` (vLLM's ``LLMEngine.from_engine_args``, see
        :func:`llm_engine`) in the engine thread and wait until it is ready; raises what
        building it raised. Made in its own thread, the engine's CPU backend binds that
        thread (and its OpenMP team) to the cores, not the event loop's thread."""
        llm = cls()
        llm._make_engine = make_engine
        llm._thread.start()
        if not llm._ready.wait(START_TIMEOUT_SECONDS):
            raise TimeoutError(f"the vLLM engine did not start in {START_TIMEOUT_SECONDS:.0f} s")
        if llm._start_error is not None:
            raise llm._start_error
        return llm

    _make_engine: Callable[[], Any]

    # --- AsyncLLM's interface, as worker.engine uses it ---------------------------------
    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    @property
    def vllm_config(self) -> Any:
        return self.engine.vllm_config

    def get_tokenizer(self) -> Any:
        return self.engine.get_tokenizer()

    @property
    def errored(self) -> bool:
        """True once the engine failed or its thread ended."""
        return self.error is not None or not self._thread.is_alive()

    async def encode(
        self, prompt: Any, params: Any, request_id: str, priority: int = 0
    ) -> AsyncIterator[Any]:
        """The request's final ``PoolingRequestOutput`` (one item, as ``AsyncLLM.encode``
        yields for a pooling request). Raises what vLLM raises for a bad request
        (``VLLMValidationError``), :class:`~worker.engine.EngineDead` if the engine failed."""
        yield await self._submit(prompt, params, request_id, priority)

    async def generate(
        self, prompt: Any, params: Any, request_id: str, priority: int = 0
    ) -> AsyncIterator[Any]:
        """The request's final ``RequestOutput`` (``output_kind`` is vLLM's default,
        cumulative, so the last output holds everything)."""
        yield await self._submit(prompt, params, request_id, priority)

    async def do_log_stats(self) -> None:
        """Ask the engine thread to log vLLM's stats between two steps."""
        self._log_stats = True
        self._wake.set()

    def shutdown(self) -> None:
        """Stop the thread (requests still in the engine fail with ``EngineDead``) and
        shut the engine down; blocks until done."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    # --- the hand-off ------------------------------------------------------------------
    async def _submit(self, prompt: Any, params: Any, request_id: str, priority: int) -> Any:
        if self.errored:
            raise EngineDead(self._dead_reason())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._inbox.put(_Submit(request_id, prompt, params, priority, future, loop))
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            self._inbox.put(request_id)  # abort it in the engine
            self._wake.set()
            raise

    # --- the engine thread -------------------------------------------------------------
    def _run_thread(self) -> None:
        try:
            self.engine = self._make_engine()
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the engine is dead; every waiter is told
            log.error("the vLLM engine failed: %s: %s", type(e).__name__, e)
            self.error = e
        finally:
            self._fail_pending()
            try:
                self.engine.engine_core.shutdown()
            except Exception:
                log.debug("engine shutdown failed", exc_info=True)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
            if not engine.has_unfinished_requests():
                self._wake.wait()
            self._wake.clear()
            self._take_inbox()
            if self._log_stats:
                self._log_stats = False
                engine.do_log_stats()
            if self._stop or not engine.has_unfinished_requests():
                continue
            finished = [o for o in engine.step() if o.finished]
            self._deliver(finished)

    def _take_inbox(self) -> None:
        """Add every submitted request to the engine (a bad one fails on its own), and abort
        the cancelled ones."""
        engine = self.engine
        failed: list[tuple[_Submit, BaseException]] = []
        while True:
            try:
                got = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(got, str):
                if self._pending.pop(got, None) is not None:
                    engine.abort_request([got])
                continue
            try:
                engine.add_request(got.request_id, got.prompt, got.params, priority=got.priority)
            except Exception as e:  # noqa: BLE001 - vLLM's per-request error, to its caller
                failed.append((got, e))
                continue
            self._pending[got.request_id] = got
        for sub, exc in failed:
            sub.loop.call_soon_threadsafe(_fail, sub.future, exc)

    def _deliver(self, outputs: list[Any]) -> None:
        """Resolve the futures of the finished requests: one call per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for out in outputs:
            sub = self._pending.pop(out.request_id, None)
            if sub is not None:
                by_loop.setdefault(sub.loop, []).append((sub.future, out))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_resolve, pairs)

    def _dead_reason(self) -> str:
        if self.error is None:
            return "the vLLM engine was shut down"
        return f"the vLLM engine failed: {type(self.error).__name__}: {self.error}"

    def _fail_pending(self) -> None:
        rest = list(self._pending.values())
        self._pending.clear()
        while True:
            try:
                got = self._inbox.get_nowait()
            except queue.Empty:
                break
            if not isinstance(got, str):
                rest.append(got)
        for sub in rest:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                sub.loop.call_soon_threadsafe(_fail, sub.future, EngineDead(self._dead_reason()))


def llm_engine(engine_kwargs: dict[str, Any]) -> Callable[[], Any]:
    """What :meth:`ThreadedLLM.start` builds for ``vllm.EngineArgs(**engine_kwargs)``: vLLM's
    ``LLMEngine`` with its engine core and model runner in this process."""

    def make() -> Any:
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        # vLLM's CPU backend keeps its single-process executor only with this set.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return LLMEngine.from_engine_args(EngineArgs(**engine_kwargs))

    return make


def _resolve(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, out in pairs:
        if not future.done():
            future.set_result(out)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
