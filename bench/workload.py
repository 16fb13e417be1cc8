"""The reference workload shared by tests, demo and benchmarks.

A small GPT-like character-level (byte-level) transformer trained with AdamW,
warm-up + cosine learning rate and dropout, on the Python standard library's
own ``.py`` sources (present on every machine, offline), with seeded random
batch sampling whose position is part of the training state.
"""

from __future__ import annotations

import math
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import qckpt


@dataclass(frozen=True)
class ModelSize:
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    batch_size: int


SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(n_layer=2, n_embd=64, n_head=4, block_size=64, batch_size=8),  # ~0.13M params
    "3m": ModelSize(n_layer=4, n_embd=256, n_head=4, block_size=128, batch_size=8),  # ~3.3M
    "10m": ModelSize(n_layer=6, n_embd=384, n_head=6, block_size=128, batch_size=8),  # ~10.8M
    "100m": ModelSize(n_layer=14, n_embd=768, n_head=12, block_size=128, batch_size=4),  # ~99.6M
}
VOCAB = 256  # bytes


def load_corpus(max_bytes: int = 1 << 20) -> torch.Tensor:
    """The first ``max_bytes`` of the stdlib's top-level ``.py`` files (sorted by name), as uint8."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    corpus = b"\n".join(parts)[:max_bytes]
    if len(corpus) < 4096:
        raise RuntimeError(f"standard library sources not found under {stdlib}")
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


class CausalSelfAttention(nn.Module):
    def __init__(self, size: ModelSize, dropout: float) -> None:
        super().__init__()
        self.n_head = size.n_head
        self.qkv = nn.Linear(size.n_embd, 3 * size.n_embd)
        self.proj = nn.Linear(size.n_embd, size.n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, size: ModelSize, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(size.n_embd)
        self.attn = CausalSelfAttention(size, dropout)
        self.ln2 = nn.LayerNorm(size.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(size.n_embd, 4 * size.n_embd),
            nn.GELU(),
            nn.Linear(4 * size.n_embd, size.n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A byte-level GPT: token + position embeddings, pre-LN blocks, linear head."""

    def __init__(self, size: ModelSize, dropout: float = 0.1) -> None:
        super().__init__()
        self.block_size = size.block_size
        self.tok_emb = nn.Embedding(VOCAB, size.n_embd)
        self.pos_emb = nn.Embedding(size.block_size, size.n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(size, dropout) for _ in range(size.n_layer))
        self.ln_f = nn.LayerNorm(size.n_embd)
        self.head = nn.Linear(size.n_embd, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


class RandomBatchSampler:
    """Seeded random windows of the corpus. Its position (generator state and
    batches drawn) is a ``state_dict``, so a restored run sees the same batches."""

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.generator)
        window = torch.stack([self.data[s : s + self.block_size + 1] for s in starts.tolist()]).long()
        self.batches_drawn += 1
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]


class WarmupCosine:
    """LR multiplier: linear warm-up, then cosine decay to ``floor`` (a plain-data callable,
    so ``LambdaLR.state_dict`` stores it)."""

    def __init__(self, warmup: int, total: int, floor: float = 0.1) -> None:
        self.warmup = warmup
        self.total = total
        self.floor = floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Model, optimizer, scheduler and sampler of one run, wrapped in a ``qckpt.TrainingState``."""

    def __init__(
        self,
        size: str = "tiny",
        *,
        seed: int = 0,
        total_steps: int = 1000,
        lr: float = 3e-3,
        dropout: float = 0.1,
        corpus_bytes: int = 1 << 20,
    ) -> None:
        spec = SIZES[size]
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.model = CharGPT(spec, dropout)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(max(1, total_steps // 10), total_steps)
        )
        self.sampler = RandomBatchSampler(load_corpus(corpus_bytes), spec.block_size, spec.batch_size, seed + 1)
        self.state = qckpt.TrainingState(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, sampler=self.sampler
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def train_step(self) -> float:
        """One optimizer step; returns the loss and advances ``state.step``."""
        return train_step(self.state)


def train_step(state: qckpt.TrainingState) -> float:
    """One optimizer step of a reference-workload state (a ``Trainer``'s, or a fork of it)."""
    model, optimizer = state.components["model"], state.components["optimizer"]
    model.train()
    x, y = state.components["sampler"].next_batch()
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    state.components["scheduler"].step()
    state.step += 1
    return loss.item()
