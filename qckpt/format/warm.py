"""The warm copy of a snapshot: every tensor's raw bytes, ready to use as they are.

```
offset  size  field
0       ...   body: tensor i's raw bytes at offsets[i], in manifest order, each offset
              the previous tensor's end rounded up to 64 bytes (zero padding between)
B       16    manifest id (raw 16 bytes) of the snapshot the copy holds
B+16    8     body length B, little endian
B+24    8     magic "QCKWARM1"
```

The layout is a pure function of the manifest's tensor table (``warm_layout``),
so the trailer only has to say which manifest it follows. Chunk ids are not
repeated: a reader hashes each chunk's span and compares it with the id the
manifest lists (``verify_warm``). Bytes only, no I/O.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from qckpt.errors import IntegrityError
from qckpt.format.ids import ID_BYTES, digest
from qckpt.format.records import TensorEntry

WARM_MAGIC = b"QCKWARM1"
WARM_ALIGN = 64
WARM_TRAILER_SIZE = ID_BYTES + 8 + len(WARM_MAGIC)
_LENGTH = struct.Struct("<Q")
_Span = tuple[TensorEntry, int, int, bytes, np.ndarray | None]  # entry, start in body, length, chunk id, copy to


def warm_layout(entries: Sequence[TensorEntry]) -> tuple[list[int], int]:
    """Where each tensor's bytes start in the body, and the body's length."""
    offsets, end = [], 0
    for entry in entries:
        start = -(-end // WARM_ALIGN) * WARM_ALIGN
        offsets.append(start)
        end = start + entry.nbytes
    return offsets, end


def build_warm(manifest_id: str, entries: Sequence[TensorEntry], arrays: Mapping[str, np.ndarray]) -> list[memoryview]:
    """The warm copy of a snapshot whose manifest (``manifest_id``) lists ``entries``, as
    parts to store back to back (the tensors' own buffers, zero padding, the trailer:
    nothing is copied); ``arrays`` holds each entry's raw bytes (flat uint8) by path."""
    offsets, body = warm_layout(entries)
    parts, end = [], 0
    for entry, offset in zip(entries, offsets):
        data = arrays[entry.path]
        if data.nbytes != entry.nbytes:
            raise ValueError(f"{entry.path}: {data.nbytes} bytes staged, the manifest lists {entry.nbytes}")
        if offset > end:
            parts.append(memoryview(bytes(offset - end)))
        if entry.nbytes:
            parts.append(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
        end = offset + entry.nbytes
    parts.append(memoryview(bytes.fromhex(manifest_id) + _LENGTH.pack(body) + WARM_MAGIC))
    return parts


def check_warm_trailer(trailer: bytes | memoryview, size: int, manifest_id: str, entries: Sequence[TensorEntry]) -> list[int]:
    """The tensor offsets of a warm copy of ``size`` bytes whose last
    ``WARM_TRAILER_SIZE`` bytes are ``trailer``, after checking that it is one, of
    the manifest ``manifest_id`` (listing ``entries``); else ``IntegrityError``."""
    trailer = bytes(trailer)
    if len(trailer) != WARM_TRAILER_SIZE or not trailer.endswith(WARM_MAGIC):
        raise IntegrityError("not a warm copy (bad magic or truncated)")
    stored_manifest = trailer[:ID_BYTES].hex()
    if stored_manifest != manifest_id:
        raise IntegrityError(f"it holds manifest {stored_manifest}, not {manifest_id}")
    offsets, body = warm_layout(entries)
    (stored_body,) = _LENGTH.unpack_from(trailer, ID_BYTES)
    if stored_body != body or size != body + WARM_TRAILER_SIZE:
        raise IntegrityError(f"its body is {stored_body} bytes in a {size}-byte blob; the manifest's layout needs {body}")
    return offsets


def verify_warm(
    body: memoryview,
    offsets: Sequence[int],
    entries: Sequence[TensorEntry],
    pool: Executor | None = None,
    into: Sequence[np.ndarray | None] | None = None,
) -> None:
    """Hash every chunk span of ``body`` (the tensors at ``offsets``) against the id
    the manifest lists: ``IntegrityError`` naming the first tensor and chunk that differ.

    ``into[i]``, where given, is a flat uint8 array of entry i's size: each of its
    chunks is copied there first and hashed from the copy, while it is in cache
    (one pass over the bytes instead of two; what is verified is what the caller
    will use). On an error the copies hold any mix of bytes. ``pool`` spreads the
    spans over one contiguous batch per core."""
    destinations = into if into is not None else [None] * len(entries)
    spans = [(entry, offset + at, length, chunk_id, None if target is None else target[at : at + length])
             for entry, offset, target in zip(entries, offsets, destinations)
             for chunk_id, at, length in entry.spans()]  # fmt: skip
    source = np.frombuffer(body, dtype=np.uint8)

    def check(batch: Sequence[_Span]) -> str | None:
        for entry, start, length, chunk_id, target in batch:
            hashed = source[start : start + length]
            if target is not None:
                np.copyto(target, hashed)
                hashed = target
            if digest(hashed) != chunk_id:
                return f"state key {entry.path!r}: chunk {chunk_id.hex()} (bytes {start}-{start + length}) does not match its id"
        return None

    batches = _batches(spans, os.cpu_count() or 1) if pool is not None else [spans]
    for problem in (pool.map(check, batches) if pool is not None else map(check, batches)):
        if problem is not None:
            raise IntegrityError(problem)


def _batches(spans: Sequence[_Span], count: int) -> list[list[_Span]]:
    """``spans`` cut into at most ``count`` contiguous runs of about equal bytes (their
    order kept, so the first problem found in run order is the first in ``spans``)."""
    total = sum(span[2] for span in spans)
    runs: list[list[_Span]] = [[]]
    done = 0
    for span in spans:
        if done >= total * len(runs) / count and runs[-1]:
            runs.append([])
        runs[-1].append(span)
        done += span[2]
    return runs


__all__ = ["WARM_TRAILER_SIZE", "build_warm", "check_warm_trailer", "verify_warm", "warm_layout"]
