"""One AdamW update for K copies at once, their parameters and moments in stacks.

Batched rollouts (``branch.rollouts``) keep a real ``torch.optim.AdamW`` per copy,
whose parameters are views into stacked tensors. Stepping K optimizers costs K
times the optimizer's per-tensor launches; ``StackedAdamW`` keeps every copy's
moments and step counters in stacks as well, laid out like the parameters in
``StackBuffer``s (each optimizer's state entries become views of its row), and
performs the update once per run of tensors that share a parameter group in
every copy (usually one run per buffer: a handful of operations on ``[K, N]``
tensors), with every copy's own hyperparameters (learning rate, weight decay,
betas, eps) and bias corrections as per-row factors. The arithmetic is
torch's single-tensor AdamW's, operation for operation (each per-copy scalar
rounded to the tensor's dtype as torch's kernels round it), so on the CPU the
result equals stepping each optimizer on its own, bit for bit (tested); the
optimizers stay usable for a copy stepped alone (their state entries are the
views).

Applies when every copy has exactly one optimizer, a plain AdamW over exactly
the stacked parameters (no amsgrad, maximize, capturable, differentiable or
fused; float hyperparameters), whose state is initialised (after its first
step). Not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from branch.stack_layout import StackBuffer

_FACTORS = 7  # per copy and run: 1 - lr*wd, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps, -step size


@dataclass
class _Run:
    """Stacks ``first`` to ``last - 1`` of buffer ``buffer``, in the same parameter
    group in every copy (``groups[c]``: copy c's)."""

    buffer: int
    first: int
    last: int
    groups: list[dict]


class StackedAdamW:
    """The AdamW state of K copies moved into stacks (see the module docstring); make
    one with ``of``, step every copy with ``step``, hand the state back with ``release``."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Sequence[torch.nn.Parameter]],
                 buffers: Sequence[StackBuffer]) -> None:  # fmt: skip
        k = len(optimizers)
        self.buffers = list(buffers)
        self.states = [[opt.state[p] for p in copy_params] for opt, copy_params in zip(optimizers, params)]
        groups = [[_group_of(opt, p) for p in copy_params] for opt, copy_params in zip(optimizers, params)]
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.steps: list[torch.Tensor] = []  # per buffer, [K, stacks] on the CPU, as torch keeps step counts
        self.runs: list[_Run] = []
        offset = 0  # params[c][offset + i] is stack i of the current buffer
        for b, buffer in enumerate(self.buffers):
            count = len(buffer.spans)
            rows = [self.states[c][offset : offset + count] for c in range(k)]
            first, second = buffer.zeros(), buffer.zeros()
            buffer.fill(first, [[r["exp_avg"] for r in row] for row in rows])
            buffer.fill(second, [[r["exp_avg_sq"] for r in row] for row in rows])
            steps = torch.stack([torch.stack([r["step"] for r in row]) for row in rows])
            for c, row in enumerate(rows):
                for i, r in enumerate(row):
                    r["exp_avg"], r["exp_avg_sq"], r["step"] = buffer.view(first, i)[c], buffer.view(second, i)[c], steps[c, i]
            self.moments.append((first, second))
            self.steps.append(steps)
            start = 0
            for i in range(1, count + 1):
                if i == count or any(groups[c][offset + i] is not groups[c][offset + start] for c in range(k)):
                    self.runs.append(_Run(b, start, i, [groups[c][offset + start] for c in range(k)]))
                    start = i
            offset += count

    @classmethod
    def of(cls, optimizers: Sequence[Sequence[torch.optim.Optimizer]], params: Sequence[Sequence[torch.nn.Parameter]],
           buffers: Sequence[StackBuffer]) -> StackedAdamW | None:  # fmt: skip
        """The stacked state of the copies' optimizers (``optimizers[c]``: copy c's),
        over ``params[c][j]``, copy c's view of stack j (stacks numbered through
        ``buffers`` in order); None when it does not apply (see the module docstring)."""
        if any(len(opts) != 1 or type(opts[0]) is not torch.optim.AdamW for opts in optimizers):
            return None
        for (opt,), copy_params in zip(optimizers, params):
            owned = [p for group in opt.param_groups for p in group["params"]]
            if len(owned) != len(copy_params) or {id(p) for p in owned} != {id(p) for p in copy_params}:
                return None
            for group in opt.param_groups:
                if any(group.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable", "fused")):
                    return None
                if not all(isinstance(v, float) for v in (group["lr"], group["weight_decay"], group["eps"], *group["betas"])):
                    return None
            for p in copy_params:
                state = opt.state.get(p, {})
                if not all(isinstance(state.get(key), torch.Tensor) for key in ("exp_avg", "exp_avg_sq", "step")):
                    return None  # not initialised yet: the first step is each optimizer's own
                if state["step"].dim() != 0 or state["step"].is_cuda:
                    return None
        return cls([opts[0] for opts in optimizers], params, buffers)

    def step(self) -> bool:
        """One AdamW step of every copy, from the gradients in the buffers' ``grad``
        (already clipped per copy; every stack must have its gradient there).
        Returns False, changing nothing, when a copy's tensors in one run are at
        different step counts (a copy stepped alone by its own optimizer, which
        skips a tensor without a gradient): step the copies one by one then."""
        for run in self.runs:
            counts = self.steps[run.buffer][:, run.first : run.last]
            if not bool((counts == counts[:, :1]).all()):
                return False
        for steps in self.steps:
            steps += 1
        k = len(self.states)
        with torch.no_grad():
            for run in self.runs:
                buffer, (first, second) = self.buffers[run.buffer], self.moments[run.buffer]
                factors = []  # per copy, its _FACTORS factors (in double, as torch computes them)
                for group, step in zip(run.groups, self.steps[run.buffer][:, run.first].tolist()):
                    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
                    beta1, beta2 = group["betas"]
                    factors.append((1 - lr * wd, 1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps,
                                    -(lr / (1 - beta1**step))))  # fmt: skip
                host = torch.tensor(factors, dtype=torch.float64).t()  # [_FACTORS, copies]
                device = host.to(buffer.dtype).to(buffer.device, non_blocking=True)
                decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size = (f.view(k, 1) for f in device)
                for cols in buffer.blocks(run.first, run.last):
                    param, grad, m, v = buffer.data[:, cols], buffer.grad[:, cols], first[:, cols], second[:, cols]
                    param.mul_(decay)  # torch multiplies only when wd != 0; by exactly 1.0 it changes nothing
                    m.lerp_(grad, one_minus_beta1)
                    v.mul_(beta2).addcmul_(grad * one_minus_beta2, grad)  # torch: v*b2 + ((1-b2)*g)*g
                    denom = (v.sqrt() / bc2_sqrt).add_(eps)
                    param.addcdiv_(m * step_size, denom)  # torch: p + ((-step size)*m)/denom
        return True

    def release(self) -> None:
        """Give every copy's moments and step counters storage of their own."""
        for copy_states in self.states:
            for state in copy_states:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    state[key] = state[key].clone()


def _group_of(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
