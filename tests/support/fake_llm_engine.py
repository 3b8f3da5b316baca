"""A FAKE of vLLM's ``LLMEngine`` as :class:`worker.engine.thread.StepLoop` drives it, for the
fast tests of the two engine cores that step it (``thread`` and ``process``)."""

from __future__ import annotations

import threading
import time
from typing import Any


class FakeLLMEngine:
    """FAKE of vLLM's ``LLMEngine``: ``add_request`` refuses a prompt :meth:`refusal` names a
    reason for (as vLLM's validation does, per request); each ``step`` finishes what was
    added before it (an :meth:`output` each), unless ``hold`` is set; a step with a prompt
    :meth:`kills` says yes to raises (an engine that died). Subclasses say which prompts."""

    def __init__(self) -> None:
        self.added: list[list[str]] = []  # request ids added between two steps
        self.batch: list[str] = []
        self.waiting: dict[str, Any] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.step_seconds = 0.0  # each step takes this long (the busy-time tests)
        self.hold = False  # nothing finishes
        self.shut_down = False
        self.thread: str | None = None  # the thread that added the last request
        self.engine_core = self  # LLMEngine.engine_core.shutdown()
        self.loras: dict[str, Any] = {}  # request id -> the LoRA request it was added with

    def refusal(self, prompt: Any) -> str | None:
        raise NotImplementedError

    def kills(self, prompt: Any) -> bool:
        raise NotImplementedError

    def output(self, request_id: str, prompt: Any) -> Any:
        raise NotImplementedError

    def add_request(
        self,
        request_id: str,
        prompt: Any,
        params: Any,
        lora_request: Any = None,
        priority: int = 0,
    ) -> str:
        self.thread = threading.current_thread().name
        self.loras[request_id] = lora_request
        reason = self.refusal(prompt)
        if reason is not None:
            raise ValueError(reason)
        self.batch.append(request_id)
        self.waiting[request_id] = prompt
        return request_id

    def abort_request(self, request_ids: list[str]) -> None:
        self.aborted += request_ids
        for rid in request_ids:
            self.waiting.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    def step(self) -> list[Any]:
        self.steps += 1
        time.sleep(self.step_seconds)
        if self.batch:
            self.added.append(self.batch)
            self.batch = []
        if self.hold:
            return []
        if any(self.kills(p) for p in self.waiting.values()):
            raise RuntimeError("the engine died")
        done = [self.output(rid, p) for rid, p in self.waiting.items()]
        self.waiting.clear()
        return done

    def do_log_stats(self) -> None:
        pass

    def shutdown(self) -> None:
        self.shut_down = True
