"""Repositories written by older format versions stay readable (and writable)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import qckpt
from qckpt.format.codecs import FLOAT32, round_bits
from qckpt.store.store import REPOSITORY_VERSION
from tests.golden.make_golden import LOSSY, LOSSY_STEPS, golden_state, lossy_state

GOLDEN = Path(__file__).parents[1] / "golden"


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _rounded(state: dict, tier: qckpt.LossyTier) -> dict:
    """``state`` as the lossy tier stores it, rounded independently of the repository."""
    out = dict(state)
    raw = state["weights"].numpy().view(np.uint8)
    out["weights"] = torch.from_numpy(round_bits(raw, FLOAT32, 23 - tier.mantissa_bits).view(np.float32).reshape(300, 7))
    return out


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v4", "v5"])
def test_golden_repository_reads_and_accepts_commits(version: str, tmp_path: Path) -> None:
    path = tmp_path / version
    shutil.copytree(GOLDEN / version, path)  # the index is not committed: opening rebuilds it from old footers
    with qckpt.Repository.open(path) as repo:
        assert [s.step for s in repo.log("main")] == [3, 2, 1]
        assert repo.snapshot("first").step == 1 and repo.snapshot("side").step == 10
        for revision, step in (("main", 3), ("main@2", 2), ("first", 1), ("side", 10)):
            view = repo.load(revision)
            assert _equal(view.tree(), golden_state(step)), revision
        assert repo.fsck().ok
        if version >= "v3":  # pins the lossy payload format: a rounded snapshot and one predicted from it
            for step, revision in zip(LOSSY_STEPS, ("first", "predicted")):
                snap = repo.snapshot(f"explore@{step}")
                assert snap.lossy is not None and snap.lossy["mantissa_bits"] == LOSSY.mantissa_bits, revision
                assert _equal(repo.load(snap.id).tree(), _rounded(lossy_state(step), LOSSY)), step
            weights = repo.load("explore").entry("weights").chunks
            assert any(repo._store.locate(c).deps for c in weights)  # type: ignore[union-attr]
        if version >= "v4":  # pins the warm copy format: every head reads from its warm copy
            assert sorted(repo._store.warm.snapshot_ids()) == sorted(repo.branches().values())
            for branch in repo.branches():
                snap = repo.snapshot(branch)
                assert repo._store.read_buffers(snap, list(repo.manifest(snap).tensors)).warm, branch
        else:
            assert repo._store.warm.snapshot_ids() == []
        snap = repo.commit(golden_state(4), step=4)  # a new commit on top of old-format history
        assert _equal(repo.load("main").tree(), golden_state(4))
        assert snap.id in repo._store.warm.snapshot_ids()  # ... gains the warm tier
        assert repo.gc(qckpt.RetentionPolicy(keep_last=2, keep_tagged=False)).snapshots_deleted > 0
        assert repo.fsck().ok and _equal(repo.load("main@3").tree(), golden_state(3))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_average_on_an_older_repository_records_the_new_version(version: str, tmp_path: Path) -> None:
    """Every writer upgrades the config before writing new-format objects (average once did not)."""
    path = tmp_path / version
    shutil.copytree(GOLDEN / version, path)
    with qckpt.Repository.open(path) as repo:
        assert repo.config.version < 3
        snap = repo.average(["main", "main@2"], branch="avg")
        written = json.loads((path / "config").read_text())["version"]
        assert written == repo.config.version == REPOSITORY_VERSION
        expected = (golden_state(3)["weights"].double() + golden_state(2)["weights"].double()) / 2
        assert torch.equal(repo.load(snap.id)["weights"], expected.float())
