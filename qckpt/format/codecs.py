"""Codecs: how a chunk's raw bytes become an object's payload, and back.

Each codec has a fixed numeric id recorded in every object header, so decoding
depends only on what the repository holds. Ids are never reused. Codecs are
stateless and thread-safe (zstd contexts are per thread).

Two families:

* ``Codec``: self-contained (raw, zstd, shuffle+zstd; and *deferred*: raw bytes
  written by a commit that left their encoding to a later compaction, which
  replaces the object; see ``DeferredCodec``).
* ``PredictiveCodec``: the chunk is stored as the residual between its bits and
  a *prediction* computed from other chunks (its dependencies, e.g. the same
  chunk of the previous snapshot, or the optimizer moments of this one) and a
  few scalars recorded in the payload. The residual is the wrapping integer
  difference of the bit patterns, zigzag-mapped so small differences of either
  sign become small numbers, byte-shuffled and zstd-compressed. Lossless by
  construction: a poor prediction only costs size. Predictions use only IEEE
  754 basic operations (+, -, *, /, sqrt: correctly rounded on every
  platform), with NaN results replaced by 0, so the decoder repeats them bit
  for bit; a different result would still be caught by the digest check.

Predictive payload layout: ``u8 float format, u8 scalar count, [u8 dropped
bits], f64 scalars...`` then the shuffled zstd residual. Bit 7 of the format
byte marks a *lossy-tier* object (see ``round_bits``): the prediction is rounded
to the chunk's precision first, and the residual, a multiple of ``2**dropped``,
is stored shifted right by the dropped bits.
"""

from __future__ import annotations

import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import zstandard

from qckpt.errors import IntegrityError

_local = threading.local()

# Float formats a prediction computes in (recorded in the payload; the header only knows the item size).
FLOAT_NONE, FLOAT32, BFLOAT16, FLOAT16, FLOAT64 = range(5)
FLOAT_FORMATS = {"float32": FLOAT32, "bfloat16": BFLOAT16, "float16": FLOAT16, "float64": FLOAT64,
                 "<f4": FLOAT32, "<f2": FLOAT16, "<f8": FLOAT64}  # fmt: skip
_FORMAT_ITEMSIZE = {FLOAT32: 4, BFLOAT16: 2, FLOAT16: 2, FLOAT64: 8}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
# Per float format: (mantissa bits, exponent mask) of the bit pattern.
_FORMAT_BITS = {FLOAT32: (23, 0x7F800000), BFLOAT16: (7, 0x7F80), FLOAT16: (10, 0x7C00), FLOAT64: (52, 0x7FF0000000000000)}
_PREDICTIVE_HEAD = struct.Struct("<BB")
_ROUNDED = 0x80  # format byte flag: a dropped-bits byte follows the head
# Byte-shuffled float planes hold few repeats worth finding: at level 1 (the default), zstd's fast
# matcher with a 2**7-entry hash table compresses moments and parameter residuals 1.6-2.5x faster
# than zstd's own level-1 table, and every payload measured a little smaller (design.md, "Chosen
# defaults"). Other levels keep zstd's parameters.
_SHUFFLED_HASH_LOG = 7

Raw = bytes | bytearray | memoryview | np.ndarray


def _compressor(level: int, shuffled: bool = False) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``; ``shuffled``: for byte-shuffled planes."""
    cache = _local.__dict__.setdefault("compressors", {})
    key = (level, shuffled and level == 1)
    if key not in cache:
        cache[key] = (
            zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(1, hash_log=_SHUFFLED_HASH_LOG))
            if key[1]
            else zstandard.ZstdCompressor(level=level)
        )
    return cache[key]


def _decompress(payload: bytes | memoryview, raw_length: int) -> bytes:
    if "decompressor" not in _local.__dict__:
        _local.decompressor = zstandard.ZstdDecompressor()
    try:
        return _local.decompressor.decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"zstd payload cannot be decoded: {e}") from e


def _u8(data: Raw) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)


def _shuffle(raw: Raw, itemsize: int) -> np.ndarray:
    """Byte planes of ``raw``'s little-endian elements: plane k holds byte k of each."""
    data = _u8(raw)
    if itemsize == 1:
        return data
    if itemsize not in _UNSIGNED:  # wider than a machine word (complex128): a strided byte gather
        return np.ascontiguousarray(data.reshape(-1, itemsize).T)
    words = data.view(np.dtype(_UNSIGNED[itemsize]).newbyteorder("<"))
    planes = np.empty((itemsize, words.size), dtype=np.uint8)
    for k in range(itemsize):  # a shift per plane, truncated to its low byte: ~2x a strided byte gather
        np.right_shift(words, 8 * k, out=planes[k], casting="unsafe")
    return planes


