"""vLLM's offline engine (``LLMEngine``) stepped by a thread: in the worker process
(``engine_core = "thread"``, :class:`ThreadedLLM`), or in a process of the worker's own
(``engine_core = "process"``, :mod:`worker.engine.process`, which runs the same
:class:`StepLoop`).

vLLM's online server runs its ``EngineCore`` behind ``AsyncLLM`` (``engine_core =
"asyncllm"``): every request is serialised to the engine-core process over ZeroMQ on its own,
every output back, and each request has its own asyncio queue in the frontend. Here the
engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: engine core and model runner in one process) is
driven by a loop of ours: requests reach it in batches, and the finished outputs of each
engine step leave it together, which costs less CPU per input (``docs/cpu-hosts.md``).

:class:`ThreadedLLM` offers the part of ``AsyncLLM``'s interface :class:`worker.engine.Engine`
uses (``encode``, ``generate``, ``model_config``, ``vllm_config``, ``get_tokenizer``,
``errored``, ``do_log_stats``, ``shutdown``), so the engine code is the same for all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from worker import metrics
from worker.engine.errors import EngineDead
from worker.engine.step_threads import StepThreads, prompt_tokens

log = logging.getLogger(__name__)

#: Seconds the engine may take to start before :meth:`ThreadedLLM.start` gives up (loading a
#: large checkpoint on CPU takes minutes).
START_TIMEOUT_SECONDS = 1800.0
#: Prompt tokens a request counts for in the size of an engine step (:class:`StepThreads`)
#: when its prompt is not token ids: enough for all threads.
UNKNOWN_PROMPT_TOKENS = 1 << 20


@dataclass
class Submit:
    """One request for the engine: vLLM's ``add_request`` arguments."""

    request_id: str
    prompt: Any
    params: Any
    priority: int = 0
    #: vLLM's ``LoRARequest`` of the adapter to apply (None: the base model).
    lora_request: Any = None


