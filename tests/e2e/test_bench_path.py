"""``bench/path.py`` (``make bench``'s null-engine mode) runs: a real gateway and the real
worker with its bench-only null engine answer both load patterns, and every table says it
was a null engine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP = "two-workers,redis,replicas"  # the memory-store stack alone: seconds


def test_the_null_engine_bench_measures_both_patterns_and_says_so():
    # enough inputs that each role's CPU time is many of psutil's 10 ms ticks
    args = ["--rounds", "1", "--big", "6400", "--small", "640", "--settle", "0"]
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "path.py"), *args, "--no-save", "--skip", SKIP],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "## The serving path alone — NULL ENGINE (bench only)" in r.stdout
    rows = re.findall(
        r"^\| memory store, 1 worker \| (\S+) \| ([\d,]+) .*\| ([\d.]+) / ([\d.]+) /",
        r.stdout,
        re.M,
    )
    assert [row[0] for row in rows] == ["64/request", "1/request"]
    for _, rate, gateway_cpu, worker_cpu in rows:
        assert int(rate.replace(",", "")) > 0
        assert float(gateway_cpu) > 0 and float(worker_cpu) > 0  # both roles were measured
