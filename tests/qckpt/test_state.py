"""TrainingState capture and restore: in place, complete, and all-or-nothing on mismatch."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

import qckpt
from bench.compare import differences


def _model(hidden: int = 8, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2)).to(dtype)


def _trained(hidden: int = 8) -> tuple[nn.Module, torch.optim.Optimizer, qckpt.TrainingState]:
    model = _model(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, qckpt.TrainingState(model=model, optimizer=opt, scheduler=sched, step=3)


def _snapshot_of(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_restore_is_in_place_and_complete(repo: qckpt.Repository) -> None:
    model, opt, state = _trained()
    state.extras = {"best_loss": 0.25, "tokens_seen": 12345}
    snap = repo.commit(state, metrics={"loss": 1.0})
    assert snap.step == 3
    expected = {"model": _snapshot_of(model), "opt": copy.deepcopy(opt.state_dict())}
    params = [p.data_ptr() for p in model.parameters()]

    for _ in range(2):  # train on, changing everything
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    state.step, state.extras = 99, {}

    assert repo.restore(state, "main").id == snap.id
    assert [p.data_ptr() for p in model.parameters()] == params  # same storage, copied in place
    assert differences(_snapshot_of(model), expected["model"]) == []
    assert differences(opt.state_dict()["state"], expected["opt"]["state"]) == []
    assert state.step == 3 and state.extras == {"best_loss": 0.25, "tokens_seen": 12345}
    assert state.components["scheduler"].last_epoch == 3


def test_restore_into_a_fresh_optimizer(repo: qckpt.Repository) -> None:
    model, opt, state = _trained()
    repo.commit(state)
    fresh_model = _model()
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=0.5)  # no state yet, other lr
    sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    repo.restore(qckpt.TrainingState(model=fresh_model, optimizer=fresh_opt, scheduler=sched), "main")
    assert differences(fresh_opt.state_dict(), opt.state_dict()) == []
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_rng_states_are_restored(repo: qckpt.Repository) -> None:
    state = qckpt.TrainingState()
    repo.commit(state)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    repo.restore(state, "main")
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_generators_and_stateful_objects(repo: qckpt.Repository) -> None:
    class Position:
        def __init__(self) -> None:
            self.index = 0

        def state_dict(self) -> dict:
            return {"index": self.index}

        def load_state_dict(self, state: dict) -> None:
            self.index = state["index"]

    gen, pos = torch.Generator().manual_seed(7), Position()
    pos.index = 41
    state = qckpt.TrainingState(data_order=gen, position=pos, rng=False)
    repo.commit(state)
    expected = torch.randint(100, (5,), generator=gen)
    pos.index = 0
    repo.restore(state, "main")
    assert torch.equal(torch.randint(100, (5,), generator=gen), expected) and pos.index == 41


def test_mismatched_model_lists_every_problem_and_modifies_nothing(repo: qckpt.Repository) -> None:
    _, _, state = _trained(hidden=8)
    repo.commit(state)
    other_model, other_opt, other_state = _trained(hidden=6)  # every hidden-size tensor differs
    before = (_snapshot_of(other_model), copy.deepcopy(other_opt.state_dict()), random.getstate())
    with pytest.raises(qckpt.StateMismatchError, match="nothing was modified") as info:
        repo.restore(other_state, "main")
    problems = info.value.problems
    assert "model/0.weight: snapshot has float32 (8, 4), live module has float32 (6, 4)" in problems
    assert {p.split(":")[0] for p in problems} >= {"model/0.bias", "model/1.running_mean", "model/2.weight"}
    assert any(p.startswith("optimizer/state/0/exp_avg") for p in problems)
    after = (_snapshot_of(other_model), other_opt.state_dict(), random.getstate())
    assert differences(after, before) == []
    assert isinstance(info.value, ValueError)


def test_missing_extra_keys_and_dtype(repo: qckpt.Repository) -> None:
    model = _model()
    repo.commit(qckpt.TrainingState(model=model, rng=False))
    renamed = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(qckpt.StateMismatchError) as info:
        repo.restore(qckpt.TrainingState(model=renamed, rng=False), "main")
    assert info.value.problems == ["model/3.bias: missing from the snapshot", "model/3.weight: missing from the snapshot"]
    with pytest.raises(qckpt.StateMismatchError, match="float64 .* float32|float32 .* float64"):
        repo.restore(qckpt.TrainingState(model=_model(dtype=torch.float64), rng=False), "main")


def test_component_sets_must_match(repo: qckpt.Repository) -> None:
    _, opt, state = _trained()
    repo.commit(state)
    lonely = qckpt.TrainingState(model=_model(), extra=torch.Generator())
    with pytest.raises(qckpt.StateMismatchError) as info:
        repo.restore(lonely, "main")
    assert set(info.value.problems) == {
        "optimizer: in the snapshot but not in this TrainingState",
        "scheduler: in the snapshot but not in this TrainingState",
        "extra: missing from the snapshot",
    }


def test_optimizer_group_mismatch(repo: qckpt.Repository) -> None:
    model, _, state = _trained()
    repo.commit(state)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()) + list(model[2].parameters())}]
    two_groups = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.StepLR(two_groups, 2)
    with pytest.raises(qckpt.StateMismatchError, match="parameter groups"):
        repo.restore(qckpt.TrainingState(model=model, optimizer=two_groups, scheduler=sched), "main")


def test_plain_snapshot_cannot_be_restored_into_a_training_state(repo: qckpt.Repository) -> None:
    repo.commit({"w": torch.zeros(2)})
    with pytest.raises(qckpt.StateMismatchError, match="Repository.load"):
        repo.restore(qckpt.TrainingState(model=_model()), "main")


def test_snapshot_without_rng(repo: qckpt.Repository) -> None:
    repo.commit(qckpt.TrainingState(rng=False))
    with pytest.raises(qckpt.StateMismatchError, match="no RNG state"):
        repo.restore(qckpt.TrainingState(), "main")
    repo.restore(qckpt.TrainingState(rng=False), "main")


def test_component_validation() -> None:
    with pytest.raises(qckpt.InvalidInputError, match="has no state_dict"):
        qckpt.TrainingState(model=object())
    with pytest.raises(qckpt.InvalidRefNameError):
        qckpt.TrainingState(**{"bad/name": torch.Generator()})


def test_failing_component_names_itself(repo: qckpt.Repository) -> None:
    class Fragile:
        def state_dict(self) -> dict:
            return {"v": 1}

        def load_state_dict(self, state: dict) -> None:
            raise RuntimeError("cannot load")

    state = qckpt.TrainingState(fragile=Fragile(), rng=False)
    repo.commit(state)
    with pytest.raises(RuntimeError, match="cannot load") as info:
        repo.restore(state, "main")
    assert "while restoring component 'fragile'" in "".join(info.value.__notes__)


@pytest.mark.parametrize("recorded_class", [True, False])
def test_restoring_another_optimizers_state_changes_nothing(recorded_class: bool) -> None:
    """An SGD snapshot into an Adam optimizer: a StateMismatchError before any component is touched
    (snapshots written before optimizer classes were recorded are told apart by their settings)."""
    model = torch.nn.Linear(4, 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    sgd.step()
    tree = qckpt.TrainingState(model=model, optimizer=sgd, rng=False).capture()
    if not recorded_class:
        del tree["classes"]
    repo = qckpt.Repository.init(qckpt.MemoryBackend())
    repo.commit(tree)
    live = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    adam = torch.optim.Adam(live.parameters())
    with pytest.raises(qckpt.StateMismatchError, match="optimizer"):
        repo.restore(qckpt.TrainingState(model=live, optimizer=adam, rng=False))
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())
    assert adam.state_dict()["state"] == {}


def test_scale_lr_survives_the_scheduler() -> None:
    def run(scale: float | None) -> list[float]:
        model = nn.Linear(3, 3)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        state = qckpt.TrainingState(model=model, optimizer=opt, scheduler=sched, rng=False)
        lrs = []
        for step in range(4):
            if step == 2 and scale is not None:
                state.scale_lr(scale)
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    plain, halved = run(None), run(0.5)
    assert halved[:2] == plain[:2] and halved[2:] == [lr * 0.5 for lr in plain[2:]]
    naive_model = nn.Linear(3, 3)
    naive = torch.optim.SGD(naive_model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(naive, lambda step: 1.0 / (step + 1))
    naive.param_groups[0]["lr"] *= 0.5
    naive.step()
    sched.step()
    assert naive.param_groups[0]["lr"] == plain[0]  # what scale_lr exists for: the scheduler undid the halving
    with pytest.raises(qckpt.InvalidInputError):
        qckpt.TrainingState(model=naive_model).scale_lr(0)
