"""Content ids: xxh3-128 digests, 16 bytes, shown as 32 lowercase hex characters."""

from __future__ import annotations

import re
from collections.abc import Iterable

import xxhash

ID_BYTES = 16
ID_HEX = re.compile(r"[0-9a-f]{32}")


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte xxh3-128 digest of ``data``."""
    return xxhash.xxh3_128_digest(data)


def hex_id(data: bytes | bytearray | memoryview) -> str:
    """The xxh3-128 digest of ``data`` as 32 hex characters."""
    return xxhash.xxh3_128_hexdigest(data)


def hex_id_of_parts(parts: Iterable[bytes | bytearray | memoryview]) -> str:
    """``hex_id`` of the parts joined back to back, without joining them."""
    hasher = xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()