def _shuffle_compress(raw: Raw, itemsize: int, level: int) -> bytes:
    return _compressor(level, shuffled=True).compress(_shuffle(raw, itemsize).data)


def _decompress_unshuffle(payload: memoryview, raw_length: int, itemsize: int) -> np.ndarray:
    if raw_length % itemsize:
        raise IntegrityError(f"raw length {raw_length} is not a multiple of item size {itemsize}")
    planes = np.frombuffer(_decompress(payload, raw_length), dtype=np.uint8)
    if planes.size != raw_length:
        raise IntegrityError(f"decoded {planes.size} bytes, header says {raw_length}")
    planes = planes.reshape(itemsize, -1)
    if itemsize > 1 and itemsize in _UNSIGNED:  # each word from its planes, most significant first: ~1.7x a strided copy
        words = planes[itemsize - 1].astype(np.dtype(_UNSIGNED[itemsize]).newbyteorder("<"))
        for k in range(itemsize - 2, -1, -1):
            words <<= 8
            words |= planes[k]
        return words.view(np.uint8)
    elements = np.empty((planes.shape[1], itemsize), dtype=np.uint8)
    for k in range(itemsize):  # one strided copy per plane: several times faster than a transposing copy
        elements[:, k] = planes[k]
    return elements.reshape(-1)


class Codec(ABC):
    """Turns raw chunk bytes into a payload and back, losslessly, on its own.

    ``itemsize`` is the element width of the tensor the chunk belongs to
    (1 for bytes, 2 for bf16/fp16, 4 for fp32...); raw chunks are always a whole
    number of elements.
    """

    id: ClassVar[int]
    name: ClassVar[str]

    @abstractmethod
    def encode(self, raw: Raw, itemsize: int, level: int) -> bytes:
        """Encode ``raw``; ``level`` is the zstd level where one applies."""

    @abstractmethod
    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> bytes | np.ndarray:
        """Return the ``raw_length`` raw bytes (a new buffer the caller owns); raise
        ``IntegrityError`` if impossible."""


class RawCodec(Codec):
    """Stored as is: for data that does not compress."""

    id = 0
    name = "raw"

    def encode(self, raw: Raw, itemsize: int, level: int) -> bytes:
        return bytes(raw)

    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> bytes:
        return bytes(payload)


class DeferredCodec(RawCodec):
    """Stored as is by a commit that deferred the encoding (``write_arrays(...,
    defer=True)``); a compaction later stores the chunk again, encoded, and deletes
    these objects' pack. Decodes like raw. Never used as a prediction's input while
    in this form: its compacted encoding's chain depth is not known yet."""

    id = 7
    name = "deferred"


class ZstdCodec(Codec):
    """Plain zstd: integers, bools and byte data."""

    id = 1
    name = "zstd"

    def encode(self, raw: Raw, itemsize: int, level: int) -> bytes:
        return _compressor(level).compress(_u8(raw).data)

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

    def encode(self, raw: Raw, itemsize: int, level: int) -> bytes:
        return _shuffle_compress(raw, itemsize, level)

    def decode(self, payload: memoryview, raw_length: int, itemsize: int) -> np.ndarray:
        return _decompress_unshuffle(payload, raw_length, itemsize)


