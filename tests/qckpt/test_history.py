"""Never lose history by mistake: lineage after restore, reset, the ref log, recovery,
GC protection, and operations that see the caller's pending commits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qckpt
from bench.workload import Trainer, train_step


def _run(repo: qckpt.Repository, trainer: Trainer, steps: int, branch: str = "main") -> None:
    for _ in range(steps):
        train_step(trainer.state)
        repo.commit(trainer.state, branch=branch, metrics={"loss": float(trainer.state.step)})


@pytest.fixture
def trainer() -> Trainer:
    return Trainer("tiny", total_steps=50)


def test_a_commit_after_restore_is_parented_on_the_restored_snapshot(repo: qckpt.Repository, trainer: Trainer) -> None:
    _run(repo, trainer, 6)
    restored = repo.restore(trainer.state, "main@3")
    with pytest.raises(qckpt.DivergedError, match="reset"):  # main is at step 6: never moved back by accident
        train_step(trainer.state)
        repo.commit(trainer.state)
    assert repo.snapshot("main").step == 6
    trainer.state.step = 3
    repo.restore(trainer.state, "main@3")
    _run(repo, trainer, 2, branch="retry")  # a new branch forks from the restored snapshot
    assert [s.step for s in repo.log("retry")] == [5, 4, 3, 2, 1]
    assert repo.snapshot("retry@4").parents == (restored.id,)
    repo.restore(trainer.state, "main@3")
    repo.reset("main", "main@3")  # the explicit move, recorded
    _run(repo, trainer, 2)
    assert [s.step for s in repo.log("main")] == [5, 4, 3, 2, 1]
    entry = repo.reflog("main")[2]
    assert (entry.cause, entry.rewinds, entry.new) == ("reset", True, restored.id)


def test_a_branch_deleted_under_a_live_run_is_recreated_on_its_last_commit(repo: qckpt.Repository, trainer: Trainer) -> None:
    _run(repo, trainer, 3, branch="run")
    last = repo.snapshot("run")
    repo.delete_branch("run")
    _run(repo, trainer, 1, branch="run")
    assert repo.snapshot("run").parents == (last.id,)  # not a new root
    assert [s.step for s in repo.log("run")] == [4, 3, 2, 1]


def test_the_ref_log_records_every_change_and_recovers_a_deleted_branch(repo: qckpt.Repository) -> None:
    first = repo.commit({"w": torch.zeros(4)})
    second = repo.commit({"w": torch.ones(4)})
    repo.create_branch("side", first.id)
    repo.create_tag("t", second.id)
    repo.delete_branch("side")
    log = repo.reflog()
    assert [(e.ref, e.cause) for e in log] == [("heads/side", "delete"), ("tags/t", "create"),
                                               ("heads/side", "create"), ("heads/main", "commit"),
                                               ("heads/main", "commit")]  # fmt: skip
    assert (log[0].old, log[0].new, log[0].rewinds) == (first.id, None, True)
    assert (log[3].old, log[3].new, log[3].rewinds) == (first.id, second.id, False)
    assert repo.restore_branch("side").id == first.id and repo.branches()["side"] == first.id
    with pytest.raises(qckpt.AlreadyExistsError):
        repo.restore_branch("side")
    with pytest.raises(qckpt.RevisionNotFoundError):
        repo.restore_branch("never-existed")


def test_gc_keeps_what_a_mistake_left_for_the_grace_period(repo: qckpt.Repository) -> None:
    for i in range(4):
        repo.commit({"w": torch.full((64,), float(i))}, step=i)
    lost = repo.snapshot("main")
    repo.reset("main", "main@1")  # a mistake: steps 2 and 3 are off every branch
    assert repo.gc().snapshots_deleted == 0
    assert repo.reflog("main")[0].old == lost.id
    repo.reset("main", lost.id)  # undone, from the ref log
    assert [s.step for s in repo.log()] == [3, 2, 1, 0]
    repo.reset("main", "main@1")
    report = repo.gc(qckpt.RetentionPolicy(keep_last=1))  # the lost head is kept like a branch head
    assert report.snapshots_kept == 2 and torch.equal(repo.load(lost.id)["w"], torch.full((64,), 3.0))
    assert repo.gc(qckpt.RetentionPolicy(keep_last=1, reflog_grace=0)).snapshots_deleted == 1


def test_a_misspelt_retention_metric_deletes_nothing(repo: qckpt.Repository) -> None:
    for i in range(5):
        repo.commit({"w": torch.full((8,), float(i))}, metrics={"loss": 1.0 / (i + 1)})
    with pytest.raises(qckpt.InvalidInputError, match="'los'.*recorded: loss"):
        repo.gc(qckpt.RetentionPolicy(keep_best="los"))
    assert len(repo.log()) == 5


def test_join_and_average_see_pending_commits(tmp_path: Path) -> None:
    with qckpt.Repository.init(tmp_path / "r", chunk_size=256) as repo:
        for step in range(1, 61):
            branch = "a" if step % 2 else "b"
            repo.commit_async({"w": torch.full((512,), float(step))}, branch=branch, step=step, metrics={"loss": -step})
        joined = repo.join("best", ["a", "b"], metric="loss")
        assert joined.step == 60  # the last commit, though it was still being written
        averaged = repo.average(["a", "b"], branch="avg")
        assert torch.equal(repo.load(averaged.id)["w"], torch.full((512,), 59.5))
