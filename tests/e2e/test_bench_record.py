"""``bench/record.py`` reads the commit it measured with ``git`` (a subprocess, so these are
not in the fast layer): a result carries it, marked ``-dirty`` for changed code only."""

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


def test_a_commit_is_dirty_for_changed_code_not_for_overwritten_results(tmp_path: Path) -> None:
    """A bench overwrites its own committed results (``suite-fast.json``): the next run on the
    same code is not marked ``-dirty`` for it; a changed tracked file elsewhere is."""

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "suite-fast.json").write_text("{}\n")
    (tmp_path / "worker.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = record._commit(tmp_path)
    assert head and not head.endswith("-dirty") and head != "unknown"
    (tmp_path / "bench" / "results" / "suite-fast.json").write_text('{"run": 2}\n')
    assert record._commit(tmp_path) == head
    (tmp_path / "worker.py").write_text("x = 2\n")
    assert record._commit(tmp_path) == f"{head}-dirty"
    assert record._commit(tmp_path / "no-such-checkout") == "unknown"
