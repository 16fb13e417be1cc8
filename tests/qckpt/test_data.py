"""Data position: a DataLoader loop stopped mid-epoch and restored from a snapshot
continues exactly as the uninterrupted run did, with qckpt's ResumableSampler
(plain DataLoader) and with torchdata's StatefulDataLoader (worker processes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import qckpt
from bench.compare import differences
from bench.workload import SIZES, CharGPT, load_corpus

SIZE = SIZES["tiny"]
STEPS, STOP_AT = 14, 6  # 40 windows in batches of 8: 5 steps an epoch, so 6 is mid-way through epoch 2


class Windows(Dataset):
    """Non-overlapping windows of the standard library's source: (input, target) byte pairs."""

    def __init__(self, count: int = 40) -> None:
        self.data, self.count = load_corpus(1 << 16), count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.data[i * (SIZE.block_size + 1) : (i + 1) * (SIZE.block_size + 1)].long()
        return w[:-1], w[1:]


def plain_loader(ds: Dataset) -> tuple[Any, Any]:
    """The unprotected loop: DataLoader(shuffle=True); its position is not in the state."""
    return DataLoader(ds, batch_size=8, shuffle=True), None


def sampler_loader(ds: Dataset) -> tuple[Any, Any]:
    sampler = qckpt.ResumableSampler(ds, seed=7)
    return DataLoader(ds, batch_size=8, sampler=sampler, generator=sampler.generator), sampler


def stateful_loader(ds: Dataset) -> tuple[Any, Any]:
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(ds, batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(7))
    return loader, loader


def run(repo: qckpt.Repository, make_loader: Callable[[Dataset], tuple[Any, Any]], resume: str | None) -> dict:
    """Train to STEPS, committing every step, from scratch or from the snapshot
    ``resume`` in freshly built objects; returns the final weights."""
    torch.manual_seed(0)
    model = CharGPT(SIZE, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader, position = make_loader(Windows())
    components = {"model": model, "optimizer": optimizer} | ({"data": position} if position is not None else {})
    state = qckpt.TrainingState(**components)
    if resume is not None:
        torch.manual_seed(1234)  # a new process: the global RNG holds something else until the restore
        repo.restore(state, resume)
    while state.step < STEPS:
        for x, y in loader:
            loss = model(x, y) + 0.01 * torch.randn(()).abs()  # the loop itself draws from the global RNG too
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.step += 1
            repo.commit(state, branch="resumed" if resume else "main", metrics={"loss": loss})
            if state.step == STEPS:
                break
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make_loader", [sampler_loader, stateful_loader], ids=["ResumableSampler", "StatefulDataLoader"])
def test_mid_epoch_resume_is_bit_exact(tmp_path: Any, make_loader: Callable) -> None:
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        uninterrupted = run(repo, make_loader, None)
        resumed = run(repo, make_loader, f"main@{STOP_AT}")
    assert differences(resumed, uninterrupted) == []


def test_control_a_plain_dataloader_does_not_resume_mid_epoch(tmp_path: Any) -> None:
    """Shows the comparison above can fail: without the data position in the state the
    resumed run sees other batches and ends elsewhere."""
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        uninterrupted = run(repo, plain_loader, None)
        resumed = run(repo, plain_loader, f"main@{STOP_AT}")
    assert differences(resumed, uninterrupted) != []


def test_iterating_the_loader_never_draws_from_the_global_rng() -> None:
    ds = Windows()
    _, sampler = sampler_loader(ds)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, generator=sampler.generator)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for _ in range(3):
        next(iter(loader))  # a new iterator each time, as a resumed loop makes one
    assert torch.equal(torch.rand(3), expected)


def test_epochs_are_permutations_and_state_round_trips() -> None:
    sampler = qckpt.ResumableSampler(10, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert sampler.state_dict() == {"seed": 3, "epoch": 2, "position": 0, "size": 10, "shuffle": True}
    it = iter(sampler)
    head = [next(it) for _ in range(4)]
    other = qckpt.ResumableSampler(10, seed=3)
    other.load_state_dict(sampler.state_dict())
    assert head + list(other) == sampler.order(2)
    assert list(qckpt.ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]


def test_a_position_for_another_dataset_is_refused() -> None:
    saved = qckpt.ResumableSampler(10).state_dict()
    with pytest.raises(qckpt.StateMismatchError, match="10 samples"):
        qckpt.ResumableSampler(12).load_state_dict(saved)
    with pytest.raises(qckpt.InvalidInputError):
        qckpt.ResumableSampler([])


def test_restoring_another_datasets_position_modifies_nothing(tmp_path: Any) -> None:
    model = torch.nn.Linear(2, 2)
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        snap = repo.commit(qckpt.TrainingState(model=model, data=qckpt.ResumableSampler(10)))
        other = torch.nn.Linear(2, 2)
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(qckpt.StateMismatchError, match="data: the saved data position is for 10 samples"):
            repo.restore(qckpt.TrainingState(model=other, data=qckpt.ResumableSampler(12)), snap.id)
        assert differences(dict(other.state_dict()), before) == []
