"""Triggers on synthetic series: quiet on a clean run's noise, firing on spikes and
non-finite values, always saying why."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import qckpt
from branch.triggers import ForecastDisagreement, GradNormZ, InstabilityIndex, LossSpike, NonFinite, Observation, forecast


def clean_run(steps: int, seed: int) -> list[Observation]:
    """A decaying loss with multiplicative noise (like a small model's minibatch losses)
    and a gradient norm that drifts slowly, with log-normal noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1)
    loss = (2.0 + 4.0 * t**-0.5) * np.exp(rng.normal(0, 0.06, steps))
    grad = (0.5 + 0.3 * np.exp(-t / 300)) * np.exp(rng.normal(0, 0.15, steps))
    return [Observation(int(s), float(l), float(g)) for s, l, g in zip(t, loss, grad)]


@pytest.mark.parametrize("seed", range(5))
def test_quiet_on_a_clean_runs_noise(seed: int) -> None:
    index = InstabilityIndex(total_steps=2000, cooldown=50)
    fired = [t for t in (index.observe(o) for o in clean_run(2000, seed)) if t is not None]
    assert fired == [], [(t.step, [(s.detector, round(s.score, 2)) for s in t.signals]) for t in fired]


def test_fires_on_a_loss_spike_and_says_why() -> None:
    run = clean_run(400, 0)
    index = InstabilityIndex(total_steps=400)
    spiked = [o if not 300 <= o.step < 304 else Observation(o.step, o.loss * 3, o.grad_norm) for o in run]
    fired = [t for t in (index.observe(o) for o in spiked) if t is not None]
    assert [t.step for t in fired] == [300]
    (signal,) = [s for s in fired[0].signals if s.fired]
    assert signal.detector == "loss_spike" and signal.details["z"] >= 6 and signal.details["z_spike"] == 6
    assert fired[0].began == 300


def test_fires_on_a_gradient_norm_outlier() -> None:
    run = [o if o.step != 250 else Observation(o.step, o.loss, o.grad_norm * 20) for o in clean_run(400, 1)]
    index = InstabilityIndex(total_steps=400)
    fired = [t for t in (index.observe(o) for o in run) if t is not None]
    assert [t.step for t in fired] == [250]
    assert any(s.detector == "grad_norm" and s.fired for s in fired[0].signals)


def test_persistently_elevated_gradients_fire_and_mark_where_they_began() -> None:
    run = clean_run(400, 2)
    run = [o if not 200 <= o.step < 210 else Observation(o.step, o.loss, o.grad_norm * 2.2) for o in run]
    index = InstabilityIndex(total_steps=400)
    fired = [t for t in (index.observe(o) for o in run) if t is not None]
    assert fired and 200 <= fired[0].step <= 205 and fired[0].began == 200


@pytest.mark.parametrize("field", ["loss", "grad_norm"])
def test_non_finite_fires_at_once_even_during_warmup(field: str) -> None:
    index = InstabilityIndex(total_steps=100)
    obs = Observation(3, math.nan if field == "loss" else 1.0, math.inf if field == "grad_norm" else 1.0)
    trigger = index.observe(obs)
    assert trigger is not None and trigger.signals[0].details["non_finite"] == [field]


def test_cooldown_and_early_sensitivity() -> None:
    index = InstabilityIndex([NonFinite()], total_steps=1000, cooldown=10)
    fired = [index.observe(Observation(s, math.nan)) for s in range(200, 230)]
    assert [t.step for t in fired if t] == [200, 211, 222]
    assert index.sensitivity(50) == 0.5 and index.sensitivity(500) == 1.0


def test_detector_state_round_trips() -> None:
    a, b = LossSpike(), GradNormZ()
    for o in clean_run(100, 3):
        a.observe(o)
        b.observe(o)
    a2, b2 = LossSpike(), GradNormZ()
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    probe = Observation(101, 9.0, 9.0)
    assert a2.observe(probe).score == a.observe(probe).score and b2.observe(probe).score == b.observe(probe).score


def test_forecasters_agree_on_a_clean_curve_and_disagree_after_a_break() -> None:
    t = list(range(1, 65))
    smooth = [2 + 4 / math.sqrt(s) for s in t]
    fits = forecast(smooth, t, 50)
    assert set(fits) == {"power", "exp", "flat"} and abs(fits["power"] - (2 + 4 / math.sqrt(114))) < 0.05
    detector = ForecastDisagreement(horizon=50, persist=1)
    for s, loss in zip(t, smooth):
        quiet = detector.observe(Observation(s, loss))
    assert not quiet.fired
    for s in range(65, 80):  # the loss climbs steeply: the fits no longer agree on where it goes
        signal = detector.observe(Observation(s, smooth[-1] + 0.3 * (s - 64)))
    assert signal.fired and signal.details["spread"] > signal.details["bound"]


@pytest.mark.parametrize("make, says", [
    (lambda: LossSpike(warmup=100), "never start"),  # history 64: it would wait for ever, and never fire
    (lambda: ForecastDisagreement(history=16), "never start"),
    (lambda: LossSpike(persist=6), "could never fire"),  # window 5
    (lambda: GradNormZ(z_spike=2.0), "at least z_elevated"),
    (lambda: GradNormZ(z_elevated=-1.0, z_spike=6.0), "z_elevated"),  # every step would be elevated
    (lambda: GradNormZ(alpha=1.0), "alpha"),
    (lambda: LossSpike(warmup=-1), "warmup"),
    (lambda: ForecastDisagreement(bound=0.0), "bound"),
    (lambda: InstabilityIndex(cooldown=-5), "cooldown"),
    (lambda: InstabilityIndex(early=0.0), "early"),
    (lambda: InstabilityIndex(total_steps=2.5), "total_steps"),
])  # fmt: skip
def test_detector_settings_that_could_never_work_are_typed_errors(make: Any, says: str) -> None:
    with pytest.raises(qckpt.InvalidInputError, match=says):
        make()
