"""Retention planning, garbage collection, and its safety against concurrent commits."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
import torch

import qckpt
from bench.compare import differences
from qckpt.ops.gc import plan_retention
from qckpt.format.records import Snapshot


def _tree(seed: int, n: int = 600) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "frozen": torch.ones(64), "seed": seed}


def _snap(i: str, parents: tuple[str, ...], t: float, loss: float | None = None) -> Snapshot:
    return Snapshot(id=i, manifest="m" + i, parents=parents, step=None, time=t, metrics={} if loss is None else {"loss": loss})


# -- planning (pure) -------------------------------------------------------------------
GRAPH = {
    "a": _snap("a", (), 1, 5.0), "b": _snap("b", ("a",), 2, 1.0), "c": _snap("c", ("b",), 3, 3.0),
    "d": _snap("d", ("c",), 4, 4.0), "x": _snap("x", ("b",), 5, 0.5), "orphan": _snap("orphan", (), 6),
}  # fmt: skip


def test_default_policy_keeps_everything_reachable() -> None:
    keep = plan_retention(GRAPH, {"main": "d"}, {"t": "x"}, qckpt.RetentionPolicy(), now=10)
    assert keep == {"a", "b", "c", "d", "x"}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (qckpt.RetentionPolicy(keep_last=2), {"d", "c", "x"}),
        (qckpt.RetentionPolicy(keep_last=1, keep_tagged=False), {"d"}),
        (qckpt.RetentionPolicy(keep_last=1), {"d", "x"}),
        (qckpt.RetentionPolicy(keep_best="loss", keep_tagged=False), {"d", "b"}),
        (qckpt.RetentionPolicy(keep_best="loss", keep_best_k=2, keep_best_mode="max", keep_tagged=False), {"d", "a"}),
        (qckpt.RetentionPolicy(keep_newer_than=7.5, keep_tagged=False), {"d", "c"}),
    ],
)
def test_rules(policy: qckpt.RetentionPolicy, expected: set[str]) -> None:
    assert plan_retention(GRAPH, {"main": "d"}, {"t": "x"}, policy, now=10) == expected


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"keep_best_k": 0}, {"keep_best_mode": "avg"}, {"keep_newer_than": -1}])
def test_invalid_policies(kwargs: dict) -> None:
    with pytest.raises(qckpt.InvalidInputError):
        qckpt.RetentionPolicy(**kwargs)


def test_gc_refuses_a_policy_that_is_not_one() -> None:
    with qckpt.Repository.init(qckpt.MemoryBackend()) as repo:
        repo.commit({"w": torch.zeros(2)})
        with pytest.raises(qckpt.InvalidInputError, match="RetentionPolicy"):
            repo.gc({"keep_last": 1})  # type: ignore[arg-type]
        assert len(repo.log()) == 1


# -- collection ------------------------------------------------------------------------------
def test_deleting_a_branch_and_gc_restores_the_size(local_repo_path: Path) -> None:
    with qckpt.Repository.open(local_repo_path) as repo:
        for i in range(5):
            repo.commit(_tree(i), step=i)
        before = repo.stats().stored_bytes
        repo.create_branch("experiment", "main@2")
        for i in range(5):
            repo.commit(_tree(100 + i), branch="experiment", step=3 + i)
        assert repo.stats().stored_bytes > 1.5 * before
        repo.delete_branch("experiment")
        assert repo.gc().snapshots_deleted == 0  # the ref log protects a deleted branch for a grace period
        now = qckpt.RetentionPolicy(reflog_grace=0)
        dry = repo.gc(now, dry_run=True)
        assert dry.snapshots_deleted == 5 and repo.stats().stored_bytes > 1.5 * before  # dry run deletes nothing
        report = repo.gc(now)
        assert (report.snapshots_deleted, report.bytes_after) == (5, dry.bytes_after)
        assert repo.stats().stored_bytes <= 1.05 * before
        for i, snap in enumerate(reversed(repo.log())):
            assert differences(repo.load(snap.id).tree(), _tree(i)) == []
        assert repo.fsck().ok


def test_gc_keeps_everything_reachable_by_default(repo: qckpt.Repository) -> None:
    for i in range(3):
        repo.commit(_tree(i))
    report = repo.gc()
    assert report.snapshots_deleted == report.packs_deleted == 0 and len(repo.log()) == 3


def test_expired_history_and_repack(repo: qckpt.Repository) -> None:
    snaps = [repo.commit(_tree(i), step=i) for i in range(6)]
    repo.create_tag("keep-me", snaps[1].id)
    report = repo.gc(qckpt.RetentionPolicy(keep_last=2))
    assert report.snapshots_deleted == 3
    assert [s.step for s in repo.log()] == [5, 4]  # history ends at the first expired snapshot
    assert repo.resolve("keep-me") == snaps[1].id
    with pytest.raises(qckpt.RevisionNotFoundError):
        repo.snapshot(snaps[0].id)
    for i in (1, 4, 5):
        assert differences(repo.load(snaps[i].id).tree(), _tree(i)) == []
    assert repo.fsck().ok


def test_repack_moves_live_objects(repo: qckpt.Repository) -> None:
    """A commit whose pack holds a live and a dead tensor gets repacked."""
    repo.commit({"keep": torch.arange(512.0), "drop": torch.randn(4096)})
    second = repo.commit({"keep": torch.arange(512.0)})
    report = repo.gc(qckpt.RetentionPolicy(keep_last=1))
    assert report.packs_repacked == 1 and report.bytes_after < report.bytes_before
    assert torch.equal(repo.load(second.id)["keep"], torch.arange(512.0))
    assert repo.fsck().ok


def test_commits_racing_gc_lose_nothing(local_repo_path: Path) -> None:
    """One thread commits to main while another churns a branch and collects garbage."""
    errors: list[BaseException] = []
    expected: dict[str, dict] = {}

    def committer(repo: qckpt.Repository) -> None:
        try:
            for i in range(25):
                tree = _tree(1000 + i % 7, n=2000)  # repeats: dedup against objects GC considers
                expected[repo.commit(tree, step=i).id] = tree
        except BaseException as e:
            errors.append(e)

    def collector(repo: qckpt.Repository) -> None:
        try:
            for i in range(8):
                if "main" in repo.branches():
                    repo.create_branch("churn", "main")
                    repo.commit(_tree(2000 + i, n=2000), branch="churn")
                    repo.delete_branch("churn")
                repo.gc(qckpt.RetentionPolicy(keep_last=3))
        except BaseException as e:
            errors.append(e)

    with qckpt.Repository.open(local_repo_path) as a, qckpt.Repository.open(local_repo_path) as b:
        threads = [threading.Thread(target=committer, args=(a,)), threading.Thread(target=collector, args=(b,))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    with qckpt.Repository.open(local_repo_path) as repo:
        repo.gc(qckpt.RetentionPolicy(keep_last=3))
        kept = repo.log()
        assert len(kept) == 3 and repo.fsck().ok
        for snap in kept:
            assert differences(repo.load(snap.id).tree(), expected[snap.id]) == []


def test_gc_never_trusts_a_damaged_footer_over_the_index(tmp_path: Path) -> None:
    """One flipped bit in a footer entry's offset: fsck reports the pack, GC refuses, nothing is lost."""
    path = tmp_path / "repo"
    with qckpt.Repository.init(path, chunk_size=256) as repo:
        repo.commit({"w": torch.arange(640.0)}, step=1)
        head = repo.snapshot("main")
    (pack,) = (path / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    _, footer_offset, _ = struct.unpack("<IQ8s", data[-20:])
    data[footer_offset + 16] ^= 0x04  # entry 0: 16-byte chunk id, then its u64 offset
    pack.write_bytes(bytes(data))
    with qckpt.Repository.open(path) as repo:  # the index, built before the damage, still has the right offset
        report = repo.fsck()
        assert not report.ok and [p.subject for p in report.problems] == [f"pack {pack.stem}"]
        with pytest.raises(qckpt.IntegrityError, match="stopped before deleting anything"):
            repo.gc()
        with pytest.raises(qckpt.IntegrityError):
            repo.gc(qckpt.RetentionPolicy(keep_last=1))
        assert pack.exists() and torch.equal(repo.load(head.id)["w"], torch.arange(640.0))


def test_gc_refuses_when_a_footer_no_longer_lists_a_live_object(tmp_path: Path) -> None:
    """One flipped bit in a footer entry's chunk id: the footer still parses, the object it
    named looks unlisted and its renamed twin dead. GC used to repack the pack without
    the live object and delete the only copy; it must refuse instead."""
    path = tmp_path / "repo"
    with qckpt.Repository.init(path) as repo:
        repo.commit({"a": torch.arange(65536.0), "b": -torch.arange(65536.0)}, step=1)  # one pack, two objects
        head = repo.snapshot("main")
    (pack,) = (path / "packs").iterdir()
    data = bytearray(pack.read_bytes())
    _, footer_offset, _ = struct.unpack("<IQ8s", data[-20:])
    data[footer_offset + 3] ^= 0x01  # entry 0's chunk id
    pack.write_bytes(bytes(data))
    with qckpt.Repository.open(path) as repo:  # the index, built before the damage, names the real ids
        assert not repo.fsck().ok
        with pytest.raises(qckpt.IntegrityError, match="stopped before deleting anything.*no pack footer lists it"):
            repo.gc()
        assert pack.exists()
        view = repo.load(head.id)
        assert torch.equal(view["a"], torch.arange(65536.0)) and torch.equal(view["b"], -torch.arange(65536.0))


def _flip_hex(text: str, at: int) -> str:
    return text[:at] + ("b" if text[at] != "b" else "c") + text[at + 1 :]


def test_gc_refuses_a_ref_that_points_at_no_snapshot(tmp_path: Path) -> None:
    """A ref damaged into another well-formed id: the history it held would look unreferenced."""
    path = tmp_path / "repo"
    with qckpt.Repository.init(path) as repo:
        base = repo.commit({"w": torch.ones(4)}, step=0)
        repo.create_branch("side", base.id)
        side = repo.commit({"w": torch.zeros(4)}, branch="side", step=1)
    ref = path / "refs" / "heads" / "side"
    ref.write_text(_flip_hex(ref.read_text().strip(), 5) + "\n")
    with qckpt.Repository.open(path) as repo:
        assert [p.subject for p in repo.fsck().problems] == ["ref heads/side"]
        with pytest.raises(qckpt.IntegrityError, match="stopped before deleting anything: branch side points at"):
            repo.gc(qckpt.RetentionPolicy(reflog_grace=0))
        repo.reset("side", side.id)  # the repair the message names
        assert torch.equal(repo.load("side")["w"], torch.zeros(4)) and repo.gc().snapshots_deleted == 0


def test_a_damaged_ref_log_record_stops_gc_instead_of_dropping_its_protection(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with qckpt.Repository.init(path) as repo:
        base = repo.commit({"w": torch.ones(4)}, step=0)
        left_behind = repo.commit({"w": torch.zeros(4)}, step=1)
        repo.reset("main", base.id)  # left_behind is kept only by the ref log's grace period
    (record,) = [p for p in (path / "reflog" / "heads" / "main").iterdir() if p.name.endswith("-rewind")]
    text = record.read_text()
    record.write_text(_flip_hex(text, text.index(left_behind.id) + 7))  # still a well-formed id
    with qckpt.Repository.open(path) as repo:
        assert [p.subject.split("/")[0] for p in repo.fsck().problems] == ["ref log record reflog"]
        with pytest.raises(qckpt.IntegrityError, match="ref log entry .* does not match its check digest"):
            repo.gc()
        assert torch.equal(repo.load(left_behind.id)["w"], torch.zeros(4))
