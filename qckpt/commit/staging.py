"""Staging: a commit's arrays copied into host memory the repository owns.

``stage`` is the only step of a commit that reads live tensors. Once it
returns, the training loop may change its tensors: the bytes that are hashed,
encoded and kept as the next commit's delta base are exactly the ones staged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qckpt.format.tensors import flat_bytes, flat_elements, numpy_dtype_name, raw_bytes, torch_dtype_name
from qckpt.format.tree import ArrayLeaf


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
    take = take or (lambda n, pinned: new_buffer(n, pinned))
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
            data = take(value.numel() * width if isinstance(value, torch.Tensor) else value.nbytes, False)
            if isinstance(value, torch.Tensor) and value.is_contiguous() and value.device.type == "cpu" and value.numel() \
                    and not value.is_conj() and not value.is_neg():  # fmt: skip
                # the common case, without raw_bytes' checks; copied as its own dtype (~15% faster than as bytes)
                torch.from_numpy(data).view(value.dtype).copy_(flat_elements(value.detach()))
            else:
                torch.from_numpy(data).copy_(torch.from_numpy(raw_bytes(value)))
        staged.append(StagedArray(leaf.path, kind, dtype, tuple(value.shape), width, data, pinned=cuda_leaf))
    if cuda:
        torch.cuda.synchronize()
    return staged


def new_buffer(nbytes: int, pinned: bool) -> np.ndarray:
    if pinned:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(nbytes, dtype=np.uint8)
