"""Where the benchmarks keep what they measured: ``bench/results/<name>.json``, committed with
the code it measured (the commit, the command line and the host are recorded beside the
figures)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: ``RESULTS`` as a path inside the repository (what a result's ``-dirty`` leaves out).
_RESULTS_IN_REPO = RESULTS.relative_to(HERE.parent).as_posix()


def _commit(repo: Path = HERE.parent) -> str:
    """``repo``'s short commit, with ``-dirty`` where a tracked file outside ``bench/results/``
    differs from it (a bench overwrites its own committed results; that is not a change of
    the code it measures); ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                f":(exclude){_RESULTS_IN_REPO}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` with the run's commit, command line, time and host to
    ``bench/results/<name>.json``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    run = {
        "commit": _commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
    }
    path.write_text(json.dumps({"run": run, **data}, indent=1, default=str) + "\n")
    print(f"results: {path}")
    return path
