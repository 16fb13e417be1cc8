"""fsck finds every kind of injected damage and names what it affects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import qckpt


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def _pack_holding(repo_path: Path, chunk: bytes) -> Path:
    return next(p for p in (repo_path / "packs").iterdir() if chunk in p.read_bytes())


def _only(root: Path, sub: str, name: str) -> Path:
    return root / sub / name


INJECTIONS: dict[str, Callable[[Path, qckpt.Snapshot, bytes], str]] = {
    "flipped object byte": lambda p, s, c: (_flip(_pack_holding(p, c), 14), "object")[1],
    "truncated pack": lambda p, s, c: (_pack_holding(p, c).write_bytes(_pack_holding(p, c).read_bytes()[:40]), "object")[1],
    "deleted pack": lambda p, s, c: (_pack_holding(p, c).unlink(), "object")[1],
    "damaged manifest": lambda p, s, c: (_flip(_only(p, "manifests", s.manifest), 3), "manifest")[1],
    "deleted manifest": lambda p, s, c: ((p / "manifests" / s.manifest).unlink(), "manifest")[1],
    "damaged snapshot": lambda p, s, c: (_flip(_only(p, "snapshots", s.id), 3), "snapshot")[1],
    "ref to missing snapshot": lambda p, s, c: ((p / "snapshots" / s.id).unlink(), "ref")[1],
}


@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_fsck_finds_injected_damage(local_repo_path: Path, injection: str) -> None:
    with qckpt.Repository.open(local_repo_path) as repo:
        repo.commit({"a": torch.arange(100.0)}, step=1)
        victim = repo.commit({"a": torch.arange(100.0), "b": torch.randn(300)}, step=2)
        chunk = repo.load(victim.id).entry("b").chunks[0]
        assert repo.fsck().ok
    subject = INJECTIONS[injection](local_repo_path, victim, chunk)
    with qckpt.Repository.open(local_repo_path) as repo:
        report = repo.fsck()
    assert not report.ok
    assert any(p.subject.startswith(subject) for p in report.problems), report.problems
    if subject == "object":
        problem = next(p for p in report.problems if p.subject.startswith("object"))
        assert chunk.hex() in problem.subject and f"snapshot {victim.short_id} key 'b'" in problem.affects


def test_fsck_ignores_history_expired_by_gc(repo: qckpt.Repository) -> None:
    for i in range(4):
        repo.commit({"w": torch.full((10,), float(i))})
    repo.gc(qckpt.RetentionPolicy(keep_last=1))
    report = repo.fsck()
    assert report.ok and report.snapshots == 1


def test_fsck_checks_what_only_the_ref_log_can_bring_back(tmp_path: Path) -> None:
    """A snapshot left behind by a reset is recoverable (and kept by GC for the grace
    period), so damage to it is reported like damage to a branch's history."""
    path = tmp_path / "repo"
    with qckpt.Repository.init(path) as repo:
        base = repo.commit({"w": torch.ones(4)}, step=0)
        left_behind = repo.commit({"w": torch.zeros(4)}, step=1)
        repo.reset("main", base.id)
    manifest = path / "manifests" / left_behind.manifest
    manifest.write_bytes(manifest.read_bytes()[:-2])
    with qckpt.Repository.open(path) as repo:
        report = repo.fsck()
        assert [p.subject for p in report.problems] == [f"manifest {left_behind.manifest}"]
        assert report.snapshots == 2
