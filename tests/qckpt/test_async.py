"""Asynchronous commits: same bits as synchronous ones, failures surface and never
move a branch past them, bounded memory, flush on close, CUDA staging."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

import qckpt
from bench.workload import Trainer, train_step
from qckpt.errors import BackendError


class PackFailures(qckpt.MemoryBackend):
    """Fails pack writes while ``failing`` is set, after waiting for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.release = threading.Event()

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        if self.failing and key.startswith("packs/"):
            self.release.wait(10)
            raise BackendError("injected: no space left on device")
        super().put(key, data, exclusive=exclusive)


class GatedPacks(qckpt.MemoryBackend):
    """Holds pack writes while ``gate`` is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        if key.startswith("packs/"):
            assert self.gate.wait(20), "the gate stayed closed"
        super().put(key, data, exclusive=exclusive)


def test_a_snapshot_restores_while_commits_are_in_flight_and_a_revision_waits() -> None:
    """What lets the light cone train the next future while the last one is written:
    a restore of a ``Snapshot`` (it names itself) does not wait for the writer; a
    revision string does, even a full id (a branch may bear that name)."""
    backend = GatedPacks()
    trainer = Trainer("tiny", total_steps=20)
    with qckpt.Repository.init(backend) as repo:
        train_step(trainer.state)
        origin = repo.commit(trainer.state)
        expected = [p.detach().clone() for p in trainer.model.parameters()]
        train_step(trainer.state)
        backend.gate.clear()
        in_flight = repo.commit_async(trainer.state, branch="future")
        assert repo.restore(trainer.state, origin) == origin
        assert not in_flight.done()
        assert all(torch.equal(p, e) for p, e in zip(trainer.model.parameters(), expected))
        backend.gate.set()
        assert in_flight.wait().id == repo.snapshot("future").id
        train_step(trainer.state)
        backend.gate.clear()
        named = repo.commit_async(trainer.state, branch="other")
        threading.Timer(0.3, backend.gate.set).start()
        assert repo.restore(trainer.state, "other").id == named.wait().id
        backend.gate.clear()
        again = repo.commit_async(trainer.state, branch="other")
        threading.Timer(0.3, backend.gate.set).start()
        assert repo.restore(trainer.state, origin.id) == origin and again.done()
    with qckpt.Repository.init(qckpt.MemoryBackend()) as other, pytest.raises(qckpt.RevisionNotFoundError):
        other.restore(trainer.state, origin)  # another repository's snapshot: a typed error, nothing loaded


def test_async_commits_equal_sync_commits_bit_for_bit() -> None:
    trainer = Trainer("tiny", total_steps=20)
    repos = [qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=4096) for _ in range(2)]
    handles = []
    for _ in range(8):
        train_step(trainer.state)
        handles.append(repos[0].commit_async(trainer.state))  # written while training goes on...
        repos[1].commit(trainer.state)  # ...this one before it does
    snaps = [h.wait() for h in handles]
    assert [h.snapshot_id for h in handles] == [s.id for s in snaps] and all(h.done() for h in handles)
    for a, b in zip(reversed(repos[0].log()), reversed(repos[1].log())):
        assert [t.chunks for t in repos[0].manifest(a).tensors] == [t.chunks for t in repos[1].manifest(b).tensors]
        assert a.stats == b.stats
    for repo in repos:
        repo.close()


def test_background_failure_surfaces_and_branch_stays_at_last_good_snapshot() -> None:
    backend = PackFailures()
    repo = qckpt.Repository.init(backend, chunk_size=1024)
    good = repo.commit({"w": torch.arange(1000.0)}, step=1)
    backend.failing = True
    failed = repo.commit_async({"w": torch.arange(1000.0) + 1}, step=2)
    queued = repo.commit_async({"w": torch.arange(1000.0) + 2}, step=3)
    backend.release.set()
    with pytest.raises(BackendError, match="no space"):
        failed.wait()
    with pytest.raises(qckpt.CommitAbortedError) as aborted:
        queued.wait()
    assert isinstance(aborted.value.__cause__, BackendError)
    assert repo.branches()["main"] == good.id and failed.snapshot_id is None
    backend.failing = False
    after = repo.commit({"w": torch.arange(1000.0) + 3}, step=4)  # the failure was reported by wait()
    assert after.parents == (good.id,) and torch.equal(repo.load("main")["w"], torch.arange(1000.0) + 3)
    repo.close()


def test_a_failed_pack_written_while_encoding_went_on_fails_the_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    import qckpt.commit.arrays

    monkeypatch.setattr(qckpt.commit.arrays, "PACK_TARGET_SIZE", 2048)  # a pack every two chunks: written in flight
    backend = PackFailures()
    backend.release.set()
    repo = qckpt.Repository.init(backend, chunk_size=1024)
    good = repo.commit({"w": torch.arange(1000.0)}, step=1)
    packs = len(backend.list("packs/"))
    backend.failing = True
    with pytest.raises(BackendError, match="no space") as failed:
        repo.commit({"w": torch.randn(4000)}, step=2)
    assert "another pack write of this commit failed too" in "".join(getattr(failed.value, "__notes__", []))
    assert repo.branches()["main"] == good.id and len(backend.list("packs/")) == packs
    backend.failing = False
    repo.commit({"w": torch.arange(1000.0) + 1}, step=3)
    assert repo.fsck().ok
    repo.close()


def test_unwaited_failure_is_raised_by_the_next_commit() -> None:
    backend = PackFailures()
    backend.release.set()
    repo = qckpt.Repository.init(backend, chunk_size=1024)
    backend.failing = True
    repo.commit_async({"w": torch.ones(10)})
    with pytest.raises(BackendError):
        repo.flush()
    backend.failing = False
    repo.commit_async({"w": torch.ones(10)})
    repo.close()
    with qckpt.Repository.open(backend) as again:
        assert len(again.log()) == 1


def test_memory_stays_bounded_over_200_rapid_commits() -> None:
    state = {"w": torch.zeros(1 << 20)}  # 4 MiB
    repo = qckpt.Repository.init(qckpt.MemoryBackend(), max_pending=2, hot_snapshots=2)
    tracemalloc.start()
    try:
        for step in range(200):
            state["w"][step] = step  # each commit differs (one chunk changes)
            repo.commit_async(state, step=step)
        repo.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # queued + writing + hot + recycled buffers, plus encoding scratch: a handful of states, not 200
    assert peak < 12 * (4 << 20), peak
    assert len(repo.log()) == 200
    repo.close()


def test_close_writes_pending_commits(tmp_path: Path) -> None:
    repo = qckpt.Repository.init(tmp_path / "repo")
    handles = [repo.commit_async({"w": torch.full((1000,), float(i))}, step=i) for i in range(5)]
    repo.close()
    assert all(h.done() for h in handles)
    with qckpt.Repository.open(tmp_path / "repo") as reopened:
        assert [s.step for s in reopened.log()] == [4, 3, 2, 1, 0]


def test_validation_errors_are_raised_by_commit_async_itself() -> None:
    repo = qckpt.Repository.init(qckpt.MemoryBackend())
    with pytest.raises(qckpt.UnsupportedValueError, match="w"):
        repo.commit_async({"w": object()})
    assert repo.branches() == {}
    repo.close()


def test_contiguous_tensors_with_odd_strides_on_size_one_dims_round_trip() -> None:
    """Size-1 dimensions may carry any stride on a contiguous tensor; staging must
    still read exactly the elements (Hypothesis found a 1-element, stride-2 case)."""
    base = torch.arange(12, dtype=torch.float32)
    tree = {"one": base[3::2][:1], "row": base.as_strided((1, 3), (7, 1), 3)}
    assert all(t.is_contiguous() for t in tree.values())
    repo = qckpt.Repository.init(qckpt.MemoryBackend())
    repo.commit(tree, message="odd strides")
    restored = repo.load("main").tree()
    for key, value in tree.items():
        assert torch.equal(restored[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_staged_through_pinned_memory() -> None:
    model = torch.nn.Linear(64, 64).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    state = qckpt.TrainingState(model=model, optimizer=optimizer)
    repo = qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=1024)
    loss: Any = model(torch.randn(8, 64, device="cuda")).square().mean()
    loss.backward()
    optimizer.step()
    handle = repo.commit_async(state)
    with torch.no_grad():
        expected = model.weight.detach().cpu().clone()
        model.weight.add_(1.0)  # changing it after staging does not change the commit
    snapshot = handle.wait()
    assert torch.equal(repo.load(snapshot.id)["components/model/weight"], expected)
    restored = qckpt.TrainingState(model=torch.nn.Linear(64, 64).cuda(), optimizer=torch.optim.AdamW(model.parameters()))
    repo.restore(restored, snapshot.id)
    assert torch.equal(restored.components["model"].weight.cpu(), expected)
    repo.close()


def test_interpreter_exit_flushes_pending_commits(tmp_path: Path) -> None:
    script = (
        "import sys, torch, qckpt\n"
        "repo = qckpt.Repository.init(sys.argv[1])\n"
        "for i in range(5):\n"
        "    repo.commit_async({'w': torch.full((100_000,), float(i))}, step=i)\n"
        "# no flush, no close: interpreter exit must write them\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "repo")], check=True, timeout=120)
    with qckpt.Repository.open(tmp_path / "repo") as repo:
        assert [s.step for s in repo.log()] == [4, 3, 2, 1, 0]
        assert torch.equal(repo.load("main")["w"], torch.full((100_000,), 4.0)) and repo.fsck().ok


def _exit_quietly() -> None:
    pass


def test_a_forked_child_exits_without_waiting_for_the_parents_commits(tmp_path: Path) -> None:
    """DataLoader workers are forked from the training process: at exit they must not
    wait for commits queued in the parent, whose writer thread they do not have."""
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        writing = threading.Event()
        repo._writer.submit(writing.wait)  # the parent's writer is busy: a commit is queued
        try:
            child = multiprocessing.get_context("fork").Process(target=_exit_quietly)
            child.start()
            child.join(20)
            assert child.exitcode == 0, "the forked child waited for the parent's commits at exit"
        finally:
            writing.set()
            if child.is_alive():
                child.kill()
