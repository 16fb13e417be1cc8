"""The light cone inside a framework's own training loop, whatever the framework.

A framework callback (``branch.integrations.transformers``, ``.lightning``)
subclasses ``ConeDriver`` and feeds it the framework's events: ``bind`` when a
training call begins, ``step_done`` at each step's resumable moment (it answers
whether the framework should stop), ``run_ended`` at the end. It supplies
``resume`` (one training call of the framework, resuming from a snapshot) and
``skip`` (what skipping batches means to the framework's data position).

``drive`` runs the loop: train until the instability index fires, let the light
cone (``branch.engine``) explore, resume from the join, and so on to the end.
Each future is trained by the framework too (``FrameworkRollouts``): the origin
is restored into the live objects, the intervention applied, that state
committed as the future's first snapshot, and the framework resumes from it.
Used from the training thread only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import torch

import qckpt
from branch.engine import ConeConfig, Evaluate, Future, FutureResult, LightCone, Rollouts, Situation, StepResult
from branch.interventions import Controls, Intervention
from branch.record import ConeRecord
from branch.triggers import InstabilityIndex, Trigger


class SkippedBatches:
    """The data component of a framework run under the light cone: batches an
    intervention skipped, which ``ConeDriver.skip`` hands to the framework's own
    data position. The framework draws its batches itself."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = int(state["skipped"])

    def skip(self, n: int) -> None:
        self.count += n

    def __iter__(self) -> SkippedBatches:
        return self

    def __next__(self) -> NoReturn:
        raise qckpt.InvalidInputError("the framework draws its own batches: drive the light cone through its callback")


