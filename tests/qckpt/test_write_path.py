"""The one write path and the bugs its seam once caused (issue: one write transaction)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import qckpt
import qckpt.commit.arrays
import qckpt.store.reader
from bench.workload import Trainer, train_step


class CountingBackend(qckpt.MemoryBackend):
    """Counts pack listings: each index rebuild lists the packs once."""

    def __init__(self) -> None:
        super().__init__("counting")
        self.pack_listings = 0

    def list(self, prefix: str) -> list[str]:
        self.pack_listings += prefix == "packs/"
        return super().list(prefix)


def test_two_tensors_at_one_path_are_refused(repo: qckpt.Repository) -> None:
    tree = {"x": {1: torch.zeros(4), "1": torch.ones(4)}}
    with pytest.raises(qckpt.UnsupportedValueError, match="x/1"):
        repo.commit(tree)
    with pytest.raises(qckpt.UnsupportedValueError):
        repo.commit_async(tree)
    assert repo.branches() == {} and repo.backend.list("packs/") == []  # nothing was written


def test_a_missing_pack_costs_one_index_rebuild_per_operation() -> None:
    backend = CountingBackend()
    with qckpt.Repository.init(backend, chunk_size=64, warm=False) as repo:
        repo.commit({"w": torch.randn(16 * 16)})  # 16 chunks in one pack, and nowhere else
        (pack,) = backend.list("packs/")
        backend.delete(pack)
    with qckpt.Repository.open(backend, hot_snapshots=0) as repo:
        backend.pack_listings = 0
        with pytest.raises(qckpt.IntegrityError, match="missing"):
            repo.load("main")["w"]
        assert backend.pack_listings == 1  # one rebuild, then a clear error
        backend.pack_listings = 0
        report = repo.fsck()
        assert len(report.problems) == 16
        assert backend.pack_listings <= 2  # one rebuild for the chunk reads, one listing to check packs


def test_a_snapshot_record_is_serialised_once_per_commit(repo: qckpt.Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    document = qckpt.Snapshot._document
    monkeypatch.setattr(qckpt.Snapshot, "_document", lambda self: (calls.append(1), document(self))[1])
    repo.commit({"w": torch.zeros(8)})
    assert len(calls) == 1


def test_a_wrapped_local_backend_keeps_its_index_beside_the_data(tmp_path: Path) -> None:
    """Capabilities pass through wrappers: wrapping must not move the index to the user cache."""
    location = qckpt.RetryingBackend(qckpt.LocalBackend(tmp_path / "repo"))
    cache = Path(os.environ["QCKPT_CACHE_DIR"])
    before = set(cache.iterdir()) if cache.exists() else set()
    with qckpt.Repository.init(location, chunk_size=256) as repo:
        repo.commit({"w": torch.zeros(100)})
        repository_id = repo.config.repository_id
    assert (tmp_path / "repo" / ".index").is_dir()
    assert not (cache / repository_id).exists() and (set(cache.iterdir()) if cache.exists() else set()) == before


class SubclassedAdamW(torch.optim.AdamW):
    """A user's AdamW subclass that keeps the update rule."""


