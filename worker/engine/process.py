"""vLLM's offline engine in a process of the worker's own (``engine_core = "process"``), fed
in batches over a pipe.

The engine process runs vLLM's ``LLMEngine`` (engine core and model runner in that process)
under a :class:`~worker.engine.thread.StepLoop`, as ``engine_core = "thread"`` does in the
worker process, but with the worker's own work (HTTP pulls and posts, tokenization) in another
process, so the two do not share one GIL. What crosses the pipe is per batch, not per request:
every request the worker submits within one event-loop tick goes in one message (token ids),
and the finished requests of each engine step come back in one message (their vectors as
NumPy arrays, pickled as raw bytes; a causal LM's last-position logits of the asked ids).
vLLM's ``AsyncLLM`` instead sends each request and each output on its own (ZeroMQ, msgpack)
and keeps an asyncio queue per request.

:class:`ProcessLLM` offers ``AsyncLLM``'s interface as :class:`worker.engine.Engine` uses it.
The engine process ends with the worker: a closed pipe (the worker stopped or died) stops it.
vLLM's own metrics (``vllm:*``), and the engine's busy time
(``inference_worker_engine_busy_seconds_total``, counted where the steps run), are kept in the
engine process and relayed to the worker's default registry at every
:meth:`ProcessLLM.do_log_stats` and before every scrape of the worker's ``/metrics``
(:meth:`RelayedMetrics.refresh`), so a scrape sees the engine's counts as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from worker import metrics
from worker.engine.errors import EngineDead
from worker.engine.pipe import (
    Abort,
    Dead,
    Failed,
    FromEngine,
    LogStats,
    Metrics,
    Outputs,
    Ready,
    Refused,
    SendMetrics,
    Stop,
    SubmitBatch,
    ToEngine,
    from_wire,
    to_wire,
)
from worker.engine.step_threads import StepThreads
from worker.engine.thread import START_TIMEOUT_SECONDS, StepLoop, Submit, environ

log = logging.getLogger(__name__)


class RelayedMetrics(Collector):
    """vLLM's metric families as each engine process last sent them, in the worker's default
    registry (whose ``/metrics`` renames them as it does vLLM's own: :mod:`worker.monitoring`).
    With several engine processes (replicas) a family's samples are merged, each with a label
    ``replica``."""

    def __init__(self) -> None:
        self.sources: dict[int, list[Metric]] = {}
        #: Per source, what asks its engine process for its metrics now.
        self.refreshers: dict[int, Callable[[], Awaitable[None]]] = {}
        self._registered = False

    async def refresh(self) -> None:
        """Ask every engine process for its metrics and wait for the answers (each bounded
        by :data:`METRICS_TIMEOUT_SECONDS`; a late one keeps its last snapshot)."""
        if self.refreshers:
            await asyncio.gather(*(r() for r in list(self.refreshers.values())))

    def attach(self) -> None:
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def collect(self) -> Iterator[Metric]:
        if len(self.sources) == 1:
            yield from next(iter(self.sources.values()))
            return
        merged: dict[str, Metric] = {}
        for replica, families in sorted(self.sources.items()):
            for family in families:
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                into.samples += [
                    s._replace(labels={**s.labels, "replica": str(replica)}) for s in family.samples
                ]
        yield from merged.values()


#: Seconds a scrape waits for an engine process's metrics before serving the last snapshot.
METRICS_TIMEOUT_SECONDS = 2.0
#: The one relay of this process (every engine process reports into it).
RELAYED = RelayedMetrics()
#: Each engine process's key in :data:`RELAYED` (its ``replica`` label), in start order.
_SOURCE_KEYS = itertools.count()


# --- the engine process ------------------------------------------------------------------
def _relayed_families() -> list[Metric]:
    """vLLM's metric families of this (the engine) process, and the engine busy time."""
    busy = metrics.ENGINE_BUSY._name
    return [f for f in REGISTRY.collect() if f.name.startswith("vllm:") or f.name == busy]


def engine_main(
    conn: Connection, vllm_config: Any, one_thread_step_tokens: int | None = None
) -> None:
    """The engine process: build the engine of ``vllm_config``, say ``ready`` or why not, then
    take batches from ``conn`` until it says ``stop`` or closes. Steps of at most
    ``one_thread_step_tokens`` prompt tokens run on one thread
    (:mod:`worker.engine.step_threads`)."""
    try:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core and model here
        from vllm.utils.system_utils import set_process_title

        set_process_title("LLMEngine")  # VLLM::LLMEngine in ps, top and psutil, as vLLM names its
        from vllm.v1.engine.llm_engine import LLMEngine

        engine, threads = StepThreads.build_engine(
            lambda: LLMEngine.from_vllm_config(vllm_config), one_thread_step_tokens
        )
    except BaseException as e:  # noqa: BLE001 - told to the worker, which reports it
        conn.send_bytes(_picklable_failure(e))
        log.debug("engine start failed:\n%s", traceback.format_exc())
        return
    serve(conn, engine, threads)


def _picklable_failure(exc: BaseException) -> bytes:
    """:class:`Failed` pickled, so the worker raises vLLM's own exception (its type names the
    cause in the worker's one ERROR line); a RuntimeError with its first line where the
    exception does not survive pickling."""
    try:
        data = pickle.dumps(Failed(exc))
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - any exception type may refuse to pickle
        first = (str(exc).strip().splitlines() or [""])[0]
        return pickle.dumps(Failed(RuntimeError(f"{type(exc).__name__}: {first}")))


def serve(conn: Connection, engine: Any, threads: StepThreads | None = None) -> None:
    """Say ``ready``, then run ``engine`` (vLLM's ``LLMEngine`` or what offers its stepping
    interface) under a :class:`~worker.engine.thread.StepLoop` on the batches ``conn`` brings,
    until it says ``stop`` or closes; the engine is shut down at the end. The engine process's
    main function after its engine started (and a test's, on a thread)."""
    send_lock = threading.Lock()

    def send(message: FromEngine) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with send_lock:
            conn.send_bytes(data)

    steps = StepLoop(
        engine,
        lambda outs: send(Outputs([to_wire(o) for o in outs])),
        lambda rid, exc: send(Refused(rid, f"{type(exc).__name__}: {exc}")),
        threads,
    )
    send(Ready())

    def read() -> None:
        while True:
            try:
                message: ToEngine = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):  # the worker is gone
                steps.stop()
                return
            match message:
                case SubmitBatch(requests):
                    steps.submit(requests)
                case Abort(request_ids):
                    steps.abort(request_ids)
                case LogStats():
                    steps.log_stats()
                    send(Metrics(_relayed_families()))
                case SendMetrics():  # recorded at every step: read them as they are
                    send(Metrics(_relayed_families()))
                case Stop():
                    steps.stop()
                    return

    threading.Thread(target=read, name="engine-pipe", daemon=True).start()
    try:
        steps.run()
    except BaseException as e:  # noqa: BLE001 - the engine died: the worker is told
        with contextlib.suppress(OSError):
            send(Dead(f"{type(e).__name__}: {e}"))
    finally:
        with contextlib.suppress(Exception):
            engine.engine_core.shutdown()


