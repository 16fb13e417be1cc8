"""Rollout strategies: batched copies train like sequential ones (within a
reassociation bound), keep their hyperparameters, data and clipping apart, and
the scheduler says which strategy it used and why."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import qckpt
from bench.compare import differences
from bench.spike import Workload, cone_step, warm_cone
from branch import (
    BatchedRollouts,
    BatchedStep,
    ClipGrad,
    ConeConfig,
    Future,
    LightCone,
    RolloutScheduler,
    ScaleLR,
    SequentialRollouts,
    SkipBatches,
)
from branch.rollouts import copy_bytes, free_bytes

FUTURES = [Future("control", None), Future("skip", SkipBatches(3)), Future("lower", ScaleLR(0.5, warmback=4)),
           Future("clip", ClipGrad(0.05))]  # fmt: skip
# measured here: losses agree within 5e-7 and parameters within 2.2e-5 after 10 steps
# (batched matmuls sum in another order; Adam's normalisation magnifies tiny gradient differences)
LOSS_BOUND, PARAM_BOUND = 1e-5, 2e-4


def _cone(repo: qckpt.Repository, workload: Workload, executor: Any) -> LightCone:
    return warm_cone(repo, workload, ConeConfig(horizon=8, commit_every=4, resamples=200), executor=executor, validation=4)


def _rollouts(tmp_path: Path, name: str, executor: Any) -> list[tuple[Any, ...]]:
    workload = Workload(100)
    with qckpt.Repository.init(tmp_path / name) as repo:
        cone = _cone(repo, workload, executor)
        origin = repo.snapshot("main")
        rollouts = executor.run(cone, origin, FUTURES, 8)
        if isinstance(executor, BatchedRollouts):  # one commit per future, parented on the origin
            assert all(repo.snapshot(r.snapshot).parents == (origin.id,) for r in rollouts.results)
        return [(r.metrics, r.scores, repo.load(r.snapshot).tree()) for r in rollouts.results]


CUDA = [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def test_every_sequential_future_restores_the_origin_from_the_hot_tier(tmp_path: Path) -> None:
    """Each future commits twice (every 4 of 8 steps), more than the two snapshots the
    hot tier holds, yet ``run_futures`` keeps the origin there: every restore of it
    copies into the optimizer's own tensors, which only a restore from memory does."""
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, Workload(100), SequentialRollouts())
        origin = repo.snapshot("main")
        optimizer = cone.state.components["optimizer"]
        seen: list[list[int]] = []
        restore = repo.restore

        def watched(state: qckpt.TrainingState, revision: str = "main") -> qckpt.Snapshot:
            snap = restore(state, revision)
            seen.append([v.untyped_storage().data_ptr() for s in optimizer.state.values() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.nbytes >= 1 << 16])  # fmt: skip
            return snap

        repo.restore = watched  # type: ignore[method-assign]
        cone.run_futures(origin, FUTURES, 8)
    assert len(seen) == len(FUTURES) and seen[0] and all(s == seen[0] for s in seen)


