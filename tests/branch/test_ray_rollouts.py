"""Rollouts as Ray tasks on a local Ray instance (loopback only): the same results
as sequential rollouts, a worker that dies is retried, a failure is reported,
pruning works across tasks."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qckpt
from bench.compare import differences
from bench.spike import Workload, warm_cone, worker_run
from branch import ConeConfig, Future, LightCone, Pruning, RolloutScheduler, ScaleLR, SequentialRollouts, SkipBatches
from branch.ray_rollouts import RayRollouts, RunParts

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 100
FUTURES = [Future("control", None), Future("skip", SkipBatches(2)), Future("lower", ScaleLR(0.5)), Future("higher", ScaleLR(2.0))]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    yield
    ray.shutdown()


def _cone(repo: qckpt.Repository, executor: Any, pruning: Pruning | None = None) -> LightCone:
    config = ConeConfig(horizon=10, commit_every=4, resamples=200, pruning=pruning)
    workload = Workload(STEPS)  # evaluated on all its validation batches, as worker_run's runs are
    return warm_cone(repo, workload, config, executor=executor, validation=len(workload.validation))


def _futures(tmp_path: Path, name: str, make: Any, pruning: Pruning | None = None) -> list[Any]:
    path = tmp_path / name
    with qckpt.Repository.init(path) as repo:
        executor = make(path)
        cone = _cone(repo, executor, pruning)
        rollouts = executor.run(cone, repo.snapshot("main"), FUTURES, 10)
        return [(r, repo.load(r.snapshot).tree()["components"]) for r in rollouts.results]


def test_ray_tasks_give_the_sequential_results(tmp_path: Path) -> None:
    sequential = _futures(tmp_path, "s", lambda path: SequentialRollouts())
    on_ray = _futures(tmp_path, "r", lambda path: RayRollouts(functools.partial(worker_run, STEPS, "clean", 0), path))
    for (a, ta), (b, tb) in zip(sequential, on_ray):
        assert a.metrics == b.metrics and a.scores == b.scores and a.branch == b.branch
        assert differences(ta, tb) == []


def _dies_once(marker: str) -> RunParts:
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)  # the worker process dies mid-task
    return worker_run(STEPS, "clean", 0)


def _always_fails() -> RunParts:
    raise RuntimeError("no such dataset on this worker")


def test_a_dead_worker_is_retried_and_a_failure_is_reported(tmp_path: Path) -> None:
    marker = str(tmp_path / "died")
    retried = _futures(tmp_path, "d", lambda path: RayRollouts(functools.partial(_dies_once, marker), path, max_retries=2))
    assert os.path.exists(marker) and all(r.scores for r, _ in retried)
    with pytest.raises(qckpt.RolloutError, match="future control failed on Ray: RuntimeError: no such dataset on this worker"):
        _futures(tmp_path, "f", lambda path: RayRollouts(_always_fails, path, max_retries=0))


def test_pruning_across_tasks(tmp_path: Path) -> None:
    futures = _futures(tmp_path, "p", lambda path: RayRollouts(functools.partial(worker_run, STEPS, "clean", 0), path),
                       Pruning(keep=0.3))  # fmt: skip
    cut = [r for r, _ in futures if r.pruned_at is not None]
    kept = [r for r, _ in futures if r.pruned_at is None]
    assert len(cut) == 2 and all(r.scores == [] and len(r.metrics) == 5 for r in cut)
    assert all(len(r.metrics) == 10 and r.scores for r in kept) and "control" in {r.future.name for r in kept}


def test_the_scheduler_keeps_one_machine_local_and_can_be_forced(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with qckpt.Repository.init(path) as repo:
        on_ray = RayRollouts(functools.partial(worker_run, STEPS, "clean", 0), path)
        assert on_ray.nodes() == 1
        cone = _cone(repo, None)
        assert RolloutScheduler(ray=on_ray).choose(cone, 4) == ("sequential", "no BatchedStep describes the step")
        forced = RolloutScheduler(ray=on_ray, strategy="ray")
        rollouts = forced.run(cone, repo.snapshot("main"), FUTURES[:2], 4)
        assert rollouts.strategy == "ray" and all(r.scores for r in rollouts.results)
    with pytest.raises(qckpt.InvalidInputError, match="needs ray="):
        RolloutScheduler(strategy="ray")


def test_bad_settings_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(qckpt.InvalidInputError):
        RayRollouts(functools.partial(worker_run, STEPS, "clean", 0), tmp_path, max_retries=-1)
    with pytest.raises(qckpt.InvalidInputError):
        RayRollouts("not callable", tmp_path)  # type: ignore[arg-type]
