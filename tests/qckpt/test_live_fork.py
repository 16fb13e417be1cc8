"""Forking a live training state for rollouts: independent, copy-on-write."""

from __future__ import annotations

import pytest
import torch

import qckpt
from bench.compare import differences
from bench.workload import Trainer, train_step

COW = hasattr(torch, "_lazy_clone")


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.const_data_ptr() == b.const_data_ptr()  # read-only pointer: does not trigger the copy


def test_forks_are_independent_and_train_like_the_original() -> None:
    trainer = Trainer("tiny", total_steps=20)
    for _ in range(2):
        trainer.train_step()
    before = trainer.state.capture()
    forks = trainer.state.fork(3)
    assert all(differences(f.capture()["components"], before["components"]) == [] for f in forks)

    fork = forks[0]
    model, opt = fork.components["model"], fork.components["optimizer"]
    assert opt.param_groups[0]["params"][0] is next(model.parameters())  # wired to its own parameters
    assert fork.components["scheduler"].optimizer is opt
    rng = torch.get_rng_state()
    fork_loss = train_step(fork)

    assert differences(trainer.state.capture()["components"], before["components"]) == []  # original untouched
    assert differences(forks[1].capture()["components"], before["components"]) == []  # siblings untouched
    assert differences(fork.capture()["components"]["model"], before["components"]["model"])  # the fork moved

    torch.set_rng_state(rng)  # same dropout draws: the original's step must give the fork's bits
    assert trainer.train_step() == fork_loss
    assert differences(fork.capture()["components"], trainer.state.capture()["components"]) == []
    assert fork.step == trainer.state.step == 3


@pytest.mark.skipif(not COW, reason="this PyTorch has no copy-on-write storage")
def test_forks_share_memory_until_written() -> None:
    model = torch.nn.Linear(256, 256)
    frozen = torch.nn.Linear(256, 256).requires_grad_(False)
    net = torch.nn.Sequential(frozen, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = qckpt.TrainingState(net=net, optimizer=opt)
    a, b = state.fork(2)
    a_net, b_net = a.components["net"], b.components["net"]
    assert _shares(a_net[0].weight, net[0].weight) and _shares(b_net[1].weight, net[1].weight)
    assert a_net[0].weight.requires_grad is False and a_net[1].weight.requires_grad is True
    a_net(torch.randn(4, 256)).sum().backward()
    a.components["optimizer"].step()
    assert not _shares(a_net[1].weight, net[1].weight)  # written: now private
    assert _shares(a_net[0].weight, net[0].weight)  # frozen layer still shared
    assert _shares(b_net[1].weight, net[1].weight)  # the sibling never wrote


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
OPTIMIZERS = {
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),
    "adamw-single": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=False),
    "sgd-momentum-foreach": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_a_forks_optimizer_step_never_writes_the_original(device: str, optimizer: str) -> None:
    """Regression: on CUDA, multi-tensor kernels wrote through lazy clones into the
    original's parameters and optimizer state (random data: zeros would hide it)."""
    model = torch.nn.Linear(32, 32).to(device)
    opt = OPTIMIZERS[optimizer](model.parameters())
    for _ in range(2):  # optimizer state exists before the fork
        opt.zero_grad()
        model(torch.randn(8, 32, device=device)).square().mean().backward()
        opt.step()
    state = qckpt.TrainingState(model=model, optimizer=opt)
    before = state.capture()
    fork = state.fork()[0]
    fork_model = fork.components["model"]
    fork_model(torch.randn(8, 32, device=device)).square().mean().backward()
    fork.components["optimizer"].step()
    assert differences(fork.capture()["components"]["model"], before["components"]["model"])  # the fork moved
    assert differences(state.capture()["components"], before["components"]) == []  # the original did not


def test_fork_validates_k() -> None:
    with pytest.raises(qckpt.InvalidInputError):
        qckpt.TrainingState().fork(0)


def test_load_from_a_fork_takes_its_contents_and_its_lineage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = Trainer("tiny", total_steps=20)
    trainer.train_step()
    with qckpt.Repository.init(tmp_path / "r") as repo:
        origin = repo.commit(trainer.state, branch="main")
        fork = trainer.state.fork()[0]
        train_step(fork)
        repo.commit(trainer.state, branch="other")  # the original moves on elsewhere...
        trainer.state.load_from(fork)  # ...then takes the fork's result
        assert differences(trainer.state.capture()["components"], fork.capture()["components"]) == []
        assert trainer.state.step == fork.step == 2
        snap = repo.commit(trainer.state, branch="main")  # parented where the fork came from, not on "other"
        assert snap.parents == (origin.id,)
