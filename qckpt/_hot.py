"""Staging and the hot tier: snapshots' tensors kept in host memory.

``stage`` copies a commit's arrays into memory the repository owns, so the
training loop may change its tensors as soon as staging returns, and the
bytes that are hashed, encoded and kept as the next commit's delta base are
exactly the ones committed. The ``HotTier`` keeps the staged (or restored)
tensors of the most recent snapshots, bounded by count and bytes; a hot
snapshot is the base the next commit predicts from.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qckpt._predict import ParamRule
from qckpt._records import TensorEntry
from qckpt._tensors import flat_bytes, numpy_dtype_name, raw_bytes, torch_dtype_name
from qckpt._tree import ArrayLeaf


@dataclass(frozen=True)
class StagedArray:
    """One tensor's bytes, owned by the repository: path, kind, dtype, shape, data
    (flat uint8); ``dropped``: low mantissa bits the lossy tier rounded away."""

    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    data: np.ndarray
    pinned: bool = False  # page-locked (staged from CUDA)
    dropped: int = 0


def stage(leaves: Sequence[ArrayLeaf], take: Callable[[int, bool], np.ndarray] | None = None) -> list[StagedArray]:
    """Copy every leaf's bytes into host buffers from ``take(nbytes, pinned)`` (new
    ones by default); the only step that reads live tensors. CUDA tensors are
    copied into pinned buffers with non-blocking transfers and one
    synchronisation at the end."""
    take = take or (lambda n, pinned: _new_buffer(n, pinned))
    staged = []
    cuda = False
    for leaf in leaves:
        value = leaf.value
        if isinstance(value, torch.Tensor):
            kind, dtype, width = "tensor", torch_dtype_name(value.dtype), value.element_size()
        else:
            kind, dtype, width = "ndarray", numpy_dtype_name(value.dtype), value.itemsize
        assert dtype is not None  # encode_tree rejected unsupported dtypes
        cuda_leaf = isinstance(value, torch.Tensor) and value.is_cuda
        if cuda_leaf:
            flat = flat_bytes(value.detach().resolve_conj().resolve_neg().contiguous())
            data = take(flat.numel(), True)
            torch.from_numpy(data).copy_(flat, non_blocking=True)
            cuda = True
        else:
            if isinstance(value, torch.Tensor) and value.is_contiguous() and value.device.type == "cpu" and value.numel() \
                    and not value.is_conj() and not value.is_neg():  # fmt: skip
                source = flat_bytes(value.detach())  # the common case, without raw_bytes' checks
            else:
                source = torch.from_numpy(raw_bytes(value))
            data = take(source.numel(), False)
            torch.from_numpy(data).copy_(source)
        staged.append(StagedArray(leaf.path, kind, dtype, tuple(value.shape), width, data, pinned=cuda_leaf))
    if cuda:
        torch.cuda.synchronize()
    return staged


def _new_buffer(nbytes: int, pinned: bool) -> np.ndarray:
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(nbytes, dtype=np.uint8)


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


class HotTier:
    """The most recently committed or restored snapshots, newest last, bounded by
    ``max_snapshots`` and ``max_bytes`` (the newest always stays). Thread-safe.

    Buffers of evicted snapshots are recycled by ``take`` (at most one
    snapshot's worth is kept for that), which saves page faults when staging.
    Hot buffers are read only by the writer thread (as the delta base, before
    it evicts anything) and by ``copy_out`` under the tier's lock, so a
    recycled buffer is never still being read.
    """

    def __init__(self, max_snapshots: int, max_bytes: int | None) -> None:
        self.max_snapshots = max_snapshots
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, HotSnapshot] = OrderedDict()
        self._free: dict[tuple[int, bool], list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, pinned: bool) -> np.ndarray:
        """A buffer of ``nbytes`` for staging: recycled when one is free, else new."""
        with self._lock:
            free = self._free.get((nbytes, pinned))
            if free:
                self._free_bytes -= nbytes
                return free.pop()
        return _new_buffer(nbytes, pinned)

    def copy_out(self, snapshot_id: str, paths: Sequence[str]) -> list[np.ndarray] | None:
        """Copies of a hot snapshot's buffers for ``paths``, or None if it is not (fully) hot."""
        with self._lock:
            hot = self._items.get(snapshot_id)
            if hot is None or any(p not in hot.arrays for p in paths):
                return None
            return [hot.arrays[p].data.copy() for p in paths]

    def get(self, snapshot_id: str | None) -> HotSnapshot | None:
        with self._lock:
            return self._items.get(snapshot_id) if snapshot_id is not None else None

    def put(self, hot: HotSnapshot) -> None:
        if self.max_snapshots < 1:
            return
        with self._lock:
            self._items[hot.snapshot_id] = hot
            self._items.move_to_end(hot.snapshot_id)
            while len(self._items) > self.max_snapshots or (
                self.max_bytes is not None and len(self._items) > 1 and self.nbytes > self.max_bytes
            ):
                _, evicted = self._items.popitem(last=False)
                self._recycle(evicted)

    def _recycle(self, evicted: HotSnapshot) -> None:
        limit = max((h.nbytes for h in self._items.values()), default=0)
        for array in evicted.arrays.values():
            if self._free_bytes + array.data.nbytes <= limit:
                self._free.setdefault((array.data.nbytes, array.pinned), []).append(array.data)
                self._free_bytes += array.data.nbytes

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