class WrappedOptimizer(torch.optim.Optimizer):
    """Delegates everything to ``.optimizer``, as accelerate's AcceleratedOptimizer does."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__: like the real wrappers
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: dict) -> None:
        self.optimizer.state = value

    def state_dict(self) -> dict:  # type: ignore[override]
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        self.optimizer.load_state_dict(state_dict)

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


def _stored_bytes_of_second_commit(tmp_path: Path, name: str, wrap) -> qckpt.CommitStats:  # type: ignore[no-untyped-def]
    trainer = Trainer("tiny", total_steps=20)
    plain = trainer.state.components["optimizer"]
    optimizer = wrap(plain)
    trainer.state.components["optimizer"] = optimizer
    trainer.state.components["scheduler"].optimizer = optimizer
    with qckpt.Repository.init(tmp_path / name, chunk_size=4096) as repo:
        stats = []
        for _ in range(2):
            train_step(trainer.state)
            stats.append(repo.commit(trainer.state).stats)
    return stats[1]


def _subclass(plain: torch.optim.Optimizer) -> torch.optim.Optimizer:
    sub = SubclassedAdamW([dict(group) for group in plain.param_groups])
    sub.load_state_dict(plain.state_dict())
    return sub


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)` has been overridden")
def test_optimizer_subclasses_and_wrappers_keep_the_predictive_codecs(tmp_path: Path) -> None:
    assert isinstance(Trainer("tiny").state.components["optimizer"], torch.optim.AdamW)
    baseline = _stored_bytes_of_second_commit(tmp_path, "plain", lambda o: o)
    for name, wrap in (("subclass", _subclass), ("wrapped", WrappedOptimizer)):
        stats = _stored_bytes_of_second_commit(tmp_path, name, wrap)
        assert stats.new_chunks == baseline.new_chunks, name  # the same training...
        assert stats.new_stored_bytes == baseline.new_stored_bytes, name  # ...stored as compactly
        assert stats.notes == (), name


def test_an_optimizer_without_a_codec_is_noted(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.RMSprop(model.parameters())
    model(torch.randn(3, 64)).sum().backward()
    optimizer.step()
    with qckpt.Repository.init(tmp_path / "r") as repo:
        snap = repo.commit(qckpt.TrainingState(model=model, optimizer=optimizer))
        assert len(snap.stats.notes) == 1 and "RMSprop" in snap.stats.notes[0]
        assert repo.snapshot("main").stats.notes == snap.stats.notes  # recorded, not only returned


def _every_step_run(tmp_path: Path, name: str, commits: int) -> tuple[list[int], list[list[bool]]]:
    """Stored bytes per commit of a tiny AdamW run (chains bounded at 4, so they restart
    inside the run) and, per commit, whether each encoded chunk was sampled."""
    import qckpt.commit.arrays as arrays

    sampled: list[list[bool]] = []
    encode = arrays.encode_object

    def spy(*args, choose: bool = True):  # type: ignore[no-untyped-def]
        if args[4]:  # a chunk with predictions to try
            sampled[-1].append(choose)
        return encode(*args, choose=choose)

    torch.manual_seed(0)
    trainer = Trainer("tiny", total_steps=100)
    stored = []
    with pytest.MonkeyPatch.context() as patch, qckpt.Repository.init(tmp_path / name, chunk_size=4096, max_chain=4) as repo:
        patch.setattr(arrays, "encode_object", spy)
        for _ in range(commits):
            train_step(trainer.state)
            sampled.append([])
            stored.append(repo.commit(trainer.state).stats.new_stored_bytes)
    return stored, sampled


def test_encodings_are_sampled_once_per_tensor_and_reused_as_compactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qckpt.commit import encoding

    remembered, sampled = _every_step_run(tmp_path, "remembered", 20)
    monkeypatch.setattr(encoding, "RESAMPLE_COMMITS", 1)  # sample every chunk of every commit, as before memory
    always, _ = _every_step_run(tmp_path, "always", 20)
    # Most chunks after the first predicted commit reuse a choice; sampling comes back every few commits.
    direct = sum(not s for commit in sampled for s in commit)
    assert direct > 0.6 * sum(len(commit) for commit in sampled)
    assert all(any(commit) for commit in sampled[1 : 1 + encoding.RESAMPLE_COMMITS * 2 : encoding.RESAMPLE_COMMITS])
    # Reuse costs no bytes, also across the chain restarts (a choice made when the bound
    # left fewer options is not reused when more come back).
    assert sum(remembered) <= 1.01 * sum(always)
    assert all(r <= 1.05 * a for r, a in zip(remembered, always))


def test_a_commit_that_starts_a_branch_predicts_from_the_snapshot_it_came_from(tmp_path: Path) -> None:
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(tmp_path / "r") as repo:
        for _ in range(3):
            train_step(trainer.state)
            repo.commit(trainer.state)
        origin = repo.snapshot("main")
        train_step(trainer.state)
        on_main = repo.commit(trainer.state)
        repo.restore(trainer.state, origin.id)  # back to the origin, as a light cone's future starts
        for group in trainer.optimizer.param_groups:
            group["lr"] *= 0.5  # an intervention: parameters unlike main's step (the moments are the same)
        train_step(trainer.state)
        future = repo.commit(trainer.state, branch="future", warm=False)  # as the light cone commits futures
        assert future.parents == (origin.id,)
        chunks = {snap.id: {c for e in repo.manifest(snap).tensors for c in e.chunks} for snap in (origin, on_main, future)}
        encoded = chunks[future.id] - chunks[origin.id] - chunks[on_main.id]  # what this commit stored
        predicted = [c for c in encoded if set(repo._store.index.get(c).deps) & chunks[origin.id]]
        assert encoded and len(predicted) > len(encoded) / 2, (len(predicted), len(encoded))  # before: a keyframe, none
        expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with qckpt.Repository.open(tmp_path / "r", hot_snapshots=0) as repo:  # decoded from the packs
        model = repo.load("future").tree()["components"]["model"]
        assert all(torch.equal(model[k], expected[k]) for k in expected)


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
def test_an_index_looks_up_many_chunks_at_once(tmp_path: Path, kind: str) -> None:
    """``get_many``: what the write path asks the index in one go (the chunks a commit
    dedups against and every chunk its predictions may depend on); only known ones."""
    from qckpt.format.packs import ChunkLocation
    from qckpt.store.index import LmdbIndex, MemoryIndex

    index = MemoryIndex() if kind == "memory" else LmdbIndex(tmp_path / "index")
    try:
        known = {bytes([i]) * 16: ChunkLocation("ab" * 16, 64 * i, 64, 1, i, (bytes([9]) * 16,) * (i % 2)) for i in range(3)}
        index.put_many(known)
        assert index.get_many([*known, bytes([7]) * 16]) == known
        assert index.get_many([]) == {}
    finally:
        index.close()


def test_objects_are_encoded_and_decoded_on_a_thread_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU-bound work runs on the store's compute pool (``available_cores`` threads),
    never on the many threads that wait on storage."""
    threads: dict[str, set[str]] = {"encode": set(), "decode": set()}

    def recording(kind: str, real: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            threads[kind].add(threading.current_thread().name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(qckpt.commit.arrays, "encode_object", recording("encode", qckpt.commit.arrays.encode_object))
    monkeypatch.setattr(qckpt.store.reader, "decode_object", recording("decode", qckpt.store.reader.decode_object))
    with qckpt.Repository.init(qckpt.MemoryBackend(), chunk_size=256, warm=False, hot_snapshots=0) as repo:
        values = {f"w{i}": torch.randn(1024) for i in range(8)}
        repo.commit(values)
        assert {k: v.equal(values[k]) for k, v in repo.load("main").tree().items()} == dict.fromkeys(values, True)
        allowed = {f"qckpt-cpu_{i}" for i in range(qckpt.store.store.available_cores())}
    assert threads["encode"] and threads["encode"] <= allowed
    assert threads["decode"] and threads["decode"] <= allowed
