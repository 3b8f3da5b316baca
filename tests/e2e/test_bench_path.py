"""``bench/path.py`` (``make bench``'s null-engine mode) runs: a real gateway and the real
worker with its bench-only null engine answer both load patterns, and every table says it
was a null engine; ``--ab REV`` runs the stack on both builds and prints their ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP = "two-workers,redis,redis-unix,replicas,cluster"  # the memory-store stack alone: seconds


# enough inputs that each role's CPU time is many of psutil's 10 ms ticks
ARGS = ["--big", "6400", "--small", "640", "--settle", "0", "--no-save"]


def bench(*args: str, skip: str = SKIP) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "path.py"), *ARGS, "--skip", skip, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def test_the_null_engine_bench_measures_both_patterns_and_says_so():
    r = bench("--rounds", "1")
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
    # the worker's tokenization alone, beside it: a floor below the worker's own CPU per input
    floor = re.findall(
        r"^\| (\S+) \| (\d+) \| ([\d.]+) \| [\d,]+ \| memory store, 1 worker (\d+)% \|$",
        r.stdout,
        re.M,
    )
    assert [(p, n) for p, n, _, _ in floor] == [("64/request", "64"), ("1/request", "1")], floor
    worker = {row[0]: float(row[3]) for row in rows}
    for pattern, _, cpu, share in floor:
        assert 0 < float(cpu) < worker[pattern] and 0 < int(share) < 100


def test_the_redis_stack_runs_over_a_unix_socket_too():
    """The Redis store reached through redis-server's Unix socket (``unix://``), measured
    as the TCP stack is: both patterns, redis-server's CPU counted."""
    r = bench("--rounds", "1", skip="memory,two-workers,redis,replicas,cluster")
    rows = re.findall(
        r"^\| Redis store over a Unix socket, 1 gateway \| (\S+) \| [\d,]+ .*\| "
        r"[\d.]+ / [\d.]+ / ([\d.]+) /",
        r.stdout,
        re.M,
    )
    assert [row[0] for row in rows] == ["64/request", "1/request"], r.stdout[-3000:]
    assert all(float(redis_cpu) > 0 for _, redis_cpu in rows)  # redis-server was measured


def test_the_ab_mode_runs_each_build_side_by_side_and_prints_their_ratios():
    rev = "HEAD"  # the commit of this tree: the same code on both sides
    r = bench("--rounds", "1", "--ab", rev)
    for build in (rev, "this tree"):  # both builds measured, both patterns
        rows = re.findall(rf"^\| memory store, 1 worker \[{build}\] \| (\S+) \|", r.stdout, re.M)
        assert rows == ["64/request", "1/request"], r.stdout[-3000:]
    assert f"## A/B, this tree / {rev}" in r.stdout
    ratios = re.findall(
        r"^\| memory store, 1 worker \| (\S+) \| ([\d.]+) \(.*\| ([\d.]+) \(.*\| ([\d.]+) \(",
        r.stdout,
        re.M,
    )
    assert [row[0] for row in ratios] == ["64/request", "1/request"], r.stdout[-3000:]
    for _, rate, gateway, worker in ratios:
        assert all(0 < float(x) < 100 for x in (rate, gateway, worker))
    # the base build's worker ran the code of the archived commit, the other this tree's
    logs = Path(re.search(r"^logs: (\S+)", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    froms = {
        m.group(1)
        for log in logs.glob("null-worker-*.log")
        if (m := re.search(r"worker code from (\S+)", log.read_text()))
    }
    assert froms == {str(logs / "ab-tree"), str(REPO)}, froms
