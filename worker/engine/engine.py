"""The engine: one vLLM engine serving one model for one task, where ``generator.engine_core``
says (:mod:`worker.engine.core`), with its input preparation (:mod:`worker.engine.prepare`)
and task runners (:mod:`worker.engine.tasks`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from common.protocol import ItemResult, ScoreType, SparseEmbedding, WorkItem
from worker.config import BGE_M3, GeneratorConfig
from worker.defaults import PREPARE_INLINE_TOKENS
from worker.engine.args import config_object, engine_core_of, engine_kwargs, score_type_of
from worker.engine.core import EngineCore
from worker.engine.errors import InvalidInput
from worker.engine.lora import Adapters
from worker.engine.prepare import Preparer, Prompt
from worker.engine.tasks import Runner
from worker.engine.tokenize import tokenize

log = logging.getLogger("worker.engine")


class Engine:
    """A started vLLM engine core (``AsyncLLM``, :class:`~worker.engine.thread.ThreadedLLM` or
    :class:`~worker.engine.process.ProcessLLM`) serving one model for one task.

    Create with :meth:`start` inside a running event loop; call :meth:`shutdown` before the
    loop ends.
    """

    def __init__(
        self,
        llm: EngineCore,
        gen: GeneratorConfig,
        model_name: str,
        adapters: Adapters | None = None,
    ):
        self.llm: EngineCore | None = llm
        self.gen = gen
        self.model_name = model_name
        self.model_config = llm.model_config
        self.max_model_len: int = llm.model_config.max_model_len
        self._tokenizer: Any = None
        self._preparer: Preparer | None = None
        #: How this engine scores a pair (:data:`~common.protocol.ScoreType`): an embedding
        #: engine's cosine, the causal-LM recipe on the generate runner, or else the type vLLM
        #: gives the checkpoint on the pooling runner (a mismatch with ``generator.score_type``
        #: is reported by :func:`worker.adverts.model_adverts`).
        self.score_type: ScoreType = (
            "bi-encoder"
            if gen.task in ("embed", "embed_sparse")
            else "causal-lm"
            if gen.task == "score" and score_type_of(gen) == "causal-lm"
            else llm.model_config.score_type
        )
        bge_m3 = gen.sparse_architecture() == BGE_M3
        requests = adapters.requests if adapters is not None else None
        self.runner = Runner(
            llm,
            self.score_type,
            self.max_model_len,
            str(gen.model_path),
            model_name,
            bge_m3,
            requests,
        )

    @classmethod
    def start(
        cls, gen: GeneratorConfig, model_name: str, adapters: Adapters | None = None
    ) -> Engine:
        """Start vLLM (takes ~25 s on CPU) where ``generator.engine_core`` says: behind
        ``AsyncLLM``, or vLLM's ``LLMEngine`` in a process of the worker's own
        (:mod:`worker.engine.process`) or in this process (:mod:`worker.engine.thread`), with
        multi-LoRA enabled for ``adapters`` (items run with their model name's adapter).
        Call inside the event loop that will use it. Raises whatever vLLM raises (or a
        RuntimeError with its reason) if it cannot start."""
        lora = adapters.engine_kwargs if adapters is not None else None
        kwargs = {k: config_object(k, v) for k, v in engine_kwargs(gen, lora).items()}
        core = engine_core_of(gen)
        llm: EngineCore
        if core == "process":
            from worker.engine.process import ProcessLLM

            llm = ProcessLLM.start(kwargs, gen.one_thread_step_tokens)
        elif core == "thread":
            from worker.engine.thread import ThreadedLLM, llm_engine

            llm = ThreadedLLM.start(llm_engine(kwargs), gen.one_thread_step_tokens)
        else:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        return cls(llm, gen, model_name, adapters)

    def _core(self) -> EngineCore:
        assert self.llm is not None, "the engine was shut down"
        return self.llm

    @property
    def tokenizer(self) -> Any:
        """The model's (fast) Hugging Face tokenizer, as vLLM loaded it."""
        if self._tokenizer is None:
            self._tokenizer = self._core().get_tokenizer()
        return self._tokenizer

    @property
    def max_num_batched_tokens(self) -> int:
        """Tokens the vLLM scheduler puts into one engine step."""
        return int(self._core().vllm_config.scheduler_config.max_num_batched_tokens)

    @property
    def num_labels(self) -> int:
        """Outputs of a sequence classifier (a cross-encoder reranker has one)."""
        return int(getattr(self.model_config.hf_config, "num_labels", 1) or 1)

    @property
    def labels(self) -> list[str]:
        """A classifier's class labels in index order (``id2label``; ``LABEL_<i>`` where the
        config names none)."""
        id2label = getattr(self.model_config.hf_config, "id2label", None) or {}
        named = {int(k): str(v) for k, v in id2label.items()}
        return [named.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    @property
    def vocab_size(self) -> int:
        """Rows of the model's embedding and logits (valid token ids are below this)."""
        return int(self.model_config.get_vocab_size())

    def token_id(self, token: str) -> int:
        """The id of ``token`` in the model's tokenizer; ValueError if it is not one token."""
        tok = self.tokenizer
        tid = tok.convert_tokens_to_ids(token)
        unk = getattr(tok, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk and token != tok.unk_token):
            ids = tok.encode(token, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{token!r} is not a single token of this tokenizer ({ids})")
            tid = ids[0]
        return int(tid)

    async def log_stats(self) -> None:
        """Update vLLM's own Prometheus metrics (``vllm:*``)."""
        await self._core().do_log_stats()

    @property
    def preparer(self) -> Preparer:
        """This engine's :class:`~worker.engine.prepare.Preparer`: templates truncate by
        default to the longest prompt the engine takes (``max_model_len`` less the
        tokenizer's special tokens, and less the one output token of the scoring runner)."""
        if self._preparer is None:
            tok = self.tokenizer
            room = self.max_model_len - tok.num_special_tokens_to_add(pair=False)
            if self.gen.task == "score" and self.score_type == "causal-lm":
                room -= 1
            # whether a cross-encoder's tokenizer encodes pairs (else: an LLM as a reranker)
            use_sep = self.score_type == "cross-encoder" and bool(self.model_config.use_sep_token)
            self._preparer = Preparer(tok, self.score_type, use_sep, room)
        return self._preparer

    async def prepare(self, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        """Each item's prompt, made for the whole pulled batch in few tokenizer calls
        (:meth:`~worker.engine.prepare.Preparer.prepare`). A batch of at most
        :data:`~worker.defaults.PREPARE_INLINE_TOKENS` estimated tokens is prepared on the
        event loop (a thread hop costs more than its tokenization), a larger one in a worker
        thread: a long text never blocks that loop."""
        preparer = self.preparer
        if sum(item.estimate_tokens() for item in items) <= PREPARE_INLINE_TOKENS:
            return preparer.prepare(items)
        return await asyncio.to_thread(preparer.prepare, items)

    async def tokenize(self, items: list[WorkItem]) -> list[ItemResult]:
        """Each ``tokenize`` item's answer from the model's tokenizer alone, no engine step
        (:func:`~worker.engine.tokenize.tokenize`); off the event loop past
        :data:`~worker.defaults.PREPARE_INLINE_TOKENS` estimated tokens, as :meth:`prepare`."""
        tok = self.tokenizer

        def answer() -> list[ItemResult]:
            return [tokenize(tok, item) for item in items]

        if sum(item.estimate_tokens() for item in items) <= PREPARE_INLINE_TOKENS:
            return answer()
        return await asyncio.to_thread(answer)

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray | SparseEmbedding, int]:
        """Embed or score one item; ``prompt`` is its entry from :meth:`prepare`.

        Returns (float32 vector, prompt token count): the embedding ``[dim]`` (L2-normalised
        unless ``normalize`` is false, first ``dimensions`` components when set), a sparse
        embedding (:class:`~common.protocol.SparseEmbedding`, ``embed_sparse``), the logits
        ``[len(return_logits)]`` at the last position (softmax over them when ``normalize``),
        a pair's score ``[1]``, or a classifier's class probabilities ``[num_labels]`` (logits
        unless ``normalize``). Raises :class:`~worker.engine.errors.InvalidInput` for a bad
        input, :class:`~worker.engine.errors.EngineDead` if vLLM has died."""
        return await self.runner.run(item, prompt)

    async def shutdown(self) -> None:
        """Stop the engine core processes and drop the engine, before the event loop ends
        (vLLM's ``AsyncLLM`` must not outlive it). vLLM's shutdown waits for its processes for
        seconds; it runs in a thread (it cancels its output task thread-safely), so the
        probes keep answering meanwhile."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """:meth:`shutdown`, blocking (outside an event loop, e.g. after a failed start)."""
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    @property
    def alive(self) -> bool:
        """False once the engine core has died (or was shut down)."""
        return self.llm is not None and not self.llm.errored
