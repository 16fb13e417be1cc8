"""Repository lifecycle, refs, revisions, history, dedup and bad input."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
import zarr

import qckpt
from qckpt.backends import MemoryBackend


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g), "step": seed}


# -- lifecycle -------------------------------------------------------------------
def test_init_twice_is_refused(local_repo_path: Path) -> None:
    with pytest.raises(qckpt.AlreadyExistsError, match="exists already"):
        qckpt.Repository.init(local_repo_path)


@pytest.mark.parametrize("make", ["missing", "empty_dir", "file"])
def test_open_not_a_repository(tmp_path: Path, make: str) -> None:
    path = tmp_path / "nothing"
    if make == "empty_dir":
        path.mkdir()
    elif make == "file":
        path.write_text("hello")
    with pytest.raises(qckpt.RepositoryNotFoundError, match="no qckpt repository") as info:
        qckpt.Repository.open(path)
    assert isinstance(info.value, KeyError) and "'" not in str(info.value)[:5]
    assert (make == "missing") == (not path.exists())  # probing created nothing
    if make == "empty_dir":
        assert list(path.iterdir()) == []


def test_init_over_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(qckpt.InvalidInputError, match="not a directory"):
        qckpt.Repository.init(tmp_path / "f")


def test_open_by_file_uri(local_repo_path: Path) -> None:
    with qckpt.Repository.open(local_repo_path.as_uri()) as repo:
        assert repo.config.chunk_size == 256


def test_unsupported_uri_scheme() -> None:
    with pytest.raises(qckpt.InvalidInputError, match="unsupported repository URI"):
        qckpt.Repository.open("gopher://bucket/x")
    for nowhere in (42, None):
        with pytest.raises(qckpt.InvalidInputError, match="a repository location is a path"):
            qckpt.Repository.open(nowhere)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"chunk_size": 100}, {"chunk_size": 0}, {"compression_level": 0}, {"chunk_size": 1e6},
                                    {"compression_level": "3"}, {"max_chain": "4"}, {"hot_snapshots": "2"},
                                    {"hot_bytes": "1G"}, {"max_pending": 0}, {"warm_interval": "60"}])  # fmt: skip
def test_init_rejects_bad_settings(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(qckpt.InvalidInputError):
        qckpt.Repository.init(tmp_path / "r", **kwargs)
    assert not (tmp_path / "r").exists()


def test_newer_format_version_is_refused(local_repo_path: Path) -> None:
    config = json.loads((local_repo_path / "config").read_text())
    config["version"] = 99
    (local_repo_path / "config").write_text(json.dumps(config))
    with pytest.raises(qckpt.FormatVersionError, match="upgrade qckpt"):
        qckpt.Repository.open(local_repo_path)


def test_damaged_config(local_repo_path: Path) -> None:
    (local_repo_path / "config").write_text("{not json")
    with pytest.raises(qckpt.IntegrityError, match="config"):
        qckpt.Repository.open(local_repo_path)


def test_a_closed_repository_refuses_every_call_and_lost_nothing(repo: qckpt.Repository) -> None:
    first = repo.commit(_state(1), step=1)
    pending = repo.commit_async(_state(2), step=2)  # written by close
    view, zarr_store = repo.load(first.id), repo.zarr_store(first.id)
    uri = repo.backend.uri if not isinstance(repo.backend, MemoryBackend) else repo.backend
    repo.close()
    assert pending.wait().step == 2 and "closed" in repr(repo)
    calls = {
        "commit": lambda: repo.commit(_state(3)),
        "commit_async": lambda: repo.commit_async(_state(3)),  # once hung forever: the writer thread had stopped
        "restore": lambda: repo.restore(qckpt.TrainingState(model=torch.nn.Linear(2, 2))),
        "load": lambda: repo.load("main"), "log": lambda: repo.log(), "snapshot": lambda: repo.snapshot("main"),
        "branches": lambda: repo.branches(), "create_branch": lambda: repo.create_branch("b"),
        "reset": lambda: repo.reset("main", first.id), "delete_branch": lambda: repo.delete_branch("main"),
        "gc": lambda: repo.gc(), "fsck": lambda: repo.fsck(), "flush": lambda: repo.flush(),
        "config": lambda: repo.config, "view.tree": lambda: view.tree(), "view[w]": lambda: view["w"],
        "zarr store": lambda: zarr.open_group(zarr_store, mode="r")["w"][:],
    }  # fmt: skip
    for name, call in calls.items():
        outcome: list[BaseException | None] = []

        def attempt(call=call, outcome=outcome) -> None:  # in a thread: a hang fails here instead of stalling the suite
            try:
                call()
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(30)
        assert outcome and isinstance(outcome[0], qckpt.RepositoryClosedError), (name, outcome)
        assert "was closed; open it again" in str(outcome[0])
    repo.close()  # closing again does nothing
    with qckpt.Repository.open(uri) as again:  # everything committed before the close is there, nothing after it
        assert [s.step for s in again.log()] == [2, 1] and again.branches()["main"] == pending.wait().id


# -- commits, history, revisions ----------------------------------------------------
def test_commit_records_history(repo: qckpt.Repository) -> None:
    first = repo.commit(_state(1), step=1, metrics={"loss": 2.5}, message="first")
    second = repo.commit(_state(2), step=2, metrics={"loss": 2.0})
    assert first.parents == () and second.parents == (first.id,)
    assert repo.branches() == {"main": second.id}
    assert [s.id for s in repo.log()] == [second.id, first.id]
    assert repo.snapshot("main").metrics == {"loss": 2.0}
    assert repo.snapshot(first.id).message == "first"


def test_revisions(repo: qckpt.Repository) -> None:
    snaps = [repo.commit(_state(i), step=i * 10) for i in range(4)]
    assert repo.resolve("main") == snaps[-1].id
    assert repo.resolve("main@10") == snaps[1].id
    assert repo.resolve(snaps[2].id[:8]) == snaps[2].id
    assert repo.resolve(snaps[0].id) == snaps[0].id
    repo.create_tag("best", snaps[1].id)
    assert repo.resolve("best") == snaps[1].id and repo.resolve("best@0") == snaps[0].id
    with pytest.raises(qckpt.RevisionNotFoundError, match="no snapshot at step 15"):
        repo.resolve("main@15")
    # ~N: the N-th first-parent ancestor; suffixes combine, applied left to right
    assert [repo.resolve(f"main~{n}") for n in range(4)] == [s.id for s in reversed(snaps)]
    assert repo.resolve("main~1~1") == repo.resolve("main~2") == snaps[1].id
    assert repo.resolve("main@20~1") == snaps[1].id and repo.resolve("main~2@0") == snaps[0].id
    assert repo.resolve(f"{snaps[2].id[:8]}~2") == snaps[0].id and repo.resolve("best~1") == snaps[0].id
    with pytest.raises(qckpt.RevisionNotFoundError, match=r"'main~4' goes back too far.*holds 4 snapshots \(main~3 is the oldest\)"):
        repo.resolve("main~4")
    with pytest.raises(qckpt.RevisionNotFoundError, match="no snapshot at step 20 in the history of 'main~2'"):
        repo.resolve("main~2@20")
    with pytest.raises(qckpt.RevisionNotFoundError, match=r"unknown revision 'nope'.*branches: main"):
        repo.resolve("nope")
    with pytest.raises(qckpt.RevisionNotFoundError):
        repo.resolve("0" * 32)
    with pytest.raises(qckpt.InvalidInputError):
        repo.resolve("")
    assert [s.id for s in repo.log(limit=2)] == [snaps[3].id, snaps[2].id] and repo.log(limit=0) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(qckpt.InvalidInputError, match="limit"):
            repo.log(limit=bad)
        with pytest.raises(qckpt.InvalidInputError, match="limit"):
            repo.reflog(limit=bad)


def test_ambiguous_id_prefix() -> None:
    backend = MemoryBackend()
    with qckpt.Repository.init(backend) as repo:
        backend.put("snapshots/abcdef" + "0" * 26, b"{}")
        backend.put("snapshots/abcdef" + "1" * 26, b"{}")
        with pytest.raises(qckpt.AmbiguousRevisionError, match="matches 2"):
            repo.resolve("abcdef")


def test_branches_and_tags(repo: qckpt.Repository) -> None:
    base = repo.commit(_state(1))
    fork = repo.create_branch("experiment", at="main")
    assert fork.id == base.id
    on_branch = repo.commit(_state(2), branch="experiment")
    assert on_branch.parents == (base.id,) and repo.branches()["main"] == base.id
    assert {s.id for s in repo.log("experiment")} == {base.id, on_branch.id}
    repo.create_tag("v1", "experiment")
    assert repo.tags() == {"v1": on_branch.id}
    with pytest.raises(qckpt.AlreadyExistsError):
        repo.create_tag("v1", "main")
    with pytest.raises(qckpt.AlreadyExistsError, match="already a branch"):
        repo.create_tag("experiment", "main")
    with pytest.raises(qckpt.AlreadyExistsError):
        repo.create_branch("experiment", "main")
    repo.delete_branch("experiment")
    repo.delete_tag("v1")
    assert repo.branches() == {"main": base.id} and repo.tags() == {}
    assert repo.snapshot(on_branch.id).id == on_branch.id  # data stays until GC
    with pytest.raises(qckpt.RevisionNotFoundError):
        repo.delete_branch("experiment")


BAD_NAMES = ["", "a/b", "a\\b", "..", "a..b", "../x", "a\nb", "tab\t", "a b", "-x", ".hidden", "x.lock", "x.", "é", "a@1", "x" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_ref_names(repo: qckpt.Repository, name: str) -> None:
    repo.commit(_state(1))
    before = (repo.branches(), repo.tags(), repo.snapshot_ids())
    with pytest.raises(qckpt.InvalidRefNameError, match="invalid branch name"):
        repo.commit(_state(2), branch=name)
    with pytest.raises(qckpt.InvalidRefNameError):
        repo.create_branch(name)
    with pytest.raises(qckpt.InvalidRefNameError, match="invalid tag name"):
        repo.create_tag(name)
    assert (repo.branches(), repo.tags(), repo.snapshot_ids()) == before


@pytest.mark.parametrize("metrics", [{"loss": "low"}, {"ok": True}, {1: 2.0}, {"loss": [1.0]}])
def test_invalid_metrics(repo: qckpt.Repository, metrics: dict) -> None:
    with pytest.raises(qckpt.InvalidInputError, match="metrics"):
        repo.commit(_state(1), metrics=metrics)
    assert repo.snapshot_ids() == []


def test_identical_commits_deduplicate(repo: qckpt.Repository) -> None:
    first = repo.commit(_state(1))
    again = repo.commit(_state(1))
    assert first.stats.new_chunks > 0 and first.stats.new_stored_bytes > 0
    assert again.stats.new_chunks == 0 and again.stats.new_stored_bytes == 0
    assert again.stats.raw_bytes == first.stats.raw_bytes
    partly = repo.commit({**_state(1), "b": torch.zeros(16)})
    assert 0 < partly.stats.new_chunks < first.stats.chunks


def test_stats_account_for_every_stored_byte(local_repo_path: Path) -> None:
    with qckpt.Repository.open(local_repo_path) as repo:
        for i in range(3):
            repo.commit(_state(i % 2))
        stats = repo.stats()
    files = [p for d in ("packs", "manifests", "snapshots") for p in (local_repo_path / d).iterdir()]
    assert stats.stored_bytes == sum(p.stat().st_size for p in files)
    assert stats.snapshots == 3 and stats.raw_bytes == 3 * (64 * 16 + 16) * 4
    assert stats.dedup_ratio == pytest.approx(1.5)


def test_ref_conflict_is_reported_and_loses_nothing() -> None:
    """A writer that loses the ref race re-parents (default) or gets RefConflictError; nothing is lost."""

    class RacingBackend(MemoryBackend):
        sneak: str | None = None

        def swap_ref(self, name: str, expected: str | None, new: str | None) -> None:
            if self.sneak is not None:
                intruder, self.sneak = self.sneak, None
                super().swap_ref(name, expected, intruder)  # another writer moves the branch first
            super().swap_ref(name, expected, new)

    backend = RacingBackend()
    with qckpt.Repository.init(backend) as repo:
        base = repo.commit(_state(1))
        other = repo.commit(_state(2), branch="other")
        backend.sneak = other.id
        with pytest.raises(qckpt.RefConflictError, match="heads/main") as info:
            repo.commit(_state(3), on_conflict="raise")
        assert info.value.expected == base.id and info.value.actual == other.id
        assert repo.branches()["main"] == other.id
        orphan = [i for i in repo.snapshot_ids() if i not in (base.id, other.id)]
        assert len(orphan) == 1 and repo.load(orphan[0])["w"].shape == (64, 16)

        intruder = repo.commit(_state(4), branch="third")
        backend.sneak = intruder.id
        rebased = repo.commit(_state(5))  # default: re-parent onto the new head and publish
        assert rebased.parents == (intruder.id,) and repo.branches()["main"] == rebased.id
        assert torch.equal(repo.load("main")["w"], _state(5)["w"])
        backend.sneak = intruder.id  # another writer creates the branch first
        created = repo.commit(_state(6), branch="fresh")
        assert created.parents == (intruder.id,) and repo.branches()["fresh"] == created.id
        with pytest.raises(qckpt.InvalidInputError, match="on_conflict"):
            repo.commit(_state(5), on_conflict="ignore")


def test_index_is_rebuilt_from_packs(local_repo_path: Path) -> None:
    with qckpt.Repository.open(local_repo_path) as repo:
        snap = repo.commit(_state(5))
    shutil.rmtree(local_repo_path / ".index")
    with qckpt.Repository.open(local_repo_path) as repo:
        assert torch.equal(repo.load(snap.id)["w"], _state(5)["w"])
        assert repo.rebuild_index() == 1


def test_lazy_load_reads_only_the_asked_tensor(tmp_path: Path) -> None:
    class CountingBackend(qckpt.LocalBackend):
        reads: list[int] = []

        def get_range(self, key: str, offset: int, length: int) -> bytes:
            self.reads.append(length)
            return super().get_range(key, offset, length)

    backend = CountingBackend(tmp_path / "r")
    # reads from packs: no warm copy (test_warm reads one), nothing hot (a view reads hot chunks from memory)
    with qckpt.Repository.init(backend, chunk_size=256, warm=False, hot_snapshots=0) as repo:
        repo.commit({"small": torch.arange(4.0), "big": torch.randn(100, 100)})
        view = repo.load("main")
        assert view.entry("big").shape == (100, 100) and "big" in view and "nope" not in view and backend.reads == []
        with pytest.raises(qckpt.NotFoundError, match="no tensor at 'nope'") as missing:
            view["nope"]
        assert isinstance(missing.value, KeyError) and view.get("nope") is None and backend.reads == []
        assert torch.equal(view["small"], torch.arange(4.0))
        assert len(backend.reads) == 1 and sum(backend.reads) < 64  # one 16-byte chunk, nothing of "big"
        assert torch.equal(view["big"], repo.load("main").tree()["big"])
        assert backend.reads[1] > 40000  # big's 157 chunks are adjacent in the pack: fetched with one read


def test_plain_values_survive(repo: qckpt.Repository) -> None:
    tree = {"lr": [0.1, float("nan")], "name": "run-1", "raw": b"\x00\xff", "nested": {(1, "a"): None}}
    repo.commit(tree)
    back = repo.load().tree()
    assert back["name"] == "run-1" and back["raw"] == b"\x00\xff" and back["nested"] == {(1, "a"): None}


def test_metrics_accept_tensors_and_numpy_scalars_and_init_exist_ok(tmp_path: Path) -> None:
    import numpy as np

    with qckpt.Repository.init(tmp_path / "r") as repo:
        snap = repo.commit({"w": torch.zeros(2)}, metrics={"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": np.int64(3)})
        assert snap.metrics == {"loss": 0.5, "acc": 0.25, "n": 3}
        with pytest.raises(qckpt.InvalidInputError, match="bad entries"):
            repo.commit({"w": torch.zeros(2)}, metrics={"loss": torch.zeros(3)})
        for bad in ({"step": -5}, {"step": "3"}, {"step": True}, {"message": 123}):
            with pytest.raises(qckpt.InvalidInputError, match=next(iter(bad))):
                repo.commit({"w": torch.zeros(2)}, **bad)  # type: ignore[arg-type]
        state = qckpt.TrainingState(model=torch.nn.Linear(2, 2))
        state.step = -1
        with pytest.raises(qckpt.InvalidInputError, match="step must be a whole number >= 0"):
            repo.commit(state)
        assert len(repo.log()) == 1  # nothing was written
    with qckpt.Repository.init(tmp_path / "r", exist_ok=True) as again:
        assert again.snapshot("main").id == snap.id
    with pytest.raises(qckpt.AlreadyExistsError):
        qckpt.Repository.init(tmp_path / "r")
