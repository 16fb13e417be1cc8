"""A read-only, lazy view of one snapshot, usable without any model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from qckpt.errors import InvalidInputError, NotFoundError
from qckpt.format.records import Manifest, Snapshot, TensorEntry
from qckpt.format.tensors import numpy_dtype, torch_dtype
from qckpt.format.tree import decode_tree, join_path

Reader = Callable[[Snapshot, list[TensorEntry]], list[torch.Tensor | np.ndarray]]
ByteReader = Callable[[Snapshot, TensorEntry, int, int], np.ndarray]
Index = int | slice | tuple[int | slice, ...]


class SnapshotView(Mapping[str, "torch.Tensor | np.ndarray"]):
    """Tensors of a snapshot by path (``components/model/fc.weight``), read on access.

    Indexing reads and digest-checks only that tensor's chunks; ``read(path,
    index)`` only the chunks covering a slice of it; ``entry(path)`` gives
    dtype and shape without reading anything; ``tree()`` rebuilds the whole
    committed structure, plain values included. Values are fresh CPU tensors
    (or numpy arrays) owned by the caller. Thread-safe.
    """

    def __init__(self, snapshot: Snapshot, manifest: Manifest, reader: Reader, byte_reader: ByteReader) -> None:
        self.snapshot = snapshot
        self._manifest = manifest
        self._entries = {e.path: e for e in manifest.tensors}
        self._read = reader
        self._read_bytes = byte_reader

    def entry(self, path: str) -> TensorEntry:
        """Metadata (dtype, shape, chunk ids) of the tensor at ``path`` (``NotFoundError``,
        also a ``KeyError``, if the snapshot has none there)."""
        found = self._entries.get(path)
        if found is None:
            name = str(path).rsplit("/", 1)[-1]
            near = sorted(p for p in self._entries if p.rsplit("/", 1)[-1] == name)[:3]
            example = next(iter(self._entries), "-")
            hint = f"; same name at: {', '.join(near)}" if near else f"; its {len(self._entries)} paths look like {example!r}"
            raise NotFoundError(f"snapshot {self.snapshot.short_id} has no tensor at {path!r}{hint}")
        return found

    def __getitem__(self, path: str) -> torch.Tensor | np.ndarray:
        return self._read(self.snapshot, [self.entry(path)])[0]

    def __contains__(self, path: object) -> bool:  # Mapping's default would read the tensor
        return path in self._entries

    def read(self, path: str, index: Index) -> torch.Tensor | np.ndarray:
        """``self[path][index]`` for basic indexing (ints and slices, any steps), reading
        only the chunks between the first and the last selected element."""
        entry = self.entry(path)
        selection = _normalize(index, entry.shape)
        if any(len(r) == 0 for r in selection):  # includes every tensor with no elements
            return _empty(entry, selection, index)
        strides = [math.prod(entry.shape[d + 1 :]) for d in range(len(entry.shape))]
        low = [min(r) for r in selection]
        high = [max(r) for r in selection]
        first = sum(lo * st for lo, st in zip(low, strides))
        last = sum(hi * st for hi, st in zip(high, strides))
        data = self._read_bytes(self.snapshot, entry, first * entry.itemsize, (last + 1) * entry.itemsize)
        region_shape = [hi - lo + 1 for lo, hi in zip(low, high)]
        local = tuple(_shifted(r, lo, keep) for r, lo, keep in zip(selection, low, _kept_dims(index, len(entry.shape))))
        # index raw elements (numpy knows no bfloat16/float8, and torch no negative steps)
        elements = data.view(np.dtype((np.void, entry.itemsize)))
        byte_strides = [st * entry.itemsize for st in strides]
        picked = np.lib.stride_tricks.as_strided(elements, region_shape, byte_strides)[local]
        flat = np.ascontiguousarray(picked).reshape(-1).view(np.uint8)
        if entry.kind == "ndarray":
            return flat.view(numpy_dtype(entry.dtype)).reshape(picked.shape)
        return torch.from_numpy(flat).view(torch_dtype(entry.dtype)).reshape(picked.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def tree(self) -> Any:
        """The full committed tree with every tensor read."""
        values = self._read(self.snapshot, list(self._manifest.tensors))
        return self._manifest.tree_of(values)

    def skeleton(self) -> Any:
        """The committed tree with every tensor as None: plain values, no tensor read."""
        return decode_tree(self._manifest.tree, lambda i: None)

    def parameter_of(self) -> dict[str, str]:
        """Optimizer state tensor path -> the tree path of the parameter it belongs to
        (``components/optimizer/state/3/exp_avg`` -> ``components/model/fc.weight``),
        as recorded by ``TrainingState`` commits; reads no tensor."""
        tree = self.skeleton()
        recorded = tree.get("parameters") if isinstance(tree, dict) else None
        owners: dict[str, str] = {}
        for optimizer, paths in (recorded or {}).items():
            base = join_path(join_path("components", optimizer), "state")
            owners.update((join_path(base, i), p) for i, p in enumerate(paths) if p is not None)
        return {e.path: owners[e.path.rsplit("/", 1)[0]] for e in self._manifest.tensors
                if e.path.rsplit("/", 1)[0] in owners}  # fmt: skip

    def __repr__(self) -> str:
        return f"<SnapshotView {self.snapshot.short_id} step={self.snapshot.step} tensors={len(self)}>"


def _kept_dims(index: Index, ndim: int) -> list[bool]:
    """Per dimension: whether the selection keeps it (a slice) or drops it (an int)."""
    parts = index if isinstance(index, tuple) else (index,)
    return [not isinstance(p, int) for p in parts] + [True] * (ndim - len(parts))


def _normalize(index: Index, shape: tuple[int, ...]) -> list[range]:
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) > len(shape) or any(isinstance(p, bool) or not isinstance(p, (int, slice)) for p in parts):
        raise InvalidInputError(f"index {index!r} must be ints and slices, at most {len(shape)} of them")
    out = []
    for d, size in enumerate(shape):
        part = parts[d] if d < len(parts) else slice(None)
        if isinstance(part, int):
            position = part + size if part < 0 else part
            if not 0 <= position < size:
                raise InvalidInputError(f"index {part} is out of range for dimension {d} of size {size}")
            out.append(range(position, position + 1))
        else:
            out.append(range(*part.indices(size)))
    return out


def _shifted(selected: range, low: int, keep: bool) -> int | slice:
    """The selection ``selected`` expressed in a region starting at ``low``."""
    start = selected.start - low
    if not keep:
        return start
    stop = start + len(selected) * selected.step
    return slice(start, stop if stop >= 0 else None, selected.step)


def _empty(entry: TensorEntry, selection: list[range], index: Index) -> torch.Tensor | np.ndarray:
    shape = [len(r) for r, keep in zip(selection, _kept_dims(index, len(entry.shape))) if keep]
    if entry.kind == "ndarray":
        return np.empty(shape, dtype=numpy_dtype(entry.dtype))
    return torch.empty(shape, dtype=torch_dtype(entry.dtype))
