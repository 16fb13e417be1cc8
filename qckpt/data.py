"""Data position: a sampler that resumes a plain ``DataLoader`` mid-epoch bit-exactly.

Two things make a plain ``DataLoader`` loop resume differently from how it ran:

* the shuffled order of an epoch is lost: ``RandomSampler`` draws it afresh, so
  a restored run re-reads samples it has seen and skips others;
* every ``iter(loader)`` draws a base seed (and ``RandomSampler`` without a
  generator draws its seed) from the **global torch RNG**. A resumed run
  creates its iterator at a point where the original did not, so the global
  stream (dropout, ``torch.randn`` in the loop...) silently shifts.

``ResumableSampler`` fixes both: its order is a function of ``(seed, epoch)``
alone, its state is the epoch and the number of samples handed out, and it
carries the generator to give the loader, so creating iterators never draws
from the global RNG. Put it in the ``TrainingState``; then restoring the state
restores the data position. Exact when the loader draws indices as the loop
consumes batches (``num_workers=0``). Worker processes prefetch
``prefetch_factor x num_workers`` batches ahead, which the sampler cannot tell
from consumed ones: for worker loaders use torchdata's ``StatefulDataLoader``
(it has ``state_dict``/``load_state_dict`` and goes into the ``TrainingState``
the same way). Random augmentation inside workers is reproducible only when it
is seeded from the sample (index and ``epoch``), not from the worker's stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from qckpt.errors import InvalidInputError, StateMismatchError

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads (seed, epoch) pairs over the 64-bit seed space


class ResumableSampler(Sampler[int]):
    """Yields indices ``0..n-1`` (shuffled per epoch by default) and remembers where
    it is. Use as ``DataLoader(ds, sampler=s, generator=s.generator, ...)``.

    ``state_dict()`` is ``{"seed", "epoch", "position", "size", "shuffle"}``;
    ``load_state_dict`` refuses a state for a dataset of another size or
    shuffling (``StateMismatchError``; ``state_problems`` says why beforehand). An epoch ends when its iterator is
    exhausted; the next ``iter`` starts the next epoch at position 0. Not
    thread-safe (one loader iterates it).
    """

    def __init__(self, data_source: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        size = data_source if isinstance(data_source, int) else len(data_source)
        if size <= 0:
            raise InvalidInputError(f"ResumableSampler needs a non-empty dataset, got {size} samples")
        self.size, self.shuffle, self.seed = size, shuffle, int(seed)
        self.epoch = 0
        self.position = 0  # samples of this epoch handed out
        #: give this to the ``DataLoader`` (``generator=``): worker base seeds then
        #: come from it, not from the global torch RNG
        self.generator = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int) -> list[int]:
        """The indices of ``epoch``, in the order they are handed out."""
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) % (1 << 63))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.position < self.size:
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": self.size,
                "shuffle": self.shuffle}  # fmt: skip

    def state_problems(self, state: Any) -> list[str]:
        """Why ``state`` cannot be loaded here (``TrainingState`` asks before restoring anything)."""
        if not isinstance(state, dict) or not {"seed", "epoch", "position"} <= state.keys():
            return ["the snapshot does not hold a ResumableSampler state"]
        if state.get("size") != self.size or state.get("shuffle") != self.shuffle:
            return [f"the saved data position is for {state.get('size')} samples (shuffle={state.get('shuffle')}); "
                    f"this sampler has {self.size} (shuffle={self.shuffle})"]  # fmt: skip
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problems = self.state_problems(state)
        if problems:
            raise StateMismatchError("cannot load this data position", problems)
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
