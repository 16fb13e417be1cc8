"""Rollouts on a Ray cluster (the optional extra ``qckpt[ray]``).

Each future is one Ray task. The task builds the run in its worker with your
``make_run()`` (model, optimizer, scheduler, batch source, step and evaluation
functions: the same ones the driver uses), opens the shared repository (S3, or
a filesystem every worker sees), restores the origin, intervenes, trains,
evaluates, commits the future's branch and returns its result; the driver then
chooses and joins as usual. With pruning, every task stops at the rung and
commits there; the survivors' second tasks restore from those commits.

Failures are never dropped: a task whose worker dies is retried by Ray
(``max_retries``; a retry resets the future's branch to the origin and starts
over), and a task that still fails, or raises, fails the event with a
``qckpt.RolloutError`` naming the future, the cause chained.

Tasks use the driver's intra-op thread count (Ray would give them one thread
per CPU requested): on the same kind of CPU a future's bits equal a
sequential rollout's (tested); on other hardware they may differ by
floating-point reassociation.

Ray must be initialised by the caller (``ray.init(...)``, a cluster address);
otherwise Ray starts a local instance on first use, as it always does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import qckpt
from branch._checks import check_int
from branch.engine import ConeConfig, Evaluate, Future, FutureResult, LightCone, Rollouts, StepFn


@dataclass
class RunParts:
    """What ``make_run()`` returns in a worker: a fresh run of the same shape as the
    driver's (its contents are replaced by the restored origin)."""

    state: qckpt.TrainingState
    step_fn: StepFn
    batches: Any
    evaluate: Evaluate | None = None


@dataclass(frozen=True)
class _Task:
    """One task's orders: which future, from where, how far, and how it ends."""

    location: str
    endpoint_url: str | None
    branch: str
    run: str
    config: ConeConfig
    origin: str
    steps: int
    finish: bool
    threads: int


def _train(make_run: Callable[[], RunParts], task: _Task, result: FutureResult) -> tuple[FutureResult, dict[str, int]]:
    """In a worker: build the run, train ``result``'s future ``task.steps`` steps from
    the origin (no metrics yet) or from its rung commit, then finish or pause it."""
    torch.set_num_threads(task.threads)  # Ray sets one thread per CPU asked for; the driver's count gives its bits
    parts = make_run()
    with qckpt.Repository.open(task.location, endpoint_url=task.endpoint_url) as repo:
        cone = LightCone(repo, parts.state, parts.step_fn, parts.batches, parts.evaluate, branch=task.branch,
                         run=task.run, config=task.config)  # fmt: skip
        counts = dict(cone.record.compute)
        if not result.metrics:
            result = cone.start_future(repo.snapshot(task.origin), result.future, result.branch)
        else:  # the second half: from the rung commit (a retried task's partial commits are undone)
            if repo.snapshot(result.branch).id != result.snapshot:
                repo.reset(result.branch, result.snapshot)
            repo.restore(parts.state, result.snapshot)
        cone.advance_future(result, task.steps)
        (cone.finish_future if task.finish else cone.pause_future)(result)
        _ = result.snapshot  # its commits durable before the result leaves (a commit in flight cannot be sent)
        return result, {k: cone.record.compute[k] - counts[k] for k in counts}


class RayRollouts:
    """A ``RolloutExecutor`` that runs every future as a Ray task (see the module docstring).

    ``make_run`` must be importable by the workers (a module-level function);
    ``location`` (and ``endpoint_url``) name the repository the driver uses, as
    ``Repository.open`` takes them. ``num_cpus``/``num_gpus``: each task's
    resource request.
    """

    def __init__(self, make_run: Callable[[], RunParts], location: str | os.PathLike[str], *,
                 endpoint_url: str | None = None, max_retries: int = 2, num_cpus: float = 1,
                 num_gpus: float = 0) -> None:  # fmt: skip
        try:
            import ray
        except ImportError as e:
            raise qckpt.InvalidInputError("RayRollouts needs the ray package: pip install 'qckpt[ray]'") from e
        if not callable(make_run):
            raise qckpt.InvalidInputError(f"make_run must be callable, got {make_run!r}")
        check_int("max_retries", max_retries, 0)
        self.make_run, self.location, self.endpoint_url = make_run, os.fspath(location), endpoint_url
        self.max_retries = max_retries
        self._remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(_train)

    def nodes(self) -> int:
        """Live nodes in the Ray cluster this process is connected to (0 if none)."""
        import ray

        return sum(1 for node in ray.nodes() if node.get("Alive")) if ray.is_initialized() else 0

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        cone.repo.flush()  # the workers must see the origin
        rung = cone.rung_steps(horizon)
        results = self._dispatch(cone, origin, [FutureResult(f, cone.future_branch(f)) for f in futures],
                                 rung or horizon, finish=not rung)  # fmt: skip
        if rung:
            cone.prune(results, origin, horizon)
            going = [i for i, r in enumerate(results) if r.pruned_at is None]
            trained = self._dispatch(cone, origin, [results[i] for i in going], horizon - rung, finish=True)
            for i, result in zip(going, trained):
                results[i] = result
        return Rollouts(results, "ray", f"{len(futures)} futures as Ray tasks (up to {self.max_retries} retries each)")

    def _dispatch(self, cone: LightCone, origin: qckpt.Snapshot, results: list[FutureResult], steps: int,
                  *, finish: bool) -> list[FutureResult]:  # fmt: skip
        import ray

        tasks = []
        for result in results:
            task = _Task(self.location, self.endpoint_url, cone.branch, cone.run_name, cone.config, origin.id,
                         steps if not result.diverged else 0, finish, torch.get_num_threads())  # fmt: skip
            tasks.append(self._remote.remote(self.make_run, task, result))
        done = []
        for result, ref in zip(results, tasks):
            try:
                trained, counts = ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e  # a task's own exception, or Ray's (a worker lost for good)
                raise qckpt.RolloutError(f"future {result.future.name} failed on Ray: {type(cause).__name__}: {cause}") from e
            for key, value in counts.items():
                cone.record.compute[key] += value
            done.append(trained)
        return done
