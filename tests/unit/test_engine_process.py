"""The pipe between the worker and its engine process (:mod:`worker.engine.process`,
``engine_core = "process"``): both ends as the worker runs them — :class:`ProcessLLM` on the
event loop and :func:`serve` (the engine process's loop) — over a real ``multiprocessing`` pipe
with real pickling, but with the serving end on a thread and a FAKE ``LLMEngine`` (what it does
with batches, refusals, cancellations and a failure is checked without vLLM or a process; the
real engine process runs in the slow tests' embedding and scoring workers)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import Gauge
from prometheus_client.registry import CollectorRegistry

from tests.support import wait_until
from tests.support.fake_llm_engine import FakeLLMEngine as BaseFake
from worker.engine import EngineDead
from worker.engine.pipe import WireOutput, from_wire, to_wire
from worker.engine.process import ProcessLLM, RelayedMetrics, serve

# The engine process hands vLLM's outputs over as torch tensors: torch comes with the cpu or
# gpu extra (vLLM's), not with the test extra alone.
torch = pytest.importorskip("torch", reason="needs torch (the cpu or gpu extra)")
pytestmark = pytest.mark.extras


@dataclass
class Logprob:
    logprob: float


class FakeLLMEngine(BaseFake):
    """FAKE of vLLM's ``LLMEngine`` (:class:`tests.support.fake_llm_engine.FakeLLMEngine`): a
    prompt is a list of numbers, finished as a pooling output (the numbers as float32) or, for
    a prompt starting with -1, a generate output with the last position's logprobs
    {id: id / 10}. It refuses an empty prompt; a prompt [666] kills the engine in its step."""

    def refusal(self, prompt: Any) -> str | None:
        return None if prompt else "the prompt is empty"

    def kills(self, prompt: Any) -> bool:
        return bool(prompt == [666])

    def output(self, request_id: str, prompt: Any) -> Any:
        if prompt[0] == -1:
            logprobs = {t: Logprob(t / 10) for t in prompt[1:]}
            outputs: Any = [SimpleNamespace(logprobs=[logprobs])]
        else:
            outputs = SimpleNamespace(data=torch.tensor(prompt, dtype=torch.float32))
        return SimpleNamespace(
            request_id=request_id, prompt_token_ids=prompt, outputs=outputs, finished=True
        )


class FakeProcess:
    """FAKE of the engine's ``multiprocessing.Process``: the serving thread stands in for it."""

    def __init__(self, thread: threading.Thread):
        self.thread = thread
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.exitcode = 0

    def kill(self) -> None:
        pass


@pytest.fixture
async def engine() -> AsyncIterator[tuple[ProcessLLM, FakeLLMEngine]]:
    fake = FakeLLMEngine()
    ours, theirs = multiprocessing.Pipe()
    thread = threading.Thread(target=serve, args=(theirs, fake), daemon=True)
    thread.start()
    assert ours.poll(10) and ours.recv_bytes()  # "ready"
    config = SimpleNamespace(model_config=None)
    llm = ProcessLLM(FakeProcess(thread), ours, config)
    llm._attach(asyncio.get_running_loop())
    yield llm, fake
    llm.shutdown()
    assert not thread.is_alive() and fake.shut_down


async def _one(llm: ProcessLLM, prompt: list[int], rid: str, lora: Any = None) -> Any:
    async for out in llm.encode(prompt, None, request_id=rid, lora_request=lora):
        return out
    raise AssertionError("no output")


@dataclass(frozen=True)
class Adapter:
    """Stands in for vLLM's ``LoRARequest`` (picklable, compared by value)."""

    name: str
    number: int


async def test_each_request_reaches_the_engine_with_its_lora_adapter(engine):
    """Requests for different adapters (and none) cross in one message, each with its own."""
    llm, fake = engine
    legal, code = Adapter("legal", 1), Adapter("code", 2)
    loras = [legal, None, code, legal]
    await asyncio.gather(*[_one(llm, [i + 1], f"r{i}", lora) for i, lora in enumerate(loras)])
    assert fake.added == [["r0", "r1", "r2", "r3"]]
    assert [fake.loras[f"r{i}"] for i in range(4)] == loras