def to_float(raw: Raw, fmt: int) -> np.ndarray:
    """The elements of ``raw`` as float32 (float64 for FLOAT64) values to predict with.
    May share memory with ``raw``: never write to the result."""
    data = _u8(raw)
    if fmt == FLOAT32:
        return data.view(np.float32)
    if fmt == BFLOAT16:
        return (data.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    if fmt == FLOAT16:
        return data.view(np.float16).astype(np.float32)
    if fmt == FLOAT64:
        return data.view(np.float64)
    raise IntegrityError(f"unknown float format {fmt} in a predictive object")


def from_float(values: np.ndarray, fmt: int) -> np.ndarray:
    """Raw bytes of a prediction in format ``fmt``; NaN becomes 0 (NaN bit patterns
    differ between platforms, predictions must not). Consumes ``values``."""
    values[np.isnan(values)] = 0
    if fmt == BFLOAT16:  # truncation: deterministic, and a prediction needs no rounding
        return (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(np.uint8)
    if fmt == FLOAT16:
        return values.astype(np.float16).view(np.uint8)
    return values.view(np.uint8)


def mantissa_bits(fmt: int) -> int:
    """Explicit mantissa bits of a float format (0 for FLOAT_NONE)."""
    return _FORMAT_BITS.get(fmt, (0, 0))[0]


def round_bits(raw: Raw, fmt: int, dropped: int) -> np.ndarray:
    """``raw``'s floats rounded to ``mantissa_bits(fmt) - dropped`` mantissa bits
    (a new uint8 array): round half to even on the bit pattern, so every
    result's low ``dropped`` bits are zero. Infinities stay; NaN becomes the
    quiet NaN of its sign; a finite value that would round to infinity is
    truncated instead. For normal numbers the relative error is at most
    ``2**-(mantissa_bits(fmt) - dropped + 1)`` (``2**-(kept bits)`` for the
    truncated ones); subnormals keep an absolute error below half their new
    spacing. The lossy tier's only lossy step."""
    mantissa, exponent = _FORMAT_BITS[fmt]
    if not 0 < dropped < mantissa:
        raise ValueError(f"can drop 1 to {mantissa - 1} mantissa bits of this format, not {dropped}")
    unsigned = _UNSIGNED[_FORMAT_ITEMSIZE[fmt]]
    bits = _u8(raw).view(unsigned)
    one, low = unsigned(1), unsigned((1 << dropped) - 1)
    exp_mask = unsigned(exponent)
    rounded = (bits + (low >> one) + ((bits >> unsigned(dropped)) & one)) & ~low
    special = (bits & exp_mask) == exp_mask
    overflow = ((rounded & exp_mask) == exp_mask) & ~special
    rounded[overflow] = bits[overflow] & ~low
    nan = special & ((bits & unsigned((1 << mantissa) - 1)) != 0)
    sign = unsigned(1 << (8 * bits.itemsize - 1))
    rounded[nan] = (bits[nan] & sign) | exp_mask | unsigned(1 << (mantissa - 1))
    return rounded.view(np.uint8)


def _word_size(itemsize: int) -> int:
    """Width of the integers a residual is taken in: the element's own, or 8 bytes
    for wider elements (complex128: its two float64 halves, one residual each)."""
    return itemsize if itemsize in _UNSIGNED else 8


def _zigzag_difference(raw: Raw, prediction: np.ndarray, itemsize: int, dropped: int) -> np.ndarray:
    word = _word_size(itemsize)
    unsigned, signed = _UNSIGNED[word], _SIGNED[word]
    diff = (_u8(raw).view(unsigned) - prediction.view(unsigned)).view(signed)  # wraps
    if dropped:
        diff >>= signed(dropped)  # exact: both sides are multiples of 2**dropped
    return ((diff << signed(1)) ^ (diff >> signed(8 * word - 1))).view(np.uint8)


def _undo_zigzag_difference(residual: np.ndarray, prediction: np.ndarray, itemsize: int, dropped: int) -> np.ndarray:
    """The raw bytes back from a residual (which this overwrites: it is scratch) and the prediction."""
    unsigned = _UNSIGNED[_word_size(itemsize)]
    zigzag = residual.view(unsigned)
    diff = zigzag >> unsigned(1)
    np.bitwise_and(zigzag, unsigned(1), out=zigzag)
    np.negative(zigzag, out=zigzag)  # 0 or all ones: unsigned negation wraps
    diff ^= zigzag
    if dropped:
        diff <<= unsigned(dropped)
    diff += prediction.view(unsigned)
    return diff.view(np.uint8)


class PredictiveCodec(ABC):
    """Stores a chunk as its residual against a prediction from its dependencies.

    ``inputs`` are the raw bytes of the dependency chunks, in the order the
    object header lists them; each has the chunk's length. ``scalars`` and the
    float format ``fmt`` are recorded in the payload. With ``dropped`` > 0 (lossy
    tier) the chunk must already be ``round_bits(chunk, fmt, dropped)``; the
    prediction is rounded the same way, so the residual loses nothing more.
    """

    id: ClassVar[int]
    name: ClassVar[str]
    arity: ClassVar[tuple[int, int]]  # least and most dependencies
    float_only: ClassVar[bool] = True

    @abstractmethod
    def predict(self, inputs: Sequence[Raw], fmt: int, scalars: Sequence[float]) -> np.ndarray:
        """The predicted raw bytes (uint8 array of the chunk's length)."""

    def encode(
        self, raw: Raw, itemsize: int, level: int, inputs: Sequence[Raw], fmt: int, scalars: Sequence[float], dropped: int = 0
    ) -> bytes:
        head = _PREDICTIVE_HEAD.pack(fmt | (_ROUNDED if dropped else 0), len(scalars))
        head += (bytes([dropped]) if dropped else b"") + struct.pack(f"<{len(scalars)}d", *scalars)
        with np.errstate(all="ignore"):  # overflow and NaN are legitimate in a prediction
            prediction = self.predict(inputs, fmt, scalars)
        if dropped:
            prediction = round_bits(prediction, fmt, dropped)
            if np.any(_u8(raw).view(_UNSIGNED[itemsize]) & _UNSIGNED[itemsize]((1 << dropped) - 1)):
                raise ValueError("a lossy-tier chunk must be rounded with round_bits before encoding")
        residual = _zigzag_difference(raw, prediction, itemsize, dropped)
        return head + _shuffle_compress(residual, itemsize, level)

    def decode(self, payload: memoryview, raw_length: int, itemsize: int, inputs: Sequence[Raw]) -> np.ndarray:
        """The raw bytes (a uint8 array); ``IntegrityError`` if the payload is malformed."""
        if len(payload) < _PREDICTIVE_HEAD.size:
            raise IntegrityError("predictive payload is truncated")
        fmt, count = _PREDICTIVE_HEAD.unpack_from(payload)
        start = _PREDICTIVE_HEAD.size
        dropped = 0
        if fmt & _ROUNDED:
            if len(payload) <= start:
                raise IntegrityError("predictive payload is truncated")
            fmt, dropped, start = fmt & ~_ROUNDED, payload[start], start + 1
            if not 0 < dropped < mantissa_bits(fmt):
                raise IntegrityError(f"{self.name} object drops {dropped} bits of float format {fmt}")
        scalars_at, start = start, start + 8 * count
        if len(payload) < start or not self.arity[0] <= len(inputs) <= self.arity[1]:
            raise IntegrityError(f"malformed {self.name} object ({len(inputs)} dependencies, {count} scalars)")
        if ((self.float_only or dropped) and _FORMAT_ITEMSIZE.get(fmt) != itemsize) or itemsize % _word_size(itemsize):
            raise IntegrityError(f"{self.name} object has float format {fmt} for item size {itemsize}")
        if any(len(_u8(i)) != raw_length for i in inputs):
            raise IntegrityError(f"{self.name} object: a dependency's length differs from {raw_length}")
        scalars = struct.unpack_from(f"<{count}d", payload, scalars_at)
        residual = _decompress_unshuffle(payload[start:], raw_length, itemsize)
        with np.errstate(all="ignore"):
            prediction = self.predict(inputs, fmt, scalars)
        if dropped:
            prediction = round_bits(prediction, fmt, dropped)
        return _undo_zigzag_difference(residual, prediction, itemsize, dropped)


class DeltaCodec(PredictiveCodec):
    """Prediction: the same chunk of a base snapshot. Any dtype."""

    id = 3
    name = "delta"
    arity = (1, 1)
    float_only = False

    def predict(self, inputs: Sequence[Raw], fmt: int, scalars: Sequence[float]) -> np.ndarray:
        return _u8(inputs[0])


def _scalars(fmt: int, scalars: Sequence[float]) -> list[np.floating]:
    kind = np.float64 if fmt == FLOAT64 else np.float32
    return [kind(s) for s in scalars]


class AdamSecondMomentCodec(PredictiveCodec):
    """Adam/AdamW ``exp_avg_sq`` after one step: dependencies ``v_prev, m, m_prev``,
    scalars ``beta1, beta2``. The step's gradient is implied by the first moments,
    ``g = (m - beta1 * m_prev) / (1 - beta1)``; prediction ``beta2 * v_prev + (1 - beta2) * g * g``."""

    id = 4
    name = "adam-v"
    arity = (3, 3)

    def predict(self, inputs: Sequence[Raw], fmt: int, scalars: Sequence[float]) -> np.ndarray:
        v_prev, m, m_prev = (to_float(i, fmt) for i in inputs)
        beta1, beta2 = _scalars(fmt, scalars)
        one = beta1.dtype.type(1)
        grad = m - beta1 * m_prev
        grad /= one - beta1
        grad *= grad
        grad *= one - beta2
        grad += beta2 * v_prev
        return from_float(grad, fmt)


class AdamParamCodec(PredictiveCodec):
    """A parameter after Adam/AdamW steps: dependencies ``p_prev, m, v``, scalars
    ``decay, step_size, sqrt_bias_correction2, eps``; prediction (PyTorch's update,
    same operation order) ``p_prev * decay + (-step_size * m) / (sqrt(v) / sqrt_bc2 + eps)``."""

    id = 5
    name = "adam-param"
    arity = (3, 3)

    def predict(self, inputs: Sequence[Raw], fmt: int, scalars: Sequence[float]) -> np.ndarray:
        p_prev, m, v = (to_float(i, fmt) for i in inputs)
        decay, step_size, sqrt_bc2, eps = _scalars(fmt, scalars)
        denom = np.sqrt(v)
        denom /= sqrt_bc2
        denom += eps
        update = (-step_size) * m
        update /= denom
        update += p_prev * decay
        return from_float(update, fmt)


class LinearCodec(PredictiveCodec):
    """A linear combination of dependencies: ``sum(c_i * x_i)``, evaluated left to right
    (e.g. SGD with momentum: ``p_prev - lr * momentum_buffer``)."""

    id = 6
    name = "linear"
    arity = (1, 4)

    def predict(self, inputs: Sequence[Raw], fmt: int, scalars: Sequence[float]) -> np.ndarray:
        if len(scalars) != len(inputs):
            raise IntegrityError(f"linear object has {len(inputs)} dependencies but {len(scalars)} coefficients")
        coefficients = _scalars(fmt, scalars)
        total = to_float(inputs[0], fmt) * coefficients[0]
        for x, c in zip(inputs[1:], coefficients[1:]):
            total += to_float(x, fmt) * c
        return from_float(total, fmt)


CODECS: dict[int, Codec | PredictiveCodec] = {
    c.id: c
    for c in (RawCodec(), ZstdCodec(), ShuffleZstdCodec(), DeltaCodec(), AdamSecondMomentCodec(), AdamParamCodec(), LinearCodec(),
              DeferredCodec())
}


def codec_by_id(codec_id: int) -> Codec | PredictiveCodec:
    """The codec registered under ``codec_id``; ``IntegrityError`` for an unknown id."""
    try:
        return CODECS[codec_id]
    except KeyError:
        raise IntegrityError(f"unknown codec id {codec_id} (written by a newer qckpt?)") from None


def encode_plain(raw: Raw, itemsize: int, floating: bool, level: int) -> tuple[Codec, bytes]:
    """Encode ``raw`` on its own with the codec that suits its element type; fall back
    to raw storage when compression does not make it smaller."""
    codec: Codec = CODECS[ShuffleZstdCodec.id] if floating and itemsize > 1 else CODECS[ZstdCodec.id]  # type: ignore[assignment]
    payload = codec.encode(raw, itemsize, level)
    if len(payload) >= len(_u8(raw)):
        return CODECS[RawCodec.id], bytes(_u8(raw).data)  # type: ignore[return-value]
    return codec, payload
