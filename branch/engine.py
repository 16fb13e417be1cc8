"""The light cone: train, commit, watch; on instability roll back, explore futures,
continue along the best one, and record everything in the repository.

Two ways to use it. ``LightCone.run(steps)`` drives the loop: it draws a batch,
calls your ``step_fn(state, batch, controls)``, counts the step and watches.
Or keep your loop and call ``observe(result)`` after each step (with
``state.step`` counting steps completed); when it returns a ``Trigger``, call
``explore(trigger)``: the live state is then the chosen future's, at the step
the futures reached.

What happens on a trigger (see docs/design.md, "Light cone"):

1. the origin is the newest snapshot on the run's branch at least
   ``rollback`` steps before the anomaly began;
2. every future (always a control without intervention, plus the
   interventions) is restored from the origin, changed, trained for
   ``horizon`` steps on its own branch ``<run>.e<event>.<name>`` and
   evaluated on the same held-out batches (``RolloutExecutor``; sequential
   here);
3. ``select`` picks a future only if it beats the control beyond noise;
4. the run's branch joins every future with the chosen one's content (the
   join's parents are the old head and all futures: the DAG is the cone), and
   the live state continues from it;
5. the event, with every future's per-step metrics, scores, intervals and
   forecasts, is written to the run's record (``ConeRecord``).

Not thread-safe: one training loop drives it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import qckpt
from branch._checks import check_int, check_number
from branch.interventions import ClipGrad, Combined, Controls, DampMoments, Intervention, ScaleLR, SkipBatches, Target
from branch.pruning import Pruning, actual
from branch.record import ConeRecord
from branch.selection import Selection, select
from branch.triggers import GradNormZ, InstabilityIndex, Observation, Trigger, forecast


@dataclass(frozen=True)
class StepResult:
    """What one training step reports: its loss and, if measured, the gradient norm."""

    loss: float
    grad_norm: float | None = None


INDEX_KEY = "lightcone.index"  # the instability index's memory, in the extras of the run's commits
StepFn = Callable[[qckpt.TrainingState, Any, Controls], "StepResult | float"]
Evaluate = Callable[[qckpt.TrainingState], Sequence[float]]


@dataclass(frozen=True)
class ConeConfig:
    """How the light cone explores. ``None`` means "scaled to the run":

    * ``rollback`` (steps before the anomaly began): 2% of the run, at least
      ``2 * commit_every`` (PaLM went back about 100 steps in runs of 100k+);
    * ``skip`` (batches a skip intervention drops): the batches between the
      origin and the trigger, the ones that led into the trouble;
    * ``cooldown`` (steps after an event before the next trigger): ``horizon``.

    ``pruning`` (None: every future runs the whole horizon): successive halving
    at a rung of the horizon (``branch.pruning``).
    """

    horizon: int = 50
    rollback: int | None = None
    skip: int | None = None
    commit_every: int = 10
    cooldown: int | None = None
    confidence: float = 0.95
    resamples: int = 2000
    max_events: int | None = None
    seed: int = 0
    pruning: Pruning | None = None

    def __post_init__(self) -> None:  # checked here, not at the first event, after its rollouts ran
        for name in ("horizon", "commit_every", "resamples"):
            check_int(name, getattr(self, name))
        for name in ("rollback", "skip", "cooldown", "max_events"):
            check_int(name, getattr(self, name), 0, optional=True)
        check_number("confidence", self.confidence, 0, 1, high_included=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise qckpt.InvalidInputError(f"seed must be an integer, got {self.seed!r}")
        if self.pruning is not None and not isinstance(self.pruning, Pruning):
            raise qckpt.InvalidInputError(f"pruning must be a Pruning or None, got {self.pruning!r}")


@dataclass(frozen=True)
class Situation:
    """What an event's futures are built from: the trigger's step, the batches
    between the origin and the trigger (``skip``), the run's typical gradient
    norm (None if not measured) and the rollout ``horizon``."""

    step: int
    skip: int
    grad_norm: float | None
    horizon: int


@dataclass(frozen=True)
class Future:
    """One alternative to explore: ``intervention`` None is the control."""

    name: str
    intervention: Intervention | None


@dataclass
class FutureResult:
    """How a future went: its branch, per-step ``[step, loss, grad_norm]``, held-out
    losses at the horizon, last snapshot (``snapshot``), and whether it diverged
    (non-finite loss).

    Futures commit asynchronously (``Repository.commit_async``): the next future
    trains while the writer stores this one. ``committed`` holds the future's last
    commit while it may be in flight; reading ``snapshot`` waits for it (and
    raises its failure)."""

    future: Future
    branch: str
    metrics: list[list[Any]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    committed: qckpt.CommitHandle | str = ""
    diverged: bool = False
    pruned_at: int | None = None  # the step it stopped at when pruning cut it
    rung_forecast: dict[str, Any] = field(default_factory=dict)
    rung_observed: float | None = None  # its loss at the rung (``branch.pruning.at_rung``)

    @property
    def snapshot(self) -> str:
        """The id of the future's last commit ("" before it has one), once it is durable."""
        if isinstance(self.committed, qckpt.CommitHandle):
            self.committed = self.committed.wait().id
        return self.committed

    def as_record(self) -> dict[str, Any]:
        iv = self.future.intervention
        finite = [s for s in self.scores if math.isfinite(s)]
        points = [m for m in self.metrics if m[1] is not None and math.isfinite(m[1])]
        ahead = len(self.metrics)  # where this future's own curve points, one horizon further on
        return {"name": self.future.name, "branch": self.branch, "control": iv is None,
                "intervention": iv.record() if iv is not None else None, "label": iv.label() if iv else "control",
                "metrics": self.metrics, "eval": self.scores,
                "eval_mean": sum(finite) / len(finite) if finite and len(finite) == len(self.scores) else None,
                "snapshot": self.snapshot, "diverged": self.diverged, "pruned_at": self.pruned_at,
                "rung_forecast": self.rung_forecast, "rung_observed": self.rung_observed,
                "rung_actual": actual(self.metrics) if self.rung_forecast and self.pruned_at is None else None,
                "forecast": forecast([m[1] for m in points], [m[0] for m in points], ahead) if not self.diverged else {}}  # fmt: skip


