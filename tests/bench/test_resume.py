"""Bit-exact resume on real training, across processes.

Run A trains 2N steps without ever committing. Run B trains N steps and
commits; run C, a new process, restores B's snapshot and trains N more. A and C
must agree bit for bit: every parameter, buffer and optimizer tensor, the
scheduler, the sampler position, the RNG states, and the loss of every step.
Dropout and random batch sampling are active. The final states are compared
from ``torch.save`` files each process writes, independently of qckpt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.compare import differences

N = 12
ROOT = Path(__file__).resolve().parents[2]


def _train(*args: str) -> None:
    cmd = [sys.executable, "-m", "bench", "train", "--quiet", "--size", "tiny", "--total-steps", str(2 * N), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)  # our own test output, written just now


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_resume_in_new_process_is_bit_exact(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    repo = tmp_path / "repo" if backend == "local" else request.getfixturevalue("s3_uri")
    _train("--steps", str(2 * N), "--losses-out", str(tmp_path / "a.json"), "--final-out", str(tmp_path / "a.pt"))
    _train("--repo", str(repo), "--init", "--steps", str(N), "--commit-every", str(N))
    _train("--repo", str(repo), "--restore", f"main@{N}", "--steps", str(N),
           "--losses-out", str(tmp_path / "c.json"), "--final-out", str(tmp_path / "c.pt"))  # fmt: skip

    uninterrupted, resumed = _load(tmp_path / "a.pt"), _load(tmp_path / "c.pt")
    assert uninterrupted["step"] == resumed["step"] == 2 * N
    assert differences(resumed, uninterrupted) == []
    assert len(resumed["components"]["optimizer"]["state"]) == len(list(uninterrupted["components"]["model"]))

    losses_a = json.loads((tmp_path / "a.json").read_text())
    losses_c = json.loads((tmp_path / "c.json").read_text())
    assert sorted(losses_c, key=int) == [str(s) for s in range(N + 1, 2 * N + 1)]
    assert all(losses_c[s] == losses_a[s] for s in losses_c)


@pytest.mark.slow
def test_resume_that_loses_the_rng_state_diverges(tmp_path: Path) -> None:
    """Control: the comparison above can fail. The same resume, with only the process
    RNG state lost after the restore (dropout masks change), must differ from run A
    in the parameters, and in the losses after the first resumed step."""
    _train("--steps", str(2 * N), "--losses-out", str(tmp_path / "a.json"), "--final-out", str(tmp_path / "a.pt"))
    _train("--repo", str(tmp_path / "repo"), "--init", "--steps", str(N), "--commit-every", str(N))
    _train("--repo", str(tmp_path / "repo"), "--restore", f"main@{N}", "--forget-rng", "--steps", str(N),
           "--losses-out", str(tmp_path / "c.json"), "--final-out", str(tmp_path / "c.pt"))  # fmt: skip
    found = differences(_load(tmp_path / "c.pt"), _load(tmp_path / "a.pt"))
    assert any("components/model" in d for d in found), found
    losses_a = json.loads((tmp_path / "a.json").read_text())
    losses_c = json.loads((tmp_path / "c.json").read_text())
    assert any(losses_c[s] != losses_a[s] for s in losses_c)
