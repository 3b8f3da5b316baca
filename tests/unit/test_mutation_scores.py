"""``scripts/mutation_scores.py`` (``make mutation``): the score per module from mutmut's result
files, and the seeded sample ``make mutation SAMPLE=N`` runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mutation_scores", ROOT / "scripts/mutation_scores.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta(mutants: Path, module: str, codes: dict[str, int | None]) -> None:
    path = mutants / f"{module}.meta"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exit_code_by_key": codes}))


def test_the_score_counts_timeouts_as_kills_and_untested_mutants_apart(
    tool: ModuleType, tmp_path: Path
) -> None:
    # killed (1), by the type checker (37), survived (0), timeout (36), no tests (33), unchecked
    _meta(tmp_path, "pkg/a.py", {"a_1": 1, "a_2": 37, "a_3": 0, "a_4": 36, "a_5": 33, "a_6": None})
    _meta(tmp_path, "pkg/b.py", {"b_1": None})
    counts = tool.scores(tool.results(tmp_path))
    line, score = tool._row("pkg/a.py", counts["pkg/a.py"])
    assert score == pytest.approx(3 / 4)
    assert line == "| pkg/a.py | 2 | 1 | 1 | 1 | 75.0% (1 not checked) |"
    # a module with nothing checked has no score, not 100 %
    assert tool._row("pkg/b.py", counts["pkg/b.py"]) == (
        "| pkg/b.py | 0 | 0 | 0 | 0 | n/a (1 not checked) |",
        None,
    )
    assert tool.survivors(tool.results(tmp_path)) == ["a_3"]


def test_a_sample_is_the_same_for_the_same_seed_and_picks_only_unchecked_mutants(
    tool: ModuleType, tmp_path: Path
) -> None:
    codes: dict[str, int | None] = {f"m_{i}": (1 if i % 2 else None) for i in range(100)}
    _meta(tmp_path, "pkg/m.py", codes)
    _meta(tmp_path, "pkg/small.py", {"s_1": None, "s_2": 0})
    first = tool.results(tmp_path, sample=10, seed=38)
    assert first == tool.results(tmp_path, sample=10, seed=38)
    assert len(first["pkg/m.py"]) == 10 and set(first["pkg/m.py"]) <= set(codes)
    assert first["pkg/m.py"] != tool.results(tmp_path, sample=10, seed=39)["pkg/m.py"]
    # a module with fewer mutants than the sample is taken whole
    assert first["pkg/small.py"] == {"s_1": None, "s_2": 0}


def test_pick_prints_the_unchecked_names_of_the_sample(
    tool: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codes: dict[str, int | None] = {f"m_{i}": (1 if i % 2 else None) for i in range(100)}
    _meta(tmp_path, "pkg/m.py", codes)
    argv = ["mutation_scores.py", "--mutants", str(tmp_path), "--sample", "10", "--pick"]
    monkeypatch.setattr("sys.argv", argv)
    assert tool.main() == 0
    picked = capsys.readouterr().out.split()
    sample = tool.results(tmp_path, sample=10, seed=38)["pkg/m.py"]
    assert picked == [name for name, code in sample.items() if code is None] and picked
