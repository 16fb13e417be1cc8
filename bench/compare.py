"""Bitwise comparison of training-state trees, shared by the demo and the tests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of equal dtype and shape."""
    if a.numel() == 0:
        return True
    dense_a, dense_b = (torch.empty(t.shape, dtype=t.dtype).copy_(t.detach().cpu()) for t in (a, b))
    return torch.equal(dense_a.reshape(-1).view(torch.uint8), dense_b.reshape(-1).view(torch.uint8))


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two trees differ: tensors/arrays by dtype, shape and every bit;
    floats bitwise too (NaN equals NaN, 0.0 differs from -0.0); containers by type and keys."""
    where = path or "<root>"
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        return [] if _same_bits(a, b) else [f"{where}: values differ"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
        same = same and a.shape == b.shape and a.tobytes() == b.tobytes()
        return [] if same else [f"{where}: arrays differ"]
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
    if isinstance(a, float):
        same = (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    if isinstance(a, np.generic):
        return [] if a.dtype == b.dtype and a.tobytes() == b.tobytes() else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
