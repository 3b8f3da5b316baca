"""The hand-off between the event loop and vLLM's engine stepped by a thread
(:class:`worker.engine.thread.ThreadedLLM`), with a FAKE ``LLMEngine``: it answers each request
one step after it was added, so that what the thread does with batches, per-request errors,
cancellations and an engine that fails can be checked without vLLM (the real engine runs in
the classifier worker of tests/e2e/test_classify_model.py, ``engine_core = "thread"``)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.fake_llm_engine import FakeLLMEngine as BaseFake
from worker.engine import EngineDead
from worker.engine.step_threads import StepThreads, prompt_tokens
from worker.engine.thread import StepLoop, Submit, ThreadedLLM


@dataclass
class Out:
    request_id: str
    finished: bool = True


class FakeLLMEngine(BaseFake):
    """FAKE of vLLM's ``LLMEngine`` (:class:`tests.support.fake_llm_engine.FakeLLMEngine`):
    it refuses a prompt "bad"; a step with a prompt "boom" in it raises."""

    def refusal(self, prompt: Any) -> str | None:
        return "the prompt is bad" if prompt == "bad" else None

    def kills(self, prompt: Any) -> bool:
        return bool(prompt == "boom")

    def output(self, request_id: str, prompt: Any) -> Out:
        return Out(request_id)


async def _one(llm: ThreadedLLM, prompt: str, rid: str, lora: Any = None) -> Any:
    async for out in llm.encode(prompt, None, request_id=rid, lora_request=lora):
        return out
    raise AssertionError("no output")


async def test_requests_submitted_together_enter_one_step_and_come_back_with_their_ids():
    fake = FakeLLMEngine()
    llm = ThreadedLLM.start(lambda: fake)
    try:
        loras = [("adapter", i % 3) if i % 3 else None for i in range(50)]  # and the base model
        outs = await asyncio.gather(*[_one(llm, f"p{i}", f"r{i}", loras[i]) for i in range(50)])
        assert [o.request_id for o in outs] == [f"r{i}" for i in range(50)]
        assert [fake.loras[f"r{i}"] for i in range(50)] == loras  # each with its LoRA adapter
        # The 50 submissions of one event-loop tick reach the engine between two steps.
        assert len(fake.added[0]) == 50 and fake.steps == 1
        assert fake.thread == "vllm-engine" and not llm.errored
    finally:
        llm.shutdown()
    assert fake.shut_down and llm.errored  # shut down: no longer alive


async def test_a_request_vllm_refuses_fails_alone():
    llm = ThreadedLLM.start(FakeLLMEngine)
    try:
        results = await asyncio.gather(
            _one(llm, "good", "a"), _one(llm, "bad", "b"), return_exceptions=True
        )
        assert results[0].request_id == "a"
        assert isinstance(results[1], ValueError) and "bad" in str(results[1])
        assert not llm.errored
    finally:
        llm.shutdown()


async def test_a_cancelled_request_is_aborted_in_the_engine():
    fake = FakeLLMEngine()
    fake.step = list  # type: ignore[method-assign]  # nothing ever finishes
    llm = ThreadedLLM.start(lambda: fake)
    try:
        task = asyncio.ensure_future(_one(llm, "slow", "s"))
        await wait_until(lambda: "s" in fake.waiting, timeout=20, what="the request in the engine")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: fake.aborted == ["s"], timeout=20, what="the request aborted")
    finally:
        llm.shutdown()


async def test_an_engine_that_fails_fails_every_waiter_and_reports_itself_dead():
    llm = ThreadedLLM.start(FakeLLMEngine)
    try:
        results = await asyncio.gather(
            _one(llm, "ok", "a"), _one(llm, "boom", "b"), return_exceptions=True
        )
        assert all(isinstance(r, EngineDead) for r in results), results
        assert llm.errored and isinstance(llm.error, RuntimeError)
        with pytest.raises(EngineDead):  # and later requests at once
            await _one(llm, "late", "c")
    finally:
        llm.shutdown()


async def test_an_engine_that_cannot_start_raises_from_start():
    def broken() -> Any:
        raise RuntimeError("no memory for the KV cache")

    with pytest.raises(RuntimeError, match="KV cache"):
        ThreadedLLM.start(broken)


class ThreadsSeen(FakeLLMEngine):
    """The FAKE engine above, noting the intra-op thread count each step ran with."""

    def __init__(self, threads: StepThreads) -> None:
        super().__init__()
        self.threads = threads
        self.seen: list[int] = []

    def step(self) -> list[Any]:
        self.seen.append(self.threads.current)
        return super().step()


def test_a_step_of_few_prompt_tokens_runs_on_one_thread_a_larger_one_on_all():
    calls: list[int] = []  # what torch.set_num_threads was asked (a recording stand-in)
    threads = StepThreads(calls.append, max_tokens=128)
    threads.full = threads.current = 4  # as engine_started() reads vLLM's binding
    fake = ThreadsSeen(threads)
    done: queue.SimpleQueue[str] = queue.SimpleQueue()
    steps = StepLoop(
        fake, lambda outs: [done.put(o.request_id) for o in outs], lambda r, e: done.put(r), threads
    )
    thread = threading.Thread(target=steps.run)
    thread.start()

    def step_of(*prompts: Any) -> None:  # one batch, one step, all answered
        steps.submit([Submit(f"r{next(ids)}", p, None) for p in prompts])
        for _ in prompts:
            done.get(timeout=10)

    ids = itertools.count()
    ten = {"prompt_token_ids": list(range(10))}
    try:
        step_of(*[ten] * 12)  # 120 tokens
        step_of(*[ten] * 13)  # 130
        step_of({"prompt_token_ids": list(range(128))})  # 128: still one thread
        step_of("a text prompt")  # its tokens unknown: all threads
        step_of(ten, ten)
        assert fake.seen == [1, 4, 1, 4, 1]
        assert calls == [1, 4, 1, 4, 1]  # set only when the count changes
        assert not steps.running
    finally:
        steps.stop()
        thread.join(10)


def test_prompt_tokens_reads_token_ids_and_nothing_else():
    assert prompt_tokens({"type": "token", "prompt_token_ids": [5, 6, 7]}) == 3
    assert prompt_tokens("text") is None
    assert prompt_tokens({"prompt": "text"}) is None


def test_no_step_threads_when_switched_off():
    assert StepThreads.before_engine(None) is None
    assert StepThreads.before_engine(0) is None


def test_the_time_in_engine_steps_is_counted_as_busy_and_waiting_is_not():
    """``inference_worker_engine_busy_seconds_total`` grows by the time of each step and not
    while the step loop waits for work."""
    from worker import metrics

    fake = FakeLLMEngine()
    fake.step_seconds = 0.03
    done: queue.SimpleQueue[str] = queue.SimpleQueue()
    steps = StepLoop(fake, lambda outs: [done.put(o.request_id) for o in outs], lambda r, e: None)
    thread = threading.Thread(target=steps.run)
    thread.start()
    busy = metrics.ENGINE_BUSY._value.get
    try:
        before = busy()
        for i in range(4):  # one step each
            steps.submit([Submit(f"b{i}", "p", None)])
            done.get(timeout=10)
        stepped = busy() - before
        assert 4 * 0.03 <= stepped < 2
        threading.Event().wait(0.3)  # no work: the loop waits, nothing counted
        assert busy() - before == stepped
    finally:
        steps.stop()
        thread.join(10)
