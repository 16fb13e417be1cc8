"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``fn()``, in seconds (the least noisy on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class Timings:
    """Wall-clock timings by name, for methods timed in turns in one loop (so drift on a
    shared machine hits each alike); read them as ``best()`` or ``medians()``, in seconds."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def timed(self, name: str, fn: Callable[[], T]) -> T:
        """Call ``fn``, add its wall time under ``name``, return what it returned."""
        start = time.perf_counter()
        out = fn()
        self.samples.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def best(self) -> dict[str, float]:
        return {name: min(values) for name, values in self.samples.items()}

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.samples.items()}
