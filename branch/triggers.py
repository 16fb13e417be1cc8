"""Instability triggers: detectors that watch per-step loss and gradient norm.

Every detector turns one step's observation into a ``Signal``: a *score* in
units of its own threshold (1.0 = at the threshold) and the numbers behind
it, so a firing always says why. ``InstabilityIndex`` combines them: the index
is the largest score, scaled by a sensitivity schedule (laxer early in the
run, when losses move fast); it fires when the index reaches 1, then stays
quiet for a cooldown.

Defaults come from published practice, not from any benchmark here:

* gradient norm: ZClip's EMA of mean and variance with alpha 0.97 and its
  z-score threshold 2.5 (Kumar et al., 2025), outliers entering the EMAs
  clipped to the threshold as ZClip does. ZClip uses 2.5 to *clip*; a
  rollback costs much more than a clip, so a z above 2.5 counts as
  *elevated* and the detector fires when most of the recent steps are
  elevated (3 of the last 5), or at once at z >= 6, the threshold OLMo-core
  uses to skip a step. Unlike ZClip the z-score is taken of the logarithm of
  the norm: minibatch gradient norms vary multiplicatively (right-skewed),
  and on the raw scale a clean run's ordinary tail reaches z 6-7 (measured on
  synthetic log-normal noise in ``tests/branch/test_triggers.py``), on the
  log scale under 5;
* loss: a robust z-score against the median and MAD of the last 64 losses
  (robust to the spikes it looks for), firing at z >= 6 as OLMo-core's loss
  spike rule does, or when 3 of the last 5 steps exceed z 3;
* non-finite loss or gradient norm: always fires;
* forecaster disagreement: an ensemble of learning-curve fits over the
  recent losses (power law, exponential decay, linear) whose forecasts for
  ``horizon`` steps ahead disagree by more than ``bound`` (relative to the
  median forecast) for several steps in a row. Not in the default index: on
  small, noisy runs the fits' spread is itself noisy; add it explicitly.

Detectors need ``warmup`` observations before they judge anything. Not
thread-safe: one training loop feeds them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Protocol

import numpy as np

import qckpt
from branch._checks import check_int, check_number


@dataclass(frozen=True)
class Observation:
    """What one training step reported. ``grad_norm`` is optional (None: not measured)."""

    step: int
    loss: float
    grad_norm: float | None = None


@dataclass(frozen=True)
class Signal:
    """One detector's verdict on one step: ``score`` relative to its threshold
    (>= 1: fire), whether the step is ``elevated`` (unusual, though maybe not
    enough to fire), and ``details`` (values, baselines, thresholds) for the record."""

    detector: str
    score: float
    details: dict[str, Any] = field(default_factory=dict)
    elevated: bool = False

    @property
    def fired(self) -> bool:
        return self.score >= 1.0


class Detector(Protocol):
    name: str

    def observe(self, obs: Observation) -> Signal:
        """Judge ``obs`` against what came before, then learn from it."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_thresholds(z_elevated: float, z_spike: float, persist: int, window: int, warmup: int) -> None:
    """The settings ``GradNormZ`` and ``LossSpike`` share: a detector that could never
    fire (``persist`` above ``window``) or fires on every step is refused."""
    check_number("z_elevated", z_elevated)
    check_number("z_spike", z_spike)
    if z_spike < z_elevated:
        raise qckpt.InvalidInputError(f"z_spike ({z_spike}) must be at least z_elevated ({z_elevated})")
    check_int("window", window)
    check_int("persist", persist)
    if persist > window:
        raise qckpt.InvalidInputError(f"persist ({persist}) cannot exceed window ({window}): the detector could never fire on it")
    check_int("warmup", warmup, 0)


def _check_warmup_fits(warmup: int, history: int) -> None:
    """A detector that keeps ``history`` values and waits for ``warmup`` of them would
    never start if ``warmup`` were larger."""
    check_int("history", history)
    if warmup > history:
        raise qckpt.InvalidInputError(f"warmup ({warmup}) cannot exceed history ({history}): the detector would never start")


