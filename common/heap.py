"""The heap of a long-running process: its garbage collector, its startup objects, and
whether freed memory goes back to the operating system.

A worker tracks hundreds of thousands of objects in Python's cyclic garbage collector once
vLLM, torch and transformers are imported, and each full collection walks all of them on the
event loop that pulls, posts and feeds the engine. Those objects live as long as the process,
so they are moved out of the collector's sight once startup is done, as vLLM does in its own
engine core (``gc.freeze``); what is allocated later is collected as usual. At the end they
are handed back (:func:`thaw_startup_heap`), as vLLM does at its engine's shutdown, so that
the interpreter's exit finalizes them (nanobind-based extensions such as triton otherwise
report their objects as leaked, in plain text in a JSON log).

Freed memory stays with the process (:func:`retain_freed_memory`). glibc's malloc serves a
large block with a fresh ``mmap`` and unmaps it when freed, and gives the top of its heap back
once enough is free there; the next block of that size then faults in new pages. Every engine
step allocates and frees its activations, every request its bodies, and inside a virtual
machine whose guest reports free memory to its host (free page reporting, as on this
project's test machines) a page handed back costs the host too. The worker and the gateway set
glibc to serve every block from the heap (``M_MMAP_MAX`` 0) and to trim the heap only past
:data:`TRIM_THRESHOLD` of free memory at its top, so that freed memory is reused in place; the
processes they start (vLLM's engine and model runner) inherit the same through
:data:`RETAIN_ENV`. The price: a process's resident memory stays at its peak instead of
following its load. Figures: ``docs/cpu-hosts.md``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: ``mallopt(3)`` parameters (``<malloc.h>``).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free bytes at the top of the heap before glibc gives them back (glibc's default: 128 KiB).
TRIM_THRESHOLD = 1 << 30
#: The same settings for processes started from this one (glibc reads them at start).
RETAIN_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
#: Variables through which an operator tunes glibc's malloc: any of them set (or an allocator
#: such as tcmalloc or jemalloc in ``LD_PRELOAD``), the process keeps the operator's choice
#: (e.g. ``MALLOC_TRIM_THRESHOLD_=131072``, glibc's default, to give memory back as before).
MALLOC_TUNING = (
    "GLIBC_TUNABLES",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)


def freeze_startup_heap() -> int:
    """Collect what startup left behind, then move every object still tracked to the
    permanent generation (``gc.freeze``), which later collections skip. Returns how many
    objects were frozen; call once, when startup is done."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug("garbage collector: %d startup objects frozen", frozen)
    return frozen


def thaw_startup_heap() -> None:
    """Undo :func:`freeze_startup_heap` (before the process exits)."""
    gc.unfreeze()


def retain_freed_memory(environ: MutableMapping[str, str] | None = None) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the
    operating system, in this process (``mallopt``) and, through :data:`RETAIN_ENV` put into
    ``environ`` (default ``os.environ``), in the processes it starts (see the module
    docstring). Returns False, changing nothing, where the operator tunes malloc (a variable
    of :data:`MALLOC_TUNING` set, or an allocator in ``LD_PRELOAD``: a library whose name
    contains "malloc") or the C library is not glibc; call first thing at start."""
    env = os.environ if environ is None else environ
    tuned = sorted(name for name in MALLOC_TUNING if env.get(name))
    if "malloc" in env.get("LD_PRELOAD", ""):
        tuned.append("LD_PRELOAD")
    if tuned:
        log.info("malloc: %s set, glibc's settings left as they are", ", ".join(tuned))
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return False
    env.update(RETAIN_ENV)
    log.info(
        "malloc: freed memory kept for reuse (M_MMAP_MAX 0, M_TRIM_THRESHOLD %d MiB), also in "
        "the processes started from here",
        TRIM_THRESHOLD >> 20,
    )
    return True