async def test_requests_of_one_tick_cross_in_one_message_and_come_back_as_sent(engine):
    llm, fake = engine
    prompts = [[i, i + 1, i + 2] for i in range(40)] + [[-1, 7, 9]]
    outs = await asyncio.gather(*[_one(llm, p, f"r{i}") for i, p in enumerate(prompts)])
    assert fake.added[0] == [f"r{i}" for i in range(41)]  # one batch between two steps
    assert [o.request_id for o in outs] == [f"r{i}" for i in range(41)]
    for out, prompt in zip(outs[:40], prompts, strict=False):
        assert out.outputs.data.dtype == torch.float32
        assert out.outputs.data.tolist() == prompt and len(out.prompt_token_ids) == 3
    logprobs = outs[40].outputs[0].logprobs[0]
    assert {t: lp.logprob for t, lp in logprobs.items()} == {7: 0.7, 9: 0.9}
    assert not llm.errored


async def test_a_refused_request_fails_alone(engine):
    llm, _ = engine
    results = await asyncio.gather(_one(llm, [1], "a"), _one(llm, [], "b"), return_exceptions=True)
    assert results[0].outputs.data.tolist() == [1.0]
    assert isinstance(results[1], ValueError) and "empty" in str(results[1])
    assert not llm.errored


async def test_a_cancelled_request_is_aborted_in_the_engine(engine):
    llm, fake = engine
    fake.hold = True
    task = asyncio.ensure_future(_one(llm, [5], "s"))
    await wait_until(lambda: "s" in fake.waiting, timeout=20, what="the request in the engine")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: fake.aborted == ["s"], timeout=20, what="the request aborted")


async def test_an_engine_that_fails_fails_every_waiter_and_later_requests(engine):
    llm, _ = engine
    results = await asyncio.gather(
        _one(llm, [1], "a"), _one(llm, [666], "b"), return_exceptions=True
    )
    assert all(isinstance(r, EngineDead) for r in results), results
    assert llm.errored and "the engine died" in (llm.error or "")
    with pytest.raises(EngineDead):
        await _one(llm, [2], "c")


async def test_an_engine_process_that_exits_fails_its_waiters():
    """The pipe closes under a waiting request (the engine process was killed)."""
    ours, theirs = multiprocessing.Pipe()
    killed = threading.Event()
    process = threading.Thread(target=killed.wait)
    process.start()
    llm = ProcessLLM(FakeProcess(process), ours, SimpleNamespace(model_config=None))
    llm._attach(asyncio.get_running_loop())
    waiting = asyncio.ensure_future(_one(llm, [1], "a"))
    await wait_until(theirs.poll, timeout=20, what="the request sent to the engine process")
    killed.set()
    theirs.close()
    with pytest.raises(EngineDead, match="exited"):
        await asyncio.wait_for(waiting, 20)
    assert llm.errored
    llm.shutdown()


async def test_a_request_after_the_engine_process_is_gone_fails_at_once():
    """Requests submitted after the engine process went away (its pipe closed), before or
    after the pipe's reader saw it: each fails with EngineDead, none waits."""
    ours, theirs = multiprocessing.Pipe()
    gone = threading.Thread(target=lambda: None)
    gone.start()
    gone.join()
    llm = ProcessLLM(FakeProcess(gone), ours, SimpleNamespace(model_config=None))
    theirs.close()
    first = asyncio.ensure_future(_one(llm, [1], "before-the-reader"))  # its send fails
    with pytest.raises(EngineDead):
        await asyncio.wait_for(first, 20)
    llm._attach(asyncio.get_running_loop())
    with pytest.raises(EngineDead):
        await asyncio.wait_for(_one(llm, [2], "after"), 20)
    assert llm.errored
    llm.shutdown()


