"""The hot tier: the tensors of the most recent snapshots, kept in host memory.

The ``HotTier`` keeps the staged (or restored) tensors of the most recent
snapshots, bounded by count and bytes; a hot snapshot is the base the next
commit predicts from, and restoring it is a memory copy.
"""

from __future__ import annotations

import threading
from collections import ChainMap, Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from qckpt.commit.predict import ParamRule
from qckpt.commit.staging import StagedArray, new_buffer
from qckpt.format.records import TensorEntry
from qckpt.format.tensors import copied


@dataclass(frozen=True)
class HotSnapshot:
    """A snapshot whose tensors are in memory: arrays and entries by path, and the
    optimizer update rules captured with it (for predictions)."""

    snapshot_id: str
    arrays: Mapping[str, StagedArray]
    entries: Mapping[str, TensorEntry]
    rules: Mapping[str, ParamRule]
    step: int | None

    @property
    def nbytes(self) -> int:
        return sum(a.data.nbytes for a in self.arrays.values())

    @cached_property
    def chunk_views(self) -> dict[bytes, memoryview]:
        """Its chunks by id, as views of its buffers (built once, on first use)."""
        return {chunk_id: memoryview(self.arrays[path].data[at : at + length])
                for path, entry in self.entries.items() if path in self.arrays
                for chunk_id, at, length in entry.spans()}  # fmt: skip


