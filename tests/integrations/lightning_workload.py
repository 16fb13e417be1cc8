"""A small Lightning run for the integration tests: a byte-level language model with
dropout, AdamW and a step schedule, on bytes of the standard library's source,
shuffled by a ``StatefulDataLoader``, a checkpoint every step. Run as a script,
one mode per process:

    python -m tests.integrations.lightning_workload MODE WORKERS DIR

``full`` trains 20 steps uninterrupted, without checkpoints; ``stop`` saves into
qckpt and stops after step 6 (mid-epoch); ``resume`` resumes from the repository
(``ckpt_path="main"``) and finishes; ``pl-stop``/``pl-resume`` do the same with
Lightning's own checkpoint files. Each writes the final weights to ``DIR/MODE.pt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from qckpt.integrations.lightning import QckptCheckpointIO

STOP_AT, MAX_STEPS = 6, 20


class StdlibBytes(Dataset):
    def __init__(self, blocks: int = 64, block: int = 32) -> None:
        text = Path(os.__file__).read_bytes()[: blocks * block]
        self.ids = torch.tensor(list(text), dtype=torch.long).view(blocks, block)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i]


class ByteModel(pl.LightningModule):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, width)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(width, 256)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.head(self.drop(self.embed(batch[:, :-1])))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 5, 0.5)}


class StopAfter(pl.Callback):
    def on_train_batch_end(self, trainer, *args):  # type: ignore[no-untyped-def]
        if trainer.global_step == STOP_AT:
            trainer.should_stop = True


def fit(mode: str, workers: int, out: Path, callbacks: list[pl.Callback], ckpt_path: str | None, width: int = 32) -> ByteModel:
    pl.seed_everything(0, workers=True, verbose=False)
    model = ByteModel(width)
    loader = StatefulDataLoader(StdlibBytes(), batch_size=4, shuffle=True, num_workers=workers)
    trainer = pl.Trainer(max_steps=MAX_STEPS, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", enable_checkpointing=bool(callbacks))  # fmt: skip
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model


def main(mode: str, workers: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stop = [StopAfter()] if mode.endswith("stop") else []
    every_step = ModelCheckpoint(dirpath=out / "pl", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    if mode == "full":
        model = fit(mode, workers, out, [], None)
    elif mode.startswith("pl"):
        model = fit(mode, workers, out, [every_step, *stop], str(out / "pl" / f"step={STOP_AT}.ckpt") if mode == "pl-resume" else None)
    else:
        qckpt_io = QckptCheckpointIO(out / "repo")
        model = fit(mode, workers, out, [qckpt_io, every_step, *stop], qckpt_io.resume_path() if mode == "resume" else None)
    torch.save(model.state_dict(), out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
