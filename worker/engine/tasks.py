"""The task runners: one prepared input through vLLM to the vector the worker posts.

``embed``: the pooling runner's ``embed`` task; ``embed_sparse``: that task on a SPLADE
model, the vocabulary's non-zero weights; ``token_embed``: its per-token vectors;
``classify``: its ``classify`` task on a
sequence classifier, the class logits (their softmax by default); ``score``, by the engine's
score type: ``causal-lm`` — the generate runner with ``logprobs_mode="raw_logits"`` and one
output token, ``SamplingParams(logprob_token_ids=...)`` returning the raw logits of the asked
ids at the last prompt position (every request may ask for its own ids); ``cross-encoder`` —
the ``classify`` task on the pair (its token type ids compressed as vLLM's score API does);
``late-interaction`` — ``token_embed`` on each text, MaxSim; ``bi-encoder`` — ``embed`` on
each text, cosine."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from common.protocol import MAX_LOGIT_IDS, ErrorCode, ScoreType, SparseEmbedding, WorkItem
from worker.engine.core import EngineCore
from worker.engine.errors import EngineDead, InvalidInput, refusal
from worker.engine.prepare import ChunkedPrompt, PairPrompt, Prompt

#: The pooling task each pair score type runs in vLLM (``vllm.tasks.SCORE_TYPE_MAP``).
PoolingTask = Literal["classify", "token_embed", "embed"]
POOLING_TASK: dict[str, PoolingTask] = {
    "cross-encoder": "classify",
    "late-interaction": "token_embed",
    "bi-encoder": "embed",
}
#: Numbers vLLM request ids apart (an item's retry in this worker gets a new one).
_REQUEST_NUMBERS = itertools.count()


class Runner:
    """Runs items on ``core`` for an engine of ``score_type``, each with the LoRA adapter its
    model name has in ``adapters`` (model name -> vLLM ``LoRARequest``; absent or None: the
    base model); vLLM's refusals name the model as clients call it (``model_name``), not its
    path."""

    def __init__(
        self,
        core: EngineCore,
        score_type: ScoreType,
        max_model_len: int,
        model_path: str,
        model_name: str,
        bge_m3: bool = False,
        adapters: Mapping[str, Any] | None = None,
    ):
        self.core, self.score_type, self.max_model_len = core, score_type, max_model_len
        self.model_path, self.model_name = model_path, model_name
        self.adapters: Mapping[str, Any] = adapters or {}
        #: Sparse embeddings from BGE-M3's lexical head, not a SPLADE's vocabulary weights.
        self.bge_m3 = bge_m3
        #: A query's embedding being computed, shared by the pairs that have that query:
        #: (model name, pooling task, token ids) -> its output.
        self._shared: dict[tuple[str, str, tuple[int, ...]], asyncio.Future[Any]] = {}

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray | SparseEmbedding, int]:
        """(float32 vector or sparse embedding, prompt token count); see
        :meth:`worker.engine.Engine.run`."""
        if isinstance(prompt, PairPrompt):
            return await self.score_pair(item, prompt)
        if isinstance(prompt, ChunkedPrompt):
            return await self.embed_chunks(item, prompt)
        return await _ONE_INPUT[item.task](self, item, prompt)

    async def embed(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        _check_dimensions(item)
        params = _vllm().PoolingParams(
            task="embed", dimensions=item.dimensions, use_activation=item.normalize
        )
        out = await self._encode(item, prompt, params)
        vec = out.outputs.data.float().numpy()
        return vec, len(out.prompt_token_ids)

    async def embed_sparse(self, item: WorkItem, prompt: list[int]) -> tuple[SparseEmbedding, int]:
        """A SPLADE model's sparse embedding: vLLM's ``embed`` task on
        ``BertSpladeSparseEmbeddingModel`` gives the vocabulary's weights ``[vocab_size]``
        (``log(1 + relu(logits))`` max-pooled over the tokens); their non-zero entries."""
        if self.bge_m3:
            return await self.lexical_weights(item, prompt)
        out = await self._encode(item, prompt, _vllm().PoolingParams(task="embed"))
        weights = out.outputs.data.float().numpy()
        return SparseEmbedding.from_dense(weights), len(out.prompt_token_ids)

    async def lexical_weights(
        self, item: WorkItem, prompt: list[int]
    ) -> tuple[SparseEmbedding, int]:
        """BGE-M3's sparse embedding, as FlagEmbedding computes it: vLLM's ``token_classify``
        task gives each token's weight (``relu(sparse_linear(hidden))``, the BOS and EOS
        positions left out); per token id the largest positive weight, the tokenizer's
        CLS / EOS / SEP / PAD / UNK left out."""
        out = await self._encode(item, prompt, _vllm().PoolingParams(task="token_classify"))
        weights = out.outputs.data.float().numpy().reshape(-1).tolist()
        bos, eos, unused = self._lexical_ids
        ids = list(prompt)
        if ids and ids[0] == bos:
            ids = ids[1:]
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        if len(ids) != len(weights):
            raise RuntimeError(f"{len(weights)} token weights for {len(ids)} tokens")
        best: dict[int, float] = {}
        for tid, weight in zip(ids, weights, strict=True):
            if tid not in unused and weight > best.get(tid, 0.0):
                best[tid] = weight
        return SparseEmbedding.of(list(best), list(best.values())), len(out.prompt_token_ids)

    @functools.cached_property
    def _lexical_ids(self) -> tuple[int | None, int | None, frozenset[int | None]]:
        """BGE-M3's BOS and EOS ids (vLLM leaves their positions out of ``token_classify``)
        and the tokenizer's special ids FlagEmbedding leaves out of the lexical weights."""
        hf, tok = self.core.model_config.hf_config, self.core.get_tokenizer()
        names = ("cls", "eos", "sep", "pad", "unk")
        unused = frozenset(getattr(tok, f"{name}_token_id", None) for name in names)
        return hf.bos_token_id, hf.eos_token_id, unused

    async def token_embed(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Per-token vectors float32 [tokens, dim] (vLLM's ``token_embed`` task, e.g. a
        ColBERT's projection of every token): each row's first ``dimensions`` components when
        set, each row L2-normalised unless ``normalize`` is false."""
        _check_dimensions(item)
        params = _vllm().PoolingParams(task="token_embed", use_activation=item.normalize)
        out = await self._encode(item, prompt, params)
        rows = out.outputs.data.float().numpy()
        if item.dimensions is not None:
            if item.dimensions > rows.shape[1]:
                raise InvalidInput(
                    ErrorCode.INVALID_DIMENSIONS,
                    f"dimensions {item.dimensions} is more than the model's {rows.shape[1]}",
                )
            rows = rows[:, : item.dimensions]
            if item.normalize:
                rows = unit(rows)
        return rows.astype(np.float32), len(out.prompt_token_ids)

    async def embed_chunks(self, item: WorkItem, prompt: ChunkedPrompt) -> tuple[np.ndarray, int]:
        """A long text's embedding from its windows: each window's pooled vector (its first
        ``dimensions``, not normalised), their mean weighted by the windows' tokens,
        L2-normalised unless ``normalize`` is false. The token count is every window's."""
        # vLLM keeps the first ``dimensions`` of each (and refuses sizes the model lacks)
        raw = _vllm().PoolingParams(task="embed", dimensions=item.dimensions, use_activation=False)
        outs = await asyncio.gather(*(self._encode(item, w, raw) for w in prompt.windows))
        vectors = np.stack([o.outputs.data.float().numpy() for o in outs]).astype(np.float64)
        weights = np.array([len(w) for w in prompt.windows], dtype=np.float64)
        vec = (weights[:, None] * vectors).sum(axis=0) / weights.sum()
        if item.normalize:
            vec = unit(vec)
        return vec.astype(np.float32), len(prompt)

    async def classify(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        """A sequence classifier's class logits ``[num_labels]`` (vLLM's ``classify`` task
        without its activation), their softmax when ``normalize``."""
        out = await self._encode(
            item, prompt, _vllm().PoolingParams(task="classify", use_activation=False)
        )
        logits = out.outputs.data.float().numpy().astype(np.float32)
        return (softmax(logits) if item.normalize else logits), len(out.prompt_token_ids)

    async def logits(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        """A causal LM's raw logits of ``return_logits`` at the last position (their softmax
        when ``normalize``)."""
        if self.score_type != "causal-lm":
            raise InvalidInput(
                ErrorCode.INVALID_TOKEN_IDS,
                f"return_logits needs a causal-LM scoring model; this one is {self.score_type}",
            )
        ids = item.return_logits or []
        if not ids:
            raise InvalidInput(
                ErrorCode.INVALID_TOKEN_IDS, "return_logits must list at least one token id"
            )
        if len(ids) > MAX_LOGIT_IDS:
            raise InvalidInput(
                ErrorCode.INVALID_TOKEN_IDS,
                f"return_logits lists {len(ids)} token ids; at most {MAX_LOGIT_IDS} are allowed",
            )
        params = _vllm().SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), detokenize=False
        )
        stream = self.core.generate(
            vllm_prompt(prompt),
            params,
            request_id=request_id(item),
            lora_request=self.adapters.get(item.model),
            priority=item.priority or 0,
        )
        out = await self._last(item, prompt, stream)
        step = out.outputs[0].logprobs[0]
        logits = np.array([step[i].logprob for i in ids], dtype=np.float32)
        if item.normalize:
            logits = softmax(logits)
        return logits, len(out.prompt_token_ids)

    async def score_pair(self, item: WorkItem, prompt: PairPrompt) -> tuple[np.ndarray, int]:
        """A (query, document) pair's score ``[1]`` by this engine's score type: the
        cross-encoder's logit (its activation, e.g. a sigmoid, when ``normalize``), MaxSim of
        the token embeddings, or the cosine of the embeddings."""
        if self.score_type == "cross-encoder":
            params = _vllm().PoolingParams(task="classify", use_activation=item.normalize)
            if prompt.token_type_ids:
                from vllm.entrypoints.pooling.scoring.utils import compress_token_type_ids

                try:
                    first_one = compress_token_type_ids(prompt.token_type_ids)
                except ValueError as e:
                    raise InvalidInput(ErrorCode.INVALID_INPUT, str(e)) from None
                params.extra_kwargs = {"compressed_token_type_ids": first_one}
            out = await self._encode(item, prompt.first, params)
            return out.outputs.data.float().numpy()[:1], len(prompt)
        task = POOLING_TASK[self.score_type]
        assert prompt.second is not None
        query, document = await asyncio.gather(
            self._encode_shared(item, prompt.first, task),
            self._encode(item, prompt.second, _vllm().PoolingParams(task=task)),
        )
        q, d = query.outputs.data.float(), document.outputs.data.float()
        if self.score_type == "late-interaction":
            from vllm.entrypoints.pooling.scoring.utils import compute_maxsim_score

            score = compute_maxsim_score(q, d)
        else:
            import torch.nn.functional as F

            score = F.cosine_similarity(q, d, dim=0)
        return np.array([float(score)], dtype=np.float32), len(prompt)

    async def _encode(self, item: WorkItem, ids: list[int], params: Any) -> Any:
        """One pooling request of token ids: its final output."""
        stream = self.core.encode(
            vllm_prompt(ids),
            params,
            request_id=request_id(item),
            lora_request=self.adapters.get(item.model),
            priority=item.priority or 0,
        )
        return await self._last(item, ids, stream)

    async def _encode_shared(self, item: WorkItem, ids: list[int], task: PoolingTask) -> Any:
        """:meth:`_encode` of a query that other pairs in the engine may share: one vLLM
        request per distinct query in flight (a rerank's 100 documents embed its query once)."""
        key = (item.model, task, tuple(ids))  # an adapter's query is not the base model's
        shared = self._shared.get(key)
        if shared is None:
            shared = asyncio.ensure_future(
                self._encode(item, ids, _vllm().PoolingParams(task=task))
            )
            self._shared[key] = shared
            shared.add_done_callback(lambda _: self._shared.pop(key, None))
        return await asyncio.shield(shared)

    async def _last(self, item: WorkItem, prompt: Prompt, stream: AsyncIterator[Any]) -> Any:
        """The last output of a vLLM output stream, vLLM's errors turned into ours."""
        vllm = _vllm()
        out = None
        try:
            async for out in stream:  # noqa: B007 - the last output is the final one
                pass
        except vllm.VLLMValidationError as e:
            raise self._refused(item, prompt, str(e)) from None
        except ValueError as e:  # older vLLM raises plain ValueError for bad input
            if self.core.errored:
                raise EngineDead(str(e)) from e
            raise self._refused(item, prompt, str(e)) from None
        except vllm.EngineDeadError as e:
            raise EngineDead(str(e)) from e
        assert out is not None
        return out

    def _refused(self, item: WorkItem, prompt: Prompt, message: str) -> InvalidInput:
        message = message.replace(repr(self.model_path), repr(self.model_name))
        message = message.replace(self.model_path, self.model_name)
        return refusal(
            message,
            prompt_tokens=len(prompt),
            max_model_len=self.max_model_len,
            truncate=item.truncate_prompt_tokens,
        )


#: The runner of each task but ``tokenize`` (which needs no engine step), for one prepared
#: input; pairs and chunked inputs have their own (:meth:`Runner.run`).
_ONE_INPUT: dict[
    str,
    Callable[[Runner, WorkItem, list[int]], Awaitable[tuple[np.ndarray | SparseEmbedding, int]]],
] = {
    "embed": Runner.embed,
    "embed_sparse": Runner.embed_sparse,
    "token_embed": Runner.token_embed,
    "classify": Runner.classify,
    "score": Runner.logits,
}


@functools.cache
def _vllm() -> Any:
    """vLLM's names the runners use for every input, imported on first use and kept: this
    module is imported without vLLM (the worker's unit tests), and ``from vllm import X``
    inside a function goes through vLLM's lazy module ``__getattr__`` at every call."""
    import vllm
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs.engine import tokens_input
    from vllm.v1.engine.exceptions import EngineDeadError

    return SimpleNamespace(
        PoolingParams=vllm.PoolingParams,
        SamplingParams=vllm.SamplingParams,
        VLLMValidationError=VLLMValidationError,
        EngineDeadError=EngineDeadError,
        tokens_input=tokens_input,
    )


def _check_dimensions(item: WorkItem) -> None:
    """InvalidInput (``invalid_dimensions``) for ``dimensions`` below 1."""
    if item.dimensions is not None and item.dimensions < 1:
        raise InvalidInput(ErrorCode.INVALID_DIMENSIONS, "dimensions must be a positive integer")


def unit(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` [..., dim] L2-normalised along the last axis (a zero vector stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    out: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over ``logits`` [n] (computed in float64)."""
    z = np.exp(logits.astype(np.float64) - logits.max())
    out: np.ndarray = (z / z.sum()).astype(np.float32)
    return out


def request_id(item: WorkItem) -> str:
    """A vLLM request id for one run of ``item``: unique in this process (vLLM adds a random
    suffix of its own); a counter, not a uuid4 per input."""
    return f"{item.item_id}-{item.lease_id}-{next(_REQUEST_NUMBERS)}"


def vllm_prompt(prompt: list[int]) -> Any:
    """The token ids as a rendered ``TokensInput``: vLLM adds them without another tokenizer
    pass."""
    return _vllm().tokens_input(prompt)
