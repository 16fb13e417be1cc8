"""The Hugging Face Trainer callback: new-process resume mid-epoch (dropout, shuffling,
evaluation at the resumed step, loader workers) equal bitwise to an uninterrupted
run; wrong revisions and mismatched models get qckpt's typed errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the qckpt[hf] extra is not installed")

import qckpt  # noqa: E402
from qckpt.integrations.transformers import QckptCallback  # noqa: E402
from tests.integrations.hf_workload import MAX_STEPS, STOP_AT, trainer  # noqa: E402
from tests.integrations.workloads import max_difference, run_workload  # noqa: E402


def _run(mode: str, workers: int, out: Path) -> dict[str, torch.Tensor]:
    return run_workload("hf_workload", mode, workers, out)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_equals_the_uninterrupted_run(tmp_path: Path, workers: int) -> None:
    uninterrupted = _run("full", workers, tmp_path)
    _run("stop", workers, tmp_path)  # ends after step 6: mid-epoch, right after an evaluation
    with qckpt.Repository.open(tmp_path / "repo") as repo:
        assert [s.step for s in repo.log()] == list(range(STOP_AT, 0, -1))
    resumed = _run("resume", workers, tmp_path)
    assert max_difference(uninterrupted, resumed) == 0.0
    with qckpt.Repository.open(tmp_path / "repo") as repo:
        history = repo.log()
        assert [s.step for s in history] == list(range(MAX_STEPS, 0, -1))  # one line: the resume continued it
        assert repo.fsck().ok
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"qckpt-{history[MAX_STEPS - STOP_AT].short_id}-*"))


def test_resuming_without_the_rng_diverges(tmp_path: Path) -> None:
    """The comparison above can fail: the same resume with the RNG file left out
    (the Trainer then warns and goes on with its seed) ends elsewhere."""
    uninterrupted = _run("full", 0, tmp_path)
    _run("stop", 0, tmp_path)
    callback = QckptCallback(tmp_path / "repo")
    run = trainer(tmp_path, 0, [callback])
    folder = callback.checkpoint()
    assert folder is not None
    os.remove(os.path.join(folder, "rng_state.pth"))
    run.train(resume_from_checkpoint=folder)
    assert max_difference(uninterrupted, run.model.state_dict()) > 0
    assert not os.path.exists(folder)  # removed when training ended


def test_every_commits_on_the_cadence_and_the_final_step(tmp_path: Path) -> None:
    callback = QckptCallback(tmp_path / "repo", branch="hf", every=6)
    trainer(tmp_path, 0, [callback]).train(resume_from_checkpoint=callback.checkpoint(missing_ok=True))
    history = callback.repo.log("hf")
    assert [s.step for s in history] == [20, 18, 12, 6]  # the final step off the cadence too
    assert all(s.metrics["eval_loss"] > 0 for s in history[1:])  # evaluation steps: committed after it, with its metrics


def test_wrong_revisions_and_mismatched_models_get_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(qckpt.InvalidInputError):
        QckptCallback(tmp_path / "repo", every=0)
    callback = QckptCallback(tmp_path / "repo")
    trainer(tmp_path, 0, [callback])
    assert callback.checkpoint(missing_ok=True) is None
    with pytest.raises(qckpt.RevisionNotFoundError):
        callback.checkpoint()
    callback.repo.commit({"w": torch.ones(3)}, branch="plain")
    with pytest.raises(qckpt.StateMismatchError, match="not committed by QckptCallback"):
        callback.checkpoint("plain")
    trainer(tmp_path, 0, [callback]).train()
    wider = QckptCallback(tmp_path / "repo")
    trainer(tmp_path, 0, [wider], n_embd=64)
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("qckpt-*"))
    with pytest.raises(qckpt.StateMismatchError, match="does not fit the Trainer's model") as info:
        wider.checkpoint()
    assert any("transformer.wte.weight" in p for p in info.value.problems)
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("qckpt-*")) == before  # nothing written
