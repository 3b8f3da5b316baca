"""``bench/record.py``: what ``make bench`` keeps under ``bench/results/``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import record  # noqa: E402


def test_a_result_is_written_with_its_commit_command_and_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["bench/dtype.py", "--rounds", "3"])
    path = record.write("dtype", {"dtypes": [{"dtype": "float32", "sentences_per_s": [1.5]}]})
    assert path == tmp_path / "results" / "dtype.json"
    data = json.loads(path.read_text())
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert data["run"]["commit"].startswith(head)
    assert data["run"]["command"] == "dtype.py --rounds 3"
    assert data["run"]["cores"] >= 1
    assert data["dtypes"] == [{"dtype": "float32", "sentences_per_s": [1.5]}]


def test_every_bench_script_records_its_results() -> None:
    """suite, rerank, dtype and forward (what ``make bench`` runs) each write a JSON file."""
    makefile = (REPO / "Makefile").read_text()
    for script in ("suite", "rerank", "dtype", "forward"):
        assert f"bench/{script}.py" in makefile
        assert "record.write(" in (REPO / "bench" / f"{script}.py").read_text()
