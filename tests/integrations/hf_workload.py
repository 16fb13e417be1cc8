"""A small Hugging Face Trainer run for the integration tests: a GPT-2 built from a
config (random init, dropout 0.1), trained on bytes of the standard library's own
source, shuffled, evaluated every 6 steps. Run as a script, one mode per process:

    python -m tests.integrations.hf_workload MODE WORKERS DIR

``full`` trains 20 steps uninterrupted, without checkpoints; ``stop`` trains with the qckpt callback and
stops after step 6 (mid-epoch, an evaluation step); ``resume`` resumes from the
repository and finishes; ``hf-stop``/``hf-resume`` do the same with the Trainer's
own checkpoint folders. Each writes the final weights to ``DIR/MODE.pt``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from qckpt.integrations.transformers import QckptCallback

STOP_AT, MAX_STEPS = 6, 20


class StdlibBytes(Dataset):
    """Blocks of bytes of ``os.py``'s source, as token ids (vocabulary 256)."""

    def __init__(self, blocks: int = 64, block: int = 32, offset: int = 0) -> None:
        text = Path(os.__file__).read_bytes()[offset : offset + blocks * block]
        self.ids = torch.tensor(list(text), dtype=torch.long).view(blocks, block)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAfter(TrainerCallback):
    """Ends training after ``step`` (as a preemption would, once it is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer(out: Path, workers: int, callbacks: list[TrainerCallback], *, hf_saves: bool = False, n_embd: int = 32) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2))
    args = TrainingArguments(
        str(out / "hf"), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-3, seed=1,
        eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=8, logging_steps=2,
        save_strategy="steps" if hf_saves else "no", save_steps=1, dataloader_num_workers=workers,
        use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=StdlibBytes(), eval_dataset=StdlibBytes(16, offset=4096),
                   callbacks=callbacks)  # fmt: skip


def main(mode: str, workers: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stop = [StopAfter(STOP_AT)] if mode.endswith("stop") else []
    if mode == "full":
        run = trainer(out, workers, [])
        run.train()
    elif mode.startswith("hf"):
        run = trainer(out, workers, stop, hf_saves=True)
        run.train(resume_from_checkpoint=str(out / "hf" / f"checkpoint-{STOP_AT}") if mode == "hf-resume" else None)
    else:
        callback = QckptCallback(out / "repo")
        run = trainer(out, workers, [callback, *stop])
        run.train(resume_from_checkpoint=callback.checkpoint() if mode == "resume" else None)
    torch.save(run.model.state_dict(), out / f"{mode}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
