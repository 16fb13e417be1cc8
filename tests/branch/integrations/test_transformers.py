"""The light cone in the Hugging Face Trainer: an event's futures are trained by the
Trainer itself (the control future equals the uninterrupted run bit for bit), the
run continues from the join to its last step, and misuse gets typed errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the qckpt[hf] extra is not installed")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import qckpt  # noqa: E402
from bench.compare import differences  # noqa: E402
from branch import ConeConfig, ConeRecord  # noqa: E402
from branch.integrations.transformers import LightConeCallback  # noqa: E402
from qckpt.integrations.transformers import QckptCallback  # noqa: E402
from tests.integrations.hf_workload import StdlibBytes, StopAfter  # noqa: E402

STEPS, SPIKE = 64, 36


class _Schedule:
    """A constant learning rate, 300 times higher for two steps from ``SPIKE``: a bad
    schedule the run trips over (and every replay of it from before the spike)."""

    def __call__(self, step: int) -> float:
        return 300.0 if SPIKE <= step < SPIKE + 2 else 1.0


def _trainer(out: Path, callbacks: list[TrainerCallback], *, logging_steps: int = 1) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule())
    args = TrainingArguments(
        str(out / "hf"), max_steps=STEPS, per_device_train_batch_size=4, seed=1, logging_steps=logging_steps,
        save_strategy="no", eval_strategy="steps", eval_steps=10, per_device_eval_batch_size=8,
        logging_nan_inf_filter=False, use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=StdlibBytes(96), eval_dataset=StdlibBytes(32, offset=8192),
                   optimizers=(optimizer, schedule), callbacks=callbacks)  # fmt: skip


def _model(repo: qckpt.Repository, revision: str) -> dict[str, Any]:
    return repo.load(revision).tree()["components"]["model"]


@pytest.mark.slow
def test_an_event_runs_its_futures_through_the_trainer_and_the_run_goes_on_from_the_join(tmp_path: Path) -> None:
    cone = LightConeCallback(tmp_path / "repo", config=ConeConfig(horizon=16, commit_every=4, resamples=300),
                             eval_batches=4)  # fmt: skip
    trainer = _trainer(tmp_path, [cone])
    record = cone.train(trainer)
    assert record.events, "the learning-rate spike went unnoticed"
    event = record.events[0]
    assert SPIKE < event["trigger"]["step"] <= SPIKE + 8
    origin, futures = event["origin"], event["futures"]
    assert origin["step"] < SPIKE and event["rollouts"]["strategy"] == "framework"
    assert [f["name"] for f in futures][0] == "control" and len(futures) == 5
    repo = cone.repo
    for future in futures:
        history = repo.log(future["branch"])  # newest first, down to the repository's first commit
        start = history[[s.id for s in history].index(origin["snapshot"]) - 1]  # the origin, intervened: the first
        assert start.parents == (origin["snapshot"],) and start.step == origin["step"]
        assert start.message.startswith(f"future {future['name']} from step {origin['step']}")
        assert len(future["eval"]) == 4 and future["snapshot"] == history[0].id
    control = next(f for f in futures if f["name"] == "control")
    assert [m[0] for m in control["metrics"]] == list(range(origin["step"] + 1, origin["step"] + 17))  # past the spike

    # the control future is the run continued from the origin: the same as a run without the light cone
    plain = QckptCallback(tmp_path / "plain")
    _trainer(tmp_path / "p", [plain]).train()
    horizon_step = origin["step"] + 16
    assert differences(_model(repo, control["snapshot"]), _model(plain.repo, f"main@{horizon_step}")) == []

    # the run went on from the join, to the last step, and its record is stored
    head = repo.snapshot("main")
    chosen = next(f for f in futures if f["name"] == event["selection"]["chosen"])
    assert trainer.state.global_step == STEPS and head.step <= STEPS
    join = repo.snapshot(event["join"])
    assert set(join.parents[1:]) == {repo.snapshot(f["branch"]).id for f in futures}
    assert differences(_model(repo, join.id), _model(repo, chosen["snapshot"])) == []
    assert join.id in {s.id for s in repo.log("main")}
    assert ConeRecord.load(repo, "main").events[0]["join"] == join.id
    assert record.main[-1][0] == STEPS  # skipped batches count as Trainer steps: the run still ends at max_steps
    assert repo.fsck().ok

    # preempted at step 28 (a commit step) and resumed by a new callback and Trainer: the detectors remember (their warm-up is 25
    # steps), the rollback reaches the commits from before the restart, and the run ends where the uninterrupted did
    config = ConeConfig(horizon=16, commit_every=4, resamples=300)
    first = LightConeCallback(tmp_path / "again", config=config, eval_batches=4)
    assert not first.train(_trainer(tmp_path / "a", [first, StopAfter(28)])).events
    resumed = LightConeCallback(tmp_path / "again", config=config, eval_batches=4)
    again = resumed.train(_trainer(tmp_path / "b", [resumed]))
    assert [e["origin"]["step"] for e in again.events] == [e["origin"]["step"] for e in record.events]
    assert differences(_model(resumed.repo, "main"), _model(repo, "main")) == []


def test_misuse_gets_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(qckpt.InvalidInputError, match="eval_batches"):
        LightConeCallback(tmp_path / "repo", eval_batches=0)
    cone = LightConeCallback(tmp_path / "repo")
    with pytest.raises(qckpt.InvalidInputError, match="logging_steps=1"):
        cone.train(_trainer(tmp_path, [cone], logging_steps=5))
    with pytest.raises(qckpt.InvalidInputError, match="callbacks=\\[cone\\]"):
        cone.train(_trainer(tmp_path, []))
    with pytest.raises(qckpt.InvalidInputError, match="cone.train\\(trainer\\)"):
        _trainer(tmp_path, [LightConeCallback(tmp_path / "repo")]).train()
    assert "main" not in cone.repo.branches()  # nothing was committed
