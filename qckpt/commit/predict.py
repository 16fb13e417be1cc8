"""Optimizer-aware predictions: which tensors of a commit can be predicted from
which others, and with what scalars. Pure planning on captured trees; the
codecs in ``_codecs`` do the arithmetic.

Rules (for a parameter ``p`` whose optimizer state was captured both in the
base snapshot and now, ``n`` optimizer steps apart):

* every tensor: delta against the same tensor of the base snapshot;
* Adam/AdamW ``exp_avg_sq`` (n = 1): from the base's ``exp_avg_sq`` and the
  gradient implied by this and the base's ``exp_avg``;
* Adam/AdamW parameter: the base parameter moved by the update that this
  snapshot's moments imply (``n`` steps of it, decoupled weight decay included);
* SGD with momentum parameter: the base parameter minus ``n * lr`` times this
  momentum buffer (Nesterov, n = 1: the exact two-buffer form).

The learning rate of that update is either the base's or the current one
(schedulers usually step after the optimizer): both are proposed, the encoder
keeps whichever predicts better.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qckpt.format.codecs import AdamParamCodec, AdamSecondMomentCodec, DeltaCodec, LinearCodec
from qckpt.format.tree import join_path

BASE, SELF = "base", "self"


@dataclass(frozen=True)
class OptimizerLayout:
    """Which state paths belong to which parameters of one optimizer component:
    ``param_paths[i]`` is the tree path of the parameter the optimizer's
    ``state_dict`` calls ``i`` (None when no captured module owns it)."""

    component: str
    kind: str  # "adam" (torch.optim.Adam/AdamW), "sgd" (torch.optim.SGD) or "other"
    param_paths: tuple[str | None, ...]
    note: str = ""  # why its parameters cannot be predicted from its update rule, if they cannot


@dataclass(frozen=True)
class ParamRule:
    """How one parameter was being updated when a snapshot was captured."""

    kind: str
    param: str
    state: Mapping[str, str]  # optimizer state name -> tree path of its tensor
    hyper: Mapping[str, Any]  # the parameter group's settings (lr, betas...)
    step: float | None = None  # the optimizer's own step count for this parameter (Adam)


@dataclass(frozen=True)
class Prediction:
    """One way to predict the tensor at some path: a predictive codec, its inputs
    as (``BASE`` or ``SELF``, path), its scalars, and the encoding wave (inputs
    from ``SELF`` are always encoded in an earlier wave)."""

    codec_id: int
    inputs: tuple[tuple[str, str], ...]
    scalars: tuple[float, ...] = ()
    wave: int = 0


@dataclass
class Planned:
    """Predictions per tensor path (most specific first)."""

    by_path: dict[str, list[Prediction]] = field(default_factory=dict)

    def add(self, path: str, prediction: Prediction) -> None:
        self.by_path.setdefault(path, []).insert(0, prediction)


def parameter_rules(tree: Mapping[str, Any], layouts: Sequence[OptimizerLayout]) -> dict[str, ParamRule]:
    """The update rule of every parameter with a known optimizer, from a captured tree."""
    rules: dict[str, ParamRule] = {}
    for layout in layouts:
        if layout.kind == "other":
            continue
        state_dict = tree["components"][layout.component]
        base = join_path(join_path("components", layout.component), "state")
        for group in state_dict.get("param_groups", []):
            hyper = {k: v for k, v in group.items() if k != "params"}
            for index in group["params"]:
                path = layout.param_paths[index] if 0 <= index < len(layout.param_paths) else None
                state = state_dict.get("state", {}).get(index, {})
                if path is None:
                    continue
                tensors = {k: join_path(join_path(base, index), k) for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
                step = state.get("step")
                step = float(step) if isinstance(step, (int, float, torch.Tensor)) and not isinstance(step, bool) else None
                rules[path] = ParamRule(layout.kind, path, tensors, hyper, step)
    return rules


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _learning_rates(current: ParamRule, base: ParamRule) -> list[float]:
    rates = [r for r in (_float(base.hyper.get("lr")), _float(current.hyper.get("lr"))) if r is not None]
    return list(dict.fromkeys(rates))


def _adam(planned: Planned, rule: ParamRule, base: ParamRule) -> None:
    m, v = rule.state.get("exp_avg"), rule.state.get("exp_avg_sq")
    betas, eps, decay_rate = rule.hyper.get("betas"), _float(rule.hyper.get("eps")), _float(rule.hyper.get("weight_decay"))
    if m is None or v is None or m not in base.state.values() or rule.step is None or base.step is None:
        return
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_float(b) is not None for b in betas)):
        return
    if eps is None or decay_rate is None:
        return
    beta1, beta2 = float(betas[0]), float(betas[1])
    n = rule.step - base.step
    if n < 1 or n != int(n) or not 0 < beta1 < 1 or not 0 < beta2 < 1:
        return
    if n == 1:
        planned.add(v, Prediction(AdamSecondMomentCodec.id, ((BASE, v), (SELF, m), (BASE, m)), (beta1, beta2), wave=1))
    denominator = rule.state.get("max_exp_avg_sq", v) if rule.hyper.get("amsgrad") else v
    decoupled = rule.hyper.get("decoupled_weight_decay", False)
    bias1, bias2 = 1 - beta1**rule.step, 1 - beta2**rule.step
    for lr in _learning_rates(rule, base):
        decay = (1 - lr * decay_rate) ** n if decoupled else 1.0
        scalars = (decay, n * lr / bias1, bias2**0.5, eps)
        planned.add(rule.param, Prediction(AdamParamCodec.id, ((BASE, rule.param), (SELF, m), (SELF, denominator)), scalars, wave=2))


def _sgd(planned: Planned, rule: ParamRule, base: ParamRule, steps: int | None) -> None:
    buffer = rule.state.get("momentum_buffer")
    momentum, dampening = _float(rule.hyper.get("momentum")), _float(rule.hyper.get("dampening"))
    if buffer is None or buffer not in base.state.values() or not momentum or dampening is None or dampening >= 1:
        return
    n = steps or 1
    for lr in _learning_rates(rule, base):
        if rule.hyper.get("nesterov"):
            if n != 1:
                continue
            scalars = (1.0, -lr * (1 / (1 - dampening) + momentum), lr * momentum / (1 - dampening))
            inputs = ((BASE, rule.param), (SELF, buffer), (BASE, buffer))
        else:
            scalars, inputs = (1.0, -n * lr), ((BASE, rule.param), (SELF, buffer))
        planned.add(rule.param, Prediction(LinearCodec.id, inputs, scalars, wave=1))


def plan_predictions(
    paths: Sequence[str],
    base_paths: Sequence[str],
    rules: Mapping[str, ParamRule],
    base_rules: Mapping[str, ParamRule],
    steps: int | None,
) -> Planned:
    """Candidate predictions for each of ``paths`` given a base snapshot holding
    ``base_paths``; ``steps`` is the commit step distance to the base, if known."""
    planned = Planned()
    in_base = set(base_paths)
    for path in paths:
        if path in in_base:
            planned.add(path, Prediction(DeltaCodec.id, ((BASE, path),)))
    for path, rule in rules.items():
        base = base_rules.get(path)
        if base is None or base.kind != rule.kind or path not in in_base:
            continue
        if rule.kind == "adam":
            _adam(planned, rule, base)
        elif rule.kind == "sgd":
            _sgd(planned, rule, base, steps)
    return planned
