"""Packs: many objects in one file, with a footer that lists them.

Layout::

    object 0 | object 1 | ... | footer | trailer

    footer  = entry*   entry = 16-byte chunk id, u64 offset, u32 length, u8 codec id
    trailer = u32 entry count, u64 footer offset, 8-byte magic b"QCKPACK1"

The footer makes every pack self-describing, so the chunk index can be rebuilt
from the packs alone. A pack's id is the xxh3-128 of its bytes; its key is
``packs/<id>.pack``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from qckpt._ids import ID_BYTES, hex_id
from qckpt.errors import IntegrityError

PACK_MAGIC = b"QCKPACK1"
_ENTRY = struct.Struct(f"<{ID_BYTES}sQIB")
_TRAILER = struct.Struct("<IQ8s")


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id}.pack"


@dataclass(frozen=True)
class ChunkLocation:
    """Where an object lives: pack id (hex), byte offset and length, and its codec."""

    pack_id: str
    offset: int
    length: int
    codec: int


class PackBuilder:
    """Collects objects in memory until ``finish`` lays out one pack. Not thread-safe."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._parts: list[bytes] = []
        self._entries: list[tuple[bytes, int, int, int]] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, chunk_id: bytes, codec: int, obj: bytes) -> None:
        self._entries.append((chunk_id, self.size, len(obj), codec))
        self._parts.append(obj)
        self.size += len(obj)

    def finish(self) -> tuple[str, bytes, dict[bytes, ChunkLocation]]:
        """Return (pack id, pack bytes, chunk id -> location) and reset the builder."""
        footer = b"".join(_ENTRY.pack(*e) for e in self._entries)
        data = b"".join(self._parts) + footer + _TRAILER.pack(len(self._entries), self.size, PACK_MAGIC)
        pack_id = hex_id(data)
        locations = {cid: ChunkLocation(pack_id, off, n, codec) for cid, off, n, codec in self._entries}
        self._reset()
        return pack_id, data, locations


def footer_span(pack_id: str, trailer: bytes, pack_size: int) -> tuple[int, int]:
    """(offset, length) of the footer, from a pack's last ``TRAILER_SIZE`` bytes.

    Validates the magic and that the footer exactly fills the space before the
    trailer, so a damaged trailer never leads to an absurd read.
    """
    if len(trailer) != _TRAILER.size or pack_size < _TRAILER.size:
        raise IntegrityError(f"pack {pack_id} is truncated")
    count, footer_offset, magic = _TRAILER.unpack(trailer)
    if magic != PACK_MAGIC or footer_offset + count * _ENTRY.size + _TRAILER.size != pack_size:
        raise IntegrityError(f"pack {pack_id} has a damaged trailer")
    return footer_offset, count * _ENTRY.size


def read_pack_footer(pack_id: str, footer: bytes) -> dict[bytes, ChunkLocation]:
    """Parse the footer bytes located by ``footer_span``."""
    if len(footer) % _ENTRY.size:
        raise IntegrityError(f"pack {pack_id} has a damaged footer")
    entries = (_ENTRY.unpack_from(footer, i) for i in range(0, len(footer), _ENTRY.size))
    return {cid: ChunkLocation(pack_id, off, n, codec) for cid, off, n, codec in entries}


TRAILER_SIZE = _TRAILER.size
