"""Objects: one encoded chunk with a small self-describing header.

Header (12 bytes, little endian)::

    u8  format version (1)
    u8  codec id
    u8  item size of the tensor's dtype (for shuffling codecs)
    u8  flags: bit 0 set = the object has dependencies (a predictive codec)
    u64 raw length

With flag bit 0, the header is followed by ``u8 n`` and the ``n`` 16-byte
chunk ids of the dependencies (the chunks the prediction is computed from, in
the codec's order); then comes the codec's payload. The object does not carry
its own id: the chunk id is the digest of the raw bytes, verified after
decoding, and dependencies are verified the same way when they are decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qckpt.errors import IntegrityError
from qckpt.format.codecs import Codec, DeferredCodec, PredictiveCodec, Raw, codec_by_id, encode_plain
from qckpt.format.ids import ID_BYTES, digest

OBJECT_VERSION = 1
FLAG_DEPENDENCIES = 1
_HEADER = struct.Struct("<BBBBQ")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class Candidate:
    """One predictive encoding to try for a chunk: codec, dependency chunk ids with
    their raw bytes, the float format to compute in, the codec's scalars, and the
    mantissa bits the (lossy-tier) chunk was rounded by."""

    codec: PredictiveCodec
    deps: tuple[bytes, ...]
    inputs: tuple[Raw, ...]
    fmt: int
    scalars: tuple[float, ...] = ()
    dropped: int = 0


@dataclass(frozen=True)
class EncodedObject:
    """An encoded chunk; ``candidate``: the index of the candidate it was predicted
    with, None if it is self-contained."""

    codec: int
    data: bytes
    deps: tuple[bytes, ...]
    candidate: int | None = None


def encode_object(
    raw: Raw, itemsize: int, floating: bool, level: int, candidates: Sequence[Candidate] = (), *, choose: bool = True
) -> EncodedObject:
    """Encode one chunk as a complete object: on its own, or with a candidate
    prediction.

    ``choose``: each option (self-contained included) is first tried on a sample
    (``SAMPLE_BLOCKS`` evenly spaced blocks, 1/16 of the chunk; small chunks
    whole) and only the most promising one is encoded in full, so trying several
    predictions costs a fraction of one encoding each. Otherwise the first
    candidate is encoded directly (a choice made before). Either way a
    self-contained encoding is kept if the prediction turns out no smaller than
    the raw chunk.
    """
    index: int | None = 0 if candidates else None  # the candidate to encode with; None: self-contained
    payload: bytes | None = None  # encodings already made in full
    plain: tuple[Codec, bytes] | None = None
    if candidates and choose:
        sample = _Sampler(len(raw), itemsize)
        payloads = [c.codec.encode(sample(raw), itemsize, level, [sample(i) for i in c.inputs], c.fmt, c.scalars, c.dropped)
                    for c in candidates]  # fmt: skip
        index = min(range(len(payloads)), key=lambda i: len(payloads[i]))
        sampled_plain = encode_plain(sample(raw), itemsize, floating, level)
        if sample.whole:  # the sample is the chunk: its encodings are final
            payload, plain = payloads[index], sampled_plain
        if len(payloads[index]) >= len(sampled_plain[1]):
            index = None
    if index is not None:
        best = candidates[index]
        if payload is None:
            payload = best.codec.encode(raw, itemsize, level, best.inputs, best.fmt, best.scalars, best.dropped)
        header = _HEADER.pack(OBJECT_VERSION, best.codec.id, itemsize, FLAG_DEPENDENCIES, len(raw))
        data = b"".join([header, bytes([len(best.deps)]), *best.deps, payload])
        if len(data) < len(raw):
            return EncodedObject(best.codec.id, data, best.deps, index)
    codec, payload = plain or encode_plain(raw, itemsize, floating, level)
    return EncodedObject(codec.id, _HEADER.pack(OBJECT_VERSION, codec.id, itemsize, 0, len(raw)) + payload, ())


def deferred_object(raw: np.ndarray, itemsize: int) -> tuple[bytes, memoryview]:
    """A chunk stored as is for a later compaction (``DeferredCodec``), as the
    object's two parts: its header and ``raw``'s own memory (not copied)."""
    return _HEADER.pack(OBJECT_VERSION, DeferredCodec.id, itemsize, 0, raw.nbytes), raw.data


def encode_again_on_its_own(data: bytes | memoryview, raw: Raw, level: int) -> EncodedObject:
    """The chunk of object ``data`` (its verified raw bytes: ``raw``) encoded on its own,
    with the codec its item size suits: objects record no dtype, so items wider than
    a byte are taken for floats (byte-shuffled; lossless and valid for any dtype)."""
    itemsize = _parse(data)[2]
    return encode_object(raw, itemsize, itemsize > 1, level)


SAMPLE_BLOCKS = 4
_SAMPLE_MIN = 64 << 10  # chunks up to this size are "sampled" whole


class _Sampler:
    """The same evenly spaced blocks (1/16 of the bytes, whole elements) of any buffer
    of one length; a buffer seen before is not copied again."""

    def __init__(self, length: int, itemsize: int) -> None:
        block = (length // (16 * SAMPLE_BLOCKS)) // itemsize * itemsize
        self.whole = length <= _SAMPLE_MIN or block == 0  # the "sample" is the whole buffer
        self._spans = [(0, length)] if self.whole else [
            (i * length // SAMPLE_BLOCKS // itemsize * itemsize, block) for i in range(SAMPLE_BLOCKS)
        ]  # fmt: skip
        self._seen: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, data: Raw) -> np.ndarray:
        array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        key = (array.__array_interface__["data"][0], array.size)
        if key not in self._seen:
            self._seen[key] = array if self.whole else np.concatenate([array[start : start + size] for start, size in self._spans])
        return self._seen[key]


def object_dependencies(data: bytes | memoryview) -> tuple[bytes, ...]:
    """The dependency chunk ids listed in an object's header (``IntegrityError`` if malformed)."""
    return _parse(data)[5]


