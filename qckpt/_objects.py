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

from qckpt._codecs import PredictiveCodec, Raw, codec_by_id, encode_plain
from qckpt._ids import ID_BYTES, digest
from qckpt.errors import IntegrityError

OBJECT_VERSION = 1
FLAG_DEPENDENCIES = 1
_HEADER = struct.Struct("<BBBBQ")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class Candidate:
    """One predictive encoding to try for a chunk: codec, dependency chunk ids with
    their raw bytes, the float format to compute in, and the codec's scalars."""

    codec: PredictiveCodec
    deps: tuple[bytes, ...]
    inputs: tuple[Raw, ...]
    fmt: int
    scalars: tuple[float, ...] = ()


@dataclass(frozen=True)
class EncodedObject:
    codec: int
    data: bytes
    deps: tuple[bytes, ...]


def encode_object(
    raw: Raw, itemsize: int, floating: bool, level: int, candidates: Sequence[Candidate] = ()
) -> EncodedObject:
    """Encode one chunk as a complete object: on its own, or with the candidate
    prediction that makes it smallest.

    With candidates, each option (self-contained included) is first tried on a
    1/``SAMPLE_STRIDE`` sample of the elements and only the most promising one
    is encoded in full, so trying several predictions costs a fraction of one
    encoding each; a self-contained encoding is kept if that one turns out larger.
    """
    if candidates:
        best = min(candidates, key=lambda c: _sampled_size(c, raw, itemsize, level))
        if _sampled_size(best, raw, itemsize, level) < _sampled_plain_size(raw, itemsize, floating, level):
            payload = best.codec.encode(raw, itemsize, level, best.inputs, best.fmt, best.scalars)
            header = _HEADER.pack(OBJECT_VERSION, best.codec.id, itemsize, FLAG_DEPENDENCIES, len(raw))
            data = header + bytes([len(best.deps)]) + b"".join(best.deps) + payload
            if len(data) < len(raw):
                return EncodedObject(best.codec.id, data, best.deps)
    codec, payload = encode_plain(raw, itemsize, floating, level)
    return EncodedObject(codec.id, _HEADER.pack(OBJECT_VERSION, codec.id, itemsize, 0, len(raw)) + payload, ())


SAMPLE_STRIDE = 16


def _sample(data: Raw, itemsize: int) -> np.ndarray:
    elements = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    return np.ascontiguousarray(elements.reshape(-1, itemsize)[::SAMPLE_STRIDE]).reshape(-1)


def _sampled_size(candidate: Candidate, raw: Raw, itemsize: int, level: int) -> int:
    inputs = [_sample(i, itemsize) for i in candidate.inputs]
    return len(candidate.codec.encode(_sample(raw, itemsize), itemsize, level, inputs, candidate.fmt, candidate.scalars))


def _sampled_plain_size(raw: Raw, itemsize: int, floating: bool, level: int) -> int:
    return len(encode_plain(_sample(raw, itemsize), itemsize, floating, level)[1])


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


def decode_object(data: bytes | memoryview, chunk_id: bytes, resolve: Callable[[bytes], Raw] | None = None) -> bytes:
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
