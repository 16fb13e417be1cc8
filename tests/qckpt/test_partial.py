"""Lazy and partial loads: a slice read equals slicing the full tensor, and reads
only the chunks that cover it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qckpt

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()]).numpy() if t.element_size() in _INT_OF_SIZE else t.numpy()


@st.composite
def _indices(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int | slice, ...]:
    parts: list[int | slice] = []
    for size in shape[: draw(st.integers(0, len(shape)))]:
        if size and draw(st.booleans()):
            parts.append(draw(st.integers(-size, size - 1)))
        else:
            bound = st.none() | st.integers(-size - 2, size + 2)
            parts.append(slice(draw(bound), draw(bound), draw(st.none() | st.sampled_from([1, 2, 3, -1, -2]))))
    return tuple(parts)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float16]),
       shape=st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple))  # fmt: skip
def test_partial_read_equals_slicing_the_full_tensor(data: st.DataObject, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    values = torch.randint(0, 2, shape).bool() if dtype == torch.bool else torch.randn(shape).to(dtype)
    table = np.arange(math.prod(shape), dtype=np.int32).reshape(shape)
    repo = qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=64)
    view = repo.load(repo.commit({"t": values, "a": table}).id)
    index = data.draw(_indices(shape))
    assert np.array_equal(_bits(view.read("t", index)), _bits(values)[index])
    assert view.read("t", index).dtype == dtype
    assert np.array_equal(view.read("a", index), table[index])
    repo.close()


def test_partial_read_touches_only_covering_chunks() -> None:
    repo = qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=1024)
    weights = torch.randn(1000, 64)  # 250 chunks of 4 rows
    view = repo.load(repo.commit({"w": weights}).id)
    requested: list[int] = []
    read = repo._store.reader.read
    repo._store.reader.read = lambda targets, deliver, **kw: (requested.append(len(targets)), read(targets, deliver, **kw))[1]  # type: ignore[method-assign]
    assert torch.equal(view.read("w", slice(100, 108)), weights[100:108])
    assert torch.equal(view.read("w", (500, slice(3, 9))), weights[500, 3:9])
    assert requested == [2, 1]
    with pytest.raises(qckpt.InvalidInputError, match="out of range"):
        view.read("w", 1000)
    with pytest.raises(qckpt.InvalidInputError, match="ints and slices"):
        view.read("w", (0, 1, 2))
    repo.close()
