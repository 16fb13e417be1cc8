"""Hugging Face Trainer: the qckpt callback against the Trainer's own checkpoint
folders, every-step saves of one run, side by side in one process.

A GPT-2 built from a config (random init, dropout 0.1; ``--quick``: a tiny one)
trains ``--steps`` AdamW steps on bytes of the standard library's source with
the Trainer, twice from the same seed: once saving its own checkpoint folder
every step (``save_steps=1``), once with ``QckptCallback(every=1)`` and the
folders off. Reported: bytes at rest (the folders; the repository's history
and warm copy), and the training time of each run over a run that saves
nothing. Bit-exact resume is checked by ``tests/integrations/test_transformers.py``
(in new processes), not here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import qckpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 10 steps")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write the results here")


class _Blocks(Dataset):
    def __init__(self, blocks: int, block: int) -> None:
        text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40])
        self.ids = torch.tensor(list(text[: blocks * block]), dtype=torch.long).view(blocks, block)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(out: Path, steps: int, n_embd: int, n_layer: int, *, folders: bool, callbacks: list) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=4))
    args = TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3, seed=1,
        save_strategy="steps" if folders else "no", save_steps=1, logging_steps=10,
        use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(512, 64), callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def _bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> dict:
    from qckpt.integrations.transformers import QckptCallback

    steps, n_embd, n_layer = (10, 64, 2) if args.quick else (args.steps, 256, 4)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = _train(root / "plain", steps, n_embd, n_layer, folders=False, callbacks=[])
        hf = _train(root / "hf", steps, n_embd, n_layer, folders=True, callbacks=[])
        callback = QckptCallback(root / "repo")
        ours = _train(root / "qckpt", steps, n_embd, n_layer, folders=False, callbacks=[callback])
        callback.repo.close()
        folder_bytes = _bytes_under(root / "hf")
        with qckpt.Repository.open(root / "repo") as repo:
            stats = repo.stats()
        repo_bytes = stats.stored_bytes + stats.warm_bytes
    results = {
        "steps": steps, "n_embd": n_embd, "n_layer": n_layer,
        "trainer_folders_bytes": folder_bytes, "qckpt_bytes": repo_bytes, "qckpt_history_bytes": stats.stored_bytes,
        "bytes_ratio": repo_bytes / folder_bytes,
        "train_s": {"no saves": plain, "trainer folders": hf, "qckpt callback": ours},
    }  # fmt: skip
    print(f"GPT-2 n_embd={n_embd} n_layer={n_layer}, {steps} steps, a save every step")
    print(f"at rest: Trainer folders {folder_bytes / 1e6:.1f} MB, qckpt {repo_bytes / 1e6:.1f} MB "
          f"(history {stats.stored_bytes / 1e6:.1f} MB + warm copy {stats.warm_bytes / 1e6:.1f} MB): "
          f"{results['bytes_ratio']:.3f}x")  # fmt: skip
    print(f"training time: no saves {plain:.1f}s, Trainer folders {hf:.1f}s ({hf / plain:.2f}x), "
          f"qckpt callback {ours:.1f}s ({ours / plain:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results
