"""Prompt templates (``prompt_template``, rerank prompts): rendering, errors, the sandbox and
``truncate_tokens`` with the bundled model's real tokenizer."""

from __future__ import annotations

import pytest

from common import prompts
from common.prompts import TemplateError, render
from tests.support import MINILM_FILES
from worker.model_entry import QWEN3_RERANK_INSTRUCTION, QWEN3_RERANK_TEMPLATE


def _no_truncation(s: str, n: int | None = None) -> str:
    return s


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM_FILES)


@pytest.mark.parametrize(
    "template,fields,want",
    [
        (
            "Embed this text: {text}",
            {"text": "a fox"},
            "Embed this text: a fox",
        ),  # Fireworks' example
        ("{title}\n\n{ body }", {"title": "T", "body": "B"}, "T\n\nB"),
        ("{{ title | upper }}: {body}", {"title": "t", "body": "b"}, "T: b"),
        ("{% if title is defined %}{title}: {% endif %}{body}", {"body": "b"}, "b"),
        ("{% for t in tags %}#{t} {% endfor %}", {"tags": ["x", "y"]}, "#x #y "),
        ("keeps {{ '{' }}braces{{ '}' }} and {{'{{'}}", {}, "keeps {braces} and {{"),
        ("ends with two newlines\n\n", {}, "ends with two newlines\n\n"),
        ("n={n} ok={ok}", {"n": 3, "ok": True}, "n=3 ok=True"),
    ],
)
def test_render(template, fields, want):
    assert render(template, fields, _no_truncation) == want


def test_qwen3_rerank_template_renders_as_documented():
    """The reference format from Qwen3-Reranker's model card, written out by hand."""
    got = render(
        QWEN3_RERANK_TEMPLATE,
        {"query": "q?", "document": "d.", "instruction": QWEN3_RERANK_INSTRUCTION},
        _no_truncation,
    )
    want = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on "
        'the Query and the Instruct provided. Note that the answer can only be "yes" or '
        '"no".<|im_end|>\n<|im_start|>user\n<Instruct>: Given a web search query, '
        "retrieve relevant passages that answer the query\n<Query>: q?\n<Document>: d."
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert got == want


@pytest.mark.parametrize(
    "template,fields,needle",
    [
        ("{title}: {body}", {"title": "t"}, "'body' is undefined"),
        ("{% if x %}y{% endif %}", {}, "'x' is undefined"),
        ("{{ text.__class__.__mro__ }}", {"text": "x"}, "not allowed"),
        ("{{ 1 / 0 }}", {}, "ZeroDivisionError"),
        (
            "{% for i in range(1000) %}{% for j in range(1000) %}xx{% endfor %}{% endfor %}",
            {},
            "longer than",
        ),
    ],
)
def test_render_errors(template, fields, needle):
    with pytest.raises(TemplateError, match=needle):
        render(template, fields, _no_truncation)


@pytest.mark.parametrize(
    "template,needle",
    [
        ("{{ text ", "syntax error on line 1"),
        ("line\n{% if %}", "syntax error on line 2"),
        ("x" * (prompts.MAX_TEMPLATE_CHARS + 1), "at most"),
    ],
)
def test_compile_errors(template, needle):
    with pytest.raises(TemplateError, match=needle):
        prompts.compile_template(template)


def test_fields_used():
    assert prompts.fields_used("{a} {{ b }} {{ truncate_tokens(c, 3) }}") == {"a", "b", "c"}


def test_truncate_tokens_cuts_at_a_token_boundary(tok):
    text = "The quick brown fox jumps over the lazy dog again and again."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    truncate = prompts.token_truncator(tok, default_max_tokens=7)
    for n in (0, 1, 5, len(ids), len(ids) + 3):
        cut = truncate(text, n)
        assert text.startswith(cut)
        assert tok(cut, add_special_tokens=False)["input_ids"] == ids[:n]
    assert tok(truncate(text), add_special_tokens=False)["input_ids"] == ids[:7]  # the default
    got = render("passage: {{ truncate_tokens(body, 4) }}", {"body": text}, truncate)
    assert got == "passage: The quick brown fox"
    with pytest.raises(TemplateError, match="non-negative"):
        render("{{ truncate_tokens(body, -1) }}", {"body": text}, truncate)
    with pytest.raises(TemplateError, match="takes a string"):
        render("{{ truncate_tokens(n) }}", {"n": 3}, truncate)