def _parse(data: bytes | memoryview) -> tuple[int, int, int, int, int, tuple[bytes, ...], int]:
    if len(data) < HEADER_SIZE:
        raise IntegrityError(f"object is truncated ({len(data)} bytes)")
    version, codec_id, itemsize, flags, raw_length = _HEADER.unpack_from(data)
    if version != OBJECT_VERSION or flags & ~FLAG_DEPENDENCIES or itemsize == 0:
        raise IntegrityError(f"bad object header (version {version}, flags {flags}, item size {itemsize})")
    deps: tuple[bytes, ...] = ()
    start = HEADER_SIZE
    if flags & FLAG_DEPENDENCIES:
        count = data[HEADER_SIZE] if len(data) > HEADER_SIZE else 0
        start = HEADER_SIZE + 1 + ID_BYTES * count
        if count == 0 or len(data) < start:
            raise IntegrityError("object's dependency list is truncated or empty")
        deps = tuple(bytes(data[HEADER_SIZE + 1 + ID_BYTES * i : HEADER_SIZE + 1 + ID_BYTES * (i + 1)]) for i in range(count))
    return version, codec_id, itemsize, flags, raw_length, deps, start


def decode_object(data: bytes | memoryview, chunk_id: bytes, resolve: Callable[[bytes], Raw] | None = None) -> Raw:
    """Decode an object and verify that its raw bytes hash to ``chunk_id``.

    ``resolve(dep_id)`` must return the (verified) raw bytes of a dependency;
    it is only called for objects with dependencies. Raises ``IntegrityError``
    (without context; callers add snapshot and key) for a malformed header, an
    undecodable payload or a digest mismatch.
    """
    _version, codec_id, itemsize, _flags, raw_length, deps, start = _parse(data)
    codec = codec_by_id(codec_id)
    payload = memoryview(data)[start:]
    if isinstance(codec, PredictiveCodec) != bool(deps):
        raise IntegrityError(f"object header's dependencies do not fit codec {codec.name}")
    if isinstance(codec, PredictiveCodec):
        if resolve is None:
            raise IntegrityError(f"object with codec {codec.name} needs its dependencies to decode")
        raw = codec.decode(payload, raw_length, itemsize, [resolve(d) for d in deps])
    else:
        raw = codec.decode(payload, raw_length, itemsize)
    if len(raw) != raw_length or digest(raw) != chunk_id:
        raise IntegrityError("object content does not match its chunk id (digest mismatch)")
    return raw
