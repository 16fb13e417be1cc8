"""Rollout strategies beyond one-after-another: K futures as stacked copies in one
forward and backward (``torch.func``), and a scheduler that picks a strategy
per event from a short probe.

Batched rollouts cannot call the user's step function (it trains one model);
they run the step that ``BatchedStep`` describes: ``model(*batch)`` returns the
loss, gradients are clipped per copy, every optimizer and LR scheduler steps
once. Each copy keeps its own optimizer (a real ``torch.optim`` object whose
parameters are views into the stacked tensors), scheduler, batch source,
controls and step counter, so per-copy learning rates, weight decay, clipping,
skipped or reseeded batches all hold; the global-norm clip of one copy never
sees another copy's gradients. When every copy's optimizer is a plain AdamW,
the K updates are done as one on stacked moments (``branch.stacked_adamw``:
equal to each optimizer's own step, bit for bit on the CPU). On CUDA the batched forward never uses the
memory-efficient attention kernel, whose backward rejects the copy-stacked
inputs (``RuntimeError: LSE is not correctly aligned``, torch 2.11 on an
H200); attention there runs on the flash or math kernels instead. Results
equal running each copy alone up to
floating-point reassociation in the batched kernels (measured by ``python -m
bench rollout``: ``max_abs_diff_vs_sequential``). Dropout draws differ from a
sequential run's (``randomness="different"``: independent per copy).

Not thread-safe: the training loop's thread runs every strategy.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.func import functional_call, vmap

import qckpt
from branch._checks import check_int, check_number
from branch.engine import Future, FutureResult, Rollouts, SequentialRollouts
from branch.interventions import Controls
from branch.stack_layout import StackBuffer
from branch.stacked_adamw import StackedAdamW

if TYPE_CHECKING:
    from branch.engine import LightCone


@dataclass(frozen=True)
class BatchedStep:
    """The user's step, described so K copies can take it together.

    ``model`` names the module component; ``model(*batch)`` (or ``model(batch)``
    for a tensor batch) returns the scalar loss. Gradients are clipped at the
    copy's ``Controls.clip_grad_norm``, else at ``clip_grad_norm`` (the step
    function's own rule; None: measured, not clipped); an update whose norm is
    not finite is skipped; then every optimizer and every LR scheduler of the
    state steps once. A step function that does more (mixed precision,
    accumulation, several losses) is not described by this: keep it sequential.
    """

    clip_grad_norm: float | None = None
    model: str = "model"
    randomness: Literal["different", "same"] = "different"

    def __post_init__(self) -> None:
        if self.clip_grad_norm is not None:  # a negative limit would turn every copy's gradient around
            check_number("clip_grad_norm", self.clip_grad_norm)
        if not isinstance(self.model, str):
            raise qckpt.InvalidInputError(f"model must name a component of the TrainingState, got {self.model!r}")
        if self.randomness not in ("different", "same"):
            raise qckpt.InvalidInputError(f"randomness must be 'different' or 'same', got {self.randomness!r}")


def _stack(batches: list[Any], device: torch.device) -> Any:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(batches).to(device)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([b[i] for b in batches], device) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _stack([b[k] for b in batches], device) for k in first}
    raise qckpt.InvalidInputError(f"a batch of {type(first).__name__} cannot be stacked (tensors, tuples, lists, dicts)")


def _optimizers(state: qckpt.TrainingState) -> list[torch.optim.Optimizer]:
    return [c for c in state.components.values() if isinstance(c, torch.optim.Optimizer)]


def _schedulers(state: qckpt.TrainingState) -> list[Any]:
    return [c for c in state.components.values() if isinstance(c, torch.optim.lr_scheduler.LRScheduler)]


class BatchedRollouts:
    """Futures as copies in stacks, in groups that fit the memory budget.

    A group restores the origin once (from the hot tier: a memory copy), forks it
    once per future (copy-on-write: a copy costs memory only for what its
    intervention and training change), applies each future's intervention to
    its fork (``LightCone.intervene``), trains the copies together, then loads them one by one into the live state to be evaluated and
    committed (``LightCone.finish_future``). With pruning, every group trains to
    the rung and each future is committed there (``pause_future``); the
    survivors are restored from those commits, regrouped and trained on.
    Futures' branches get commits at the rung and the horizon only (the
    sequential strategy also commits every ``commit_every``).

    Memory: a copy needs its parameters, gradients and optimizer state, plus
    activations measured by a one-copy probe step on CUDA (on the CPU, where no
    peak is measured, activations are not counted). Groups hold at most
    ``memory_fraction`` of the memory free on the model's device when the
    event starts (``torch.cuda.mem_get_info``; ``MemAvailable`` on the CPU),
    and at most ``max_copies`` copies; the live run's own memory is already
    allocated, so it is never squeezed.
    """

    def __init__(self, step: BatchedStep, *, memory_fraction: float = 0.5, max_copies: int | None = None,
                 devices: Sequence[str | torch.device] | None = None) -> None:  # fmt: skip
        check_number("memory_fraction", memory_fraction, 0, 1)
        check_int("max_copies", max_copies, optional=True)
        self.step, self.memory_fraction, self.max_copies = step, memory_fraction, max_copies
        try:
            self.devices = [torch.device(d) for d in devices] if devices is not None else None
        except (RuntimeError, TypeError) as e:
            raise qckpt.InvalidInputError(f"devices must be device names such as 'cuda:0': {e}") from e
        if self.devices is not None and not self.devices:
            raise qckpt.InvalidInputError("devices must name at least one device (None: the model's own)")

    def unbatchable(self, state: qckpt.TrainingState) -> str | None:
        """Why ``state`` cannot be trained as stacked copies, or None if it can."""
        model = state.components.get(self.step.model)
        if not isinstance(model, torch.nn.Module):
            return f"BatchedStep.model names {self.step.model!r}, which is not a torch.nn.Module component"
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
                return f"{name or 'the model'} ({type(module).__name__}) updates running statistics in training"
        if not _optimizers(state):
            return "the state has no optimizer"
        for scheduler in _schedulers(state):
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                return "ReduceLROnPlateau steps on a metric the batched step does not have"
        return None

    def devices_for(self, cone: LightCone) -> list[torch.device]:
        """Where the groups train: ``devices``, or the model's own device."""
        model: torch.nn.Module = cone.state.components[self.step.model]
        return self.devices or [next(model.parameters()).device]

    def group_size(self, cone: LightCone, k: int) -> tuple[int, str]:
        """How many of ``k`` copies train together, and the budget behind it (the
        tightest of the devices)."""
        model: torch.nn.Module = cone.state.components[self.step.model]
        device = next(model.parameters()).device
        per_copy = copy_bytes(cone.state, self.step) + (_activation_bytes(self.step, cone) if device.type == "cuda" else 0)
        free = min(free_bytes(d) for d in self.devices_for(cone))
        fit = int(free * self.memory_fraction // max(per_copy, 1))
        size = max(1, min(k, fit, self.max_copies or k))
        counted = "params, grads, optimizer state" + (", activations" if device.type == "cuda" else "")
        return size, (f"{k} copies in groups of up to {size}: {per_copy / 2**20:.1f} MiB a copy ({counted}), "
                      f"{free / 2**20:.0f} MiB free on {device.type}, budget {self.memory_fraction:.0%}")  # fmt: skip

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        reason = self.unbatchable(cone.state)
        if reason is not None:
            raise qckpt.InvalidInputError(f"these futures cannot be batched: {reason}")
        size, why = self.group_size(cone, len(futures))
        devices = self.devices_for(cone)
        if len(devices) > 1:
            why += f"; groups spread over {', '.join(map(str, devices))}"
        rung = cone.rung_steps(horizon)
        results = [cone.new_future(origin, future) for future in futures]
        cone.repo.restore(cone.state, origin.id)  # once (from the hot tier); the copies are copy-on-write forks
        copies = []
        for future in futures:
            copies.append(cone.state.fork()[0])
            cone.intervene(copies[-1], future)
        self._train(cone, results, copies, rung or horizon, size, devices, pause=bool(rung))
        if rung:
            cone.prune(results, origin, horizon)
            kept = [r for r in results if r.pruned_at is None]
            copies = []
            for result in kept:
                cone.repo.restore(cone.state, result.snapshot)
                copies.append(cone.state.fork()[0])
            self._train(cone, kept, copies, horizon - rung, size, devices, pause=False)
        return Rollouts(results, "batched" if len(devices) == 1 else "devices", why)

    def _train(self, cone: LightCone, results: list[FutureResult], copies: list[qckpt.TrainingState], steps: int,
               size: int, devices: list[torch.device], *, pause: bool) -> None:  # fmt: skip
        """Train ``copies`` ``steps`` steps in groups of ``size`` and load each copy into
        the live state to pause it (commit at the rung) or finish it. On one
        device the groups run in turn, each collected before the next starts
        (one group's memory at a time). On several, the groups are dealt round
        robin to them (a thread per device, its groups one after another), each
        group offloaded to host memory when done and all collected after every
        thread has stopped; a failure in a thread is raised then."""
        groups = _chunks(list(range(len(results))), size)
        data = cone.data_component()

        def collect(group: list[int]) -> None:
            for k in group:
                cone.state.load_from(copies[k])
                (cone.pause_future if pause else cone.finish_future)(results[k])

        never = threading.Event()
        if len(devices) == 1:
            for group in groups:
                cone.record.compute["train_steps"] += self._fit([results[k] for k in group], [copies[k] for k in group],
                                                                steps, data, devices[0], devices[0], never)  # fmt: skip
                collect(group)
            return
        home = torch.device("cpu")
        counts = [0] * len(devices)
        errors: list[BaseException] = []
        stop = threading.Event()

        def work(slot: int) -> None:
            try:
                for group in groups[slot :: len(devices)]:
                    if stop.is_set():
                        return
                    counts[slot] += self._fit([results[k] for k in group], [copies[k] for k in group], steps, data,
                                              devices[slot], home, stop)  # fmt: skip
            except BaseException as e:  # surfaced to the caller below, never swallowed
                errors.append(e)
                stop.set()

        threads = [threading.Thread(target=work, args=(slot,), name=f"rollouts-{d}") for slot, d in enumerate(devices)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cone.record.compute["train_steps"] += sum(counts)
        if errors:
            raise errors[0]
        for group in groups:
            collect(group)

    def _fit(self, group: list[FutureResult], copies: list[qckpt.TrainingState], steps: int, data: str,
             device: torch.device, home: torch.device, stop: threading.Event) -> int:  # fmt: skip
        """Train one group on ``device`` and bring it back to ``home``; returns the
        copy-steps taken. Touches only its own copies and results."""
        for copy_ in copies:
            _move(copy_, self.step.model, device)
        trainer = _Stack(self.step, copies)
        taken = 0
        for _ in range(steps):
            active = [k for k, r in enumerate(group) if not r.diverged]
            if not active or stop.is_set():
                break
            for k, loss, norm in trainer.step([copies[k].components[data] for k in active], active):
                group[k].metrics.append([copies[k].step, loss, norm])
                group[k].diverged = not math.isfinite(loss)
            taken += len(active)
        trainer.release()
        for copy_ in copies:
            _move(copy_, self.step.model, home)
        return taken


def _move(state: qckpt.TrainingState, model: str, device: torch.device) -> None:
    """Put a copy's model and its optimizers' state on ``device`` (optimizer state
    follows its parameters through ``load_state_dict``, which keeps step counts
    where the optimizer wants them)."""
    module: torch.nn.Module = state.components[model]
    if next(module.parameters()).device == device:
        return
    module.to(device)
    for optimizer in _optimizers(state):
        optimizer.load_state_dict(optimizer.state_dict())


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def copy_bytes(state: qckpt.TrainingState, step: BatchedStep) -> int:
    """Bytes one more copy of ``state`` holds: trainable parameters, their gradients,
    and every tensor in the optimizers' state."""
    params = sum(p.numel() * p.element_size() for p in state.components[step.model].parameters() if p.requires_grad)
    moments = sum(t.numel() * t.element_size() for opt in _optimizers(state) for s in opt.state.values()
                  for t in s.values() if isinstance(t, torch.Tensor))  # fmt: skip
    return 2 * params + moments


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: ``torch.cuda.mem_get_info`` on CUDA, the
    kernel's ``MemAvailable`` on the CPU (unbounded where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _activation_bytes(step: BatchedStep, cone: LightCone) -> int:
    """Peak CUDA memory of one copy's batched step beyond what it started with (a
    throw-away fork; counted in the run's compute)."""
    copy_ = cone.state.fork()[0]
    data = cone.data_component()
    trainer = _Stack(step, [copy_])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.step([copy_.components[data]], [0])
    torch.cuda.synchronize()
    cone.record.compute["train_steps"] += 1
    return max(0, torch.cuda.max_memory_allocated() - before)


# Stacked parameters are views of a [K, N] buffer (rows a stride N apart), and so are the
# gradients they accumulate into: by design, not the layout autograd would pick for them.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class _Stack:
    """K forked states whose trainable parameters live in stacked tensors, views of
    ``StackBuffer``s (one per dtype and device): each copy's parameters are views
    into them, so its own optimizer updates its slice. The stacks' gradients
    are views of the buffers' ``grad``, accumulated into in place, so that the
    per-copy norms, clipping and the stacked AdamW update run on whole buffers."""

    def __init__(self, spec: BatchedStep, copies: list[qckpt.TrainingState]) -> None:
        self.spec, self.copies = spec, copies
        self.model: torch.nn.Module = copies[0].components[spec.model]
        named = [dict(c.components[spec.model].named_parameters()) for c in copies]
        trainable = [n for n, p in named[0].items() if p.requires_grad]
        kinds = list(dict.fromkeys((p.dtype, p.device) for n, p in named[0].items() if n in trainable))
        by_kind = [[n for n in trainable if (named[0][n].dtype, named[0][n].device) == kind] for kind in kinds]
        self.names = [n for names in by_kind for n in names]  # buffer by buffer
        self.fixed = {n: p for n, p in named[0].items() if not p.requires_grad} | dict(self.model.named_buffers())
        self.buffers = [StackBuffer([[params[n].detach() for n in names] for params in named]) for names in by_kind]
        self.stacks: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._reached: set[str] = set()
        reached = self._reached  # the hooks hold the set, not the stack: no reference cycle keeps the buffers alive
        for names, buffer in zip(by_kind, self.buffers):
            for i, name in enumerate(names):
                self.stacks[name] = buffer.view(buffer.data, i).requires_grad_(True)
                self._grads[name] = buffer.view(buffer.grad, i)
                self.stacks[name].register_post_accumulate_grad_hook(lambda _, name=name, reached=reached: reached.add(name))
        self.params = [[params[n] for n in self.names] for params in named]
        for k, params in enumerate(self.params):
            for name, p in zip(self.names, params):
                p.data = self.stacks[name].detach()[k]

        model, fixed = self.model, self.fixed  # not self: no reference cycle

        def loss_one(params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            return functional_call(model, (params, fixed), tuple(inputs))

        self.losses = vmap(loss_one, randomness=spec.randomness)
        self.cuda = next(iter(self.stacks.values())).is_cuda
        self.optimizer: StackedAdamW | None = None  # once every copy's AdamW has state: one update for all
        self._copy_grads = False  # whether the copies' parameters hold gradient views (per-copy steps)

    def step(self, sources: list[Any], active: list[int]) -> list[tuple[int, float, float]]:
        """One step of the ``active`` copies (each drawing from its source); returns
        ``(copy, loss, gradient norm before clipping)`` for each."""
        device = next(iter(self.stacks.values())).device
        batch = _stack([next(source) for source in sources], device)
        every = len(active) == len(self.copies)  # the stacks as they are: no gather, no scatter-add back
        rows: Any = slice(None) if every else torch.tensor(active, device=device)
        with _batchable_attention(self.cuda):
            losses = self.losses(self.stacks if every else {n: s[rows] for n, s in self.stacks.items()}, batch)
        for buffer in self.buffers:
            buffer.grad.zero_()
        for name, stack in self.stacks.items():
            stack.grad = self._grads[name]
        self._reached.clear()
        losses.sum().backward()
        for name in self.stacks.keys() - self._reached:  # a parameter the loss does not use has no gradient, as in torch
            self.stacks[name].grad = None
        norms = self._clip()[rows]
        measured = torch.stack([losses.detach().float(), norms.float()]).tolist()  # the step's one host sync
        stacked = every and all(math.isfinite(n) for n in measured[1]) and len(self._reached) == len(self.stacks)
        if stacked and self.optimizer is None:  # every copy updates every tensor: one update for all
            self.optimizer = StackedAdamW.of([_optimizers(c) for c in self.copies], self.params, self.buffers)
        joint = self.optimizer if stacked and self.optimizer is not None and self.optimizer.step() else None
        self._hand_out_grads(None if joint is not None else active)
        out = []
        for k, loss, norm in zip(active, *measured):
            state = self.copies[k]
            if math.isfinite(norm) and joint is None:
                for optimizer in _optimizers(state):
                    optimizer.step()
            for scheduler in _schedulers(state):
                scheduler.step()
            state.step += 1
            Controls.of(state).tick(state)
            out.append((k, loss, norm))
        return out

    def _hand_out_grads(self, active: list[int] | None) -> None:
        """Give the ``active`` copies' parameters their rows of the stacked gradients,
        for their own optimizers' steps (None: take them back, a stacked step needs none)."""
        if active is None:
            if self._copy_grads:
                for params in self.params:
                    for p in params:
                        p.grad = None
                self._copy_grads = False
            return
        for i, name in enumerate(self.names):
            grad = self.stacks[name].grad  # None for a parameter the loss does not use
            views = grad.unbind() if grad is not None else [None] * len(self.copies)
            for k in active:
                self.params[k][i].grad = views[k]
        self._copy_grads = True

    def _clip(self) -> torch.Tensor:
        """Every copy's gradient norm before clipping, its gradients scaled in place to
        its own limit: ``clip_grad_norm_`` per copy (the 2-norm of its tensors'
        2-norms, coefficient ``limit / (norm + 1e-6)`` capped at 1), computed as
        the 2-norm of its row of each buffer (the same norm, summed in another
        order), one reduction and one scaling per buffer."""
        k = len(self.copies)
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b.grad, dim=1) for b in self.buffers]), dim=0)
        limits = []
        for state in self.copies:
            limit = Controls.of(state).clip_grad_norm
            limit = limit if limit is not None else self.spec.clip_grad_norm
            limits.append(limit if limit is not None else math.inf)
        coef = (torch.tensor(limits, dtype=norms.dtype, device=norms.device) / (norms + 1e-6)).clamp(max=1.0)
        for buffer in self.buffers:
            buffer.grad.mul_(coef.view(k, 1))
        return norms

    def release(self) -> None:
        """Give every copy's parameters (and optimizer state) storage of their own (out of the stacks)."""
        if self.optimizer is not None:
            self.optimizer.release()
        for params in self.params:
            for p in params:
                p.data = p.data.clone()
                p.grad = None


