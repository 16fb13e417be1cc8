"""The light cone in Lightning: one callback, and one call in place of ``trainer.fit``.

    cone = LightConeCallback("runs/qckpt", config=ConeConfig(horizon=50), evaluate=held_out_losses)
    trainer = L.Trainer(max_steps=10_000, callbacks=[cone], enable_checkpointing=False)
    record = cone.fit(trainer, module, StatefulDataLoader(data, shuffle=True))  # resumes the run's branch if it exists

**Watching.** After every training batch (``on_train_batch_end``, where a
Lightning checkpoint resumes exactly) the step's loss (what ``training_step``
returned) and the gradient norm before clipping (measured in
``on_before_optimizer_step``) go to the instability index, and every
``commit_every`` steps the run is committed on ``branch`` as the Lightning
checkpoint ``QckptCheckpointIO`` writes (module, optimizers, schedulers, loop
and data-loader state, RNG streams).

**An event.** When the index fires, the fit stops and the light cone
(``branch.engine``) takes over, as in ``branch.integrations.transformers``: each
future's start (origin + intervention) is committed and Lightning resumes from
it with ``ckpt_path``, so the control future is the run continued from the
origin, bit for bit; the run then resumes from the join. A future is scored by
``evaluate(module)``: one loss per held-out batch, the same batches every time
(the RNG streams are forked around it and the module is in eval mode, without
gradients); without it, on its last training losses (a weaker comparison).

In Lightning's terms:

* the training loader must be stateful (torchdata's ``StatefulDataLoader``):
  Lightning resumes a plain ``DataLoader`` at the start of its epoch, so futures
  would not see the batches after their origin;
* ``SkipBatches(n)`` draws ``n`` batches from the loader restored to the origin's
  position and moves the epoch's batch counters on by as many (not past the
  epoch's end); the step count (optimizer steps) is unchanged. ``ReseedData`` is
  not available;
* ``ClipGrad`` clips before Lightning's own ``gradient_clip_val`` clipping (the
  lower limit wins);
* futures run Lightning's validation on its schedule, as the run does; leave
  ``ModelCheckpoint`` out (``enable_checkpointing=False``): what it saved would be
  committed too, on the branch being trained.

Cost: one ``Trainer.fit`` call per future, which restores the snapshot. Single
process, automatic or manual optimization (the loss is what ``training_step``
returns).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

import qckpt
from branch.engine import ConeConfig, Situation, per_batch_losses
from branch.integrations._driver import ConeDriver, scoring
from branch.interventions import Intervention
from branch.record import ConeRecord
from branch.triggers import InstabilityIndex
from qckpt.integrations.lightning import QckptCheckpointIO

_CAPTURE = "qckpt:light-cone-capture"  # the path of a save that refreshes the live state without committing


class LightConeCallback(QckptCheckpointIO, ConeDriver):
    """Runs a Lightning fit under the light cone (see the module docstring): pass it
    in ``callbacks`` and call ``fit(trainer, module, ...)``. ``config``, ``index``,
    ``interventions`` and ``run`` are ``LightCone``'s. Used from the training thread."""

    def __init__(
        self,
        repository: qckpt.Repository | str | os.PathLike[str],
        *,
        branch: str = "main",
        run: str | None = None,
        config: ConeConfig | None = None,
        index: InstabilityIndex | None = None,
        interventions: Callable[[Situation], list[Intervention]] | None = None,
        evaluate: Callable[[pl.LightningModule], Sequence[float]] | None = None,
    ) -> None:
        QckptCheckpointIO.__init__(self, repository, branch=branch)
        ConeDriver.__init__(self, self.repo, branch, run, config, index, interventions)
        if evaluate is not None and not callable(evaluate):
            raise qckpt.InvalidInputError(f"evaluate must be callable (module -> losses), got {type(evaluate).__name__}")
        self.evaluate = evaluate
        self._fit: tuple[pl.Trainer, pl.LightningModule, dict[str, Any]] | None = None
        self._grad_norm: float | None = None  # this step's, before clipping

    def fit(self, trainer: pl.Trainer, module: pl.LightningModule, train_dataloaders: Any = None,
            val_dataloaders: Any = None, datamodule: Any = None, *, resume: bool = True) -> ConeRecord:  # fmt: skip
        """``trainer.fit`` under the light cone, to the trainer's end; returns the run's
        record. With ``resume``, a run whose branch exists continues from its head."""
        if self not in trainer.callbacks:
            raise qckpt.InvalidInputError("pass the callback to the Trainer: Trainer(..., callbacks=[cone])")
        loaders = {"train_dataloaders": train_dataloaders, "val_dataloaders": val_dataloaders, "datamodule": datamodule}
        self._fit = (trainer, module, loaders)
        head = self.branch if resume and self.branch in self.repo.branches() else None
        return self.drive(head)

    # -- ConeDriver's -------------------------------------------------------------------
    def resume(self, revision: str | None) -> None:
        assert self._fit is not None
        trainer, module, loaders = self._fit
        trainer.fit(module, ckpt_path=revision, weights_only=False, **loaders)  # a snapshot, loaded without unpickling

    def skip(self, live: qckpt.TrainingState, n: int) -> int:
        """``skip_batches`` (the loader is stateful: ``on_train_start`` checked); the step
        count (optimizer steps) does not move."""
        self.skip_batches(live, n)
        return live.step

    def max_steps(self) -> int:
        assert self._trainer is not None
        return int(self._trainer.estimated_stepping_batches)

    # -- CheckpointIO ---------------------------------------------------------------------
    def components(self) -> dict[str, Any]:
        return {**super().components(), "data": self.skipped}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """A capture of the live state (the light cone's own save), or a checkpoint
        Lightning saved, committed on the branch being trained."""
        if path == _CAPTURE:
            if self._live_state(checkpoint) is None:
                raise qckpt.InvalidInputError("the checkpoint does not hold the live module and optimizers")
            return
        branch, self.branch = self.branch, self.training_branch()
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            self.branch = branch

    # -- Callback ---------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is None:
            raise qckpt.InvalidInputError("a LightConeCallback trains through cone.fit(trainer, module, ...), not trainer.fit")
        if not callable(getattr(trainer.train_dataloader, "load_state_dict", None)):
            raise qckpt.InvalidInputError("the light cone needs a stateful training loader (torchdata's StatefulDataLoader): "
                                          "Lightning restarts a plain DataLoader's epoch on resume, so futures would "
                                          "not train on the batches after their origin")  # fmt: skip
        trainer.save_checkpoint(_CAPTURE)  # the live state, built from this fit's objects
        assert self._state is not None
        self.bind(self._state, self._evaluate if self.evaluate is not None else None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:  # fmt: skip
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else None
        limit = self.clip_limit()
        if limit is not None and grads:  # an intervention's clipping, before Lightning's own
            torch.nn.utils.clip_grad_norm_([p for p in pl_module.parameters() if p.grad is not None], limit)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            raise qckpt.InvalidInputError("the light cone watches the loss training_step returns (a tensor, or a dict "
                                          "with 'loss'); it returned none")  # fmt: skip
        trainer.save_checkpoint(_CAPTURE)
        assert self._state is not None
        norm, self._grad_norm = self._grad_norm, None
        if self.step_done(self._state, float(loss), norm):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.run_ended()

    def _evaluate(self, state: qckpt.TrainingState) -> list[float]:
        assert self.evaluate is not None and self._module is not None
        with scoring(self._module):  # read inside: a generator must compute in evaluation mode
            return per_batch_losses(self.evaluate(self._module))


__all__ = ["LightConeCallback"]
