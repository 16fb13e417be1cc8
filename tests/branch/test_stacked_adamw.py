"""StackedAdamW: K copies' AdamW updates done on stacks equal each optimizer's own
step, bit for bit on the CPU, with per-copy learning rates, weight decay and betas,
schedulers moving the rates, and copies stepped alone in between."""

from __future__ import annotations

import copy

import pytest
import torch

from branch.stacked_adamw import StackedAdamW


def _copies(k: int) -> tuple[list[torch.nn.Module], list[torch.optim.AdamW]]:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    models = [copy.deepcopy(base) for _ in range(k)]
    settings = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.99)),
                dict(lr=5e-2, weight_decay=0.01, eps=1e-6)]  # fmt: skip
    optimizers = [torch.optim.AdamW(m.parameters(), **settings[c % 3]) for c, m in enumerate(models)]
    return models, optimizers


def _step_all(models: list[torch.nn.Module], optimizers: list[torch.optim.AdamW], g: torch.Generator) -> None:
    x = torch.randn(4, 6, generator=g)
    for model, optimizer in zip(models, optimizers):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()


def test_stacked_steps_equal_each_optimizers_own_bit_for_bit() -> None:
    k = 3
    plain_models, plain_opts = _copies(k)
    models, opts = _copies(k)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _step_all(plain_models, plain_opts, g1)  # the first step initialises each optimizer's state
    _step_all(models, opts, g2)
    names = [n for n, _ in models[0].named_parameters()]
    stacks = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    params = [[dict(m.named_parameters())[n] for n in names] for m in models]
    for c, copy_params in enumerate(params):
        for n, p in zip(names, copy_params):
            p.data = stacks[n][c]  # each copy's parameters are views of its row
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in opts]
    plain_schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in plain_opts]
    stacked = StackedAdamW.of([[o] for o in opts], params, [stacks[n] for n in names])
    assert stacked is not None
    for step in range(6):
        x = torch.randn(4, 6, generator=g1)
        _ = torch.randn(4, 6, generator=g2)
        grads = []
        for model, optimizer in zip(plain_models, plain_opts):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        for n, i in zip(names, range(len(names))):
            stacks[n].grad = torch.stack([grads[c][i] for c in range(k)])
        if step == 3:  # one copy stepped alone through its own optimizer, whose state entries are views
            for c in range(k):
                for p, grad in zip(params[c], grads[c]):
                    p.grad = grad
                opts[c].step()
        else:
            stacked.step()
        for s in schedulers + plain_schedulers:
            s.step()
    for c in range(k):
        for p, q in zip(params[c], plain_models[c].parameters()):
            assert torch.equal(p, q)
        for p, q in zip(params[c], plain_models[c].parameters()):
            mine, theirs = opts[c].state[p], plain_opts[c].state[q]
            assert all(torch.equal(mine[key], theirs[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    stacked.release()
    assert opts[0].state[params[0][0]]["exp_avg"].untyped_storage().data_ptr() != stacks[names[0]].untyped_storage().data_ptr()


@pytest.mark.parametrize("change", ["sgd", "amsgrad", "uninitialised", "extra parameter"])
def test_it_does_not_apply_where_it_would_differ(change: str) -> None:
    models, opts = _copies(2)
    if change != "uninitialised":
        _step_all(models, opts, torch.Generator().manual_seed(0))
    if change == "sgd":
        opts[1] = torch.optim.SGD(models[1].parameters(), lr=0.1)
    elif change == "amsgrad":
        opts[1].param_groups[0]["amsgrad"] = True
    params = [list(m.parameters()) for m in models]
    if change == "extra parameter":
        opts[0].add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    stacks = [torch.stack([params[0][i].detach(), params[1][i].detach()]) for i in range(len(params[0]))]
    assert StackedAdamW.of([[o] for o in opts], params, stacks) is None
