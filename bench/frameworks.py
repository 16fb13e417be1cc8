"""Training frameworks: qckpt's integrations against the frameworks' own checkpoints,
a save every step of one run, side by side in one process.

The reference byte-level GPT (``bench.workload``; 3.3M parameters, ``--quick``:
0.13M) trains ``--steps`` AdamW steps on standard-library source, with
dropout, three times per framework from the same seed: saving nothing; saving
the framework's own checkpoint every step (the Hugging Face ``Trainer``'s
folders, ``save_steps=1``; Lightning's ``.ckpt`` files, ``ModelCheckpoint(
every_n_train_steps=1, save_top_k=-1)``); committing every step with qckpt
(``QckptCallback``; ``QckptCheckpointIO``) and the framework's own files off.
Reported: bytes at rest (the files; the repository's history and warm copy)
and each run's training time over the run that saves nothing. Bit-exact
resume is checked by ``tests/integrations`` (in new processes), not here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

import qckpt
from bench.workload import SIZES, CharGPT, load_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 10 steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--frameworks", nargs="+", choices=["hf", "lightning"], default=["hf", "lightning"])
    parser.add_argument("--json", type=Path, help="write the results here")


class _Blocks(Dataset):
    """Consecutive blocks of the corpus, as (input, target) byte ids."""

    def __init__(self, block: int, blocks: int = 512) -> None:
        data = load_corpus(blocks * (block + 1)).long()
        self.rows = data[: blocks * (block + 1)].view(blocks, block + 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i, :-1], "labels": self.rows[i, 1:]}


def _hf_run(size: str, steps: int, out: Path, mode: str) -> tuple[float, int]:
    from transformers import Trainer, TrainingArguments

    from qckpt.integrations.transformers import QckptCallback

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = CharGPT(SIZES[size])

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": self.gpt(input_ids, labels)}

    torch.manual_seed(0)
    callbacks = [QckptCallback(out / "repo")] if mode == "qckpt" else []
    args = TrainingArguments(
        str(out / "hf"), max_steps=steps, per_device_train_batch_size=SIZES[size].batch_size, learning_rate=1e-3,
        seed=1, save_strategy="steps" if mode == "own" else "no", save_steps=1,
        logging_steps=10, use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=Model(), args=args, train_dataset=_Blocks(SIZES[size].block_size), callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, _at_rest(out, callbacks[0].repo if callbacks else None)


def _lightning_run(size: str, steps: int, out: Path, mode: str) -> tuple[float, int]:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torchdata.stateful_dataloader import StatefulDataLoader

    from qckpt.integrations.lightning import QckptCheckpointIO

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = CharGPT(SIZES[size])

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.gpt(batch["input_ids"], batch["labels"])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    pl.seed_everything(0, verbose=False)
    callbacks: list[pl.Callback] = []
    qckpt_io = QckptCheckpointIO(out / "repo") if mode == "qckpt" else None
    if qckpt_io is not None:
        callbacks.append(qckpt_io)
    if mode != "none":
        callbacks.append(ModelCheckpoint(dirpath=out / "pl", every_n_train_steps=1, save_top_k=-1, filename="{step}"))
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", enable_checkpointing=mode != "none")  # fmt: skip
    loader = StatefulDataLoader(_Blocks(SIZES[size].block_size), batch_size=SIZES[size].batch_size, shuffle=True)
    t0 = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - t0, _at_rest(out, qckpt_io.repo if qckpt_io else None)


def _at_rest(out: Path, repo: qckpt.Repository | None) -> int:
    """Bytes the run left: its repository's history and warm copies, or its files."""
    if repo is not None:
        repo.close()
        with qckpt.Repository.open(out / "repo") as reopened:
            stats = reopened.stats()
        return stats.stored_bytes + stats.warm_bytes
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


RUNS: dict[str, Callable[[str, int, Path, str], tuple[float, int]]] = {"hf": _hf_run, "lightning": _lightning_run}


def run(args: argparse.Namespace) -> dict:
    size, steps = ("tiny", 10) if args.quick else ("3m", args.steps)
    results: dict = {"model": size, "steps": steps, "frameworks": {}}
    print(f"{size} model, {steps} steps, a save every step")
    for framework in args.frameworks:
        figures = {}
        with tempfile.TemporaryDirectory() as tmp:
            for mode in ("none", "own", "qckpt"):
                seconds, stored = RUNS[framework](size, steps, Path(tmp) / mode, mode)
                figures[mode] = {"train_s": seconds, "bytes": stored}
        base, own, ours = figures["none"]["train_s"], figures["own"], figures["qckpt"]
        results["frameworks"][framework] = {**figures, "bytes_ratio": ours["bytes"] / own["bytes"],
                                            "time_own_vs_none": own["train_s"] / base,
                                            "time_qckpt_vs_none": ours["train_s"] / base}  # fmt: skip
        print(f"{framework:9s} at rest: own checkpoints {own['bytes'] / 1e6:8.1f} MB, qckpt {ours['bytes'] / 1e6:8.1f} MB "
              f"({ours['bytes'] / own['bytes']:.3f}x); training time vs no saves: own {own['train_s'] / base:.2f}x, "
              f"qckpt {ours['train_s'] / base:.2f}x")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results
