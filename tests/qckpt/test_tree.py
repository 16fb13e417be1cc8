"""The no-pickle tree encoding: what is accepted, what is refused, and how errors read."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import qckpt
from qckpt.format.records import Manifest, TensorEntry
from qckpt.format.tree import decode_plain, decode_tree, encode_plain, encode_tree
from tests.qckpt.strategies import state_trees


def test_encoding_is_json() -> None:
    encoded, arrays = encode_tree({"a": [1, 2.5, None, True, "s", b"\x00", (1, 2)], 3: torch.zeros(2)})
    json.dumps(encoded, allow_nan=False)  # strict JSON: no NaN literals, no pickle
    assert [a.path for a in arrays] == ["3"]


def test_special_floats_and_exact_values_roundtrip() -> None:
    value = [math.nan, math.inf, -math.inf, -0.0, 0.1, 1e308, 5e-324, 2**80, np.float32(1.5), np.int64(-3)]
    back = decode_plain(json.loads(json.dumps(encode_plain(value), allow_nan=False)))
    assert math.isnan(back[0]) and back[1:3] == [math.inf, -math.inf]
    assert math.copysign(1, back[3]) == -1 and back[4:8] == value[4:8]
    assert type(back[8]) is np.float32 and back[8] == 1.5 and type(back[9]) is np.int64


@pytest.mark.parametrize(
    ("tree", "path", "what"),
    [
        ({"model": {"w": object()}}, "model/w", "object"),
        ({"opt": [1, {2, 3}]}, "opt/1", "set"),
        ({"fn": lambda x: x}, "fn", "function"),
        ({"dev": torch.device("cpu")}, "dev", "device"),
        ({"sparse": torch.eye(2).to_sparse()}, "sparse", "sparse"),
        ({"meta": torch.empty(2, device="meta")}, "meta", "meta"),
        ({"obj": np.array([object()])}, "obj", "object"),
        ({"d": {torch.zeros(1): 1}}, "d", "dict key"),
        ({"a/b": {"c": object()}}, "a%2Fb/c", "object"),
    ],
)
def test_unsupported_values_name_their_key(tree: dict, path: str, what: str, repo: qckpt.Repository) -> None:
    with pytest.raises(qckpt.UnsupportedValueError, match="state key") as info:
        repo.commit(tree)
    assert repr(path) in str(info.value) and what in str(info.value)
    assert isinstance(info.value, ValueError)
    assert repo.snapshot_ids() == [] and repo.branches() == {}
    assert repo.backend.list("packs/") == []


@given(state_trees)
@settings(max_examples=60, deadline=None)
def test_a_manifest_builds_the_tree_decoding_would_from_its_decoded_structure(tree: Any) -> None:
    """``Manifest.tree_of`` (a map over the structure decoded once) gives exactly what
    decoding the tree again gives, in new containers: changing one leaves the shared
    structure alone."""
    encoded, leaves = encode_tree(tree)
    manifest = Manifest(encoded, tuple(TensorEntry(leaf.path, "tensor", "float32", (), 4, ()) for leaf in leaves))
    values = [object() for _ in leaves]
    built, decoded = manifest.tree_of(values), decode_tree(encoded, values.__getitem__)
    assert _same(built, decoded)
    before = repr(manifest.structure)
    for container in _containers(built):
        if isinstance(container, (dict, list)):
            container.clear()
    assert repr(manifest.structure) == before


def _same(a: Any, b: Any) -> bool:
    """Equal trees: the same container types and keys, leaves equal (NaN as NaN) or, for
    the stand-in tensors, the same objects."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a is b or a == b


def _containers(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [tree, *(c for v in tree.values() for c in _containers(v))]
    if isinstance(tree, (list, tuple)):
        return [tree, *(c for v in tree for c in _containers(v))]
    return []
