"""Freed memory kept for reuse, in real processes: a block freed and allocated again faults in no
pages; the worker and the gateway say so at start."""

from __future__ import annotations

from pathlib import Path

import psutil

from common import heap
from devstack import localstack as ls
from tests.unit.test_heap import _second_block_faults


def test_freed_memory_is_reused_without_page_faults(tmp_path: Path) -> None:
    """A 64 MiB block freed and allocated again: glibc's defaults unmap it and fault 16,384
    new pages in; after retain_freed_memory(), and in a process spawned after it (as the
    worker's engine process is), the freed block is reused in place."""
    default = _second_block_faults("run", tmp_path)
    called = _second_block_faults("call", tmp_path)
    spawned = _second_block_faults("spawn", tmp_path)
    print(
        f"page faults of a second 64 MiB block: default {default}, retained {called}, "
        f"spawned after {spawned}"
    )
    assert default > 8_000  # what is avoided: (64 MiB / 4 KiB) pages faulted in again
    assert called < 1_000
    assert spawned < 1_000


def test_the_worker_keeps_freed_memory(embed_worker: ls.Proc) -> None:
    """The worker says at start that freed memory is kept, and the processes it started
    carry RETAIN_ENV. (vLLM's processes rename themselves, which overwrites the environment
    /proc shows for them; the worker's other children, such as multiprocessing's resource
    tracker, show what every child spawned from it inherits.)"""
    assert "malloc: freed memory kept for reuse" in embed_worker.log_path.read_text(
        errors="replace"
    )
    shown = []
    for child in psutil.Process(embed_worker.pid).children(recursive=True):
        environ = child.environ()
        if "PATH" in environ:  # not overwritten
            shown.append({k: environ.get(k) for k in heap.RETAIN_ENV})
    assert shown and all(env == heap.RETAIN_ENV for env in shown), shown


def test_the_gateway_keeps_freed_memory(tmp_path: Path) -> None:
    """The gateway says at start (at its default log level) that freed memory is kept."""
    gateway = ls.start_gateway(tmp_path, env={"LOG_LEVEL": "info"})
    try:
        log = gateway.log_path.read_text(errors="replace")
    finally:
        assert gateway.stop() == 0
    assert "malloc: freed memory kept for reuse" in log, log
