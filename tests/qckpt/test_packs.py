"""Pack layout: footers round-trip, and damaged trailers are rejected before any large read."""

from __future__ import annotations

import pytest

from qckpt.format.ids import hex_id
from qckpt.format.packs import TRAILER_SIZE, PackBuilder, footer_span, read_pack_footer
from qckpt.errors import IntegrityError


def test_footer_roundtrip() -> None:
    builder = PackBuilder()
    builder.add(b"a" * 16, 2, b"first object")
    builder.add(b"b" * 16, 1, b"second")
    builder.add(b"c" * 16, 5, b"third", depth=3, deps=(b"a" * 16, b"b" * 16))
    pack_id, parts, locations = builder.finish()
    data = b"".join(parts)
    assert pack_id == hex_id(data)
    span = footer_span(pack_id, data[-TRAILER_SIZE:], len(data))
    assert read_pack_footer(pack_id, data[span.offset : span.offset + span.length], span) == locations
    assert locations[b"c" * 16].deps == (b"a" * 16, b"b" * 16) and locations[b"c" * 16].depth == 3
    assert data[locations[b"b" * 16].offset :][:6] == b"second"
    assert len(builder) == 0 and builder.size == 0


@pytest.mark.parametrize("cut", [1, 5, 25, 40])
def test_truncated_or_garbage_trailers(cut: int) -> None:
    builder = PackBuilder()
    builder.add(b"a" * 16, 0, bytes(range(60)))
    pack_id, parts, _ = builder.finish()
    data = b"".join(parts)
    damaged = data[:-cut]
    with pytest.raises(IntegrityError, match="truncated|damaged"):
        footer_span(pack_id, damaged[-TRAILER_SIZE:], len(damaged))


@pytest.mark.parametrize("field", ["offset", "length", "duplicate id"])
def test_a_footer_whose_objects_do_not_tile_the_pack_is_damaged(field: str) -> None:
    """Objects are laid out back to back, so any flip in an offset or length (or a
    repeated id) is caught when the footer is read, before anyone trusts it."""
    builder = PackBuilder()
    for name in (b"a", b"b", b"c"):
        builder.add(name * 16, 0, name * 40)
    pack_id, parts, _ = builder.finish()
    data = b"".join(parts)
    span = footer_span(pack_id, data[-TRAILER_SIZE:], len(data))
    footer = bytearray(data[span.offset : span.offset + span.length])
    entry = 16 + 8 + 4 + 3  # id, offset, length, codec, depth, dependency count
    if field == "offset":
        footer[entry + 16] ^= 0x01  # the second object's offset
    elif field == "length":
        footer[entry + 24] ^= 0x02  # the second object's length
    else:
        footer[entry : entry + 16] = footer[:16]  # the second object named like the first
    with pytest.raises(IntegrityError, match="damaged footer"):
        read_pack_footer(pack_id, bytes(footer), span)
