"""Export a snapshot to a standard zarr v3 directory that plain zarr-python reads.

Each tensor becomes an array at its state path (``components/model/fc.weight``).
dtypes zarr lacks (bfloat16, float8) are stored as unsigned integers of the
same width, bit for bit, with attribute ``qckpt_dtype`` naming the real dtype.
The root group's ``qckpt`` attribute holds the snapshot's metadata and its
plain-data tree (tagged JSON, see docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr

from qckpt.errors import AlreadyExistsError, InvalidInputError

if TYPE_CHECKING:
    from qckpt.repository import Repository

_SAME_WIDTH_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _numpy(value: torch.Tensor | np.ndarray) -> tuple[np.ndarray, str | None]:
    """The value as numpy, plus the real dtype name when it had to be stored as raw bits."""
    if isinstance(value, np.ndarray):
        return value, None
    try:
        return value.numpy(), None
    except TypeError:  # no numpy equivalent (bfloat16, float8): keep the bits
        bits = value.reshape(-1).view(torch.uint8).numpy().view(_SAME_WIDTH_UINT[value.element_size()])
        return bits.reshape(tuple(value.shape)), str(value.dtype).removeprefix("torch.")


def export_zarr(repo: Repository, revision: str, dest: Path, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Write the snapshot at ``revision`` to a new zarr v3 directory ``dest``; returns the number of arrays."""
    if dest.exists():
        raise AlreadyExistsError(f"{dest} exists already; choose a new directory")
    snap = repo.snapshot(revision)
    manifest = repo.manifest(snap)
    root = zarr.open_group(str(dest), mode="w-", zarr_format=3)
    root.attrs["qckpt"] = {
        "snapshot": snap.id, "step": snap.step, "time": snap.time, "message": snap.message,
        "tree": manifest.tree, "arrays": [t.path for t in manifest.tensors],
    }  # fmt: skip
    for n, entry in enumerate(manifest.tensors):
        data, real_dtype = _numpy(repo.read_arrays(snap, [entry])[0])
        try:
            array = root.create_array(name=entry.path, shape=data.shape, dtype=data.dtype, chunks="auto")
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"state key {entry.path!r} cannot be a zarr array name: {e}") from e
        array[...] = data
        array.attrs["qckpt_dtype"] = real_dtype or entry.dtype
        if progress:
            progress("exporting", n + 1, len(manifest.tensors))
    return len(manifest.tensors)
