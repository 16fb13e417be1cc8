"""Selection with statistics: a future is chosen over the control only when it is
better beyond noise.

Every future is evaluated on the same held-out batches, so each candidate is
compared with the control batch by batch (paired): the mean of the per-batch
differences (candidate - control; lower loss is better) and a bootstrap
confidence interval for it. A candidate qualifies when the whole interval is
below zero. With K candidates each interval is widened for K comparisons
(Bonferroni: level ``1 - (1 - confidence) / K``), so exploring more futures
does not make a lucky pick more likely. Among qualifying candidates the lowest
mean wins; if none qualifies, the control continues. Deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

import qckpt
from branch._checks import check_number


@dataclass(frozen=True)
class Comparison:
    """One candidate against the control: mean difference and its confidence interval."""

    name: str
    mean: float  # candidate loss - control loss, averaged over held-out batches
    low: float
    high: float
    level: float
    qualifies: bool


@dataclass(frozen=True)
class Selection:
    """The chosen future (``control`` when none is better beyond noise) and every comparison."""

    chosen: str
    control: str
    comparisons: tuple[Comparison, ...]


def compare(name: str, candidate: Sequence[float], control: Sequence[float], level: float, resamples: int,
            rng: np.random.Generator) -> Comparison:  # fmt: skip
    """Paired bootstrap of the mean difference ``candidate - control`` at ``level``."""
    a, b = np.asarray(candidate, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise qckpt.InvalidInputError(
            f"future {name!r} was evaluated on {a.size} held-out batches and the control on {b.size}: "
            "the evaluation must score every future on the same batches"
        )
    if not np.all(np.isfinite(a)):
        return Comparison(name, math.inf, math.inf, math.inf, level, False)
    diff = a - b
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = (float(q) for q in np.quantile(means, [tail, 1 - tail]))
    return Comparison(name, float(diff.mean()), low, high, level, high < 0)


def select(
    scores: Mapping[str, Sequence[float]],
    control: str,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    candidates: int | None = None,
) -> Selection:
    """Choose among ``scores`` (future name -> per-batch held-out losses, the control's included).
    ``candidates``: how many futures competed with the control (the Bonferroni
    count), if more than ``scores`` holds (pruning cut some after looking at them)."""
    if control not in scores:
        raise qckpt.InvalidInputError(f"the control {control!r} has no scores")
    check_number("confidence", confidence, 0, 1, high_included=False)
    others = [n for n in scores if n != control]
    level = 1 - (1 - confidence) / max(1, len(others), candidates or 0)
    if not np.all(np.isfinite(np.asarray(scores[control], dtype=np.float64))):  # the control diverged
        finite = {n: float(np.mean(scores[n])) for n in others if np.all(np.isfinite(np.asarray(scores[n], dtype=np.float64)))}
        comparisons = tuple(Comparison(n, -math.inf, -math.inf, -math.inf, level, True) if n in finite
                            else Comparison(n, math.nan, math.nan, math.nan, level, False) for n in others)  # fmt: skip
        return Selection(min(finite, key=finite.__getitem__) if finite else control, control, comparisons)
    rng = np.random.default_rng(seed)
    comparisons = tuple(compare(n, scores[n], scores[control], level, resamples, rng) for n in others)
    qualified = [c for c in comparisons if c.qualifies]
    chosen = min(qualified, key=lambda c: c.mean).name if qualified else control
    return Selection(chosen, control, comparisons)
