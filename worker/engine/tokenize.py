"""The ``tokenize`` task: the model's tokenizer alone, no engine step. A text's tokens as TEI's
``/tokenize`` lists them (id, the text it covers, special or not, UTF-8 byte offsets), or
token ids' text as TEI's ``/decode`` gives it (``tokenizer.decode``)."""

from __future__ import annotations

from itertools import accumulate
from typing import Any

from common.protocol import ErrorCode, ItemResult, Token, WorkItem


def tokenize(tokenizer: Any, item: WorkItem) -> ItemResult:
    """``item``'s answer with a Hugging Face fast ``tokenizer``: for a text, its tokens (with
    the special tokens added unless ``special_tokens`` is false); for token ids, their text
    (the special tokens left out unless ``special_tokens``). A tokenizer error (e.g. an id
    outside the vocabulary) is the item's ``invalid_input`` error, not the batch's."""
    try:
        if item.token_ids is not None:
            text = tokenizer.decode(item.token_ids, skip_special_tokens=not item.special_tokens)
            return ItemResult.tokenized(item, text=text)
        return ItemResult.tokenized(item, tokens=tokens_of(tokenizer, item))
    except (ValueError, TypeError, OverflowError, IndexError, KeyError) as e:
        return ItemResult.failed(item, ErrorCode.INVALID_INPUT, f"cannot tokenize: {e}")


def tokens_of(tokenizer: Any, item: WorkItem) -> list[Token]:
    """The tokens of ``item.text`` (or of its rendered template: not offered by the routes).
    Offsets count UTF-8 bytes, as TEI's (Rust ``tokenizers``) do; Python's count characters."""
    text = item.text or ""
    enc = tokenizer(
        text,
        add_special_tokens=item.special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    data = text.encode("utf-8", "surrogatepass")
    # byte offset of every character boundary (index i: the bytes before character i)
    at = [0, *accumulate(len(c.encode("utf-8", "surrogatepass")) for c in text)]
    pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    out = []
    for tid, (start, stop), special, piece in zip(
        enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], pieces, strict=True
    ):
        if special:
            out.append(Token(id=tid, text=piece, special=True))
            continue
        lo, hi = at[start], at[stop]
        covered = data[lo:hi].decode("utf-8", "replace")
        out.append(Token(id=tid, text=covered, special=False, start=lo, stop=hi))
    return out
