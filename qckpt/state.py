"""Training state: everything needed to continue a run bit-exactly.

A ``TrainingState`` names the live objects of a run (model, optimizer, LR
schedulers, grad scaler, data sampler, any ``torch.Generator``...) and captures
them together with the step counter, user extras and the process RNG states
(Python ``random``, NumPy's global generator, torch CPU and every CUDA device).
Anything with ``state_dict()``/``load_state_dict()`` plugs in.

Restoring validates the whole snapshot against the live objects first (keys,
shapes and dtypes of modules; class and parameter groups of optimizers; RNG
devices; any component with a ``state_problems(state) -> list[str]`` method,
like ``ResumableSampler``) and reports every problem at once, before anything
is modified.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from collections.abc import Collection
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from qckpt.commit.predict import OptimizerLayout
from qckpt.commit.writer import CommitHandle
from qckpt.errors import InvalidInputError
from qckpt.format.records import TensorEntry
from qckpt.format.tree import join_path
from qckpt.store.refs import check_ref_name

STATE_FORMAT = "qckpt.training_state/1"


@runtime_checkable
class Stateful(Protocol):
    """The PyTorch convention: objects that can save and reload their state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


def capture_rng() -> dict[str, Any]:
    """The RNG states of this process. CUDA generators are included once CUDA is initialized."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set this process's RNG states from ``capture_rng``'s result."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that shares its memory until either side is written (copy-on-write).

    Uses PyTorch's copy-on-write storage (``torch._lazy_clone``, private API) for
    CPU tensors and falls back to a plain ``clone`` where it is unavailable or
    refuses the tensor: always a correct independent copy, shared memory where
    the platform allows. Other devices always get a plain (device-to-device)
    ``clone``: on CUDA, PyTorch's multi-tensor kernels, which the optimizers use
    by default there, write through a lazy clone into the memory it shares
    (torch 2.11 on an H200: ``torch._foreach_add_`` on a clone changed the
    original), so a fork's optimizer step would change the original's state.
    """
    clone = getattr(torch, "_lazy_clone", None)
    if clone is not None and t.device.type == "cpu":
        try:
            return clone(t)
        except RuntimeError:
            pass
    return t.clone()


def _describe(value: Any) -> str:
    if isinstance(value, TensorEntry):
        return f"{value.dtype} {tuple(value.shape)}"
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


def module_problems(name: str, live: dict[str, Any], stored: Any) -> list[str]:
    """Every way ``stored`` (a state dict as committed, tensors as ``TensorEntry``) does
    not fit a module whose ``state_dict()`` is ``live``, one line per key."""
    if not isinstance(stored, dict):
        return [f"{name}: snapshot holds {_describe(stored)}, live object is a module"]
    problems = [f"{name}/{k}: missing from the snapshot" for k in live if k not in stored]
    problems += [f"{name}/{k}: in the snapshot but not in the live module" for k in stored if k not in live]
    for key in live.keys() & stored.keys():
        have, want = stored[key], live[key]
        if isinstance(want, torch.Tensor) != isinstance(have, TensorEntry):
            problems.append(f"{name}/{key}: snapshot holds {_describe(have)}, live module holds {_describe(want)}")
        elif isinstance(want, torch.Tensor) and (
            tuple(want.shape) != have.shape or str(want.dtype).removeprefix("torch.") != have.dtype
        ):
            problems.append(f"{name}/{key}: snapshot has {_describe(have)}, live module has {_describe(want)}")
    return sorted(problems)