@dataclass(frozen=True)
class Decision:
    """What one light-cone event decided."""

    trigger: Trigger
    origin: qckpt.Snapshot
    results: tuple[FutureResult, ...]
    selection: Selection
    join: qckpt.Snapshot

    @property
    def chosen(self) -> FutureResult:
        return next(r for r in self.results if r.future.name == self.selection.chosen)


@dataclass
class Rollouts:
    """What an executor did: every future's result, in the futures' order, the
    strategy it used and why (both recorded with the event)."""

    results: list[FutureResult]
    strategy: str
    why: str


class RolloutExecutor(Protocol):
    """Runs futures from an origin snapshot and leaves the live state at the end of
    one of them. Each future starts with ``cone.new_future`` (every future's,
    before any commits: it reads the branches, which waits for the commits in
    flight) and ``cone.enter_future`` (or ``cone.start_future``: both) and ends
    with ``cone.finish_future`` (evaluate, commit its branch: in the
    background, see ``FutureResult``). ``SequentialRollouts``
    trains them one after another on the live state; ``branch.rollouts`` fills
    the same interface with batched copies (one or several devices) and a
    scheduler, ``branch.ray_rollouts`` with Ray tasks."""

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts: ...


class SequentialRollouts:
    """Each future in turn on the live state: restore, intervene, train, evaluate.
    With pruning, every future trains to the rung and is committed there, then
    the survivors are restored from their rung commits and trained on."""

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        why = "one future after another on the live state"
        rung = cone.rung_steps(horizon)
        results = [cone.new_future(origin, future) for future in futures]  # before any future commits
        for result in results:
            cone.enter_future(origin, result)
            cone.advance_future(result, rung or horizon)
            (cone.pause_future if rung else cone.finish_future)(result)
        if not rung:
            return Rollouts(results, "sequential", why)
        keep = cone.prune(results, origin, horizon)
        for result in results:
            if result.future.name in keep:
                if not result.diverged:
                    cone.repo.restore(cone.state, result.snapshot)
                    cone.advance_future(result, horizon - rung)
                cone.finish_future(result)
        return Rollouts(results, "sequential", why)


