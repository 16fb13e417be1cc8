"""The light cone in the Hugging Face ``Trainer``: one callback, and one call in place
of ``trainer.train()``.

    cone = LightConeCallback("runs/qckpt", config=ConeConfig(horizon=50))
    args = TrainingArguments(..., logging_steps=1, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=held_out, callbacks=[cone])
    record = cone.train(trainer)  # resumes the run's branch if it exists

**Watching.** The Trainer logs every step's loss and gradient norm
(``logging_steps=1`` is required); each goes to the instability index, and the
run is committed on ``branch`` every ``commit_every`` steps, at the moment a
``QckptCallback`` commits (after the step's logging and evaluation: a commit
resumes exactly).

**An event.** When the index fires, the Trainer stops and the light cone
(``branch.engine``) takes over: the origin, the futures, the selection, the join
and the record are its own. Each future is run **by the Trainer itself**: the
origin is restored, the future's intervention applied, and that state committed
as the first snapshot of the future's branch; the Trainer then resumes from it
through its own resume path (weights, optimizer, scheduler, RNG, data position)
and trains ``horizon`` steps, committed on the future's branch. So the control
future *is* the run continued from the origin, bit for bit. A future is scored
on the first ``eval_batches`` batches of the Trainer's evaluation set (the RNG
streams forked, so scoring draws nothing from the run's); without an
``eval_dataset``, on its last training losses. The run then resumes from the
join, as from a checkpoint, and trains on to ``max_steps``.

In the Trainer's terms:

* ``SkipBatches(n)`` advances the Trainer's step counter by ``n``: the Trainer's
  data position *is* its global step, so skipped batches count as steps and the
  run ends ``n`` optimizer steps sooner. ``ReseedData`` is not available (the
  Trainer's data order is its seed's).
* ``ClipGrad`` clips after the Trainer's own ``max_grad_norm`` clipping (the
  lower limit wins); ``ScaleLR``'s warm-back moves after each scheduler step.
* The Trainer logs a non-finite loss as the running mean unless
  ``logging_nan_inf_filter=False``; a non-finite gradient norm is seen either way.
* Futures do not run the Trainer's periodic saving; its logging and evaluation
  run in them as in the run itself.

Cost: every future is one ``Trainer.train`` call resuming from a checkpoint
folder written from the repository (the state is written and read once per
future, besides the commits). Single process only, like ``QckptCallback``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import qckpt
from branch.engine import ConeConfig, Future, FutureResult, LightCone, Rollouts, Situation, StepResult
from branch.interventions import Controls, Intervention
from branch.record import ConeRecord
from branch.triggers import InstabilityIndex, Trigger
from qckpt.integrations.transformers import QckptCallback

_TRAINER_STATE = "trainer_state"  # where QckptCallback keeps trainer_state.json in a snapshot's extras


class _TrainerData:
    """The Trainer's data position as the light cone sees it: batches skipped by an
    intervention, which the Trainer's step counter takes over when it resumes.
    The Trainer draws its batches itself."""

    def __init__(self) -> None:
        self.skipped = 0

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state["skipped"])

    def skip(self, n: int) -> None:
        self.skipped += n

    def __iter__(self) -> _TrainerData:
        return self

    def __next__(self) -> NoReturn:
        raise qckpt.InvalidInputError("the Trainer draws its own batches: run the light cone with cone.train(trainer)")


def _trainer_steps(state: qckpt.TrainingState, batch: Any, controls: Controls) -> NoReturn:
    raise qckpt.InvalidInputError("the Trainer trains the futures itself: run the light cone with cone.train(trainer)")


@dataclass
class _FutureRun:
    result: FutureResult
    stop_at: int  # the Trainer's global step at which this stretch of the future ends


class LightConeCallback(QckptCallback):
    """Runs a Hugging Face ``Trainer`` under the light cone (see the module docstring):
    pass it in ``callbacks`` and call ``train(trainer)``. ``config``, ``index``,
    ``interventions`` and ``run`` are ``LightCone``'s; ``eval_batches`` bounds the
    held-out batches each future is scored on. Used from the training thread only."""

    def __init__(
        self,
        repository: qckpt.Repository | str | os.PathLike[str],
        *,
        branch: str = "main",
        run: str | None = None,
        config: ConeConfig | None = None,
        index: InstabilityIndex | None = None,
        interventions: Callable[[Situation], list[Intervention]] | None = None,
        eval_batches: int = 8,
        scaler: qckpt.Stateful | None = None,
    ) -> None:
        super().__init__(repository, branch=branch, every=1, scaler=scaler)
        if isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 1:
            raise qckpt.InvalidInputError(f"eval_batches must be a positive integer, got {eval_batches!r}")
        self.run_name, self.config, self.index, self.interventions = run, config or ConeConfig(), index, interventions
        self.eval_batches = eval_batches
        self.cone: LightCone | None = None  # made when training first begins
        self._trainer: Trainer | None = None
        self._data = _TrainerData()
        self._future: _FutureRun | None = None  # set while the Trainer runs a future
        self._trigger: Trigger | None = None  # the event that stopped the run's stretch
        self._logged: tuple[float, float | None] | None = None  # this step's loss and gradient norm

    # -- driving ---------------------------------------------------------------------
    def train(self, trainer: Trainer, *, resume: bool = True) -> ConeRecord:
        """Train to the Trainer's ``max_steps`` under the light cone; returns the run's
        record. With ``resume``, a run whose branch exists continues from its head."""
        if self not in trainer.callback_handler.callbacks:
            raise qckpt.InvalidInputError("pass the callback to the Trainer: Trainer(..., callbacks=[cone])")
        args = trainer.args
        if args.logging_strategy != "steps" or args.logging_steps != 1:
            raise qckpt.InvalidInputError("the light cone watches every step's loss and gradient norm, which the Trainer "
                                          "logs: set TrainingArguments(logging_steps=1)")  # fmt: skip
        self._trainer = trainer
        folder = self.checkpoint(missing_ok=True) if resume else None
        while True:
            self._trigger = None
            trainer.train(resume_from_checkpoint=folder)
            assert self.cone is not None, "training began"
            if self._trigger is None:
                break
            decision = self.cone.explore(self._trigger, until=trainer.state.max_steps)
            folder = self.checkpoint(decision.join.id)
        self.cone.record.save(self.repo, f"run {self.cone.run_name} finished at step {trainer.state.global_step}")
        return self.cone.record

    # -- QckptCallback's points ----------------------------------------------------------
    def components(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**super().components(kwargs), "data": self._data}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._trainer is None:
            raise qckpt.InvalidInputError("a LightConeCallback trains through cone.train(trainer), not trainer.train()")
        super().on_train_begin(args, state, control, **kwargs)
        assert self.live is not None
        self._data.skipped = 0  # the Trainer's step counter took any skip over
        if self.cone is None:
            evaluate = self._evaluate if self._trainer.eval_dataset is not None else None
            self.cone = LightCone(self.repo, self.live, _trainer_steps, self._data, evaluate, branch=self.branch,
                                  run=self.run_name, config=self.config, index=self.index,
                                  executor=_TrainerRollouts(self), interventions=self.interventions)  # fmt: skip
        else:  # the Trainer made new objects for this call (its scheduler at least)
            self.cone.state, self.cone.controls = self.live, Controls.of(self.live)
        if self._future is None:
            self.cone.index.total_steps = self.cone.index.total_steps or state.max_steps

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if "loss" in logs:
            norm = logs.get("grad_norm")
            self._logged = (float(logs["loss"]), None if norm is None else float(norm))
        super().on_log(args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:  # fmt: skip
        limit = self.cone.controls.clip_grad_norm if self.cone is not None else None
        if limit is not None:  # an intervention's clipping, after the Trainer's own
            torch.nn.utils.clip_grad_norm_([p for p in kwargs["model"].parameters() if p.grad is not None], limit)

    def commit_point(self, state: TrainerState, control: TrainerControl, metrics: dict[str, Any]) -> None:
        assert self.cone is not None
        live, cone = self.capture(state, control), self.cone
        loss, norm = self._logged or (math.nan, None)
        self._logged = None
        cone.record.compute["train_steps"] += 1
        if self._future is None:
            trigger = cone.observe(StepResult(loss, norm))
            if trigger is not None and (self.config.max_events is None or len(cone.record.events) < self.config.max_events):
                self._trigger = trigger
                control.should_training_stop = True
            return
        run, result = self._future, self._future.result
        cone.controls.tick(live)
        result.metrics.append([state.global_step, loss, norm])
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            result.diverged = True
            control.should_training_stop = True
        elif state.global_step >= run.stop_at:
            control.should_training_stop = True
        elif state.global_step % self.config.commit_every == 0:
            self.repo.commit(live, branch=result.branch, metrics={"loss": loss})

    def train_ended(self, state: TrainerState, control: TrainerControl) -> None:
        if self._future is None and self._trigger is None and self.cone is not None:
            self.capture(state, control)
            self.cone.commit()  # the run's last step

    # -- futures -----------------------------------------------------------------------
    def start_future(self, origin: qckpt.Snapshot, result: FutureResult) -> tuple[str, int]:
        """The origin restored into the live objects, the future's intervention applied,
        committed as the first snapshot of its branch; returns that snapshot and the
        Trainer's global step there (the origin's, plus any batches skipped)."""
        assert self.cone is not None and self.live is not None
        cone = self.cone
        self.repo.restore(self.live, origin.id)
        self._data.skipped = 0
        cone.intervene(self.live, result.future)
        fields = json.loads(self.live.extras[_TRAINER_STATE])
        fields["global_step"] += self._data.skipped
        self.live.extras[_TRAINER_STATE] = json.dumps(fields, indent=2, sort_keys=True) + "\n"
        iv = result.future.intervention
        snap = self.repo.commit(self.live, branch=result.branch,
                                message=f"future {result.future.name} from step {origin.step}: {iv.label() if iv else 'control'}")  # fmt: skip
        return snap.id, fields["global_step"]

    def run_future(self, result: FutureResult, snapshot: str, stop_at: int) -> None:
        """The Trainer resumes the future from ``snapshot`` and trains to global step
        ``stop_at`` (or the run's end, or until it diverges)."""
        assert self._trainer is not None
        self._future = _FutureRun(result, stop_at)
        try:
            self._trainer.train(resume_from_checkpoint=self.checkpoint(snapshot))
        finally:
            self._future = None

    def _evaluate(self, state: qckpt.TrainingState) -> list[float]:
        """One loss per batch of the first ``eval_batches`` of the evaluation set, the
        same batches every time; the process RNG streams are left as they were."""
        assert self._trainer is not None
        trainer, model = self._trainer, self._trainer.model
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        losses: list[float] = []
        training = model.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            try:
                for i, inputs in enumerate(trainer.get_eval_dataloader()):
                    if i == self.eval_batches:
                        break
                    loss, _, _ = trainer.prediction_step(model, inputs, prediction_loss_only=True)
                    if loss is None:
                        raise qckpt.InvalidInputError("the evaluation set gives the model no loss to score futures on "
                                                      "(no labels?)")  # fmt: skip
                    losses.append(float(loss))
            finally:
                model.train(training)
        return losses


class _TrainerRollouts:
    """The futures, one after another, each trained by the Trainer (``run_future``);
    with pruning, all to the rung first, then the survivors on to the horizon."""

    def __init__(self, callback: LightConeCallback) -> None:
        self.callback = callback

    def run(self, cone: LightCone, origin: qckpt.Snapshot, futures: Sequence[Future], horizon: int) -> Rollouts:
        callback, rung = self.callback, cone.rung_steps(horizon)
        results = []
        for future in futures:
            result = cone.new_future(origin, future)
            start, step = callback.start_future(origin, result)
            callback.run_future(result, start, step + (rung or horizon))
            if rung:
                cone.pause_future(result)
            else:
                cone.finish_future(result)
            results.append(result)
        if rung:
            keep = cone.prune(results, origin, horizon)
            for result in results:
                if result.future.name in keep:
                    if not result.diverged:
                        callback.run_future(result, result.snapshot, result.metrics[-1][0] + horizon - rung)
                    cone.finish_future(result)
        return Rollouts(results, "trainer", "each future resumed by the Trainer's own loop, one after another")


__all__ = ["LightConeCallback"]