def test_wire_output_round_trip_keeps_shape_and_dtype():
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = from_wire(WireOutput("x", 4, data=data))
    assert out.outputs.data.shape == (2, 3) and out.outputs.data.dtype == torch.float32
    assert len(out.prompt_token_ids) == 4 and out.finished
    fake = FakeLLMEngine().output("y", [3, 1])
    wire = to_wire(fake)
    assert wire.n_prompt == 2 and wire.data is not None and wire.data.tolist() == [3.0, 1.0]


def _families(value: float) -> list[Any]:
    registry = CollectorRegistry()
    Gauge("vllm:num_requests_running", "Running requests.", registry=registry).set(value)
    return list(registry.collect())


def test_relayed_metrics_pass_one_engine_through_and_label_several_by_replica():
    relay = RelayedMetrics()
    relay.sources[0] = _families(3)

    def samples() -> Iterator[tuple[dict[str, str], float]]:
        for family in relay.collect():
            assert family.name == "vllm:num_requests_running"
            for s in family.samples:
                yield s.labels, s.value

    assert list(samples()) == [({}, 3.0)]
    relay.sources[1] = _families(5)
    assert list(samples()) == [({"replica": "0"}, 3.0), ({"replica": "1"}, 5.0)]


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int):  # pickling re-creates it with one argument: fails
        super().__init__(f"{a} {b}")


def test_a_start_failure_reaches_the_worker_as_vllms_own_exception():
    import pickle

    from worker.engine.pipe import Failed
    from worker.engine.process import _picklable_failure

    failed = pickle.loads(_picklable_failure(ValueError("Available memory on node 0\nmore")))
    assert isinstance(failed, Failed)
    assert type(failed.error) is ValueError and str(failed.error).startswith("Available")
    fallback = pickle.loads(_picklable_failure(_Unpicklable(1, 2))).error
    assert type(fallback) is RuntimeError and str(fallback) == "_Unpicklable: 1 2"


async def test_a_scrape_reads_the_engines_vllm_metrics_as_they_are_now(engine):
    """``/metrics`` calls :meth:`RelayedMetrics.refresh` first: each engine process answers
    with its ``vllm:*`` families as they are (here the serving thread reads this process's
    default registry, where the FAKE engine's gauge is)."""
    from prometheus_client import REGISTRY

    from worker.engine.process import RELAYED

    llm, _ = engine
    gauge = Gauge("vllm:fake_requests_running", "Running requests (FAKE engine).")
    RELAYED.refreshers[llm._source] = llm.refresh_metrics
    try:
        for value in (7.0, 9.0):
            gauge.set(value)
            await RELAYED.refresh()
            families = RELAYED.sources[llm._source]
            assert [s.value for f in families if f.name.startswith("vllm:") for s in f.samples] == [
                value
            ]
    finally:
        REGISTRY.unregister(gauge)
        RELAYED.refreshers.pop(llm._source, None)
        RELAYED.sources.pop(llm._source, None)


async def test_the_engine_processs_busy_time_is_relayed_with_vllms_metrics(engine):
    """The time the engine spends in its steps is counted where they run (the engine process;
    here its serving thread) and reaches the worker's ``/metrics`` through the relay, as
    ``inference_worker_engine_busy_seconds_total``."""
    from worker.engine.process import RELAYED

    llm, fake = engine
    fake.step_seconds = 0.02
    RELAYED.refreshers[llm._source] = llm.refresh_metrics

    async def busy() -> float:
        await RELAYED.refresh()
        return sum(
            s.value
            for f in RELAYED.sources[llm._source]
            if f.name == "inference_worker_engine_busy_seconds"
            for s in f.samples
            if s.name.endswith("_total")
        )

    try:
        before = await busy()
        for i in range(5):  # one step each
            await _one(llm, [i], f"busy{i}")
        assert 5 * 0.02 <= await busy() - before < 5
    finally:
        RELAYED.refreshers.pop(llm._source, None)
        RELAYED.sources.pop(llm._source, None)
