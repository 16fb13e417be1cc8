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

The driving and the futures are ``branch.integrations._driver``'s, shared with
Lightning. In the Trainer's terms:

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

import os
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import qckpt
from branch.engine import ConeConfig, Situation
from branch.integrations._driver import ConeDriver, scoring
from branch.interventions import Intervention
from branch.record import ConeRecord
from branch.triggers import InstabilityIndex
from qckpt.integrations.transformers import QckptCallback



class LightConeCallback(QckptCallback, ConeDriver):
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
        QckptCallback.__init__(self, repository, branch=branch, every=1, scaler=scaler)
        ConeDriver.__init__(self, self.repo, branch, run, config, index, interventions)
        if isinstance(eval_batches, bool) or not isinstance(eval_batches, int) or eval_batches < 1:
            raise qckpt.InvalidInputError(f"eval_batches must be a positive integer, got {eval_batches!r}")
        self.eval_batches = eval_batches
        self._trainer: Trainer | None = None
        self._logged: tuple[float, float | None] | None = None  # this step's loss and gradient norm

    def train(self, trainer: Trainer, *, resume: bool = True) -> ConeRecord:
        """Train to the Trainer's ``max_steps`` under the light cone; returns the run's
        record. With ``resume``, a run whose branch exists continues from its head."""
        if self not in trainer.callback_handler.callbacks:
            raise qckpt.InvalidInputError("pass the callback to the Trainer: Trainer(..., callbacks=[cone])")
        if trainer.args.logging_strategy != "steps" or trainer.args.logging_steps != 1:
            raise qckpt.InvalidInputError("the light cone watches every step's loss and gradient norm, which the Trainer "
                                          "logs: set TrainingArguments(logging_steps=1)")  # fmt: skip
        self._trainer = trainer
        head = self.branch if resume and self.branch in self.repo.branches() else None
        return self.drive(head)

    # -- ConeDriver's -------------------------------------------------------------------
    def resume(self, revision: str | None) -> None:
        assert self._trainer is not None
        self._trainer.train(resume_from_checkpoint=self.checkpoint(revision) if revision is not None else None)

    def skip(self, live: qckpt.TrainingState, n: int) -> int:
        return self.skip_batches(live, n)

    def max_steps(self) -> int:
        assert self._trainer is not None
        return int(self._trainer.state.max_steps)

    # -- the Trainer's events and QckptCallback's points ------------------------------------
    def components(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**super().components(kwargs), "data": self.skipped}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._trainer is None:
            raise qckpt.InvalidInputError("a LightConeCallback trains through cone.train(trainer), not trainer.train()")
        super().on_train_begin(args, state, control, **kwargs)
        assert self.live is not None
        self.bind(self.live, self._evaluate if self._trainer.eval_dataset is not None else None)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if "loss" in logs:
            norm = logs.get("grad_norm")
            self._logged = (float(logs["loss"]), None if norm is None else float(norm))
        super().on_log(args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:  # fmt: skip
        limit = self.clip_limit()
        if limit is not None:  # an intervention's clipping, after the Trainer's own
            torch.nn.utils.clip_grad_norm_([p for p in kwargs["model"].parameters() if p.grad is not None], limit)

    def commit_point(self, state: TrainerState, control: TrainerControl, metrics: dict[str, Any]) -> None:
        loss, norm = self._logged or (float("nan"), None)
        self._logged = None
        if self.step_done(self.capture(state, control), loss, norm):
            control.should_training_stop = True

    def train_ended(self, state: TrainerState, control: TrainerControl) -> None:
        self.capture(state, control)
        self.run_ended()

    def _evaluate(self, state: qckpt.TrainingState) -> list[float]:
        """One loss per batch of the first ``eval_batches`` of the evaluation set, the
        same batches every time; the process RNG streams are left as they were."""
        assert self._trainer is not None
        trainer, model = self._trainer, self._trainer.model
        losses: list[float] = []
        with scoring(model):
            for i, inputs in enumerate(trainer.get_eval_dataloader()):
                if i == self.eval_batches:
                    break
                loss, _, _ = trainer.prediction_step(model, inputs, prediction_loss_only=True)
                if loss is None:
                    raise qckpt.InvalidInputError("the evaluation set gives the model no loss to score futures on (no labels?)")
                losses.append(float(loss))
        return losses


__all__ = ["LightConeCallback"]
