"""Repositories written by older format versions stay readable (and writable)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import qckpt
from tests.golden.make_golden import golden_state

GOLDEN = Path(__file__).parents[1] / "golden"


def _equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("version", ["v1", "v2"])
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
        repo.commit(golden_state(4), step=4)  # a new commit on top of old-format history
        assert _equal(repo.load("main").tree(), golden_state(4))
        assert repo.gc(qckpt.RetentionPolicy(keep_last=2, keep_tagged=False)).snapshots_deleted > 0
        assert repo.fsck().ok and _equal(repo.load("main@3").tree(), golden_state(3))
