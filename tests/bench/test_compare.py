"""The bitwise comparison the round-trip and resume tests rely on must itself be able to fail."""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.compare import differences


def test_detects_a_single_flipped_bit() -> None:
    a = torch.randn(4, 4)
    b = a.clone()
    b.view(torch.int32)[2, 3] ^= 1
    assert differences({"w": a}, {"w": b}) == ["/w: values differ"]


def test_nan_payloads_and_signed_zero_are_compared_bitwise() -> None:
    nan1 = torch.tensor([math.nan])
    nan2 = nan1.clone()
    nan2.view(torch.int32)[0] ^= 1  # still NaN, different payload
    assert differences(nan1, nan2) and not differences(nan1, nan1.clone())
    assert differences(0.0, -0.0) and not differences(math.nan, math.nan)


def test_types_shapes_and_keys() -> None:
    assert differences(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert differences(torch.zeros(2), torch.zeros(1, 2))
    assert differences({"a": 1}, {"b": 1}) and differences([1], (1,)) and differences(1, True)
    assert differences(np.zeros(2, np.float32), np.zeros(2, np.float64))
    assert not differences({"a": [np.int64(3), b"x", None]}, {"a": [np.int64(3), b"x", None]})
