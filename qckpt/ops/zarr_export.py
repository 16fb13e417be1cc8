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

import zarr

from qckpt.errors import InvalidInputError
from qckpt.ops.destination import new_destination
from qckpt.format.records import Snapshot
from qckpt.format.tensors import numpy_dtype
from qckpt.ops.zarr_store import root_attributes, zarr_dtype
from qckpt.store.store import Store


def export_zarr(store: Store, snap: Snapshot, dest: Path, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Write ``snap`` to a new zarr v3 directory ``dest`` (filled under a temporary
    name, see ``qckpt.ops.destination``); returns the number of arrays."""
    manifest = store.manifest(snap)
    with new_destination(dest, "directory") as tmp:
        root = zarr.open_group(str(tmp), mode="w-", zarr_format=3)
        root.attrs.update(root_attributes(snap, manifest))
        for n, entry in enumerate(manifest.tensors):
            raw = store.read_bytes(snap, entry, 0, entry.nbytes)
            dtype = numpy_dtype(entry.dtype) if entry.kind == "ndarray" else zarr_dtype(entry)[0]
            data = raw.view(dtype).reshape(entry.shape)
            try:
                array = root.create_array(name=entry.path, shape=data.shape, dtype=data.dtype, chunks="auto")
            except (ValueError, TypeError) as e:
                raise InvalidInputError(f"state key {entry.path!r} cannot be a zarr array name: {e}") from e
            array[...] = data
            array.attrs["qckpt_dtype"] = entry.dtype
            if progress:
                progress("exporting", n + 1, len(manifest.tensors))
    return len(manifest.tensors)