def _optimizer_problems(name: str, live: dict[str, Any], stored: Any) -> list[str]:
    try:
        stored_groups = [len(g["params"]) for g in stored["param_groups"]]
    except (KeyError, TypeError):
        return [f"{name}: snapshot does not hold an optimizer state_dict"]
    live_groups = [len(g["params"]) for g in live["param_groups"]]
    if stored_groups != live_groups:
        return [f"{name}: parameter groups have sizes {stored_groups} in the snapshot, {live_groups} live"]
    live_keys = {k for g in live["param_groups"] for k in g}
    stored_keys = {k for g in stored["param_groups"] for k in g}
    if live_keys - stored_keys and stored_keys - live_keys:  # another optimizer's settings, not a newer version's
        return [f"{name}: the snapshot's parameter groups have settings {sorted(stored_keys - live_keys)} where the "
                f"live optimizer has {sorted(live_keys - stored_keys)}: a different kind of optimizer"]  # fmt: skip
    live_state_keys = {k for s in live.get("state", {}).values() for k in s}
    stored_state_keys = {k for s in stored.get("state", {}).values() for k in s}
    if live_state_keys and stored_state_keys and live_state_keys != stored_state_keys:
        return [f"{name}: the snapshot's optimizer state holds {sorted(stored_state_keys)}, "
                f"the live one {sorted(live_state_keys)}"]  # fmt: skip
    problems = []
    for param, entries in stored.get("state", {}).items():
        for key, have in entries.items():
            want = live["state"].get(param, {}).get(key)
            if isinstance(want, torch.Tensor) and isinstance(have, TensorEntry) and tuple(want.shape) != have.shape:
                problems.append(f"{name}/state/{param}/{key}: snapshot has {_describe(have)}, live has {_describe(want)}")
    return problems


def _class_name(component: Any) -> str:
    """The qualified class of a component (of the optimizer inside a wrapper)."""
    if isinstance(component, torch.optim.Optimizer):
        component = unwrap_optimizer(component)
    cls = type(component)
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Lineage:
    """Where a live training state came from: the snapshot it was last restored from
    (``restored``) or committed as, in the repository ``repository_id``.
    ``snapshot`` is an id, or the handle of a commit still being written;
    ``before`` is where the state came from if that commit fails."""

    repository_id: str
    snapshot: str | CommitHandle
    restored: bool
    before: Lineage | None = None

    def resolve(self) -> tuple[str | None, bool]:
        """(snapshot id, restored): for a commit, its id once written, or what came
        before it if it failed; (None, False) while it is being written."""
        if isinstance(self.snapshot, str):
            return self.snapshot, self.restored
        if not self.snapshot.done():
            return None, False
        if self.snapshot.snapshot_id is not None:
            return self.snapshot.snapshot_id, False
        return self.before.resolve() if self.before is not None else (None, False)

    def after_commit(self, handle: CommitHandle) -> Lineage:
        """The lineage of a state whose commit ``handle`` is in flight (finished
        commits before it are folded in, so the chain stays short)."""
        before: Lineage | None = self
        if not isinstance(self.snapshot, str) and self.snapshot.done():
            snapshot_id, restored = self.resolve()
            before = Lineage(self.repository_id, snapshot_id, restored) if snapshot_id is not None else None
        return Lineage(self.repository_id, handle, False, before)


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer a wrapper delegates to (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer`` and the like keep it in ``.optimizer``)."""
    seen = {id(optimizer)}
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(optimizer.optimizer) not in seen:
        optimizer = optimizer.optimizer
        seen.add(id(optimizer))
    return optimizer


def optimizer_family(optimizer: torch.optim.Optimizer) -> str:
    """``"adam"`` for Adam, AdamW and their subclasses, ``"sgd"`` for SGD and its
    subclasses, else ``"other"``. A subclass that changes the update rule only
    costs bytes: predictions are verified residuals, never trusted."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return "other"


