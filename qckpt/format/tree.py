"""Plain-data encoding of a state tree into JSON-compatible values, without pickle.

Supported leaves: None, bool, int, float (NaN, +-inf and -0.0 included), str,
bytes, numpy scalars, torch tensors and numeric numpy arrays; containers: list,
tuple and dict (keys: str, int, float, bool, None or tuples of those).
Everything else is rejected with ``UnsupportedValueError`` naming its path.

Encoding: JSON null/bool/int/str/list stand for themselves, finite floats are
JSON numbers (Python's repr round-trips them exactly), and every other value
is a one-key JSON object tag: ``{"$float": "nan"}``, ``{"$bytes": b64}``,
``{"$tuple": [...]}``, ``{"$dict": [[k, v], ...]}``,
``{"$npscalar": [dtype, b64]}``, ``{"$array": i}`` (i indexes the manifest's
tensor table). Since plain dicts never appear untagged, decoding is unambiguous.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qckpt.errors import IntegrityError, UnsupportedValueError
from qckpt.format.tensors import numpy_dtype, numpy_dtype_name, torch_dtype_name

Json = Any  # JSON-compatible value


@dataclass(frozen=True)
class ArrayLeaf:
    """A tensor or array found in the tree, with its path (``model/fc.weight``)."""

    path: str
    value: torch.Tensor | np.ndarray


def join_path(parent: str, key: object) -> str:
    """Path of a child: keys joined with '/', where '%' and '/' inside keys are escaped."""
    part = str(key).replace("%", "%25").replace("/", "%2F")
    return f"{parent}/{part}" if parent else part


# Exactly these types encode as themselves, as do finite floats (subclasses, e.g. numpy's float64
# or an IntEnum, take the general path).
_PLAIN = frozenset({bool, int, str})
_SUPPORTED = "None, bool, int, float, str, bytes, list, tuple, dict, torch.Tensor, numpy arrays and scalars"


def is_sharded(t: torch.Tensor) -> bool:
    """A ``torch.distributed`` DTensor: each process holds only its shard."""
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _check_tensor(t: torch.Tensor, path: str) -> None:
    if is_sharded(t):
        raise UnsupportedValueError(
            f"state key {path!r} is a sharded DTensor (FSDP2, tensor parallel): commit sharded modules in a TrainingState "
            "(Repository.commit / restore on every rank), or a sharded state dict with dcp.save(..., storage_writer=QckptWriter(repo))"
        )
    if t.layout != torch.strided:
        raise UnsupportedValueError(f"state key {path!r}: {t.layout} tensors are not supported (use .to_dense())")
    if t.is_quantized or t.device.type == "meta" or torch_dtype_name(t.dtype) is None:
        raise UnsupportedValueError(f"state key {path!r}: tensor dtype {t.dtype} on {t.device} is not supported")


def encode_tree(tree: Any) -> tuple[Json, list[ArrayLeaf]]:
    """Encode ``tree``; tensors/arrays go to the returned list, referenced by index.
    ``UnsupportedValueError`` for values without a plain encoding and for two tensors at one path."""
    arrays: list[ArrayLeaf] = []

    def child(v: Any, parent: str, key: object) -> Json:  # a leaf's path is joined only where it is needed
        plain = v is None or type(v) in _PLAIN or (type(v) is float and math.isfinite(v))
        return v if plain else enc(v, join_path(parent, key))

    def enc(v: Any, path: str) -> Json:
        if isinstance(v, torch.Tensor):  # the most frequent values first; the types tested before np.generic
            _check_tensor(v, path)        # are disjoint from its scalars (np.float64 is a float)
            arrays.append(ArrayLeaf(path, v))
            return {"$array": len(arrays) - 1}
        if isinstance(v, dict):
            return {"$dict": [[enc_key(k, path), child(x, path, k)] for k, x in v.items()]}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.generic):
            name = numpy_dtype_name(v.dtype)
            if name is None:
                raise UnsupportedValueError(f"state key {path!r}: numpy scalar of dtype {v.dtype} is not supported")
            return {"$npscalar": [name, base64.b64encode(v.tobytes()).decode()]}
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"$float": repr(float(v))}
        if isinstance(v, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(v).decode()}
        if isinstance(v, np.ndarray):
            if numpy_dtype_name(v.dtype) is None:
                raise UnsupportedValueError(f"state key {path!r}: numpy arrays of dtype {v.dtype} are not supported")
            arrays.append(ArrayLeaf(path, v))
            return {"$array": len(arrays) - 1}
        if isinstance(v, list):
            return [child(x, path, i) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"$tuple": [child(x, path, i) for i, x in enumerate(v)]}
        raise UnsupportedValueError(
            f"state key {path!r}: cannot store a value of type {type(v).__qualname__} without pickle; "
            f"supported are {_SUPPORTED}"
        )

    def enc_key(k: Any, path: str) -> Json:
        if type(k) in _PLAIN:
            return k
        if isinstance(k, tuple):
            return {"$tuple": [enc_key(x, path) for x in k]}
        if k is None or isinstance(k, (bool, int, float, str)) and not isinstance(k, np.generic):
            return enc(k, path)
        raise UnsupportedValueError(f"state key {path!r}: dict key of type {type(k).__qualname__} is not supported")

    encoded = enc(tree, "")
    paths: set[str] = set()
    for leaf in arrays:  # a path names one tensor: views, the hot tier and predictions look tensors up by it
        if leaf.path in paths:
            raise UnsupportedValueError(
                f"state key {leaf.path!r} names two tensors (dict keys that print alike, such as 1 and '1'); "
                "rename one of them"
            )
        paths.add(leaf.path)
    return encoded, arrays


def encode_plain(value: Any) -> Json:
    """Encode plain data that must not contain tensors (metrics, snapshot metadata)."""
    encoded, arrays = encode_tree(value)
    if arrays:
        raise UnsupportedValueError(f"{arrays[0].path or 'value'}: tensors are not allowed here")
    return encoded


def encoded_dict(items: Iterable[tuple[str, Json]]) -> Json:
    """What ``encode_tree`` makes of a dict under string keys from its values'
    encodings (``encode_plain``, ``encoded_leaf``), in order: for callers that lay
    out a large tree without building it first."""
    return {"$dict": [[key, value] for key, value in items]}


def encoded_leaf(index: int) -> Json:
    """What ``encode_tree`` puts where tensor-table entry ``index`` goes."""
    return {"$array": index}


def decode_tree(encoded: Json, array: Callable[[int], Any]) -> Any:
    """Invert ``encode_tree``; ``array(i)`` supplies the value for tensor-table entry i."""

    def dec(v: Json) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not (isinstance(v, dict) and len(v) == 1):
            raise IntegrityError(f"malformed encoded value {str(v)[:80]!r}")
        tag, body = next(iter(v.items()))
        try:
            if tag == "$float":
                return float({"nan": "nan", "inf": "inf", "-inf": "-inf"}[body])
            if tag == "$bytes":
                return base64.b64decode(body, validate=True)
            if tag == "$tuple":
                return tuple(dec(x) for x in body)
            if tag == "$dict":
                return {_hashable(dec(k)): dec(x) for k, x in body}
            if tag == "$npscalar":
                dtype_name, data = body
                return np.frombuffer(base64.b64decode(data, validate=True), dtype=numpy_dtype(dtype_name))[0]
            if tag == "$array":
                return array(body)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise IntegrityError(f"malformed {tag} value: {e}") from e
        raise IntegrityError(f"unknown tag {tag!r} in encoded value")

    return dec(encoded)


def replace_leaves(tree: Any, leaf_type: type, value: Callable[[Any], Any]) -> Any:
    """A decoded tree with new containers (dicts, lists, tuples; dict keys kept) and
    each leaf of exactly ``leaf_type`` replaced by ``value(leaf)``; other leaves are
    shared (they are immutable). Decoding a tree again costs ~3x as much."""

    def rep(v: Any) -> Any:
        kind = type(v)
        if kind is dict:
            return {k: rep(x) for k, x in v.items()}
        if kind is list:
            return [rep(x) for x in v]
        if kind is tuple:
            return tuple(rep(x) for x in v)
        return value(v) if kind is leaf_type else v

    return rep(tree)


def _hashable(key: Any) -> Any:
    hash(key)  # raises TypeError for a malformed key, reported as IntegrityError
    return key


def decode_plain(encoded: Json) -> Any:
    """Invert ``encode_plain``; a tensor reference here means the record is damaged."""

    def no_array(i: int) -> Any:
        raise IntegrityError("unexpected tensor reference in plain data")

    return decode_tree(encoded, no_array)
