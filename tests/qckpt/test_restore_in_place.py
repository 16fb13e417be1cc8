"""Rollbacks from the hot tier into optimizers that have state already copy into
their own tensors (those of at least 64 KiB), whatever put the snapshot there,
and train on exactly as restores into new optimizers do; shared or
copy-on-write tensors are never written through."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import qckpt
from bench.workload import Trainer, train_step
from qckpt.repository import _in_place_targets


def _large(tensors: list[torch.Tensor]) -> list[int]:
    """Storage addresses of the tensors a restore copies into in place."""
    return [t.untyped_storage().data_ptr() for t in tensors if t.nbytes >= 1 << 16]


def _moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _commit_and_move_on(repo: qckpt.Repository, trainer: Trainer) -> tuple[qckpt.Snapshot, list[torch.Tensor]]:
    """Train a step and commit it, then train one more; the snapshot and its optimizer state."""
    train_step(trainer.state)
    snap = repo.commit(trainer.state)
    expected = [t.clone() for t in _moments(trainer.optimizer)]
    train_step(trainer.state)
    return snap, expected


def _values(state: qckpt.TrainingState) -> list[torch.Tensor]:
    """Copies of the model's and the optimizer's tensors."""
    optimizer = state.components["optimizer"]
    return [t.detach().clone() for t in state.components["model"].state_dict().values()] + [t.clone() for t in _moments(optimizer)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("hot_by", ["commit", "restore from a warm copy", "restore of a download", "restore from packs"])
def test_a_rollback_writes_the_optimizers_own_tensors_and_trains_on_the_same(tmp_path: Path, hot_by: str) -> None:
    location = qckpt.MemoryBackend() if hot_by == "restore of a download" else tmp_path / "repo"
    trainer = Trainer("tiny", total_steps=50)
    reference = Trainer("tiny", total_steps=50, seed=99)  # a new optimizer, without state: new buffers
    repo = qckpt.Repository.init(location, warm=hot_by != "restore from packs")
    for _ in range(3):
        train_step(trainer.state)
    snap = repo.commit(trainer.state)  # hot: the staged buffers
    expected = _values(trainer.state)
    if hot_by != "commit":
        repo.close()
        repo = qckpt.Repository.open(location)
        repo.restore(trainer.state, snap.id)  # hot: what was read (read-only where a warm copy is mapped)
    with repo:
        train_step(trainer.state)  # the live run moves on
        own = _large(_moments(trainer.optimizer))
        assert own
        repo.restore(trainer.state, snap.id)  # from the hot tier
        assert _large(_moments(trainer.optimizer)) == own  # written in place
        assert _equal(_values(trainer.state), expected)
        train_step(trainer.state)
        repo.restore(reference.state, snap.id)  # the process RNG too: the same dropout next step
        train_step(reference.state)
        assert _equal(_values(trainer.state), _values(reference.state))


def test_restoring_into_a_fork_leaves_the_original_alone(tmp_path: Path) -> None:
    """A fork's parameters and optimizer tensors share memory with the original's
    until written (copy-on-write): restoring into them in place must give the fork
    its own."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        train_step(trainer.state)
        snap = repo.commit(trainer.state)
        expected = _values(trainer.state)
        train_step(trainer.state)
        original = _values(trainer.state)
        (fork,) = trainer.state.fork(1)
        repo.restore(fork, snap.id)
    assert _equal(_values(fork), expected) and _equal(_values(trainer.state), original)


def test_tensors_shared_between_entries_are_not_written_twice(tmp_path: Path) -> None:
    """Two optimizer entries that share one tensor in the live state (here set up
    on purpose) each get their own values back, not the last one written."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        snap, expected = _commit_and_move_on(repo, trainer)
        for s in trainer.optimizer.state.values():
            s["exp_avg_sq"] = s["exp_avg"]  # one tensor at two paths
        repo.restore(trainer.state, snap.id)
    assert _equal(_moments(trainer.optimizer), expected)


@pytest.mark.parametrize("warm", [True, False], ids=["warm copy", "packs"])
def test_a_damaged_snapshot_leaves_the_optimizer_untouched(tmp_path: Path, warm: bool) -> None:
    path = tmp_path / "repo"
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path, warm=warm) as repo:
        train_step(trainer.state)
        snap = repo.commit(trainer.state)
    for folder in ("packs", "warm"):  # every copy of the data damaged: nothing sound to restore from
        for blob in (path / folder).iterdir() if (path / folder).exists() else ():
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0x40
            blob.write_bytes(bytes(data))
    train_step(trainer.state)
    before = _values(trainer.state)
    with qckpt.Repository.open(path, hot_snapshots=0) as repo, pytest.raises(qckpt.IntegrityError, match=snap.short_id):
        repo.restore(trainer.state, snap.id)
    assert _equal(_values(trainer.state), before)


def test_rolling_back_to_one_snapshot_between_commits_elsewhere_keeps_it_hot(tmp_path: Path) -> None:
    """The light cone's sequential futures: restore the origin, train, commit on the
    future's branch, again and again. A restore counts as a use of the hot tier, so
    the origin outlives any number of futures with the default two hot snapshots:
    every rollback writes the optimizer in place, which only a hot restore does."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "repo", warm=False) as repo:
        origin, _ = _commit_and_move_on(repo, trainer)
        own = _large(_moments(trainer.optimizer))
        for i in range(4):
            repo.restore(trainer.state, origin.id)
            assert _large(_moments(trainer.optimizer)) == own, f"future {i}: the origin was read from storage"
            train_step(trainer.state)
            repo.commit(trainer.state, branch=f"future-{i}", warm=False)


