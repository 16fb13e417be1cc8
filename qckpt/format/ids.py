"""Content ids: xxh3-128 digests, 16 bytes, shown as 32 lowercase hex characters."""

from __future__ import annotations

import re

import xxhash

ID_BYTES = 16
ID_HEX = re.compile(r"[0-9a-f]{32}")


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte xxh3-128 digest of ``data``."""
    return xxhash.xxh3_128_digest(data)


def hex_id(data: bytes | bytearray | memoryview) -> str:
    """The xxh3-128 digest of ``data`` as 32 hex characters."""
    return xxhash.xxh3_128_hexdigest(data)
