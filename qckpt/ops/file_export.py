"""Export a snapshot to one file other tools read: ``torch.save`` or safetensors.

* ``torch``: the whole committed tree (tensors and plain data, e.g. a
  ``TrainingState``'s components, step and RNG states), as ``torch.load``
  returns it.
* ``safetensors``: every tensor by its state path (NumPy arrays as tensors of
  the same dtype); the file's metadata holds ``qckpt.snapshot`` and
  ``qckpt.step``. Safetensors holds tensors only: plain data (step counters
  inside optimizer param groups, RNG tuples, extras) is not in it. Needs the
  ``safetensors`` package.

Both are written to a temporary file beside ``dest`` and renamed into place
(``qckpt.ops.destination``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qckpt.errors import InvalidInputError
from qckpt.ops.destination import new_destination
from qckpt.ops.view import SnapshotView

FORMATS = ("zarr", "torch", "safetensors")
_SUFFIXES = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors", ".zarr": "zarr"}


def format_for(dest: Path, requested: str | None) -> str:
    """The export format: ``requested``, else the one ``dest``'s suffix names, else zarr."""
    if requested is None:
        return _SUFFIXES.get(dest.suffix.lower(), "zarr")
    if requested not in FORMATS:
        raise InvalidInputError(f"unknown export format {requested!r}: use one of {', '.join(FORMATS)}")
    return requested


def export_file(view: SnapshotView, dest: Path, fmt: str, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Write ``view``'s snapshot to the new file ``dest`` as ``fmt`` ("torch" or
    "safetensors"); returns the number of tensors."""
    count = len(view)
    with new_destination(dest, "file name") as tmp:
        if fmt == "torch":
            torch.save(view.tree(), tmp)
        elif fmt == "safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError:
                raise InvalidInputError("exporting to safetensors needs the safetensors package: pip install safetensors") from None
            tensors = {}
            for n, path in enumerate(view):
                value = view[path]
                tensors[path] = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
                if progress:
                    progress("exporting", n + 1, count)
            save_file(tensors, str(tmp), metadata={"qckpt.snapshot": view.snapshot.id, "qckpt.step": str(view.snapshot.step)})
        else:
            raise InvalidInputError(f"export_file writes torch or safetensors files, not {fmt!r}")
    return count