class TrainingState:
    """The named live objects of a training run, plus step counter, extras and RNG.

    ``components`` are objects with ``state_dict``/``load_state_dict`` or
    ``torch.Generator``s. ``extras`` is plain user data (numbers, strings,
    lists, dicts, tensors). ``rng=False`` leaves the process RNG states out.
    Not thread-safe: capture and restore from the training thread.
    """

    def __init__(self, *, step: int = 0, extras: dict[str, Any] | None = None, rng: bool = True, **components: Any) -> None:
        for name, component in components.items():
            check_ref_name(name, "component")
            if not isinstance(component, (Stateful, torch.Generator)):
                raise InvalidInputError(
                    f"component {name!r} ({type(component).__qualname__}) has no state_dict()/load_state_dict()"
                )
        self.components: dict[str, Any] = components
        self.step = step
        self.extras: dict[str, Any] = dict(extras or {})
        self.rng = rng
        self.lineage: Lineage | None = None  # set by Repository.commit/restore

    def fork(self, k: int = 1) -> list[TrainingState]:
        """``k`` independent copies of this live state, for rollouts, that share every
        tensor's memory until one of them (or the original) writes it.

        Components are deep-copied together, so each fork's optimizer updates that
        fork's parameters and its scheduler drives that fork's optimizer.
        Parameters, buffers, optimizer state and tensor attributes of other
        components are copy-on-write on the CPU and device-to-device copies on
        other devices (``lazy_clone``); gradients are not carried over. The process RNG is shared by all (reseed rollouts as needed).
        """
        if k < 1:
            raise InvalidInputError(f"k must be at least 1, got {k}")
        return [self._fork_one() for _ in range(k)]

    def _fork_one(self) -> TrainingState:
        memo: dict[int, Any] = {}
        for component in self.components.values():
            if isinstance(component, torch.nn.Module):
                for p in component.parameters():
                    memo[id(p)] = torch.nn.Parameter(lazy_clone(p.detach()), requires_grad=p.requires_grad)
                for b in component.buffers():
                    memo[id(b)] = lazy_clone(b)
            elif isinstance(component, torch.optim.Optimizer):
                tensors = [v for s in component.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
                memo.update((id(t), lazy_clone(t)) for t in tensors)
            elif not isinstance(component, torch.Generator):
                attrs = vars(component).values() if hasattr(component, "__dict__") else ()
                memo.update((id(v), lazy_clone(v)) for v in attrs if isinstance(v, torch.Tensor))
        components = copy.deepcopy(self.components, memo)
        fork = TrainingState(step=self.step, extras=copy.deepcopy(self.extras, memo), rng=self.rng, **components)
        fork.lineage = self.lineage  # a fork came from where its original came from
        return fork

    def load_from(self, other: TrainingState) -> None:
        """Load ``other``'s current contents (a fork trained on its own, say) into this
        state's live objects and take over its lineage, so the next commit is
        parented on the snapshot ``other`` came from. Both must have the same
        components; the process RNG is left as it is (forks share it)."""
        tree = other.capture()
        tree["rng"] = None if not self.rng else capture_rng()
        self.load(tree)
        self.lineage = other.lineage

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate of every optimizer in this state by ``factor``, in
        a way LR schedulers keep: their ``base_lrs`` and the groups' ``initial_lr``
        are scaled too (``g["lr"] *= f`` alone is undone by the next
        ``scheduler.step()`` of e.g. LambdaLR)."""
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise InvalidInputError(f"factor must be a positive number, got {factor!r}")
        for component in self.components.values():
            if isinstance(component, torch.optim.Optimizer):
                for group in component.param_groups:
                    for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                        if isinstance(group.get(key), (int, float)):
                            group[key] *= factor
            elif isinstance(getattr(component, "base_lrs", None), list):  # an LR scheduler
                component.base_lrs = [lr * factor for lr in component.base_lrs]

    def capture(self, layouts: list[OptimizerLayout] | None = None) -> dict[str, Any]:
        """The current state as a plain tree (tensors are shared, not copied).
        ``layouts``: this state's ``optimizer_layouts()``, if the caller has them already."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "components": {
                name: {"generator_state": c.get_state()} if isinstance(c, torch.Generator) else c.state_dict()
                for name, c in self.components.items()
            },
            "rng": capture_rng() if self.rng else None,
            "extras": self.extras,
            "classes": {name: _class_name(c) for name, c in self.components.items()},
            # which parameter each optimizer's state entries belong to, by tree path (for people reading snapshots)
            "parameters": {layout.component: list(layout.param_paths) for layout in (layouts if layouts is not None else self.optimizer_layouts())},
        }

    def optimizer_layouts(self) -> list[OptimizerLayout]:
        """For each optimizer component, the captured tree path of each parameter it
        updates (by ``state_dict`` index), and its update rule's family. Lets the
        repository predict parameters and moments from the optimizer's own update."""
        names: dict[int, str] = {}
        for name, component in self.components.items():
            if isinstance(component, torch.nn.Module):
                prefix = join_path("components", name)
                names.update((id(p), join_path(prefix, key)) for key, p in component.named_parameters())
        layouts = []
        for name, component in self.components.items():
            if isinstance(component, torch.optim.Optimizer):
                inner = unwrap_optimizer(component)
                kind = optimizer_family(inner)
                paths = tuple(names.get(id(p)) for group in component.param_groups for p in group["params"])
                note = ""
                if kind == "other":
                    note = (f"optimizer {name!r} ({type(inner).__qualname__}) has no optimizer-aware codec: "
                            "its parameters and state are stored as plain deltas")  # fmt: skip
                elif paths and all(p is None for p in paths):
                    note = f"optimizer {name!r}: none of its parameters belongs to a module of this TrainingState"
                layouts.append(OptimizerLayout(name, kind, paths, note))
        return layouts

    def problems(self, stored: Any) -> list[str]:
        """Every way the stored tree (tensors as ``TensorEntry``) does not fit this state."""
        if not isinstance(stored, dict) or stored.get("format") != STATE_FORMAT:
            return ["the snapshot was not committed from a TrainingState; read it with Repository.load()"]
        comps = stored["components"]
        problems = [f"{n}: missing from the snapshot" for n in self.components if n not in comps]
        problems += [f"{n}: in the snapshot but not in this TrainingState" for n in comps if n not in self.components]
        for name, component in self.components.items():
            if name not in comps:
                continue
            if isinstance(component, torch.nn.Module):
                problems += module_problems(name, component.state_dict(), comps[name])
            elif isinstance(component, torch.optim.Optimizer):
                stored_class = stored.get("classes", {}).get(name)  # snapshots before classes were recorded: None
                if stored_class is not None and stored_class != _class_name(component):
                    problems.append(f"{name}: the snapshot holds a {stored_class} state, the live optimizer is a {_class_name(component)}")
                else:
                    problems += _optimizer_problems(name, component.state_dict(), comps[name])
            elif callable(getattr(component, "state_problems", None)):  # a component that can judge a state itself
                problems += [f"{name}: {p}" for p in component.state_problems(comps[name])]
        if self.rng:
            rng = stored.get("rng")
            if rng is None:
                problems.append("rng: the snapshot has no RNG state (use TrainingState(rng=False))")
            elif rng["cuda"] and (not torch.cuda.is_available() or torch.cuda.device_count() != len(rng["cuda"])):
                live = torch.cuda.device_count() if torch.cuda.is_available() else 0
                problems.append(f"rng/cuda: snapshot has {len(rng['cuda'])} CUDA generators, this process {live}")
        return problems

    def load(self, tree: dict[str, Any], *, in_place: Collection[str] = ()) -> None:
        """Load a captured tree (validated with ``problems`` first) into the live objects.
        ``in_place``: module components whose tensors hold the tree's values already
        (a restore copied them there); they are not loaded again."""
        for name, component in self.components.items():
            if name in in_place:
                continue
            stored = tree["components"][name]
            try:
                if isinstance(component, torch.Generator):
                    component.set_state(stored["generator_state"])
                else:
                    component.load_state_dict(stored)
            except Exception as e:
                e.add_note(f"qckpt: while restoring component {name!r}")
                raise
        if self.rng:
            restore_rng(tree["rng"])
        self.step = tree["step"]
        self.extras = tree["extras"]
