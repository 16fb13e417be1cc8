"""A snapshot as a read-only zarr v3 store: tensors become arrays whose chunks are
served lazily from the repository.

Layout, as in ``export_zarr``: one array per tensor at its state path, a group
(with ``zarr.json``) at every prefix, the snapshot's metadata and plain-data
tree in the root group's ``qckpt`` attribute. Each array is chunked along its
first dimension so a zarr chunk is about one repository chunk; reading a zarr
chunk reads (and digest-checks) only the repository chunks under it. Dtypes
zarr lacks (bfloat16, float8) are served as unsigned integers of the same
width, with attribute ``qckpt_dtype`` naming the real dtype.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterable
from typing import Any

import numpy as np
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.abc.store import Store as ZarrStore
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype

from qckpt.format.records import Manifest, Snapshot, TensorEntry
from qckpt.format.tensors import TORCH_DTYPES, numpy_dtype
from qckpt.store.store import Store

_SAME_WIDTH_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


def zarr_dtype(entry: TensorEntry) -> tuple[np.dtype, str]:
    """The numpy dtype zarr stores a tensor as, and the endianness of its bytes."""
    if entry.kind == "ndarray":
        dtype = numpy_dtype(entry.dtype)
        return dtype.newbyteorder("<"), "big" if dtype.byteorder == ">" else "little"
    try:
        dtype = np.dtype(str(TORCH_DTYPES[entry.dtype]).removeprefix("torch."))
    except TypeError:  # no numpy equivalent (bfloat16, float8): the bits as unsigned integers
        dtype = np.dtype(_SAME_WIDTH_UINT[entry.itemsize])
    return dtype, "little"


def root_attributes(snapshot: Snapshot, manifest: Manifest) -> dict[str, Any]:
    return {"qckpt": {
        "snapshot": snapshot.id, "step": snapshot.step, "time": snapshot.time, "message": snapshot.message,
        "tree": manifest.tree, "arrays": [t.path for t in manifest.tensors],
    }}  # fmt: skip


def _rows_per_chunk(entry: TensorEntry) -> int:
    row_bytes = math.prod(entry.shape[1:]) * entry.itemsize
    return max(1, entry.chunk_size // row_bytes) if row_bytes else 1


class SnapshotStore(ZarrStore):
    """Read-only zarr v3 store over one snapshot (``Repository.zarr_store``)."""

    supports_writes = False
    supports_deletes = False
    supports_listing = True

    def __init__(self, store: Store, snapshot: Snapshot) -> None:
        super().__init__(read_only=True)
        self._chunks = store
        self.snapshot = snapshot
        manifest = store.manifest(snapshot)
        self._arrays = {e.path: e for e in manifest.tensors}
        groups = {""} | {"/".join(p.split("/")[:i]) for p in self._arrays for i in range(1, p.count("/") + 1)}
        self._metadata: dict[str, bytes] = {}
        for group in groups:
            attributes = root_attributes(snapshot, manifest) if group == "" else {}
            self._metadata[_join(group, "zarr.json")] = _json({"zarr_format": 3, "node_type": "group", "attributes": attributes})
        for path, entry in self._arrays.items():
            self._metadata[_join(path, "zarr.json")] = _json(self._array_metadata(entry))

    def _array_metadata(self, entry: TensorEntry) -> dict[str, Any]:
        dtype, endian = zarr_dtype(entry)
        chunks = [_rows_per_chunk(entry), *entry.shape[1:]] if entry.shape else []
        codec: dict[str, Any] = {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": endian}}
        return {
            "zarr_format": 3, "node_type": "array", "shape": list(entry.shape), "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": False if dtype.kind == "b" else 0, "codecs": [codec],
            "attributes": {"qckpt_dtype": entry.dtype},
        }  # fmt: skip

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SnapshotStore) and other._chunks is self._chunks and other.snapshot.id == self.snapshot.id

    def _chunk_bytes(self, key: str) -> bytes | None:
        """The bytes of one zarr chunk (``<array path>/c[/<i>/0/...]``), or None if no such key."""
        path, _, coordinates = key.rpartition("/c")
        entry = self._arrays.get(path)
        if entry is None or (coordinates and not coordinates.startswith("/")):
            return None
        parts = coordinates.split("/")[1:] if coordinates else []
        if len(parts) != len(entry.shape) or not all(p.isdigit() for p in parts) or any(int(p) for p in parts[1:]):
            return None
        if not entry.shape:
            return bytes(self._chunks.read_bytes(self.snapshot, entry, 0, entry.nbytes))
        rows = _rows_per_chunk(entry)
        row_bytes = math.prod(entry.shape[1:]) * entry.itemsize
        first = int(parts[0]) * rows
        if first >= entry.shape[0]:
            return None
        last = min(first + rows, entry.shape[0])
        data = bytes(self._chunks.read_bytes(self.snapshot, entry, first * row_bytes, last * row_bytes))
        return data + bytes((rows - (last - first)) * row_bytes)  # edge chunks are stored at full size

    def _value(self, key: str) -> bytes | None:
        return self._metadata[key] if key in self._metadata else self._chunk_bytes(key)

    async def get(self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None) -> Buffer | None:
        value = await asyncio.to_thread(self._value, key)
        if value is None:
            return None
        if isinstance(byte_range, RangeByteRequest):
            value = value[byte_range.start : byte_range.end]
        elif isinstance(byte_range, OffsetByteRequest):
            value = value[byte_range.offset :]
        elif isinstance(byte_range, SuffixByteRequest):
            value = value[-byte_range.suffix :]
        return (prototype or default_buffer_prototype()).buffer.from_bytes(value)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(key, prototype, byte_range) for key, byte_range in key_ranges]

    async def exists(self, key: str) -> bool:
        return key in self._metadata or await asyncio.to_thread(self._chunk_bytes, key) is not None

    async def set(self, key: str, value: Buffer) -> None:
        self._check_writable()

    async def delete(self, key: str) -> None:
        self._check_writable()

    async def list(self) -> AsyncIterator[str]:
        for key in self._metadata:
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for key in self._metadata:
            if key.startswith(prefix):
                yield key

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        prefix = prefix.rstrip("/")
        children = set()
        for key in self._metadata:
            rest = key[len(prefix) + 1 :] if prefix else key
            if (not prefix or key.startswith(prefix + "/")) and rest:
                children.add(rest.split("/")[0])
        for child in sorted(children):
            yield child


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()
