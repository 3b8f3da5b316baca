"""What can go wrong with one input or with the engine, and vLLM's messages turned into them.

Per-input problems are :class:`InvalidInput` (a client-fault :class:`ErrorCode`); they never
affect other inputs in flight. :class:`EngineDead`: the worker must stop and be restarted."""

from __future__ import annotations

from common.protocol import ErrorCode


class InvalidInput(Exception):
    """An input the engine refuses (too long, bad token ids, unsupported dimensions, a template
    that does not render ...); ``code`` is one of the client-fault :class:`ErrorCode` s."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EngineDead(Exception):
    """The vLLM engine has failed; the worker must stop and be restarted."""


def refusal(
    message: str, *, prompt_tokens: int, max_model_len: int, truncate: int | None
) -> InvalidInput:
    """vLLM's message refusing a request (``VLLMValidationError`` or ``ValueError``) as the
    :class:`InvalidInput` of the error code it means, said in this API's words
    (``return_logits``, ``truncate_prompt_tokens``). ``prompt_tokens``: the input's length;
    ``truncate``: its ``truncate_prompt_tokens``."""
    if "maximum context length" in message or "maximum model length" in message:
        if truncate is not None:  # truncated, still too long
            return InvalidInput(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"truncate_prompt_tokens is {truncate}, more than the maximum context length "
                f"of {max_model_len} tokens",
            )
        return InvalidInput(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"input has {prompt_tokens} tokens, more than the maximum context length of "
            f"{max_model_len} tokens; shorten it or set truncate_prompt_tokens",
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