@pytest.mark.parametrize(("max_copies", "devices"), [
    (None, None), (3, None), (1, ["cpu", "cpu"]),
    pytest.param(2, CUDA, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
], ids=["one-stack", "groups-of-3", "two-threads", "cuda-devices"])  # fmt: skip
def test_batched_copies_train_like_sequential_ones(tmp_path: Path, max_copies: int | None, devices: Any) -> None:
    sequential = _rollouts(tmp_path, "s", SequentialRollouts())
    batched = _rollouts(tmp_path, "b", BatchedRollouts(BatchedStep(clip_grad_norm=1.0), max_copies=max_copies, devices=devices))
    for (m1, s1, t1), (m2, s2, t2) in zip(sequential, batched):
        assert [m[0] for m in m1] == [m[0] for m in m2] == list(range(13, 21))
        assert max(abs(a[1] - b[1]) for a, b in zip(m1, m2)) < LOSS_BOUND
        assert max(abs(a[2] - b[2]) / a[2] for a, b in zip(m1, m2)) < 1e-4  # each copy's own gradient norm
        assert max(abs(a - b) for a, b in zip(s1, s2)) < LOSS_BOUND
        params = t1["components"]["model"]
        assert max(float((params[k] - t2["components"]["model"][k]).abs().max()) for k in params) < PARAM_BOUND
        assert t1["extras"] == t2["extras"]  # controls (clip limit, LR warm-back) followed each copy
        assert t1["components"]["optimizer"]["param_groups"] == t2["components"]["optimizer"]["param_groups"]
        for name in ("data", "scheduler"):  # each copy drew its own batches, stepped its own scheduler
            assert differences(t1["components"][name], t2["components"][name]) == []
    losses = [[m[1] for m in metrics] for metrics, _, _ in batched]
    assert len({tuple(x) for x in losses}) == len(FUTURES), "the copies did not differ: interventions were lost"


def test_the_copies_adamw_steps_are_one_update_equal_to_each_optimizers_own(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import branch.rollouts

    made: list[bool] = []
    real = branch.rollouts.StackedAdamW.of

    def of(*args: Any) -> Any:
        stacked = real(*args)
        made.append(stacked is not None)
        return stacked

    monkeypatch.setattr(branch.rollouts.StackedAdamW, "of", of)
    together = _rollouts(tmp_path, "together", BatchedRollouts(BatchedStep(clip_grad_norm=1.0)))
    assert made and made[-1], "the AdamW copies were stepped one by one"
    monkeypatch.setattr(branch.rollouts.StackedAdamW, "of", lambda *a: None)  # each copy's own optimizer.step()
    apart = _rollouts(tmp_path, "apart", BatchedRollouts(BatchedStep(clip_grad_norm=1.0)))
    for (m1, s1, t1), (m2, s2, t2) in zip(together, apart):
        assert m1 == m2 and s1 == s2
        assert differences(t1["components"], t2["components"]) == []  # parameters, moments, steps: bit for bit


def test_a_failure_in_a_device_thread_is_raised_after_every_thread_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from branch import rollouts

    def broken(self: Any, sources: Any, active: Any) -> Any:
        raise RuntimeError("a kernel failed on this device")

    workload = Workload(100)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, None)
        before = threading.active_count()
        monkeypatch.setattr(rollouts._Stack, "step", broken)
        with pytest.raises(RuntimeError, match="a kernel failed"):
            BatchedRollouts(BatchedStep(), max_copies=1, devices=["cpu", "cpu"]).run(cone, repo.snapshot("main"), FUTURES, 3)
        assert threading.active_count() == before


def test_the_origin_is_restored_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workload = Workload(100)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, None)
        restores: list[str] = []
        real = repo.restore
        monkeypatch.setattr(repo, "restore", lambda state, rev, *a, **k: restores.append(rev) or real(state, rev, *a, **k))
        origin = repo.snapshot("main")
        BatchedRollouts(BatchedStep(clip_grad_norm=1.0)).run(cone, origin, FUTURES, 3)
        assert restores == [origin.id]  # K copies forked from one restore, not K round trips
        restores.clear()
        BatchedRollouts(BatchedStep(clip_grad_norm=1.0), max_copies=2).run(cone, origin, FUTURES, 3)
        assert restores == [origin.id]  # also in groups: every copy is a fork of that one restore


def test_the_memory_budget_sizes_the_groups(tmp_path: Path) -> None:
    workload = Workload(100)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        cone = _cone(repo, workload, None)
        model, optimizer = cone.state.components["model"], cone.state.components["optimizer"]
        params = sum(p.numel() * 4 for p in model.parameters())
        moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
        assert copy_bytes(cone.state, BatchedStep()) == 2 * params + moments
        assert free_bytes(torch.device("cpu")) > 0
        assert BatchedRollouts(BatchedStep()).group_size(cone, 16)[0] == 16  # a tiny model: all fit
        size, why = BatchedRollouts(BatchedStep(), memory_fraction=1e-9).group_size(cone, 16)
        assert size == 1 and "groups of up to 1" in why and "MiB free on cpu" in why  # never zero
        assert BatchedRollouts(BatchedStep(), max_copies=5).group_size(cone, 16)[0] == 5
    for bad in ({"memory_fraction": 0.0}, {"max_copies": 0}, {"devices": []}, {"devices": ["gpu7"]}):
        with pytest.raises(qckpt.InvalidInputError):
            BatchedRollouts(BatchedStep(), **bad)


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 256)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return torch.nn.functional.cross_entropy(self.head(h).reshape(-1, 256), y.reshape(-1))


