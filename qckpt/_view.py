"""A read-only, lazy view of one snapshot, usable without any model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from qckpt._records import Manifest, Snapshot, TensorEntry
from qckpt._tree import decode_tree

Reader = Callable[[Snapshot, list[TensorEntry]], list[torch.Tensor | np.ndarray]]


class SnapshotView(Mapping[str, "torch.Tensor | np.ndarray"]):
    """Tensors of a snapshot by path (``components/model/fc.weight``), read on access.

    Indexing reads and digest-checks only that tensor's chunks; ``entry(path)``
    gives dtype and shape without reading anything; ``tree()`` rebuilds the
    whole committed structure, plain values included. Values are fresh CPU
    tensors (or numpy arrays) owned by the caller. Thread-safe.
    """

    def __init__(self, snapshot: Snapshot, manifest: Manifest, reader: Reader) -> None:
        self.snapshot = snapshot
        self._manifest = manifest
        self._entries = {e.path: e for e in manifest.tensors}
        self._read = reader

    def entry(self, path: str) -> TensorEntry:
        """Metadata (dtype, shape, chunk ids) of the tensor at ``path``."""
        return self._entries[path]

    def __getitem__(self, path: str) -> torch.Tensor | np.ndarray:
        return self._read(self.snapshot, [self._entries[path]])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def tree(self) -> Any:
        """The full committed tree with every tensor read."""
        values = self._read(self.snapshot, list(self._manifest.tensors))
        return decode_tree(self._manifest.tree, values.__getitem__)

    def __repr__(self) -> str:
        return f"<SnapshotView {self.snapshot.short_id} step={self.snapshot.step} tensors={len(self)}>"