K = TypeVar("K")


class _Holds(Generic[K]):
    """Context managers (``Repository.keep_hot``/``keep_warm``) entered when held and
    exited when let go, by key."""

    def __init__(self) -> None:
        self._held: dict[K, AbstractContextManager[Any]] = {}

    def hold(self, key: K, keep: AbstractContextManager[Any]) -> None:
        """Enter ``keep`` under ``key``, letting go of what was held there."""
        self.let_go(lambda k: k == key)
        keep.__enter__()
        self._held[key] = keep

    def let_go(self, which: Callable[[K], bool] = lambda key: True) -> None:
        """Exit what is held under the keys ``which`` selects (default: all)."""
        for key in [k for k in self._held if which(k)]:
            self._held.pop(key).__exit__(None, None, None)

    def __iter__(self) -> Iterator[K]:
        return iter(self._held)


class _LikelyChoices:
    """Keeps hot (``Repository.keep_hot``), from their commits until the join is
    restored, the horizon snapshots of the futures ``select`` will most likely
    choose: the control's, and that of the alternative with the lowest mean
    held-out loss so far (the one it supersedes is let go). Restoring the join
    then copies the chosen future from memory instead of decoding its commits.
    At most two states of host memory beyond the hot tier's own."""

    def __init__(self, repo: qckpt.Repository) -> None:
        self.repo = repo
        self._held: _Holds[str] = _Holds()
        self._best = math.inf

    def offer(self, result: FutureResult) -> None:
        """Right after ``result``'s horizon commit was submitted (no commit since)."""
        if not isinstance(result.committed, qckpt.CommitHandle):
            return
        key = "control" if result.future.intervention is None else "best"
        if key == "best":
            mean = sum(result.scores) / len(result.scores) if result.scores else math.nan
            if not mean < self._best:  # NaN and diverged (inf) futures are never chosen over a finite one
                return
            self._best = mean
        self._held.hold(key, self.repo.keep_hot(result.committed))

    def release(self) -> None:
        self._held.let_go()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.")[:40] or "future"


