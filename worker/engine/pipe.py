"""What crosses the pipe between the worker and its engine process
(:mod:`worker.engine.process`): typed messages, pickled, a batch of requests or outputs per
message; finished requests as :class:`WireOutput` (vectors as NumPy arrays, pickled as raw
bytes; a causal LM's last-position logits of the asked ids)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from prometheus_client.metrics_core import Metric

from worker.engine.thread import Submit


@dataclass
class WireOutput:
    """One finished request as the engine process sends it back."""

    request_id: str
    n_prompt: int
    #: A pooling output (float32, any shape), or None for a generate request.
    data: np.ndarray | None = None
    #: A generate request's logits at the last prompt position: token id -> raw logit.
    logprobs: dict[int, float] | None = None


def to_wire(out: Any) -> WireOutput:
    """vLLM's ``PoolingRequestOutput`` / ``RequestOutput`` -> :class:`WireOutput`."""
    n = len(out.prompt_token_ids or [])
    pooled = getattr(out.outputs, "data", None)
    if pooled is not None:
        return WireOutput(out.request_id, n, data=pooled.float().numpy())
    step = out.outputs[0].logprobs[0]
    return WireOutput(out.request_id, n, logprobs={t: float(p.logprob) for t, p in step.items()})


class _Length:
    """Stands in for a request's ``prompt_token_ids`` where only its length is used."""

    def __init__(self, n: int):
        self._n = n

    def __len__(self) -> int:
        return self._n


def from_wire(out: WireOutput) -> Any:
    """A :class:`WireOutput` shaped as vLLM's output, as far as :mod:`worker.engine` reads it:
    ``prompt_token_ids`` (its length), ``outputs.data`` (a torch tensor) or
    ``outputs[0].logprobs[0][id].logprob``."""
    if out.data is not None:
        import torch

        outputs: Any = SimpleNamespace(data=torch.from_numpy(out.data))
    else:
        logprobs = {t: SimpleNamespace(logprob=v) for t, v in (out.logprobs or {}).items()}
        outputs = [SimpleNamespace(logprobs=[logprobs])]
    return SimpleNamespace(
        request_id=out.request_id,
        prompt_token_ids=_Length(out.n_prompt),
        outputs=outputs,
        finished=True,
    )


@dataclass(frozen=True)
class SubmitBatch:
    """Worker -> engine: requests submitted within one event-loop tick."""

    requests: list[Submit]


@dataclass(frozen=True)
class Abort:
    """Worker -> engine: requests whose callers went away."""

    request_ids: list[str]


@dataclass(frozen=True)
class LogStats:
    """Worker -> engine: log vLLM's stats, then send :class:`Metrics`."""


@dataclass(frozen=True)
class SendMetrics:
    """Worker -> engine: send :class:`Metrics` (vLLM records them at every step)."""


@dataclass(frozen=True)
class Stop:
    """Worker -> engine: stop the engine and the process."""


@dataclass(frozen=True)
class Ready:
    """Engine -> worker: the engine started."""


@dataclass(frozen=True)
class Failed:
    """Engine -> worker: the engine could not start (vLLM's own exception, if it pickles)."""

    error: BaseException


@dataclass(frozen=True)
class Outputs:
    """Engine -> worker: the requests an engine step finished."""

    outputs: list[WireOutput]


@dataclass(frozen=True)
class Refused:
    """Engine -> worker: a request vLLM refused, and vLLM's message."""

    request_id: str
    message: str


@dataclass(frozen=True)
class Metrics:
    """Engine -> worker: vLLM's metric families."""

    families: list[Metric]


@dataclass(frozen=True)
class Dead:
    """Engine -> worker: the engine failed."""

    reason: str


ToEngine = SubmitBatch | Abort | LogStats | SendMetrics | Stop
FromEngine = Ready | Failed | Outputs | Refused | Metrics | Dead