_attention_lock = threading.Lock()
_attention_users = 0
_attention_saved = True


@contextmanager
def _batchable_attention(cuda: bool) -> Iterator[None]:
    """Disable CUDA's memory-efficient SDPA kernel while any batched forward runs
    (the switch is process-wide; the ``devices`` strategy runs one thread per
    device, so the first to enter saves it and the last to leave restores it)."""
    global _attention_users, _attention_saved
    if not cuda:
        yield
        return
    with _attention_lock:
        if _attention_users == 0:
            _attention_saved = torch.backends.cuda.mem_efficient_sdp_enabled()
            torch.backends.cuda.enable_mem_efficient_sdp(False)
        _attention_users += 1
    try:
        yield
    finally:
        with _attention_lock:
            _attention_users -= 1
            if _attention_users == 0:
                torch.backends.cuda.enable_mem_efficient_sdp(_attention_saved)


Strategy = Literal["auto", "sequential", "batched", "devices", "ray"]


class RolloutScheduler:
    """A ``RolloutExecutor`` that picks a strategy per event, and records which and why.

    ``strategy="auto"``: batched when a ``BatchedStep`` is given, the state can be
    batched, and a probe (one warm-up, then ``probe_steps`` rounds alternating a
    sequential and a batched step, medians compared; on throw-away forks of
    the live state; counted in the run's compute) shows a batched copy-step
    at most ``margin`` times a sequential step; otherwise
    sequential. Near-ties go to sequential: a probe of a few steps is noisy,
    and batched copies cost memory and commit their branches only at the horizon.
    The verdict is kept per number of futures. With ``ray`` (a
    ``branch.ray_rollouts.RayRollouts``), "auto" sends the futures to Ray when
    its cluster has more than one node (on one machine a task only adds
    worker start-up, repository open and restore: measured 0.3-1.2 s a job in
    ``bench rollout``). With two or more CUDA devices, "auto" spreads batched
    groups over all of them (``"devices"``). ``"sequential"``, ``"batched"``,
    ``"devices"`` or ``"ray"`` force one (batched and devices need a
    ``BatchedStep``, ray a ``RayRollouts``). Pass a
    ``BatchedRollouts`` instead of a ``BatchedStep`` to set its memory budget.
    """

    def __init__(self, batched: BatchedStep | BatchedRollouts | None = None, *, ray: Any = None,
                 strategy: Strategy = "auto", probe_steps: int = 6, margin: float = 0.8) -> None:  # fmt: skip
        if strategy not in ("auto", "sequential", "batched", "devices", "ray"):
            raise qckpt.InvalidInputError(f"unknown strategy {strategy!r}: auto, sequential, batched, devices or ray")
        if strategy in ("batched", "devices") and batched is None:
            raise qckpt.InvalidInputError("strategy 'batched' needs a BatchedStep describing the step")
        if strategy == "ray" and ray is None:
            raise qckpt.InvalidInputError("strategy 'ray' needs ray=RayRollouts(...)")
        check_int("probe_steps", probe_steps)
        check_number("margin", margin, 0, 1)
        self.strategy, self.probe_steps, self.margin = strategy, probe_steps, margin
        self.sequential = SequentialRollouts()
        self.batched = BatchedRollouts(batched) if isinstance(batched, BatchedStep) else batched
        self.ray = ray
        self._verdicts: dict[int, tuple[str, str]] = {}

    def choose(self, cone: LightCone, k: int) -> tuple[str, str]:
        """The strategy for ``k`` futures and the reason."""
        if self.strategy == "ray":
            return "ray", "forced"
        if self.strategy == "auto" and self.ray is not None and (nodes := self.ray.nodes()) > 1:
            return "ray", f"a Ray cluster of {nodes} nodes"
        if self.strategy == "sequential" or self.batched is None:
            return "sequential", ("forced" if self.strategy == "sequential" else "no BatchedStep describes the step")
        reason = self.batched.unbatchable(cone.state)
        if reason is not None:
            if self.strategy == "batched":
                raise qckpt.InvalidInputError(f"these futures cannot be batched: {reason}")
            return "sequential", f"not batchable: {reason}"
        gpus = torch.cuda.device_count()
        if self.strategy == "devices" and gpus < 2:
            raise qckpt.InvalidInputError(f"strategy 'devices' needs two or more CUDA devices, this machine has {gpus}")
        if self.strategy in ("batched", "devices"):
            return self.strategy, "forced"
        if gpus > 1:
            return "devices", f"{gpus} CUDA devices: the futures' groups spread over them"
        if k not in self._verdicts:
            self._verdicts[k] = self._probe(cone, k)
        return self._verdicts[k]

    def _probe(self, cone: LightCone, k: int) -> tuple[str, str]:
        assert self.batched is not None
        data = cone.data_component()
        single = cone.state.fork()[0]
        k = self.batched.group_size(cone, k)[0]  # the stack the budget allows
        copies = cone.state.fork(k)
        cone.record.compute["train_steps"] += (1 + self.probe_steps) * (k + 1)  # a warm-up and the timed rounds

        def sequential_step() -> None:
            cone.step_fn(single, next(single.components[data]), Controls.of(single))

        def batched_step() -> None:
            trainer.step([c.components[data] for c in copies], list(range(k)))

        sequential_step()
        try:  # the batched warm-up: an op without a batching rule, a batch that cannot stack, fail here
            trainer = _Stack(self.batched.step, copies)
            batched_step()
        except (RuntimeError, qckpt.InvalidInputError) as e:
            return "sequential", f"the batched probe failed: {type(e).__name__}: {e}"
        sequential, batched = _timed_pair(self.probe_steps, sequential_step, batched_step)
        ratio = batched / k / sequential
        verdict = "batched" if ratio <= self.margin else "sequential"
        return verdict, f"probe: a batched copy-step takes {ratio:.2f}x a sequential step (K={k}; batched at <= {self.margin:.2f}x)"

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        strategy, why = self.choose(cone, len(futures))
        executor = {"batched": self.batched, "ray": self.ray}.get(strategy) or self.sequential
        if strategy == "devices":
            assert self.batched is not None
            gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            executor = BatchedRollouts(self.batched.step, memory_fraction=self.batched.memory_fraction,
                                       max_copies=self.batched.max_copies, devices=gpus)  # fmt: skip
        rollouts = executor.run(cone, origin, futures, horizon)
        return Rollouts(rollouts.results, strategy, why)


def _timed_pair(rounds: int, first: Any, second: Any) -> tuple[float, float]:
    """Median seconds per call of ``first`` and of ``second``, called alternately for
    ``rounds`` rounds (alternating and the median keep a shared machine's slow
    moments from deciding)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for call, out in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            call()
            out.append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])