class _Recent:
    """How many of the last ``window`` steps were elevated."""

    def __init__(self, window: int) -> None:
        self.flags = deque[bool](maxlen=window)

    def push(self, elevated: bool) -> int:
        self.flags.append(elevated)
        return sum(self.flags)


class NonFinite:
    """Fires on a NaN or infinite loss or gradient norm."""

    name = "non_finite"

    def observe(self, obs: Observation) -> Signal:
        values = {"loss": obs.loss, "grad_norm": obs.grad_norm}
        bad = [k for k, v in values.items() if v is not None and not math.isfinite(v)]
        return Signal(self.name, math.inf if bad else 0.0, {"non_finite": bad, **values} if bad else {}, bool(bad))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GradNormZ:
    """ZClip-style z-score of the log gradient norm against EMAs of its mean and variance.

    Elevated at ``z >= z_elevated``; fires at ``z >= z_spike``, or when
    ``persist`` of the last ``window`` steps were elevated. An elevated value
    enters the EMAs clipped to ``z_elevated`` (as in ZClip: a spike must not
    become the baseline, and excluding it outright would bias the variance
    low). ``mean`` is the EMA of the log norm; ``typical`` its exponential."""

    name = "grad_norm"

    def __init__(self, alpha: float = 0.97, z_elevated: float = 2.5, z_spike: float = 6.0,
                 persist: int = 3, window: int = 5, warmup: int = 25) -> None:  # fmt: skip
        check_number("alpha", alpha, 0, 1, high_included=False)
        _check_thresholds(z_elevated, z_spike, persist, window, warmup)
        self.alpha, self.z_elevated, self.z_spike, self.warmup = alpha, z_elevated, z_spike, warmup
        self.persist, self.window = persist, window
        self._recent = _Recent(window)
        self.mean, self.var, self.seen = 0.0, 0.0, 0

    @property
    def typical(self) -> float | None:
        """The run's typical gradient norm (geometric EMA), once warmed up."""
        return math.exp(self.mean) if self.seen >= self.warmup else None

    def observe(self, obs: Observation) -> Signal:
        if obs.grad_norm is None or not math.isfinite(obs.grad_norm) or obs.grad_norm <= 0:
            return Signal(self.name, 0.0)
        g = math.log(obs.grad_norm)
        if self.seen < self.warmup:  # plain running mean and variance until the EMAs have something to go on
            self.seen += 1
            delta = g - self.mean
            self.mean += delta / self.seen
            self.var += (delta * (g - self.mean) - self.var) / self.seen
            return Signal(self.name, 0.0)
        std = math.sqrt(max(self.var, 1e-24))
        z = (g - self.mean) / std
        count = self._recent.push(z >= self.z_elevated)
        score = max(z / self.z_spike, count / self.persist if z >= self.z_elevated else 0.0)
        learned = min(g, self.mean + self.z_elevated * std)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * learned
        self.var = self.alpha * self.var + (1 - self.alpha) * (learned - self.mean) ** 2
        details = {"grad_norm": obs.grad_norm, "typical": math.exp(self.mean), "log_std": std, "z": z, "z_spike": self.z_spike,
                   "z_elevated": self.z_elevated, "elevated_recent": count, "persist": self.persist}  # fmt: skip
        return Signal(self.name, score, details, z >= self.z_elevated)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "seen": self.seen, "recent": list(self._recent.flags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.seen = float(state["mean"]), float(state["var"]), int(state["seen"])
        self._recent.flags.clear()
        self._recent.flags.extend(bool(f) for f in state["recent"])


class LossSpike:
    """Robust z-score of the loss against the median and MAD of the last ``history``
    losses. Fires at ``z >= z_spike`` or when ``persist`` of the last ``window``
    steps reach ``z_elevated``. Spikes do not enter the baseline."""

    name = "loss_spike"

    def __init__(self, history: int = 64, z_elevated: float = 3.0, z_spike: float = 6.0,
                 persist: int = 3, window: int = 5, warmup: int = 25) -> None:  # fmt: skip
        _check_thresholds(z_elevated, z_spike, persist, window, warmup)
        _check_warmup_fits(warmup, history)
        self.z_elevated, self.z_spike, self.warmup, self.persist = z_elevated, z_spike, warmup, persist
        self.losses = deque[float](maxlen=history)
        self._recent = _Recent(window)

    def observe(self, obs: Observation) -> Signal:
        loss = obs.loss
        if not math.isfinite(loss):
            return Signal(self.name, 0.0)
        if len(self.losses) < self.warmup:
            self.losses.append(loss)
            return Signal(self.name, 0.0)
        center = median(self.losses)
        mad = median(abs(x - center) for x in self.losses)
        scale = max(1.4826 * mad, 1e-3 * abs(center), 1e-12)  # a perfectly flat history is not infinitely sensitive
        z = (loss - center) / scale
        count = self._recent.push(z >= self.z_elevated)
        score = max(z / self.z_spike, count / self.persist if z >= self.z_elevated else 0.0)
        if z < self.z_elevated:
            self.losses.append(loss)
        details = {"loss": loss, "median": center, "robust_std": scale, "z": z, "z_spike": self.z_spike,
                   "z_elevated": self.z_elevated, "elevated_recent": count, "persist": self.persist}  # fmt: skip
        return Signal(self.name, score, details, z >= self.z_elevated)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "recent": list(self._recent.flags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(float(x) for x in state["losses"])
        self._recent.flags.clear()
        self._recent.flags.extend(bool(f) for f in state["recent"])


def forecast(losses: list[float], steps: list[int], ahead: int) -> dict[str, float]:
    """Forecasts of the loss ``ahead`` steps after the last one, by two learning-curve
    fits to ``(steps, losses)``, ``power`` (L = a + b * t^-c, c on a grid, a and b
    by least squares) and ``exp`` (L = a + b * exp(-t / tau), tau on a grid), and
    ``flat``, the mean of the last eighth of the losses (no change: the naive
    forecast the fits must not stray far from on a healthy curve). Nothing for
    fewer than 4 points or non-finite values."""
    t = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    out: dict[str, float] = {}
    if len(t) < 4 or not np.all(np.isfinite(y)):
        return out
    t = t - t[0] + 1.0
    target = t[-1] + ahead

    def best_fit(features: list[tuple[np.ndarray, float]]) -> float | None:
        best: tuple[float, float] | None = None
        for x, x_target in features:
            design = np.stack([np.ones_like(x), x], axis=1)
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)
            err = float(np.sum((design @ coef - y) ** 2))
            if best is None or err < best[0]:
                best = (err, float(coef[0] + coef[1] * x_target))
        return None if best is None else best[1]

    span = float(t[-1])
    power = best_fit([(t**-c, target**-c) for c in (0.1, 0.25, 0.5, 1.0, 2.0)])
    exp = best_fit([(np.exp(-t / tau), math.exp(-target / tau)) for tau in (span / 8, span / 4, span / 2, span, 2 * span)])
    flat = float(np.mean(y[-max(2, len(y) // 8) :]))
    for name, value in (("power", power), ("exp", exp), ("flat", flat)):
        if value is not None and math.isfinite(value):
            out[name] = value
    return out


class ForecastDisagreement:
    """Fires when the ensemble's forecasts ``horizon`` steps ahead spread by more than
    ``bound`` of the median forecast's magnitude for ``persist`` steps in a row
    (fits over the last ``history`` losses, refitted every ``every`` steps). The
    default bound, 0.3, is about twice the largest spread measured on a clean
    power-law curve with 6% multiplicative noise (0.16), see the tests."""

    name = "forecast"

    def __init__(self, horizon: int = 50, bound: float = 0.3, history: int = 64, persist: int = 3,
                 every: int = 1, warmup: int = 32) -> None:  # fmt: skip
        check_int("horizon", horizon)
        check_number("bound", bound)
        for name, value in (("persist", persist), ("every", every)):
            check_int(name, value)
        check_int("warmup", warmup, 0)
        _check_warmup_fits(warmup, history)
        self.horizon, self.bound, self.persist, self.every, self.warmup = horizon, bound, persist, every, warmup
        self.points = deque[tuple[int, float]](maxlen=history)
        self.streak = 0
        self.last: dict[str, float] = {}

    def observe(self, obs: Observation) -> Signal:
        if math.isfinite(obs.loss):
            self.points.append((obs.step, obs.loss))
        if len(self.points) < self.warmup or obs.step % self.every:
            return Signal(self.name, 0.0)
        steps, losses = zip(*self.points)
        self.last = forecast(list(losses), list(steps), self.horizon)
        if len(self.last) < 2:
            return Signal(self.name, 0.0)
        values = sorted(self.last.values())
        center = median(values)
        spread = (values[-1] - values[0]) / max(abs(center), 1e-12)
        self.streak = self.streak + 1 if spread > self.bound else 0
        score = (spread / self.bound) * min(1.0, self.streak / self.persist)
        details = {"forecasts": dict(self.last), "spread": spread, "bound": self.bound, "streak": self.streak,
                   "horizon": self.horizon}  # fmt: skip
        return Signal(self.name, score, details, spread > self.bound)

    def state_dict(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points], "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.points.clear()
        self.points.extend((int(s), float(v)) for s, v in state["points"])
        self.streak = int(state["streak"])


@dataclass(frozen=True)
class Trigger:
    """The instability index fired at ``step``: the index, the sensitivity in force,
    every detector's signal, and the step the anomaly began (the first of the
    elevated steps that led here)."""

    step: int
    index: float
    sensitivity: float
    began: int
    signals: tuple[Signal, ...]

    def as_record(self) -> dict[str, Any]:
        return {"step": self.step, "index": self.index, "sensitivity": self.sensitivity, "began": self.began,
                "signals": [{"detector": s.detector, "score": s.score, "details": s.details} for s in self.signals]}  # fmt: skip


class InstabilityIndex:
    """Combines detectors: index = max score x sensitivity(progress); fires at >= 1,
    then ignores ``cooldown`` steps. ``sensitivity`` is ``early`` for the first
    ``early_fraction`` of ``total_steps`` (laxer: < 1), then 1."""

    def __init__(self, detectors: list[Detector] | None = None, *, total_steps: int | None = None,
                 cooldown: int = 50, early: float = 0.5, early_fraction: float = 0.1) -> None:  # fmt: skip
        check_int("total_steps", total_steps, optional=True)
        check_int("cooldown", cooldown, 0)
        check_number("early", early, 0, 1)
        check_number("early_fraction", early_fraction, 0, 1, low_included=True)
        self.detectors: list[Detector] = detectors if detectors is not None else [NonFinite(), LossSpike(), GradNormZ()]
        self.total_steps, self.cooldown, self.early, self.early_fraction = total_steps, cooldown, early, early_fraction
        self.quiet_until = -1
        self.elevated_since: int | None = None

    def sensitivity(self, step: int) -> float:
        if self.total_steps and step < self.early_fraction * self.total_steps:
            return self.early
        return 1.0

    def observe(self, obs: Observation) -> Trigger | None:
        signals = tuple(d.observe(obs) for d in self.detectors)
        sensitivity = self.sensitivity(obs.step)
        index = max((s.score for s in signals), default=0.0) * sensitivity
        if index >= 1 or any(s.elevated for s in signals):
            self.elevated_since = obs.step if self.elevated_since is None else self.elevated_since
        else:
            self.elevated_since = None
        if index < 1 or obs.step <= self.quiet_until:
            return None
        self.quiet_until = obs.step + self.cooldown
        began = self.elevated_since if self.elevated_since is not None else obs.step
        self.elevated_since = None
        return Trigger(obs.step, index, sensitivity, began, signals)

    def state_dict(self) -> dict[str, Any]:
        return {"detectors": [d.state_dict() for d in self.detectors], "quiet_until": self.quiet_until,
                "elevated_since": self.elevated_since}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for detector, saved in zip(self.detectors, state["detectors"], strict=True):
            detector.load_state_dict(saved)
        self.quiet_until, self.elevated_since = int(state["quiet_until"]), state["elevated_since"]