class StepLoop:
    """Drives a vLLM ``LLMEngine`` from one thread (:meth:`run`): requests given to
    :meth:`submit` (from any thread) enter the engine between two steps, all those given
    meanwhile together; the finished outputs of each step go to ``on_finished`` in one call; a
    request vLLM refuses goes to ``on_refused`` (request id, exception) and fails alone."""

    def __init__(
        self,
        engine: Any,
        on_finished: Callable[[list[Any]], None],
        on_refused: Callable[[str, Exception], None],
        threads: StepThreads | None = None,
    ):
        self.engine = engine
        self._on_finished = on_finished
        self._on_refused = on_refused
        self._threads = threads
        self._inbox: queue.SimpleQueue[list[Submit] | list[str]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._log_stats = False
        #: Request ids in the engine now -> their prompt tokens (a prompt not given as token
        #: ids counts as a large step).
        self.running: dict[str, int] = {}
        self._busy = metrics.count_engine_busy()

    def submit(self, requests: list[Submit]) -> None:
        self._inbox.put(requests)
        self._wake.set()

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(request_ids)
        self._wake.set()

    def log_stats(self) -> None:
        """Log vLLM's stats between two steps."""
        self._log_stats = True
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def run(self) -> None:
        """Step the engine until :meth:`stop`; raises what the engine raises (it is dead)."""
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
            if self._threads is not None:
                self._threads.before_step(sum(self.running.values()))
            started = time.perf_counter()
            finished = [o for o in engine.step() if o.finished]
            self._busy.inc(time.perf_counter() - started)
            for out in finished:
                self.running.pop(out.request_id, None)
            if finished:
                self._on_finished(finished)

    def _take_inbox(self) -> None:
        engine = self.engine
        while True:
            try:
                got = self._inbox.get_nowait()
            except queue.Empty:
                return
            for entry in got:
                if isinstance(entry, str):  # an abort
                    if entry in self.running:
                        del self.running[entry]
                        engine.abort_request([entry])
                    continue
                try:
                    engine.add_request(
                        entry.request_id,
                        entry.prompt,
                        entry.params,
                        lora_request=entry.lora_request,
                        priority=entry.priority,
                    )
                except Exception as e:  # noqa: BLE001 - vLLM's per-request error, to its caller
                    self._on_refused(entry.request_id, e)
                    continue
                tokens = prompt_tokens(entry.prompt)
                self.running[entry.request_id] = UNKNOWN_PROMPT_TOKENS if tokens is None else tokens


@dataclass
class _Waiter:
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class ThreadedLLM:
    """A vLLM ``LLMEngine`` in this process, stepped by a thread of its own (a
    :class:`StepLoop`); create with :meth:`start`."""

    def __init__(
        self, make_engine: Callable[[], Any], one_thread_step_tokens: int | None = None
    ) -> None:
        self._make_engine = make_engine
        self._one_thread_step_tokens = one_thread_step_tokens
        self._ready = threading.Event()
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._start_error: BaseException | None = None
        self._steps: StepLoop | None = None
        #: Requests submitted in this event-loop tick, handed to the engine together at its end
        #: (so that they enter one step); touched only by the event loop's thread.
        self._pending: list[Submit] = []
        #: Why the engine stopped working (an exception of ``step``), or None.
        self.error: BaseException | None = None
        self.engine: Any = None
        self._thread = threading.Thread(target=self._run_thread, name="vllm-engine", daemon=True)

    @classmethod
    def start(
        cls, make_engine: Callable[[], Any], one_thread_step_tokens: int | None = None
    ) -> ThreadedLLM:
        """Build the engine with ``make_engine()`` (vLLM's ``LLMEngine.from_engine_args``, see
        :func:`llm_engine`) in the engine thread and wait until it is ready; raises what
        building it raised. Made in its own thread, the engine's CPU backend binds that
        thread (and its OpenMP team) to the cores, not the event loop's thread. Steps of at
        most ``one_thread_step_tokens`` prompt tokens run on one thread
        (:mod:`worker.engine.step_threads`; None or 0: all)."""
        llm = cls(make_engine, one_thread_step_tokens)
        llm._thread.start()
        if not llm._ready.wait(START_TIMEOUT_SECONDS):
            raise TimeoutError(f"the vLLM engine did not start in {START_TIMEOUT_SECONDS:.0f} s")
        if llm._start_error is not None:
            raise llm._start_error
        return llm

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
        self, prompt: Any, params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[Any]:
        """The request's final ``PoolingRequestOutput`` (one item, as ``AsyncLLM.encode``
        yields for a pooling request). Raises what vLLM raises for a bad request
        (``VLLMValidationError``), :class:`~worker.engine.EngineDead` if the engine failed."""
        yield await self._submit(Submit(request_id, prompt, params, priority, lora_request))

    async def generate(
        self, prompt: Any, params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[Any]:
        """The request's final ``RequestOutput`` (``output_kind`` is vLLM's default,
        cumulative, so the last output holds everything)."""
        yield await self._submit(Submit(request_id, prompt, params, priority, lora_request))

    async def do_log_stats(self) -> None:
        if self._steps is not None:
            self._steps.log_stats()

    def shutdown(self) -> None:
        """Stop the thread (requests still in the engine fail with ``EngineDead``) and
        shut the engine down; blocks until done."""
        if self._steps is not None:
            self._steps.stop()
        if self._thread.is_alive():
            self._thread.join()

    # --- the hand-off ------------------------------------------------------------------
    async def _submit(self, request: Submit) -> Any:
        if self.errored or self._steps is None:
            raise EngineDead(self._dead_reason())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._waiters[request.request_id] = _Waiter(future, loop)
        if not self._pending:  # the first of this tick: all of them go at its end
            loop.call_soon(self._flush)
        self._pending.append(request)
        try:
            return await future
        except asyncio.CancelledError:
            with self._lock:
                self._waiters.pop(request.request_id, None)
            if request in self._pending:  # not handed over yet
                self._pending.remove(request)
            else:
                self._steps.abort([request.request_id])
            raise

    def _flush(self) -> None:
        """Hand this tick's requests to the engine thread in one batch."""
        batch, self._pending = self._pending, []
        if batch and self._steps is not None:
            self._steps.submit(batch)

    def _finished(self, outputs: list[Any]) -> None:
        """Resolve the futures of the finished requests: one call per event loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        with self._lock:
            for out in outputs:
                waiter = self._waiters.pop(out.request_id, None)
                if waiter is not None:
                    by_loop.setdefault(waiter.loop, []).append((waiter.future, out))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_resolve, pairs)

    def _refused(self, request_id: str, exc: Exception) -> None:
        with self._lock:
            waiter = self._waiters.pop(request_id, None)
        if waiter is not None:
            waiter.loop.call_soon_threadsafe(_fail, waiter.future, exc)

    # --- the engine thread -------------------------------------------------------------
    def _run_thread(self) -> None:
        try:
            self.engine, threads = StepThreads.build_engine(
                self._make_engine, self._one_thread_step_tokens
            )
            self._steps = StepLoop(self.engine, self._finished, self._refused, threads)
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._start_error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._steps.run()
        except BaseException as e:  # noqa: BLE001 - the engine is dead; every waiter is told
            log.error("the vLLM engine failed: %s: %s", type(e).__name__, e)
            self.error = e
        finally:
            self._fail_waiters()
            try:
                self.engine.engine_core.shutdown()
            except Exception:
                log.debug("engine shutdown failed", exc_info=True)

    def _dead_reason(self) -> str:
        if self.error is None:
            return "the vLLM engine was shut down"
        return f"the vLLM engine failed: {type(self.error).__name__}: {self.error}"

    def _fail_waiters(self) -> None:
        with self._lock:
            rest = list(self._waiters.values())
            self._waiters.clear()
        for waiter in rest:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                waiter.loop.call_soon_threadsafe(
                    _fail, waiter.future, EngineDead(self._dead_reason())
                )


@contextlib.contextmanager
def environ(key: str, value: str | None) -> Iterator[None]:
    """``os.environ[key] = value`` while the block runs (``None``: left as it is); vLLM reads
    such settings when an engine is configured or started."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


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