class LightCone:
    """Watches one training run on ``branch`` of ``repo`` (see the module docstring).

    ``batches`` is an iterator of batches with ``state_dict``/``load_state_dict``
    that is also a component of ``state`` (so a restore restores the data
    position); ``skip(n)`` and ``reseed(seed)`` are used when present.
    ``evaluate(state)`` returns one loss per held-out batch, the same batches
    every time; without it futures are compared on their last training losses
    (a weaker, unpaired comparison). ``interventions(situation)`` builds the
    futures explored besides the control (default: ``default_futures``).
    """

    def __init__(
        self,
        repo: qckpt.Repository,
        state: qckpt.TrainingState,
        step_fn: StepFn,
        batches: Any,
        evaluate: Evaluate | None = None,
        *,
        branch: str = "main",
        run: str | None = None,
        config: ConeConfig | None = None,
        index: InstabilityIndex | None = None,
        executor: RolloutExecutor | None = None,
        interventions: Callable[[Situation], list[Intervention]] | None = None,
    ) -> None:
        if not (callable(getattr(batches, "state_dict", None)) and callable(getattr(batches, "load_state_dict", None))):
            raise qckpt.InvalidInputError(
                f"the batch source ({type(batches).__name__}) has no state_dict()/load_state_dict(): a rollback "
                "could not restore the data position (use qckpt.ResumableSampler or torchdata's StatefulDataLoader)"
            )
        if not any(component is batches for component in state.components.values()):
            raise qckpt.InvalidInputError("the batch source must be a component of the TrainingState, so restoring "
                                          "a snapshot restores the data position: TrainingState(..., data=batches)")
        if not callable(getattr(batches, "__next__", None)):
            raise qckpt.InvalidInputError(f"the batch source ({type(batches).__name__}) is not an iterator (no __next__)")
        self.repo, self.state, self.step_fn, self.batches, self.evaluate = repo, state, step_fn, batches, evaluate
        self.branch = branch
        self.run_name = run or branch
        self.config = config or ConeConfig()
        self.index = index or InstabilityIndex(cooldown=self.config.cooldown if self.config.cooldown is not None
                                               else self.config.horizon)  # fmt: skip
        self.executor = executor or SequentialRollouts()
        self.interventions = interventions or default_futures
        self.controls = Controls.of(state)
        try:  # a run resumed (after a crash, or in a new process) goes on with its record
            self.record = ConeRecord.load(repo, self.run_name)
            self.record.main = [m for m in self.record.main if m[0] <= state.step]
        except qckpt.RevisionNotFoundError:
            self.record = ConeRecord(self.run_name, branch, {"cone": asdict(self.config)})
        saved = state.extras.get(INDEX_KEY)  # ... and with its detectors' memory, unless they changed
        if isinstance(saved, dict) and saved.get("detectors") == [d.name for d in self.index.detectors]:
            self.index.load_state_dict(saved["state"])
        self._main = self._trajectory()  # (step, snapshot id) on the run's branch, in order: rollback candidates
        self._likely: _LikelyChoices | None = None  # during an event: the futures' snapshots kept hot for the join
        self._origins: _Holds[tuple[int, str]] = _Holds()  # (step, id) of the commits whose warm copies are kept

    def _trajectory(self, limit: int = 256) -> list[tuple[int, str]]:
        """For a state restored from (or committed to) this repository, the run's
        commits leading to it: its first parents, back to the last join of an
        event (whose first parent is the abandoned line) and at most ``limit``;
        empty for a new run."""
        lineage = self.state.lineage
        sid = lineage.resolve()[0] if lineage is not None and lineage.repository_id == self.repo.config.repository_id else None
        line: list[tuple[int, str]] = []
        while sid is not None and len(line) < limit:
            snap = self.repo.snapshot(sid)
            if snap.step is None:
                break
            line.append((snap.step, snap.id))
            sid = snap.parents[0] if len(snap.parents) == 1 else None
        return line[::-1]

    def data_component(self) -> str:
        """The name under which the batch source is a component of the state."""
        return next(name for name, component in self.state.components.items() if component is self.batches)

    # -- the loop ---------------------------------------------------------------------
    def run(self, steps: int) -> ConeRecord:
        """Train until ``state.step == steps``, exploring on every trigger; returns the record."""
        check_int("steps", steps, 0)
        if steps - self.state.step < self.config.horizon:
            raise qckpt.InvalidInputError(
                f"the horizon ({self.config.horizon} steps) is longer than the run ({steps - self.state.step} "
                "steps left): futures could not be told apart; shorten ConeConfig.horizon"
            )
        self.index.total_steps = self.index.total_steps or steps
        self.commit()
        while self.state.step < steps:
            trigger = self.observe(self.train_step(next(self.batches)))
            if trigger is not None and (self.config.max_events is None or len(self.record.events) < self.config.max_events):
                self.explore(trigger, until=steps)
        self.commit()
        self._origins.let_go()
        self.record.save(self.repo, f"run {self.run_name} finished at step {self.state.step}")
        return self.record

    def train_step(self, batch: Any) -> StepResult:
        """One step of the user's ``step_fn`` on the live state; counts it."""
        out = self.step_fn(self.state, batch, self.controls)
        try:
            result = out if isinstance(out, StepResult) else StepResult(float(out))
            result = StepResult(float(result.loss), None if result.grad_norm is None else float(result.grad_norm))
        except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a tensor of more than one element
            raise qckpt.InvalidInputError(f"step_fn must return the loss (a number or one-element tensor) or a StepResult, "
                                          f"got {type(out).__name__}: {e}") from e  # fmt: skip
        self.state.step += 1
        self.record.compute["train_steps"] += 1
        return result

    def observe(self, result: StepResult) -> Trigger | None:
        """Record a finished step (``state.step`` already counts it), advance the
        controls (``Controls.tick``), commit on the cadence, and return a
        ``Trigger`` if the run turned unstable."""
        self.record.main.append([self.state.step, result.loss, result.grad_norm])
        self.controls.tick(self.state)
        trigger = self.index.observe(Observation(self.state.step, result.loss, result.grad_norm))
        if not self._main or self.state.step % self.config.commit_every == 0:
            self.commit()  # with the index's memory of this step
        return trigger

    def commit(self) -> None:
        """Commit the live state on the run's branch now (at most once per step).
        ``run`` and ``observe`` do it every ``commit_every`` steps, and ``observe``
        on its first call, so a rollback always has an origin. The instability
        index's memory rides along in the extras: a run resumed from the commit
        (a ``LightCone`` built on the restored state) watches on with it instead
        of warming its detectors up again."""
        if self._main and self._main[-1][0] == self.state.step:
            return
        last = self.record.main[-1][1] if self.record.main else None
        metrics = {"loss": last} if last is not None and math.isfinite(last) else {}
        self.state.extras[INDEX_KEY] = {"detectors": [d.name for d in self.index.detectors], "state": self.index.state_dict()}
        snap = self.repo.commit(self.state, branch=self.branch, metrics=metrics)
        self._main.append((self.state.step, snap.id))
        self._keep_origin_candidates(snap)

    def _keep_origin_candidates(self, snap: qckpt.Snapshot) -> None:
        """Keep the warm copy of every commit on the run's branch that a later event
        could roll back to (``Repository.keep_warm``): the newest commit at or
        before ``rollback`` steps ahead of where an anomaly can have begun (where
        the instability index has been elevated since, else now), and every later
        one; the older ones are let go. An event's origin then restores from its
        warm copy instead of decoding its chain. Costs at most ``rollback /
        commit_every + 1`` raw states of disk (more while the index stays
        elevated); on a backend where heads get copies less often (S3: once a
        minute), only those."""
        self._origins.hold((snap.step or 0, snap.id), self.repo.keep_warm(snap))
        began = self.index.elevated_since if self.index.elevated_since is not None else self.state.step
        target = began - self._rollback_steps()
        newest_before = max((step for step, _ in self._origins if step <= target), default=None)
        if newest_before is not None:
            self._origins.let_go(lambda kept: kept[0] < newest_before)

    def _rollback_steps(self) -> int:
        """How far before the anomaly's beginning an event rolls back (``ConeConfig.rollback``)."""
        if self.config.rollback is not None:
            return self.config.rollback
        return max(2 * self.config.commit_every, round(0.02 * (self.index.total_steps or self.state.step)))

    # -- one event ----------------------------------------------------------------------
    def origin_for(self, trigger: Trigger) -> qckpt.Snapshot:
        """The newest snapshot on the run's branch at least ``rollback`` steps before the anomaly began."""
        target = trigger.began - self._rollback_steps()
        candidates = [sid for step, sid in self._main if step <= target] or [self._main[0][1]]
        return self.repo.snapshot(candidates[-1])

    def roll_back(self, origin: qckpt.Snapshot) -> None:
        """The manual recipe without exploring: move the run's branch back to ``origin``
        (``reset``: recorded in the ref log, the abandoned steps stay recoverable) and
        continue the live state from there."""
        self.repo.flush()
        self.repo.reset(self.branch, origin.id)
        self._continue_from(origin)

    def _continue_from(self, snapshot: qckpt.Snapshot) -> None:
        """The live state restored from ``snapshot`` on the run's branch, and the run's
        path cut back to it."""
        self.repo.restore(self.state, snapshot.id)
        self.controls = Controls.of(self.state)
        self._main = [(step, sid) for step, sid in self._main if step <= (snapshot.step or 0)]
        self._origins.let_go(lambda kept: kept[0] > (snapshot.step or 0))  # abandoned: no event rolls back onto them
        self.record.main = [m for m in self.record.main if m[0] <= (snapshot.step or 0)]

    def explore(self, trigger: Trigger, until: int | None = None) -> Decision:
        """Roll back, run every future, choose, join, continue from the choice (see the
        module docstring). With ``until`` (the run's last step), futures stop there
        if the horizon would overshoot it."""
        self.repo.flush()
        origin = self.origin_for(trigger)
        horizon = self.config.horizon if until is None else max(1, min(self.config.horizon, until - (origin.step or 0)))
        number = len(self.record.events) + 1
        skip = self.config.skip if self.config.skip is not None else max(1, trigger.step - (origin.step or 0))
        typical = next((d.typical for d in self.index.detectors if isinstance(d, GradNormZ)), None)
        chosen_interventions = self.interventions(Situation(trigger.step, skip, typical, horizon))
        wrong = [iv for iv in chosen_interventions if not isinstance(iv, Intervention)]
        if wrong:
            raise qckpt.InvalidInputError(f"{wrong[0]!r} is not an Intervention (see branch.interventions)")
        futures = [Future("control", None)] + [
            Future(f"f{i}-{_slug(iv.slug())}", iv) for i, iv in enumerate(chosen_interventions, start=1)
        ]
        abandoned = [m for m in self.record.main if m[0] > (origin.step or 0)]
        head = self.repo.snapshot(self.branch)
        # the origin stays hot until the join is restored: the chosen future's chain, read from the packs, stops there;
        # the likely choices' own snapshots stay hot too: that restore is then a memory copy
        with self.repo.keep_hot(origin.id), self._holding_likely_choices():
            try:
                rollouts = self.run_futures(origin, futures, horizon)
            except BaseException as e:  # the live state holds some future's: put the run back where its branch is
                self._after_failed_event(e, number, head)
                raise
            results = rollouts.results
            selection = select({r.future.name: r.scores for r in results if r.pruned_at is None}, "control",
                               confidence=self.config.confidence, resamples=self.config.resamples,
                               seed=self.config.seed + number, candidates=len(results) - 1)  # fmt: skip
            chosen = next(r for r in results if r.future.name == selection.chosen)
            join = self.repo.join(self.branch, [r.branch for r in results],
                                  metric=lambda s: 0.0 if s.id == chosen.snapshot else 1.0,
                                  message=f"light cone event {number}: continue along {chosen.future.name}")  # fmt: skip
            self.repo.restore(self.state, join.id)
        self.controls = Controls.of(self.state)
        # the run's trajectory is now the origin's past, the chosen future's commits and the join: a later
        # event rolls back along it, never onto the abandoned steps
        start = origin.step or 0
        chosen_line = sorted((s.step, s.id) for s in self.repo.log(chosen.branch, limit=horizon + 4)  # its commits come first
                             if s.step is not None and start < s.step < self.state.step)  # fmt: skip
        self._main = [(step, sid) for step, sid in self._main if step <= start] + chosen_line + [(self.state.step, join.id)]
        self._origins.let_go(lambda kept: kept[0] > start)  # the abandoned line's
        self.record.main = [m for m in self.record.main if m[0] <= (origin.step or 0)] + chosen.metrics
        history = [m for m in self.record.main if m[1] is not None and math.isfinite(m[1])][-64:]
        self.record.events.append({
            "number": number, "trigger": trigger.as_record(), "origin": {"snapshot": origin.id, "step": origin.step},
            "abandoned": abandoned, "futures": [r.as_record() for r in results],
            "selection": {"chosen": selection.chosen, "control": selection.control,
                          "comparisons": [asdict(c) for c in selection.comparisons]},
            "join": join.id, "horizon": horizon, "skip": skip,
            "rollouts": {"strategy": rollouts.strategy, "why": rollouts.why},
            "forecast_after": forecast([m[1] for m in history], [m[0] for m in history], self.config.horizon),
        })  # fmt: skip
        self.record.save(self.repo, f"light cone event {number} at step {trigger.step}: {selection.chosen}")
        return Decision(trigger, origin, tuple(results), selection, join)

    @contextmanager
    def _holding_likely_choices(self) -> Iterator[None]:
        """While the block runs, ``finish_future`` offers each future to a ``_LikelyChoices``."""
        self._likely = _LikelyChoices(self.repo)
        try:
            yield
        finally:
            likely, self._likely = self._likely, None
            likely.release()

    def run_futures(self, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        """``futures`` from ``origin`` with the cone's executor, the origin kept in the
        repository's hot tier meanwhile (``Repository.keep_hot``: each future restores
        it while the futures commit). The live state is left at some future's end."""
        with self.repo.keep_hot(origin.id):
            rollouts = self.executor.run(self, origin, futures, horizon)
            for result in rollouts.results:
                _ = result.snapshot  # every future's commits durable (a failure raised here), the origin still kept
        return rollouts

    def _after_failed_event(self, error: BaseException, number: int, head: qckpt.Snapshot) -> None:
        """Restore the run's branch head into the live state after rollouts failed (a
        step or evaluation function raised, a Ray task gave up...), so that a caller
        who goes on trains the main line, not a future's remains; nothing was joined
        and the futures' branches stay as far as they got. Says so on ``error``. A
        future's commit that failed in the background meanwhile (a full disk) is
        noted on ``error`` too; it does not stop the way back."""
        try:
            self.repo.flush()  # raises such a failure once, before the restore would
        except Exception as pending:
            error.add_note(f"light cone event {number}: a future's commit failed in the background as well: {pending!r}")
        try:
            self._continue_from(head)
        except Exception as again:
            error.add_note(f"light cone event {number} failed during its rollouts, and restoring {self.branch}'s head "
                           f"{head.short_id} failed too ({again!r}): the live state is a future's, not the run's")  # fmt: skip
            return
        error.add_note(f"light cone event {number} failed during its rollouts: nothing was joined; the live state is "
                       f"{self.branch}'s head again ({head.short_id}, step {head.step})")  # fmt: skip

    def advance_future(self, result: FutureResult, steps: int) -> None:
        """Train the live state (at the future's current step) ``steps`` steps on the
        future's branch, committing every ``commit_every``; stops if it diverges."""
        for _ in range(steps):
            step = self.train_step(next(self.batches))
            self.controls.tick(self.state)
            result.metrics.append([self.state.step, step.loss, step.grad_norm])
            if not math.isfinite(step.loss):
                result.diverged = True
                break
            if self.state.step % self.config.commit_every == 0:
                result.committed = self.repo.commit_async(self.state, branch=result.branch, metrics={"loss": step.loss},
                                                          warm=False)  # fmt: skip

    def rung_steps(self, horizon: int) -> int:
        """Steps every future trains before pruning cuts (0: no pruning at this horizon)."""
        return self.config.pruning.rung_steps(horizon) if self.config.pruning is not None else 0

    def pause_future(self, result: FutureResult) -> None:
        """Commit the live state (a future at the rung) on its branch; ``result.snapshot``
        is where it resumes from, or where its branch ends if pruning cuts it."""
        last = result.metrics[-1][1] if result.metrics else math.nan
        result.committed = self.repo.commit_async(self.state, branch=result.branch,
                                                  metrics={"loss": last} if math.isfinite(last) else {},
                                                  message=f"future {result.future.name} at the rung", warm=False)  # fmt: skip

    def prune(self, results: Sequence[FutureResult], origin: qckpt.Snapshot, horizon: int) -> set[str]:
        """Rank every future from its prefix (``branch.pruning``), record its
        forecast and observed loss, mark the cut futures (``pruned_at``); returns
        the names going on."""
        assert self.config.pruning is not None
        start = origin.step or 0
        prefixes = {r.future.name: None if r.diverged else r.metrics for r in results}
        keep, forecasts, observed = self.config.pruning.decide(self.record.main, start, horizon, prefixes, self.record.events)
        for r in results:
            r.rung_forecast, r.rung_observed = forecasts[r.future.name], observed[r.future.name]
            if r.future.name not in keep:
                r.pruned_at = r.metrics[-1][0] if r.metrics else start
        return keep

    def future_branch(self, future: Future) -> str:
        """The branch of ``future`` in the event being explored: ``<run>.e<event>.<name>``."""
        return f"{self.run_name}.e{len(self.record.events) + 1}.{future.name}"

    def start_future(self, origin: qckpt.Snapshot, future: Future, branch: str | None = None) -> FutureResult:
        """The live state restored from ``origin`` with the future's intervention applied
        (and its controls stored); returns the future's empty result, on ``branch``
        (default ``future_branch``). A branch left by an attempt that did not
        finish (a crash, a retried task) is reset to the origin."""
        result = self.new_future(origin, future, branch)
        self.enter_future(origin, result)
        return result

    def enter_future(self, origin: qckpt.Snapshot, result: FutureResult) -> None:
        """The live state restored from ``origin`` (from the hot tier, without waiting
        for the commits in flight: a ``Snapshot`` names itself) with ``result``'s
        intervention applied and its controls stored."""
        self.repo.restore(self.state, origin)
        self.controls = self.intervene(self.state, result.future)

    def new_future(self, origin: qckpt.Snapshot, future: Future, branch: str | None = None) -> FutureResult:
        """The future's empty result on ``branch`` (default ``future_branch``); a branch
        left by an attempt that did not finish (a crash, a retried task) is reset
        to the origin."""
        result = FutureResult(future, branch or self.future_branch(future))
        if result.branch in self.repo.branches():
            self.repo.reset(result.branch, origin.id)
        return result

    def intervene(self, state: qckpt.TrainingState, future: Future) -> Controls:
        """Apply the future's intervention to ``state`` (the live state or a fork of it,
        with its own batch source) and store the controls in it; returns them."""
        controls = Controls.of(state)
        if future.intervention is not None:
            future.intervention.apply(Target(state, state.components[self.data_component()], controls))
        controls.save(state)
        return controls

    def finish_future(self, result: FutureResult) -> FutureResult:
        """With the live state at the future's end (and ``result.metrics`` filled):
        evaluate it and commit it on the future's branch."""
        self.controls = Controls.of(self.state)
        result.scores = self._scores(result)
        last = result.metrics[-1][1] if result.metrics else math.nan
        finite = [s for s in result.scores if math.isfinite(s)]
        metrics = {"loss": last} if math.isfinite(last) else {}
        if finite and len(finite) == len(result.scores):
            metrics["eval_loss"] = sum(finite) / len(finite)
        result.committed = self.repo.commit_async(self.state, branch=result.branch, metrics=metrics,
                                                  message=f"future {result.future.name} at the horizon", warm=False)  # fmt: skip
        if self._likely is not None:
            self._likely.offer(result)
        return result

    def _scores(self, result: FutureResult) -> list[float]:
        if self.evaluate is not None:
            scores = per_batch_losses(self.evaluate(self.state))
            self.record.compute["eval_batches"] += len(scores)
            return scores
        window = min(8, self.config.horizon)  # without an evaluation: the last training losses, padded if it diverged
        losses = [m[1] for m in result.metrics][-window:]
        return losses + [math.inf] * (window - len(losses))


def per_batch_losses(values: Any) -> list[float]:
    """What ``evaluate`` returned, as one float per held-out batch (at least one);
    ``InvalidInputError`` for anything else (a single number cannot be bootstrapped)."""
    try:
        losses = [float(x) for x in values]
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: iterating a 0-d tensor
        raise qckpt.InvalidInputError(f"evaluate must return one loss per held-out batch (a sequence of numbers), "
                                      f"got {type(values).__name__}: {e}") from e  # fmt: skip
    if not losses:
        raise qckpt.InvalidInputError("evaluate returned no losses: it must score at least one held-out batch")
    return losses


def default_futures(situation: Situation) -> list[Intervention]:
    """The futures explored besides the control, from published practice: PaLM's and
    OPT's recipe (roll back, skip the batches that led into the spike); a lower
    learning rate (OPT and BLOOM lowered it after divergences); both; and reset
    optimizer moments with clipping at the run's typical gradient norm (the
    moments carry a spike forward; ZClip clips relative to the running mean).

    The lower learning rate is halved and warmed back to the schedule over the
    first half of the horizon: judged at the horizon, a permanently lower rate
    wins on its short-term annealing gain (a lower noise floor) and loses later,
    so the futures are compared after the rate is back."""
    skip, grad_norm = situation.skip, situation.grad_norm
    lower = ScaleLR(0.5, warmback=max(1, situation.horizon // 2))
    futures: list[Intervention] = [SkipBatches(skip), lower, Combined((SkipBatches(skip), lower))]
    if grad_norm is not None and math.isfinite(grad_norm) and grad_norm > 0:
        futures.append(Combined((DampMoments(0.0), ClipGrad(float(grad_norm)))))
    else:
        futures.append(DampMoments(0.0))
    return futures