@contextmanager
def scoring(module: torch.nn.Module) -> Iterator[None]:
    """Scoring ``module`` without touching the run: eval mode and no gradients inside,
    the process RNG streams (CPU and every CUDA device) as they were afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    training = module.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        module.eval()
        try:
            yield
        finally:
            module.train(training)


def _framework_steps(state: qckpt.TrainingState, batch: object, controls: Controls) -> NoReturn:
    raise qckpt.InvalidInputError("the framework trains the futures itself: drive the light cone through its callback")


@dataclass
class _FutureRun:
    result: FutureResult
    stop_at: int  # the framework's step at which this stretch of the future ends


class ConeDriver:
    """The framework-neutral half of a light-cone callback (module docstring)."""

    def __init__(self, repo: qckpt.Repository, branch: str, run: str | None, config: ConeConfig | None,
                 index: InstabilityIndex | None, interventions: Callable[[Situation], list[Intervention]] | None) -> None:  # fmt: skip
        self.cone_repo, self.cone_branch, self.run_name = repo, branch, run
        self.config, self.index, self.interventions = config or ConeConfig(), index, interventions
        self.cone: LightCone | None = None  # made when training first begins
        self.skipped = SkippedBatches()
        self._future: _FutureRun | None = None  # set while the framework trains a future
        self._trigger: Trigger | None = None  # the event that stopped the run's stretch

    # -- what the framework supplies -------------------------------------------------------
    def resume(self, revision: str | None) -> None:
        """One training call of the framework, resuming from ``revision`` (None: as it stands)."""
        raise NotImplementedError

    def skip(self, live: qckpt.TrainingState, n: int) -> int:
        """Move the data position in ``live`` (restored from an origin) ``n`` batches on;
        returns the framework's step count there."""
        raise NotImplementedError

    def max_steps(self) -> int:
        """The step the run ends at."""
        raise NotImplementedError

    # -- driving ---------------------------------------------------------------------------
    def drive(self, revision: str | None) -> ConeRecord:
        """Train from ``revision`` (None: from scratch) to the end under the light cone."""
        while True:
            self._trigger = None
            self.resume(revision)
            if self.cone is None:
                raise qckpt.InvalidInputError("training never began: is the callback attached to the trainer?")
            if self._trigger is None:
                break
            revision = self.cone.explore(self._trigger, until=self.max_steps()).join.id
        self.cone.record.save(self.cone_repo, f"run {self.cone.run_name} finished at step {self.cone.state.step}")
        return self.cone.record

    def bind(self, live: qckpt.TrainingState, evaluate: Evaluate | None) -> None:
        """A training call began with ``live`` (the framework may have made new objects)."""
        self.skipped.count = 0  # the framework's data position took any skip over
        if self.cone is None:
            self.cone = LightCone(self.cone_repo, live, _framework_steps, self.skipped, evaluate, branch=self.cone_branch,
                                  run=self.run_name, config=self.config, index=self.index,
                                  executor=FrameworkRollouts(self), interventions=self.interventions)  # fmt: skip
        else:
            self.cone.state, self.cone.controls = live, Controls.of(live)
        if self._future is None:
            self.cone.index.total_steps = self.cone.index.total_steps or self.max_steps()

    def clip_limit(self) -> float | None:
        """The gradient-norm limit an intervention set (None: none), applied on top of
        the framework's own clipping."""
        return self.cone.controls.clip_grad_norm if self.cone is not None else None

    def step_done(self, live: qckpt.TrainingState, loss: float, grad_norm: float | None) -> bool:
        """``live`` (its ``step`` the framework's) finished a step with ``loss``; a
        commit of it now resumes exactly. Watches and commits on the run's branch,
        or records and commits a future; True when the framework should stop."""
        cone = self.cone
        assert cone is not None, "bind comes first"
        cone.record.compute["train_steps"] += 1
        if self._future is None:
            trigger = cone.observe(StepResult(loss, grad_norm))
            if trigger is None or (self.config.max_events is not None and len(cone.record.events) >= self.config.max_events):
                return False
            self._trigger = trigger
            return True
        run, result = self._future, self._future.result
        cone.controls.tick(live)
        result.metrics.append([live.step, loss, grad_norm])
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            result.diverged = True
            return True
        if live.step >= run.stop_at:
            return True
        if live.step % self.config.commit_every == 0:
            self.cone_repo.commit(live, branch=result.branch, metrics={"loss": loss})
        return False

    def run_ended(self) -> None:
        """The framework's training call ended; the run's last step is committed."""
        if self._future is None and self._trigger is None and self.cone is not None:
            self.cone.commit()

    def training_branch(self) -> str:
        """The branch being trained now: a future's, or the run's."""
        return self._future.result.branch if self._future is not None else self.cone_branch

    # -- futures -----------------------------------------------------------------------------
    def start_future(self, origin: qckpt.Snapshot, result: FutureResult) -> tuple[str, int]:
        """The origin restored into the live objects, the future's intervention applied,
        committed as the first snapshot of its branch; returns that snapshot and the
        framework's step count there."""
        assert self.cone is not None
        live = self.cone.state
        self.cone_repo.restore(live, origin.id)
        self.skipped.count = 0
        self.cone.intervene(live, result.future)
        step = self.skip(live, self.skipped.count) if self.skipped.count else live.step
        self.skipped.count = 0
        iv = result.future.intervention
        snap = self.cone_repo.commit(live, branch=result.branch,
                                     message=f"future {result.future.name} from step {origin.step}: {iv.label() if iv else 'control'}")  # fmt: skip
        return snap.id, step

    def run_future(self, result: FutureResult, snapshot: str, stop_at: int) -> None:
        """The framework resumes the future from ``snapshot`` and trains to step
        ``stop_at`` (or the run's end, or until it diverges)."""
        self._future = _FutureRun(result, stop_at)
        try:
            self.resume(snapshot)
        finally:
            self._future = None


class FrameworkRollouts:
    """The futures, one after another, each trained by the framework
    (``ConeDriver.run_future``); with pruning, all to the rung first, then the
    survivors on to the horizon."""

    def __init__(self, driver: ConeDriver) -> None:
        self.driver = driver

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        driver, rung = self.driver, cone.rung_steps(horizon)
        results = [cone.new_future(origin, future) for future in futures]  # before any future commits
        for result in results:
            start, step = driver.start_future(origin, result)
            driver.run_future(result, start, step + (rung or horizon))
            (cone.pause_future if rung else cone.finish_future)(result)
        if rung:
            keep = cone.prune(results, origin, horizon)
            for result in results:
                if result.future.name in keep:
                    if not result.diverged:
                        driver.run_future(result, result.snapshot, result.metrics[-1][0] + horizon - rung)
                    cone.finish_future(result)
        return Rollouts(results, "framework", "each future resumed by the framework's own loop, one after another")
