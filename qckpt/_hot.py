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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qckpt._predict import ParamRule
from qckpt._records import TensorEntry
from qckpt._tensors import numpy_dtype_name, raw_bytes, torch_dtype_name
from qckpt._tree import ArrayLeaf


@dataclass(frozen=True)
class StagedArray:
    """One tensor's bytes, owned by the repository: path, kind, dtype, shape, data (flat uint8)."""

    path: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    data: np.ndarray


def stage(leaves: Sequence[ArrayLeaf]) -> list[StagedArray]:
    """Copy every leaf's bytes into new host buffers (the only step that reads live tensors)."""
    staged = []
    for leaf in leaves:
        value = leaf.value
        if isinstance(value, torch.Tensor):
            kind, dtype, width = "tensor", torch_dtype_name(value.dtype), value.element_size()
        else:
            kind, dtype, width = "ndarray", numpy_dtype_name(value.dtype), value.itemsize
        assert dtype is not None  # encode_tree rejected unsupported dtypes
        view = raw_bytes(value)
        data = np.empty(view.size, dtype=np.uint8)
        np.copyto(data, view)
        staged.append(StagedArray(leaf.path, kind, dtype, tuple(value.shape), width, data))
    return staged


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
    ``max_snapshots`` and ``max_bytes`` (the newest always stays). Thread-safe."""

    def __init__(self, max_snapshots: int, max_bytes: int | None) -> None:
        self.max_snapshots = max_snapshots
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, HotSnapshot] = OrderedDict()
        self._lock = threading.Lock()

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
                self._items.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
