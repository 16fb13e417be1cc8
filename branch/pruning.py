"""Pruning: successive halving of futures at a rung.

Every future trains ``rung`` of the horizon; the futures ranked worst there
stop (their branches stay, ending at the rung), and the rest run to the
horizon, where the held-out comparison decides as usual (it verifies: a pruned
future can never be chosen, but a kept one is chosen only if it beats the
control beyond noise). The control is never pruned.

Two rankings (``Pruning.rank_by``):

* ``"observed"`` (the default): successive halving as published (Jamieson &
  Talwalkar 2016; Hyperband and ASHA after it) ranks by the metric observed at
  the rung, without extrapolating. Here that is the mean training loss over
  the last third of each future's prefix (at least 2 steps): late enough to
  leave the first steps after the origin, where interventions differ most in
  transient, long enough to average out per-batch noise.
* ``"forecast"``: a learning-curve forecaster's prediction of the training
  loss at the horizon (Domhan et al. 2015 style), below.

Both are recorded for every future whichever ranks, so the record shows how
the forecaster would have done.

The forecaster fits the curve families of ``branch.triggers.forecast`` (power
law, exponential decay, flat) to the main run's losses before the origin
followed by the future's prefix, and combines them with weights learned from
this run's own record: each family's mean absolute error on earlier events'
futures that ran to the horizon (forecast at the rung against the mean
training loss of their last steps), weights proportional to 1/error; equal
weights before the first event. The members' spread is recorded as the
forecast's uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import qckpt
from branch._checks import check_int, check_number
from branch.triggers import forecast

RANKINGS = ("observed", "forecast")


@dataclass(frozen=True)
class Pruning:
    """``rung``: the share of the horizon every future trains before the cut;
    ``keep``: the share of the non-control futures that go on (at least one);
    ``rank_by``: ``"observed"`` (loss at the rung) or ``"forecast"`` (forecast
    loss at the horizon), see the module docstring; ``context``: main-run
    losses before the origin added to each forecaster fit."""

    rung: float = 0.5
    keep: float = 0.5
    context: int = 64
    rank_by: str = "observed"

    def __post_init__(self) -> None:
        check_number("rung", self.rung, 0, 1, high_included=False)
        check_number("keep", self.keep, 0, 1)
        check_int("context", self.context, 0)
        if self.rank_by not in RANKINGS:
            raise qckpt.InvalidInputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {self.rank_by!r}")

    def rung_steps(self, horizon: int) -> int:
        """Steps every future trains before the cut (0: too short a horizon to prune)."""
        steps = round(self.rung * horizon)
        return steps if 4 <= steps < horizon else 0

    def decide(self, main: Sequence[Sequence[Any]], origin: int, horizon: int,
               prefixes: Mapping[str, Sequence[Sequence[Any]] | None], events: Sequence[Mapping[str, Any]],
               control: str = "control") -> tuple[set[str], dict[str, dict[str, Any]], dict[str, float | None]]:  # fmt: skip
        """The futures that go on, every future's forecast and its observed loss
        at the rung, from the run's path ``main``, the ``origin`` step, each
        future's prefix (None: it diverged) and the run's earlier ``events`` (the
        forecaster's weights are learned from them)."""
        context = [m for m in main if m[0] <= origin][-self.context :] if self.context else []
        weights = family_weights(events)
        forecasts = {name: predict(context, prefix, origin + horizon, weights) if prefix is not None else {}
                     for name, prefix in prefixes.items()}  # fmt: skip
        observed = {name: at_rung(prefix) if prefix is not None else None for name, prefix in prefixes.items()}
        ranks = observed if self.rank_by == "observed" else {name: f.get("value") for name, f in forecasts.items()}
        return survivors(ranks, control, self.keep), forecasts, observed


def _tail_mean(metrics: Sequence[Sequence[Any]], share: int) -> float | None:
    """Mean training loss of the last ``1/share`` of ``metrics`` (at least 2 rows), None if any is not finite."""
    tail = [m[1] for m in metrics[-max(2, len(metrics) // share) :]]
    return sum(tail) / len(tail) if tail and all(x is not None and math.isfinite(x) for x in tail) else None


def actual(metrics: Sequence[Sequence[Any]]) -> float | None:
    """What a forecast at the rung is checked against: the mean training loss of a
    future's last eighth of steps (at least 2), None if any is not finite."""
    return _tail_mean(metrics, 8)


def at_rung(prefix: Sequence[Sequence[Any]]) -> float | None:
    """The observed ranking's score: the mean training loss of the prefix's last
    third (at least 2 steps), None if any is not finite."""
    return _tail_mean(prefix, 3)


def family_weights(events: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Weights of the curve families, 1/mean absolute error over every recorded
    future with a forecast at the rung and an actual value (equal if none)."""
    errors: dict[str, list[float]] = {}
    for event in events:
        for future in event.get("futures", ()):
            members, truth = future.get("rung_forecast", {}).get("members", {}), future.get("rung_actual")
            if truth is None:
                continue
            for name, value in members.items():
                errors.setdefault(name, []).append(abs(value - truth))
    if not errors:
        return {}
    inverse = {name: 1.0 / max(sum(e) / len(e), 1e-9) for name, e in errors.items()}
    total = sum(inverse.values())
    return {name: w / total for name, w in inverse.items()}


def predict(context: Sequence[Sequence[Any]], prefix: Sequence[Sequence[Any]], target: int,
            weights: Mapping[str, float]) -> dict[str, Any]:  # fmt: skip
    """The forecast of one future's training loss at step ``target`` from the main
    run's ``context`` and its own ``prefix`` (``[step, loss, ...]`` rows):
    ``{"value", "spread", "members"}``; empty if the curve cannot be fitted."""
    points = [m for m in [*context, *prefix] if m[1] is not None and math.isfinite(m[1])]
    if len(prefix) == 0 or len(points) < 4:
        return {}
    members = forecast([m[1] for m in points], [m[0] for m in points], target - points[-1][0])
    if not members:
        return {}
    w = {name: weights.get(name, 0.0) for name in members} if weights else {}
    if sum(w.values()) <= 0:
        w = {name: 1.0 for name in members}
    value = sum(w[name] * members[name] for name in members) / sum(w.values())
    return {"value": value, "spread": max(members.values()) - min(members.values()), "members": members}


def survivors(ranks: Mapping[str, float | None], control: str, keep: float) -> set[str]:
    """The control and the ``keep`` share (at least one) of the other futures with
    the lowest ranks; a future without one (it diverged) is cut."""
    others = sorted((value, name) for name, value in ranks.items() if name != control and value is not None)
    n = max(1, math.ceil(keep * (len(ranks) - 1)))
    return {control} | {name for _, name in others[:n]}
