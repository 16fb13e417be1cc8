"""The light cone in Lightning: an event's futures are trained by Lightning's own fit
loop (the control future equals the uninterrupted run bit for bit, a skip future
starts on the batch the run met that many batches later), the run continues from
the join to its last step, and misuse gets typed errors."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning", reason="the qckpt[lightning] extra is not installed")
pytest.importorskip("torchdata", reason="the qckpt[lightning] extra is not installed")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

import qckpt  # noqa: E402
from bench.compare import differences  # noqa: E402
from branch import ConeConfig, Pruning  # noqa: E402
from branch.integrations.lightning import LightConeCallback  # noqa: E402
from qckpt.integrations.lightning import QckptCheckpointIO  # noqa: E402
from tests.integrations.lightning_workload import ByteModel, StdlibBytes  # noqa: E402

STEPS, SPIKE = 64, 36
HELD_OUT = torch.tensor(list(Path(os.__file__).read_bytes()[8192 : 8192 + 16 * 32]), dtype=torch.long).view(4, 4, 32)


class _Schedule:
    """A constant learning rate, 300 times higher for two steps from ``SPIKE``."""

    def __call__(self, step: int) -> float:
        return 300.0 if SPIKE <= step < SPIKE + 2 else 1.0


class SpikyModel(ByteModel):
    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def held_out_losses(module: pl.LightningModule) -> list[float]:
    return [float(module.training_step(batch, 0)) for batch in HELD_OUT]


class Batches(pl.Callback):
    """Remembers a digest of every training batch by (branch, step it trained)."""

    def __init__(self, cone: LightConeCallback | None = None) -> None:
        self.cone, self.seen = cone, dict[tuple[str, int], str]()

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: torch.Tensor, batch_idx: int) -> None:
        branch = self.cone.training_branch() if self.cone is not None else "main"
        self.seen[(branch, trainer.global_step + 1)] = hashlib.sha256(batch.numpy().tobytes()).hexdigest()


def _trainer(callbacks: list[pl.Callback], *, checkpoints: bool = False) -> pl.Trainer:
    return pl.Trainer(max_steps=STEPS, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", enable_checkpointing=checkpoints)  # fmt: skip


def _loader() -> StatefulDataLoader:
    return StatefulDataLoader(StdlibBytes(96), batch_size=4, shuffle=True)


def _model(repo: qckpt.Repository, revision: str) -> dict[str, Any]:
    return repo.load(revision).tree()["components"]["model"]


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.slow
def test_an_event_runs_its_futures_through_lightning_and_the_run_goes_on_from_the_join(tmp_path: Path) -> None:
    plain, plain_batches = QckptCheckpointIO(tmp_path / "plain"), Batches()
    every_step = ModelCheckpoint(dirpath=tmp_path / "pl", every_n_train_steps=1, save_top_k=-1)
    pl.seed_everything(0, verbose=False)
    _trainer([plain, plain_batches, every_step], checkpoints=True).fit(SpikyModel(), _loader())

    cone = LightConeCallback(tmp_path / "repo", config=ConeConfig(horizon=16, commit_every=4, resamples=300),
                             evaluate=held_out_losses)  # fmt: skip
    batches = Batches(cone)
    pl.seed_everything(0, verbose=False)
    trainer = _trainer([cone, batches])
    record = cone.fit(trainer, SpikyModel(), _loader())
    assert record.events, "the learning-rate spike went unnoticed"
    event = record.events[0]
    assert SPIKE < event["trigger"]["step"] <= SPIKE + 8 and event["rollouts"]["strategy"] == "framework"
    origin, futures = event["origin"], {f["name"]: f for f in event["futures"]}
    assert origin["step"] < SPIKE and len(futures) == 5
    repo = cone.repo
    for future in futures.values():
        history = repo.log(future["branch"])
        start = history[[s.id for s in history].index(origin["snapshot"]) - 1]
        assert start.parents == (origin["snapshot"],) and start.message.startswith(f"future {future['name']}")
        assert len(future["eval"]) == len(HELD_OUT) and future["snapshot"] == history[0].id

    # the control future is the run continued from the origin, the skip future skipped what it says
    control, skipper = futures["control"], futures["f1-skip_batches"]
    step = origin["step"] + 16
    assert [m[0] for m in control["metrics"]] == list(range(origin["step"] + 1, step + 1))
    assert differences(_model(repo, control["snapshot"]), _model(plain.repo, f"main@{step}")) == []
    first, n = origin["step"] + 1, skipper["intervention"]["n"]
    assert batches.seen[(control["branch"], first)] == plain_batches.seen[("main", first)]
    assert batches.seen[(skipper["branch"], first)] == plain_batches.seen[("main", first + n)]

    # the run went on from the join to the last step
    join = repo.snapshot(event["join"])
    chosen = futures[event["selection"]["chosen"]]
    assert differences(_model(repo, join.id), _model(repo, chosen["snapshot"])) == []
    assert trainer.global_step == STEPS and record.main[-1][0] == STEPS
    assert join.id in {s.id for s in repo.log("main")} and repo.fsck().ok


@pytest.mark.slow
def test_pruning_cuts_futures_at_the_rung_and_the_rest_resume_from_their_rung_commits(tmp_path: Path) -> None:
    plain = QckptCheckpointIO(tmp_path / "plain")
    pl.seed_everything(0, verbose=False)
    _trainer([plain, ModelCheckpoint(dirpath=tmp_path / "pl", every_n_train_steps=1, save_top_k=-1)],
             checkpoints=True).fit(SpikyModel(), _loader())  # fmt: skip
    config = ConeConfig(horizon=16, commit_every=4, resamples=300, pruning=Pruning(rung=0.5, keep=0.5))
    cone = LightConeCallback(tmp_path / "repo", config=config, evaluate=held_out_losses)
    pl.seed_everything(0, verbose=False)
    event = cone.fit(_trainer([cone]), SpikyModel(), _loader()).events[0]
    start, futures = event["origin"]["step"], event["futures"]
    cut = [f for f in futures if f["pruned_at"] is not None]
    assert len(cut) == 2 and all(f["name"] != "control" and f["pruned_at"] == start + 8 for f in cut)
    for future in futures:
        head = cone.repo.snapshot(future["branch"])
        assert head.step == (start + 8 if future in cut else start + 16) and future["snapshot"] == head.id
        assert len(future["metrics"]) == (8 if future in cut else 16)
    # the control went on from its rung commit through Lightning's resume: still the uninterrupted run
    control = next(f for f in futures if f["name"] == "control")
    assert differences(_model(cone.repo, control["snapshot"]), _model(plain.repo, f"main@{start + 16}")) == []


def test_misuse_gets_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(qckpt.InvalidInputError, match="evaluate must be callable"):
        LightConeCallback(tmp_path / "repo", evaluate=3)  # type: ignore[arg-type]
    cone = LightConeCallback(tmp_path / "repo")
    with pytest.raises(qckpt.InvalidInputError, match="callbacks=\\[cone\\]"):
        cone.fit(_trainer([]), SpikyModel(), _loader())
    with pytest.raises(qckpt.InvalidInputError, match="cone.fit"):
        _trainer([LightConeCallback(tmp_path / "repo")]).fit(SpikyModel(), _loader())
    with pytest.raises(qckpt.InvalidInputError, match="StatefulDataLoader"):
        cone.fit(_trainer([cone]), SpikyModel(), DataLoader(StdlibBytes(96), batch_size=4, shuffle=True))
    assert "main" not in cone.repo.branches()
