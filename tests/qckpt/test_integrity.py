"""Damaged bytes on disk are caught and named, never restored as wrong weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qckpt


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def two_snapshots(local_repo_path: Path) -> tuple[Path, qckpt.Snapshot, qckpt.Snapshot]:
    """Two snapshots whose tensors live in two different packs (and nowhere else: no warm copy)."""
    with qckpt.Repository.open(local_repo_path, warm=False) as repo:
        first = repo.commit({"w": torch.arange(64, dtype=torch.float32)}, step=1)
        second = repo.commit({"w": torch.full((64,), 7.0)}, step=2)
    return local_repo_path, first, second


def _pack_of(repo_path: Path, snapshot: qckpt.Snapshot) -> Path:
    with qckpt.Repository.open(repo_path) as repo:
        chunk = repo.load(snapshot.id).entry("w").chunks[0]
    for pack in (repo_path / "packs").iterdir():
        if chunk in pack.read_bytes():  # the pack footer lists its chunk ids
            return pack
    raise AssertionError("pack not found")


def test_flipped_byte_in_object_is_an_integrity_error(two_snapshots: tuple) -> None:
    path, first, second = two_snapshots
    _flip(_pack_of(path, first), 20)  # inside the first object's payload (12-byte header)
    with qckpt.Repository.open(path) as repo:
        live = {"w": torch.zeros(64)}
        with pytest.raises(qckpt.IntegrityError) as info:
            repo.load(first.id)["w"]
        message = str(info.value)
        assert f"snapshot {first.short_id}" in message and "state key 'w'" in message
        assert "object " in message and "pack " in message
        assert torch.equal(live["w"], torch.zeros(64))
        assert torch.equal(repo.load(second.id)["w"], torch.full((64,), 7.0))  # the rest stays readable
        assert repo.branches() == {"main": second.id}


def test_restore_from_damaged_snapshot_leaves_live_state_untouched(local_repo_path: Path) -> None:
    model = torch.nn.Linear(32, 32)
    state = qckpt.TrainingState(model=model, rng=False)
    with qckpt.Repository.open(local_repo_path, warm=False) as repo:  # the packs are all there is
        snap = repo.commit(state)
    pack = next((local_repo_path / "packs").iterdir())
    _flip(pack, pack.stat().st_size // 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
    with qckpt.Repository.open(local_repo_path) as repo, pytest.raises(qckpt.IntegrityError, match=snap.short_id):
        repo.restore(state, "main")
    assert torch.equal(model.weight, torch.ones(32, 32))


@pytest.mark.parametrize("where", ["manifests", "snapshots"])
def test_damaged_metadata_records(two_snapshots: tuple, where: str) -> None:
    path, first, _ = two_snapshots
    _flip(path / where / (first.manifest if where == "manifests" else first.id), 5)
    with qckpt.Repository.open(path) as repo, pytest.raises(qckpt.IntegrityError, match=where[:-1]):
        repo.load(first.id)["w"]


def test_missing_pack(two_snapshots: tuple) -> None:
    path, first, second = two_snapshots
    _pack_of(path, first).unlink()
    with qckpt.Repository.open(path) as repo:
        with pytest.raises(qckpt.IntegrityError, match="missing"):
            repo.load(first.id)["w"]
        assert torch.equal(repo.load(second.id)["w"], torch.full((64,), 7.0))


def test_truncated_pack(two_snapshots: tuple) -> None:
    path, first, _ = two_snapshots
    pack = _pack_of(path, first)
    pack.write_bytes(pack.read_bytes()[:15])
    with qckpt.Repository.open(path) as repo, pytest.raises(qckpt.IntegrityError):
        repo.load(first.id)["w"]


def test_index_rebuild_skips_a_damaged_pack(two_snapshots: tuple, caplog: pytest.LogCaptureFixture) -> None:
    path, first, second = two_snapshots
    pack = _pack_of(path, first)
    pack.write_bytes(pack.read_bytes()[:-3])  # footer trailer damaged
    shutil.rmtree(path / ".index")
    with qckpt.Repository.open(path) as repo:
        assert torch.equal(repo.load(second.id)["w"], torch.full((64,), 7.0))
        assert "skipping damaged pack" in caplog.text
        with pytest.raises(qckpt.IntegrityError, match=f"snapshot {first.short_id}.*missing"):
            repo.load(first.id)["w"]


@pytest.mark.parametrize("damage", [b"\xff\xfe" + b"0" * 30, b"0123456789ab", b"", b"heads/other"],
                         ids=["not-utf8", "truncated", "empty", "another-ref"])  # fmt: skip
def test_a_damaged_ref_is_a_typed_error_reported_by_fsck_and_repaired_by_reset(tmp_path: Path, damage: bytes) -> None:
    path = tmp_path / "repo"
    with qckpt.Repository.init(path) as repo:
        snap = repo.commit({"w": torch.zeros(3)})
        repo.create_branch("other", snap.id)
    (path / "refs" / "heads" / "main").write_bytes(damage)
    with qckpt.Repository.open(path) as repo:
        for call in (repo.branches, lambda: repo.load("main"), lambda: repo.commit({"w": torch.ones(3)})):
            with pytest.raises(qckpt.IntegrityError, match="ref heads/main is damaged"):
                call()
        report = repo.fsck()  # reports, never raises
        assert [p.subject for p in report.problems] == ["ref heads/main"] and report.refs == 2
        repo.reset("main", snap.id)
        assert repo.fsck().ok and repo.snapshot("main").id == snap.id
        assert repo.reflog("main")[0].cause.startswith("reset")


@pytest.mark.parametrize("keep", [0, 5000, 20000])
def test_a_truncated_index_cache_is_rebuilt_not_a_crash(tmp_path: Path, keep: int) -> None:
    """LMDB maps past the end of a short data.mdb: reading there once killed every process with SIGBUS."""
    path = tmp_path / "repo"
    with qckpt.Repository.init(path, chunk_size=4096) as repo:
        for _ in range(30):
            weights = torch.randn(100_000)
            repo.commit({"w": weights})
    data = path / ".index" / "data.mdb"
    assert data.stat().st_size > 20000
    os.truncate(data, keep)
    result = subprocess.run([sys.executable, "-m", "qckpt", "-R", str(path), "fsck"], capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr)  # SIGBUS was -7
    assert "no problems found" in result.stdout
    with qckpt.Repository.open(path) as repo:
        assert torch.equal(repo.load("main")["w"], weights)


def test_a_damaged_index_entry_is_read_around_and_reported(tmp_path: Path) -> None:
    """The index is a cache: an object that fails verification where the index placed it
    is looked up again in the pack footers and read from there; fsck names the pack
    whose footer the index disagrees with (rebuild_index repairs it)."""
    path = tmp_path / "repo"
    with qckpt.Repository.init(path) as repo:
        snap = repo.commit({"a": torch.arange(4096.0), "b": -torch.arange(4096.0)})
    with qckpt.Repository.open(path) as repo:
        index = repo._store.index
        a, b = (repo.load(snap.id).entry(k).chunks[0] for k in ("a", "b"))
        index.put_many({a: index.get(b)})  # a's entry now points at b's bytes
        assert torch.equal(repo.load(snap.id)["a"], torch.arange(4096.0))
        assert not repo.fsck().ok
        repo.rebuild_index()
        assert repo.fsck().ok
