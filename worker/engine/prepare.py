"""Input preparation: a pulled batch's items as the token ids vLLM runs, made in few tokenizer
calls. Templates are rendered (:mod:`common.prompts`, with this model's ``truncate_tokens``);
texts are tokenized in one call of the fast tokenizer's Rust backend (those over their
``truncate_prompt_tokens`` once more, truncated), a cross-encoder's pairs in one call of the
tokenizer; ids equal vLLM's own
tokenization (``add_special_tokens=True``). Handing vLLM token ids spares it a tokenizer call
per request on the event loop the pull and post calls share."""

from __future__ import annotations

import dataclasses
from typing import Any

from common import prompts
from common.protocol import MAX_CHUNKS, ErrorCode, ScoreType, WorkItem
from worker.engine.errors import InvalidInput


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


@dataclasses.dataclass
class ChunkedPrompt:
    """A long text's windows (``ItemSpec.chunk_tokens``): token ids of at most that many
    each, the tokenizer's special tokens around every one."""

    windows: list[list[int]]

    def __len__(self) -> int:
        return sum(len(w) for w in self.windows)


#: An item's prompt for vLLM: its token ids, a pair's, or a long text's windows.
Prompt = list[int] | PairPrompt | ChunkedPrompt


class Preparer:
    """Prompts for one engine: ``tok`` its tokenizer, ``score_type`` how it scores pairs,
    ``use_sep_token`` whether a cross-encoder's tokenizer encodes pairs (vLLM's
    ``model_config.use_sep_token``), ``room`` the most tokens a rendered template may
    truncate to by default."""

    def __init__(self, tok: Any, score_type: ScoreType, use_sep_token: bool, room: int):
        self.tok = tok
        self.score_type = score_type
        self.use_sep_token = use_sep_token
        self.truncate_tokens = prompts.token_truncator(tok, max(room, 0))
        #: The batch encoding of the tokenizer's Rust backend (:meth:`encode_texts`), looked
        #: up once; False: none.
        self._batch_encode: Any = None
        #: The special tokens the tokenizer puts around a text: (before, after), found once.
        self._around: tuple[list[int], list[int]] | None = None

    def _specials(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts (before, after) a text, found once from the
        ids of the empty text and of ``ids`` (a text's)."""
        if self._around is None:
            empty = list(self.tok("", add_special_tokens=True)["input_ids"])
            split = next(
                (k for k in range(len(empty), -1, -1) if ids[:k] == empty[:k]), 0
            )  # the longest prefix of the empty text's ids that starts every text
            self._around = (empty[:split], empty[split:])
        return self._around

    def windows(self, ids: list[int], size: int) -> ChunkedPrompt | InvalidInput:
        """A text's token ids as windows of at most ``size`` tokens, the special tokens
        around each; InvalidInput past :data:`~common.protocol.MAX_CHUNKS` windows."""
        before, after = self._specials(ids)
        room = max(size - len(before) - len(after), 1)
        body = ids[len(before) : len(ids) - len(after)]
        parts = [body[k : k + room] for k in range(0, len(body), room)]
        if len(parts) > MAX_CHUNKS:
            return InvalidInput(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"the input has {len(ids)} tokens: more than {MAX_CHUNKS} windows of "
                f"{size} (the model's context); shorten it or ask for truncation",
            )
        return ChunkedPrompt([[*before, *part, *after] for part in parts])

    def cut_start(self, ids: list[int], limit: int) -> list[int]:
        """A text's token ids (special tokens added) cut to ``limit`` by dropping the start
        of the text, its special tokens kept: as a Hugging Face tokenizer with
        ``truncation_side="left"`` gives (the tokenizer object is not changed: it may be
        vLLM's, shared)."""
        if len(ids) <= limit:
            return ids
        before, after = self._specials(ids)
        room = max(limit - len(before) - len(after), 0)
        body = ids[len(before) : len(ids) - len(after)]
        return [*before, *body[len(body) - room :], *after]

    def prepare(self, items: list[WorkItem]) -> list[Prompt | InvalidInput]:
        """Per item: token ids (truncated to ``truncate_prompt_tokens`` when set), a pair's
        :class:`PairPrompt`, or the :class:`InvalidInput` of that item (a template error,
        text the tokenizer cannot encode)."""
        out: list[Prompt | InvalidInput] = []
        texts: dict[int, str] = {}  # item index -> text, tokenized together below
        pairs: list[int] = []  # cross-encoder pairs encoded together in one call
        one_call = self.score_type == "cross-encoder" and self.use_sep_token
        for i, item in enumerate(items):
            if item.text_pair is not None and one_call and item.truncate_prompt_tokens is None:
                pairs.append(i)
                out.append(PairPrompt([]))  # its ids come from the pair call below
            elif item.text_pair is not None:
                out.append(self._pair(item))
            elif item.token_ids is not None:
                limit, given = item.truncate_prompt_tokens, item.token_ids
                if limit is not None and len(given) > limit:
                    given = given[-limit:] if item.truncate_side == "start" else given[:limit]
                out.append(given)
            else:
                text = self._text(item)
                if isinstance(text, InvalidInput):
                    out.append(text)
                else:
                    texts[i] = text
                    out.append([])  # its ids come from the one call below
        for i, ids in zip(texts, self.encode_texts(list(texts.values())), strict=True):
            limit, chunk = items[i].truncate_prompt_tokens, items[i].chunk_tokens
            if chunk is not None and not isinstance(ids, InvalidInput) and len(ids) > chunk:
                out[i] = self.windows(ids, chunk)
            elif limit is not None and not isinstance(ids, InvalidInput) and len(ids) > limit:
                out[i] = (
                    self.cut_start(ids, limit)
                    if items[i].truncate_side == "start"
                    else encode_one(self.tok, texts[i], limit)  # only the over-long, once more
                )
            else:
                out[i] = ids
        for i, pair in zip(pairs, self._encode_pairs([items[i] for i in pairs]), strict=True):
            out[i] = pair
        return out

    def _text(self, item: WorkItem) -> str | InvalidInput:
        """An item's text: its own, or its template rendered."""
        if item.prompt_template is None:
            return item.text or ""
        try:
            text = prompts.render(item.prompt_template, item.fields or {}, self.truncate_tokens)
        except prompts.TemplateError as e:
            return InvalidInput(ErrorCode.INVALID_PROMPT_TEMPLATE, f"prompt_template: {e}")
        if not text:
            return InvalidInput(
                ErrorCode.INVALID_PROMPT_TEMPLATE, "prompt_template rendered an empty prompt"
            )
        return text

    def encode_texts(self, texts: list[str]) -> list[list[int] | InvalidInput]:
        """Token ids of ``texts`` (special tokens added, not truncated), as ``tok(texts)``
        gives them, in one call of the fast tokenizer's Rust backend (``tokenizers``), which
        encodes the batch without holding the GIL; where the call fails, text by text, so that
        only the texts the tokenizer refuses fail."""
        if not texts:
            return []
        try:
            return list(self._encode_batch(texts))
        except Exception:  # noqa: BLE001 - find the inputs that fail, keep the rest
            return [encode_one(self.tok, t) for t in texts]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The backend's ``encode_batch_fast`` (``tokenizers`` >= 0.21: no character offsets,
        which the worker does not use) where it has one, its ``encode_batch`` else; ``tok``
        itself where there is no such backend."""
        if self._batch_encode is None:
            self._batch_encode = False
            backend = getattr(self.tok, "_tokenizer", None)
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
            return [list(ids) for ids in self.tok(texts, add_special_tokens=True)["input_ids"]]
        return [e.ids for e in self._batch_encode(texts, add_special_tokens=True)]

    def _encode_pairs(self, items: list[WorkItem]) -> list[PairPrompt | InvalidInput]:
        """A cross-encoder's pairs in one call of the tokenizer (ids and token type ids, as
        ``tokenizer(query, document)`` encodes each); where it fails, pair by pair."""
        if not items:
            return []
        try:
            enc = self.tok(
                [item.text or "" for item in items],
                [item.text_pair or "" for item in items],
                add_special_tokens=True,
            )
        except Exception:  # noqa: BLE001 - find the pairs that fail, keep the rest
            return [self._pair(item) for item in items]
        types = enc.get("token_type_ids")
        return [
            PairPrompt(list(enc["input_ids"][k]), token_type_ids=list(types[k]) if types else None)
            for k in range(len(items))
        ]

    def _pair(self, item: WorkItem) -> PairPrompt | InvalidInput:
        """A pair's token ids (see :class:`PairPrompt`), as vLLM's score API tokenizes it;
        ``truncate_prompt_tokens`` cuts the document of a cross-encoder pair (the query is
        kept whole) and each text of the other types."""
        if self.score_type == "causal-lm":
            return InvalidInput(
                ErrorCode.INVALID_INPUT,
                "a causal-LM reranker scores pairs through its rerank prompt (return_logits), "
                "not text_pair",
            )
        query, document, limit = item.text or "", item.text_pair or "", item.truncate_prompt_tokens
        if self.score_type == "cross-encoder":
            return self._cross_pair(query, document, limit)
        first, second = encode_one(self.tok, query, limit), encode_one(self.tok, document, limit)
        if isinstance(first, InvalidInput):
            return first
        if isinstance(second, InvalidInput):
            return second
        return PairPrompt(first, second)

    def _cross_pair(
        self, query: str, document: str, limit: int | None
    ) -> PairPrompt | InvalidInput:
        """A cross-encoder's pair as one sequence, the document cut to ``limit`` tokens."""
        if not self.use_sep_token:  # an LLM as a reranker: one text
            joined = encode_one(self.tok, query + document, limit)
            return joined if isinstance(joined, InvalidInput) else PairPrompt(joined)
        kw: dict[str, Any] = {}
        if limit is not None:
            kw = {"truncation": "only_second", "max_length": limit}
        try:
            enc = self.tok(text=query, text_pair=document, add_special_tokens=True, **kw)
        except Exception as e:  # noqa: BLE001 - the tokenizer's own error, per input
            return InvalidInput(ErrorCode.INVALID_INPUT, f"the tokenizer cannot encode: {e}")
        types = enc.get("token_type_ids")
        return PairPrompt(list(enc["input_ids"]), token_type_ids=list(types) if types else None)


def encode_one(tok: Any, text: str, truncate: int | None = None) -> list[int] | InvalidInput:
    """Token ids of one text (at most ``truncate`` of them, special tokens included, as
    vLLM's ``truncate_prompt_tokens`` gives: the end of the text cut), or the InvalidInput
    saying why the tokenizer refused it (e.g. a lone surrogate, which cannot be encoded as
    UTF-8)."""
    kw: dict[str, Any] = {} if truncate is None else {"truncation": True, "max_length": truncate}
    try:
        return list(tok(text, add_special_tokens=True, **kw)["input_ids"])
    except Exception as e:  # noqa: BLE001 - the tokenizer's own error, reported per input
        return InvalidInput(ErrorCode.INVALID_INPUT, f"the tokenizer cannot encode this text: {e}")
