"""Selection prefers the control under pure noise and picks a future only beyond noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

import qckpt
from branch import select


def test_under_pure_noise_the_control_is_kept_almost_always() -> None:
    rng = np.random.default_rng(0)
    picked = 0
    trials = 200
    for trial in range(trials):
        base = rng.normal(3.0, 0.3, 16)  # the held-out batches differ in difficulty...
        scores = {"control": base + rng.normal(0, 0.05, 16)}  # ...and every future adds noise of its own
        scores |= {f"f{i}": base + rng.normal(0, 0.05, 16) for i in range(4)}
        picked += select(scores, "control", seed=trial, resamples=500).chosen != "control"
    assert picked / trials <= 0.08  # nominal 5% family-wise (Bonferroni), bootstrap intervals run a little narrow


def test_a_future_better_beyond_noise_is_chosen_and_the_record_says_why() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(3.0, 0.3, 16)
    scores = {"control": base + rng.normal(0, 0.02, 16), "lower": base - 0.2 + rng.normal(0, 0.02, 16),
              "slightly": base - 0.01 + rng.normal(0, 0.02, 16)}  # fmt: skip
    selection = select(scores, "control")
    assert selection.chosen == "lower"
    lower = next(c for c in selection.comparisons if c.name == "lower")
    assert lower.qualifies and lower.high < 0 and lower.mean == pytest.approx(-0.2, abs=0.03)
    assert lower.level == pytest.approx(1 - 0.05 / 2)  # Bonferroni over two candidates


def test_diverged_futures_lose_and_a_diverged_control_is_replaced() -> None:
    ok = [3.0, 3.1, 2.9]
    assert select({"control": ok, "nan": [math.nan] * 3}, "control").chosen == "control"
    assert select({"control": [math.inf] * 3, "a": [3.5] * 3, "b": [3.2] * 3}, "control").chosen == "b"


def test_scores_must_cover_the_same_batches() -> None:
    with pytest.raises(qckpt.InvalidInputError, match="same batches"):
        select({"control": [1.0, 2.0], "a": [1.0]}, "control")
    with pytest.raises(qckpt.InvalidInputError, match="control"):
        select({"a": [1.0]}, "control")
