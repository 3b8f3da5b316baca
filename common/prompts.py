"""Prompt templates: Fireworks' ``prompt_template`` and the rerank prompts.

Syntax: Jinja2, rendered in a sandbox (``jinja2.sandbox.ImmutableSandboxedEnvironment``: no
attribute access to Python internals, no mutation), plus the ``{field}`` shorthand of
Fireworks' embeddings API: a single-brace name is the same as ``{{ field }}``. Fields come from
a structured input object (``{"title": ..., "body": ...}``), or are ``text`` for a plain string
input; rerank prompts get ``query``, ``document`` and ``instruction``. A field the template uses
but the input lacks is an error (``StrictUndefined``); ``{% if x is defined %}`` tests for one.

``truncate_tokens(s, n=None)`` keeps the first ``n`` tokens of ``s`` by the model's own
tokenizer, cut at a token boundary of the original text (default ``n``: the model's context
length less its special tokens). It is given by the worker, which has the tokenizer; the gateway
only compiles a template to report syntax errors before anything is queued.

Source of the API: Fireworks' ``POST /v1/embeddings`` reference (``prompt_template``,
structured object inputs, ``truncate_tokens(string)``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Longest template accepted, characters.
MAX_TEMPLATE_CHARS = 65_536
#: Longest rendered prompt, characters; rendering stops with an error beyond it.
MAX_RENDERED_CHARS = 1_000_000

#: ``{name}`` not part of ``{{``/``}}``: Fireworks' shorthand for ``{{ name }}``.
_SHORTHAND = re.compile(r"(?<!\{)\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}(?!\})")

_ENV = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)

TruncateTokens = Callable[..., str]


class TemplateError(ValueError):
    """A template that cannot be compiled or rendered; ``str()`` says why (for a 400)."""


def to_jinja(template: str) -> str:
    """Rewrite the ``{field}`` shorthand to Jinja2's ``{{ field }}``; the rest is unchanged."""
    return _SHORTHAND.sub(r"{{ \1 }}", template)


@functools.lru_cache(maxsize=512)
def compile_template(template: str) -> jinja2.Template:
    """The compiled template (cached per template text).

    Raises :class:`TemplateError` for a template over :data:`MAX_TEMPLATE_CHARS` or with a
    Jinja2 syntax error (the message names the line)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"the template has {len(template)} characters; at most {MAX_TEMPLATE_CHARS} are allowed"
        )
    try:
        return _ENV.from_string(to_jinja(template))
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"syntax error on line {e.lineno}: {e.message}") from None


def fields_used(template: str) -> set[str]:
    """Names a template reads (besides ``truncate_tokens``); :class:`TemplateError` if it does
    not compile."""
    from jinja2 import meta

    tpl_source = to_jinja(template)
    compile_template(template)
    return meta.find_undeclared_variables(_ENV.parse(tpl_source)) - {"truncate_tokens"}


def render(template: str, fields: Mapping[str, Any], truncate_tokens: TruncateTokens) -> str:
    """``template`` with ``fields`` filled in -> the prompt text.

    Raises :class:`TemplateError` for a syntax error, a field the input lacks, an operation
    the sandbox refuses, an error raised while rendering, or output over
    :data:`MAX_RENDERED_CHARS`."""
    tpl = compile_template(template)
    parts: list[str] = []
    size = 0
    try:
        for chunk in tpl.generate({**fields, "truncate_tokens": truncate_tokens}):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise TemplateError(
                    f"the rendered prompt is longer than {MAX_RENDERED_CHARS} characters"
                )
            parts.append(chunk)
    except TemplateError:
        raise
    except jinja2.UndefinedError as e:
        raise TemplateError(f"{e.message}: the input has no such field") from None
    except SecurityError as e:
        raise TemplateError(f"not allowed in a template: {e}") from None
    except Exception as e:  # noqa: BLE001 - any error of a user's template is the user's
        raise TemplateError(f"{type(e).__name__}: {e}") from None
    return "".join(parts)


def token_truncator(tokenizer: Any, default_max_tokens: int) -> TruncateTokens:
    """``truncate_tokens(s, n=None)`` for templates, by ``tokenizer`` (a fast Hugging Face
    tokenizer: offsets are needed); ``n`` defaults to ``default_max_tokens``."""

    def truncate_tokens(text: Any, max_tokens: int | None = None) -> str:
        if not isinstance(text, str):
            raise TemplateError("truncate_tokens() takes a string")
        n = default_max_tokens if max_tokens is None else max_tokens
        if not isinstance(n, int) or n < 0:
            raise TemplateError("truncate_tokens(s, n): n must be a non-negative integer")
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        if len(offsets) <= n:
            return text
        return text[: offsets[n - 1][1]] if n > 0 else ""

    return truncate_tokens