# --- the worker's side -------------------------------------------------------------------
@dataclass
class _State:
    waiters: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    metrics_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    batch: list[Submit] = field(default_factory=list)
    flush_scheduled: bool = False


class ProcessLLM:
    """The worker's handle on the engine process; create with :meth:`start` inside the event
    loop that will use it."""

    def __init__(self, process: Any, conn: Connection, vllm_config: Any):
        self._process = process
        self._conn = conn
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self._tokenizer: Any = None
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._source = next(_SOURCE_KEYS)
        #: Why the engine process stopped, once it did.
        self.error: str | None = None
        self._closed = False

    @classmethod
    def start(
        cls, engine_kwargs: dict[str, Any], one_thread_step_tokens: int | None = None
    ) -> ProcessLLM:
        """Configure the engine (``vllm.EngineArgs(**engine_kwargs)``, here: its model and
        scheduler configs are what the worker reads), spawn the engine process with that
        config and wait until its engine is ready (blocking; vLLM takes ~25 s on CPU).
        Steps of at most ``one_thread_step_tokens`` prompt tokens run on one thread
        (:mod:`worker.engine.step_threads`; None or 0: all). Raises what vLLM raises for a bad
        configuration, RuntimeError with the engine's own reason if it cannot start."""
        from vllm import EngineArgs

        # The single-process executor (vLLM's CPU backend keeps it only with this set).
        with environ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            vllm_config = EngineArgs(**engine_kwargs).create_engine_config()
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(
            target=engine_main,
            args=(theirs, vllm_config, one_thread_step_tokens),
            name="vllm-engine",
            daemon=True,
        )
        process.start()
        theirs.close()
        if not ours.poll(START_TIMEOUT_SECONDS):
            process.kill()
            raise TimeoutError(f"the vLLM engine did not start in {START_TIMEOUT_SECONDS:.0f} s")
        try:
            answer: FromEngine = pickle.loads(ours.recv_bytes())
        except EOFError:
            process.join(5)
            raise RuntimeError(
                f"the vLLM engine process exited with {process.exitcode} while starting"
            ) from None
        if not isinstance(answer, Ready):
            process.join(10)
            raise answer.error if isinstance(answer, Failed) else RuntimeError(str(answer))
        llm = cls(process, ours, vllm_config)
        llm._attach(asyncio.get_event_loop())
        RELAYED.sources[llm._source] = []
        RELAYED.refreshers[llm._source] = llm.refresh_metrics
        RELAYED.attach()
        return llm

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the engine's messages in a thread of their own (blocking reads of whole
        messages; an event loop's reader callback would see the pipe non-blocking, as uvloop
        makes it) and handle them on ``loop``."""
        self._loop = loop
        threading.Thread(target=self._read, name="engine-pipe", daemon=True).start()

    # --- AsyncLLM's interface, as worker.engine uses it ---------------------------------
    def get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from vllm.tokenizers.registry import cached_tokenizer_from_config

            self._tokenizer = cached_tokenizer_from_config(self.model_config)
        return self._tokenizer

    @property
    def errored(self) -> bool:
        return self.error is not None or self._closed or not self._process.is_alive()

    async def encode(
        self, prompt: Any, params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[Any]:
        """The request's final output (see :func:`from_wire`). Raises ValueError with vLLM's
        message for a request it refuses, :class:`~worker.engine.EngineDead` if the engine
        process failed."""
        yield await self._submit(Submit(request_id, prompt, params, priority, lora_request))

    async def generate(
        self, prompt: Any, params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[Any]:
        yield await self._submit(Submit(request_id, prompt, params, priority, lora_request))

    async def do_log_stats(self) -> None:
        """Ask the engine process to log vLLM's stats and send its metrics."""
        self._send(LogStats())

    async def refresh_metrics(self) -> None:
        """Ask the engine process for its vLLM metrics and wait until they are in
        :data:`RELAYED` (at most :data:`METRICS_TIMEOUT_SECONDS`; nothing to wait for once
        the engine is gone)."""
        if self.errored:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state.metrics_waiters.append(future)
        self._send(SendMetrics())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(future), METRICS_TIMEOUT_SECONDS)

    def shutdown(self) -> None:
        """Stop the engine process and wait for it to exit (blocking, up to 30 s, then
        killed); after the engine failed too, whose process may still be exiting."""
        if not self._closed:
            self.error = "the vLLM engine was shut down"
            with contextlib.suppress(OSError):
                self._conn.send_bytes(pickle.dumps(Stop()))
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._close(self.error or "the vLLM engine was shut down")
        RELAYED.sources.pop(self._source, None)
        RELAYED.refreshers.pop(self._source, None)

    # --- the hand-off ------------------------------------------------------------------
    async def _submit(self, request: Submit) -> Any:
        # Not ``errored`` (a waitpid per request): a process that is gone closes the pipe,
        # and its reader or the send below fails every waiter with EngineDead.
        if self.error is not None or self._closed:
            raise EngineDead(self.error or "the vLLM engine process is gone")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        state = self._state
        state.waiters[request.request_id] = future
        state.batch.append(request)
        if not state.flush_scheduled:  # everything submitted in this tick: one message
            state.flush_scheduled = True
            loop.call_soon(self._flush)
        try:
            return await future
        except asyncio.CancelledError:
            if state.waiters.pop(request.request_id, None) is not None:
                self._send(Abort([request.request_id]))
            raise

    def _flush(self) -> None:
        state = self._state
        state.flush_scheduled = False
        batch, state.batch = state.batch, []
        if batch:
            self._send(SubmitBatch(batch))

    def _send(self, message: ToEngine) -> None:
        if self._closed:
            return
        try:
            self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as e:
            self._close(f"the vLLM engine process is gone ({e})")

    def _read(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._process.join(5)
                reason = f"the vLLM engine process exited (exit code {self._process.exitcode})"
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    loop.call_soon_threadsafe(self._close, reason)
                return
            try:
                loop.call_soon_threadsafe(self._handle, message)
            except RuntimeError:
                return

    def _handle(self, message: FromEngine) -> None:
        waiters = self._state.waiters
        match message:
            case Outputs(outputs):
                for out in outputs:
                    future = waiters.pop(out.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(from_wire(out))
            case Refused(request_id, reason):
                future = waiters.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(ValueError(reason))
            case Metrics(families):
                RELAYED.sources[self._source] = families
                answered, self._state.metrics_waiters = self._state.metrics_waiters, []
                for waiter in answered:
                    if not waiter.done():
                        waiter.set_result(None)
            case Dead(reason):
                log.error("the vLLM engine failed: %s", reason)
                self._close(f"the vLLM engine failed: {reason}")

    def _close(self, reason: str) -> None:
        """The engine is gone: every waiter fails with EngineDead."""
        if self.error is None:
            self.error = reason
            log.warning("%s", reason)
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._conn.close()
        waiters = self._state.waiters
        self._state.waiters = {}
        for future in waiters.values():
            if not future.done():
                future.set_exception(EngineDead(self.error))
