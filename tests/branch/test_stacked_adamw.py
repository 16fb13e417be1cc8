"""StackedAdamW: K copies' AdamW updates done on stacks equal each optimizer's own
step, bit for bit on the CPU, with per-copy learning rates, weight decay and betas,
two parameter groups, schedulers moving the rates, and copies stepped alone in
between (one with a tensor left without a gradient, which the stacked update
must then refuse)."""

from __future__ import annotations

import copy

import pytest
import torch

import branch.stack_layout
from branch.stack_layout import StackBuffer
from branch.stacked_adamw import StackedAdamW


def _copies(k: int) -> tuple[list[torch.nn.Module], list[torch.optim.AdamW]]:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    models = [copy.deepcopy(base) for _ in range(k)]
    settings = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.99)),
                dict(lr=5e-2, weight_decay=0.01, eps=1e-6)]  # fmt: skip
    optimizers = []
    for c, m in enumerate(models):  # the last layer without weight decay: a second parameter group
        optimizers.append(torch.optim.AdamW([{"params": m[0].parameters()}, {"params": m[2].parameters(), "weight_decay": 0.0}],
                                            **settings[c % 3]))  # fmt: skip
    return models, optimizers


def _step_all(models: list[torch.nn.Module], optimizers: list[torch.optim.AdamW], g: torch.Generator) -> None:
    x = torch.randn(4, 6, generator=g)
    for model, optimizer in zip(models, optimizers):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()


def _stacked(models: list[torch.nn.Module]) -> tuple[StackBuffer, list[list[torch.nn.Parameter]]]:
    """The models' parameters moved into one buffer (each copy's are views of its row)."""
    params = [list(m.parameters()) for m in models]
    buffer = StackBuffer([[p.detach() for p in copy_params] for copy_params in params])
    for c, copy_params in enumerate(params):
        for i, p in enumerate(copy_params):
            p.data = buffer.view(buffer.data, i)[c]
    return buffer, params


@pytest.mark.parametrize("block", [None, 7])  # the update in one block, or in blocks of 7 elements' columns
def test_stacked_steps_equal_each_optimizers_own_bit_for_bit(block: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if block is not None:
        monkeypatch.setattr(branch.stack_layout, "CPU_BLOCK", block)
    k = 3
    plain_models, plain_opts = _copies(k)
    models, opts = _copies(k)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    _step_all(plain_models, plain_opts, g1)  # the first step initialises each optimizer's state
    _step_all(models, opts, g2)
    buffer, params = _stacked(models)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in opts]
    plain_schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in plain_opts]
    stacked = StackedAdamW.of([[o] for o in opts], params, [buffer])
    assert stacked is not None and len(stacked.runs) == 2  # one per parameter group
    for step in range(8):
        x = torch.randn(4, 6, generator=g1)
        _ = torch.randn(4, 6, generator=g2)
        grads = []
        for c, (model, optimizer) in enumerate(zip(plain_models, plain_opts)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            if step == 5 and c == 1:
                model[2].bias.grad = None  # a tensor without a gradient: torch skips it, its step count lags
            grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
            optimizer.step()
        for i in range(len(params[0])):
            buffer.view(buffer.grad, i).copy_(torch.stack([g[i] if g[i] is not None else torch.zeros_like(grads[0][i])
                                                           for g in grads]))  # fmt: skip
        if step in (3, 5):  # the copies stepped alone through their own optimizers, whose state entries are views
            for c in range(k):
                for p, grad in zip(params[c], grads[c]):
                    p.grad = grad
                opts[c].step()
        else:
            assert stacked.step() is (step < 5)  # after step 5 copy 1's last layer's step counts differ: refused
            if step > 5:
                for c in range(k):
                    for p, grad in zip(params[c], grads[c]):
                        p.grad = grad
                    opts[c].step()
        for s in schedulers + plain_schedulers:
            s.step()
    for c in range(k):
        for p, q in zip(params[c], plain_models[c].parameters()):
            assert torch.equal(p, q)
        for p, q in zip(params[c], plain_models[c].parameters()):
            mine, theirs = opts[c].state[p], plain_opts[c].state[q]
            assert all(torch.equal(mine[key], theirs[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
    stacked.release()
    assert opts[0].state[params[0][0]]["exp_avg"].untyped_storage().data_ptr() != buffer.data.untyped_storage().data_ptr()


@pytest.mark.parametrize("change", ["sgd", "amsgrad", "uninitialised", "extra parameter"])
def test_it_does_not_apply_where_it_would_differ(change: str) -> None:
    models, opts = _copies(2)
    if change != "uninitialised":
        _step_all(models, opts, torch.Generator().manual_seed(0))
    if change == "sgd":
        opts[1] = torch.optim.SGD(models[1].parameters(), lr=0.1)
    elif change == "amsgrad":
        opts[1].param_groups[0]["amsgrad"] = True
    if change == "extra parameter":
        opts[0].add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    buffer, params = _stacked(models)
    assert StackedAdamW.of([[o] for o in opts], params, [buffer]) is None