class HotTier:
    """The most recently committed or restored snapshots, newest last, bounded by
    ``max_snapshots`` and ``max_bytes`` (the newest always stays); least recently
    used first out, where a restore from the tier counts as a use (``copy_out``
    makes the snapshot the newest). ``keep`` exempts a snapshot from eviction
    and from the bounds until as many ``release`` calls: the light cone's
    origin, restored once per future while the futures commit. ``alias`` lets
    a join find its winner's buffers. Thread-safe.

    Buffers of evicted snapshots are recycled by ``take`` (at most one
    snapshot's worth is kept for that), which saves page faults when staging.
    Thread contract: ``put`` (the only call that evicts) runs on the writer
    thread, the only reader of hot buffers as delta bases; ``copy_out`` copies
    under the tier's lock. So a recycled buffer is never still being read.
    """

    def __init__(self, max_snapshots: int, max_bytes: int | None) -> None:
        self.max_snapshots = max_snapshots
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, HotSnapshot] = OrderedDict()
        self._free: dict[tuple[int, bool], list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lent: set[str] = set()  # snapshots whose buffers a restore handed out: never recycled
        self._kept: Counter[str] = Counter()  # snapshots never evicted (see ``keep``)
        self._aliases: dict[str, str] = {}  # snapshot -> the hot one with the very same tensors (see ``alias``)
        self._lock = threading.Lock()

    def take(self, nbytes: int, pinned: bool) -> np.ndarray:
        """A buffer of ``nbytes`` for staging: recycled when one is free, else new."""
        with self._lock:
            free = self._free.get((nbytes, pinned))
            if free:
                self._free_bytes -= nbytes
                return free.pop()
        return new_buffer(nbytes, pinned)

    def copy_out(self, snapshot_id: str, paths: Sequence[str], only_read: Sequence[bool],
                 into: Sequence[np.ndarray | torch.Tensor | None] | None = None) -> list[np.ndarray | torch.Tensor] | None:  # fmt: skip
        """A hot snapshot's buffers for ``paths`` (None if it is not fully hot): copies
        (written into ``into[i]`` where given: the caller's own memory), except where
        ``only_read`` says the caller only reads it and the buffer is writable: then
        the buffer itself, and the snapshot's buffers are never recycled for staging
        (they may still be read). The snapshot becomes the newest."""
        into = into or [None] * len(paths)
        with self._lock:
            snapshot_id = self._aliases.get(snapshot_id, snapshot_id)
            hot = self._items.get(snapshot_id)
            if hot is None or any(p not in hot.arrays for p in paths):
                return None
            # read-only buffers (a mapped warm copy) are copied all the same: a tensor must be writable
            out = [hot.arrays[p].data if r and hot.arrays[p].data.flags.writeable else copied(hot.arrays[p].data, d)
                   for p, r, d in zip(paths, only_read, into)]  # fmt: skip
            if any(o is hot.arrays[p].data for o, p in zip(out, paths)):
                self._lent.add(snapshot_id)
            self._items.move_to_end(snapshot_id)
            return out

    def discard(self, snapshot_id: str) -> None:
        """Forget a snapshot whose buffers may have been written by someone it lent them to."""
        with self._lock:
            snapshot_id = self._aliases.get(snapshot_id, snapshot_id)
            if snapshot_id in self._items:
                self._forget(snapshot_id)
            self._lent.discard(snapshot_id)

    def get(self, snapshot_id: str | None) -> HotSnapshot | None:
        with self._lock:
            return self._items.get(self._aliases.get(snapshot_id, snapshot_id)) if snapshot_id is not None else None

    def alias(self, snapshot_id: str, same_as: str) -> bool:
        """Let ``snapshot_id``, a snapshot with the very same tensors as hot ``same_as``
        (a join of it), find it: restoring either is a memory copy, and a commit on
        either predicts from those tensors. Until ``same_as`` leaves the tier; False
        (nothing done) if it is not there."""
        with self._lock:
            same_as = self._aliases.get(same_as, same_as)
            if same_as not in self._items:
                return False
            self._aliases[snapshot_id] = same_as
            return True

    def put(self, hot: HotSnapshot) -> None:
        if self.max_snapshots < 1:
            return
        with self._lock:
            self._aliases.pop(hot.snapshot_id, None)
            self._items[hot.snapshot_id] = hot
            self._items.move_to_end(hot.snapshot_id)
            while (evicted := self._least_recently_used_beyond_bounds()) is not None:
                self._recycle(self._forget(evicted))

    def _forget(self, snapshot_id: str) -> HotSnapshot:
        """Drop a hot snapshot and the aliases of it (under the lock)."""
        self._aliases = {a: s for a, s in self._aliases.items() if s != snapshot_id}
        return self._items.pop(snapshot_id)

    def _least_recently_used_beyond_bounds(self) -> str | None:
        """The snapshot to evict: the oldest one neither kept (itself or by an alias)
        nor the newest, while the snapshots not kept exceed ``max_snapshots`` or
        ``max_bytes``."""
        newest = next(reversed(self._items))
        kept = {self._aliases.get(s, s) for s in self._kept}
        counted = [s for s in self._items if s not in kept]
        over = len(counted) > self.max_snapshots or (
            self.max_bytes is not None and sum(self._items[s].nbytes for s in counted) > self.max_bytes
        )
        return next((s for s in counted if s != newest), None) if over else None

    def keep(self, snapshot_id: str) -> None:
        """Never evict ``snapshot_id`` (now, or once it enters) until ``release``d as often."""
        with self._lock:
            self._kept[snapshot_id] += 1

    def release(self, snapshot_id: str) -> None:
        """Undo one ``keep``; the snapshot is evicted as usual from the next ``put`` on."""
        with self._lock:
            self._kept[snapshot_id] -= 1
            if self._kept[snapshot_id] <= 0:
                del self._kept[snapshot_id]

    def keep_once_written(self, written_id: Callable[[], str | None]) -> tuple[Callable[[], None], Callable[[], None]]:
        """A ``keep`` of the snapshot a commit in flight writes: ``(apply, cancel)``.
        ``apply`` (a writer job queued right behind that commit) keeps
        ``written_id()`` (None: the commit failed, nothing is kept) unless
        ``cancel`` came first; ``cancel`` releases what ``apply`` kept. Either
        may be called from any thread, ``cancel`` at most once."""
        lock = threading.Lock()
        kept: list[str] = []
        cancelled = False

        def apply() -> None:
            with lock:
                snapshot_id = written_id()
                if not cancelled and snapshot_id is not None:
                    self.keep(snapshot_id)
                    kept.append(snapshot_id)

        def cancel() -> None:
            nonlocal cancelled
            with lock:
                cancelled = True
                for snapshot_id in kept:
                    self.release(snapshot_id)

        return apply, cancel

    @contextmanager
    def chunks(self) -> Iterator[Mapping[bytes, memoryview]]:
        """Every hot snapshot's chunks by id, as views of its buffers (the bytes the
        chunk ids were computed from, or verified on a read), for a read from
        storage whose chains may stop there. The snapshots are kept while the
        block runs, so none of these buffers is recycled for staging meanwhile."""
        with self._lock:
            held = list(self._items.values())
            self._kept.update(h.snapshot_id for h in held)
        try:
            yield ChainMap(*(hot.chunk_views for hot in held))
        finally:
            for hot in held:
                self.release(hot.snapshot_id)

    def _recycle(self, evicted: HotSnapshot) -> None:
        if evicted.snapshot_id in self._lent:
            self._lent.discard(evicted.snapshot_id)
            return
        limit = max((h.nbytes for h in self._items.values()), default=0)
        for array in evicted.arrays.values():  # read-only ones (a mapped warm copy) cannot be staged into
            if array.data.flags.writeable and self._free_bytes + array.data.nbytes <= limit:
                self._free.setdefault((array.data.nbytes, array.pinned), []).append(array.data)
                self._free_bytes += array.data.nbytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