@pytest.mark.parametrize("writable", [True, False])
def test_a_buffer_copied_into_a_tensors_bytes_is_that_tensor_after(writable: bool) -> None:
    """The GPU rollback's two steps, on a CPU tensor: the hot buffer (writable, or a
    read-only mapped warm copy) copied into the live tensor's bytes, which then stand
    for the restored value (the same storage, no host copy of its own)."""
    from qckpt.format.records import TensorEntry
    from qckpt.format.tensors import copied, flat_bytes
    from qckpt.store.store import as_value

    live = torch.zeros(3, 5)
    saved = torch.arange(15, dtype=torch.float32).reshape(3, 5)
    buffer = flat_bytes(saved).numpy().copy()
    buffer.flags.writeable = writable
    target = flat_bytes(live)
    assert copied(buffer, target) is target
    value = as_value(target, TensorEntry("p", "tensor", "float32", (3, 5), 1 << 20, ()))
    assert value.data_ptr() == live.data_ptr() and torch.equal(live, saved) and torch.equal(value, saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_rollback_on_the_gpu_copies_into_the_optimizers_own_device_tensors(tmp_path: Path) -> None:
    """From the hot tier (pinned buffers, staged from the GPU) straight into the live
    CUDA moments: the same device tensors, the values committed, none left on the host."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = qckpt.TrainingState(model=model, optimizer=optimizer)

    def step() -> None:
        optimizer.zero_grad()
        model(torch.randn(32, 256, device="cuda")).square().mean().backward()
        optimizer.step()
        state.step += 1

    with qckpt.Repository.init(tmp_path / "repo", warm=False) as repo:
        step()
        snap = repo.commit(state)
        expected = [t.clone() for t in _moments(optimizer)] + [p.detach().clone() for p in model.parameters()]
        step()
        own = _large(_moments(optimizer))
        repo.restore(state, snap.id)
        assert _large(_moments(optimizer)) == own
        assert all(t.is_cuda for t in _moments(optimizer) if t.nbytes >= 1 << 16)
        assert _equal([*_moments(optimizer), *[p.detach() for p in model.parameters()]], expected)


@pytest.mark.parametrize("named_by", ["revision", "commit in flight"])
def test_a_kept_snapshot_stays_hot_through_any_number_of_commits_and_goes_after(tmp_path: Path, named_by: str) -> None:
    """``keep_hot``: futures that commit more often than the hot tier holds (two
    snapshots by default) still find their origin there, whether it was named by
    a revision or by the handle of its commit still in flight; released, it is
    evicted like any other."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "repo", warm=False) as repo, contextlib.ExitStack() as block:
        if named_by == "revision":
            origin, _ = _commit_and_move_on(repo, trainer)
            assert block.enter_context(repo.keep_hot(origin.short_id)) == origin
        else:
            train_step(trainer.state)
            handle = repo.commit_async(trainer.state)
            assert block.enter_context(repo.keep_hot(handle)) is handle
            train_step(trainer.state)
            origin = handle.wait()
        own = _large(_moments(trainer.optimizer))
        with block:
            for i in range(3):
                repo.restore(trainer.state, origin.id)
                assert _large(_moments(trainer.optimizer)) == own, f"future {i}: the origin was read from storage"
                for _ in range(3):
                    train_step(trainer.state)
                    repo.commit(trainer.state, branch=f"future-{i}", warm=False)
        for _ in range(2):
            train_step(trainer.state)
            repo.commit(trainer.state, branch="later", warm=False)
        repo.restore(trainer.state, origin.id)
        assert _large(_moments(trainer.optimizer)) != own  # read from storage: new buffers


def test_a_read_from_storage_stops_its_chains_at_hot_chunks(tmp_path: Path) -> None:
    """A snapshot that is not hot but descends from one (the light cone's chosen
    future, whose commits predict from the origin it kept hot) decodes only the
    commits since: with the hot snapshot's own packs gone, it still restores,
    bit for bit, and a repository whose hot tier is empty cannot."""
    path = tmp_path / "repo"
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path, warm=False) as repo:
        train_step(trainer.state)
        base = repo.commit(trainer.state)
        first_packs = set(os.listdir(path / "packs"))  # the keyframes every later chain starts from
        for _ in range(3):
            train_step(trainer.state)
            head = repo.commit(trainer.state)
        expected = _values(trainer.state)
    aside = tmp_path / "aside"
    aside.mkdir()
    fresh = Trainer("tiny", total_steps=50, seed=99)
    with qckpt.Repository.open(path) as repo:
        repo.restore(fresh.state, base.id)  # from the packs: now hot
        for name in first_packs:
            shutil.move(path / "packs" / name, aside / name)
        model = repo.load(head.id).tree()["components"]["model"]  # a view reads the same way
        assert all(torch.equal(model[k], v) for k, v in trainer.model.state_dict().items())
        repo.restore(fresh.state, head.id)
        assert _equal(_values(fresh.state), expected)
    with qckpt.Repository.open(path) as repo, pytest.raises(qckpt.IntegrityError, match="missing"):
        repo.restore(Trainer("tiny", total_steps=50, seed=98).state, head.id)


