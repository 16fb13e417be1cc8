"""The Hugging Face ``Trainer`` commits into a qckpt repository and resumes from a revision.

    callback = QckptCallback("runs/qckpt")  # a path, s3://bucket/prefix, or an open Repository
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.checkpoint(missing_ok=True))

**What is committed**, after every ``every``-th optimizer step: the model, the
optimizer, the learning-rate scheduler, the gradient scaler if given
(``scaler=trainer.accelerator.scaler`` for fp16: callbacks cannot reach it),
the process RNG streams, and the ``TrainerState`` (global step, epoch, log
history, stateful callbacks). The data position needs nothing more: the
Trainer's loader order is a function of the seed and the epoch, and on resume
the Trainer skips the batches of the resumed epoch itself. The commit is taken
after everything the Trainer does at that step, as its own checkpoint is:
after its logging (``on_log``) and after its evaluation (``on_evaluate``;
creating the evaluation loader's iterator draws from the RNG). Commits are
asynchronous: training waits only for the copy into host memory; a failed
commit is raised at the next one, and ``on_train_end`` waits for all.

**Resuming** goes through the Trainer's own resume path, so it behaves exactly
as resuming from the Trainer's checkpoint folder: ``checkpoint(revision)``
checks the snapshot against the model (``StateMismatchError`` before anything
is written), writes it as a Trainer checkpoint folder (``pytorch_model.bin``,
``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``,
``trainer_state.json``) into a temporary directory, deleted when training
ends, and parents the next commit on that snapshot. A mismatched optimizer is
refused by the Trainer's own loading (torch's ``ValueError``).

Turn the Trainer's own checkpoint folders off with
``TrainingArguments(save_strategy="no")``. Single process only: distributed
Trainer runs are not supported yet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import weakref
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from qckpt.errors import InvalidInputError, RevisionNotFoundError, StateMismatchError
from qckpt.integrations import check_module, open_or_init
from qckpt.repository import Repository
from qckpt.state import Lineage, Stateful, TrainingState
from qckpt.store.refs import check_ref_name

#: the files of a Trainer checkpoint folder (names as ``transformers.trainer`` uses them)
WEIGHTS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE = "pytorch_model.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"
RNG_FILE, TRAINER_STATE_FILE = "rng_state.pth", "trainer_state.json"
_TRAINER_STATE = "trainer_state"  # the extras key holding the TrainerState as JSON


class QckptCallback(TrainerCallback):
    """Commits the Trainer's training state to ``branch`` of ``repository`` (opened,
    or created if absent, when given as a location) every ``every`` optimizer steps.
    Call ``checkpoint()`` for the ``resume_from_checkpoint`` argument. Used from the
    training thread only.

    Extending it (``branch.integrations.transformers`` does): ``live`` is the
    ``TrainingState`` committed (built at train begin from ``components``);
    ``commit_point`` runs at each cadence step at the moment a commit of it
    resumes exactly, after the step's logging and evaluation, and ``train_ended``
    at the end of training; ``capture`` brings ``live`` up to date with the
    Trainer's state for a commit made there."""

    def __init__(
        self,
        repository: Repository | str | os.PathLike[str],
        *,
        branch: str = "main",
        every: int = 1,
        scaler: Stateful | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInputError(f"every must be a positive number of optimizer steps, got {every!r}")
        check_ref_name(branch)
        if scaler is not None and not isinstance(scaler, Stateful):
            raise InvalidInputError(f"scaler must have state_dict()/load_state_dict(), got {type(scaler).__qualname__}")
        self.repo = open_or_init(repository)
        self.branch, self.every, self.scaler = branch, every, scaler
        self._model: torch.nn.Module | None = None
        self.live: TrainingState | None = None  # the state committed, from train begin on
        self._lineage: Lineage | None = None  # the snapshot the next run resumes from
        self._extras: dict[str, Any] = {}  # that snapshot's other extras, carried on
        self._due: str | None = None  # the event after which this step's commit is taken
        self._committed_step: int | None = None
        self._folders: list[str] = []
        self._cleanup = weakref.finalize(self, _remove_all, self._folders)

    # -- resuming --------------------------------------------------------------------
    def checkpoint(self, revision: str | None = None, *, missing_ok: bool = False) -> str | None:
        """A Trainer checkpoint folder holding the snapshot at ``revision`` (default:
        the callback's branch), for ``trainer.train(resume_from_checkpoint=...)``.
        With ``missing_ok``, None when the revision does not exist yet (a first run),
        else ``RevisionNotFoundError``. ``StateMismatchError`` when the snapshot was
        not committed by this callback or does not fit the Trainer's model."""
        try:
            snap = self.repo.snapshot(revision or self.branch)
        except RevisionNotFoundError:
            if missing_ok:
                return None
            raise
        manifest = self.repo.manifest(snap)
        stored = manifest.structure  # no tensor read yet
        extras = stored.get("extras") if isinstance(stored, dict) else None
        if not isinstance(extras, dict) or _TRAINER_STATE not in extras or "model" not in stored.get("components", {}):
            raise StateMismatchError(
                f"snapshot {snap.short_id} cannot resume a Trainer:", ["it was not committed by QckptCallback"]
            )
        if self._model is not None:
            check_module(self.repo, snap, ("components", "model"), self._model, "Trainer's model", "model")
        tree = self.repo.load(snap.id).tree()
        folder = tempfile.mkdtemp(prefix=f"qckpt-{snap.short_id}-")
        self._folders.append(folder)
        components = tree["components"]
        for name, file in (("model", WEIGHTS_FILE), ("optimizer", OPTIMIZER_FILE), ("scheduler", SCHEDULER_FILE),
                           ("scaler", SCALER_FILE)):  # fmt: skip
            if name in components:
                torch.save(components[name], os.path.join(folder, file))
        torch.save(_trainer_rng(tree["rng"]), os.path.join(folder, RNG_FILE))
        with open(os.path.join(folder, TRAINER_STATE_FILE), "w") as f:
            f.write(extras[_TRAINER_STATE])
        self._lineage = Lineage(self.repo.config.repository_id, snap.id, restored=True)
        self._extras = {k: v for k, v in tree["extras"].items() if k != _TRAINER_STATE}
        return folder

    # -- the Trainer's events --------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._model = kwargs.get("model")

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if args.world_size > 1:
            raise InvalidInputError(f"{type(self).__name__} supports single-process Trainer runs only (world_size 1)")
        self.live = TrainingState(step=state.global_step, extras=self._extras, **self.components(kwargs))
        self.live.lineage = self._lineage
        self._committed_step = state.global_step if self._lineage is not None else None

    def components(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The live objects committed, from the Trainer's callback arguments (model,
        optimizer, scheduler, and the scaler if given)."""
        components: dict[str, Any] = {"model": kwargs["model"], "optimizer": kwargs["optimizer"]}
        if kwargs.get("lr_scheduler") is not None:
            components["scheduler"] = kwargs["lr_scheduler"]
        if self.scaler is not None:
            components["scaler"] = self.scaler
        return components

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step % self.every:
            return
        self._due = "evaluate" if control.should_evaluate else "log" if control.should_log else None
        if self._due is None:
            self._at_commit_point(state, control, {})

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._due == "log":
            self._at_commit_point(state, control, kwargs.get("logs") or {})

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._due == "evaluate":
            self._at_commit_point(state, control, kwargs.get("metrics") or {})

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        try:
            self.train_ended(state, control)
            self.repo.flush()
        finally:
            _remove_all(self._folders)

    def _at_commit_point(self, state: TrainerState, control: TrainerControl, metrics: dict[str, Any]) -> None:
        self._due = None
        self.commit_point(state, control, metrics)

    # -- what happens there (override to change) ---------------------------------------
    def capture(self, state: TrainerState, control: TrainerControl) -> TrainingState:
        """``live`` with its step and the Trainer's state (``trainer_state.json``) as
        they are now, so that a commit of it resumes here."""
        if self.live is None:
            raise InvalidInputError(f"{type(self).__name__} is not attached to a Trainer that began training")
        self.live.step = state.global_step
        self.live.extras[_TRAINER_STATE] = _trainer_state_json(state, control)
        return self.live

    def skip_batches(self, state: TrainingState, n: int) -> int:
        """Move the data position stored in ``state`` (captured by ``capture``, or
        restored) ``n`` optimizer steps' batches on: the Trainer's data position is
        its global step, so the step in its ``trainer_state.json`` moves. Returns
        the new global step."""
        fields = json.loads(state.extras[_TRAINER_STATE])
        fields["global_step"] += n
        state.extras[_TRAINER_STATE] = _as_json(fields)
        return int(fields["global_step"])

    def commit_point(self, state: TrainerState, control: TrainerControl, metrics: dict[str, Any]) -> None:
        """A cadence step's resumable moment: commit ``live`` asynchronously with the
        step's numeric ``metrics`` (its logs, or its evaluation's)."""
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
        self.repo.commit_async(self.capture(state, control), branch=self.branch, metrics=numbers, message=_summary(state))
        self._committed_step = state.global_step

    def train_ended(self, state: TrainerState, control: TrainerControl) -> None:
        """Training ended: commit the final step if the cadence left it out."""
        if self.live is not None and self._committed_step != state.global_step:
            self.commit_point(state, control, {})


def _trainer_rng(rng: dict[str, Any]) -> dict[str, Any]:
    """qckpt's captured RNG streams in the Trainer's ``rng_state.pth`` layout."""
    out = {"python": rng["python"], "numpy": rng["numpy"], "cpu": rng["torch"]}
    if rng["cuda"]:  # one process: the Trainer restores the current device's stream
        out["cuda"] = rng["cuda"][torch.cuda.current_device() if torch.cuda.is_available() else 0]
    return out


def _trainer_state_json(state: TrainerState, control: TrainerControl) -> str:
    """``trainer_state.json`` as the Trainer's own checkpoint writes it, with the
    ``TrainerControl`` state updated to now (other stateful callbacks keep what
    the Trainer last recorded: a callback cannot reach its siblings)."""
    fields = dataclasses.asdict(state)
    fields["stateful_callbacks"] = {**(fields.get("stateful_callbacks") or {}), "TrainerControl": control.state()}
    return _as_json(fields)


def _as_json(fields: dict[str, Any]) -> str:
    """``trainer_state.json``'s text, laid out as the Trainer writes it."""
    return json.dumps(fields, indent=2, sort_keys=True) + "\n"


def _summary(state: TrainerState) -> str:
    return f"Trainer step {state.global_step}, epoch {json.dumps(state.epoch)}"


def _remove_all(folders: list[str]) -> None:
    while folders:
        shutil.rmtree(folders.pop(), ignore_errors=True)


__all__ = ["QckptCallback"]
