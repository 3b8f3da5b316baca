"""``inference-batch submit --wait`` against the session's gateway and worker: a file of texts in,
its output lines out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from devstack import localstack as ls
from tests.support.stack import MODEL


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


def test_cancel_stops_a_running_batch(gateway: ls.Proc, embed_worker: ls.Proc, tmp_path):
    """``inference-batch submit`` (no ``--wait``) prints the id; ``inference-batch cancel ID``
    prints ``cancelling``; the batch ends ``cancelled`` with fewer lines done than sent."""
    import time

    texts = tmp_path / "many.txt"
    texts.write_text("".join(f"a sentence to embed, number {i}\n" for i in range(20_000)))
    env = {**os.environ, "OPENAI_API_KEY": ls.API_KEY, "OPENAI_BASE_URL": gateway.url + "/v1"}
    cli = Path(sys.executable).with_name("inference-batch")

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(cli), *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    batch_id = run("submit", str(texts), "--model", MODEL).splitlines()[0]
    assert batch_id.startswith("batch_")
    assert run("cancel", batch_id).strip() == "cancelling"
    deadline = time.monotonic() + 120
    while (got := json.loads(run("status", batch_id)))["status"] != "cancelled":
        assert got["status"] == "cancelling", got["status"]
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    counts = got["request_counts"]
    assert counts["total"] in (0, 20_000) and counts["completed"] < 20_000
