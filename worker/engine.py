"""The vLLM engine: one ``AsyncLLM`` per worker process.

``task = "embed"``: vLLM's pooling runner with ``PoolingParams(task="embed")``; a (query,
document) pair scores as the cosine of the two embeddings (``bi-encoder``).
``task = "classify"``: the pooling runner's ``classify`` task on a sequence classifier; the
class logits, their softmax by default.
``task = "score"``, by the checkpoint's score type (:func:`score_type_of`):

- ``causal-lm``: vLLM's generate runner with ``logprobs_mode="raw_logits"`` and one output
  token per request; ``SamplingParams(logprob_token_ids=...)`` returns the raw logits of the
  requested ids at the last prompt position, so every request may ask for its own ids;
- ``cross-encoder``: the pooling runner's ``classify`` task on the pair, tokenized as vLLM's
  score API does (the tokenizer's own pair encoding with its token type ids, or query +
  document for a model without a separator token); one logit, the model's activation;
- ``late-interaction``: the ``token_embed`` task on each text, MaxSim (vLLM's
  ``compute_maxsim_score``);
- ``bi-encoder``: the ``embed`` task on each text, cosine.

Per-input problems raise :class:`InvalidInput`; they never affect other inputs in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from typing import Any, Literal

import numpy as np

from common import prompts
from common.protocol import MAX_LOGIT_IDS, ErrorCode, ScoreType, WorkItem
from worker.config import GeneratorConfig
from worker.defaults import PREPARE_INLINE_TOKENS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PairPrompt:
    """A (query, document) pair's token ids: one sequence with its token type ids
    (``cross-encoder``), or the two texts' own sequences (``late-interaction``,
    ``bi-encoder``)."""

    first: list[int]
    second: list[int] | None = None
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.first) + len(self.second or [])


#: An item's prompt for vLLM (:meth:`Engine.prepare`): its token ids, or a pair's.
Prompt = list[int] | PairPrompt

#: The pooling task each pair score type runs in vLLM (``vllm.tasks.SCORE_TYPE_MAP``).
PoolingTask = Literal["classify", "token_embed", "embed"]
POOLING_TASK: dict[str, PoolingTask] = {
    "cross-encoder": "classify",
    "late-interaction": "token_embed",
    "bi-encoder": "embed",
}


def score_type_of(gen: GeneratorConfig) -> ScoreType | None:
    """The score type the config or the checkpoint calls for before vLLM starts:
    ``generator.score_type`` if set; ``bi-encoder`` for an embedding engine; for scoring,
    None when the checkpoint's ``config.json`` names architectures and none of them is a
    causal LM (``*ForCausalLM`` / ``*LMHeadModel``): vLLM's pooling runner then tells the
    type once started; else ``causal-lm`` (also when ``config.json`` cannot be read)."""
    if gen.score_type is not None:
        return gen.score_type
    if gen.task == "embed":
        return "bi-encoder"
    archs = [str(a) for a in gen.checkpoint_config().get("architectures") or []]
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return None
    return "causal-lm"


def engine_core_of(gen: GeneratorConfig) -> Literal["asyncllm", "process", "thread"]:
    """Where the engine core runs: ``generator.engine_core``; ``auto`` (left so on GPU hosts
    by :func:`worker.cpu_host.resolve`) is ``asyncllm``, vLLM's own online setup."""
    return "asyncllm" if gen.engine_core == "auto" else gen.engine_core


