"""``inference-batch``: the input file it builds (fast), and a real run against the session's
gateway and worker with a progress bar and the output written (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.batch.cli import batch_lines


def test_plain_text_lines_become_batch_lines_and_json_lines_get_the_model(tmp_path: Path):
    plain = tmp_path / "texts.txt"
    plain.write_text("first text\n\nthird line\n")
    lines = [json.loads(x) for x in batch_lines(plain, "m", "/v1/embeddings").splitlines()]
    assert lines == [
        {
            "custom_id": "line-1",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"input": "first text", "model": "m"},
        },
        {
            "custom_id": "line-3",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"input": "third line", "model": "m"},
        },
    ]
    given = tmp_path / "batch.jsonl"
    mine = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/rerank",
        "body": {"query": "q", "documents": ["d"]},
    }
    given.write_text(json.dumps(mine) + "\n")
    (line,) = [json.loads(x) for x in batch_lines(given, "r", "/v1/rerank").splitlines()]
    assert line["body"] == {"query": "q", "documents": ["d"], "model": "r"}
    with pytest.raises(SystemExit, match=r"batch.jsonl:1: the line names no model"):
        batch_lines(given, None, "/v1/rerank")
