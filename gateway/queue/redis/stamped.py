"""A dict whose entries are stamped when kept, in the order of their stamps, so that the
oldest are dropped first and cheaply (:meth:`Stamped.forget_older`)."""

from __future__ import annotations

import time
from typing import Generic, TypeVar

V = TypeVar("V")


class Stamped(Generic[V]):
    def __init__(self) -> None:
        self._items: dict[str, tuple[float, V]] = {}

    def keep(self, key: str, value: V) -> None:
        """Store ``value`` stamped now (monotonic s), last in order."""
        self._items.pop(key, None)
        self._items[key] = (time.monotonic(), value)

    def get(self, key: str) -> tuple[float, V] | None:
        """(stamp, value), or None."""
        return self._items.get(key)

    def pop(self, key: str) -> tuple[float, V] | None:
        return self._items.pop(key, None)

    def forget_older(self, seconds: float) -> None:
        """Drop the entries stamped more than ``seconds`` ago (oldest first)."""
        cutoff = time.monotonic() - seconds
        while self._items:
            oldest = next(iter(self._items))
            if self._items[oldest][0] >= cutoff:
                break
            del self._items[oldest]

    def __len__(self) -> int:
        return len(self._items)
