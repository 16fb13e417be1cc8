"""Interventions: plain, recorded changes applied to a restored training state.

An intervention is a frozen dataclass with ``apply(target)`` and a ``record()``
(its kind and fields, stored in the repository). ``Target`` gives it the live
``TrainingState``, the batch source and the run's ``Controls``: settings the
user's step function reads (gradient clipping), kept in the state's extras so
they are committed, restored and inherited by every later step of the branch.

Built in: ``ScaleLR``, ``SkipBatches``, ``ScaleWeightDecay``, ``ClipGrad``,
``ReseedData``, ``DampMoments`` (0 resets), ``Combined``. Write your own by
subclassing ``Intervention`` (a frozen dataclass with ``apply``); give it a
``kind`` name to record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

import qckpt
from branch._checks import check_int, check_number

CONTROLS_KEY = "lightcone.controls"  # where Controls live in TrainingState.extras


@dataclass
class Controls:
    """Settings interventions change and later steps obey.

    * ``clip_grad_norm`` (None: no clipping): read by the user's step function;
      ``clip(parameters)`` applies it and returns the gradient norm before clipping;
    * ``lr_scale``, ``lr_warmback``: a temporary learning-rate multiplier in force
      and the steps left until it is back at 1. The engine calls ``tick(state)``
      once after every step; each tick moves the multiplier linearly towards 1.
    """

    clip_grad_norm: float | None = None
    lr_scale: float = 1.0
    lr_warmback: int = 0

    @classmethod
    def of(cls, state: qckpt.TrainingState) -> Controls:
        """The controls stored in ``state`` (defaults if none), stored back on change."""
        saved = state.extras.get(CONTROLS_KEY) or {}
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def save(self, state: qckpt.TrainingState) -> None:
        state.extras[CONTROLS_KEY] = asdict(self)

    def tick(self, state: qckpt.TrainingState) -> None:
        """One step done: move a temporary LR multiplier one step back towards 1
        (reaching exactly 1 after ``lr_warmback`` ticks) and store the controls."""
        if self.lr_warmback > 0:
            scale = self.lr_scale + (1.0 - self.lr_scale) / self.lr_warmback
            state.scale_lr(scale / self.lr_scale)
            self.lr_scale, self.lr_warmback = scale, self.lr_warmback - 1
            self.save(state)

    def clip(self, parameters: Any) -> float:
        params = [p for p in parameters if p.grad is not None]
        limit = self.clip_grad_norm if self.clip_grad_norm is not None else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, limit))


@dataclass
class Target:
    """What an intervention may change: the live state, its batch source, its controls."""

    state: qckpt.TrainingState
    batches: Any
    controls: Controls


class Intervention:
    """Base of every intervention: a frozen dataclass whose fields are its parameters."""

    kind: ClassVar[str] = ""

    def apply(self, target: Target) -> None:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What is stored in the light-cone record."""
        return {"kind": self.kind or type(self).__name__, **asdict(self)}  # type: ignore[call-overload]

    def slug(self) -> str:
        """Its kind, for branch names (``skip_batches``; combined: ``skip_batches+scale_lr``)."""
        return self.kind or type(self).__name__

    def label(self) -> str:
        """A short description with parameters (those set), for reports."""
        params = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in asdict(self).items() if v is not None)  # type: ignore[call-overload]
        return f"{self.kind or type(self).__name__}({params})"


def _optimizers(state: qckpt.TrainingState) -> list[torch.optim.Optimizer]:
    found = [c for c in state.components.values() if isinstance(c, torch.optim.Optimizer)]
    if not found:
        raise qckpt.InvalidInputError("this intervention needs an optimizer in the TrainingState")
    return found


