"""The startup heap is moved out of the garbage collector's walks (``common.heap``)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

from common import heap


def test_startup_objects_are_frozen_and_no_longer_walked():
    """Objects alive at the call are frozen (a full collection no longer visits them); what is
    allocated afterwards is tracked as usual."""
    startup = [[i] for i in range(50_000)]  # long-lived, like imported modules' objects
    try:
        before = len(gc.get_objects())
        frozen = heap.freeze_startup_heap()
        assert frozen >= 50_000
        assert gc.get_freeze_count() == frozen
        assert len(gc.get_objects()) <= before - 50_000
        later = [[j] for j in range(1_000)]
        assert gc.is_tracked(later[0]) and any(o is later[0] for o in gc.get_objects())
        assert not any(o is startup[0] for o in gc.get_objects())
    finally:
        heap.thaw_startup_heap()  # the rest of the test session collects as before
    assert gc.get_freeze_count() == 0


# --- freed memory kept for reuse (heap.retain_freed_memory) ---------------------------------

#: Allocates and writes 64 MiB twice, freeing the first; prints the page faults of the second.
#: argv[1]: "run" as started; "call": retain_freed_memory() first; "spawn": that, then the
#: measurement in a child started as the worker starts its engine process (multiprocessing's
#: spawn: a new interpreter that inherits the environment).
FAULTS_SCRIPT = """
import multiprocessing, resource, sys
from common import heap

def second_block_faults(queue=None):
    size = 64 << 20
    block = b"x" * size  # malloc + write: every page touched
    del block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = b"y" * size
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if queue is None:
        print(faults)
    else:
        queue.put(faults)

if __name__ == "__main__":
    if sys.argv[1] in ("call", "spawn"):
        assert heap.retain_freed_memory()
    if sys.argv[1] == "spawn":
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=second_block_faults, args=(queue,))
        child.start()
        print(queue.get(timeout=60))
        child.join()
    else:
        second_block_faults()
"""


def _second_block_faults(mode: str, tmp_path: Path) -> int:
    script = tmp_path / "faults.py"
    script.write_text(FAULTS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in heap.MALLOC_TUNING}
    env.pop("LD_PRELOAD", None)
    env["PYTHONPATH"] = str(Path(heap.__file__).parents[1])
    out = subprocess.run(
        [sys.executable, str(script), mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip())


def test_an_operators_malloc_settings_are_left_alone() -> None:
    """A glibc malloc variable, or an allocator preloaded, wins: nothing is changed."""
    for env in (
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=8"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"},
    ):
        given = dict(env)
        assert heap.retain_freed_memory(given) is False
        assert given == env
