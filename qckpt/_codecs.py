"""Codecs: how a chunk's raw bytes become an object's payload, and back.

Each codec has a fixed numeric id recorded in every object header, so decoding
depends only on what the repository holds. Ids are never reused. Codecs are
stateless and thread-safe (zstd contexts are per thread).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import zstandard

from qckpt.errors import IntegrityError

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompress(payload: bytes | memoryview, raw_length: int) -> bytes:
    if "decompressor" not in _local.__dict__:
        _local.decompressor = zstandard.ZstdDecompressor()
    try:
        return _local.decompressor.decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"zstd payload cannot be decoded: {e}") from e


class Codec(ABC):
    """Turns raw chunk bytes into a payload and back, losslessly.

    ``itemsize`` is the element width of the tensor the chunk belongs to
    (1 for bytes, 2 for bf16/fp16, 4 for fp32...); raw chunks are always a whole
    number of elements.
    """

    id: ClassVar[int]
    name: ClassVar[str]

    @abstractmethod
    def encode(self, raw: memoryview, itemsize: int, level: int) -> bytes:
        """Encode ``raw``; ``level`` is the zstd level where one applies."""

    @abstractmethod
    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> bytes:
        """Return the ``raw_length`` raw bytes; raise ``IntegrityError`` if impossible."""


class RawCodec(Codec):
    """Stored as is: for data that does not compress."""

    id = 0
    name = "raw"

    def encode(self, raw: memoryview, itemsize: int, level: int) -> bytes:
        return bytes(raw)

    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> bytes:
        return bytes(payload)


class ZstdCodec(Codec):
    """Plain zstd: integers, bools and byte data."""

    id = 1
    name = "zstd"

    def encode(self, raw: memoryview, itemsize: int, level: int) -> bytes:
        return _compressor(level).compress(raw)

    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> bytes:
        return _decompress(payload, raw_length)


class ShuffleZstdCodec(Codec):
    """Byte-plane shuffle, then zstd: floating point data.

    Shuffling groups byte k of every element together (all sign/exponent bytes,
    then all low mantissa bytes...), which turns the slowly varying exponents of
    float tensors into long compressible runs.
    """

    id = 2
    name = "shuffle+zstd"

    def encode(self, raw: memoryview, itemsize: int, level: int) -> bytes:
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T
        return _compressor(level).compress(np.ascontiguousarray(planes).data)

    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> bytes:
        if raw_length % itemsize:
            raise IntegrityError(f"raw length {raw_length} is not a multiple of item size {itemsize}")
        planes = np.frombuffer(_decompress(payload, raw_length), dtype=np.uint8)
        if planes.size != raw_length:
            raise IntegrityError(f"decoded {planes.size} bytes, header says {raw_length}")
        return np.ascontiguousarray(planes.reshape(itemsize, -1).T).tobytes()


CODECS: dict[int, Codec] = {c.id: c for c in (RawCodec(), ZstdCodec(), ShuffleZstdCodec())}


def codec_by_id(codec_id: int) -> Codec:
    """The codec registered under ``codec_id``; ``IntegrityError`` for an unknown id."""
    try:
        return CODECS[codec_id]
    except KeyError:
        raise IntegrityError(f"unknown codec id {codec_id} (written by a newer qckpt?)") from None


def encode_best(raw: memoryview, itemsize: int, floating: bool, level: int) -> tuple[Codec, bytes]:
    """Encode ``raw`` with the codec that suits its element type; fall back to raw
    storage when compression does not make it smaller."""
    codec: Codec = CODECS[ShuffleZstdCodec.id] if floating and itemsize > 1 else CODECS[ZstdCodec.id]
    payload = codec.encode(raw, itemsize, level)
    if len(payload) >= len(raw):
        return CODECS[RawCodec.id], bytes(raw)
    return codec, payload
