"""Hypothesis strategies for state trees: every supported dtype and odd shape."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

TORCH_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
]  # fmt: skip
NUMPY_DTYPES = [np.float32, np.float64, np.int16, np.uint8, np.int64, np.bool_]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Random bit patterns (NaN payloads included) in any layout: empty, 0-d, strided views."""
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    base_shape = (shape[0] * 2, *shape[1:]) if layout == "strided" and shape else shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    raw = rng.integers(0, 256, size=math.prod(base_shape) * itemsize, dtype=np.uint8)
    if dtype == torch.bool:
        raw %= 2
    t = torch.from_numpy(raw).view(dtype).reshape(base_shape) if raw.size else torch.empty(base_shape, dtype=dtype)
    if layout == "strided" and shape:
        t = t[::2]
    elif layout == "transposed" and len(shape) >= 2:
        t = t.transpose(0, 1)
    return t


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (rng.standard_normal(shape) * 100).astype(dtype)


plain_leaves = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.binary(max_size=20)
)  # fmt: skip
keys = st.text(max_size=8) | st.integers(-5, 100)

state_trees = st.recursive(
    plain_leaves | tensors() | arrays(),
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(keys, children, max_size=4),
    max_leaves=12,
)
