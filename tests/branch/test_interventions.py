"""Each intervention changes exactly what it claims and nothing else."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pytest
import torch

import qckpt
from bench.compare import differences
from bench.spike import Batches
from branch import ClipGrad, Combined, Controls, DampMoments, ReseedData, ScaleLR, ScaleWeightDecay, SkipBatches, Target


def _target() -> Target:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    batches = Batches(torch.arange(1000, dtype=torch.uint8), seed=1)
    state = qckpt.TrainingState(model=model, optimizer=opt, scheduler=sched, data=batches)
    return Target(state, batches, Controls.of(state))


def _snapshot(t: Target) -> dict[str, Any]:
    c = t.state.components
    return {"model": {k: v.clone() for k, v in c["model"].state_dict().items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in c["optimizer"].param_groups],
            "moments": {i: {k: v.clone() for k, v in s.items()} for i, s in c["optimizer"].state.items()},
            "base_lrs": list(c["scheduler"].base_lrs), "data": t.batches.state_dict()["drawn"],
            "generator": t.batches.generator.get_state().clone(), "controls": asdict(Controls.of(t.state))}  # fmt: skip


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {k for k in before if differences(before[k], after[k])}


@pytest.mark.parametrize(("intervention", "expected"), [
    (ScaleLR(0.5), {"groups", "base_lrs"}),
    (ScaleLR(0.5, warmback=4), {"groups", "base_lrs", "controls"}),
    (SkipBatches(3), {"data", "generator"}),
    (ScaleWeightDecay(2.0), {"groups"}),
    (ClipGrad(0.25), {"controls"}),
    (ReseedData(7), {"generator"}),
    (DampMoments(0.5), {"moments"}),
])  # fmt: skip
def test_changes_exactly_what_it_claims(intervention: Any, expected: set[str]) -> None:
    t = _target()
    before = _snapshot(t)
    intervention.apply(t)
    t.controls.save(t.state)
    assert _changed(before, _snapshot(t)) == expected


def test_values() -> None:
    t = _target()
    opt = t.state.components["optimizer"]
    Combined((ScaleLR(0.5), ScaleWeightDecay(0.0 + 2.0), SkipBatches(2), DampMoments(0.0))).apply(t)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(5e-3) and group["weight_decay"] == pytest.approx(0.2)
    assert t.state.components["scheduler"].base_lrs == [pytest.approx(5e-3)]
    assert t.batches.drawn == 2
    assert all(torch.count_nonzero(s["exp_avg"]) == 0 and torch.count_nonzero(s["exp_avg_sq"]) == 0 for s in opt.state.values())
    assert all(s["step"] == 1 for s in opt.state.values())  # the step count is not a moment


def test_controls_travel_with_the_state_through_a_commit(tmp_path: Any) -> None:
    t = _target()
    ClipGrad(0.25).apply(t)
    t.controls.save(t.state)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        snap = repo.commit(t.state)
        other = _target()
        repo.restore(other.state, snap.id)
    assert Controls.of(other.state).clip_grad_norm == 0.25


def test_records_and_labels() -> None:
    combined = Combined((SkipBatches(3), ScaleLR(0.5)))
    assert combined.record() == {"kind": "combined", "parts": [{"kind": "skip_batches", "n": 3},
                                                              {"kind": "scale_lr", "factor": 0.5, "warmback": None}]}
    assert combined.label() == "skip_batches(n=3)+scale_lr(factor=0.5)"
    assert ScaleLR(0.5, warmback=10).label() == "scale_lr(factor=0.5,warmback=10)"


def test_a_temporary_lr_change_warms_back_to_the_schedule() -> None:
    t = _target()
    opt = t.state.components["optimizer"]
    ScaleLR(0.25, warmback=3).apply(t)
    assert (t.controls.lr_scale, t.controls.lr_warmback) == (0.25, 3)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(4):
        t.controls.tick(t.state)
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2], rel=1e-12)
    assert t.state.components["scheduler"].base_lrs == [pytest.approx(1e-2, rel=1e-12)]
    assert Controls.of(t.state) == Controls(None, 1.0, 0)  # stored back at each tick


@pytest.mark.parametrize("make", [lambda: ScaleLR(0), lambda: ScaleLR(-1.0), lambda: ScaleLR(0.5, warmback=0), lambda: SkipBatches(0), lambda: DampMoments(2.0),
                                  lambda: ClipGrad(0.0), lambda: Combined(()), lambda: Combined(("lr",)), lambda: Combined(ScaleLR(0.5)),
                                  lambda: ScaleLR(float("nan")), lambda: ScaleLR("0.5"), lambda: SkipBatches(2.5), lambda: DampMoments(-0.1),
                                  lambda: ScaleLR(0.5, warmback=True)])  # fmt: skip
def test_bad_parameters_are_typed_errors(make: Any) -> None:
    with pytest.raises(qckpt.InvalidInputError):
        make()


def test_reseed_needs_a_batch_source_that_can() -> None:
    t = _target()
    t.batches = iter([1, 2, 3])  # type: ignore[assignment]
    with pytest.raises(qckpt.InvalidInputError, match="no reseed"):
        ReseedData(1).apply(t)
