"""Lightning saves its checkpoints into a qckpt repository and resumes from a revision.

    qckpt_io = QckptCheckpointIO("runs/qckpt")  # a path, s3://bucket/prefix, or an open Repository
    trainer = L.Trainer(callbacks=[qckpt_io, ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)])
    trainer.fit(model, StatefulDataLoader(data, shuffle=True), ckpt_path=qckpt_io.resume_path(missing_ok=True))

``QckptCheckpointIO`` is Lightning's storage interface (``CheckpointIO``) and a
callback: as a callback it installs itself as the strategy's checkpoint IO
(so ``callbacks=[...]`` is all the glue; ``plugins=[...]`` works too). Every
checkpoint Lightning saves (``ModelCheckpoint``, ``trainer.save_checkpoint``)
becomes a snapshot on ``branch``, committed asynchronously, its message the
path Lightning asked for: the whole checkpoint dict (model, optimizers,
schedulers, loop state, callback states, hyperparameters) plus the process
RNG streams, which Lightning's own checkpoints leave out.

Resuming: ``ckpt_path`` names a revision (``"main"``, ``"main@120"``, a tag, a
snapshot id) or a path a checkpoint was saved under (the newest snapshot on
the branch with that message). Lightning restores its loops, and the data
position when the loader is stateful (torchdata's ``StatefulDataLoader``;
with a plain ``DataLoader`` Lightning restarts the epoch's data, as it does
from its own files). The RNG streams are restored just before the first
resumed batch runs, after the loader's iterator was made (making one draws
from the RNG), so dropout and everything random continue as in an
uninterrupted run. An unknown revision raises ``RevisionNotFoundError``.

Removing checkpoints (``save_top_k``) removes nothing: the history stays, and
``Repository.gc`` with a ``RetentionPolicy`` expires it. Single process only.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from qckpt.errors import InvalidInputError, RevisionNotFoundError, StateMismatchError
from qckpt.integrations import check_module, open_or_init
from qckpt.repository import Repository
from qckpt.state import Lineage, TrainingState, capture_rng, restore_rng
from qckpt.store.refs import check_ref_name

_RNG = "qckpt_rng"  # the key of the RNG streams in a checkpoint committed as a plain tree
_REST = "lightning"  # the extras key of the checkpoint's other entries, when committed as a TrainingState


class QckptCheckpointIO(CheckpointIO, pl.Callback):
    """Lightning checkpoints as snapshots on ``branch`` of ``repository`` (opened, or
    created if absent, when given as a location). Used from the training thread."""

    def __init__(self, repository: Repository | str | os.PathLike[str], *, branch: str = "main") -> None:
        check_ref_name(branch)
        self.repo = open_or_init(repository)
        self.branch = branch
        self._rng: dict[str, Any] | None = None  # restored before the first resumed batch
        self._module: pl.LightningModule | None = None  # checked against what is loaded
        self._trainer: pl.Trainer | None = None
        self._state: TrainingState | None = None  # the live module, optimizers and schedulers, once saving
        self._lineage: Lineage | None = None  # the snapshot resumed from: the next commit's parent
        self._extras: dict[str, Any] = {}  # that snapshot's other extras, carried on

    # -- CheckpointIO ----------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit ``checkpoint``. When its model and optimizer states are those of the
        live module and optimizers (always, in one process), they are committed as a
        ``TrainingState`` of those objects, so the optimizer-aware codecs apply; the
        rest of the checkpoint rides along as extras."""
        if storage_options is not None:
            raise InvalidInputError("QckptCheckpointIO takes no storage_options")
        step, message = int(checkpoint.get("global_step", 0)), str(path)
        state = self._live_state(checkpoint)
        if state is None:
            self.repo.commit_async({**checkpoint, _RNG: capture_rng()}, branch=self.branch, step=step, message=message)
        else:
            self.repo.commit_async(state, branch=self.branch, step=step, message=message)

    def components(self) -> dict[str, Any]:
        """The live objects a checkpoint is committed from: ``model``, ``optimizer_<i>``
        and ``scheduler_<i>`` (Lightning's optimizers and LR schedulers, in order)."""
        assert self._trainer is not None and self._module is not None
        schedulers = [config.scheduler for config in self._trainer.lr_scheduler_configs]
        return {"model": self._module, **{f"optimizer_{i}": o for i, o in enumerate(self._trainer.optimizers)},
                **{f"scheduler_{i}": s for i, s in enumerate(schedulers)}}  # fmt: skip

    def _live_state(self, checkpoint: dict[str, Any]) -> TrainingState | None:
        """The live state holding ``checkpoint`` (its module, optimizer and scheduler
        states those of the live objects), or None when it does not."""
        if self._trainer is None or self._module is None:
            return None
        if (checkpoint.get("state_dict", {}).keys() != self._module.state_dict().keys()
                or len(checkpoint.get("optimizer_states", [])) != len(self._trainer.optimizers)
                or len(checkpoint.get("lr_schedulers", [])) != len(self._trainer.lr_scheduler_configs)):  # fmt: skip
            return None
        if self._state is None:
            self._state = TrainingState(extras=self._extras, **self.components())
            self._state.lineage = self._lineage
        self._state.step = int(checkpoint.get("global_step", 0))
        self._state.extras[_REST] = {k: v for k, v in checkpoint.items()
                                     if k not in ("state_dict", "optimizer_states", "lr_schedulers")}  # fmt: skip
        return self._state

    def skip_batches(self, state: TrainingState, n: int) -> int:
        """Move the data position in ``state`` (a checkpoint of this IO, restored) ``n``
        batches on: draw them from the trainer's stateful training loader set to
        the stored position, store its new position, and move the epoch's batch
        counters on as many. Never past the epoch's end; returns how many were
        skipped."""
        assert self._trainer is not None
        fit_loop = state.extras[_REST]["loops"]["fit_loop"]
        saved = fit_loop["state_dict"].get("combined_loader")
        loader = self._trainer.train_dataloader
        if not saved or not callable(getattr(loader, "load_state_dict", None)):
            raise InvalidInputError("skipping batches needs a stateful training loader (torchdata's StatefulDataLoader)")
        loader.load_state_dict(saved[0])
        batches, drawn = iter(loader), 0
        for _ in range(n):
            try:
                next(batches)
            except StopIteration:
                break
            drawn += 1
        saved[0] = loader.state_dict()
        del batches
        progress = fit_loop["epoch_loop.batch_progress"]
        for counts in (progress["total"], progress["current"]):
            for key in ("ready", "started", "processed", "completed"):
                counts[key] += drawn
        return drawn

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at ``path``: a revision, or the path it was saved under."""
        self.repo.flush()  # a checkpoint saved moments ago may still be in flight
        snapshot = self.repo.snapshot(self._snapshot_for(str(path)))
        tree = self.repo.load(snapshot.id).tree()
        extras = tree.get("extras") if isinstance(tree, dict) else None
        if isinstance(extras, dict) and isinstance(extras.get(_REST), dict):  # committed as a TrainingState
            components = tree["components"]
            checkpoint = {**extras[_REST], "state_dict": components["model"],
                          "optimizer_states": _numbered(components, "optimizer")}  # fmt: skip
            if "lr_schedulers" not in checkpoint:  # committed as components (older snapshots kept them in extras)
                checkpoint["lr_schedulers"] = _numbered(components, "scheduler")
            rng, model_path = tree["rng"], ("components", "model")
            self._extras = {k: v for k, v in extras.items() if k != _REST}
        else:
            checkpoint, rng, model_path = tree, tree.pop(_RNG, None) if isinstance(tree, dict) else None, ("state_dict",)
        if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
            raise StateMismatchError(f"snapshot {snapshot.short_id} cannot resume Lightning:", ["it is not a Lightning checkpoint"])
        if self._module is not None:
            check_module(self.repo, snapshot, model_path, self._module, "LightningModule", "state_dict")
        self._rng = rng
        self._lineage = Lineage(self.repo.config.repository_id, snapshot.id, restored=True)
        if self._state is not None:
            self._state.lineage = self._lineage
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Nothing is removed: the snapshot stays in history (see ``Repository.gc``)."""

    def teardown(self, *args: Any, **kwargs: Any) -> None:
        """CheckpointIO's ``teardown()`` and the Callback's ``teardown(trainer, module,
        stage)``: wait for the checkpoints in flight."""
        self.repo.flush()

    def resume_path(self, revision: str | None = None, *, missing_ok: bool = False) -> str | None:
        """``revision`` (default: the branch) for ``ckpt_path=``, checked to exist; with
        ``missing_ok``, None when it does not (a first run)."""
        revision = revision or self.branch
        try:
            self.repo.snapshot(revision)
        except RevisionNotFoundError:
            if missing_ok:
                return None
            raise
        return revision

    def _snapshot_for(self, name: str) -> str:
        try:
            return self.repo.resolve(name)
        except RevisionNotFoundError:
            try:
                history = self.repo.log(self.branch)
            except RevisionNotFoundError:
                history = []
            for snap in history:  # newest first
                if snap.message == name:
                    return snap.id
            raise RevisionNotFoundError(
                f"no checkpoint {name!r}: not a revision, and no snapshot on branch {self.branch!r} was saved under that path"
            ) from None

    # -- Callback --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:  # type: ignore[override]
        if trainer.world_size > 1:
            raise InvalidInputError("QckptCheckpointIO supports single-process Lightning runs only (world_size 1)")
        self._module, self._trainer = pl_module, trainer
        self._state = None  # this fit's objects: Lightning makes new optimizers and schedulers for each
        if trainer.strategy.checkpoint_io is not self:
            trainer.strategy.checkpoint_io = self

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.repo.flush()


def _numbered(components: dict[str, Any], prefix: str) -> list[Any]:
    """``components[prefix_0]``, ``components[prefix_1]``... in order."""
    out = []
    while f"{prefix}_{len(out)}" in components:
        out.append(components[f"{prefix}_{len(out)}"])
    return out


__all__ = ["QckptCheckpointIO"]
