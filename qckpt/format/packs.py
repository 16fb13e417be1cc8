"""Packs: many objects in one file, with a footer that lists them.

Layout::

    object 0 | object 1 | ... | footer | trailer

    footer  = entry*
    entry   = 16-byte chunk id, u64 offset, u32 length, u8 codec id,
              u8 chain depth, u8 n, n x 16-byte dependency chunk ids
    trailer = u32 entry count, u64 footer offset, 8-byte magic b"QCKPACK2"

Packs of format version 1 (magic ``QCKPACK1``) have fixed 29-byte entries
without depth and dependencies (every version-1 object is self-contained) and
are still read. The footer makes every pack self-describing, so the chunk
index, with the dependency graph that garbage collection needs, can be rebuilt
from the packs alone. A pack's id is the xxh3-128 of its bytes; its key is
``packs/<id>.pack``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from qckpt.errors import IntegrityError
from qckpt.format.ids import ID_BYTES, hex_id_of_parts

PACK_MAGIC = b"QCKPACK2"
_V1_MAGIC = b"QCKPACK1"
_V1_ENTRY = struct.Struct(f"<{ID_BYTES}sQIB")
_ENTRY = struct.Struct(f"<{ID_BYTES}sQIBBB")
_TRAILER = struct.Struct("<IQ8s")
TRAILER_SIZE = _TRAILER.size


@dataclass(frozen=True)
class ChunkLocation:
    """Where an object lives (pack id in hex, byte offset and length), its codec, and
    its place in the dependency graph: ``depth`` is the length of the longest
    dependency chain ending at it (1 for a self-contained object), ``deps`` the
    chunk ids it is predicted from."""

    pack_id: str
    offset: int
    length: int
    codec: int
    depth: int = 1
    deps: tuple[bytes, ...] = ()


class PackBuilder:
    """Collects objects in memory until ``finish`` lays out one pack. Not thread-safe."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._parts: list[bytes | memoryview] = []
        self._entries: list[tuple[bytes, int, int, int, int, tuple[bytes, ...]]] = []
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, chunk_id: bytes, codec: int, obj: bytes | Sequence[bytes | memoryview], depth: int = 1,
            deps: tuple[bytes, ...] = ()) -> None:  # fmt: skip
        """Add an object: its bytes, or its parts back to back (kept as they are, not
        joined: they must stay unchanged until ``finish``'s pack is stored)."""
        if not 1 <= depth <= 255 or len(deps) > 255:
            raise ValueError(f"depth {depth} / {len(deps)} dependencies out of range")
        parts = [obj] if isinstance(obj, bytes) else list(obj)
        length = sum(len(p) for p in parts)
        self._entries.append((chunk_id, self.size, length, codec, depth, deps))
        self._parts.extend(parts)
        self.size += length

    def finish(self) -> tuple[str, list[bytes], dict[bytes, ChunkLocation]]:
        """Return (pack id, the pack's bytes as parts to store back to back, chunk id ->
        location) and reset the builder. The parts are the objects as added: a pack
        is never copied into one buffer (at 100M parameters that copy cost 0.7 s
        a commit)."""
        footer = b"".join(_ENTRY.pack(cid, off, n, codec, depth, len(deps)) + b"".join(deps)
                          for cid, off, n, codec, depth, deps in self._entries)  # fmt: skip
        data = [*self._parts, footer + _TRAILER.pack(len(self._entries), self.size, PACK_MAGIC)]
        pack_id = hex_id_of_parts(data)
        locations = {e[0]: ChunkLocation(pack_id, *e[1:]) for e in self._entries}
        self._reset()
        return pack_id, data, locations


@dataclass(frozen=True)
class FooterSpan:
    offset: int
    length: int
    count: int
    version: int


def footer_span(pack_id: str, trailer: bytes, pack_size: int) -> FooterSpan:
    """Where the footer is, from a pack's last ``TRAILER_SIZE`` bytes.

    Validates the magic and that the footer fits exactly before the trailer,
    so a damaged trailer never leads to an absurd read.
    """
    if len(trailer) != _TRAILER.size or pack_size < _TRAILER.size:
        raise IntegrityError(f"pack {pack_id} is truncated")
    count, footer_offset, magic = _TRAILER.unpack(trailer)
    length = pack_size - _TRAILER.size - footer_offset
    if magic == _V1_MAGIC:
        ok, version = length == count * _V1_ENTRY.size, 1
    else:
        ok, version = magic == PACK_MAGIC and length >= count * _ENTRY.size, 2
    if not ok or length < 0:
        raise IntegrityError(f"pack {pack_id} has a damaged trailer")
    return FooterSpan(footer_offset, length, count, version)


def read_pack_footer(pack_id: str, footer: bytes, span: FooterSpan) -> dict[bytes, ChunkLocation]:
    """Parse the footer bytes located by ``footer_span``. Objects are laid out back to
    back from offset 0 to the footer, in footer order, each id once: a footer that
    says otherwise is damaged (``IntegrityError``)."""
    if len(footer) != span.length:
        raise IntegrityError(f"pack {pack_id} has a damaged footer")
    if span.version == 1:
        entries = [_V1_ENTRY.unpack_from(footer, i) for i in range(0, len(footer), _V1_ENTRY.size)]
        return _laid_out(pack_id, span, [ChunkLocation(pack_id, off, n, codec) for _, off, n, codec in entries],
                         [entry[0] for entry in entries])  # fmt: skip
    locations: dict[bytes, ChunkLocation] = {}
    ids: list[bytes] = []
    position = 0
    for _ in range(span.count):
        if position + _ENTRY.size > len(footer):
            raise IntegrityError(f"pack {pack_id} has a damaged footer")
        cid, off, n, codec, depth, count = _ENTRY.unpack_from(footer, position)
        position += _ENTRY.size
        deps = tuple(footer[position + ID_BYTES * i : position + ID_BYTES * (i + 1)] for i in range(count))
        position += ID_BYTES * count
        if position > len(footer) or depth == 0 or (depth == 1) != (count == 0):
            raise IntegrityError(f"pack {pack_id} has a damaged footer")
        locations[cid] = ChunkLocation(pack_id, off, n, codec, depth, deps)
        ids.append(cid)
    if position != len(footer):
        raise IntegrityError(f"pack {pack_id} has a damaged footer")
    return _laid_out(pack_id, span, list(locations.values()), ids)


def _laid_out(pack_id: str, span: FooterSpan, locations: list[ChunkLocation], ids: list[bytes]) -> dict[bytes, ChunkLocation]:
    """``ids`` -> ``locations`` after checking they tile the pack's body exactly."""
    end = 0
    for location in locations:
        if location.offset != end:
            raise IntegrityError(f"pack {pack_id} has a damaged footer: an object's place does not follow its predecessor's")
        end += location.length
    if end != span.offset or len(set(ids)) != len(ids) or len(ids) != len(locations):
        raise IntegrityError(f"pack {pack_id} has a damaged footer: its objects do not fill the pack exactly once")
    return dict(zip(ids, locations))