@dataclass(frozen=True)
class ScaleLR(Intervention):
    """Multiply every optimizer's learning rate by ``factor`` (schedulers keep it).
    With ``warmback`` the change is temporary: the multiplier returns linearly to
    1 over that many steps (a re-warm-up after a restart), after which the
    schedule runs as before; without it the change lasts for good."""

    factor: float
    warmback: int | None = None
    kind: ClassVar[str] = "scale_lr"

    def __post_init__(self) -> None:
        check_number("factor", self.factor)
        check_int("warmback", self.warmback, optional=True)

    def apply(self, target: Target) -> None:
        _optimizers(target.state)
        target.state.scale_lr(self.factor)
        if self.warmback is not None:
            target.controls.lr_scale *= self.factor
            target.controls.lr_warmback = self.warmback


@dataclass(frozen=True)
class SkipBatches(Intervention):
    """Draw and discard the next ``n`` batches (the ones that came with the trouble)."""

    n: int
    kind: ClassVar[str] = "skip_batches"

    def __post_init__(self) -> None:
        check_int("n", self.n)

    def apply(self, target: Target) -> None:
        skip = getattr(target.batches, "skip", None)
        if callable(skip):
            skip(self.n)
        else:
            for _ in range(self.n):
                next(target.batches)


@dataclass(frozen=True)
class ScaleWeightDecay(Intervention):
    """Multiply every parameter group's ``weight_decay`` by ``factor``."""

    factor: float
    kind: ClassVar[str] = "scale_weight_decay"

    def __post_init__(self) -> None:
        check_number("factor", self.factor)

    def apply(self, target: Target) -> None:
        for optimizer in _optimizers(target.state):
            for group in optimizer.param_groups:
                group["weight_decay"] = group.get("weight_decay", 0.0) * self.factor


@dataclass(frozen=True)
class ClipGrad(Intervention):
    """Clip the global gradient norm at ``max_norm`` from now on (through ``Controls``)."""

    max_norm: float
    kind: ClassVar[str] = "clip_grad"

    def __post_init__(self) -> None:
        check_number("max_norm", self.max_norm)

    def apply(self, target: Target) -> None:
        target.controls.clip_grad_norm = float(self.max_norm)


@dataclass(frozen=True)
class ReseedData(Intervention):
    """Give the batch source a new seed (``batches.reseed(seed)``): another data order."""

    seed: int
    kind: ClassVar[str] = "reseed_data"

    def apply(self, target: Target) -> None:
        reseed = getattr(target.batches, "reseed", None)
        if not callable(reseed):
            raise qckpt.InvalidInputError(f"the batch source ({type(target.batches).__name__}) has no reseed(seed) method")
        reseed(self.seed)


_MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta")


@dataclass(frozen=True)
class DampMoments(Intervention):
    """Multiply every optimizer moment (Adam's ``exp_avg``/``exp_avg_sq``, SGD's
    ``momentum_buffer``...) by ``factor``; 0 resets them."""

    factor: float
    kind: ClassVar[str] = "damp_moments"

    def __post_init__(self) -> None:
        check_number("factor", self.factor, 0, 1, low_included=True)

    def apply(self, target: Target) -> None:
        with torch.no_grad():
            for optimizer in _optimizers(target.state):
                for per_param in optimizer.state.values():
                    for key in _MOMENTS:
                        value = per_param.get(key)
                        if isinstance(value, torch.Tensor):
                            value.mul_(self.factor)


@dataclass(frozen=True)
class Combined(Intervention):
    """Several interventions, applied in order."""

    parts: tuple[Intervention, ...]
    kind: ClassVar[str] = "combined"

    def __post_init__(self) -> None:
        if not isinstance(self.parts, (tuple, list)) or not self.parts:
            raise qckpt.InvalidInputError(f"Combined needs a tuple of one or more interventions, got {self.parts!r}")
        strangers = [p for p in self.parts if not isinstance(p, Intervention)]
        if strangers:
            raise qckpt.InvalidInputError(f"Combined's parts must be interventions, got {strangers[0]!r}")

    def apply(self, target: Target) -> None:
        for part in self.parts:
            part.apply(target)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [p.record() for p in self.parts]}

    def label(self) -> str:
        return "+".join(p.label() for p in self.parts)

    def slug(self) -> str:
        return "+".join(p.slug() for p in self.parts)
