"""The README's first command runs the main job: ``make demo`` (``scripts/demo.py``) starts a
gateway and a worker on the bundled model, embeds STS-benchmark sentences through the
``openai`` SDK, prints them, and stops everything cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_embeds_sts_pairs_and_exits_0():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "model=all-minilm-l6-v2 vectors=(12, 384)" in r.stdout
    assert "worker drained and exited with 0" in r.stdout
    cosines = [float(c) for c in re.findall(r"^  (-?\d\.\d{3})  gold", r.stdout, re.M)]
    golds = [float(g) for g in re.findall(r"gold (\d\.\d\d)", r.stdout)]
    assert len(cosines) == 6 == len(golds)
    # The near-paraphrases (gold >= 4.75) are closer than the loosely related pairs (gold < 3).
    assert min(c for c, g in zip(cosines, golds, strict=True) if g >= 4.75) > max(
        c for c, g in zip(cosines, golds, strict=True) if g < 3
    )