def test_the_scheduler_says_what_it_chose_and_why(tmp_path: Path) -> None:
    workload = Workload(100)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        scheduler = RolloutScheduler(BatchedStep(clip_grad_norm=1.0), probe_steps=1)
        cone = _cone(repo, workload, scheduler)
        before = cone.record.compute["train_steps"]
        strategy, why = scheduler.choose(cone, 5)  # the control and the 4 default futures
        assert strategy in ("batched", "sequential") and why.startswith("probe: a batched copy-step takes")
        assert cone.record.compute["train_steps"] == before + 2 * 6  # the probe's steps are counted
        assert scheduler.choose(cone, 5) == (strategy, why)  # kept per K: no second probe
        assert cone.record.compute["train_steps"] == before + 2 * 6
        decision = cone.explore(cone.index.observe(_nan(cone)))
        assert cone.record.events[-1]["rollouts"] == {"strategy": strategy, "why": why}
        assert len(decision.results) == 5
        assert RolloutScheduler().choose(cone, 4) == ("sequential", "no BatchedStep describes the step")
        assert RolloutScheduler(BatchedStep(), strategy="sequential").choose(cone, 4) == ("sequential", "forced")
        if torch.cuda.device_count() < 2:
            with pytest.raises(qckpt.InvalidInputError, match="two or more CUDA devices"):
                RolloutScheduler(BatchedStep(), strategy="devices").choose(cone, 4)

        normed = workload.new_run("clean", 0)
        normed.state.components["model"] = _Normed()
        normed.state.components["optimizer"] = torch.optim.AdamW(normed.state.components["model"].parameters())
        del normed.state.components["scheduler"]
        other = LightCone(repo, normed.state, cone_step, normed.batches, branch="normed")
        strategy, why = scheduler.choose(other, 4)
        assert strategy == "sequential" and "BatchNorm1d" in why and "running statistics" in why
        with pytest.raises(qckpt.InvalidInputError, match="cannot be batched"):
            RolloutScheduler(BatchedStep(), strategy="batched").choose(other, 4)


def _nan(cone: LightCone) -> Any:
    from branch import Observation

    return Observation(cone.state.step, float("nan"))


@pytest.mark.parametrize("make", [lambda: RolloutScheduler(strategy="fastest"),  # type: ignore[arg-type]
                                  lambda: RolloutScheduler(strategy="batched"),
                                  lambda: RolloutScheduler(BatchedStep(), probe_steps=0),
                                  lambda: RolloutScheduler(BatchedStep(), margin=1.5),
                                  lambda: RolloutScheduler(strategy="devices"),
                                  lambda: RolloutScheduler(BatchedStep(), probe_steps="2"),
                                  lambda: BatchedStep(clip_grad_norm=-1.0),  # would turn every copy's gradient around
                                  lambda: BatchedStep(randomness="shared")])  # type: ignore[arg-type]  # fmt: skip
def test_bad_scheduler_settings_are_typed_errors(make: Any) -> None:
    with pytest.raises(qckpt.InvalidInputError):
        make()


class _Partly(torch.nn.Module):
    """A model with a parameter its loss does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Linear(4, 1)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.used(x).squeeze(-1) - y).square().mean()


def test_a_parameter_the_loss_does_not_use_is_left_alone_as_torch_leaves_it() -> None:
    from branch.rollouts import _Stack

    torch.manual_seed(0)
    batches = [(torch.randn(8, 4), torch.randn(8)) for _ in range(4)]
    base = _Partly()
    copies, alone = [], []
    for _ in range(2):
        model, twin = copy.deepcopy(base), copy.deepcopy(base)
        copies.append(qckpt.TrainingState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1)))
        alone.append((twin, torch.optim.AdamW(twin.parameters(), lr=0.1)))
    stack = _Stack(BatchedStep(), copies)
    for batch in batches:  # the first step initialises the optimizers; the later ones could be stacked
        stack.step([iter([batch]), iter([batch])], [0, 1])
        for twin, optimizer in alone:
            optimizer.zero_grad()
            twin(*batch).backward()
            optimizer.step()  # AdamW skips the parameter without a gradient: no decay, no step count
    stack.release()
    for state, (twin, _) in zip(copies, alone):
        model = state.components["model"]
        assert torch.equal(model.unused, torch.ones(3))
        assert torch.allclose(model.used.weight, twin.used.weight, atol=1e-6)
        assert model.unused not in state.components["optimizer"].state


def test_a_released_stack_frees_its_buffers_without_the_cycle_collector(tmp_path: Path) -> None:
    import gc
    import weakref

    from branch.rollouts import _Stack

    run_ = Workload(100).new_run("clean", 0)
    copies = run_.state.fork(2)
    gc.disable()  # memory held until a collection would count against the next event's budget on a GPU
    try:
        stack = _Stack(BatchedStep(), copies)
        for _ in range(2):
            stack.step([c.components["data"] for c in copies], [0, 1])
        stack.release()
        buffer = weakref.ref(stack.buffers[0].data)
        del stack
        assert buffer() is None
    finally:
        gc.enable()
