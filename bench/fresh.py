"""Timing restores in a fresh process: nothing cached in memory by the process that wrote.

``restore_times`` pickles a benchmark method (which must not hold open
repositories or files when pickled) into a newly spawned Python process and
times its ``restore(index, template)`` there, best of ``repeats`` (each
repetition opens its reader anew). The page cache is the machine's, shared by
every method alike.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

from bench.timing import best_time


T = TypeVar("T")


class Restorable(Protocol):
    def restore(self, index: int, template: Any) -> None: ...


def _times(method: Restorable, indices: Sequence[int], template: Any, repeats: int) -> dict[int, float]:
    return {i: best_time(partial(method.restore, i, template), repeats) for i in indices}


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a newly spawned Python process (both pickled there, the result back)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def restore_times(method: Restorable, indices: Sequence[int], template: Any, repeats: int = 3) -> dict[int, float]:
    """Seconds to ``method.restore(i, template)`` for each index, in one fresh process."""
    return in_fresh_process(_times, method, list(indices), template, repeats)


def touch(tree: Any) -> None:
    """Read one byte of every page of every tensor in ``tree``, so restores that map
    files lazily pay for their page faults inside the timing, like those that copy."""
    import torch

    if isinstance(tree, torch.Tensor):
        if tree.numel():
            int(tree.detach().reshape(-1).view(torch.uint8)[::4096].sum())
    elif isinstance(tree, dict):
        for value in tree.values():
            touch(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            touch(value)
