"""One AdamW update for K copies at once, their parameters and moments in stacks.

Batched rollouts (``branch.rollouts``) keep a real ``torch.optim.AdamW`` per copy,
whose parameters are views into stacked tensors. Stepping K optimizers costs K
times the optimizer's per-tensor launches; ``StackedAdamW`` puts every copy's
moments and step counters into stacks as well (each optimizer's state entries
become views of its row) and performs the update once per stacked tensor, with
every copy's own hyperparameters (learning rate, weight decay, betas, eps) and
bias corrections as per-row factors. The arithmetic is torch's single-tensor
AdamW's, operation for operation (each per-copy scalar rounded to the tensor's
dtype as torch's kernels round it), so on the CPU the result equals stepping
each optimizer on its own, bit for bit (tested); the optimizers stay usable
for a copy stepped alone (their state entries are the views).

Applies when every copy has exactly one optimizer, a plain AdamW over exactly
the stacked parameters (no amsgrad, maximize, capturable, differentiable or
fused; float hyperparameters), whose state is initialised (after its first
step). Not thread-safe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_FACTORS = 7  # per copy and stacked tensor: 1 - lr*wd, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps, -step size


class StackedAdamW:
    """The AdamW state of K copies moved into stacks (see the module docstring); make
    one with ``of``, step every copy with ``step``, hand the state back with ``release``."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], params: Sequence[Sequence[torch.nn.Parameter]],
                 stacks: Sequence[torch.Tensor]) -> None:  # fmt: skip
        k = len(optimizers)
        self.stacks = list(stacks)
        self.groups = [[_group_of(opt, p) for p in copy_params] for opt, copy_params in zip(optimizers, params)]
        self.states = [[opt.state[p] for p in copy_params] for opt, copy_params in zip(optimizers, params)]
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.steps: list[torch.Tensor] = []
        for i in range(len(self.stacks)):
            rows = [self.states[c][i] for c in range(k)]
            first = torch.stack([r["exp_avg"] for r in rows])
            second = torch.stack([r["exp_avg_sq"] for r in rows])
            steps = torch.stack([r["step"] for r in rows])
            for c, row in enumerate(rows):
                row["exp_avg"], row["exp_avg_sq"], row["step"] = first[c], second[c], steps[c]
            self.moments.append((first, second))
            self.steps.append(steps)

    @classmethod
    def of(cls, optimizers: Sequence[Sequence[torch.optim.Optimizer]], params: Sequence[Sequence[torch.nn.Parameter]],
           stacks: Sequence[torch.Tensor]) -> StackedAdamW | None:  # fmt: skip
        """The stacked state of the copies' optimizers (``optimizers[c]``: copy c's),
        over ``params[c][i]``, the views of ``stacks[i]``; None when it does not
        apply (see the module docstring)."""
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
        return cls([opts[0] for opts in optimizers], params, stacks)

    def step(self) -> None:
        """One AdamW step of every copy, from the gradients in ``stacks[i].grad``
        (already clipped per copy); a stack without gradients is skipped, as
        torch skips a parameter without one."""
        live = [i for i, s in enumerate(self.stacks) if s.grad is not None]
        if not live:
            return
        k = len(self.groups)
        rows = []  # per stack: per copy, its _FACTORS factors (in double, as torch computes them)
        for i in live:
            self.steps[i] += 1
            per_copy = []
            for c, step in enumerate(self.steps[i].tolist()):
                group = self.groups[c][i]
                lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
                beta1, beta2 = group["betas"]
                per_copy.append((1 - lr * wd, 1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, eps,
                                 -(lr / (1 - beta1**step))))  # fmt: skip
            rows.append(per_copy)
        host = torch.tensor(rows, dtype=torch.float64).transpose(1, 2)  # [stacks, _FACTORS, copies]
        factors = host.to(self.stacks[0].dtype).to(self.stacks[0].device, non_blocking=True)
        with torch.no_grad():
            for row, i in enumerate(live):
                stack, (first, second) = self.stacks[i], self.moments[i]
                grad, param = stack.grad, stack.detach()
                decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size = (
                    f.view(k, *[1] * (stack.dim() - 1)) for f in factors[row]
                )
                param.mul_(decay)  # torch multiplies only when wd != 0; by exactly 1.0 it changes nothing
                first.lerp_(grad, one_minus_beta1)
                second.mul_(beta2).addcmul_(grad * one_minus_beta2, grad)  # torch: v*b2 + ((1-b2)*g)*g
                denom = (second.sqrt() / bc2_sqrt).add_(eps)
                param.addcdiv_(first * step_size, denom)  # torch: p + ((-step size)*m)/denom

    def release(self) -> None:
        """Give every copy's moments and step counters storage of their own."""
        for copy_states in self.states:
            for state in copy_states:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    state[key] = state[key].clone()


def _group_of(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