class InvalidInput(Exception):
    """An input the engine refuses (too long, bad token ids, unsupported dimensions, a template
    that does not render ...); ``code`` is one of the client-fault :class:`ErrorCode` s."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EngineDead(Exception):
    """The vLLM engine has failed; the worker must stop and be restarted."""


def engine_kwargs(gen: GeneratorConfig) -> dict[str, Any]:
    """``vllm.AsyncEngineArgs`` keyword arguments for a ``[generator]`` table.

    Keys left unset in the config are not passed, so vLLM's defaults apply.
    ``generator.engine_args`` entries are passed through last and win.
    """
    causal = gen.task == "score" and score_type_of(gen) == "causal-lm"
    kw: dict[str, Any] = {
        "model": str(gen.model_path),
        "runner": "generate" if causal else "pooling",
        "dtype": gen.dtype,
        "max_num_seqs": gen.max_num_seqs,
        "tensor_parallel_size": gen.tensor_parallel_size,
        "pipeline_parallel_size": gen.pipeline_parallel_size,
        "trust_remote_code": gen.trust_remote_code,
        "disable_log_stats": False,
        # Batch jobs' inputs (priority 1) wait in the engine behind interactive ones.
        "scheduling_policy": "priority",
    }
    if causal:
        kw["logprobs_mode"] = "raw_logits"
        kw["max_logprobs"] = MAX_LOGIT_IDS
        # Rerank prompts share a long prefix (instruction + query): reuse its KV cache.
        kw["enable_prefix_caching"] = True
    optional = {
        "max_model_len": gen.max_model_len,
        "tokenizer": str(gen.tokenizer_path) if gen.tokenizer_path else None,
        "gpu_memory_utilization": gen.gpu_memory_utilization,
        "enforce_eager": gen.enforce_eager,
        "max_num_batched_tokens": gen.max_num_batched_tokens,
        "enable_prefix_caching": gen.enable_prefix_caching,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    kw.update(gen.engine_args)
    return kw


def _config_object(name: str, value: Any) -> Any:
    """A TOML table given for an ``AsyncEngineArgs`` field whose type is one of vLLM's config
    dataclasses (``pooler_config``, ``compilation_config`` ...) -> an instance of it, as vLLM's
    own CLI builds it from JSON. Other values are returned unchanged."""
    import typing

    from vllm import AsyncEngineArgs

    if not isinstance(value, dict):
        return value
    field = {f.name: f for f in dataclasses.fields(AsyncEngineArgs)}.get(name)
    if field is None:
        return value
    for cls in (field.type, *typing.get_args(field.type)):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls(**value)
    return value


def unknown_engine_args(gen: GeneratorConfig) -> list[str]:
    """Names in ``generator.engine_args`` that ``vllm.AsyncEngineArgs`` does not have."""
    from vllm import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    return sorted(k for k in gen.engine_args if k not in known)


class Engine:
    """A started vLLM ``AsyncLLM`` serving one model for one task.

    Create with :meth:`start` inside a running event loop; call :meth:`shutdown` before the
    loop ends.
    """

    def __init__(self, llm: Any, gen: GeneratorConfig, model_name: str):
        self.llm = llm
        self.gen = gen
        self.model_name = model_name
        self.max_model_len: int = llm.model_config.max_model_len
        self._tokenizer: Any = None
        self._truncator: prompts.TruncateTokens | None = None
        #: The batch encoding of the tokenizer's Rust backend (:meth:`_encode_batch`), looked
        #: up once; False: none.
        self._batch_encode: Any = None
        #: How this engine scores a pair (:data:`~common.protocol.ScoreType`): an embedding
        #: engine's cosine, the causal-LM recipe on the generate runner, or else the type vLLM
        #: gives the checkpoint on the pooling runner (a mismatch with ``generator.score_type``
        #: is reported by ``model_adverts``).
        self.score_type: ScoreType = (
            "bi-encoder"
            if gen.task == "embed"
            else "causal-lm"
            if gen.task == "score" and score_type_of(gen) == "causal-lm"
            else llm.model_config.score_type
        )
        #: A query's embedding being computed, shared by the pairs that have that query:
        #: (pooling task, token ids) -> its output.
        self._shared: dict[tuple[str, tuple[int, ...]], asyncio.Future[Any]] = {}

    @classmethod
    def start(cls, gen: GeneratorConfig, model_name: str) -> Engine:
        """Start vLLM (takes ~25 s on CPU) where ``generator.engine_core`` says: behind
        ``AsyncLLM``, or vLLM's ``LLMEngine`` in a process of the worker's own
        (:mod:`worker.engine_process`) or in this process (:mod:`worker.engine_thread`).
        Call inside the event loop that will use it. Raises whatever vLLM raises (or a
        RuntimeError with its reason) if it cannot start."""
        kwargs = {k: _config_object(k, v) for k, v in engine_kwargs(gen).items()}
        core = engine_core_of(gen)
        if core == "process":
            from worker.engine_process import ProcessLLM

            return cls(ProcessLLM.start(kwargs, gen.one_thread_step_tokens), gen, model_name)
        if core == "thread":
            from worker.engine_thread import ThreadedLLM, llm_engine

            threaded = ThreadedLLM.start(llm_engine(kwargs), gen.one_thread_step_tokens)
            return cls(threaded, gen, model_name)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        return cls(llm, gen, model_name)

    @property
    def tokenizer(self) -> Any:
        """The model's (fast) Hugging Face tokenizer, as vLLM loaded it."""
        if self._tokenizer is None:
            self._tokenizer = self.llm.get_tokenizer()
        return self._tokenizer

    @property
    def max_num_batched_tokens(self) -> int:
        """Tokens the vLLM scheduler puts into one engine step."""
        return int(self.llm.vllm_config.scheduler_config.max_num_batched_tokens)

    @property
    def num_labels(self) -> int:
        """Outputs of a sequence classifier (a cross-encoder reranker has one)."""
        return int(getattr(self.llm.model_config.hf_config, "num_labels", 1) or 1)

    @property
    def labels(self) -> list[str]:
        """A classifier's class labels in index order (``id2label``; ``LABEL_<i>`` where the
        config names none)."""
        id2label = getattr(self.llm.model_config.hf_config, "id2label", None) or {}
        named = {int(k): str(v) for k, v in id2label.items()}
        return [named.get(i, f"LABEL_{i}") for i in range(self.num_labels)]

    @property
    def vocab_size(self) -> int:
        """Rows of the model's logits (valid ``return_logits`` ids are below this)."""
        return int(self.llm.model_config.get_vocab_size())

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
        await self.llm.do_log_stats()

    async def prepare(self, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        """Each item's prompt, made for the whole pulled batch in one call: templates rendered
        (:mod:`common.prompts`, with this model's ``truncate_tokens``), then every text without
        ``truncate_prompt_tokens`` tokenized in one call of the model's fast tokenizer.

        Returns per item: token ids (``list[int]``; ids equal vLLM's own tokenization,
        ``add_special_tokens=True``, truncated to ``truncate_prompt_tokens`` when set), a
        pair's :class:`PairPrompt` (a cross-encoder's pairs encoded together in one call), or the
        :class:`InvalidInput` of that item (a template error, text the tokenizer cannot
        encode). Handing vLLM token ids spares it a tokenizer call per request on the event
        loop that the pull and post calls share. A batch of at most
        :data:`~worker.defaults.PREPARE_INLINE_TOKENS` estimated tokens is prepared on the
        event loop (a thread hop costs more than its tokenization), a larger one in a worker
        thread: a long text never blocks that loop.
        """
        if sum(item.estimate_tokens() for item in items) <= PREPARE_INLINE_TOKENS:
            return self._prepare(self.tokenizer, items)
        return await asyncio.to_thread(self._prepare, self.tokenizer, items)

    def _prepare(self, tok: Any, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        out: list[Prompt | InvalidInput] = []
        to_tokenize: list[int] = []  # indices of the texts in ``texts``
        texts: list[str] = []
        pairs: list[int] = []  # cross-encoder pairs encoded together in one call
        one_call = self.score_type == "cross-encoder" and self.llm.model_config.use_sep_token
        for i, item in enumerate(items):
            if item.text_pair is not None:
                if self.score_type == "causal-lm":
                    out.append(
                        InvalidInput(
                            ErrorCode.INVALID_INPUT,
                            "a causal-LM reranker scores pairs through its rerank prompt "
                            "(return_logits), not text_pair",
                        )
                    )
                elif one_call and item.truncate_prompt_tokens is None:
                    out.append(PairPrompt([]))  # its ids come from the pair call below
                    pairs.append(i)
                else:
                    out.append(self._pair_prompt(tok, item.text or "", item.text_pair, item))
                continue
            if item.token_ids is not None:
                ids = item.token_ids
                out.append(
                    ids
                    if item.truncate_prompt_tokens is None
                    else ids[: item.truncate_prompt_tokens]
                )
                continue
            text = item.text
            if item.prompt_template is not None:
                try:
                    text = prompts.render(
                        item.prompt_template, item.fields or {}, self._truncate_tokens(tok)
                    )
                except prompts.TemplateError as e:
                    out.append(
                        InvalidInput(ErrorCode.INVALID_PROMPT_TEMPLATE, f"prompt_template: {e}")
                    )
                    continue
                if not text:
                    out.append(
                        InvalidInput(
                            ErrorCode.INVALID_PROMPT_TEMPLATE,
                            "prompt_template rendered an empty prompt",
                        )
                    )
                    continue
            if item.truncate_prompt_tokens is not None:  # truncated as vLLM would
                out.append(_encode_one(tok, text or "", item.truncate_prompt_tokens))
                continue
            out.append([])  # its ids come from the one call below
            to_tokenize.append(i)
            texts.append(text or "")
        encoded: list[list[int]] | list[list[int] | InvalidInput]
        try:
            encoded = self._encode_batch(tok, texts) if texts else []
        except Exception:  # noqa: BLE001 - find the inputs that fail, keep the rest
            encoded = [_encode_one(tok, t) for t in texts]
        for i, encoding in zip(to_tokenize, encoded, strict=True):
            out[i] = encoding
        if pairs:
            try:
                enc = tok(
                    [items[i].text or "" for i in pairs],
                    [items[i].text_pair or "" for i in pairs],
                    add_special_tokens=True,
                )
                types = enc.get("token_type_ids")
                for k, i in enumerate(pairs):
                    out[i] = PairPrompt(
                        list(enc["input_ids"][k]),
                        token_type_ids=list(types[k]) if types else None,
                    )
            except Exception:  # noqa: BLE001 - find the pairs that fail, keep the rest
                for i in pairs:
                    pair = items[i]
                    out[i] = self._pair_prompt(tok, pair.text or "", pair.text_pair or "", pair)
        return out

    def _encode_batch(self, tok: Any, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` (special tokens added, not truncated), as ``tok(texts)``
        gives them: through the fast tokenizer's Rust backend (``tokenizers``), which encodes
        the batch without holding the GIL, so the event loop and vLLM's engine thread keep
        running meanwhile; ``tok`` itself where it has no such backend. The backend's
        ``encode_batch_fast`` (``tokenizers`` >= 0.21: no character offsets, which the worker
        does not use) where it has one: ~490-token documents 0.65 -> 0.49 ms of CPU each,
        sentences 16 -> 13 us."""
        if self._batch_encode is None:
            self._batch_encode = False
            backend = getattr(tok, "_tokenizer", None)
            if backend is not None and hasattr(backend, "encode_batch"):
                # A copy: the tokenizer's own backend carries the truncation and padding of
                # its last call (and tokenizer.json's defaults, e.g. MiniLM's 128).
                backend = type(backend).from_str(backend.to_str())
                backend.no_truncation()
                backend.no_padding()
                self._batch_encode = (
                    getattr(backend, "encode_batch_fast", None) or backend.encode_batch
                )
        if self._batch_encode is False:
            return [list(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
        return [e.ids for e in self._batch_encode(texts, add_special_tokens=True)]

    def _pair_prompt(
        self, tok: Any, query: str, document: str, item: WorkItem
    ) -> PairPrompt | InvalidInput:
        """A pair's token ids (see :class:`PairPrompt`), as vLLM's score API tokenizes it;
        ``truncate_prompt_tokens`` cuts the document of a cross-encoder pair (the query is
        kept whole) and each text of the other types."""
        limit = item.truncate_prompt_tokens
        if self.score_type == "cross-encoder":
            if not self.llm.model_config.use_sep_token:  # an LLM as a reranker: one text
                joined = _encode_one(tok, query + document, limit)
                return joined if isinstance(joined, InvalidInput) else PairPrompt(joined)
            kw: dict[str, Any] = {}
            if limit is not None:
                kw = {"truncation": "only_second", "max_length": limit}
            try:
                enc = tok(text=query, text_pair=document, add_special_tokens=True, **kw)
            except Exception as e:  # noqa: BLE001 - the tokenizer's own error, per input
                return InvalidInput(ErrorCode.INVALID_INPUT, f"the tokenizer cannot encode: {e}")
            types = enc.get("token_type_ids")
            return PairPrompt(list(enc["input_ids"]), token_type_ids=list(types) if types else None)
        first, second = _encode_one(tok, query, limit), _encode_one(tok, document, limit)
        if isinstance(first, InvalidInput):
            return first
        if isinstance(second, InvalidInput):
            return second
        return PairPrompt(first, second)

    def _truncate_tokens(self, tok: Any) -> prompts.TruncateTokens:
        """``truncate_tokens`` for templates; by default to the longest prompt the engine takes
        (``max_model_len`` less the tokenizer's special tokens, and less the one output token
        of the scoring runner)."""
        if self._truncator is None:
            room = self.max_model_len - tok.num_special_tokens_to_add(pair=False)
            if self.gen.task == "score" and self.score_type == "causal-lm":
                room -= 1
            self._truncator = prompts.token_truncator(tok, max(room, 0))
        return self._truncator

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray, int]:
        """Embed or score one item; ``prompt`` is its entry from :meth:`prepare`.

        Returns (float32 vector, prompt token count): the embedding ``[dim]`` (L2-normalised
        unless ``normalize`` is false, first ``dimensions`` components when set), the logits
        ``[len(return_logits)]`` at the last position (softmax over them when ``normalize``),
        a pair's score ``[1]`` (:meth:`_score_pair`), or a classifier's class probabilities
        ``[num_labels]`` (logits unless ``normalize``).
        Raises :class:`InvalidInput` for a bad input, :class:`EngineDead` if vLLM has died.
        """
        if isinstance(prompt, PairPrompt):
            return await self._score_pair(item, prompt)
        if item.task == "embed":
            return await self._embed(item, prompt)
        if item.task == "classify":
            return await self._classify(item, prompt)
        if self.score_type != "causal-lm":
            raise InvalidInput(
                ErrorCode.INVALID_TOKEN_IDS,
                f"return_logits needs a causal-LM scoring model; this one is {self.score_type}",
            )
        return await self._score(item, prompt)

    async def _score_pair(self, item: WorkItem, prompt: PairPrompt) -> tuple[np.ndarray, int]:
        """A (query, document) pair's score ``[1]`` by this engine's score type: the
        cross-encoder's logit (its activation, e.g. a sigmoid, when ``normalize``), MaxSim of
        the token embeddings, or the cosine of the embeddings."""
        from vllm import PoolingParams

        if self.score_type == "cross-encoder":
            params = PoolingParams(task="classify", use_activation=item.normalize)
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
            self._encode(item, prompt.second, PoolingParams(task=task)),
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
        """One ``AsyncLLM.encode`` of token ids: its final output."""
        out = None
        async for out in self._guard(  # noqa: B007 - the last output is used after the loop
            item,
            ids,
            self.llm.encode(
                self._vllm_prompt(ids),
                params,
                request_id=_request_id(item),
                priority=item.priority or 0,
            ),
        ):
            pass
        assert out is not None
        return out

    async def _encode_shared(self, item: WorkItem, ids: list[int], task: PoolingTask) -> Any:
        """:meth:`_encode` of a query that other pairs in the engine may share: one vLLM
        request per distinct query in flight (a rerank's 100 documents embed its query once)."""
        from vllm import PoolingParams

        key = (task, tuple(ids))
        shared = self._shared.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._encode(item, ids, PoolingParams(task=task)))
            self._shared[key] = shared
            shared.add_done_callback(lambda _: self._shared.pop(key, None))
        return await asyncio.shield(shared)

    @staticmethod
    def _vllm_prompt(prompt: list[int]) -> Any:
        """The token ids as a rendered ``TokensInput``: vLLM adds them without another
        tokenizer pass."""
        from vllm.inputs.engine import tokens_input

        return tokens_input(prompt)

    async def _embed(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        from vllm import PoolingParams

        if item.dimensions is not None and item.dimensions < 1:
            raise InvalidInput(
                ErrorCode.INVALID_DIMENSIONS, "dimensions must be a positive integer"
            )
        params = PoolingParams(
            task="embed", dimensions=item.dimensions, use_activation=item.normalize
        )
        out = await self._encode(item, prompt, params)
        vec = out.outputs.data.float().numpy()
        return vec, len(out.prompt_token_ids)

    async def _classify(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        """A sequence classifier's class logits ``[num_labels]`` (vLLM's ``classify`` task
        without its activation), their softmax when ``normalize``."""
        from vllm import PoolingParams

        out = await self._encode(item, prompt, PoolingParams(task="classify", use_activation=False))
        logits = out.outputs.data.float().numpy().astype(np.float32)
        return (_softmax(logits) if item.normalize else logits), len(out.prompt_token_ids)

    async def _score(self, item: WorkItem, prompt: list[int]) -> tuple[np.ndarray, int]:
        from vllm import SamplingParams

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
        vllm_prompt = self._vllm_prompt(prompt)
        params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), detokenize=False
        )
        out = None
        async for out in self._guard(  # noqa: B007 - the last output is used after the loop
            item,
            prompt,
            self.llm.generate(
                vllm_prompt, params, request_id=_request_id(item), priority=item.priority or 0
            ),
        ):
            pass
        assert out is not None
        step = out.outputs[0].logprobs[0]
        logits = np.array([step[i].logprob for i in ids], dtype=np.float32)
        if item.normalize:
            logits = _softmax(logits)
        return logits, len(out.prompt_token_ids)

    async def _guard(self, item: WorkItem, prompt: Prompt, gen: Any) -> Any:
        """Iterate a vLLM output stream, turning vLLM's errors into ours."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for out in gen:
                yield out
        except VLLMValidationError as e:
            raise self._invalid(item, prompt, str(e)) from None
        except ValueError as e:  # older vLLM raises plain ValueError for bad input
            if not self.alive:
                raise EngineDead(str(e)) from e
            raise self._invalid(item, prompt, str(e)) from None
        except EngineDeadError as e:
            raise EngineDead(str(e)) from e

    def _invalid(self, item: WorkItem, prompt: Prompt, message: str) -> InvalidInput:
        message = message.replace(repr(str(self.gen.model_path)), repr(self.model_name))
        message = message.replace(str(self.gen.model_path), self.model_name)
        if "maximum context length" in message or "maximum model length" in message:
            if item.truncate_prompt_tokens is not None:  # truncated, still too long
                return InvalidInput(
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"truncate_prompt_tokens is {item.truncate_prompt_tokens}, more than the "
                    f"maximum context length of {self.max_model_len} tokens",
                )
            return InvalidInput(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"input has {len(prompt)} tokens, more than the maximum context length of "
                f"{self.max_model_len} tokens; shorten it or set truncate_prompt_tokens",
            )
        if "Matryoshka" in message or "dimensions" in message:
            return InvalidInput(ErrorCode.INVALID_DIMENSIONS, message)
        if (
            "out of vocabulary" in message
            or "out-of-vocab" in message
            or "logprob_token_ids" in message
        ):
            return InvalidInput(
                ErrorCode.INVALID_TOKEN_IDS, message.replace("logprob_token_ids", "return_logits")
            )
        if "prompt cannot be empty" in message:
            return InvalidInput(ErrorCode.INVALID_TOKEN_IDS, message)
        return InvalidInput(ErrorCode.INVALID_INPUT, message)

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


def _softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over ``logits`` [n] (computed in float64)."""
    z = np.exp(logits.astype(np.float64) - logits.max())
    out: np.ndarray = (z / z.sum()).astype(np.float32)
    return out


#: Numbers vLLM request ids apart (an item's retry in this worker gets a new one).
_REQUEST_NUMBERS = itertools.count()


def _request_id(item: WorkItem) -> str:
    """A vLLM request id for one run of ``item``: unique in this process (vLLM adds a random
    suffix of its own); a counter, not a uuid4 per input."""
    return f"{item.item_id}-{item.lease_id}-{next(_REQUEST_NUMBERS)}"


def _encode_one(tok: Any, text: str, truncate: int | None = None) -> list[int] | InvalidInput:
    """Token ids of one text (at most ``truncate`` of them, special tokens included, as
    vLLM's ``truncate_prompt_tokens`` gives), or the InvalidInput saying why the tokenizer
    refused it (e.g. a lone surrogate, which cannot be encoded as UTF-8)."""
    kw: dict[str, Any] = {} if truncate is None else {"truncation": True, "max_length": truncate}
    try:
        return list(tok(text, add_special_tokens=True, **kw)["input_ids"])
    except Exception as e:  # noqa: BLE001 - the tokenizer's own error, reported per input
        return InvalidInput(ErrorCode.INVALID_INPUT, f"the tokenizer cannot encode this text: {e}")
