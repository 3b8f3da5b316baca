"""``inference-batch``: the input file it builds (fast), and a real run against the session's
gateway and worker with a progress bar and the output written (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import localstack as ls
from gateway.batch.cli import batch_lines
from tests.conftest import MODEL


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


@pytest.mark.slow
def test_submit_and_wait_writes_the_output(gateway: ls.Proc, embed_worker: ls.Proc, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"sentence number {i}\n" for i in range(40)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": ls.API_KEY, "OPENAI_BASE_URL": gateway.url + "/v1"}
    cli = Path(sys.executable).with_name("inference-batch")
    run = subprocess.run(
        [str(cli), "submit", str(texts), "--model", MODEL, "--wait", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    batch_id = run.stdout.splitlines()[0]
    assert batch_id.startswith("batch_") and "completed; completed 40, failed 0" in run.stdout
    assert "40/40" in run.stderr  # the progress bar's last state
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(o["custom_id"] for o in lines) == sorted(f"line-{i}" for i in range(1, 41))
    status = subprocess.run(
        [str(cli), "status", batch_id], env=env, capture_output=True, text=True, timeout=60
    )
    assert json.loads(status.stdout)["status"] == "completed"
