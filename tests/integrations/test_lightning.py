"""The Lightning checkpoint IO: new-process resume mid-epoch (dropout, shuffling,
loader workers) equal bitwise to an uninterrupted run, where Lightning's own
checkpoint files are not; ckpt_path names revisions or saved paths; typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="the qckpt[lightning] extra is not installed")
pytest.importorskip("torchdata")

import qckpt  # noqa: E402
from qckpt.integrations.lightning import QckptCheckpointIO  # noqa: E402
from tests.integrations.lightning_workload import MAX_STEPS, StopAfter, fit  # noqa: E402
from tests.integrations.workloads import max_difference, run_workload  # noqa: E402


def _run(mode: str, workers: int, out: Path) -> dict[str, torch.Tensor]:
    return run_workload("lightning_workload", mode, workers, out)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_a_new_process_equals_the_uninterrupted_run(tmp_path: Path, workers: int) -> None:
    uninterrupted = _run("full", workers, tmp_path)
    _run("stop", workers, tmp_path)  # ends after step 6 of 16 in the epoch
    resumed = _run("resume", workers, tmp_path)
    assert max_difference(uninterrupted, resumed) == 0.0
    with qckpt.Repository.open(tmp_path / "repo") as repo:
        history = repo.log()
        assert [s.step for s in history] == list(range(MAX_STEPS, 0, -1))  # one line: the resume continued it
        assert history[0].message.endswith(f"step={MAX_STEPS}.ckpt")
        assert repo.fsck().ok
    if workers == 0:  # the baseline, same run: Lightning's own files restore no RNG stream
        _run("pl-stop", workers, tmp_path)
        assert max_difference(uninterrupted, _run("pl-resume", workers, tmp_path)) > 0


def test_ckpt_path_names_revisions_and_saved_paths(tmp_path: Path) -> None:
    qckpt_io = QckptCheckpointIO(tmp_path / "repo", branch="run")
    assert qckpt_io.resume_path(missing_ok=True) is None
    with pytest.raises(qckpt.RevisionNotFoundError):
        qckpt_io.resume_path()
    from lightning.pytorch.callbacks import ModelCheckpoint

    fit("stop", 0, tmp_path, [qckpt_io, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5, save_top_k=-1,
                                                         filename="{step}")], None)  # fmt: skip
    history = qckpt_io.repo.log("run")
    assert [s.step for s in history] == [20, 15, 10, 5]
    assert not (tmp_path / "ck").exists()  # no files: the checkpoints are snapshots
    by_path = qckpt_io.load_checkpoint(tmp_path / "ck" / "step=10.ckpt")
    by_revision = qckpt_io.load_checkpoint("run@10")  # the snapshot of step 10
    assert by_path["global_step"] == by_revision["global_step"] == 10
    assert "qckpt_rng" not in by_path and by_path["loops"]["fit_loop"]["epoch_progress"]
    with pytest.raises(qckpt.RevisionNotFoundError, match="no checkpoint"):
        qckpt_io.load_checkpoint(tmp_path / "ck" / "step=11.ckpt")
    qckpt_io.remove_checkpoint(tmp_path / "ck" / "step=10.ckpt")  # save_top_k pruning keeps history
    assert len(qckpt_io.repo.log("run")) == 4


def test_one_checkpoint_io_serves_consecutive_fits(tmp_path: Path) -> None:
    """Each fit makes its own optimizers (and here its own module): what a second fit
    commits is its live state, not the first fit's."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    qckpt_io = QckptCheckpointIO(tmp_path / "repo")
    every_step = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    fit("stop", 0, tmp_path, [qckpt_io, every_step, StopAfter()], None)
    second = fit("resume", 0, tmp_path, [qckpt_io, every_step], qckpt_io.resume_path())
    head = qckpt_io.repo.load("main").tree()
    assert head["step"] == MAX_STEPS
    assert max_difference(head["components"]["model"], second.state_dict()) == 0.0


def test_wrong_revisions_and_mismatched_models_fail_through_lightning_with_typed_errors(tmp_path: Path) -> None:
    qckpt_io = QckptCheckpointIO(tmp_path / "repo")
    with pytest.raises(qckpt.RevisionNotFoundError):
        fit("resume", 0, tmp_path, [qckpt_io], "main@3")
    fit("stop", 0, tmp_path, [qckpt_io], None)
    qckpt_io.repo.flush()
    with pytest.raises(qckpt.StateMismatchError, match="does not fit the LightningModule") as info:
        fit("resume", 0, tmp_path, [QckptCheckpointIO(qckpt_io.repo)], "main", width=64)
    assert "state_dict/embed.weight: snapshot has" in "\n".join(info.value.problems)
    qckpt_io.repo.commit({"w": torch.ones(2)}, branch="plain")
    with pytest.raises(qckpt.StateMismatchError, match="not a Lightning checkpoint"):
        fit("resume", 0, tmp_path, [QckptCheckpointIO(qckpt_io.repo)], "plain")
