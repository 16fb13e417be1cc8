"""Per-tensor comparison of two snapshots: the divergence view between branches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qckpt.format.records import Snapshot, TensorEntry
from qckpt.store.store import Store


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs between snapshots ``a`` and ``b``.

    ``status``: ``same`` (identical bytes), ``changed``, ``added`` (only in b),
    ``removed`` (only in a) or ``retyped`` (dtype or shape differ). For changed
    tensors: ``l2`` = ||b - a||, ``relative`` = l2 / ||a|| (inf when a is zero),
    ``cosine`` = cosine similarity of a and b (None when either is all zeros),
    computed in float64. Identical tensors are ``same`` with l2 0, relative 0
    and cosine 1.0 by convention, decided from chunk ids without reading.
    """

    path: str
    status: str
    l2: float | None = None
    relative: float | None = None
    cosine: float | None = None


def _as_float64(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.reshape(-1).to(torch.float64)


def _changed(path: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    x, y = _as_float64(a), _as_float64(b)
    na, nb = float(torch.linalg.vector_norm(x)), float(torch.linalg.vector_norm(y))
    l2 = float(torch.linalg.vector_norm(y - x))
    relative = l2 / na if na else (0.0 if l2 == 0 else float("inf"))
    cosine = float(torch.dot(x, y)) / (na * nb) if na and nb else None
    return TensorDiff(path, "changed", l2, relative, cosine)


def diff_snapshots(store: Store, a: Snapshot, b: Snapshot) -> list[TensorDiff]:
    """Compare every tensor path of two snapshots; identical chunk ids are ``same`` without reading."""
    left = {t.path: t for t in store.manifest(a).tensors}
    right = {t.path: t for t in store.manifest(b).tensors}
    out: list[TensorDiff] = []
    for path in [*left, *(p for p in right if p not in left)]:
        x: TensorEntry | None = left.get(path)
        y: TensorEntry | None = right.get(path)
        if x is None or y is None:
            out.append(TensorDiff(path, "added" if x is None else "removed"))
        elif (x.kind, x.dtype, x.shape) != (y.kind, y.dtype, y.shape):
            out.append(TensorDiff(path, "retyped"))
        elif x.chunks == y.chunks:
            out.append(TensorDiff(path, "same", 0.0, 0.0, 1.0))
        else:
            out.append(_changed(path, store.read_arrays(a, [x])[0], store.read_arrays(b, [y])[0]))
    return out