def _small_run(model: torch.nn.Module) -> tuple[qckpt.TrainingState, Callable[[], torch.Tensor]]:
    """A TrainingState of ``model`` (64 features in) with AdamW, and its training step,
    which returns the loss (still attached to its graph)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = qckpt.TrainingState(model=model, optimizer=optimizer, rng=False)
    generator = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(torch.randn(8, 64, generator=generator)).square().mean()
        loss.backward()
        optimizer.step()
        state.step += 1
        return loss

    return state, step


class _LoadsItsOwnWay(torch.nn.Linear):
    """A module with loading of its own (here it only records that it ran)."""

    calls: list[str]

    def _load_from_state_dict(self, *args: Any) -> None:
        self.calls.append("own loading")
        super()._load_from_state_dict(*args)


@pytest.mark.parametrize("how", ["plain", "hook", "own loading", "tied weights", "strided parameter", "batch norm"])
def test_a_rollback_writes_every_kind_of_module_in_place_and_autograd_sees_it(tmp_path: Path, how: str) -> None:
    """From the hot tier, a module that loads by ``Module``'s own copying (or a
    normalisation layer's, whose key migrations never apply to its own snapshot)
    is written in place without its ``load_state_dict``; with hooks, overridden
    loading or a parameter that is not contiguous it loads with
    ``load_state_dict``, as from storage (hooks and loading run). Either way
    the same parameter tensors hold exactly the committed values (tied and
    strided ones too), a backward through a graph built before the rollback raises, as after
    ``load_state_dict``'s copies, and training goes on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    loads: list[str] = []
    if how == "hook":
        model[0].register_load_state_dict_post_hook(lambda module, keys: loads.append("hook"))
    elif how == "own loading":
        model[2] = _LoadsItsOwnWay(64, 64)
        model[2].calls = loads
    elif how == "tied weights":
        model[0].weight = model[2].weight
    elif how == "strided parameter":
        model[0].weight = torch.nn.Parameter(torch.randn(64, 64).t())  # contiguous only as its transpose
    elif how == "batch norm":
        model[1] = torch.nn.BatchNorm1d(64)  # running statistics and a step count, all buffers
    state, step = _small_run(model)
    with qckpt.Repository.init(tmp_path / "repo", warm=False) as repo:
        step()
        snap = repo.commit(state)
        expected = _values(state)
        step()
        own = [p.untyped_storage().data_ptr() for p in model.parameters()]
        pending = model(torch.ones(2, 64)).sum()  # a graph that saved the parameters as they are now
        loads.clear()
        written = _in_place_targets(state, list(repo.manifest(snap).tensors)).modules
        assert written == ({"model"} if how in ("plain", "tied weights", "batch norm") else set())
        repo.restore(state, snap.id)
        assert [p.untyped_storage().data_ptr() for p in model.parameters()] == own
        assert _equal(_values(state), expected)
        assert loads == {"hook": ["hook"], "own loading": ["own loading"]}.get(how, [])
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            pending.backward()
        step()  # and trains on


def test_a_join_of_a_hot_snapshot_restores_from_memory_and_is_a_delta_base(tmp_path: Path) -> None:
    """A join has its winner's tensors: with the winner hot (a light cone's chosen
    future), restoring the join copies from memory into the live tensors, and the
    next commit on the join predicts from them, as from any hot snapshot, instead
    of storing every chunk self-contained."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "repo", warm=False) as repo:
        train_step(trainer.state)
        repo.commit(trainer.state)
        train_step(trainer.state)
        repo.commit(trainer.state, branch="future", metrics={"loss": 1.0})
        expected = _values(trainer.state)
        train_step(trainer.state)
        own = _large(_moments(trainer.optimizer))
        join = repo.join("main", ["future"])
        repo.restore(trainer.state, join.id)
        assert _large(_moments(trainer.optimizer)) == own, "the join was read from storage"
        assert _equal(_values(trainer.state), expected)
        train_step(trainer.state)
        after = repo.commit(trainer.state)
        assert after.parents == (join.id,)
        assert after.stats.new_stored_bytes < 0.5 * after.stats.new_raw_bytes  # self-contained: ~0.85 of them
