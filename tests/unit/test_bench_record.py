"""``bench/record.py``: what ``make bench`` keeps under ``bench/results/`` (the tests that run
``git`` to read the commit are in ``tests/e2e/test_bench_record.py``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_bench_script_records_its_results() -> None:
    """suite, rerank, dtype and forward (what ``make bench`` runs) each write a JSON file."""
    makefile = (REPO / "Makefile").read_text()
    for script in ("suite", "rerank", "dtype", "forward"):
        assert f"bench/{script}.py" in makefile
        assert "record.write(" in (REPO / "bench" / f"{script}.py").read_text()
