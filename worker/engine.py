"""The vLLM engine: one ``AsyncLLM`` per worker process.

``task = "embed"``: vLLM's pooling runner with ``PoolingParams(task="embed")``.
``task = "score"``: vLLM's generate runner with ``logprobs_mode="raw_logits"`` and one output
token per request; ``SamplingParams(logprob_token_ids=...)`` returns the raw logits of the
requested ids at the last prompt position, so every request may ask for its own ids.

Per-input problems raise :class:`InvalidInput`; they never affect other inputs in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any

import numpy as np

from worker import prompts
from worker.config import GeneratorConfig
from worker.protocol import MAX_LOGIT_IDS, ErrorCode, WorkItem

log = logging.getLogger(__name__)

#: An item's prompt for vLLM (:meth:`Engine.prepare`): its token ids.
Prompt = list[int]


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
    kw: dict[str, Any] = {
        "model": str(gen.model_path),
        "runner": "pooling" if gen.task == "embed" else "generate",
        "dtype": gen.dtype,
        "max_num_seqs": gen.max_num_seqs,
        "tensor_parallel_size": gen.tensor_parallel_size,
        "pipeline_parallel_size": gen.pipeline_parallel_size,
        "trust_remote_code": gen.trust_remote_code,
        "disable_log_stats": False,
        # Batch jobs' inputs (priority 1) wait in the engine behind interactive ones.
        "scheduling_policy": "priority",
    }
    if gen.task == "score":
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

    @classmethod
    def start(cls, gen: GeneratorConfig, model_name: str) -> Engine:
        """Start vLLM (takes ~25 s on CPU). Raises whatever vLLM raises if it cannot start."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = {k: _config_object(k, v) for k, v in engine_kwargs(gen).items()}
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
        """Each item's prompt, made for the whole pulled batch in one worker thread: templates
        rendered (:mod:`worker.prompts`, with this model's ``truncate_tokens``), then every text
        without ``truncate_prompt_tokens`` tokenized in one call of the model's fast tokenizer.

        Returns per item: token ids (``list[int]``; ids equal vLLM's own tokenization,
        ``add_special_tokens=True``, truncated to ``truncate_prompt_tokens`` when set), or the
        :class:`InvalidInput` of that item (a template error, text the tokenizer cannot
        encode). Handing vLLM token ids spares it a tokenizer call per request on the event
        loop that the pull and post calls share: a long text never blocks that loop.
        """
        return await asyncio.to_thread(self._prepare, self.tokenizer, items)

    def _prepare(self, tok: Any, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        out: list[Prompt | InvalidInput] = []
        to_tokenize: list[int] = []  # indices of the texts in ``texts``
        texts: list[str] = []
        for i, item in enumerate(items):
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
        try:
            encoded = tok(texts, add_special_tokens=True)["input_ids"] if texts else []
        except Exception:  # noqa: BLE001 - find the inputs that fail, keep the rest
            encoded = [_encode_one(tok, t) for t in texts]
        for i, ids in zip(to_tokenize, encoded, strict=True):
            out[i] = list(ids) if not isinstance(ids, InvalidInput) else ids
        return out

    def _truncate_tokens(self, tok: Any) -> prompts.TruncateTokens:
        """``truncate_tokens`` for templates; by default to the longest prompt the engine takes
        (``max_model_len`` less the tokenizer's special tokens, and less the one output token
        of the scoring runner)."""
        if self._truncator is None:
            room = self.max_model_len - tok.num_special_tokens_to_add(pair=False)
            if self.gen.task == "score":
                room -= 1
            self._truncator = prompts.token_truncator(tok, max(room, 0))
        return self._truncator

    async def run(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray, int]:
        """Embed or score one item; ``prompt`` is its entry from :meth:`prepare`.

        Returns (float32 vector, prompt token count): the embedding ``[dim]`` (L2-normalised
        unless ``normalize`` is false, first ``dimensions`` components when set), or the logits
        ``[len(return_logits)]`` at the last position (softmax over them when ``normalize``).
        Raises :class:`InvalidInput` for a bad input, :class:`EngineDead` if vLLM has died.
        """
        if item.task == "embed":
            return await self._embed(item, prompt)
        return await self._score(item, prompt)

    @staticmethod
    def _vllm_prompt(prompt: Prompt) -> Any:
        """The token ids as a rendered ``TokensInput``: vLLM adds them without another
        tokenizer pass."""
        from vllm.inputs.engine import tokens_input

        return tokens_input(prompt)

    async def _embed(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray, int]:
        from vllm import PoolingParams

        if item.dimensions is not None and item.dimensions < 1:
            raise InvalidInput(
                ErrorCode.INVALID_DIMENSIONS, "dimensions must be a positive integer"
            )
        vllm_prompt = self._vllm_prompt(prompt)
        params = PoolingParams(
            task="embed", dimensions=item.dimensions, use_activation=item.normalize
        )
        out = None
        async for out in self._guard(  # noqa: B007 - the last output is used after the loop
            item,
            prompt,
            self.llm.encode(
                vllm_prompt, params, request_id=_request_id(item), priority=item.priority or 0
            ),
        ):
            pass
        assert out is not None
        vec = out.outputs.data.float().numpy()
        return vec, len(out.prompt_token_ids)

    async def _score(self, item: WorkItem, prompt: Prompt) -> tuple[np.ndarray, int]:
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
            z = np.exp(logits - logits.max())
            logits = (z / z.sum()).astype(np.float32)
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
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None

    @property
    def alive(self) -> bool:
        """False once the engine core has died (or was shut down)."""
        return self.llm is not None and not self.llm.errored


def _request_id(item: WorkItem) -> str:
    return f"{item.item_id}-{item.lease_id}-{uuid.uuid4().hex[:8]}"


def _encode_one(tok: Any, text: str, truncate: int | None = None) -> list[int] | InvalidInput:
    """Token ids of one text (at most ``truncate`` of them, special tokens included, as
    vLLM's ``truncate_prompt_tokens`` gives), or the InvalidInput saying why the tokenizer
    refused it (e.g. a lone surrogate, which cannot be encoded as UTF-8)."""
    kw: dict[str, Any] = {} if truncate is None else {"truncation": True, "max_length": truncate}
    try:
        return list(tok(text, add_special_tokens=True, **kw)["input_ids"])
    except Exception as e:  # noqa: BLE001 - the tokenizer's own error, reported per input
        return InvalidInput(ErrorCode.INVALID_INPUT, f"the tokenizer cannot encode this text: {e}")
