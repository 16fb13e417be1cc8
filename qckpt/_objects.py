"""Objects: one encoded chunk with a small self-describing header.

Header (12 bytes, little endian)::

    u8  format version (1)
    u8  codec id
    u8  item size of the tensor's dtype (for shuffling codecs)
    u8  flags (0; bits are reserved for delta bases)
    u64 raw length

followed by the codec's payload. The object does not carry its own id: the
chunk id is the digest of the raw bytes, verified after decoding.
"""

from __future__ import annotations

import struct

from qckpt._codecs import codec_by_id, encode_best
from qckpt._ids import digest
from qckpt.errors import IntegrityError

OBJECT_VERSION = 1
_HEADER = struct.Struct("<BBBBQ")
HEADER_SIZE = _HEADER.size


def encode_object(raw: memoryview, itemsize: int, floating: bool, level: int) -> tuple[int, bytes]:
    """Encode one chunk as a complete object; returns (codec id, object bytes)."""
    codec, payload = encode_best(raw, itemsize, floating, level)
    return codec.id, _HEADER.pack(OBJECT_VERSION, codec.id, itemsize, 0, len(raw)) + payload


def decode_object(data: bytes | memoryview, chunk_id: bytes) -> bytes:
    """Decode an object and verify that its raw bytes hash to ``chunk_id``.

    Raises ``IntegrityError`` (without context; callers add snapshot and key)
    for a short or malformed header, an undecodable payload or a digest mismatch.
    """
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"object is truncated ({len(data)} bytes)")
    version, codec_id, itemsize, flags, raw_length = _HEADER.unpack_from(data)
    if version != OBJECT_VERSION or flags != 0 or itemsize == 0:
        raise IntegrityError(f"bad object header (version {version}, flags {flags}, item size {itemsize})")
    raw = codec_by_id(codec_id).decode(memoryview(data)[HEADER_SIZE:], raw_length, itemsize)
    if len(raw) != raw_length or digest(raw) != chunk_id:
        raise IntegrityError("object content does not match its chunk id (digest mismatch)")
    return raw
