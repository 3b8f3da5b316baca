"""The startup heap is moved out of the garbage collector's walks (``worker.heap``)."""

from __future__ import annotations

import gc

from worker import heap


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
