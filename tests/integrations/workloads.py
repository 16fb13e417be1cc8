"""Running an integration workload module in a new process, and comparing weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]


def run_workload(module: str, mode: str, workers: int, out: Path) -> dict[str, torch.Tensor]:
    """``python -m tests.integrations.<module> MODE WORKERS OUT`` in a new process; the
    final weights it saved."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", f"tests.integrations.{module}", mode, str(workers), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / f"{mode}.pt")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
